//! Pure decisions of the study pipeline: validation the CRD's CEL rules cannot express, the DP-SGD
//! plan, which hospitals take part in a round, and fairness verdicts. No API calls here, so all of it
//! is tested without a cluster.

use caduceus_crds::study::{
    Accountant, FairnessSpec, FederatedStudySpec, PrivacyPlan, SecureAggregationMode, Strategy, TaskLabel,
};
use caduceus_fairness::{FairnessThresholds, RoundOutcome, Verdict};
use caduceus_privacy::ledger::{LedgerError, PrivacyBudget, PrivacyLedger};
use caduceus_privacy::{AccountantKind, SubsampledGaussian};

/// Checks what the CRD schema cannot; the message names the field.
pub fn validate(spec: &FederatedStudySpec) -> Result<(), String> {
    match spec.aggregation.strategy {
        Strategy::TrimmedMean | Strategy::Median => {
            return Err(format!(
                "aggregation.strategy {:?} is accepted by the API but not implemented by the aggregator yet; use FedAvg, FedProx, SCAFFOLD or FairFed",
                spec.aggregation.strategy
            ));
        }
        Strategy::Scaffold if spec.secure_aggregation.mode == SecureAggregationMode::Tfhe => {
            return Err("secureAggregation.mode Tfhe cannot be combined with SCAFFOLD".into());
        }
        _ => {}
    }
    if let Some(max) = spec.rounds.max_hospitals
        && max < spec.rounds.min_hospitals
    {
        return Err("rounds.maxHospitals is below rounds.minHospitals".into());
    }
    if spec.privacy.enabled
        && spec.privacy.noise_multiplier.is_none() == spec.privacy.target_epsilon.is_none()
    {
        return Err("privacy: set exactly one of noiseMultiplier and targetEpsilon".into());
    }
    Ok(())
}

pub fn accountant(a: Accountant) -> AccountantKind {
    match a {
        Accountant::Pld => AccountantKind::Pld,
        Accountant::Rdp => AccountantKind::Rdp,
    }
}

/// The trainer's `--task` value and the number of classes of the task.
pub fn task(label: TaskLabel) -> (&'static str, usize) {
    match label {
        TaskLabel::Gender => ("gender", 2),
        TaskLabel::Race => ("race", 5),
        TaskLabel::AgeGroup => ("age-group", 5),
    }
}

/// DP-SGD steps per round: `training.steps`, or `epochs / q` (Opacus' convention) when epochs are given.
pub fn dp_steps_per_round(spec: &FederatedStudySpec) -> u64 {
    let q = spec.privacy.sample_rate;
    match (spec.training.steps, spec.training.epochs) {
        (Some(s), _) => s as u64,
        (None, Some(e)) => (e as f64 / q).ceil() as u64,
        (None, None) => (1.0 / q).ceil() as u64,
    }
}

/// The study's DP-SGD mechanism per hospital and round, or `None` without DP. With
/// `targetEpsilon`, σ is the smallest noise for which a hospital that joins every round stays within
/// the target over `rounds.total` rounds.
pub fn privacy_plan(spec: &FederatedStudySpec) -> Result<Option<PrivacyPlan>, String> {
    let p = &spec.privacy;
    if !p.enabled {
        return Ok(None);
    }
    let steps = dp_steps_per_round(spec);
    let total_steps = steps * spec.rounds.total as u64;
    let acc = accountant(p.accountant);
    let sigma = match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => s,
        (None, Some(target)) => {
            caduceus_privacy::noise_multiplier_for_epsilon(acc, target, p.delta, p.sample_rate, total_steps)
                .map_err(|e| format!("privacy.targetEpsilon {target}: {e}"))?
                .noise_multiplier
        }
        (None, None) => return Err("privacy: set noiseMultiplier or targetEpsilon".into()),
    };
    let whole =
        SubsampledGaussian::new(sigma, p.sample_rate, total_steps).map_err(|e| format!("privacy: {e}"))?;
    let planned_epsilon = PrivacyLedger::new()
        .projected_epsilon(&[whole], p.delta, acc)
        .map_err(|e| format!("privacy: {e}"))?;
    Ok(Some(PrivacyPlan {
        noise_multiplier: sigma,
        sample_rate: p.sample_rate,
        steps_per_round: steps,
        clip_norm: p.clip_norm,
        delta: p.delta,
        planned_epsilon,
    }))
}

/// One round's mechanism for one hospital.
pub fn round_mechanism(plan: &PrivacyPlan) -> SubsampledGaussian {
    SubsampledGaussian {
        noise_multiplier: plan.noise_multiplier,
        sample_rate: plan.sample_rate,
        steps: plan.steps_per_round,
    }
}

/// A hospital as the selection sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// `namespace/name`.
    pub reference: String,
    pub ready: bool,
    pub consents: bool,
    pub selected: bool,
    pub budget_epsilon: f64,
    pub budget_delta: f64,
    pub ledger: PrivacyLedger,
}

/// Why a hospital is left out of a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    NotSelected,
    NoConsent,
    NotReady,
    /// The round would take the hospital over its budget; the message has the figures.
    BudgetExhausted {
        message: String,
    },
}

/// Decides for one hospital. `plan` is the study's per-round mechanism (None without DP) and
/// `accountant` the study's accountant.
pub fn admit(c: &Candidate, plan: Option<&PrivacyPlan>, acc: AccountantKind) -> Result<(), Exclusion> {
    if !c.selected {
        return Err(Exclusion::NotSelected);
    }
    if !c.consents {
        return Err(Exclusion::NoConsent);
    }
    if let Some(plan) = plan {
        let budget = PrivacyBudget::new(c.budget_epsilon, c.budget_delta, acc).map_err(|e| {
            Exclusion::BudgetExhausted {
                message: format!("invalid privacy budget: {e}"),
            }
        })?;
        match c.ledger.check(&[round_mechanism(plan)], &budget) {
            Ok(_) => {}
            Err(LedgerError::BudgetExceeded {
                spent_epsilon,
                projected_epsilon,
                budget_epsilon,
                delta,
                ..
            }) => {
                return Err(Exclusion::BudgetExhausted {
                    message: format!(
                        "the next round (sigma {:.4}, q {}, {} steps) would raise epsilon from {spent_epsilon:.4} to {projected_epsilon:.4}, above the budget of {budget_epsilon} at delta {delta:e}",
                        plan.noise_multiplier, plan.sample_rate, plan.steps_per_round
                    ),
                });
            }
            Err(e) => {
                return Err(Exclusion::BudgetExhausted {
                    message: e.to_string(),
                });
            }
        }
    }
    if !c.ready {
        return Err(Exclusion::NotReady);
    }
    Ok(())
}

/// The participants of a round: admitted hospitals in name order, at most `max`.
pub fn participants(admitted: &[String], max: Option<u32>) -> Vec<String> {
    let mut v = admitted.to_vec();
    v.sort();
    if let Some(m) = max {
        v.truncate(m as usize);
    }
    v
}

pub fn thresholds(f: &FairnessSpec) -> FairnessThresholds {
    FairnessThresholds {
        max_demographic_parity_difference: Some(f.max_demographic_parity_difference),
        max_equalized_odds_difference: Some(f.max_equalized_odds_difference),
    }
}

/// The round's fairness verdict from the aggregator's outcome.
pub fn round_verdict(f: &FairnessSpec, outcome: &RoundOutcome) -> Verdict {
    caduceus_fairness::verdict(&thresholds(f), &outcome.attribute_metrics())
}

/// Whether the study's fairness is degraded: the last `after` finished rounds all violated the
/// thresholds (`within` lists, oldest first, each round's `FairnessWithinThreshold` status).
pub fn degraded(within: &[Option<bool>], after: u32) -> bool {
    let after = after.max(1) as usize;
    within.len() >= after && within[within.len() - after..].iter().all(|w| *w == Some(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FederatedStudySpec {
        serde_yaml::from_str(
            r#"
model: {architecture: small-cnn}
task: {label: gender, sensitiveAttributes: [race]}
rounds: {total: 3, minHospitals: 2}
training: {steps: 5, batchSize: 32}
privacy: {noiseMultiplier: 1.1, sampleRate: 0.02}
hospitalSelector: {}
modelStore: {claimName: store}
"#,
        )
        .unwrap()
    }

    fn candidate(budget: f64) -> Candidate {
        Candidate {
            reference: "h/a".into(),
            ready: true,
            consents: true,
            selected: true,
            budget_epsilon: budget,
            budget_delta: 1e-5,
            ledger: PrivacyLedger::new(),
        }
    }

    #[test]
    fn plan_uses_the_fixed_sigma_and_steps() {
        let p = privacy_plan(&spec()).unwrap().unwrap();
        assert_eq!(p.noise_multiplier, 1.1);
        assert_eq!(p.steps_per_round, 5);
        assert!(p.planned_epsilon > 0.0);
    }

    #[test]
    fn target_epsilon_gives_a_sigma_that_meets_it() {
        let mut s = spec();
        s.privacy.noise_multiplier = None;
        s.privacy.target_epsilon = Some(3.0);
        let p = privacy_plan(&s).unwrap().unwrap();
        assert!(p.planned_epsilon <= 3.0 + 1e-9, "{p:?}");
        assert!(
            p.planned_epsilon > 2.0,
            "the search should not waste budget: {p:?}"
        );
    }

    #[test]
    fn budget_admission_refuses_a_round_that_would_overspend() {
        let p = privacy_plan(&spec()).unwrap().unwrap();
        let one_round = PrivacyLedger::new()
            .projected_epsilon(&[round_mechanism(&p)], 1e-5, AccountantKind::Pld)
            .unwrap();
        assert!(admit(&candidate(one_round * 1.01), Some(&p), AccountantKind::Pld).is_ok());
        match admit(&candidate(one_round * 0.5), Some(&p), AccountantKind::Pld) {
            Err(Exclusion::BudgetExhausted { message }) => {
                assert!(message.contains("above the budget"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let mut c = candidate(100.0);
        c.consents = false;
        assert_eq!(
            admit(&c, Some(&p), AccountantKind::Pld),
            Err(Exclusion::NoConsent)
        );
        c.consents = true;
        c.ready = false;
        assert_eq!(admit(&c, Some(&p), AccountantKind::Pld), Err(Exclusion::NotReady));
    }

    #[test]
    fn unimplemented_strategies_are_invalid() {
        let mut s = spec();
        s.aggregation.strategy = Strategy::Median;
        assert!(validate(&s).unwrap_err().contains("not implemented"));
        assert!(validate(&spec()).is_ok());
    }

    #[test]
    fn degraded_needs_consecutive_violations() {
        assert!(!degraded(&[Some(false)], 2));
        assert!(degraded(&[Some(true), Some(false), Some(false)], 2));
        assert!(!degraded(&[Some(false), Some(true), Some(false)], 2));
        assert!(!degraded(&[Some(false), None], 2));
    }

    #[test]
    fn participants_are_capped_in_a_stable_order() {
        let v = participants(&["c/x".into(), "a/y".into(), "b/z".into()], Some(2));
        assert_eq!(v, vec!["a/y", "b/z"]);
    }
}
