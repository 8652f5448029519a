//! Group fairness metrics, FairFed weights, bias report.
