//! The round controller: runs one `TrainingRound` — the aggregator Job in the study's namespace, one
//! trainer Job per participant in its own namespace — and records the result.
//!
//! `reconcile` is observe → step → apply: [`observe`] reads the round's world, the pure state
//! machine in [`machine`] decides the next status and the actions, [`apply`] carries them out
//! (the status with server-side apply under one field manager). The machine, its phases and its
//! guarantees are described in [`machine`].
//!
//! Results come back through Kubernetes' own channel: the aggregator writes a compact
//! `RoundOutcome` to its termination-message file, which the kubelet copies into the pod status.
//! No workload gets a `ServiceAccount` token or any RBAC. When the round ends, it is settled in each
//! participant's durable ledger (committed where the trainer started, cancelled where it never did),
//! then the status (metrics, `Succeeded`, `QuorumReached`, `FairnessWithinThreshold`) is written.
//!
//! Before anything is scheduled the round must prove that the study controller made it (owner
//! reference to the study's UID and the operator's signature, [`crate::signing`]); the study must
//! still have the consent hash the round was created under; and the round must be younger than its
//! operator-side deadline ([`crate::build::round_max_life_secs`]). Otherwise the round ends at once
//! (`NotCreatedByOperator`, `StudyChanged`, `DeadlineExceeded`). A trainer Job is created at most once
//! per hospital and round: a deleted or expired one is never re-created.

pub mod apply;
pub mod machine;
pub mod observe;

use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, status as cstatus, types};
use caduceus_crds::{FederatedStudy, TrainingRound, TrainingRoundStatus};
use caduceus_privacy::ledger::RoundKey;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use tracing::Instrument;

use crate::context::{Context, Error, Result};
use crate::{ledger, names, signing};
pub use observe::job_outcome;

/// Whether a round has ended (its `Succeeded` condition is True or False).
pub fn finished(status: Option<&TrainingRoundStatus>) -> Option<bool> {
    let c = status?.conditions.condition(types::SUCCEEDED)?;
    match c.status.as_str() {
        cstatus::TRUE => Some(true),
        cstatus::FALSE => Some(false),
        _ => None,
    }
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

/// The key of this round (and attempt) in its participants' ledgers.
pub fn ledger_key(round: &TrainingRound) -> RoundKey {
    ledger::round_key(
        &round.namespace().unwrap_or_default(),
        &round.spec.study,
        round.spec.study_uid.as_deref().unwrap_or_default(),
        round.spec.attempt,
        round.spec.round,
    )
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

/// Observes the round, steps the machine and applies what it decided.
///
/// # Errors
/// An API error or a ledger refusal; the controller retries after [`error_policy`]'s delay.
pub async fn reconcile(round: Arc<TrainingRound>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("round");
    let state = machine::RoundState::from_status(round.status.as_ref());
    let ns = round.namespace().unwrap_or_default();
    if state.phase().is_terminal() || round.metadata.deletion_timestamp.is_some() || !ctx.settings.serves(&ns)
    {
        return Ok(Action::await_change());
    }
    // One round is one trace: this reconcile's span is a child of the round's derived trace context,
    // the trace its aggregator and trainers continue from their TRACEPARENT. `caduceus.study` is the
    // study id the aggregator and trainers carry too (CADUCEUS_STUDY_ID).
    let span = tracing::info_span!(
        "reconcile round",
        caduceus.study = %names::study_id(&ns, &round.spec.study),
        caduceus.round = round.spec.round,
        caduceus.attempt = round.spec.attempt,
        caduceus.namespace = %ns,
        caduceus.phase = ?state.phase()
    );
    caduceus_startup::otel::continue_trace(&span, Some(&traceparent(&round, "operator")));
    reconcile_steps(round, &ctx, state).instrument(span).await
}

async fn reconcile_steps(
    round: Arc<TrainingRound>,
    ctx: &Context,
    mut state: machine::RoundState,
) -> Result<Action> {
    let (mut obs, world) = observe::observe(ctx, &round).await?;
    let mut applier = apply::Applier::new(ctx, &round, &world);
    let mut requeue = None;
    // A step that starts or asks for a settlement is followed by the next one at once (at most
    // three steps: Running → Settling → settle → result).
    for _ in 0..3 {
        let (next, actions) = machine::step(&state, &obs, Timestamp::now());
        let again = machine::steps_again(&state, &next, &actions);
        state = next;
        requeue = applier.apply(&state, &mut obs, actions).await?;
        if !again {
            break;
        }
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
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

    use super::observe::job_failure_message;
    use k8s_openapi::api::batch::v1::Job;
    use serde_json::json;

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
