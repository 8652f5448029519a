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
    let releases = evaluation_releases();
    let evaluation =
        evaluation_mechanism(p.evaluation_noise_multiplier, releases * spec.rounds.total as u64)?;
    let sigma = match (p.noise_multiplier, p.target_epsilon) {
        (Some(s), _) => s,
        // The evaluation releases are fixed; σ of DP-SGD is the smallest for which both together
        // stay within the target.
        (None, Some(target)) => {
            caduceus_privacy::inverse::noise_multiplier_for_budget(
                acc,
                target,
                p.delta,
                &[evaluation],
                &[caduceus_privacy::inverse::PlannedPhase {
                    sample_rate: p.sample_rate,
                    steps: total_steps,
                }],
            )
            .map_err(|e| format!("privacy.targetEpsilon {target} (evaluation counts included): {e}"))?
            .noise_multiplier
        }
        (None, None) => return Err("privacy: set noiseMultiplier or targetEpsilon".into()),
    };
    let whole =
        SubsampledGaussian::new(sigma, p.sample_rate, total_steps).map_err(|e| format!("privacy: {e}"))?;
    let planned_epsilon = PrivacyLedger::new()
        .projected_epsilon(&[whole, evaluation], p.delta, acc)
        .map_err(|e| format!("privacy: {e}"))?;
    Ok(Some(PrivacyPlan {
        noise_multiplier: sigma,
        sample_rate: p.sample_rate,
        steps_per_round: steps,
        clip_norm: p.clip_norm,
        delta: p.delta,
        planned_epsilon,
        evaluation_noise_multiplier: Some(p.evaluation_noise_multiplier),
        evaluation_releases: releases,
    }))
}

/// Evaluation releases (noised evaluation counts sent to the aggregator) of one trainer Job, which
/// runs one training round with the aggregator's final evaluation after it.
pub fn evaluation_releases() -> u64 {
    caduceus_privacy::evaluation::evaluation_releases(1, true)
}

fn evaluation_mechanism(noise_multiplier: f64, releases: u64) -> Result<SubsampledGaussian, String> {
    caduceus_privacy::evaluation::evaluation_mechanism(noise_multiplier, releases)
        .map_err(|e| format!("privacy.evaluationNoiseMultiplier: {e}"))
}

/// What one round charges one hospital: its DP-SGD steps and its noised evaluation counts.
pub fn round_mechanisms(plan: &PrivacyPlan) -> Vec<SubsampledGaussian> {
    let mut v = vec![SubsampledGaussian {
        noise_multiplier: plan.noise_multiplier,
        sample_rate: plan.sample_rate,
        steps: plan.steps_per_round,
    }];
    if let Some(z) = plan.evaluation_noise_multiplier
        && let Ok(m) = evaluation_mechanism(z, plan.evaluation_releases)
    {
        v.push(m);
    }
    v
}

/// A hospital's consent to a study, as its `consentedStudies` states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consent {
    /// The study is not listed.
    None,
    /// Listed by name only, without the hash that binds the consent to the study's terms.
    Unbound,
    /// Listed with this hash.
    Hash(String),
}

/// A hospital as the selection sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// `namespace/name`.
    pub reference: String,
    pub ready: bool,
    pub consent: Consent,
    pub selected: bool,
    /// The study's trainer image, and whether it is in the hospital's allow-list.
    pub trainer_image: String,
    pub image_allowed: bool,
    /// `allowNonPrivateStudies`.
    pub allows_non_private: bool,
    /// Whether the operator serves the hospital's namespace.
    pub served: bool,
    /// Whether the HospitalClient is being deleted.
    pub deleting: bool,
    pub budget_epsilon: f64,
    pub budget_delta: f64,
    /// The durable ledger (`None`: unreadable, which keeps the hospital out).
    pub ledger: Option<PrivacyLedger>,
}

/// Why a hospital is left out of a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Exclusion {
    NotSelected,
    NamespaceNotServed,
    NoConsent,
    /// Consent names another hash than the study's current one, or none.
    ConsentOutdated {
        given: Option<String>,
    },
    TrainerImageNotAllowed {
        image: String,
    },
    NonPrivateNotAllowed,
    NotReady,
    /// The round would take the hospital over its budget; the message has the figures.
    BudgetExhausted {
        message: String,
    },
}

impl Exclusion {
    /// The reason, as a condition or admission reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Exclusion::NotSelected => "NotSelected",
            Exclusion::NamespaceNotServed => "NamespaceNotServed",
            Exclusion::NoConsent => "NoConsent",
            Exclusion::ConsentOutdated { .. } => "ConsentOutdated",
            Exclusion::TrainerImageNotAllowed { .. } => "TrainerImageNotAllowed",
            Exclusion::NonPrivateNotAllowed => "NonPrivateNotAllowed",
            Exclusion::NotReady => "NotReady",
            Exclusion::BudgetExhausted { .. } => "BudgetExhausted",
        }
    }

    /// What is wrong and what to do, for study `study` with consent hash `hash`.
    pub fn message(&self, study: &str, hash: &str) -> String {
        match self {
            Exclusion::NotSelected => format!("{study}'s hospitalSelector does not match this hospital"),
            Exclusion::NamespaceNotServed => {
                "the operator does not serve this hospital's namespace (its --watch-namespaces)".into()
            }
            Exclusion::NoConsent => {
                format!("{study} is not in consentedStudies; to join, add {study}@{hash}")
            }
            Exclusion::ConsentOutdated { given: None } => format!(
                "consentedStudies names {study} without a consent hash; to consent to its current terms, list {study}@{hash}"
            ),
            Exclusion::ConsentOutdated { given: Some(g) } => format!(
                "consent was given to {study}@{g}, but the study's terms changed (now {hash}); review them and list {study}@{hash}"
            ),
            Exclusion::TrainerImageNotAllowed { image } => {
                format!("{study} runs trainer image {image}, which is not in allowedTrainerImages")
            }
            Exclusion::NonPrivateNotAllowed => format!(
                "{study} has privacy.enabled false and allowNonPrivateStudies is not set: its updates would carry no differential privacy"
            ),
            Exclusion::NotReady => "the hospital is not Ready".into(),
            Exclusion::BudgetExhausted { message } => message.clone(),
        }
    }
}

/// Decides for one hospital. `plan` is the study's per-round mechanism (None without DP),
/// `acc` the study's accountant and `hash` its current consent hash.
pub fn admit(
    c: &Candidate,
    plan: Option<&PrivacyPlan>,
    acc: AccountantKind,
    hash: &str,
) -> Result<(), Exclusion> {
    if !c.selected {
        return Err(Exclusion::NotSelected);
    }
    if !c.served {
        return Err(Exclusion::NamespaceNotServed);
    }
    match &c.consent {
        Consent::None => return Err(Exclusion::NoConsent),
        Consent::Unbound => return Err(Exclusion::ConsentOutdated { given: None }),
        Consent::Hash(h) if h != hash => {
            return Err(Exclusion::ConsentOutdated {
                given: Some(h.clone()),
            });
        }
        Consent::Hash(_) => {}
    }
    if !c.image_allowed {
        return Err(Exclusion::TrainerImageNotAllowed {
            image: c.trainer_image.clone(),
        });
    }
    match plan {
        None if !c.allows_non_private => return Err(Exclusion::NonPrivateNotAllowed),
        None => {}
        Some(plan) => {
            let Some(ledger) = &c.ledger else {
                return Err(Exclusion::BudgetExhausted {
                    message: "the hospital's privacy ledger cannot be read (see the operator's log)".into(),
                });
            };
            let budget = PrivacyBudget::new(c.budget_epsilon, c.budget_delta, acc).map_err(|e| {
                Exclusion::BudgetExhausted {
                    message: format!("invalid privacy budget: {e}"),
                }
            })?;
            match ledger.check(&round_mechanisms(plan), &budget) {
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
                            "the next round (sigma {:.4}, q {}, {} steps, {} noised evaluations) would raise epsilon from {spent_epsilon:.4} to {projected_epsilon:.4}, above the budget of {budget_epsilon} at delta {delta:e}",
                            plan.noise_multiplier,
                            plan.sample_rate,
                            plan.steps_per_round,
                            plan.evaluation_releases
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
    }
    if c.deleting || !c.ready {
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

    const HASH: &str = "h1";

    fn candidate(budget: f64) -> Candidate {
        Candidate {
            reference: "h/a".into(),
            ready: true,
            consent: Consent::Hash(HASH.into()),
            selected: true,
            trainer_image: "t:1".into(),
            image_allowed: true,
            allows_non_private: false,
            served: true,
            deleting: false,
            budget_epsilon: budget,
            budget_delta: 1e-5,
            ledger: Some(PrivacyLedger::new()),
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
            .projected_epsilon(&round_mechanisms(&p), 1e-5, AccountantKind::Pld)
            .unwrap();
        let acc = AccountantKind::Pld;
        assert!(admit(&candidate(one_round * 1.01), Some(&p), acc, HASH).is_ok());
        match admit(&candidate(one_round * 0.5), Some(&p), acc, HASH) {
            Err(Exclusion::BudgetExhausted { message }) => {
                assert!(message.contains("above the budget"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let mut c = candidate(100.0);
        c.consent = Consent::None;
        assert_eq!(admit(&c, Some(&p), acc, HASH), Err(Exclusion::NoConsent));
        c.consent = Consent::Hash(HASH.into());
        c.ready = false;
        assert_eq!(admit(&c, Some(&p), acc, HASH), Err(Exclusion::NotReady));
        c.ready = true;
        c.ledger = None;
        assert!(
            matches!(admit(&c, Some(&p), acc, HASH), Err(Exclusion::BudgetExhausted { message }) if message.contains("cannot be read"))
        );
    }

    #[test]
    fn the_evaluation_counts_are_charged_with_the_training() {
        let p = privacy_plan(&spec()).unwrap().unwrap();
        let m = round_mechanisms(&p);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[1].sample_rate, 1.0);
        assert_eq!(m[1].steps, evaluation_releases());
        let training_only = PrivacyLedger::new()
            .projected_epsilon(&m[..1], 1e-5, AccountantKind::Pld)
            .unwrap();
        let both = PrivacyLedger::new()
            .projected_epsilon(&m, 1e-5, AccountantKind::Pld)
            .unwrap();
        assert!(both > training_only, "{both} vs {training_only}");
    }

    #[test]
    fn consent_binds_to_the_current_hash() {
        let p = privacy_plan(&spec()).unwrap().unwrap();
        let acc = AccountantKind::Pld;
        let mut c = candidate(100.0);
        assert!(admit(&c, Some(&p), acc, HASH).is_ok());
        assert_eq!(
            admit(&c, Some(&p), acc, "h2"),
            Err(Exclusion::ConsentOutdated {
                given: Some(HASH.into())
            }),
            "a study that changed after consent needs fresh consent"
        );
        c.consent = Consent::Unbound;
        let e = admit(&c, Some(&p), acc, HASH).unwrap_err();
        assert_eq!(e, Exclusion::ConsentOutdated { given: None });
        assert!(
            e.message("s/x", HASH).contains("s/x@h1"),
            "{}",
            e.message("s/x", HASH)
        );
    }

    #[test]
    fn the_hospital_decides_the_trainer_image_and_non_private_studies() {
        let p = privacy_plan(&spec()).unwrap().unwrap();
        let acc = AccountantKind::Pld;
        let mut c = candidate(100.0);
        c.image_allowed = false;
        assert!(matches!(
            admit(&c, Some(&p), acc, HASH),
            Err(Exclusion::TrainerImageNotAllowed { .. })
        ));
        let c = candidate(0.0001);
        assert_eq!(
            admit(&c, None, acc, HASH),
            Err(Exclusion::NonPrivateNotAllowed),
            "a non-private study must not escape a tiny budget"
        );
        let mut c = candidate(0.0001);
        c.allows_non_private = true;
        assert!(admit(&c, None, acc, HASH).is_ok());
        let mut c = candidate(100.0);
        c.served = false;
        assert_eq!(admit(&c, Some(&p), acc, HASH), Err(Exclusion::NamespaceNotServed));
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
