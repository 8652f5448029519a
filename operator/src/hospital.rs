//! The hospital controller: `Ready` (its data claim exists and is bound) and the ε figures that the
//! Prometheus gauges export. The ledger itself is written by the study and round controllers
//! (see [`crate::ledger`]).

use std::sync::Arc;
use std::time::Duration;

use caduceus_crds::conditions::{status as cstatus, types};
use caduceus_crds::{HospitalClient, set_condition};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;

use crate::context::{Context, Error, Result};
use crate::ledger;

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
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let claim = &h.spec.data.claim_name;
    let phase = match pvcs.get_opt(claim).await? {
        Some(p) => Some(p.status.and_then(|s| s.phase).unwrap_or_else(|| "Pending".into())),
        None => None,
    };
    let (st, reason, msg) = readiness(claim, phase.as_deref());
    let api: Api<HospitalClient> = Api::namespaced(ctx.client.clone(), &ns);
    let updated = ledger::update_status(&api, &h.name_any(), |status, cur| {
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
            ctx.metrics
                .epsilon_spent
                .with_label_values(&[&ns, &h.name_any()])
                .set(e);
        }
        if let Some(e) = s.epsilon_remaining {
            ctx.metrics
                .epsilon_remaining
                .with_label_values(&[&ns, &h.name_any()])
                .set(e);
        }
    }
    Ok(Action::requeue(if st == cstatus::TRUE {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(10)
    }))
}

pub fn error_policy(_h: Arc<HospitalClient>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!("hospital reconcile failed: {err}");
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["hospital", err.kind()])
        .inc();
    Action::requeue(Duration::from_secs(10))
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
}
