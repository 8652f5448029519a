//! The study controller: the round state machine of a `FederatedStudy`.
//!
//! Each reconcile (level-triggered, idempotent):
//! 1. validate what CEL cannot (invalid studies wait for a change, no hot retries);
//! 2. compute the consent hash of the study's terms and fix the DP plan (σ from `targetEpsilon`) for
//!    it, in status;
//! 3. ensure the aggregator's ServiceAccount, Service, CA and certificate;
//! 4. decide each hospital's admission (selector, served namespace, consent with the current hash,
//!    trainer image allowed, DP or `allowNonPrivateStudies`, projected ε within budget, `Ready`) and
//!    record it in the hospital's `status.admissions` and the study's `HospitalsAdmitted`;
//! 5. look at the study's signed `TrainingRound`s: if none runs, start the next one — reserve the
//!    participants' privacy spending in each durable ledger, then create and sign the round
//!    (reservations are cancelled on every path that creates none); retry a failed round under
//!    `rounds.maxRetries`; finish the study after `rounds.total` rounds;
//! 6. revoke the certificates of hospitals that left; write the status.
//!
//! The finalizer deletes what owner references cannot reach: trainer Jobs and Secrets in the
//! hospitals' namespaces, and the study CA and key's master copy in the operator's namespace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::hospital::StudyAdmission;
use caduceus_crds::study::PrivacyPlan;
use caduceus_crds::{FederatedStudy, FederatedStudyStatus, HospitalClient, TrainingRound, set_condition};
use caduceus_privacy::ledger::RoundKey;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::build;
use crate::context::{Context, Error, Result};
use crate::ledger;
use crate::names;
use crate::plan::{self, Candidate, Exclusion};
use crate::round::finished;
use crate::secrets;
use crate::signing;

pub async fn reconcile(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("study");
    let ns = study.namespace().unwrap_or_default();
    // A namespace this operator does not serve may be another operator's: leave it alone.
    if !ctx.settings.serves(&ns) {
        return Ok(Action::await_change());
    }
    let api: Api<FederatedStudy> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, crate::STUDY_FINALIZER, study, |event| async {
        match event {
            Finalizer::Apply(s) => apply(s, ctx.clone()).await,
            Finalizer::Cleanup(s) => cleanup(s, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

pub fn error_policy(_study: Arc<FederatedStudy>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!("study reconcile failed: {err}");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["study", err.kind()])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

async fn write_status(ctx: &Context, study: &FederatedStudy, status: &FederatedStudyStatus) -> Result<()> {
    let api: Api<FederatedStudy> =
        Api::namespaced(ctx.client.clone(), &study.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": FederatedStudy::api_version(&()),
        "kind": FederatedStudy::kind(&()),
        "status": status,
    });
    api.patch_status(
        &study.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// The study's rounds that this controller made (signed, for this study's UID), sorted by
/// (round, attempt). Anything else that claims to be one of its rounds is ignored here; the round
/// controller marks it `NotCreatedByOperator`.
async fn rounds_of(ctx: &Context, study: &FederatedStudy, key: &[u8]) -> Result<Vec<TrainingRound>> {
    let ns = study.namespace().unwrap_or_default();
    let api: Api<TrainingRound> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = study.metadata.uid.clone();
    let mut v: Vec<TrainingRound> = api
        .list(&ListParams::default().labels(&format!("{}={}", names::LABEL_STUDY, study.name_any())))
        .await?
        .items
        .into_iter()
        .filter(|r| r.spec.study == study.name_any() && r.spec.study_uid == uid && signing::verify(key, r))
        .collect();
    v.sort_by_key(|r| (r.spec.round, r.spec.attempt));
    Ok(v)
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
pub fn next_step(total: u32, max_retries: u32, rounds: &[(u32, u32, Option<bool>, String)]) -> Next {
    let Some((round, attempt, done, msg)) = rounds.last() else {
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

/// Sets `Ready=False` with `reason`, publishes a warning when it changed, writes the status.
async fn not_ready(
    ctx: &Context,
    study: &FederatedStudy,
    status: &mut FederatedStudyStatus,
    reason: &str,
    msg: String,
    action: &str,
) -> Result<()> {
    if set_condition(
        &mut status.conditions,
        types::READY,
        cstatus::FALSE,
        reason,
        msg.clone(),
        study.metadata.generation,
    ) {
        ctx.event(study, true, reason, action, msg).await;
    }
    write_status(ctx, study, status).await
}

/// A hospital with its admission decision for this study.
pub struct Decision {
    pub hospital: HospitalClient,
    pub candidate: Candidate,
    pub admitted: std::result::Result<(), Exclusion>,
}

async fn apply(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let generation = study.metadata.generation;
    let mut status = study.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    ctx.metrics.init_study(&ns, &name);

    // Validate.
    if !ctx.settings.serves(&ns) {
        let msg = format!("the operator does not serve namespace {ns} (its --watch-namespaces)");
        not_ready(&ctx, &study, &mut status, "NamespaceNotServed", msg, "Validate").await?;
        return Ok(Action::await_change());
    }
    if let Err(msg) = plan::validate(&study.spec) {
        not_ready(&ctx, &study, &mut status, "Invalid", msg, "Validate").await?;
        return Ok(Action::await_change());
    }
    let selector = match Selector::try_from(study.spec.hospital_selector.clone()) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("spec.hospitalSelector is invalid: {e}");
            not_ready(&ctx, &study, &mut status, "InvalidSelector", msg, "Validate").await?;
            return Ok(Action::await_change());
        }
    };
    // What hospitals consent to; the DP plan is fixed for it (and recomputed when it changes).
    let hash = ctx.settings.consent_hash(&study);
    if status.consent_hash.as_deref() != Some(hash.as_str())
        || (study.spec.privacy.enabled != status.privacy_plan.is_some())
    {
        status.privacy_plan = None;
        if study.spec.privacy.enabled {
            let spec = study.spec.clone();
            let planned = tokio::task::spawn_blocking(move || plan::privacy_plan(&spec))
                .await
                .map_err(|e| Error::Other(e.to_string()))?;
            match planned {
                Ok(p) => status.privacy_plan = p,
                Err(msg) => {
                    not_ready(&ctx, &study, &mut status, "Invalid", msg, "PlanPrivacy").await?;
                    return Ok(Action::await_change());
                }
            }
        }
        status.consent_hash = Some(hash.clone());
    }
    if study.spec.suspend {
        set_condition(
            &mut status.conditions,
            types::READY,
            cstatus::FALSE,
            "Suspended",
            "spec.suspend is true: no new round starts",
            generation,
        );
        write_status(&ctx, &study, &status).await?;
        return Ok(Action::await_change());
    }

    // Objects every round needs.
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if pvcs.get_opt(&study.spec.model_store.claim_name).await?.is_none() {
        let msg = format!(
            "the model store claim {ns}/{} does not exist",
            study.spec.model_store.claim_name
        );
        not_ready(&ctx, &study, &mut status, "ModelStoreMissing", msg, "Validate").await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let ssa = PatchParams::apply(crate::FIELD_MANAGER).force();
    let sa = build::aggregator_service_account(&study);
    let mut sa_owned = sa.clone();
    sa_owned.metadata.owner_references = Some(vec![build::controller_ref(&*study)]);
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns)
        .patch(&sa_owned.name_any(), &ssa, &Patch::Apply(&sa_owned))
        .await?;
    let svc = build::aggregator_service(&study, &ctx.settings);
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&svc.name_any(), &ssa, &Patch::Apply(&svc))
        .await?;
    let trust = secrets::ensure_ca(&ctx.client, &ctx.settings.operator_namespace, &study).await?;
    if secrets::ensure_aggregator_tls(&ctx.client, &study, &trust).await? {
        ctx.event(
            &*study,
            false,
            "CertificateIssued",
            "IssueCertificate",
            "issued the aggregator's server certificate".into(),
        )
        .await;
    }

    // Rounds: only those this controller made (signed, for this study's UID).
    let key = ctx.signing_key().await?.to_vec();
    let rounds = rounds_of(&ctx, &study, &key).await?;
    let view: Vec<(u32, u32, Option<bool>, String)> = rounds
        .iter()
        .map(|r| {
            let msg = r
                .status
                .as_ref()
                .and_then(|s| s.conditions.condition(types::SUCCEEDED))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            (r.spec.round, r.spec.attempt, finished(r.status.as_ref()), msg)
        })
        .collect();
    summarise(&study, &rounds, &mut status);

    // Hospitals: admission, and revocation of those that left.
    let decisions = decide(&ctx, &study, &selector, &hash, status.privacy_plan.as_ref()).await?;
    record_admissions(&ctx, &study, &hash, &decisions, &mut status).await?;
    let members: Vec<&String> = decisions
        .iter()
        .filter(|d| d.candidate.selected && d.candidate.consent == plan::Consent::Hash(hash.clone()))
        .map(|d| &d.candidate.reference)
        .collect();
    let running_participants: Vec<String> = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()).is_none())
        .flat_map(|r| r.spec.participants.clone())
        .collect();
    let hospital_namespaces = ctx.settings.watch_namespaces.clone();
    for holder in secrets::hospitals_with_secrets(&ctx.client, &study, hospital_namespaces.as_ref()).await? {
        if !members.contains(&&holder) && !running_participants.contains(&holder) {
            let (hns, h) = holder.split_once('/').unwrap_or(("", &holder));
            if secrets::revoke_hospital(&ctx.client, &study, hns, h).await? {
                ctx.event(
                    &*study,
                    false,
                    "CertificateRevoked",
                    "Revoke",
                    format!("{holder} left the study: its certificate and key Secrets were deleted"),
                )
                .await;
            }
        }
    }

    // For the stalled-round alert: when the running round (if any) was created.
    let running_since = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()).is_none())
        .filter_map(|r| r.metadata.creation_timestamp.as_ref())
        .map(|t| t.0.as_second() as f64)
        .reduce(f64::min);
    let started_gauge = ctx.metrics.round_started.with_label_values(&[&ns, &name]);
    started_gauge.set(running_since.unwrap_or(0.0));
    let action = match next_step(study.spec.rounds.total, study.spec.rounds.max_retries, &view) {
        Next::Running(msg) => {
            set_condition(
                &mut status.conditions,
                types::READY,
                cstatus::TRUE,
                "Running",
                msg,
                generation,
            );
            Action::requeue(ctx.poll * 4)
        }
        Next::Completed => {
            let msg = format!("all {} rounds succeeded", study.spec.rounds.total);
            if set_condition(
                &mut status.conditions,
                types::READY,
                cstatus::TRUE,
                "Completed",
                msg.clone(),
                generation,
            ) {
                ctx.event(&*study, false, "Completed", "Complete", msg).await;
            }
            Action::await_change()
        }
        Next::Failed(msg) => {
            if set_condition(
                &mut status.conditions,
                types::READY,
                cstatus::FALSE,
                "RoundFailed",
                msg.clone(),
                generation,
            ) {
                ctx.event(&*study, true, "RoundFailed", "Retry", msg).await;
            }
            Action::await_change()
        }
        Next::Start { round, attempt } => {
            let started = RoundStart {
                study: &study,
                hash: &hash,
                signing_key: &key,
                round,
                attempt,
            };
            let action = start_round(&ctx, &started, &mut status, &decisions).await?;
            // A round was created (not merely waited for) when start_round says it runs.
            if status
                .conditions
                .condition(types::READY)
                .is_some_and(|c| c.reason == "Running" && c.message.ends_with(" started"))
            {
                started_gauge.set(Timestamp::now().as_second() as f64);
            }
            action
        }
    };
    write_status(&ctx, &study, &status).await?;
    Ok(action)
}

/// Every HospitalClient as a candidate of this study, with its admission decision.
async fn decide(
    ctx: &Context,
    study: &FederatedStudy,
    selector: &Selector,
    hash: &str,
    privacy: Option<&PrivacyPlan>,
) -> Result<Vec<Decision>> {
    let ns = study.namespace().unwrap_or_default();
    let study_ref = format!("{ns}/{}", study.name_any());
    let acc = plan::accountant(study.spec.privacy.accountant);
    let (trainer_image, _) = ctx.settings.images(study);
    let hospitals: Vec<HospitalClient> = Api::<HospitalClient>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let ledgers = ledger::load_all(&ctx.client, &ctx.settings.operator_namespace).await?;
    Ok(hospitals
        .into_iter()
        .map(|h| {
            let hns = h.namespace().unwrap_or_default();
            let reference = names::hospital_ref(&hns, &h.name_any());
            let st = h.status.clone().unwrap_or_default();
            let ledger = match ledgers.get(&reference) {
                Some(Some(dl)) => Some(dl.ledger.clone()),
                Some(None) => None,
                // Never charged through the durable ledger yet: what the status mirror holds.
                None => Some(st.ledger.clone().unwrap_or_default()),
            };
            let candidate = Candidate {
                reference,
                ready: st.conditions.is_true(types::READY),
                consent: match h.spec.consent_for(&study_ref) {
                    None => plan::Consent::None,
                    Some(None) => plan::Consent::Unbound,
                    Some(Some(given)) => plan::Consent::Hash(given.to_string()),
                },
                selected: selector.matches(h.labels()),
                trainer_image: trainer_image.to_string(),
                image_allowed: h
                    .spec
                    .allows_trainer_image(trainer_image, &ctx.settings.trainer_image),
                allows_non_private: h.spec.allow_non_private_studies,
                served: ctx.settings.serves(&hns),
                deleting: h.metadata.deletion_timestamp.is_some(),
                budget_epsilon: h.spec.privacy_budget.epsilon,
                budget_delta: h.spec.privacy_budget.delta,
                ledger,
            };
            let admitted = plan::admit(&candidate, privacy, acc, hash);
            Decision {
                hospital: h,
                candidate,
                admitted,
            }
        })
        .collect())
}

/// Writes each selected hospital's admission into its status (only when it changed), and the
/// study's `HospitalsAdmitted` condition.
async fn record_admissions(
    ctx: &Context,
    study: &FederatedStudy,
    hash: &str,
    decisions: &[Decision],
    status: &mut FederatedStudyStatus,
) -> Result<()> {
    let study_ref = format!("{}/{}", study.namespace().unwrap_or_default(), study.name_any());
    let mut excluded = Vec::new();
    let mut selected = 0;
    for d in decisions.iter().filter(|d| d.candidate.selected) {
        selected += 1;
        let (admitted, reason, message) = match &d.admitted {
            Ok(()) => (true, "Admitted".to_string(), format!("takes part in {study_ref}")),
            Err(e) => {
                excluded.push(format!("{} ({})", d.candidate.reference, e.reason()));
                (false, e.reason().to_string(), e.message(&study_ref, hash))
            }
        };
        let want = StudyAdmission {
            study: study_ref.clone(),
            admitted,
            reason,
            message,
            consent_hash: Some(hash.to_string()),
        };
        let current = d
            .hospital
            .status
            .as_ref()
            .and_then(|s| s.admissions.iter().find(|a| a.study == study_ref));
        if current == Some(&want) || d.hospital.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if !want.admitted && current.is_none_or(|c| c.reason != want.reason) {
            ctx.event(
                &d.hospital,
                true,
                &want.reason,
                "Admit",
                format!("left out of {study_ref}: {}", want.message),
            )
            .await;
        }
        let hapi: Api<HospitalClient> =
            Api::namespaced(ctx.client.clone(), &d.hospital.namespace().unwrap_or_default());
        ledger::update_status(&hapi, &d.hospital.name_any(), |s, _| {
            match s.admissions.iter_mut().find(|a| a.study == want.study) {
                Some(a) if *a == want => return Ok(false),
                Some(a) => *a = want.clone(),
                None => s.admissions.push(want.clone()),
            }
            Ok(true)
        })
        .await?;
    }
    let generation = study.metadata.generation;
    if excluded.is_empty() {
        set_condition(
            &mut status.conditions,
            types::HOSPITALS_ADMITTED,
            cstatus::TRUE,
            "AllAdmitted",
            format!("all {selected} selected hospitals are admitted (consent hash {hash})"),
            generation,
        );
    } else {
        set_condition(
            &mut status.conditions,
            types::HOSPITALS_ADMITTED,
            cstatus::FALSE,
            "HospitalsExcluded",
            format!(
                "{} of {selected} selected hospitals are left out: {}; each HospitalClient's status.admissions says why (consent is given as {study_ref}@{hash})",
                excluded.len(),
                excluded.join(", ")
            ),
            generation,
        );
    }
    Ok(())
}

/// The round a study is about to start.
struct RoundStart<'a> {
    study: &'a FederatedStudy,
    hash: &'a str,
    signing_key: &'a [u8],
    round: u32,
    attempt: u32,
}

/// Cancels the reservations of `key` that this reconcile made (the round was never created).
async fn cancel_reservations(ctx: &Context, reserved: &[String], key: &RoundKey) -> Result<()> {
    for r in reserved {
        let (hns, h) = r.split_once('/').unwrap_or(("", r));
        ledger::cancel(&ctx.client, &ctx.settings.operator_namespace, hns, h, key).await?;
    }
    Ok(())
}

/// Chooses the participants of a round, reserves their spending and creates the (signed)
/// TrainingRound. On every path that creates no round, the reservations made here are cancelled.
async fn start_round(
    ctx: &Context,
    start: &RoundStart<'_>,
    status: &mut FederatedStudyStatus,
    decisions: &[Decision],
) -> Result<Action> {
    let study = start.study;
    let (round, attempt) = (start.round, start.attempt);
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let uid = study.metadata.uid.clone().unwrap_or_default();
    let generation = study.metadata.generation;
    let acc = plan::accountant(study.spec.privacy.accountant);
    let privacy = status.privacy_plan.clone();
    let opns = ctx.settings.operator_namespace.clone();
    let mut admitted = Vec::new();
    let mut exhausted = Vec::new();
    let mut not_ready = Vec::new();
    for d in decisions {
        let h = &d.hospital;
        let hapi: Api<HospitalClient> =
            Api::namespaced(ctx.client.clone(), &h.namespace().unwrap_or_default());
        match &d.admitted {
            Ok(()) => {
                if privacy.is_some()
                    && h.status
                        .as_ref()
                        .is_some_and(|s| s.conditions.is_true(types::PRIVACY_BUDGET_EXHAUSTED))
                {
                    ledger::set_budget_condition(
                        &hapi,
                        &h.name_any(),
                        false,
                        "WithinBudget",
                        "the next round fits the budget",
                    )
                    .await?;
                }
                admitted.push(d.candidate.reference.clone());
            }
            Err(Exclusion::BudgetExhausted { message }) => {
                let already = h
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.condition(types::PRIVACY_BUDGET_EXHAUSTED))
                    .is_some_and(|c| c.status == cstatus::TRUE && c.message == *message);
                if !already && h.metadata.deletion_timestamp.is_none() {
                    ledger::set_budget_condition(&hapi, &h.name_any(), true, "BudgetExceeded", message)
                        .await?;
                }
                exhausted.push(d.candidate.reference.clone());
            }
            Err(Exclusion::NotReady) => not_ready.push(d.candidate.reference.clone()),
            Err(_) => {}
        }
    }
    let chosen = plan::participants(&admitted, study.spec.rounds.max_hospitals);
    let min = study.spec.rounds.min_hospitals as usize;
    if chosen.len() < min {
        let (reason, msg) = if !exhausted.is_empty() && chosen.len() + exhausted.len() >= min {
            (
                "PrivacyBudgetExhausted",
                format!(
                    "stopped before round {round}: only {} hospitals can take part, {min} are needed; the privacy budgets of {} would be overspent",
                    chosen.len(),
                    exhausted.join(", ")
                ),
            )
        } else {
            (
                "WaitingForHospitals",
                format!(
                    "round {round} needs {min} hospitals; {} can take part{}{}",
                    chosen.len(),
                    if not_ready.is_empty() {
                        String::new()
                    } else {
                        format!(", not ready: {}", not_ready.join(", "))
                    },
                    if exhausted.is_empty() {
                        String::new()
                    } else {
                        format!(", budget exhausted: {}", exhausted.join(", "))
                    },
                ),
            )
        };
        if set_condition(
            &mut status.conditions,
            types::READY,
            cstatus::FALSE,
            reason,
            msg.clone(),
            generation,
        ) {
            ctx.event(study, true, reason, "StartRound", msg).await;
        }
        return Ok(Action::requeue(Duration::from_secs(30)));
    }

    // Reserve each participant's spending before the round (and so any trainer Job) exists.
    let key = ledger::round_key(&ns, &name, &uid, attempt, round);
    let mut participants = Vec::new();
    let mut reserved = Vec::new();
    if let Some(p) = &privacy {
        let mechanisms = plan::round_mechanisms(p);
        for r in &chosen {
            let Some(d) = decisions.iter().find(|d| &d.candidate.reference == r) else {
                continue;
            };
            match ledger::reserve(&ctx.client, &opns, &d.hospital, &key, &mechanisms, acc).await {
                Ok(Ok(())) => {
                    participants.push(r.clone());
                    reserved.push(r.clone());
                }
                Ok(Err(msg)) => exhausted.push(format!("{r} ({msg})")),
                Err(e) => {
                    cancel_reservations(ctx, &reserved, &key).await?;
                    return Err(e);
                }
            }
        }
    } else {
        participants = chosen;
    }
    if participants.len() < min {
        cancel_reservations(ctx, &reserved, &key).await?;
        let msg = format!(
            "round {round}: only {} hospitals could reserve their privacy spending, {min} are needed",
            participants.len()
        );
        set_condition(
            &mut status.conditions,
            types::READY,
            cstatus::FALSE,
            "PrivacyBudgetExhausted",
            msg,
            generation,
        );
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    let mut tr = build::training_round(
        study,
        round,
        attempt,
        participants.clone(),
        start.hash,
        privacy.clone(),
    );
    signing::attach(start.signing_key, &mut tr);
    let api: Api<TrainingRound> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &tr).await {
        Ok(_) => {
            ctx.event(
                study,
                false,
                "RoundCreated",
                "StartRound",
                format!("round {round} attempt {attempt} with {}", participants.join(", ")),
            )
            .await;
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = api.get(&tr.name_any()).await?;
            if signing::verify(start.signing_key, &existing) {
                // Ours, created before a crash: keep it, with its participants.
                let keep = existing.spec.participants.clone();
                let extra: Vec<String> = reserved.iter().filter(|r| !keep.contains(r)).cloned().collect();
                cancel_reservations(ctx, &extra, &key).await?;
                participants = keep;
            } else {
                // Someone else's round in the way of ours: it schedules nothing; remove it.
                cancel_reservations(ctx, &reserved, &key).await?;
                match api.delete(&tr.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                ctx.event(
                    study,
                    true,
                    "ForeignRoundDeleted",
                    "StartRound",
                    format!(
                        "TrainingRound {ns}/{} was not created by the operator (no valid signature) and was deleted",
                        tr.name_any()
                    ),
                )
                .await;
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
        }
        Err(e) => {
            cancel_reservations(ctx, &reserved, &key).await?;
            return Err(e.into());
        }
    }
    status.current_round = Some(round + 1);
    status.participants = participants;
    set_condition(
        &mut status.conditions,
        types::READY,
        cstatus::TRUE,
        "Running",
        format!("round {round} attempt {attempt} started"),
        generation,
    );
    Ok(Action::requeue(ctx.poll * 4))
}

/// Latest figures, ε per hospital and `FairnessDegraded` from the study's rounds.
fn summarise(study: &FederatedStudy, rounds: &[TrainingRound], status: &mut FederatedStudyStatus) {
    let generation = study.metadata.generation;
    let succeeded: Vec<&TrainingRound> = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()) == Some(true))
        .collect();
    status.completed_rounds = succeeded.len() as u32;
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

/// Deletes every `K` that matches `lp` outside namespace `keep` (already gone counts as deleted).
async fn delete_outside<K>(
    client: &kube::Client,
    namespaces: Option<&std::collections::BTreeSet<String>>,
    keep: &str,
    lp: &ListParams,
    dp: &DeleteParams,
) -> Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut items = Vec::new();
    match namespaces {
        None => items.extend(Api::<K>::all(client.clone()).list_metadata(lp).await?.items),
        Some(all) => {
            for n in all {
                items.extend(
                    Api::<K>::namespaced(client.clone(), n)
                        .list_metadata(lp)
                        .await?
                        .items,
                );
            }
        }
    }
    for o in items {
        let ns = o.metadata.namespace.clone().unwrap_or_default();
        if ns == keep {
            continue;
        }
        match Api::<K>::namespaced(client.clone(), &ns)
            .delete(&o.name_any(), dp)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Deletes what the study owns outside its namespace (owner references cover the rest).
async fn cleanup(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let lp = ListParams::default().labels(&format!(
        "{}={name},{}={ns}",
        names::LABEL_STUDY,
        names::LABEL_STUDY_NAMESPACE
    ));
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    // Trainer Jobs live in the served namespaces; Secrets there and in the operator's own (CA, key).
    let served = ctx.settings.watch_namespaces.clone();
    delete_outside::<Job>(&ctx.client, served.as_ref(), &ns, &lp, &dp).await?;
    let with_own = ctx.namespaces();
    delete_outside::<Secret>(&ctx.client, with_own.as_ref(), &ns, &lp, &dp).await?;
    ctx.metrics.forget_study(&ns, &name);
    ctx.event(
        &*study,
        false,
        "CleanedUp",
        "Delete",
        "deleted the study's trainer Jobs, certificates, CA and keys in other namespaces".into(),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine() {
        assert_eq!(next_step(3, 2, &[]), Next::Start { round: 0, attempt: 0 });
        assert!(matches!(
            next_step(3, 2, &[(0, 0, None, String::new())]),
            Next::Running(_)
        ));
        assert_eq!(
            next_step(3, 2, &[(0, 0, Some(true), String::new())]),
            Next::Start { round: 1, attempt: 0 }
        );
        assert_eq!(
            next_step(
                3,
                2,
                &[(0, 0, Some(true), String::new()), (1, 0, Some(false), "q".into())]
            ),
            Next::Start { round: 1, attempt: 1 }
        );
        assert!(matches!(
            next_step(3, 1, &[(0, 0, Some(true), String::new()), (1, 0, Some(false), "q".into()), (1, 1, Some(false), "quorum".into())]),
            Next::Failed(m) if m.contains("after 2 attempts") && m.contains("quorum")
        ));
        assert_eq!(
            next_step(
                2,
                0,
                &[
                    (0, 0, Some(true), String::new()),
                    (1, 0, Some(true), String::new())
                ]
            ),
            Next::Completed
        );
    }
}
