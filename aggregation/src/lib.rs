//! Aggregation strategies (FedAvg, FedProx, SCAFFOLD, FairFed) and checkpoints.
