//! The compact result the aggregator leaves at exit for the operator (`--result-file`, usually the
//! container's termination-message path): see [`caduceus_fairness::RoundOutcome`].

use std::path::Path;

use caduceus_fairness::RoundOutcome;

use crate::service::Study;

/// The outcome of this run: the last training round's participants and the evaluation of the model
/// it produced (the final-evaluation record when the study ran one).
pub fn outcome(study: &Study, result: &Result<(), String>, min_group_size: u64) -> RoundOutcome {
    let history = study.history();
    let (round, _) = study.progress();
    let evaluation = history.iter().rev().find(|r| r.round == round);
    let training = history.iter().rev().find(|r| r.round + 1 == round);
    RoundOutcome::new(result.clone(), round, training, evaluation, min_group_size)
}

/// Writes the outcome to `path` (when given); failures to write are logged, not fatal.
pub fn write(path: Option<&Path>, study: &Study, result: &Result<(), String>, min_group_size: u64) {
    let Some(path) = path else { return };
    let msg = outcome(study, result, min_group_size).to_message();
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(path, msg) {
        tracing::error!("cannot write the result file {}: {e}", path.display());
    }
}
