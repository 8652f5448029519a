//! API types (FederatedStudy, HospitalClient, TrainingRound) and the crdgen binary.
