//! The study's state machine, pure: from its rounds, what the study does next, the `Ready`
//! condition that says so, and the figures its status summarises.

use std::collections::BTreeMap;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::{FederatedStudy, FederatedStudyStatus, TrainingRound, set_condition};

use crate::plan;
use crate::round::finished;

/// What the machine sees of one round of the study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundView {
    pub round: u32,
    pub attempt: u32,
    /// `Some(true)` succeeded, `Some(false)` failed, `None` still running.
    pub finished: Option<bool>,
    /// Its `Succeeded` condition's message.
    pub message: String,
}

impl RoundView {
    #[must_use]
    pub fn of(r: &TrainingRound) -> Self {
        Self {
            round: r.spec.round,
            attempt: r.spec.attempt,
            finished: finished(r.status.as_ref()),
            message: r
                .status
                .as_ref()
                .and_then(|s| s.conditions.condition(types::SUCCEEDED))
                .map(|c| c.message.clone())
                .unwrap_or_default(),
        }
    }
}

/// What the study does next, decided from its rounds.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// A round runs: wait.
    Running(String),
    /// Start round `round`, attempt `attempt`.
    Start { round: u32, attempt: u32 },
    /// Every round succeeded.
    Completed,
    /// A round failed and its retries are used up.
    Failed(String),
}

/// The state machine's transition (pure).
/// `rounds` are sorted by (round, attempt).
#[must_use]
pub fn next_step(total: u32, max_retries: u32, rounds: &[RoundView]) -> Next {
    let Some(RoundView {
        round,
        attempt,
        finished: done,
        message: msg,
    }) = rounds.last()
    else {
        return Next::Start { round: 0, attempt: 0 };
    };
    match done {
        None => Next::Running(format!("round {round} attempt {attempt} runs")),
        Some(true) if round + 1 >= total => Next::Completed,
        Some(true) => Next::Start {
            round: round + 1,
            attempt: 0,
        },
        Some(false) if *attempt < max_retries => Next::Start {
            round: *round,
            attempt: attempt + 1,
        },
        Some(false) => Next::Failed(format!(
            "round {round} failed after {} attempts: {msg}",
            attempt + 1
        )),
    }
}

/// The `Ready` condition of a study that is not starting a round, and whether its change is worth
/// an event (warning or not, and the event's action).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub event: Option<(bool, &'static str)>,
}

/// `Ready` for `next` (`None` for [`Next::Start`]: starting a round sets its own).
#[must_use]
pub fn ready(next: &Next, total: u32) -> Option<Ready> {
    Some(match next {
        Next::Start { .. } => return None,
        Next::Running(msg) => Ready {
            status: cstatus::TRUE,
            reason: "Running",
            message: msg.clone(),
            event: None,
        },
        Next::Completed => Ready {
            status: cstatus::TRUE,
            reason: "Completed",
            message: format!("all {total} rounds succeeded"),
            event: Some((false, "Complete")),
        },
        Next::Failed(msg) => Ready {
            status: cstatus::FALSE,
            reason: "RoundFailed",
            message: msg.clone(),
            event: Some((true, "Retry")),
        },
    })
}

/// Latest figures, ε per hospital and `FairnessDegraded` from the study's rounds.
pub fn summarise(study: &FederatedStudy, rounds: &[TrainingRound], status: &mut FederatedStudyStatus) {
    let generation = study.metadata.generation;
    let succeeded: Vec<&TrainingRound> = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()) == Some(true))
        .collect();
    status.completed_rounds = u32::try_from(succeeded.len()).unwrap_or(u32::MAX);
    if let Some(last) = rounds.last() {
        status.current_round = Some(last.spec.round + 1);
        status.participants = last.spec.participants.clone();
    }
    if let Some(last) = succeeded.last().and_then(|r| r.status.as_ref()) {
        status.accuracy = last.accuracy;
        status.demographic_parity_difference = last.demographic_parity_difference;
        status.equalized_odds_difference = last.equalized_odds_difference;
    }
    let mut eps: BTreeMap<String, f64> = BTreeMap::new();
    for r in rounds {
        for (h, e) in r
            .status
            .as_ref()
            .map(|s| s.epsilon_spent.clone())
            .unwrap_or_default()
        {
            eps.insert(h, e);
        }
    }
    status.epsilon_spent = eps;
    let within: Vec<Option<bool>> = succeeded
        .iter()
        .map(|r| {
            r.status
                .as_ref()
                .and_then(|s| s.conditions.condition(types::FAIRNESS_WITHIN_THRESHOLD))
                .and_then(|c| match c.status.as_str() {
                    cstatus::TRUE => Some(true),
                    cstatus::FALSE => Some(false),
                    _ => None,
                })
        })
        .collect();
    if !within.is_empty() {
        let after = study.spec.fairness.degraded_after_rounds;
        if plan::degraded(&within, after) {
            let last_msg = succeeded
                .last()
                .and_then(|r| r.status.as_ref())
                .and_then(|s| s.conditions.condition(types::FAIRNESS_WITHIN_THRESHOLD))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            set_condition(
                &mut status.conditions,
                types::FAIRNESS_DEGRADED,
                cstatus::TRUE,
                "ThresholdsExceeded",
                format!("the last {after} rounds violated the fairness thresholds; latest: {last_msg}"),
                generation,
            );
        } else {
            set_condition(
                &mut status.conditions,
                types::FAIRNESS_DEGRADED,
                cstatus::FALSE,
                "WithinThresholds",
                format!("fewer than {after} consecutive rounds violated the fairness thresholds"),
                generation,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(round: u32, attempt: u32, finished: Option<bool>, message: &str) -> RoundView {
        RoundView {
            round,
            attempt,
            finished,
            message: message.into(),
        }
    }

    #[test]
    fn state_machine() {
        assert_eq!(next_step(3, 2, &[]), Next::Start { round: 0, attempt: 0 });
        assert!(matches!(next_step(3, 2, &[v(0, 0, None, "")]), Next::Running(_)));
        assert_eq!(
            next_step(3, 2, &[v(0, 0, Some(true), "")]),
            Next::Start { round: 1, attempt: 0 }
        );
        assert_eq!(
            next_step(3, 2, &[v(0, 0, Some(true), ""), v(1, 0, Some(false), "q")]),
            Next::Start { round: 1, attempt: 1 }
        );
        assert!(matches!(
            next_step(3, 1, &[v(0, 0, Some(true), ""), v(1, 0, Some(false), "q"), v(1, 1, Some(false), "quorum")]),
            Next::Failed(m) if m.contains("after 2 attempts") && m.contains("quorum")
        ));
        assert_eq!(
            next_step(2, 0, &[v(0, 0, Some(true), ""), v(1, 0, Some(true), "")]),
            Next::Completed
        );
    }

    #[test]
    fn ready_says_what_the_study_does() {
        assert_eq!(ready(&Next::Start { round: 0, attempt: 0 }, 3), None);
        let r = ready(&Next::Running("round 1 attempt 0 runs".into()), 3).unwrap();
        assert_eq!((r.status, r.reason, r.event), (cstatus::TRUE, "Running", None));
        let r = ready(&Next::Completed, 3).unwrap();
        assert_eq!(
            (r.status, r.reason, r.message.as_str()),
            (cstatus::TRUE, "Completed", "all 3 rounds succeeded")
        );
        assert_eq!(r.event, Some((false, "Complete")));
        let r = ready(&Next::Failed("round 1 failed after 2 attempts: q".into()), 3).unwrap();
        assert_eq!((r.status, r.reason), (cstatus::FALSE, "RoundFailed"));
        assert_eq!(r.event, Some((true, "Retry")));
    }
}
