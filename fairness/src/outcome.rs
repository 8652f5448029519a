//! A round's outcome as the aggregator reports it to the operator: small enough for a container
//! termination message (Kubernetes keeps at most 4 KiB of it), with no per-group counts.
//!
//! The aggregator writes it at exit ([`RoundOutcome::to_message`]); the operator reads it from the
//! aggregator pod's `state.terminated.message` ([`RoundOutcome::parse`]) and turns the per-attribute
//! gaps into the round's `FairnessWithinThreshold` condition with [`crate::verdict`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::counts::GroupCounts;
use crate::metrics::{AttributeMetrics, FairnessMetrics};
use crate::results::RoundResult;

/// Kubernetes truncates termination messages beyond this many bytes.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The gaps of one sensitive attribute (no per-group detail).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttributeGaps {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demographic_parity_difference: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equalized_odds_difference: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_group_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_group: Option<String>,
    /// Groups left out for having fewer examples than the minimum group size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insufficient_data: Vec<String>,
}

impl AttributeGaps {
    pub fn from_metrics(m: &AttributeMetrics) -> Self {
        Self {
            demographic_parity_difference: m.demographic_parity_difference,
            equalized_odds_difference: m.equalized_odds_difference,
            worst_group_accuracy: m.worst_group_accuracy,
            worst_group: m.worst_group.clone(),
            insufficient_data: m.insufficient_data.clone(),
        }
    }

    /// The metrics [`crate::verdict`] reads (per-group detail empty).
    pub fn to_metrics(&self, min_group_size: u64) -> AttributeMetrics {
        AttributeMetrics {
            demographic_parity_difference: self.demographic_parity_difference,
            demographic_parity_ratio: None,
            equalized_odds_difference: self.equalized_odds_difference,
            equalized_odds_ratio: None,
            worst_group_accuracy: self.worst_group_accuracy,
            worst_group: self.worst_group.clone(),
            min_group_size,
            insufficient_data: self.insufficient_data.clone(),
            groups: BTreeMap::new(),
        }
    }
}

/// What one aggregator run reports about its last round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoundOutcome {
    /// `succeeded` or `failed`.
    pub status: String,
    /// Why it failed, or a one-line summary.
    pub message: String,
    /// Rounds completed by the model store (the global model's round).
    pub rounds_completed: u32,
    /// Hospitals whose update was aggregated in the last training round.
    #[serde(default)]
    pub participants: Vec<String>,
    /// Accuracy of the resulting global model on the hospitals' validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Examples evaluated.
    #[serde(default)]
    pub evaluated: u64,
    /// Minimum group size used for the gaps.
    pub min_group_size: u64,
    /// Gaps per sensitive attribute (intersections left out).
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeGaps>,
}

impl RoundOutcome {
    /// Builds the outcome from the last training round's record (participants) and the evaluation of
    /// the model it produced (`evaluation`, whose counts give accuracy and gaps).
    pub fn new(
        ok: Result<(), String>,
        rounds_completed: u32,
        training: Option<&RoundResult>,
        evaluation: Option<&RoundResult>,
        min_group_size: u64,
    ) -> Self {
        let counts = evaluation.map(|r| &r.counts);
        let metrics = counts.map(|c| FairnessMetrics::from_counts(c, min_group_size));
        let attributes = metrics
            .as_ref()
            .map(|m| {
                m.attributes
                    .iter()
                    .filter(|(k, _)| !GroupCounts::is_intersection(k))
                    .map(|(k, v)| (k.clone(), AttributeGaps::from_metrics(v)))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            status: if ok.is_ok() { "succeeded" } else { "failed" }.into(),
            message: match ok {
                Ok(()) => format!("{rounds_completed} rounds completed"),
                Err(e) => e,
            },
            rounds_completed,
            participants: training.map(|r| r.participants.clone()).unwrap_or_default(),
            accuracy: evaluation.and_then(|r| r.accuracy.or_else(|| r.counts.overall.accuracy())),
            loss: evaluation.and_then(|r| r.loss),
            evaluated: counts.map(|c| c.overall.total()).unwrap_or(0),
            min_group_size,
            attributes,
        }
    }

    /// JSON of at most [`TERMINATION_MESSAGE_LIMIT`] bytes: the worst-group names and then the message
    /// are shortened when needed.
    pub fn to_message(&self) -> String {
        let mut me = self.clone();
        let mut s = serde_json::to_string(&me).unwrap_or_default();
        if s.len() > TERMINATION_MESSAGE_LIMIT {
            for g in me.attributes.values_mut() {
                g.insufficient_data.clear();
                g.worst_group = None;
            }
            s = serde_json::to_string(&me).unwrap_or_default();
        }
        while s.len() > TERMINATION_MESSAGE_LIMIT && !me.message.is_empty() {
            let keep = me
                .message
                .len()
                .saturating_sub(s.len() - TERMINATION_MESSAGE_LIMIT + 16);
            let mut cut = keep.min(me.message.len());
            while !me.message.is_char_boundary(cut) {
                cut -= 1;
            }
            me.message.truncate(cut);
            me.message.push('…');
            s = serde_json::to_string(&me).unwrap_or_default();
            if keep == 0 {
                me.message.clear();
                s = serde_json::to_string(&me).unwrap_or_default();
            }
        }
        s
    }

    /// Parses a termination message; the error says what is wrong.
    pub fn parse(message: &str) -> Result<Self, String> {
        serde_json::from_str(message.trim()).map_err(|e| format!("not a round outcome ({e})"))
    }

    /// Per-attribute metrics for [`crate::verdict`].
    pub fn attribute_metrics(&self) -> BTreeMap<String, AttributeMetrics> {
        self.attributes
            .iter()
            .map(|(k, g)| (k.clone(), g.to_metrics(self.min_group_size)))
            .collect()
    }

    /// The largest gap of a kind across attributes.
    pub fn max_gap(&self, f: impl Fn(&AttributeGaps) -> Option<f64>) -> Option<f64> {
        self.attributes.values().filter_map(f).reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counts::ConfusionCounts;

    fn eval_round() -> RoundResult {
        let mut counts = GroupCounts::new();
        let a = ConfusionCounts {
            tp: 40,
            fp: 5,
            tn: 40,
            fn_: 15,
        };
        let b = ConfusionCounts {
            tp: 20,
            fp: 20,
            tn: 30,
            fn_: 30,
        };
        counts.overall.merge(&a);
        counts.overall.merge(&b);
        let mut race = BTreeMap::new();
        race.insert("0".to_string(), a);
        race.insert("1".to_string(), b);
        counts.attributes.insert("race".into(), race);
        RoundResult {
            round: 2,
            counts,
            loss: Some(0.5),
            ..Default::default()
        }
    }

    #[test]
    fn outcome_carries_accuracy_and_gaps_and_round_trips() {
        let training = RoundResult {
            round: 1,
            participants: vec!["a".into(), "b".into()],
            ..Default::default()
        };
        let o = RoundOutcome::new(Ok(()), 2, Some(&training), Some(&eval_round()), 30);
        assert_eq!(o.participants, vec!["a", "b"]);
        assert!((o.accuracy.unwrap() - 130.0 / 200.0).abs() < 1e-12);
        let race = &o.attributes["race"];
        // TPR 40/55 vs 20/50, FPR 5/45 vs 20/50: EOD is the larger gap.
        let eod = (40.0f64 / 55.0 - 20.0 / 50.0).max(20.0 / 50.0 - 5.0 / 45.0);
        assert!((race.equalized_odds_difference.unwrap() - eod).abs() < 1e-12);
        let back = RoundOutcome::parse(&o.to_message()).unwrap();
        assert_eq!(back, o);
        let v = crate::verdict(
            &crate::FairnessThresholds {
                max_demographic_parity_difference: None,
                max_equalized_odds_difference: Some(0.1),
            },
            &back.attribute_metrics(),
        );
        assert_eq!(v.outcome, crate::Outcome::Fail, "{v:?}");
    }

    #[test]
    fn long_failure_messages_fit_a_termination_message() {
        let o = RoundOutcome::new(Err("x".repeat(10_000)), 0, None, None, 30);
        let m = o.to_message();
        assert!(m.len() <= TERMINATION_MESSAGE_LIMIT, "{}", m.len());
        assert_eq!(RoundOutcome::parse(&m).unwrap().status, "failed");
        assert!(
            RoundOutcome::parse("garbage")
                .unwrap_err()
                .contains("not a round outcome")
        );
    }
}
