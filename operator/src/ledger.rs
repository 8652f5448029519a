//! The privacy ledger in `HospitalClient` status: every write is a read-modify-replace guarded by
//! `resourceVersion` (retried on conflict), so two studies charging one hospital at once never lose
//! a record. Spending is reserved before any trainer Job of the round exists and committed when the
//! round ends; a crash in between leaves the reservation counted (over-counts, never under-counts).

use caduceus_crds::conditions::{status as cstatus, types};
use caduceus_crds::hospital::HospitalClientStatus;
use caduceus_crds::{HospitalClient, set_condition};
use caduceus_privacy::ledger::{LedgerError, PrivacyBudget, PrivacyLedger, ReserveOutcome, RoundKey};
use caduceus_privacy::{AccountantKind, SubsampledGaussian};
use kube::api::{Api, PostParams};

use crate::context::{Error, Result};

/// The ledger key of one attempt of one round of a study: a retried attempt releases a new, freshly
/// noised update, so it is a new key; a retried reconcile of the same attempt is the same key.
pub fn round_key(study_namespace: &str, study: &str, attempt: u32, round: u32) -> RoundKey {
    RoundKey::new(format!("{study_namespace}/{study}#{attempt}"), round as u64)
}

/// ε spent (PLD, at the budget's δ) and remaining, written next to the ledger.
pub fn refresh_figures(status: &mut HospitalClientStatus, h: &HospitalClient) {
    let ledger = status.ledger.clone().unwrap_or_default();
    if let Ok(eps) = ledger.epsilon(h.spec.privacy_budget.delta, AccountantKind::Pld) {
        status.epsilon_spent = Some(round6(eps));
        status.epsilon_remaining = Some(round6((h.spec.privacy_budget.epsilon - eps).max(0.0)));
    }
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

/// Applies `f` to the hospital's status and writes it back with optimistic concurrency. `f` returns
/// whether it changed anything (nothing is written otherwise).
pub async fn update_status<F>(api: &Api<HospitalClient>, name: &str, mut f: F) -> Result<HospitalClient>
where
    F: FnMut(&mut HospitalClientStatus, &HospitalClient) -> Result<bool>,
{
    let mut last_conflict = None;
    for _ in 0..8 {
        let mut h = api.get_status(name).await?;
        let mut status = h.status.clone().unwrap_or_default();
        if !f(&mut status, &h)? {
            return Ok(h);
        }
        refresh_figures(&mut status, &h);
        h.status = Some(status);
        let pp = PostParams {
            field_manager: Some(crate::FIELD_MANAGER.into()),
            ..Default::default()
        };
        match api.replace_status(name, &pp, &h).await {
            Ok(h) => return Ok(h),
            Err(kube::Error::Api(e)) if e.code == 409 => last_conflict = Some(e.message.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Other(format!(
        "HospitalClient {name}: status kept changing under us ({})",
        last_conflict.unwrap_or_default()
    )))
}

/// Reserves a round's spending in the hospital's ledger (idempotent). `Ok(Err(..))` when the budget
/// refuses it; then `PrivacyBudgetExhausted=True` is set with the figures.
pub async fn reserve(
    api: &Api<HospitalClient>,
    hospital: &str,
    key: &RoundKey,
    mechanism: &SubsampledGaussian,
    accountant: AccountantKind,
) -> Result<std::result::Result<(), String>> {
    let mut refused = None;
    update_status(api, hospital, |status, h| {
        let mut ledger = status.ledger.clone().unwrap_or_default();
        let budget = PrivacyBudget::new(
            h.spec.privacy_budget.epsilon,
            h.spec.privacy_budget.delta,
            accountant,
        )
        .map_err(|e| Error::Ledger {
            hospital: hospital.into(),
            message: e.to_string(),
        })?;
        match ledger.reserve(key.clone(), std::slice::from_ref(mechanism), &budget) {
            Ok(ReserveOutcome::Reserved { .. }) => {
                status.ledger = Some(ledger);
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e @ LedgerError::BudgetExceeded { .. }) => {
                let msg = e.to_string();
                refused = Some(msg.clone());
                Ok(set_condition(
                    &mut status.conditions,
                    types::PRIVACY_BUDGET_EXHAUSTED,
                    cstatus::TRUE,
                    "BudgetExceeded",
                    msg,
                    h.metadata.generation,
                ))
            }
            Err(e) => Err(Error::Ledger {
                hospital: hospital.into(),
                message: e.to_string(),
            }),
        }
    })
    .await?;
    Ok(match refused {
        Some(m) => Err(m),
        None => Ok(()),
    })
}

/// Commits a reserved round (idempotent; a round never reserved is left alone). Returns the ε spent
/// afterwards, as written next to the ledger.
pub async fn commit(api: &Api<HospitalClient>, hospital: &str, key: &RoundKey) -> Result<Option<f64>> {
    let h = update_status(api, hospital, |status, _| {
        let mut ledger: PrivacyLedger = status.ledger.clone().unwrap_or_default();
        match ledger.commit(key, None) {
            Ok(caduceus_privacy::ledger::CommitOutcome::Committed { .. }) => {
                status.ledger = Some(ledger);
                Ok(true)
            }
            Ok(_) | Err(LedgerError::NotReserved { .. }) => Ok(false),
            Err(e) => Err(Error::Ledger {
                hospital: hospital.into(),
                message: e.to_string(),
            }),
        }
    })
    .await?;
    Ok(h.status.and_then(|s| s.epsilon_spent))
}

/// Sets or clears `PrivacyBudgetExhausted` (with the figures in the message).
pub async fn set_budget_condition(
    api: &Api<HospitalClient>,
    hospital: &str,
    exhausted: bool,
    reason: &str,
    message: &str,
) -> Result<()> {
    update_status(api, hospital, |status, h| {
        Ok(set_condition(
            &mut status.conditions,
            types::PRIVACY_BUDGET_EXHAUSTED,
            if exhausted { cstatus::TRUE } else { cstatus::FALSE },
            reason,
            message.to_string(),
            h.metadata.generation,
        ))
    })
    .await?;
    Ok(())
}
