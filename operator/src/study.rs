//! The study controller: the round state machine of a `FederatedStudy`.
//!
//! Each reconcile (level-triggered, idempotent):
//! 1. validate what CEL cannot (invalid studies wait for a change, no hot retries);
//! 2. fix the DP plan (σ from `targetEpsilon`) once, in status;
//! 3. ensure the aggregator's ServiceAccount, Service, CA and certificate;
//! 4. look at the study's `TrainingRound`s: if none runs, start the next one — choose participants
//!    (selector, consent, `Ready`, projected ε within budget), reserve their privacy spending in
//!    each ledger, then create the round; retry a failed round under `rounds.maxRetries`; finish
//!    the study after `rounds.total` rounds;
//! 5. revoke the certificates of hospitals that left; write the status.
//!
//! The finalizer deletes what owner references cannot reach: trainer Jobs and Secrets in the
//! hospitals' namespaces and the study key's master copy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::{FederatedStudy, FederatedStudyStatus, HospitalClient, TrainingRound, set_condition};
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

pub async fn reconcile(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("study");
    let ns = study.namespace().unwrap_or_default();
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

/// The study's rounds, sorted by (round, attempt).
async fn rounds_of(ctx: &Context, study: &FederatedStudy) -> Result<Vec<TrainingRound>> {
    let ns = study.namespace().unwrap_or_default();
    let api: Api<TrainingRound> = Api::namespaced(ctx.client.clone(), &ns);
    let mut v: Vec<TrainingRound> = api
        .list(&ListParams::default().labels(&format!("{}={}", names::LABEL_STUDY, study.name_any())))
        .await?
        .items
        .into_iter()
        .filter(|r| r.spec.study == study.name_any())
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

async fn apply(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let generation = study.metadata.generation;
    let mut status = study.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    ctx.metrics.init_study(&ns, &name);

    // Validate.
    if let Err(msg) = plan::validate(&study.spec) {
        if set_condition(
            &mut status.conditions,
            types::READY,
            cstatus::FALSE,
            "Invalid",
            msg.clone(),
            generation,
        ) {
            ctx.event(&*study, true, "Invalid", "Validate", msg).await;
        }
        write_status(&ctx, &study, &status).await?;
        return Ok(Action::await_change());
    }
    if status.privacy_plan.is_none() && study.spec.privacy.enabled {
        let spec = study.spec.clone();
        let planned = tokio::task::spawn_blocking(move || plan::privacy_plan(&spec))
            .await
            .map_err(|e| Error::Other(e.to_string()))?;
        match planned {
            Ok(p) => status.privacy_plan = p,
            Err(msg) => {
                set_condition(
                    &mut status.conditions,
                    types::READY,
                    cstatus::FALSE,
                    "Invalid",
                    msg.clone(),
                    generation,
                );
                ctx.event(&*study, true, "Invalid", "PlanPrivacy", msg).await;
                write_status(&ctx, &study, &status).await?;
                return Ok(Action::await_change());
            }
        }
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
        if set_condition(
            &mut status.conditions,
            types::READY,
            cstatus::FALSE,
            "ModelStoreMissing",
            msg.clone(),
            generation,
        ) {
            ctx.event(&*study, true, "ModelStoreMissing", "Validate", msg)
                .await;
        }
        write_status(&ctx, &study, &status).await?;
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
    let ca = secrets::ensure_ca(&ctx.client, &study).await?;
    if secrets::ensure_aggregator_tls(&ctx.client, &study, &ca).await? {
        ctx.event(
            &*study,
            false,
            "CertificateIssued",
            "IssueCertificate",
            "issued the aggregator's server certificate".into(),
        )
        .await;
    }

    // Rounds.
    let rounds = rounds_of(&ctx, &study).await?;
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

    // Hospitals: candidates and revocation of those that left.
    let hospitals: Vec<HospitalClient> = Api::<HospitalClient>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let selector = Selector::try_from(study.spec.hospital_selector.clone())
        .map_err(|e| Error::Other(format!("spec.hospitalSelector: {e}")))?;
    let study_ref = format!("{ns}/{name}");
    let candidates: Vec<(HospitalClient, Candidate)> = hospitals
        .into_iter()
        .map(|h| {
            let st = h.status.clone().unwrap_or_default();
            let c = Candidate {
                reference: names::hospital_ref(&h.namespace().unwrap_or_default(), &h.name_any()),
                ready: st.conditions.is_true(types::READY),
                consents: h.spec.consented_studies.contains(&study_ref),
                selected: selector.matches(h.labels()),
                budget_epsilon: h.spec.privacy_budget.epsilon,
                budget_delta: h.spec.privacy_budget.delta,
                ledger: st.ledger.clone().unwrap_or_default(),
            };
            (h, c)
        })
        .collect();
    let members: Vec<&String> = candidates
        .iter()
        .filter(|(_, c)| c.selected && c.consents)
        .map(|(_, c)| &c.reference)
        .collect();
    let running_participants: Vec<String> = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()).is_none())
        .flat_map(|r| r.spec.participants.clone())
        .collect();
    for holder in secrets::hospitals_with_secrets(&ctx.client, &study).await? {
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
            let action = start_round(&ctx, &study, &mut status, &candidates, round, attempt).await?;
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

/// Chooses the participants of a round, reserves their spending and creates the TrainingRound.
async fn start_round(
    ctx: &Context,
    study: &FederatedStudy,
    status: &mut FederatedStudyStatus,
    candidates: &[(HospitalClient, Candidate)],
    round: u32,
    attempt: u32,
) -> Result<Action> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let generation = study.metadata.generation;
    let acc = plan::accountant(study.spec.privacy.accountant);
    let privacy = status.privacy_plan.clone();
    let mut admitted = Vec::new();
    let mut exhausted = Vec::new();
    let mut not_ready = Vec::new();
    for (h, c) in candidates {
        let hapi: Api<HospitalClient> =
            Api::namespaced(ctx.client.clone(), &h.namespace().unwrap_or_default());
        match plan::admit(c, privacy.as_ref(), acc) {
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
                admitted.push(c.reference.clone());
            }
            Err(Exclusion::BudgetExhausted { message }) => {
                let already = h
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.condition(types::PRIVACY_BUDGET_EXHAUSTED))
                    .is_some_and(|c| c.status == cstatus::TRUE && c.message == message);
                if !already {
                    ledger::set_budget_condition(&hapi, &h.name_any(), true, "BudgetExceeded", &message)
                        .await?;
                    ctx.event(
                        h,
                        true,
                        "PrivacyBudgetExhausted",
                        "Admit",
                        format!("left out of {ns}/{name}: {message}"),
                    )
                    .await;
                }
                exhausted.push(c.reference.clone());
            }
            Err(Exclusion::NotReady) => not_ready.push(c.reference.clone()),
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
    let mut participants = Vec::new();
    if let Some(p) = &privacy {
        let key = ledger::round_key(&ns, &name, attempt, round);
        for r in &chosen {
            let (hns, h) = r.split_once('/').unwrap_or(("", r));
            let hapi: Api<HospitalClient> = Api::namespaced(ctx.client.clone(), hns);
            match ledger::reserve(&hapi, h, &key, &plan::round_mechanism(p), acc).await? {
                Ok(()) => participants.push(r.clone()),
                Err(msg) => exhausted.push(format!("{r} ({msg})")),
            }
        }
    } else {
        participants = chosen;
    }
    if participants.len() < min {
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
    let tr = build::training_round(study, round, attempt, participants.clone());
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
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
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
    for o in Api::<K>::all(client.clone()).list_metadata(lp).await?.items {
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
    delete_outside::<Job>(&ctx.client, &ns, &lp, &dp).await?;
    delete_outside::<Secret>(&ctx.client, &ns, &lp, &dp).await?;
    ctx.metrics.forget_study(&ns, &name);
    ctx.event(
        &*study,
        false,
        "CleanedUp",
        "Delete",
        "deleted the study's trainer Jobs, certificates and keys in other namespaces".into(),
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
