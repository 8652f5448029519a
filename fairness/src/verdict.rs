//! The fairness verdict of one round against the study's thresholds, for the operator's
//! `FairnessWithinThreshold` condition.
//!
//! Rules:
//! - Each single sensitive attribute (not the intersections, whose small groups make them too noisy for
//!   a pass/fail gate; they are in the report) is checked: its demographic parity difference must be
//!   `<= max_demographic_parity_difference` and its equalized odds difference
//!   `<= max_equalized_odds_difference`. A threshold left unset is not checked.
//! - Any defined gap above its threshold → **Fail** (reason `DemographicParityExceeded`,
//!   `EqualizedOddsExceeded`, or `ThresholdsExceeded` when both kinds are).
//! - No gap above, and at least one checked gap defined → **Pass** (`WithinThreshold`).
//! - No threshold set → **Undetermined** (`NoThresholds`); thresholds set but every checked gap
//!   undefined (too few groups with enough data) → **Undetermined** (`InsufficientData`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::counts::GroupCounts;
use crate::metrics::AttributeMetrics;

/// The study's fairness thresholds (both optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FairnessThresholds {
    pub max_demographic_parity_difference: Option<f64>,
    pub max_equalized_odds_difference: Option<f64>,
}

/// Pass, fail, or cannot tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Pass,
    Fail,
    Undetermined,
}

impl Outcome {
    /// The Kubernetes condition status: "True", "False" or "Unknown".
    pub fn condition_status(self) -> &'static str {
        match self {
            Outcome::Pass => "True",
            Outcome::Fail => "False",
            Outcome::Undetermined => "Unknown",
        }
    }
}

/// The verdict: what the operator writes into the `FairnessWithinThreshold` condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub outcome: Outcome,
    /// CamelCase machine reason, as Kubernetes condition reasons are.
    pub reason: String,
    /// One sentence for a person.
    pub message: String,
}

/// (condition reason on failure, metric name, threshold, getter)
type Check = (
    &'static str,
    &'static str,
    Option<f64>,
    fn(&AttributeMetrics) -> Option<f64>,
);

/// Decides the verdict from the per-attribute metrics of one round. Attribute keys containing
/// [`crate::INTERSECTION_SEP`] are intersections and are skipped.
pub fn verdict(thresholds: &FairnessThresholds, attributes: &BTreeMap<String, AttributeMetrics>) -> Verdict {
    let checks: [Check; 2] = [
        (
            "DemographicParityExceeded",
            "demographic parity difference",
            thresholds.max_demographic_parity_difference,
            |m| m.demographic_parity_difference,
        ),
        (
            "EqualizedOddsExceeded",
            "equalized odds difference",
            thresholds.max_equalized_odds_difference,
            |m| m.equalized_odds_difference,
        ),
    ];
    if checks.iter().all(|c| c.2.is_none()) {
        return Verdict {
            outcome: Outcome::Undetermined,
            reason: "NoThresholds".into(),
            message: "The study sets no fairness thresholds.".into(),
        };
    }
    let mut failures = Vec::new();
    let mut fail_reasons = Vec::new();
    let mut passes = Vec::new();
    let mut undefined = Vec::new();
    for (attr, m) in attributes
        .iter()
        .filter(|(k, _)| !GroupCounts::is_intersection(k))
    {
        for (reason, name, threshold, get) in &checks {
            let Some(max) = threshold else { continue };
            match get(m) {
                Some(v) if v > *max => {
                    failures.push(format!("{attr} {name} is {v:.3}, above the limit {max:.3}"));
                    if !fail_reasons.contains(reason) {
                        fail_reasons.push(*reason);
                    }
                }
                Some(v) => passes.push(format!("{attr} {name} {v:.3} <= {max:.3}")),
                None => undefined.push(format!("{attr} {name}")),
            }
        }
    }
    let not_measured = if undefined.is_empty() {
        String::new()
    } else {
        format!(
            " Not measurable (too few groups with enough data): {}.",
            undefined.join(", ")
        )
    };
    if !failures.is_empty() {
        let reason = if fail_reasons.len() > 1 {
            "ThresholdsExceeded".to_string()
        } else {
            fail_reasons[0].to_string()
        };
        return Verdict {
            outcome: Outcome::Fail,
            reason,
            message: format!("Unfair: {}.{not_measured}", failures.join("; ")),
        };
    }
    if passes.is_empty() {
        return Verdict {
            outcome: Outcome::Undetermined,
            reason: "InsufficientData".into(),
            message: if undefined.is_empty() {
                "No sensitive attribute was evaluated this round.".into()
            } else {
                format!("Fairness could not be measured.{not_measured}")
            },
        };
    }
    Verdict {
        outcome: Outcome::Pass,
        reason: "WithinThreshold".into(),
        message: format!("Within thresholds: {}.{not_measured}", passes.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfusionCounts;

    fn attr(groups: &[(u64, u64, u64, u64)]) -> AttributeMetrics {
        let g = groups
            .iter()
            .enumerate()
            .map(|(i, &(tp, fp, tn, fn_))| (i.to_string(), ConfusionCounts { tp, fp, tn, fn_ }))
            .collect();
        AttributeMetrics::from_groups(&g, 30)
    }

    fn both(dpd: f64, eod: f64) -> FairnessThresholds {
        FairnessThresholds {
            max_demographic_parity_difference: Some(dpd),
            max_equalized_odds_difference: Some(eod),
        }
    }

    #[test]
    fn pass_fail_and_reasons() {
        // race: DPD 0, EOD .05. gender: selection .45 vs .7 → DPD .25; TPR .8 vs 1, FPR .1 vs .4 → EOD .3.
        let mut m = BTreeMap::new();
        m.insert("race".to_string(), attr(&[(16, 2, 18, 4), (15, 3, 17, 5)]));
        let v = verdict(&both(0.1, 0.1), &m);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert_eq!(v.reason, "WithinThreshold");
        assert_eq!(v.outcome.condition_status(), "True");

        m.insert("gender".to_string(), attr(&[(16, 2, 18, 4), (20, 8, 12, 0)]));
        let v = verdict(&both(0.1, 0.5), &m);
        assert_eq!(v.outcome, Outcome::Fail);
        assert_eq!(v.reason, "DemographicParityExceeded");
        assert!(
            v.message
                .contains("gender demographic parity difference is 0.250"),
            "{}",
            v.message
        );
        let v = verdict(&both(0.3, 0.1), &m);
        assert_eq!(v.reason, "EqualizedOddsExceeded");
        let v = verdict(&both(0.1, 0.1), &m);
        assert_eq!(v.reason, "ThresholdsExceeded");
        assert_eq!(v.outcome.condition_status(), "False");
        // Only the DPD threshold set: EOD is not checked.
        let only_dpd = FairnessThresholds {
            max_demographic_parity_difference: Some(0.3),
            max_equalized_odds_difference: None,
        };
        assert_eq!(verdict(&only_dpd, &m).outcome, Outcome::Pass);
    }

    #[test]
    fn intersections_are_not_gated() {
        let mut m = BTreeMap::new();
        m.insert("race".to_string(), attr(&[(16, 2, 18, 4), (16, 2, 18, 4)]));
        m.insert("gender&race".to_string(), attr(&[(20, 20, 0, 0), (0, 0, 20, 20)]));
        assert_eq!(verdict(&both(0.1, 0.1), &m).outcome, Outcome::Pass);
    }

    #[test]
    fn undetermined_cases() {
        let mut m = BTreeMap::new();
        m.insert("race".to_string(), attr(&[(16, 2, 18, 4), (1, 0, 1, 0)]));
        let v = verdict(&both(0.1, 0.1), &m);
        assert_eq!(v.outcome, Outcome::Undetermined);
        assert_eq!(v.reason, "InsufficientData");
        assert_eq!(v.outcome.condition_status(), "Unknown");
        let v = verdict(&FairnessThresholds::default(), &m);
        assert_eq!(v.reason, "NoThresholds");
        let v = verdict(&both(0.1, 0.1), &BTreeMap::new());
        assert_eq!(v.reason, "InsufficientData");
    }
}
