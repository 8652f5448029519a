//! The study controller: runs a `FederatedStudy` round after round. Its pure core is
//! [`machine`] (what happens next, `Ready`, the summary); [`admission`] decides who takes part,
//! [`start`] starts a round, [`cleanup`] is the finalizer.
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

pub mod admission;
pub mod cleanup;
pub mod machine;
pub mod start;

use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::{FederatedStudy, FederatedStudyStatus, HospitalClient, TrainingRound, set_condition};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::build;
use crate::context::{Context, Error, Result};
use crate::names;
use crate::plan::{self};
use crate::round::finished;
use crate::secrets;
use crate::signing;

pub use admission::Decision;
pub use machine::{Next, next_step};

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
            Finalizer::Cleanup(s) => cleanup::cleanup(s, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

/// The studies a hospital consents to (`consentedStudies` entries `namespace/name[@hash]`): a change
/// of the hospital wakes them at once instead of at their next poll.
pub fn studies_consented_by(h: &HospitalClient) -> Vec<kube::runtime::reflector::ObjectRef<FederatedStudy>> {
    h.spec
        .consented_studies
        .iter()
        .filter_map(|c| {
            let study = c.split_once('@').map_or(c.as_str(), |(s, _)| s);
            let (ns, name) = study.split_once('/')?;
            (!ns.is_empty() && !name.is_empty())
                .then(|| kube::runtime::reflector::ObjectRef::new(name).within(ns))
        })
        .collect()
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

/// Sets `Ready=False` with `reason` and publishes a warning when it changed.
pub(crate) async fn mark_not_ready(
    ctx: &Context,
    study: &FederatedStudy,
    status: &mut FederatedStudyStatus,
    reason: &str,
    msg: String,
    action: &str,
) {
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
}

/// [`mark_not_ready`], then writes the status.
async fn not_ready(
    ctx: &Context,
    study: &FederatedStudy,
    status: &mut FederatedStudyStatus,
    reason: &str,
    msg: String,
    action: &str,
) -> Result<()> {
    mark_not_ready(ctx, study, status, reason, msg, action).await;
    write_status(ctx, study, status).await
}

async fn apply(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let generation = study.metadata.generation;
    let mut status = study.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    ctx.metrics.init_study(&ns, &name);

    // Validate.
    // (A namespace the operator does not serve never gets here: `reconcile` leaves it alone.)
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
    ensure_study_objects(&ctx, &study).await?;

    // Rounds: only those this controller made (signed, for this study's UID).
    let key = ctx.signing_key().await?.to_vec();
    let rounds = rounds_of(&ctx, &study, &key).await?;
    let view: Vec<machine::RoundView> = rounds.iter().map(machine::RoundView::of).collect();
    machine::summarise(&study, &rounds, &mut status);

    // Hospitals: admission, and revocation of those that left.
    let decisions = admission::decide(&ctx, &study, &selector, &hash, status.privacy_plan.as_ref()).await?;
    admission::record_admissions(&ctx, &study, &hash, &decisions, &mut status).await?;
    revoke_departed(&ctx, &study, &hash, &decisions, &rounds).await?;

    // For the stalled-round alert: when the running round (if any) was created.
    let running_since = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()).is_none())
        .filter_map(|r| r.metadata.creation_timestamp.as_ref())
        .map(|t| t.0.as_second() as f64)
        .reduce(f64::min);
    let started_gauge = ctx.metrics.round_started.with_label_values(&[&ns, &name]);
    started_gauge.set(running_since.unwrap_or(0.0));
    let next = next_step(study.spec.rounds.total, study.spec.rounds.max_retries, &view);
    if let Some(r) = machine::ready(&next, study.spec.rounds.total) {
        let changed = set_condition(
            &mut status.conditions,
            types::READY,
            r.status,
            r.reason,
            r.message.clone(),
            generation,
        );
        if changed && let Some((warning, action)) = r.event {
            ctx.event(&*study, warning, r.reason, action, r.message).await;
        }
    }
    let action = match next {
        Next::Running(_) => Action::requeue(ctx.poll * 4),
        Next::Completed | Next::Failed(_) => Action::await_change(),
        Next::Start { round, attempt } => {
            let started = start::RoundStart {
                study: &study,
                hash: &hash,
                signing_key: &key,
                round,
                attempt,
            };
            let action = start::start_round(&ctx, &started, &mut status, &decisions).await?;
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

/// The aggregator's ServiceAccount and Service (server-side apply), the study CA and the
/// aggregator's certificate: what every round needs.
async fn ensure_study_objects(ctx: &Context, study: &FederatedStudy) -> Result<()> {
    let ns = study.namespace().unwrap_or_default();
    let ssa = PatchParams::apply(crate::FIELD_MANAGER).force();
    let sa = build::aggregator_service_account(study);
    let mut sa_owned = sa.clone();
    sa_owned.metadata.owner_references = Some(vec![build::controller_ref(study)]);
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns)
        .patch(&sa_owned.name_any(), &ssa, &Patch::Apply(&sa_owned))
        .await?;
    let svc = build::aggregator_service(study, &ctx.settings);
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&svc.name_any(), &ssa, &Patch::Apply(&svc))
        .await?;
    let trust = secrets::ensure_ca(&ctx.client, &ctx.settings.operator_namespace, study).await?;
    if secrets::ensure_aggregator_tls(&ctx.client, study, &trust).await? {
        ctx.event(
            study,
            false,
            "CertificateIssued",
            "IssueCertificate",
            "issued the aggregator's server certificate".into(),
        )
        .await;
    }

    Ok(())
}

/// Revokes the certificates and key copies of hospitals that left the study (neither a member now
/// nor a participant of a running round).
async fn revoke_departed(
    ctx: &Context,
    study: &FederatedStudy,
    hash: &str,
    decisions: &[Decision],
    rounds: &[TrainingRound],
) -> Result<()> {
    let members: Vec<&String> = decisions
        .iter()
        .filter(|d| d.candidate.selected && d.candidate.consent == plan::Consent::Hash(hash.to_string()))
        .map(|d| &d.candidate.reference)
        .collect();
    let running_participants: Vec<String> = rounds
        .iter()
        .filter(|r| finished(r.status.as_ref()).is_none())
        .flat_map(|r| r.spec.participants.clone())
        .collect();
    let hospital_namespaces = ctx.settings.watch_namespaces.clone();
    for holder in secrets::hospitals_with_secrets(&ctx.client, study, hospital_namespaces.as_ref()).await? {
        if !members.contains(&&holder) && !running_participants.contains(&holder) {
            let (hns, h) = holder.split_once('/').unwrap_or(("", &holder));
            if secrets::revoke_hospital(&ctx.client, study, hns, h).await? {
                ctx.event(
                    study,
                    false,
                    "CertificateRevoked",
                    "Revoke",
                    format!("{holder} left the study: its certificate and key Secrets were deleted"),
                )
                .await;
            }
        }
    }

    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hospital_wakes_the_studies_it_consents_to() {
        let mut h: HospitalClient = serde_yaml::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../examples/hospital-minimal.yaml"
            ))
            .unwrap(),
        )
        .unwrap();
        h.spec.consented_studies = vec!["s1/faces".into(), "s2/other@0123".into(), "broken".into()];
        let refs: Vec<(String, Option<String>)> = studies_consented_by(&h)
            .into_iter()
            .map(|r| (r.name, r.namespace))
            .collect();
        assert_eq!(
            refs,
            vec![
                ("faces".to_string(), Some("s1".to_string())),
                ("other".to_string(), Some("s2".to_string()))
            ]
        );
    }
}
