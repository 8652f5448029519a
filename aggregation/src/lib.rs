//! Server-side aggregation for federated studies, and the model store.
//!
//! - [`kernels`]: cache-blocked weighted sums over flat `f32` vectors, close to memory bandwidth.
//! - [`Strategy`] and [`aggregate`]: FedAvg (weighted by example counts), FedProx (server side equals
//!   FedAvg), SCAFFOLD (server learning rate and control variates) and FairFed (weights supplied by the
//!   fairness engine; this crate applies them).
//! - [`checkpoint`]: atomic checkpoints of the global model with round metadata, a manifest of the latest
//!   round, and resume from the newest checkpoint that verifies.
//!
//! Updates are *deltas*: `Δy_i = y_i − x`, the hospital's locally trained parameters minus the global
//! parameters it started from (and for SCAFFOLD `Δc_i = c_i⁺ − c_i`).

pub mod checkpoint;
pub mod kernels;

pub use checkpoint::{Checkpoint, CheckpointError, CheckpointMeta, ModelStore, TensorMeta};

/// Largest `num_examples` one update may claim (2³²). The count comes from the network, so it is
/// bounded: far above any hospital's training set, and small enough that the sum over any number of
/// hospitals the study can hold fits in a u64 (sums are checked as well).
pub const MAX_NUM_EXAMPLES: u64 = 1 << 32;

/// A server-side aggregation rule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum Strategy {
    /// `x ← x + Σ_i (n_i / Σ n) Δy_i`.
    FedAvg,
    /// Clients add the proximal term `μ/2 ‖w − x‖²`; the server update is FedAvg's.
    FedProx { mu: f32 },
    /// Karimireddy et al. 2020, Algorithm 1: `x ← x + η_g · mean_i Δy_i`,
    /// `c ← c + (|S| / N) · mean_i Δc_i`, with N the number of hospitals in the study.
    Scaffold { server_lr: f32 },
    /// Ezzeldin et al. 2023: FedAvg with per-hospital weights that the fairness engine updates each round
    /// from the gap between local and global fairness (parameter beta). The weights are passed to
    /// [`aggregate`]; they are public scalars, so this also works under secure aggregation.
    FairFed { beta: f32 },
}

impl Strategy {
    /// Lower-case name (`fedavg`, `fedprox`, `scaffold`, `fairfed`).
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::FedAvg => "fedavg",
            Strategy::FedProx { .. } => "fedprox",
            Strategy::Scaffold { .. } => "scaffold",
            Strategy::FairFed { .. } => "fairfed",
        }
    }

    /// Whether the strategy keeps control variates (SCAFFOLD).
    pub fn uses_control(&self) -> bool {
        matches!(self, Strategy::Scaffold { .. })
    }

    /// Checks the parameters' ranges.
    pub fn validate(&self) -> Result<(), AggregationError> {
        match *self {
            Strategy::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => Err(
                AggregationError::InvalidParameter(format!("fedprox mu must be ≥ 0, got {mu}")),
            ),
            Strategy::Scaffold { server_lr } if !(server_lr.is_finite() && server_lr > 0.0) => {
                Err(AggregationError::InvalidParameter(format!(
                    "scaffold server learning rate must be > 0, got {server_lr}"
                )))
            }
            Strategy::FairFed { beta } if !(beta.is_finite() && beta >= 0.0) => Err(
                AggregationError::InvalidParameter(format!("fairfed beta must be ≥ 0, got {beta}")),
            ),
            _ => Ok(()),
        }
    }
}

/// Errors of [`aggregate`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AggregationError {
    #[error("no updates to aggregate")]
    NoUpdates,
    #[error("update from {hospital} has {got} parameters, the global model has {expected}")]
    ShapeMismatch {
        hospital: String,
        expected: usize,
        got: usize,
    },
    #[error("updates carry zero training examples in total; FedAvg weights are undefined")]
    ZeroExamples,
    #[error(
        "update from {hospital} claims num_examples = {num_examples}, above the maximum of {MAX_NUM_EXAMPLES}"
    )]
    TooManyExamples { hospital: String, num_examples: u64 },
    #[error("the updates' num_examples overflow a 64-bit sum")]
    ExampleCountOverflow,
    #[error("SCAFFOLD update from {hospital} has no control-variate delta")]
    MissingControl { hospital: String },
    #[error("SCAFFOLD needs a server control variate in the global state")]
    MissingServerControl,
    #[error("{0}")]
    InvalidParameter(String),
    #[error("got {got} aggregation weights for {expected} updates")]
    WeightCount { expected: usize, got: usize },
    #[error("aggregation weight {index} is {value}; weights must be finite and ≥ 0 with a positive sum")]
    BadWeight { index: usize, value: f64 },
    #[error("FairFed needs weights from the fairness engine")]
    MissingWeights,
}

/// One hospital's update, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct ClientUpdate<'a> {
    pub hospital: &'a str,
    pub num_examples: u64,
    /// `y_i − x`.
    pub delta: &'a [f32],
    /// SCAFFOLD only: `c_i⁺ − c_i`.
    pub control_delta: Option<&'a [f32]>,
}

/// The global state the server updates in place.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalState {
    pub params: Vec<f32>,
    /// SCAFFOLD's server control variate `c` (same length as `params`).
    pub control: Option<Vec<f32>>,
}

/// What [`aggregate`] did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AggregationReport {
    pub strategy: String,
    /// The weight each update's delta received in the parameter step (in update order).
    pub weights: Vec<f64>,
    pub total_examples: u64,
}

/// Σ n, checked: [`AggregationError::ExampleCountOverflow`] instead of wrapping.
pub fn total_examples(num_examples: impl IntoIterator<Item = u64>) -> Result<u64, AggregationError> {
    num_examples
        .into_iter()
        .try_fold(0u64, |acc, n| acc.checked_add(n))
        .ok_or(AggregationError::ExampleCountOverflow)
}

/// Normalised FedAvg weights `n_i / Σ n`.
pub fn fedavg_weights(num_examples: &[u64]) -> Result<Vec<f64>, AggregationError> {
    let total = total_examples(num_examples.iter().copied())?;
    if total == 0 {
        return Err(AggregationError::ZeroExamples);
    }
    Ok(num_examples.iter().map(|&n| n as f64 / total as f64).collect())
}

fn normalise(weights: &[f64]) -> Result<Vec<f64>, AggregationError> {
    for (index, &value) in weights.iter().enumerate() {
        if !(value.is_finite() && value >= 0.0) {
            return Err(AggregationError::BadWeight { index, value });
        }
    }
    let sum: f64 = weights.iter().sum();
    if sum <= 0.0 {
        return Err(AggregationError::BadWeight { index: 0, value: sum });
    }
    Ok(weights.iter().map(|w| w / sum).collect())
}

/// Applies one round of `strategy` to `state` in place.
///
/// - `total_hospitals` is N, the number of hospitals in the study (SCAFFOLD's `|S|/N`).
/// - `weights` overrides FedAvg's example-count weights (FairFed; it is normalised here). It is
///   required for FairFed and must have one entry per update.
pub fn aggregate(
    strategy: &Strategy,
    state: &mut GlobalState,
    updates: &[ClientUpdate<'_>],
    total_hospitals: usize,
    weights: Option<&[f64]>,
) -> Result<AggregationReport, AggregationError> {
    strategy.validate()?;
    if updates.is_empty() {
        return Err(AggregationError::NoUpdates);
    }
    let d = state.params.len();
    for u in updates {
        if u.num_examples > MAX_NUM_EXAMPLES {
            return Err(AggregationError::TooManyExamples {
                hospital: u.hospital.to_string(),
                num_examples: u.num_examples,
            });
        }
        if u.delta.len() != d {
            return Err(AggregationError::ShapeMismatch {
                hospital: u.hospital.to_string(),
                expected: d,
                got: u.delta.len(),
            });
        }
    }
    let total_examples = total_examples(updates.iter().map(|u| u.num_examples))?;
    let deltas: Vec<&[f32]> = updates.iter().map(|u| u.delta).collect();
    let step_weights: Vec<f64> = match strategy {
        Strategy::FedAvg | Strategy::FedProx { .. } => match weights {
            Some(w) => {
                check_count(w, updates.len())?;
                normalise(w)?
            }
            None => fedavg_weights(&updates.iter().map(|u| u.num_examples).collect::<Vec<_>>())?,
        },
        Strategy::FairFed { .. } => {
            let w = weights.ok_or(AggregationError::MissingWeights)?;
            check_count(w, updates.len())?;
            normalise(w)?
        }
        Strategy::Scaffold { server_lr } => {
            let s = updates.len();
            let n = total_hospitals.max(s);
            let control = state
                .control
                .as_mut()
                .ok_or(AggregationError::MissingServerControl)?;
            if control.len() != d {
                return Err(AggregationError::ShapeMismatch {
                    hospital: "<server control variate>".into(),
                    expected: d,
                    got: control.len(),
                });
            }
            let mut cdeltas = Vec::with_capacity(s);
            for u in updates {
                let c = u.control_delta.ok_or_else(|| AggregationError::MissingControl {
                    hospital: u.hospital.to_string(),
                })?;
                if c.len() != d {
                    return Err(AggregationError::ShapeMismatch {
                        hospital: u.hospital.to_string(),
                        expected: d,
                        got: c.len(),
                    });
                }
                cdeltas.push(c);
            }
            // c ← c + (|S|/N) · (1/|S|) Σ Δc_i = c + (1/N) Σ Δc_i
            let cw = vec![(1.0 / n as f64) as f32; s];
            kernels::add_weighted_sum(control, &cdeltas, &cw);
            vec![*server_lr as f64 / s as f64; s]
        }
    };
    let w32: Vec<f32> = step_weights.iter().map(|&w| w as f32).collect();
    kernels::add_weighted_sum(&mut state.params, &deltas, &w32);
    Ok(AggregationReport {
        strategy: strategy.name().to_string(),
        weights: step_weights,
        total_examples,
    })
}

fn check_count(w: &[f64], expected: usize) -> Result<(), AggregationError> {
    if w.len() != expected {
        return Err(AggregationError::WeightCount {
            expected,
            got: w.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd<'a>(h: &'a str, n: u64, d: &'a [f32], c: Option<&'a [f32]>) -> ClientUpdate<'a> {
        ClientUpdate {
            hospital: h,
            num_examples: n,
            delta: d,
            control_delta: c,
        }
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn fedavg_is_weighted_by_examples() {
        // x = [1, 2]; hospital A (n=1) moved by [3, 0], B (n=3) by [-1, 4].
        // x' = x + 1/4·[3,0] + 3/4·[-1,4] = [1 + 0.75 - 0.75, 2 + 0 + 3] = [1, 5]
        let mut s = GlobalState {
            params: vec![1.0, 2.0],
            control: None,
        };
        let r = aggregate(
            &Strategy::FedAvg,
            &mut s,
            &[upd("a", 1, &[3.0, 0.0], None), upd("b", 3, &[-1.0, 4.0], None)],
            2,
            None,
        )
        .unwrap();
        close(&s.params, &[1.0, 5.0]);
        assert_eq!(r.weights, vec![0.25, 0.75]);
        assert_eq!(r.total_examples, 4);
    }

    #[test]
    fn fedavg_equals_weighted_mean_of_local_models() {
        // Local models y_a = [2, 2], y_b = [4, 0] from x = [0, 0] with n = 2 and 6:
        // mean = (2·[2,2] + 6·[4,0]) / 8 = [3.5, 0.5].
        let mut s = GlobalState {
            params: vec![0.0, 0.0],
            control: None,
        };
        aggregate(
            &Strategy::FedAvg,
            &mut s,
            &[upd("a", 2, &[2.0, 2.0], None), upd("b", 6, &[4.0, 0.0], None)],
            2,
            None,
        )
        .unwrap();
        close(&s.params, &[3.5, 0.5]);
    }

    #[test]
    fn fedprox_server_step_is_fedavg() {
        let ups = [upd("a", 5, &[1.0, -1.0], None), upd("b", 15, &[0.0, 2.0], None)];
        let mut a = GlobalState {
            params: vec![0.5, 0.5],
            control: None,
        };
        let mut b = a.clone();
        aggregate(&Strategy::FedAvg, &mut a, &ups, 2, None).unwrap();
        aggregate(&Strategy::FedProx { mu: 0.1 }, &mut b, &ups, 2, None).unwrap();
        assert_eq!(a, b);
        // 0.5 + 0.25·1 + 0.75·0 = 0.75 ; 0.5 − 0.25 + 1.5 = 1.75
        close(&a.params, &[0.75, 1.75]);
    }

    #[test]
    fn scaffold_updates_model_and_control() {
        // N = 4 hospitals in the study, |S| = 2 participate, η_g = 0.5.
        // Δy: [2, 0], [0, 4] → mean [1, 2] → x = [10, 10] + 0.5·[1, 2] = [10.5, 11]
        // Δc: [4, 8], [0, -4] → mean [2, 2] → c = [1, 1] + (2/4)·[2, 2] = [2, 2]
        // (example counts are ignored by SCAFFOLD's unweighted mean)
        let mut s = GlobalState {
            params: vec![10.0, 10.0],
            control: Some(vec![1.0, 1.0]),
        };
        let r = aggregate(
            &Strategy::Scaffold { server_lr: 0.5 },
            &mut s,
            &[
                upd("a", 1, &[2.0, 0.0], Some(&[4.0, 8.0])),
                upd("b", 100, &[0.0, 4.0], Some(&[0.0, -4.0])),
            ],
            4,
            None,
        )
        .unwrap();
        close(&s.params, &[10.5, 11.0]);
        close(s.control.as_ref().unwrap(), &[2.0, 2.0]);
        assert_eq!(r.weights, vec![0.25, 0.25]);
    }

    #[test]
    fn scaffold_requires_control_deltas() {
        let mut s = GlobalState {
            params: vec![0.0],
            control: Some(vec![0.0]),
        };
        let err = aggregate(
            &Strategy::Scaffold { server_lr: 1.0 },
            &mut s,
            &[upd("a", 1, &[1.0], None)],
            1,
            None,
        )
        .unwrap_err();
        assert_eq!(err, AggregationError::MissingControl { hospital: "a".into() });
        let mut s = GlobalState {
            params: vec![0.0],
            control: None,
        };
        let err = aggregate(
            &Strategy::Scaffold { server_lr: 1.0 },
            &mut s,
            &[upd("a", 1, &[1.0], Some(&[1.0]))],
            1,
            None,
        )
        .unwrap_err();
        assert_eq!(err, AggregationError::MissingServerControl);
    }

    #[test]
    fn fairfed_applies_given_weights() {
        // Weights 1 and 3 (unnormalised) → 0.25, 0.75 regardless of example counts.
        let mut s = GlobalState {
            params: vec![0.0],
            control: None,
        };
        let ups = [upd("a", 1000, &[4.0], None), upd("b", 1, &[8.0], None)];
        let r = aggregate(
            &Strategy::FairFed { beta: 1.0 },
            &mut s,
            &ups,
            2,
            Some(&[1.0, 3.0]),
        )
        .unwrap();
        close(&s.params, &[7.0]);
        assert_eq!(r.weights, vec![0.25, 0.75]);
        let err = aggregate(&Strategy::FairFed { beta: 1.0 }, &mut s, &ups, 2, None).unwrap_err();
        assert_eq!(err, AggregationError::MissingWeights);
        let err = aggregate(
            &Strategy::FairFed { beta: 1.0 },
            &mut s,
            &ups,
            2,
            Some(&[1.0, f64::NAN]),
        )
        .unwrap_err();
        assert!(matches!(err, AggregationError::BadWeight { index: 1, .. }));
    }

    #[test]
    fn errors_name_the_problem() {
        let mut s = GlobalState {
            params: vec![0.0, 0.0],
            control: None,
        };
        let err = aggregate(&Strategy::FedAvg, &mut s, &[upd("h3", 1, &[1.0], None)], 1, None).unwrap_err();
        assert!(err.to_string().contains("h3"), "{err}");
        assert_eq!(
            aggregate(&Strategy::FedAvg, &mut s, &[], 1, None).unwrap_err(),
            AggregationError::NoUpdates
        );
        assert_eq!(
            aggregate(
                &Strategy::FedAvg,
                &mut s,
                &[upd("a", 0, &[1.0, 1.0], None)],
                1,
                None
            )
            .unwrap_err(),
            AggregationError::ZeroExamples
        );
        let err = aggregate(
            &Strategy::FedAvg,
            &mut s,
            &[upd("big", u64::MAX, &[1.0, 1.0], None)],
            1,
            None,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            AggregationError::TooManyExamples {
                num_examples: u64::MAX,
                ..
            }
        ));
        assert!(err.to_string().contains("num_examples"), "{err}");
        assert!(Strategy::FedProx { mu: -1.0 }.validate().is_err());
        assert!(Strategy::Scaffold { server_lr: 0.0 }.validate().is_err());
    }

    #[test]
    fn example_counts_that_would_overflow_the_sum_are_refused() {
        // Each count alone is a valid u64; their sum is not.
        assert_eq!(
            fedavg_weights(&[u64::MAX / 2 + 1, u64::MAX / 2 + 1]),
            Err(AggregationError::ExampleCountOverflow)
        );
        assert_eq!(
            total_examples([u64::MAX, 1]),
            Err(AggregationError::ExampleCountOverflow)
        );
        assert_eq!(total_examples([MAX_NUM_EXAMPLES, MAX_NUM_EXAMPLES]), Ok(1 << 33));
        // At the documented maximum per update, aggregation works.
        let mut s = GlobalState {
            params: vec![0.0],
            control: None,
        };
        let r = aggregate(
            &Strategy::FedAvg,
            &mut s,
            &[
                upd("a", MAX_NUM_EXAMPLES, &[2.0], None),
                upd("b", MAX_NUM_EXAMPLES, &[4.0], None),
            ],
            2,
            None,
        )
        .unwrap();
        assert_eq!(r.total_examples, 1 << 33);
        close(&s.params, &[3.0]);
    }

    #[test]
    fn strategy_serialises_by_name() {
        let s = serde_json::to_string(&Strategy::FedProx { mu: 0.01 }).unwrap();
        assert_eq!(s, r#"{"name":"fedprox","mu":0.01}"#);
        let back: Strategy = serde_json::from_str(&s).unwrap();
        assert_eq!(back, Strategy::FedProx { mu: 0.01 });
    }
}
