//! The study state machine and the gRPC service that serves it, split by concern.
//!
//! Rounds: `0..R` are training rounds; round `R` (when final evaluation is on) is an evaluation-only
//! round in which hospitals evaluate the final model. The model served in round `r` is checkpoint `r`.
//! A round closes as soon as `quorum_max` updates are in, or at its deadline when at least
//! `quorum_min` are in; with fewer at the deadline the study fails.
//!
//! The round record of round `r` ([`caduceus_fairness::RoundResult`]) holds the hospitals' evaluation
//! of model `r` (the model the round started from) summed over participants, so record 0 is the initial
//! model and record `R` the final one.
//!
//! - `transport`: the tonic service ([`FederationService`]): peer identity (client certificate →
//!   hospital), upload limits, reading update streams and chunking the served model.
//! - `study`: the study ([`Study`]): its state, admission of uploads and the round loop.
//! - `record`: a closed round's record (pooled evaluation, per-hospital details, `FairFed` weights).
//! - `aggregate`: the [`RoundAggregator`](aggregate::RoundAggregator) trait that combines a round's
//!   updates, in the clear or under TFHE.
//! - `checkpoint`: checkpoint metadata, resuming from or initialising the model store, round records
//!   and encrypted aggregate files.

mod aggregate;
mod checkpoint;
mod record;
mod study;
mod transport;

pub use checkpoint::aggregate_file_name;
pub use study::{Phase, Study, Summary};
pub use transport::FederationService;

/// The settings of a 2-hospital, 2-round small-cnn study whose files live under `dir`, plus `extra` flags.
#[cfg(test)]
fn test_config(dir: &std::path::Path, extra: &[&str]) -> crate::StudyConfig {
    use clap::Parser;
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::write(dir.join(f), "").unwrap();
    }
    let path = |f: &str| dir.join(f).display().to_string();
    let mut args = vec![
        "caduceus-aggregator".to_string(),
        "--study-id=unit".into(),
        "--rounds=2".into(),
        "--hospitals=hospital-0,hospital-1".into(),
        "--arch=small-cnn".into(),
        format!("--tls-cert={}", path("cert.pem")),
        format!("--tls-key={}", path("key.pem")),
        format!("--tls-ca={}", path("ca.pem")),
        format!("--model-store={}", path("store")),
    ];
    args.extend(extra.iter().map(|s| (*s).to_string()));
    crate::AggregatorArgs::try_parse_from(args)
        .unwrap()
        .validate()
        .unwrap()
}
