//! The round controller: runs one `TrainingRound` — the aggregator Job in the study's namespace, one
//! trainer Job per participant in its own namespace — and records the result.
//!
//! Results come back through Kubernetes' own channel: the aggregator writes a compact
//! [`RoundOutcome`] to its termination-message file, which the kubelet copies into the pod status.
//! No workload gets a ServiceAccount token or any RBAC. When the aggregator Job ends, the round is
//! settled in each participant's durable ledger (committed where the trainer started, cancelled
//! where it never did), then the status (metrics, `Succeeded`, `QuorumReached`,
//! `FairnessWithinThreshold`) is written with server-side apply.
//!
//! Before anything is scheduled the round must prove that the study controller made it (owner
//! reference to the study's UID and the operator's signature, [`crate::signing`]); the study must
//! still have the consent hash the round was created under; and the round must be younger than its
//! operator-side deadline ([`build::round_max_life_secs`]). Otherwise the round ends at once
//! (`NotCreatedByOperator`, `StudyChanged`, `DeadlineExceeded`). A trainer Job is created at most once
//! per hospital and round: a deleted or expired one is never re-created.

use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::study::SecureAggregationMode;
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound, TrainingRoundStatus, set_condition};
use caduceus_fairness::{Outcome, RoundOutcome};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::build;
use crate::context::{Context, Error, Result};
use crate::ledger;
use crate::names;
use crate::plan;
use crate::secrets;
use crate::signing;

/// Whether a round has ended (its `Succeeded` condition is True or False).
pub fn finished(status: Option<&TrainingRoundStatus>) -> Option<bool> {
    let c = status?.conditions.condition(types::SUCCEEDED)?;
    match c.status.as_str() {
        cstatus::TRUE => Some(true),
        cstatus::FALSE => Some(false),
        _ => None,
    }
}

/// `Complete` / `Failed` of a Job, if it ended.
pub fn job_outcome(job: &Job) -> Option<bool> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    for c in conds {
        if c.status == "True" && c.type_ == "Complete" {
            return Some(true);
        }
        if c.status == "True" && c.type_ == "Failed" {
            return Some(false);
        }
    }
    None
}

fn job_failure_message(job: &Job) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "failed".into())
}

/// A W3C `traceparent` that makes every pod of the round part of one trace (ids derived from the
/// round's uid).
pub fn traceparent(round: &TrainingRound, span: &str) -> String {
    let uid = round.metadata.uid.clone().unwrap_or_default();
    format!(
        "00-{}-{}-01",
        names::short_hash(&format!("trace/{uid}"), 32),
        names::short_hash(&format!("span/{uid}/{span}"), 16)
    )
}

/// The termination messages of a Job's pods, newest last.
async fn termination_messages(ctx: &Context, ns: &str, job: &str) -> Result<Vec<(i32, String)>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await?
        .items;
    list.sort_by_key(|p| p.metadata.creation_timestamp.clone().map(|t| t.0));
    let mut out = Vec::new();
    for p in list {
        for cs in p.status.and_then(|s| s.container_statuses).unwrap_or_default() {
            if let Some(t) = cs.state.and_then(|s| s.terminated) {
                out.push((t.exit_code, t.message.unwrap_or_default()));
            }
        }
    }
    Ok(out)
}

struct Participant {
    reference: String,
    hospital: Option<HospitalClient>,
}

impl Participant {
    fn namespace_and_name(&self) -> (&str, &str) {
        self.reference
            .split_once('/')
            .unwrap_or(("", self.reference.as_str()))
    }
}

/// Why the operator refuses to run a round at all (pure): it is not one the study controller made.
pub fn refusal(round: &TrainingRound, study: &FederatedStudy, signing_key: &[u8]) -> Option<String> {
    let owned = round.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == study.metadata.uid.as_ref())
    });
    if !owned || round.spec.study_uid != study.metadata.uid {
        return Some(format!(
            "this round is not owned by FederatedStudy {} (uid {}): rounds are created only by the operator's study controller; nothing was scheduled",
            study.name_any(),
            study.metadata.uid.clone().unwrap_or_default()
        ));
    }
    if !signing::verify(signing_key, round) {
        return Some(
            "this round does not carry the operator's signature: rounds are created only by the study controller; nothing was scheduled (no certificate, key or Job)".into(),
        );
    }
    if study.spec.privacy.enabled && round.spec.privacy.is_none() {
        return Some(
            "the study uses DP-SGD but the round names no privacy mechanism; nothing was scheduled".into(),
        );
    }
    None
}

/// Ends a round without an outcome from its aggregator: records `reason`, deletes the aggregator Job
/// and settles each participant's ledger (trainers that started are committed, the others cancelled).
async fn abort(
    ctx: &Context,
    round: &TrainingRound,
    study: Option<&FederatedStudy>,
    status: &mut TrainingRoundStatus,
    reason: &str,
    msg: String,
) -> Result<Action> {
    let ns = round.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    match jobs
        .delete(
            &names::aggregator_job(&round.name_any()),
            &kube::api::DeleteParams::background(),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(study) = study {
        settle_all(ctx, round, study, status).await?;
    }
    let generation = round.metadata.generation;
    set_condition(
        &mut status.conditions,
        types::SUCCEEDED,
        cstatus::FALSE,
        reason,
        msg.clone(),
        generation,
    );
    status.completion_time = Some(Time(Timestamp::now()));
    write_status(ctx, round, status).await?;
    ctx.event(round, true, reason, "Abort", msg).await;
    if let Some(study) = study {
        ctx.metrics
            .rounds
            .with_label_values(&[&ns, &study.name_any(), "Failed"])
            .inc();
    }
    Ok(Action::await_change())
}

/// Settles every participant's ledger for the round and records ε after it in the status.
async fn settle_all(
    ctx: &Context,
    round: &TrainingRound,
    study: &FederatedStudy,
    status: &mut TrainingRoundStatus,
) -> Result<()> {
    let ns = round.namespace().unwrap_or_default();
    let uid = round.spec.study_uid.clone().unwrap_or_default();
    let key = ledger::round_key(&ns, &study.name_any(), &uid, round.spec.attempt, round.spec.round);
    let dp = round.spec.privacy.is_some();
    status.epsilon_spent.clear();
    for r in &round.spec.participants {
        let (hns, hname) = r.split_once('/').unwrap_or(("", r));
        let delta = Api::<HospitalClient>::namespaced(ctx.client.clone(), hns)
            .get_opt(hname)
            .await?
            .map(|h| h.spec.privacy_budget.delta)
            .unwrap_or(1e-5);
        let eps = ledger::settle(
            &ctx.client,
            &ctx.settings.operator_namespace,
            hns,
            hname,
            &key,
            dp,
            delta,
        )
        .await?;
        if dp && let Some(eps) = eps {
            let eps = (eps * 1e6).round() / 1e6;
            status.epsilon_spent.insert(r.clone(), eps);
            ctx.metrics
                .epsilon_spent
                .with_label_values(&[hns, hname])
                .set(eps);
        }
    }
    status.epsilon_spent_max = status.epsilon_spent.values().copied().reduce(f64::max);
    Ok(())
}

pub async fn reconcile(round: Arc<TrainingRound>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("round");
    if finished(round.status.as_ref()).is_some() || round.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = round.namespace().unwrap_or_default();
    let mut status = round.status.clone().unwrap_or_default();
    status.observed_generation = round.metadata.generation;
    if !ctx.settings.serves(&ns) {
        return Ok(Action::await_change());
    }
    let studies: Api<FederatedStudy> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(study) = studies.get_opt(&round.spec.study).await? else {
        let msg = format!(
            "FederatedStudy {ns}/{} does not exist: rounds are created only by the operator's study controller; nothing was scheduled",
            round.spec.study
        );
        return abort(&ctx, &round, None, &mut status, "NotCreatedByOperator", msg).await;
    };
    if study.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }

    // Read and check: a round the study controller did not make gets nothing.
    let key = ctx.signing_key().await?.to_vec();
    if let Some(msg) = refusal(&round, &study, &key) {
        return abort(&ctx, &round, None, &mut status, "NotCreatedByOperator", msg).await;
    }
    let privacy = round.spec.privacy.clone();
    let hash = ctx.settings.consent_hash(&study);
    if round.spec.consent_hash.as_deref() != Some(hash.as_str()) {
        let msg = format!(
            "the study's terms changed after this round started (consent hash {} is now {hash}): its hospitals consented to the old terms; no new trainer Job starts",
            round.spec.consent_hash.clone().unwrap_or_default()
        );
        return abort(&ctx, &round, Some(&study), &mut status, "StudyChanged", msg).await;
    }
    let created = round
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or_else(|| Timestamp::now().as_second());
    let max_life = build::round_max_life_secs(&study);
    if Timestamp::now().as_second() > created + max_life {
        let msg = format!(
            "the round did not end within {max_life} s of its creation (3 x rounds.deadlineSeconds + 600): its aggregator Job was deleted"
        );
        return abort(&ctx, &round, Some(&study), &mut status, "DeadlineExceeded", msg).await;
    }

    let mut participants = Vec::new();
    for r in &round.spec.participants {
        let (hns, hname) = r.split_once('/').unwrap_or(("", r));
        let api: Api<HospitalClient> = Api::namespaced(ctx.client.clone(), hns);
        participants.push(Participant {
            reference: r.clone(),
            hospital: api.get_opt(hname).await?,
        });
    }

    // Secrets: the CA, the aggregator's certificate, each hospital's certificate and key copy.
    let trust = secrets::ensure_ca(&ctx.client, &ctx.settings.operator_namespace, &study).await?;
    secrets::ensure_aggregator_tls(&ctx.client, &study, &trust).await?;
    let study_key = if study.spec.secure_aggregation.mode == SecureAggregationMode::Tfhe {
        Some(secrets::ensure_master_key(&ctx.client, &ctx.settings.operator_namespace, &study).await?)
    } else {
        None
    };

    // The endpoint (in loopback mode, the Service's node port).
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    // The Service is the study controller's; until it exists, wait.
    let Some(svc) = services.get_opt(&names::service(&study.name_any())).await? else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    let node_port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.node_port);
    let Some(ep) = build::endpoint(&study, &ctx.settings, node_port) else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };

    // The aggregator admits every participant of the round: one whose HospitalClient disappeared
    // simply does not report, and the quorum stays what the round says.
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let ids: Vec<String> = participants
        .iter()
        .map(|p| {
            let (hns, hname) = p.namespace_and_name();
            names::hospital_id(hns, hname)
        })
        .collect();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let agg_name = names::aggregator_job(&round.name_any());
    let agg = match jobs.get_opt(&agg_name).await? {
        Some(j) => j,
        None => {
            let want = build::aggregator_job(
                &study,
                &round,
                &ctx.settings,
                &ep,
                &ids,
                study_key.as_ref().map(|(_, fp)| fp.as_str()),
                Some(&traceparent(&round, "aggregator")),
            );
            let j = match jobs.create(&pp, &want).await {
                Ok(j) => j,
                Err(kube::Error::Api(e)) if e.code == 409 => jobs.get(&agg_name).await?,
                Err(e) => return Err(e.into()),
            };
            ctx.event(
                &*round,
                false,
                "AggregatorJobCreated",
                "CreateJob",
                format!("created aggregator Job {ns}/{agg_name}"),
            )
            .await;
            j
        }
    };

    // Trainer Jobs: at most one per hospital and round, ever (the durable ledger records each start).
    let lkey = ledger::round_key(
        &ns,
        &study.name_any(),
        round.spec.study_uid.as_deref().unwrap_or_default(),
        round.spec.attempt,
        round.spec.round,
    );
    let study_ref = format!("{ns}/{}", study.name_any());
    let (trainer_image, _) = ctx.settings.images(&study);
    let mut trainer_failures = Vec::new();
    let mut missing = Vec::new();
    for p in &participants {
        let Some(h) = &p.hospital else {
            missing.push(p.reference.clone());
            continue;
        };
        let hns = h.namespace().unwrap_or_default();
        let tjobs: Api<Job> = Api::namespaced(ctx.client.clone(), &hns);
        let tname = names::trainer_job(&ns, &round.name_any(), &h.name_any());
        // A trainer Job is created suspended, its start recorded in the durable ledger, then
        // resumed: a crash anywhere leaves either a suspended Job (resumed next time: it never ran)
        // or a recorded start, and a Job missing after a recorded start is never created again.
        let existing = tjobs.get_opt(&tname).await?;
        if let Some(job) = &existing
            && job.spec.as_ref().and_then(|s| s.suspend) != Some(true)
        {
            if job_outcome(job) == Some(false) {
                trainer_failures.push(format!("{} ({})", p.reference, job_failure_message(job)));
            }
            continue;
        }
        // Still allowed? The hospital may have withdrawn consent or narrowed its image list.
        if !h.spec.consents_to(&study_ref, &hash)
            || !h
                .spec
                .allows_trainer_image(trainer_image, &ctx.settings.trainer_image)
            || h.metadata.deletion_timestamp.is_some()
        {
            trainer_failures.push(format!(
                "{} (no longer consents to these terms or allows this trainer image: its trainer was not started)",
                p.reference
            ));
            continue;
        }
        if existing.is_none() {
            let started = ledger::load(&ctx.client, &ctx.settings.operator_namespace, &hns, &h.name_any())
                .await?
                .is_some_and(|d| d.started.contains(&lkey));
            if started {
                trainer_failures.push(format!(
                    "{} (its trainer Job is gone and is never created twice for one round)",
                    p.reference
                ));
                continue;
            }
            secrets::ensure_hospital_tls(&ctx.client, &study, &trust, &hns, &h.name_any()).await?;
            if let Some((bytes, _)) = &study_key {
                secrets::ensure_hospital_key(&ctx.client, &study, &hns, &h.name_any(), bytes).await?;
            }
            secrets::ensure_trainer_service_account(&ctx.client, &hns).await?;
            let want = build::trainer_job(
                &study,
                &round,
                h,
                &ctx.settings,
                &ep,
                privacy.as_ref(),
                Some(&traceparent(&round, &p.reference)),
            );
            match tjobs.create(&pp, &want).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Record the start (a DP trainer needs its reservation), then let the Job run.
        ledger::mark_started(
            &ctx.client,
            &ctx.settings.operator_namespace,
            &hns,
            &h.name_any(),
            &lkey,
            privacy.is_some(),
        )
        .await?;
        tjobs
            .patch(
                &tname,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"suspend": false}})),
            )
            .await?;
        ctx.event(
            &*round,
            false,
            "TrainerJobCreated",
            "CreateJob",
            format!("started trainer Job {hns}/{tname} for {}", p.reference),
        )
        .await;
    }

    if status.start_time.is_none() {
        status.start_time = Some(Time(Timestamp::now()));
    }
    let n = round.spec.participants.len();

    let Some(ok) = job_outcome(&agg) else {
        let mut msg = if trainer_failures.is_empty() {
            format!("aggregator and {} trainer Jobs running", n - missing.len())
        } else {
            format!("running; trainer Jobs failed: {}", trainer_failures.join("; "))
        };
        if !missing.is_empty() {
            msg.push_str(&format!("; HospitalClient gone: {}", missing.join(", ")));
        }
        let changed = set_condition(
            &mut status.conditions,
            types::SUCCEEDED,
            cstatus::UNKNOWN,
            "Running",
            msg,
            round.metadata.generation,
        );
        if changed {
            for f in &trainer_failures {
                ctx.event(
                    &*round,
                    true,
                    "TrainerFailed",
                    "ObserveJob",
                    format!("trainer Job failed: {f}"),
                )
                .await;
            }
            write_status(&ctx, &round, &status).await?;
        }
        // Come back at the round's deadline at the latest.
        let left = (created + max_life - Timestamp::now().as_second()).max(1) as u64;
        return Ok(Action::requeue(ctx.poll.min(Duration::from_secs(left))));
    };

    // The aggregator ended: read its outcome.
    let messages = termination_messages(&ctx, &ns, &agg_name).await?;
    let outcome = messages
        .iter()
        .rev()
        .find_map(|(_, m)| RoundOutcome::parse(m).ok());

    // Settle the round in every participant's ledger (reserved before the Jobs existed); the status
    // then carries each participant's ε after this round.
    settle_all(&ctx, &round, &study, &mut status).await?;

    let generation = round.metadata.generation;
    let study_ns = ns.clone();
    let study_name = study.name_any();
    let outcome_label;
    match (&outcome, ok) {
        (Some(o), true) if o.status == "succeeded" => {
            let reported: Vec<String> = round
                .spec
                .participants
                .iter()
                .filter(|r| {
                    let (hns, hname) = r.split_once('/').unwrap_or(("", r));
                    o.participants.contains(&names::hospital_id(hns, hname))
                })
                .cloned()
                .collect();
            status.participation = Some(format!("{}/{}", reported.len(), n));
            status.reported = reported;
            status.accuracy = o.accuracy.map(round4);
            status.loss = o.loss.map(round4);
            status.demographic_parity_difference = o.max_gap(|g| g.demographic_parity_difference).map(round4);
            status.equalized_odds_difference = o.max_gap(|g| g.equalized_odds_difference).map(round4);
            status.worst_group_accuracy = o
                .attributes
                .values()
                .filter_map(|g| g.worst_group_accuracy)
                .reduce(f64::min)
                .map(round4);
            set_condition(
                &mut status.conditions,
                types::QUORUM_REACHED,
                cstatus::TRUE,
                "QuorumReached",
                format!(
                    "{} of {n} hospitals' updates aggregated (quorum {})",
                    o.participants.len(),
                    round.spec.min_participants
                ),
                generation,
            );
            let v = plan::round_verdict(&study.spec.fairness, o);
            set_condition(
                &mut status.conditions,
                types::FAIRNESS_WITHIN_THRESHOLD,
                v.outcome.condition_status(),
                &v.reason,
                v.message.clone(),
                generation,
            );
            let mut msg = format!(
                "round {} aggregated {} of {n} hospitals; accuracy {}",
                round.spec.round,
                o.participants.len(),
                o.accuracy
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "n/a".into())
            );
            if !trainer_failures.is_empty() {
                msg.push_str(&format!("; trainer Jobs failed: {}", trainer_failures.join("; ")));
            }
            set_condition(
                &mut status.conditions,
                types::SUCCEEDED,
                cstatus::TRUE,
                "Succeeded",
                msg.clone(),
                generation,
            );
            ctx.event(&*round, false, "RoundSucceeded", "Aggregate", msg)
                .await;
            if v.outcome == Outcome::Fail {
                ctx.event(&*round, true, "FairnessViolated", "Evaluate", v.message.clone())
                    .await;
            }
            ctx.metrics
                .participants
                .with_label_values(&[&study_ns, &study_name])
                .set(o.participants.len() as f64);
            if let Some(a) = o.accuracy {
                ctx.metrics
                    .accuracy
                    .with_label_values(&[&study_ns, &study_name])
                    .set(a);
            }
            if let Some(a) = status.worst_group_accuracy {
                ctx.metrics
                    .worst_group_accuracy
                    .with_label_values(&[&study_ns, &study_name])
                    .set(a);
            }
            let f = &study.spec.fairness;
            for (metric, threshold) in [
                (
                    "demographic_parity_difference",
                    f.max_demographic_parity_difference,
                ),
                ("equalized_odds_difference", f.max_equalized_odds_difference),
            ] {
                ctx.metrics
                    .fairness_threshold
                    .with_label_values(&[&study_ns, &study_name, metric])
                    .set(threshold);
            }
            if let Some(g) = status.equalized_odds_difference {
                ctx.metrics
                    .fairness_gap
                    .with_label_values(&[&study_ns, &study_name, "equalized_odds_difference"])
                    .set(g);
            }
            if let Some(g) = status.demographic_parity_difference {
                ctx.metrics
                    .fairness_gap
                    .with_label_values(&[&study_ns, &study_name, "demographic_parity_difference"])
                    .set(g);
            }
            outcome_label = "Succeeded";
        }
        _ => {
            let (reason, msg) = match &outcome {
                Some(o) if o.message.contains("quorum") => ("QuorumNotReached", o.message.clone()),
                Some(o) => ("AggregatorFailed", o.message.clone()),
                None => (
                    "AggregatorFailed",
                    format!(
                        "aggregator Job {agg_name} {}; no outcome in its termination message",
                        job_failure_message(&agg)
                    ),
                ),
            };
            let msg = if trainer_failures.is_empty() {
                msg
            } else {
                format!("{msg}; trainer Jobs failed: {}", trainer_failures.join("; "))
            };
            if reason == "QuorumNotReached" {
                set_condition(
                    &mut status.conditions,
                    types::QUORUM_REACHED,
                    cstatus::FALSE,
                    reason,
                    msg.clone(),
                    generation,
                );
            }
            set_condition(
                &mut status.conditions,
                types::SUCCEEDED,
                cstatus::FALSE,
                reason,
                msg.clone(),
                generation,
            );
            ctx.event(&*round, true, reason, "Aggregate", msg).await;
            outcome_label = "Failed";
        }
    }
    status.completion_time = Some(Time(Timestamp::now()));
    write_status(&ctx, &round, &status).await?;
    ctx.metrics
        .rounds
        .with_label_values(&[&study_ns, &study_name, outcome_label])
        .inc();
    Ok(Action::await_change())
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

async fn write_status(ctx: &Context, round: &TrainingRound, status: &TrainingRoundStatus) -> Result<()> {
    let api: Api<TrainingRound> = Api::namespaced(ctx.client.clone(), &round.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": TrainingRound::api_version(&()),
        "kind": TrainingRound::kind(&()),
        "status": status,
    });
    api.patch_status(
        &round.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub fn error_policy(_round: Arc<TrainingRound>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!("round reconcile failed: {err}");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["round", err.kind()])
        .inc();
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_outcomes() {
        let mut j: Job = serde_json::from_value(json!({"metadata": {"name": "x"}, "status": {"conditions": [
            {"type": "FailureTarget", "status": "True"}]}}))
        .unwrap();
        assert_eq!(job_outcome(&j), None);
        j.status.as_mut().unwrap().conditions.as_mut().unwrap().push(
            serde_json::from_value(json!({"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit 1"})).unwrap(),
        );
        assert_eq!(job_outcome(&j), Some(false));
        assert_eq!(job_failure_message(&j), "PodFailurePolicy: exit 1");
    }

    #[test]
    fn traceparent_is_w3c_shaped_and_shared_by_the_round() {
        let mut r = TrainingRound::new(
            "x",
            serde_json::from_value(
                json!({"study": "s", "round": 0, "participants": ["a/b"], "minParticipants": 1}),
            )
            .unwrap(),
        );
        r.metadata.uid = Some("u".into());
        let a = traceparent(&r, "aggregator");
        let b = traceparent(&r, "a/b");
        assert_eq!(a.len(), 55);
        assert_eq!(a[3..35], b[3..35], "one trace per round");
        assert_ne!(a[36..52], b[36..52], "one span per pod");
    }
}
