//! Group fairness metrics, FairFed weights, bias report.
//!
//! - [`counts`]: per-group confusion counts that trainers send and the aggregator sums.
//! - [`metrics`]: fairlearn-style group metrics from those counts.
//! - [`fairfed`]: FairFed's server-side hospital weights.
//! - [`verdict`]: pass/fail against the study's fairness thresholds.
//! - [`results`]: the study results directory shared by `caduceus simulate` and `caduceus report`.
//! - [`audit`]: the fairness audit of a predictions CSV (`caduceus fairness`).
//! - [`report`]: the self-contained HTML bias report (`caduceus report`).

pub mod audit;
pub mod counts;
pub mod fairfed;
pub mod metrics;
pub mod outcome;
pub mod report;
pub mod results;
pub mod verdict;

pub use counts::{ConfusionCounts, GroupCounts, INTERSECTION_SEP, intersection_key, one_vs_rest};
pub use metrics::{AttributeMetrics, DEFAULT_MIN_GROUP_SIZE, FairnessMetric, FairnessMetrics, GroupMetrics};
pub use outcome::{AttributeGaps, RoundOutcome};
pub use results::{ResultsError, RoundResult, StudyResults};
pub use verdict::{FairnessThresholds, Outcome, Verdict, verdict};

/// Errors of the fairness library.
#[derive(Debug, thiserror::Error)]
pub enum FairnessError {
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: String,
    },
}
