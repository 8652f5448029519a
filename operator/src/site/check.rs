//! The checks a site makes on every assignment before anything exists for it (pure; docs/sites.md,
//! "The site checks every assignment itself"). The site trusts nothing in an assignment it can
//! recompute: the study and round are parsed from their JSON copies, the id and the consent hash are
//! recomputed, the round's privacy plan must be the study's, and consent, trainer image and
//! non-private studies are decided by the site's own `HospitalClient` with [`crate::plan::admit`],
//! the same decision the one-cluster operator makes. The site's own ledger then decides the budget
//! ([`crate::ledger::reserve`]); a pre-check here refuses a round that cannot fit before any object
//! is made.

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::study::PrivacyPlan;
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use caduceus_privacy::ledger::{RoundKey, RoundStatus};
use caduceus_proto::v1::Assignment;
use kube::ResourceExt;

use crate::build::Settings;
use crate::ledger::{self, DurableLedger};
use crate::names;
use crate::plan::{self, Candidate, Consent, Exclusion};

/// Why a site refuses an assignment. The coordinator sees `Reason: message`.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The assignment names another hospital than this site.
    WrongHospital(String),
    /// The study or round does not parse, does not match the id, or is inconsistent.
    Malformed(String),
    /// Past `expires_at`.
    Expired(String),
    /// Older than the newest (round, attempt) seen for the study.
    Stale(String),
    /// The round already ran here (its ledger key is started or committed).
    Replayed(String),
    /// The site's HospitalClient does not consent to the study as it is now.
    ConsentMissing(String),
    TrainerImageNotAllowed(String),
    NonPrivateNotAllowed(String),
    /// The site's ledger cannot pay the round.
    BudgetExceeded(String),
    /// The site's HospitalClient is missing, being deleted, or not Ready (its data claim).
    NotReady(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::WrongHospital(_) => "WrongHospital",
            Refusal::Malformed(_) => "Malformed",
            Refusal::Expired(_) => "Expired",
            Refusal::Stale(_) => "Stale",
            Refusal::Replayed(_) => "Replayed",
            Refusal::ConsentMissing(_) => "ConsentMissing",
            Refusal::TrainerImageNotAllowed(_) => "TrainerImageNotAllowed",
            Refusal::NonPrivateNotAllowed(_) => "NonPrivateNotAllowed",
            Refusal::BudgetExceeded(_) => "BudgetExceeded",
            Refusal::NotReady(_) => "NotReady",
        }
    }

    fn detail(&self) -> &str {
        match self {
            Refusal::WrongHospital(m)
            | Refusal::Malformed(m)
            | Refusal::Expired(m)
            | Refusal::Stale(m)
            | Refusal::Replayed(m)
            | Refusal::ConsentMissing(m)
            | Refusal::TrainerImageNotAllowed(m)
            | Refusal::NonPrivateNotAllowed(m)
            | Refusal::BudgetExceeded(m)
            | Refusal::NotReady(m) => m,
        }
    }

    /// `Reason: message`, as `AssignmentState.message` carries it.
    pub fn message(&self) -> String {
        format!("{}: {}", self.reason(), self.detail())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())
    }
}

/// An assignment that parsed and is consistent.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub study: FederatedStudy,
    pub round: TrainingRound,
    pub study_uid: String,
    /// `namespace/name` of the study.
    pub study_ref: String,
    /// `names::study_id` of the study (certificates, the TFHE key).
    pub study_id: String,
    /// The round's key in the site's ledger (the coordinator's key too).
    pub key: RoundKey,
    /// The consent hash the site computes from the study.
    pub consent_hash: String,
    /// The round's privacy plan (`None` without DP).
    pub plan: Option<PrivacyPlan>,
    /// The id the coordinator's certificate for this site's trainer carries.
    pub hospital_id: String,
}

impl Parsed {
    /// (round, attempt): the order in which a study's assignments come.
    pub fn order(&self) -> (u32, u32) {
        (self.round.spec.round, self.round.spec.attempt)
    }

    pub fn dp(&self) -> bool {
        self.plan.is_some()
    }
}

/// Whether the coordinator's name of a hospital in an assignment is this site's. `me` is the name
/// the coordinator returned at enrolment (`namespace/name` of the site's mirror; a bare name is
/// compared with the assignment's name part).
pub fn names_me(assigned: &str, me: &str) -> bool {
    if assigned == me {
        return true;
    }
    !me.contains('/') && assigned.split_once('/').is_some_and(|(_, n)| n == me)
}

/// The trainer's hospital id: [`names::hospital_id`] of the coordinator's `namespace/name`.
pub fn hospital_id_of(assigned: &str) -> String {
    let (ns, name) = assigned.split_once('/').unwrap_or(("", assigned));
    names::hospital_id(ns, name)
}

fn rel_eq(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn plans_match(a: &PrivacyPlan, b: &PrivacyPlan) -> bool {
    rel_eq(a.noise_multiplier, b.noise_multiplier)
        && rel_eq(a.sample_rate, b.sample_rate)
        && a.steps_per_round == b.steps_per_round
        && rel_eq(a.clip_norm, b.clip_norm)
        && rel_eq(a.delta, b.delta)
        && match (a.evaluation_noise_multiplier, b.evaluation_noise_multiplier) {
            (Some(x), Some(y)) => rel_eq(x, y),
            (None, None) => true,
            _ => false,
        }
        && a.evaluation_releases == b.evaluation_releases
}

/// Parses an assignment and checks that it is for this site and consistent in itself
/// (`WrongHospital`, `Malformed`).
pub fn parse(a: &Assignment, me: &str, settings: &Settings) -> Result<Parsed, Refusal> {
    if !names_me(&a.hospital, me) {
        return Err(Refusal::WrongHospital(format!(
            "the assignment is for {:?}; this site is {me:?}",
            a.hospital
        )));
    }
    let malformed = |m: String| Refusal::Malformed(m);
    let study: FederatedStudy = serde_json::from_str(&a.study_json)
        .map_err(|e| malformed(format!("the study JSON does not parse: {e}")))?;
    let round: TrainingRound = serde_json::from_str(&a.round_json)
        .map_err(|e| malformed(format!("the round JSON does not parse: {e}")))?;
    let sns = study.namespace().unwrap_or_default();
    let sname = study.name_any();
    let study_uid = study.metadata.uid.clone().unwrap_or_default();
    if sns.is_empty() || sname.is_empty() || study_uid.is_empty() {
        return Err(malformed("the study has no namespace, name or uid".into()));
    }
    let rns = round.namespace().unwrap_or_default();
    let rname = round.name_any();
    if rns != sns || round.spec.study != sname || round.spec.study_uid.as_deref() != Some(study_uid.as_str())
    {
        return Err(malformed(format!(
            "round {rns}/{rname} (study {:?}, uid {:?}) is not a round of study {sns}/{sname} (uid {study_uid})",
            round.spec.study, round.spec.study_uid
        )));
    }
    let want_name = names::round_name(&sname, round.spec.round, round.spec.attempt);
    if rname != want_name {
        return Err(malformed(format!(
            "round {rname} should be named {want_name} (round {}, attempt {})",
            round.spec.round, round.spec.attempt
        )));
    }
    if !round.spec.participants.iter().any(|p| p == &a.hospital) {
        return Err(malformed(format!(
            "round {rname} does not list {} among its participants",
            a.hospital
        )));
    }
    let want_id = names::assignment_id(&sns, &rname, &study_uid, &a.hospital);
    if a.id != want_id {
        return Err(malformed(format!(
            "assignment id {:?} does not match its round (expected {want_id:?})",
            a.id
        )));
    }
    plan::validate(&study.spec).map_err(|e| malformed(format!("the study is invalid: {e}")))?;
    let want_plan =
        plan::privacy_plan(&study.spec).map_err(|e| malformed(format!("the study's privacy plan: {e}")))?;
    match (&want_plan, &round.spec.privacy) {
        (None, None) => {}
        (Some(w), Some(got)) if plans_match(w, got) => {}
        (Some(_), None) => {
            return Err(malformed(
                "the study uses DP-SGD but the round names no privacy mechanism".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(malformed(
                "the round names a privacy mechanism but the study has privacy disabled".into(),
            ));
        }
        (Some(w), Some(got)) => {
            return Err(malformed(format!(
                "the round's privacy plan (sigma {}, q {}, {} steps) is not the study's (sigma {}, q {}, {} steps)",
                got.noise_multiplier,
                got.sample_rate,
                got.steps_per_round,
                w.noise_multiplier,
                w.sample_rate,
                w.steps_per_round
            )));
        }
    }
    let key = ledger::round_key(&sns, &sname, &study_uid, round.spec.attempt, round.spec.round);
    Ok(Parsed {
        consent_hash: settings.consent_hash(&study),
        study_ref: names::hospital_ref(&sns, &sname),
        study_id: names::study_id(&sns, &sname),
        hospital_id: hospital_id_of(&a.hospital),
        plan: round.spec.privacy.clone(),
        key,
        study_uid,
        study,
        round,
    })
}

/// What the site knows when it decides.
pub struct Facts<'a> {
    /// Unix seconds now.
    pub now: i64,
    /// The newest (round, attempt) seen for the study's UID.
    pub seen: Option<(u32, u32)>,
    /// The site's own HospitalClient (`None`: it does not exist).
    pub hospital: Option<&'a HospitalClient>,
    /// The site's durable ledger (`None`: none yet, nothing spent).
    pub ledger: Option<&'a DurableLedger>,
    pub settings: &'a Settings,
}

/// Checks a parsed assignment against the site's own state: `Expired`, `Stale`, `Replayed`, then
/// what its HospitalClient admits (`ConsentMissing`, `TrainerImageNotAllowed`,
/// `NonPrivateNotAllowed`, `NotReady`, and `BudgetExceeded` against the ledger as it is now).
pub fn admit(a: &Assignment, p: &Parsed, f: &Facts) -> Result<(), Refusal> {
    if a.expires_at <= 0 {
        return Err(Refusal::Malformed("the assignment has no expires_at".into()));
    }
    if f.now > a.expires_at {
        return Err(Refusal::Expired(format!(
            "the assignment expired at {} (now {}), {} s ago",
            a.expires_at,
            f.now,
            f.now - a.expires_at
        )));
    }
    if let Some(seen) = f.seen
        && p.order() < seen
    {
        return Err(Refusal::Stale(format!(
            "round {} attempt {} of {} is older than round {} attempt {}, which this site has seen",
            p.order().0,
            p.order().1,
            p.study_ref,
            seen.0,
            seen.1
        )));
    }
    if let Some(dl) = f.ledger
        && (dl.started.contains(&p.key) || dl.ledger.status(&p.key) == RoundStatus::Committed)
    {
        return Err(Refusal::Replayed(format!(
            "{} already ran at this site (its ledger records the start): a second trainer would release a second update",
            p.key
        )));
    }
    let Some(h) = f.hospital else {
        return Err(Refusal::NotReady(
            "this site's HospitalClient does not exist".into(),
        ));
    };
    let (trainer_image, _) = f.settings.images(&p.study);
    let st = h.status.clone().unwrap_or_default();
    let candidate = Candidate {
        reference: names::hospital_ref(&h.namespace().unwrap_or_default(), &h.name_any()),
        ready: st.conditions.is_true(types::READY),
        consent: match h.spec.consent_for(&p.study_ref) {
            None => Consent::None,
            Some(None) => Consent::Unbound,
            Some(Some(given)) => Consent::Hash(given.to_string()),
        },
        // The coordinator selected the site from the labels the site sent; the site decides consent.
        selected: true,
        trainer_image: trainer_image.to_string(),
        image_allowed: h
            .spec
            .allows_trainer_image(trainer_image, &f.settings.trainer_image),
        allows_non_private: h.spec.allow_non_private_studies,
        served: true,
        deleting: h.metadata.deletion_timestamp.is_some(),
        budget_epsilon: h.spec.privacy_budget.epsilon,
        budget_delta: h.spec.privacy_budget.delta,
        ledger: Some(f.ledger.map(|d| d.ledger.clone()).unwrap_or_default()),
    };
    let acc = plan::accountant(p.study.spec.privacy.accountant);
    if let Err(e) = plan::admit(&candidate, p.plan.as_ref(), acc, &p.consent_hash) {
        let m = e.message(&p.study_ref, &p.consent_hash);
        return Err(match e {
            Exclusion::NoConsent | Exclusion::ConsentOutdated { .. } => Refusal::ConsentMissing(m),
            Exclusion::TrainerImageNotAllowed { .. } => Refusal::TrainerImageNotAllowed(m),
            Exclusion::NonPrivateNotAllowed => Refusal::NonPrivateNotAllowed(m),
            Exclusion::BudgetExhausted { .. } => Refusal::BudgetExceeded(m),
            Exclusion::NotReady => Refusal::NotReady(m),
            Exclusion::NotSelected | Exclusion::NamespaceNotServed => Refusal::Malformed(m),
        });
    }
    // The site consents to the study as it computes it; the coordinator must run that same study.
    let coordinator_hashes = [
        Some(a.consent_hash.as_str()),
        p.round.spec.consent_hash.as_deref(),
    ];
    if coordinator_hashes
        .iter()
        .any(|h| *h != Some(p.consent_hash.as_str()))
    {
        return Err(Refusal::ConsentMissing(format!(
            "the coordinator's consent hash for {} ({:?}, round {:?}) is not the one this site computes from the study ({}): the study it runs is not the one consented to (do site and coordinator use the same default images?)",
            p.study_ref, a.consent_hash, p.round.spec.consent_hash, p.consent_hash
        )));
    }
    Ok(())
}

/// [`parse`] then [`admit`].
pub fn check(a: &Assignment, me: &str, f: &Facts) -> Result<Parsed, Refusal> {
    let p = parse(a, me, f.settings)?;
    admit(a, &p, f)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::EndpointMode;
    use caduceus_privacy::SubsampledGaussian;

    const ME: &str = "sites/st-mary";
    const NOW: i64 = 1_000_000;

    fn settings() -> Settings {
        Settings {
            operator_namespace: "caduceus-system".into(),
            trainer_image: "caduceus-trainer:test".into(),
            aggregator_image: "caduceus-aggregator:test".into(),
            endpoint_mode: EndpointMode::Service,
            public_host: None,
            watch_namespaces: None,
            telemetry_env: Vec::new(),
        }
    }

    fn study(private: bool) -> FederatedStudy {
        let mut s: FederatedStudy = serde_yaml::from_str(&format!(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: FederatedStudy
metadata: {{name: gender, namespace: studies, uid: "u-1"}}
spec:
  model: {{architecture: small-cnn}}
  task: {{label: gender, sensitiveAttributes: [race]}}
  rounds: {{total: 3, minHospitals: 1, deadlineSeconds: 60}}
  training: {{steps: 5, batchSize: 32}}
  privacy: {{enabled: {private}, noiseMultiplier: 1.1, sampleRate: 0.02}}
  hospitalSelector: {{}}
  modelStore: {{claimName: store}}
"#
        ))
        .unwrap();
        s.metadata.uid = Some("u-1".into());
        s
    }

    fn round_of(st: &FederatedStudy, round: u32, attempt: u32) -> TrainingRound {
        let plan = plan::privacy_plan(&st.spec).unwrap();
        let hash = settings().consent_hash(st);
        crate::build::training_round(st, round, attempt, vec![ME.into()], &hash, plan)
    }

    fn assignment(st: &FederatedStudy, round: u32, attempt: u32) -> Assignment {
        let r = round_of(st, round, attempt);
        Assignment {
            id: names::assignment_id("studies", &r.name_any(), "u-1", ME),
            hospital: ME.into(),
            study_json: serde_json::to_string(st).unwrap(),
            round_json: serde_json::to_string(&r).unwrap(),
            consent_hash: settings().consent_hash(st),
            expires_at: NOW + 600,
            issued_at: NOW - 10,
            ..Default::default()
        }
    }

    fn hospital(consent: &str, budget: f64) -> HospitalClient {
        let mut h: HospitalClient = serde_yaml::from_str(&format!(
            r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {{name: st-mary, namespace: north}}
spec:
  data: {{claimName: faces}}
  privacyBudget: {{epsilon: {budget}}}
  consentedStudies: [{consent}]
"#
        ))
        .unwrap();
        h.status = Some(serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Ready", "status": "True", "reason": "DataClaimBound", "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}]
        })).unwrap());
        h
    }

    fn consent(st: &FederatedStudy) -> String {
        format!("studies/gender@{}", settings().consent_hash(st))
    }

    /// A mutation of the inputs and the refusal reason it must give (`None`: accepted).
    type Case = (
        &'static str,
        Box<dyn Fn(&mut Assignment, &mut Env)>,
        Option<&'static str>,
    );

    struct Env {
        me: String,
        hospital: Option<HospitalClient>,
        ledger: Option<DurableLedger>,
        seen: Option<(u32, u32)>,
        now: i64,
    }

    fn run(private: bool, cases: Vec<Case>) {
        let s = settings();
        for (name, mutate, want) in cases {
            let st = study(private);
            let mut a = assignment(&st, 2, 0);
            let mut h = hospital(&consent(&st), 100.0);
            h.spec.allow_non_private_studies = !private;
            let mut env = Env {
                me: ME.into(),
                hospital: Some(h),
                ledger: None,
                seen: Some((1, 0)),
                now: NOW,
            };
            mutate(&mut a, &mut env);
            let f = Facts {
                now: env.now,
                seen: env.seen,
                hospital: env.hospital.as_ref(),
                ledger: env.ledger.as_ref(),
                settings: &s,
            };
            let got = check(&a, &env.me, &f);
            match (want, &got) {
                (None, Ok(_)) => {}
                (Some(w), Err(r)) if r.reason() == w => {}
                _ => panic!("{name}: want {want:?}, got {:?}", got.map(|p| p.key)),
            }
        }
    }

    fn edit_study(a: &mut Assignment, f: impl Fn(&mut FederatedStudy)) {
        let mut st: FederatedStudy = serde_json::from_str(&a.study_json).unwrap();
        f(&mut st);
        a.study_json = serde_json::to_string(&st).unwrap();
    }

    fn edit_round(a: &mut Assignment, f: impl Fn(&mut TrainingRound)) {
        let mut r: TrainingRound = serde_json::from_str(&a.round_json).unwrap();
        f(&mut r);
        a.round_json = serde_json::to_string(&r).unwrap();
    }

    #[test]
    fn assignments_are_checked_in_order() {
        let cases: Vec<Case> = vec![
            ("a good one", Box::new(|_, _| {}), None),
            (
                "bare enrolment name",
                Box::new(|_, e| e.me = "st-mary".into()),
                None,
            ),
            (
                "the same round again",
                Box::new(|_, e| e.seen = Some((2, 0))),
                None,
            ),
            (
                "another hospital",
                Box::new(|a, _| a.hospital = "sites/other".into()),
                Some("WrongHospital"),
            ),
            (
                "another enrolment",
                Box::new(|_, e| e.me = "sites/other".into()),
                Some("WrongHospital"),
            ),
            (
                "study JSON",
                Box::new(|a, _| a.study_json = "{".into()),
                Some("Malformed"),
            ),
            (
                "round JSON",
                Box::new(|a, _| a.round_json = "[]".into()),
                Some("Malformed"),
            ),
            (
                "id of another round",
                Box::new(|a, _| a.id = a.id.replace("gender-r2", "gender-r3")),
                Some("Malformed"),
            ),
            (
                "round of another study uid",
                Box::new(|a, _| edit_round(a, |r| r.spec.study_uid = Some("u-2".into()))),
                Some("Malformed"),
            ),
            (
                "round misnamed",
                Box::new(|a, _| edit_round(a, |r| r.spec.attempt = 1)),
                Some("Malformed"),
            ),
            (
                "not a participant",
                Box::new(|a, _| edit_round(a, |r| r.spec.participants = vec!["sites/x".into()])),
                Some("Malformed"),
            ),
            (
                "weaker noise than the study's",
                Box::new(|a, _| {
                    edit_round(a, |r| {
                        if let Some(p) = r.spec.privacy.as_mut() {
                            p.noise_multiplier = 0.3
                        }
                    })
                }),
                Some("Malformed"),
            ),
            (
                "no privacy plan for a DP study",
                Box::new(|a, _| edit_round(a, |r| r.spec.privacy = None)),
                Some("Malformed"),
            ),
            ("no expiry", Box::new(|a, _| a.expires_at = 0), Some("Malformed")),
            (
                "expired",
                Box::new(|a, e| e.now = a.expires_at + 1),
                Some("Expired"),
            ),
            (
                "stale round",
                Box::new(|_, e| e.seen = Some((3, 0))),
                Some("Stale"),
            ),
            (
                "stale attempt",
                Box::new(|_, e| e.seen = Some((2, 1))),
                Some("Stale"),
            ),
            (
                "started before",
                Box::new(|a, e| {
                    let p = parse(a, ME, &settings()).unwrap();
                    e.ledger = Some(DurableLedger {
                        started: vec![p.key],
                        ..Default::default()
                    });
                }),
                Some("Replayed"),
            ),
            (
                "committed before",
                Box::new(|a, e| {
                    let p = parse(a, ME, &settings()).unwrap();
                    let mut dl = DurableLedger::default();
                    dl.ledger
                        .record(p.key, &[SubsampledGaussian::new(1.0, 0.01, 10).unwrap()])
                        .unwrap();
                    e.ledger = Some(dl);
                }),
                Some("Replayed"),
            ),
            (
                "no consent",
                Box::new(|_, e| e.hospital.as_mut().unwrap().spec.consented_studies.clear()),
                Some("ConsentMissing"),
            ),
            (
                "consent without a hash",
                Box::new(|_, e| {
                    e.hospital.as_mut().unwrap().spec.consented_studies = vec!["studies/gender".into()]
                }),
                Some("ConsentMissing"),
            ),
            (
                "consent to other terms (the study changed)",
                Box::new(|a, _| edit_study(a, |s| s.spec.training.batch_size = 64)),
                Some("ConsentMissing"),
            ),
            (
                "the coordinator's hash differs",
                Box::new(|a, _| a.consent_hash = "0".repeat(64)),
                Some("ConsentMissing"),
            ),
            (
                "trainer image",
                Box::new(|a, e| {
                    edit_study(a, |s| {
                        s.spec.images =
                            Some(serde_json::from_value(serde_json::json!({"trainer": "evil:1"})).unwrap())
                    });
                    let st: FederatedStudy = serde_json::from_str(&a.study_json).unwrap();
                    let h = settings().consent_hash(&st);
                    a.consent_hash = h.clone();
                    edit_round(a, |r| r.spec.consent_hash = Some(h.clone()));
                    e.hospital.as_mut().unwrap().spec.consented_studies = vec![format!("studies/gender@{h}")];
                }),
                Some("TrainerImageNotAllowed"),
            ),
            (
                "not ready",
                Box::new(|_, e| e.hospital.as_mut().unwrap().status = None),
                Some("NotReady"),
            ),
            (
                "no HospitalClient",
                Box::new(|_, e| e.hospital = None),
                Some("NotReady"),
            ),
            (
                "budget",
                Box::new(|_, e| e.hospital.as_mut().unwrap().spec.privacy_budget.epsilon = 0.01),
                Some("BudgetExceeded"),
            ),
        ];
        run(true, cases);
    }

    #[test]
    fn non_private_studies_need_the_hospitals_permission() {
        run(
            false,
            vec![
                ("allowed", Box::new(|_, _| {}), None),
                (
                    "not allowed",
                    Box::new(|_, e| e.hospital.as_mut().unwrap().spec.allow_non_private_studies = false),
                    Some("NonPrivateNotAllowed"),
                ),
                (
                    "a privacy plan the study does not have",
                    Box::new(|a, _| {
                        let p = plan::privacy_plan(&study(true).spec).unwrap();
                        edit_round(a, |r| r.spec.privacy = p.clone())
                    }),
                    Some("Malformed"),
                ),
            ],
        );
    }

    #[test]
    fn parsed_assignments_carry_the_coordinators_key_and_id() {
        let st = study(true);
        let a = assignment(&st, 2, 0);
        let p = parse(&a, ME, &settings()).unwrap();
        assert_eq!(p.key, ledger::round_key("studies", "gender", "u-1", 0, 2));
        assert_eq!(p.hospital_id, names::hospital_id("sites", "st-mary"));
        assert_eq!(p.order(), (2, 0));
        assert!(p.dp());
        assert_eq!(p.study_id, names::study_id("studies", "gender"));
        let r = Refusal::Stale("x".into());
        assert_eq!(r.message(), "Stale: x");
    }
}
