//! FairFed (Ezzeldin, Yan, He, Ferrara, Avestimehr, "FairFed: Enabling Group Fairness in Federated
//! Learning", AAAI 2023, arXiv 2110.00857): the server reweights hospitals each round by how far each
//! hospital's local fairness gap is from the global one.
//!
//! - Start: `w_k = n_k / Σ n` (FedAvg's example-count weights).
//! - Each round, with `F` the fairness metric (EOD or DPD) of the global model computed from the summed
//!   group counts, `F_k` the same metric on hospital k's local data, and `Acc`, `Acc_k` the accuracies:
//!   `Δ_k = |F − F_k|`, or `|Acc − Acc_k|` when `F_k` is undefined locally (the hospital has fewer than two
//!   groups with enough data);
//!   `w_k ← w_k − β (Δ_k − mean_i Δ_i)`; then `w_k ← w_k / Σ_i w_i`.
//!   β = 0 is FedAvg. A hospital whose local gap is far from the global one loses weight.
//! - The weights are public scalars, so the weighted sum of model updates works unchanged under secure
//!   aggregation (each hospital scales its update by its weight, or the server scales the encrypted sum
//!   per hospital).
//!
//! What this implementation adds, and why:
//! - **Clipping at 0.** The centred update sums to zero, so without clipping the weights keep summing to 1,
//!   but a large β can push one below 0, and a negative weight would move the global model *away* from
//!   that hospital's update. Neither the paper's update rule nor declearn's implementation guards
//!   against it; here a weight that would go negative is set to 0 (the hospital sits out of that round's
//!   average) and the weights are then renormalised to sum to 1.
//! - **Multi-group gaps.** The paper states `F` for one binary sensitive attribute as a signed difference;
//!   with more groups we use fairlearn's unsigned gaps ([`crate::metrics`]), so `F ≥ 0`.
//! - q-FFL is not offered here: it reweights whole model updates by local loss, which belongs with the
//!   model vectors in the aggregation crate.

use crate::counts::GroupCounts;
use crate::metrics::{AttributeMetrics, FairnessMetric};

/// Why a FairFed step could not be computed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FairFedError {
    #[error("FairFed needs at least one hospital")]
    NoHospitals,
    #[error("hospital {index} has 0 examples; every hospital needs examples for its initial weight")]
    ZeroExamples { index: usize },
    #[error("{what} has {got} entries but there are {expected} hospitals")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what} must be a finite number >= 0, got {value}")]
    InvalidNumber { what: &'static str, value: f64 },
    #[error(
        "hospital {index} reported no evaluation data, so neither its fairness gap nor its accuracy is known"
    )]
    NoLocalEvaluation { index: usize },
    #[error("the global model has no evaluation data this round, so FairFed cannot compare hospitals")]
    NoGlobalEvaluation,
    #[error("every weight was clipped to 0; lower beta")]
    AllWeightsZero,
    #[error("the hospitals' example counts overflow a 64-bit sum")]
    ExampleCountOverflow,
}

/// FedAvg's initial weights `n_k / Σ n`.
pub fn initial_weights(example_counts: &[u64]) -> Result<Vec<f64>, FairFedError> {
    if example_counts.is_empty() {
        return Err(FairFedError::NoHospitals);
    }
    if let Some(index) = example_counts.iter().position(|&n| n == 0) {
        return Err(FairFedError::ZeroExamples { index });
    }
    let total = example_counts
        .iter()
        .try_fold(0u64, |acc, &n| acc.checked_add(n))
        .ok_or(FairFedError::ExampleCountOverflow)?;
    Ok(example_counts.iter().map(|&n| n as f64 / total as f64).collect())
}

/// One model's fairness gap and accuracy on one dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// The fairness metric (a gap, ≥ 0), `None` when undefined on this data.
    pub fairness: Option<f64>,
    /// Accuracy, `None` when there was no data.
    pub accuracy: Option<f64>,
}

impl Evaluation {
    /// The evaluation of `counts` for one attribute and metric.
    pub fn from_counts(
        counts: &GroupCounts,
        attribute: &str,
        metric: FairnessMetric,
        min_group_size: u64,
    ) -> Self {
        let fairness = counts
            .attribute(attribute)
            .and_then(|g| AttributeMetrics::from_groups(g, min_group_size).metric(metric));
        Evaluation {
            fairness,
            accuracy: counts.overall.accuracy(),
        }
    }
}

/// `Δ_k = |F − F_k|`, falling back to `|Acc − Acc_k|` where `F_k` (or `F`) is undefined.
pub fn gaps(global: &Evaluation, locals: &[Evaluation]) -> Result<Vec<f64>, FairFedError> {
    if locals.is_empty() {
        return Err(FairFedError::NoHospitals);
    }
    locals
        .iter()
        .enumerate()
        .map(|(index, local)| match (global.fairness, local.fairness) {
            (Some(f), Some(fk)) => Ok((f - fk).abs()),
            _ => match (global.accuracy, local.accuracy) {
                (Some(a), Some(ak)) => Ok((a - ak).abs()),
                (None, _) => Err(FairFedError::NoGlobalEvaluation),
                (_, None) => Err(FairFedError::NoLocalEvaluation { index }),
            },
        })
        .collect()
}

/// One FairFed weight step: `w_k − β (Δ_k − mean Δ)`, clipped at 0, normalised to sum to 1.
pub fn update_weights(weights: &[f64], gaps: &[f64], beta: f64) -> Result<Vec<f64>, FairFedError> {
    if weights.is_empty() {
        return Err(FairFedError::NoHospitals);
    }
    if gaps.len() != weights.len() {
        return Err(FairFedError::LengthMismatch {
            what: "gaps",
            got: gaps.len(),
            expected: weights.len(),
        });
    }
    check("beta", beta)?;
    for &w in weights {
        check("weight", w)?;
    }
    for &d in gaps {
        check("gap", d)?;
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let raw: Vec<f64> = weights
        .iter()
        .zip(gaps)
        .map(|(w, d)| (w - beta * (d - mean)).max(0.0))
        .collect();
    let total: f64 = raw.iter().sum();
    if total <= 0.0 {
        return Err(FairFedError::AllWeightsZero);
    }
    Ok(raw.into_iter().map(|w| w / total).collect())
}

fn check(what: &'static str, value: f64) -> Result<(), FairFedError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(FairFedError::InvalidNumber { what, value })
    }
}

/// A whole FairFed round from the hospitals' group counts: returns the new weights and the gaps Δ_k.
/// `locals[k]` are hospital k's counts of the current global model on its validation data; the global
/// counts are their sum.
pub fn round(
    weights: &[f64],
    locals: &[GroupCounts],
    attribute: &str,
    metric: FairnessMetric,
    beta: f64,
    min_group_size: u64,
) -> Result<(Vec<f64>, Vec<f64>), FairFedError> {
    if locals.len() != weights.len() {
        return Err(FairFedError::LengthMismatch {
            what: "hospital counts",
            got: locals.len(),
            expected: weights.len(),
        });
    }
    let global_counts: GroupCounts = locals.iter().sum();
    let global = Evaluation::from_counts(&global_counts, attribute, metric, min_group_size);
    let local: Vec<Evaluation> = locals
        .iter()
        .map(|c| Evaluation::from_counts(c, attribute, metric, min_group_size))
        .collect();
    let d = gaps(&global, &local)?;
    let w = update_weights(weights, &d, beta)?;
    Ok((w, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfusionCounts;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} != {b:?}");
        }
    }

    #[test]
    fn initial_weights_are_example_shares() {
        close(&initial_weights(&[100, 300, 600]).unwrap(), &[0.1, 0.3, 0.6]);
        assert_eq!(initial_weights(&[]), Err(FairFedError::NoHospitals));
        assert_eq!(
            initial_weights(&[5, 0]),
            Err(FairFedError::ZeroExamples { index: 1 })
        );
        // Counts whose sum does not fit in a u64 are refused, not wrapped.
        assert_eq!(
            initial_weights(&[u64::MAX, 1]),
            Err(FairFedError::ExampleCountOverflow)
        );
    }

    /// Worked example, by hand from the update rule:
    /// n = (100, 300, 600) → w = (0.1, 0.3, 0.6). Global EOD F = 0.2, accuracy 0.8.
    /// Hospital 0: F_0 = 0.2 → Δ_0 = 0. Hospital 1: F_1 = 0.5 → Δ_1 = 0.3.
    /// Hospital 2: F_2 undefined, accuracy 0.7 → Δ_2 = |0.8 − 0.7| = 0.1.
    /// mean Δ = 0.4 / 3 = 0.13333…; β = 0.5:
    /// w_0 = 0.1 − 0.5·(0 − 0.13333) = 0.16667
    /// w_1 = 0.3 − 0.5·(0.3 − 0.13333) = 0.21667
    /// w_2 = 0.6 − 0.5·(0.1 − 0.13333) = 0.61667   (sum 1, so normalising changes nothing)
    #[test]
    fn worked_example() {
        let w = initial_weights(&[100, 300, 600]).unwrap();
        let global = Evaluation {
            fairness: Some(0.2),
            accuracy: Some(0.8),
        };
        let locals = [
            Evaluation {
                fairness: Some(0.2),
                accuracy: Some(0.9),
            },
            Evaluation {
                fairness: Some(0.5),
                accuracy: Some(0.75),
            },
            Evaluation {
                fairness: None,
                accuracy: Some(0.7),
            },
        ];
        let d = gaps(&global, &locals).unwrap();
        close(&d, &[0.0, 0.3, 0.1]);
        let w1 = update_weights(&w, &d, 0.5).unwrap();
        close(
            &w1,
            &[
                0.1 + 0.5 * 0.4 / 3.0,
                0.3 - 0.5 * (0.3 - 0.4 / 3.0),
                0.6 + 0.5 * (0.4 / 3.0 - 0.1),
            ],
        );
        close(&w1, &[1.0 / 6.0, 0.65 / 3.0, 1.85 / 3.0]);
        assert!((w1.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // β = 0 is FedAvg.
        close(&update_weights(&w, &d, 0.0).unwrap(), &w);
    }

    /// With β = 2 hospital 1 would get 0.3 − 2·(0.3 − 0.13333) = −0.03333: it is clipped to 0 and the
    /// others renormalised: w_0 = 0.1 + 0.26667 = 0.36667, w_2 = 0.6 + 0.06667 = 0.66667, sum 1.03333.
    #[test]
    fn clipping_and_normalisation() {
        let w = update_weights(&[0.1, 0.3, 0.6], &[0.0, 0.3, 0.1], 2.0).unwrap();
        let m = 0.4 / 3.0;
        let (a, c) = (0.1 + 2.0 * m, 0.6 - 2.0 * (0.1 - m));
        close(&w, &[a / (a + c), 0.0, c / (a + c)]);
    }

    #[test]
    fn bad_inputs_are_named() {
        assert!(matches!(
            update_weights(&[0.5, 0.5], &[0.1], 1.0),
            Err(FairFedError::LengthMismatch { what: "gaps", .. })
        ));
        assert!(matches!(
            update_weights(&[0.5, 0.5], &[0.1, f64::NAN], 1.0),
            Err(FairFedError::InvalidNumber { what: "gap", .. })
        ));
        assert!(matches!(
            update_weights(&[0.5, 0.5], &[0.1, 0.2], -1.0),
            Err(FairFedError::InvalidNumber { what: "beta", .. })
        ));
        let global = Evaluation {
            fairness: Some(0.1),
            accuracy: Some(0.8),
        };
        let empty = Evaluation {
            fairness: None,
            accuracy: None,
        };
        assert_eq!(
            gaps(&global, &[global, empty]),
            Err(FairFedError::NoLocalEvaluation { index: 1 })
        );
    }

    #[test]
    fn round_from_counts() {
        // Hospital 0: race groups with equal TPR/FPR → local EOD 0.
        // Hospital 1: only race 1 → local EOD undefined → accuracy gap.
        let cc = |tp, fp, tn, fn_| ConfusionCounts { tp, fp, tn, fn_ };
        let mut h0 = GroupCounts::new();
        h0.attributes.entry("race".into()).or_default().extend([
            ("0".to_string(), cc(16, 2, 18, 4)),
            ("1".to_string(), cc(16, 2, 18, 4)),
        ]);
        h0.overall = cc(32, 4, 36, 8);
        let mut h1 = GroupCounts::new();
        h1.attributes
            .entry("race".into())
            .or_default()
            .insert("1".into(), cc(10, 10, 10, 10));
        h1.overall = cc(10, 10, 10, 10);
        let w = initial_weights(&[80, 40]).unwrap();
        let (w1, d) = round(&w, &[h0, h1], "race", FairnessMetric::EqualizedOdds, 1.0, 30).unwrap();
        // Global race 0: TPR .8 FPR .1; race 1: (26,12,28,14): TPR 26/40=.65, FPR 12/40=.3 → EOD .2
        // Δ_0 = |.2 − 0| = .2; global accuracy (42+46)/120 = 88/120, hospital 1 accuracy .5.
        let acc_gap: f64 = 88.0 / 120.0 - 0.5;
        close(&d, &[0.2, acc_gap]);
        let mean = (0.2 + acc_gap) / 2.0;
        close(&w1, &[2.0 / 3.0 - (0.2 - mean), 1.0 / 3.0 - (acc_gap - mean)]);
    }
}
