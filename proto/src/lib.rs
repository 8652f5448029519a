//! gRPC protocol between trainers and the aggregator.
