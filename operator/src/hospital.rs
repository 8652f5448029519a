//! The hospital controller: `Ready` (its data claim exists and is bound), the ε figures that the
//! Prometheus gauges export, the durable ledger's mirror (restored into a re-created HospitalClient),
//! and a finalizer that refuses to delete a hospital whose ledger is not empty unless it is annotated
//! `fl.caduceus.dev/forget-privacy-ledger: "true"`. The ledger itself is written by the study and
//! round controllers (see [`crate::ledger`]).

use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{status as cstatus, types};
use caduceus_crds::{HospitalClient, set_condition};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};

use crate::context::{Context, Error, Result};
use crate::ledger;
use crate::names;

/// `Ready` from the data claim's phase (pure).
pub fn readiness(claim: &str, phase: Option<&str>) -> (&'static str, &'static str, String) {
    match phase {
        None => (
            cstatus::FALSE,
            "DataClaimNotFound",
            format!("PersistentVolumeClaim {claim} does not exist"),
        ),
        Some("Bound") => (
            cstatus::TRUE,
            "DataClaimBound",
            format!("PersistentVolumeClaim {claim} is bound"),
        ),
        Some(p) => (
            cstatus::FALSE,
            "DataClaimNotBound",
            format!("PersistentVolumeClaim {claim} is {p}"),
        ),
    }
}

pub async fn reconcile(h: Arc<HospitalClient>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("hospital");
    let ns = h.namespace().unwrap_or_default();
    // A namespace this operator does not serve may be another operator's: leave it alone (no
    // finalizer, no ledger, no status).
    if !ctx.settings.serves(&ns) {
        return Ok(Action::await_change());
    }
    let api: Api<HospitalClient> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, crate::HOSPITAL_FINALIZER, h, |event| async {
        match event {
            Finalizer::Apply(h) => apply(h, ctx.clone()).await,
            Finalizer::Cleanup(h) => cleanup(h, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    })
}

async fn apply(h: Arc<HospitalClient>, ctx: Arc<Context>) -> Result<Action> {
    let ns = h.namespace().unwrap_or_default();
    let name = h.name_any();
    let api: Api<HospitalClient> = Api::namespaced(ctx.client.clone(), &ns);
    // (A namespace the operator does not serve never gets here: `reconcile` leaves it alone.)
    let claim = &h.spec.data.claim_name;
    let (st, reason, msg) = if crate::gateway::mirror::is_mirror(&h) {
        // A coordinator's copy of a site: its data is in the site's cluster; the site says.
        crate::gateway::mirror::readiness(&h)
    } else {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        let phase = match pvcs.get_opt(claim).await? {
            Some(p) => Some(p.status.and_then(|s| s.phase).unwrap_or_else(|| "Pending".into())),
            None => None,
        };
        readiness(claim, phase.as_deref())
    };
    // The durable ledger exists for every hospital (seeded from an older status mirror once), and
    // its mirror is restored into a re-created HospitalClient.
    let opns = ctx.settings.operator_namespace.clone();
    let dl = ledger::update(&ctx.client, &opns, &ns, &name, |_| Ok(false)).await?;
    ledger::mirror(&api, &ns, &name, &opns, &dl).await?;
    let updated = ledger::update_status(&api, &name, |status, cur| {
        let before = (
            status.epsilon_spent,
            status.epsilon_remaining,
            status.observed_generation,
        );
        let mut changed = set_condition(
            &mut status.conditions,
            types::READY,
            st,
            reason,
            msg.clone(),
            cur.metadata.generation,
        );
        if status
            .conditions
            .iter()
            .any(|c| c.type_ == types::DELETION_BLOCKED)
        {
            status.conditions.retain(|c| c.type_ != types::DELETION_BLOCKED);
            changed = true;
        }
        status.observed_generation = cur.metadata.generation;
        ledger::refresh_figures(status, cur);
        changed |= before
            != (
                status.epsilon_spent,
                status.epsilon_remaining,
                status.observed_generation,
            );
        Ok(changed)
    })
    .await?;
    if let Some(s) = updated.status {
        if let Some(e) = s.epsilon_spent {
            ctx.metrics.epsilon_spent.with_label_values(&[&ns, &name]).set(e);
        }
        if let Some(e) = s.epsilon_remaining {
            ctx.metrics
                .epsilon_remaining
                .with_label_values(&[&ns, &name])
                .set(e);
        }
    }
    Ok(Action::requeue(if st == cstatus::TRUE {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(10)
    }))
}

/// Whether deleting a hospital with this ledger must wait (pure).
pub fn deletion_refused(ledger_empty: bool, forget_annotation: Option<&str>) -> bool {
    !ledger_empty && forget_annotation != Some("true")
}

/// A HospitalClient is deleted only with an empty ledger, or when its owner annotates it with
/// `fl.caduceus.dev/forget-privacy-ledger: "true"` (then the durable ledger is deleted too).
async fn cleanup(h: Arc<HospitalClient>, ctx: Arc<Context>) -> Result<Action> {
    let ns = h.namespace().unwrap_or_default();
    let name = h.name_any();
    let opns = ctx.settings.operator_namespace.clone();
    let durable = ledger::load(&ctx.client, &opns, &ns, &name).await?;
    let mirror_empty = h
        .status
        .as_ref()
        .and_then(|s| s.ledger.as_ref())
        .is_none_or(|l| l.committed.is_empty() && l.reserved.is_empty());
    let empty = durable.as_ref().is_none_or(|d| d.is_empty()) && mirror_empty;
    let forget = h
        .annotations()
        .get(names::ANNOTATION_FORGET_LEDGER)
        .map(String::as_str);
    if deletion_refused(empty, forget) {
        // Keep what was spent, whatever happens to this object.
        ledger::update(&ctx.client, &opns, &ns, &name, |_| Ok(false)).await?;
        let msg = format!(
            "this hospital's privacy ledger is not empty, so deleting it is refused: a re-created HospitalClient would start again from epsilon 0. The ledger is kept in ConfigMap {opns}/{} either way; to delete the hospital and forget its ledger, annotate it with {}=\"true\"",
            ledger::configmap_name(&ns, &name),
            names::ANNOTATION_FORGET_LEDGER
        );
        let api: Api<HospitalClient> = Api::namespaced(ctx.client.clone(), &ns);
        let changed = ledger::update_status(&api, &name, |status, cur| {
            Ok(set_condition(
                &mut status.conditions,
                types::DELETION_BLOCKED,
                cstatus::TRUE,
                "LedgerNotEmpty",
                msg.clone(),
                cur.metadata.generation,
            ))
        })
        .await;
        if changed.is_ok() {
            ctx.event(&*h, true, "DeletionBlocked", "Delete", msg.clone())
                .await;
        }
        return Err(Error::DeletionRefused(msg));
    }
    if forget == Some("true") {
        ledger::forget(&ctx.client, &opns, &ns, &name).await?;
        ctx.event(
            &*h,
            true,
            "PrivacyLedgerForgotten",
            "Delete",
            format!(
                "deleted with {}: its privacy ledger was deleted too",
                names::ANNOTATION_FORGET_LEDGER
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

pub fn error_policy(_h: Arc<HospitalClient>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!("hospital reconcile failed: {err}");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["hospital", err.kind()])
        .inc();
    match err {
        Error::DeletionRefused(_) => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(Duration::from_secs(10)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_claim() {
        assert_eq!(readiness("d", Some("Bound")).0, cstatus::TRUE);
        assert_eq!(readiness("d", Some("Pending")).1, "DataClaimNotBound");
        assert!(readiness("d", None).2.contains("does not exist"));
    }

    #[test]
    fn a_hospital_with_a_ledger_is_deleted_only_when_told_to_forget_it() {
        assert!(!deletion_refused(true, None));
        assert!(deletion_refused(false, None));
        assert!(deletion_refused(false, Some("yes")));
        assert!(!deletion_refused(false, Some("true")));
    }
}
