//! `metav1.Condition` handling shared by the three kinds: condition types, and an update that keeps
//! `lastTransitionTime` when the status does not change (the Kubernetes API conventions).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types used across the API. Each kind documents which of them it carries.
pub mod types {
    /// Long-lived objects (studies, hospitals): the object is usable.
    pub const READY: &str = "Ready";
    /// Rounds: the round finished with an aggregated model (True), failed (False) or runs (Unknown).
    pub const SUCCEEDED: &str = "Succeeded";
    /// Hospitals: the next planned round would exceed the privacy budget.
    pub const PRIVACY_BUDGET_EXHAUSTED: &str = "PrivacyBudgetExhausted";
    /// Rounds: the round's fairness gaps are within the study's thresholds.
    pub const FAIRNESS_WITHIN_THRESHOLD: &str = "FairnessWithinThreshold";
    /// Studies: the last rounds violated the fairness thresholds.
    pub const FAIRNESS_DEGRADED: &str = "FairnessDegraded";
    /// Rounds and studies: at least the minimum number of hospitals took part.
    pub const QUORUM_REACHED: &str = "QuorumReached";
    /// Studies: every hospital the selector matches is admitted (consent with the current hash,
    /// trainer image allowed, DP or explicit non-private permission, budget). False lists who is
    /// left out and why.
    pub const HOSPITALS_ADMITTED: &str = "HospitalsAdmitted";
    /// Hospitals: deleting it is refused while its privacy ledger is not empty.
    pub const DELETION_BLOCKED: &str = "DeletionBlocked";
}

/// Condition status values.
pub mod status {
    pub const TRUE: &str = "True";
    pub const FALSE: &str = "False";
    pub const UNKNOWN: &str = "Unknown";
}

/// Look-ups on a list of conditions.
pub trait ConditionExt {
    /// The condition of the given type, if present.
    fn condition(&self, type_: &str) -> Option<&Condition>;
    /// Whether the condition of the given type has status `True`.
    fn is_true(&self, type_: &str) -> bool {
        self.condition(type_).is_some_and(|c| c.status == status::TRUE)
    }
}

impl ConditionExt for [Condition] {
    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.iter().find(|c| c.type_ == type_)
    }
}

impl ConditionExt for Vec<Condition> {
    fn condition(&self, type_: &str) -> Option<&Condition> {
        self.as_slice().condition(type_)
    }
}

/// Sets a condition in place. `lastTransitionTime` changes only when the status changes; reason, message
/// and `observedGeneration` are always updated. Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> bool {
    set_condition_at(
        conditions,
        type_,
        status,
        reason,
        message,
        observed_generation,
        Timestamp::now(),
    )
}

/// [`set_condition`] with the transition time given (for pure code that is handed the clock).
pub fn set_condition_at(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status
                || c.reason != reason
                || c.message != message
                || c.observed_generation != observed_generation;
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status.to_string();
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_changes_only_with_status() {
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            types::READY,
            status::FALSE,
            "Pending",
            "waiting",
            Some(1)
        ));
        let t0 = c[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(set_condition(
            &mut c,
            types::READY,
            status::FALSE,
            "Pending",
            "still waiting",
            Some(2)
        ));
        assert_eq!(
            c[0].last_transition_time, t0,
            "same status keeps the transition time"
        );
        assert_eq!(c[0].observed_generation, Some(2));
        assert!(!set_condition(
            &mut c,
            types::READY,
            status::FALSE,
            "Pending",
            "still waiting",
            Some(2)
        ));
        assert!(set_condition(
            &mut c,
            types::READY,
            status::TRUE,
            "Ready",
            "ok",
            Some(2)
        ));
        assert_ne!(c[0].last_transition_time, t0);
        assert!(c.is_true(types::READY));
        assert_eq!(c.len(), 1);
    }
}
