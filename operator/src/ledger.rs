//! The privacy ledger of each hospital, kept durably in a ConfigMap of the operator's own namespace
//! (`ledger-<hospital id>`, with a finalizer and no owner), so it outlives the `HospitalClient`: an
//! Argo CD prune, a Helm or Terraform reinstall or a restore without status re-creates the hospital
//! with its ledger restored. `HospitalClient.status.ledger` is a mirror for `kubectl`; the ConfigMap
//! is authoritative. A hospital is the same hospital across re-creation when its namespace and name
//! are (its data is).
//!
//! Every write is a read-modify-replace guarded by `resourceVersion` (retried on conflict), so two
//! studies charging one hospital at once never lose a record. The order of a round:
//! 1. [`reserve`] before the round (and so any trainer Job) exists: the spending counts from then on;
//! 2. the trainer Job is created suspended, [`mark_started`] records the start, then the Job is
//!    resumed: a key that was started once never gets a second trainer Job (a deleted or expired
//!    Job is not re-created, which would release a second, freshly noised update under the same
//!    key), while a crash between creation and resumption only leaves a suspended Job that never ran;
//! 3. [`settle`] when the round ends: a started key is committed (an error if it was never reserved),
//!    a key that never started is cancelled.
//!
//! A crash anywhere in between over-counts, never under-counts.

use std::collections::BTreeMap;

use caduceus_crds::conditions::{status as cstatus, types};
use caduceus_crds::hospital::HospitalClientStatus;
use caduceus_crds::{HospitalClient, set_condition};
use caduceus_privacy::ledger::{
    CommitOutcome, LedgerError, PrivacyBudget, PrivacyLedger, ReserveOutcome, RoundKey, RoundStatus,
};
use caduceus_privacy::{AccountantKind, SubsampledGaussian};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::context::{Error, Result};
use crate::names;

/// The finalizer of a ledger ConfigMap: only the operator removes it, when a hospital's ledger is
/// explicitly forgotten.
pub const LEDGER_FINALIZER: &str = "fl.caduceus.dev/privacy-ledger";
/// The ConfigMap key that holds the [`DurableLedger`] as JSON.
pub const LEDGER_KEY: &str = "ledger.json";
/// The component label of ledger ConfigMaps.
pub const LEDGER_COMPONENT: &str = "privacy-ledger";

/// The ledger key of one attempt of one round of a study. Keyed by the study's UID: a deleted and
/// re-created study of the same name is another study, whose rounds charge again. A retried
/// attempt releases a new, freshly noised update, so it is a new key.
pub fn round_key(study_namespace: &str, study: &str, study_uid: &str, attempt: u32, round: u32) -> RoundKey {
    RoundKey::new(
        format!("{study_namespace}/{study}@{study_uid}#{attempt}"),
        round as u64,
    )
}

/// What the ledger ConfigMap holds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DurableLedger {
    /// `namespace/name` of the hospital.
    pub hospital: String,
    #[serde(default)]
    pub ledger: PrivacyLedger,
    /// Keys whose trainer Job was created and whose round has not been settled yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub started: Vec<RoundKey>,
}

impl DurableLedger {
    /// Whether nothing was ever spent or reserved.
    pub fn is_empty(&self) -> bool {
        self.ledger.committed.is_empty() && self.ledger.reserved.is_empty() && self.started.is_empty()
    }
}

/// The ConfigMap name of a hospital's ledger.
pub fn configmap_name(hospital_ns: &str, hospital: &str) -> String {
    format!("ledger-{}", names::hospital_id(hospital_ns, hospital))
}

fn parse(cm: &ConfigMap) -> Result<DurableLedger> {
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(LEDGER_KEY))
        .ok_or_else(|| Error::Ledger {
            hospital: cm.name_any(),
            message: format!("ConfigMap {} has no {LEDGER_KEY}", cm.name_any()),
        })?;
    serde_json::from_str(text).map_err(|e| Error::Ledger {
        hospital: cm.name_any(),
        message: format!(
            "ConfigMap {} holds an unreadable ledger ({e}); it is left as it is",
            cm.name_any()
        ),
    })
}

/// The label of a coordinator's planning copy of a site's ledger (the site's own ledger decides).
pub const LABEL_LEDGER_COPY: &str = "fl.caduceus.dev/ledger-copy";

fn configmap(
    operator_ns: &str,
    hospital_ns: &str,
    hospital: &str,
    dl: &DurableLedger,
    copy: bool,
) -> ConfigMap {
    let mut cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(hospital_ns, hospital),
            "namespace": operator_ns,
            "finalizers": [LEDGER_FINALIZER],
            "labels": {
                names::LABEL_MANAGED_BY: names::MANAGED_BY,
                names::LABEL_COMPONENT: LEDGER_COMPONENT,
                names::LABEL_HOSPITAL: hospital,
                names::LABEL_HOSPITAL_NAMESPACE: hospital_ns,
            },
        },
        "data": {LEDGER_KEY: serde_json::to_string(dl).expect("a ledger serialises")},
    }))
    .expect("a valid ConfigMap");
    if copy {
        cm.labels_mut().insert(LABEL_LEDGER_COPY.into(), "true".into());
    }
    cm
}

/// Every ledger in the operator's namespace, by hospital `namespace/name`; `None` for a ledger that
/// cannot be read (that hospital stays out of every round until it is fixed).
pub async fn load_all(client: &Client, operator_ns: &str) -> Result<BTreeMap<String, Option<DurableLedger>>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    let lp = ListParams::default().labels(&format!("{}={LEDGER_COMPONENT}", names::LABEL_COMPONENT));
    let mut out = BTreeMap::new();
    for cm in api.list(&lp).await?.items {
        match parse(&cm) {
            Ok(dl) => {
                out.insert(dl.hospital.clone(), Some(dl));
            }
            Err(e) => {
                tracing::error!("{e}");
                let labels = cm.labels();
                if let (Some(hns), Some(h)) = (
                    labels.get(names::LABEL_HOSPITAL_NAMESPACE),
                    labels.get(names::LABEL_HOSPITAL),
                ) {
                    out.insert(names::hospital_ref(hns, h), None);
                }
            }
        }
    }
    Ok(out)
}

/// The ledger of one hospital (`None`: it has none yet).
pub async fn load(
    client: &Client,
    operator_ns: &str,
    hospital_ns: &str,
    hospital: &str,
) -> Result<Option<DurableLedger>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    match api.get_opt(&configmap_name(hospital_ns, hospital)).await? {
        Some(cm) => Ok(Some(parse(&cm)?)),
        None => Ok(None),
    }
}

/// Applies `f` to a hospital's durable ledger (created, seeded from the HospitalClient's status
/// mirror when there is one, on first use) and writes it back with optimistic concurrency; then
/// mirrors it into the HospitalClient's status when the hospital exists. `f` returns whether it
/// changed anything.
pub async fn update<F>(
    client: &Client,
    operator_ns: &str,
    hospital_ns: &str,
    hospital: &str,
    mut f: F,
) -> Result<DurableLedger>
where
    F: FnMut(&mut DurableLedger) -> Result<bool>,
{
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    let name = configmap_name(hospital_ns, hospital);
    let hapi: Api<HospitalClient> = Api::namespaced(client.clone(), hospital_ns);
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let mut copy = false;
    for _ in 0..8 {
        let (cm, mut dl) = match api.get_opt(&name).await? {
            Some(cm) => {
                let dl = parse(&cm)?;
                (Some(cm), dl)
            }
            None => {
                // First use, or a ledger from before the durable copy existed: seed it from the
                // status mirror so that nothing spent is forgotten.
                let h = hapi.get_opt(hospital).await?;
                // A coordinator's mirror of a site: this ledger is only its planning copy.
                copy = h.as_ref().is_some_and(crate::gateway::mirror::is_mirror);
                let seeded = h
                    .and_then(|h| h.status)
                    .and_then(|s| s.ledger)
                    .unwrap_or_default();
                (
                    None,
                    DurableLedger {
                        hospital: names::hospital_ref(hospital_ns, hospital),
                        ledger: seeded,
                        started: Vec::new(),
                    },
                )
            }
        };
        let changed = f(&mut dl)?;
        let written = match cm {
            None => {
                let want = configmap(operator_ns, hospital_ns, hospital, &dl, copy);
                match api.create(&pp, &want).await {
                    Ok(_) => true,
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Some(_) if !changed => false,
            Some(mut cm) => {
                cm.data
                    .get_or_insert_with(Default::default)
                    .insert(LEDGER_KEY.into(), serde_json::to_string(&dl).expect("serialises"));
                match api.replace(&name, &pp, &cm).await {
                    Ok(_) => true,
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if written || changed {
            mirror(&hapi, hospital_ns, hospital, operator_ns, &dl).await?;
        }
        return Ok(dl);
    }
    Err(Error::Other(format!(
        "ledger {operator_ns}/{name}: it kept changing under us"
    )))
}

/// Writes the durable ledger's mirror, figures and reference into the HospitalClient's status (a
/// no-op when the hospital does not exist, or nothing differs).
pub async fn mirror(
    hapi: &Api<HospitalClient>,
    hospital_ns: &str,
    hospital: &str,
    operator_ns: &str,
    dl: &DurableLedger,
) -> Result<()> {
    if hapi.get_opt(hospital).await?.is_none() {
        return Ok(());
    }
    let reference = format!("{operator_ns}/{}", configmap_name(hospital_ns, hospital));
    update_status(hapi, hospital, |status, h| {
        let before = (
            status.ledger.clone(),
            status.ledger_ref.clone(),
            status.epsilon_spent,
            status.epsilon_remaining,
        );
        status.ledger = Some(dl.ledger.clone());
        status.ledger_ref = Some(reference.clone());
        refresh_figures(status, h);
        Ok(before
            != (
                status.ledger.clone(),
                status.ledger_ref.clone(),
                status.epsilon_spent,
                status.epsilon_remaining,
            ))
    })
    .await?;
    Ok(())
}

/// ε spent (PLD, at the budget's δ) and remaining, written next to the ledger mirror.
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
    client: &Client,
    operator_ns: &str,
    h: &HospitalClient,
    key: &RoundKey,
    mechanisms: &[SubsampledGaussian],
    accountant: AccountantKind,
) -> Result<std::result::Result<(), String>> {
    let hns = h.namespace().unwrap_or_default();
    let hospital = h.name_any();
    let budget = PrivacyBudget::new(
        h.spec.privacy_budget.epsilon,
        h.spec.privacy_budget.delta,
        accountant,
    )
    .map_err(|e| Error::Ledger {
        hospital: hospital.clone(),
        message: e.to_string(),
    })?;
    let mut refused = None;
    update(client, operator_ns, &hns, &hospital, |dl| {
        refused = None;
        match dl.ledger.reserve(key.clone(), mechanisms, &budget) {
            Ok(ReserveOutcome::Reserved { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(e @ LedgerError::BudgetExceeded { .. }) => {
                refused = Some(e.to_string());
                Ok(false)
            }
            Err(e) => Err(Error::Ledger {
                hospital: hospital.clone(),
                message: e.to_string(),
            }),
        }
    })
    .await?;
    if let Some(msg) = &refused {
        set_budget_condition(
            &Api::namespaced(client.clone(), &hns),
            &hospital,
            true,
            "BudgetExceeded",
            msg,
        )
        .await?;
    }
    Ok(match refused {
        Some(m) => Err(m),
        None => Ok(()),
    })
}

/// Cancels the reservation of `key` (a round that released nothing: it was never created, or the
/// hospital's trainer never started). A key never reserved is a no-op; a committed key stays.
pub async fn cancel(
    client: &Client,
    operator_ns: &str,
    hospital_ns: &str,
    hospital: &str,
    key: &RoundKey,
) -> Result<()> {
    if load(client, operator_ns, hospital_ns, hospital)
        .await?
        .is_none_or(|dl| dl.ledger.status(key) != RoundStatus::Reserved)
    {
        return Ok(());
    }
    update(client, operator_ns, hospital_ns, hospital, |dl| {
        match dl.ledger.cancel(key) {
            Ok(()) => Ok(true),
            Err(LedgerError::NotReserved { .. } | LedgerError::AlreadyCommitted { .. }) => Ok(false),
            Err(e) => Err(Error::Ledger {
                hospital: hospital.into(),
                message: e.to_string(),
            }),
        }
    })
    .await?;
    Ok(())
}

/// Records that the trainer Job of `key` is about to be created. `true`: create it now; `false`: it
/// was started before (its Job must not be created again). With `require_reservation` (DP studies)
/// a key that is not reserved is refused with an error: no trainer runs on unpaid budget.
pub async fn mark_started(
    client: &Client,
    operator_ns: &str,
    hospital_ns: &str,
    hospital: &str,
    key: &RoundKey,
    require_reservation: bool,
) -> Result<bool> {
    let mut fresh = false;
    update(client, operator_ns, hospital_ns, hospital, |dl| {
        fresh = false;
        if dl.started.contains(key) || dl.ledger.status(key) == RoundStatus::Committed {
            return Ok(false);
        }
        if require_reservation && dl.ledger.status(key) != RoundStatus::Reserved {
            return Err(Error::Ledger {
                hospital: names::hospital_ref(hospital_ns, hospital),
                message: format!("{key} has no reservation: its trainer Job is not created"),
            });
        }
        dl.started.push(key.clone());
        fresh = true;
        Ok(true)
    })
    .await?;
    Ok(fresh)
}

/// Settles a finished round for one hospital: a started key (or one already committed) is
/// committed, and one that never started is cancelled. Committing a started key that was never
/// reserved is an error, never a silent no-op. Returns ε spent afterwards (PLD at `delta`).
pub async fn settle(
    client: &Client,
    operator_ns: &str,
    hospital_ns: &str,
    hospital: &str,
    key: &RoundKey,
    dp: bool,
    delta: f64,
) -> Result<Option<f64>> {
    let who = names::hospital_ref(hospital_ns, hospital);
    let dl = update(client, operator_ns, hospital_ns, hospital, |dl| {
        let started = dl.started.contains(key);
        dl.started.retain(|k| k != key);
        if !dp {
            return Ok(started);
        }
        if started || dl.ledger.status(key) == RoundStatus::Committed {
            match dl.ledger.commit(key, None) {
                Ok(CommitOutcome::Committed { .. }) => Ok(true),
                Ok(CommitOutcome::AlreadyCommitted) => Ok(started),
                Err(e) => Err(Error::Ledger {
                    hospital: who.clone(),
                    message: format!("cannot commit a round whose trainer ran: {e}"),
                }),
            }
        } else {
            match dl.ledger.cancel(key) {
                Ok(()) => Ok(true),
                Err(LedgerError::NotReserved { .. }) => Ok(started),
                Err(e) => Err(Error::Ledger {
                    hospital: who.clone(),
                    message: e.to_string(),
                }),
            }
        }
    })
    .await?;
    Ok(dl.ledger.epsilon(delta, AccountantKind::Pld).ok())
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

/// Deletes a hospital's durable ledger (its finalizer removed first): only when the hospital's
/// owner explicitly asked to forget it.
pub async fn forget(client: &Client, operator_ns: &str, hospital_ns: &str, hospital: &str) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    let name = configmap_name(hospital_ns, hospital);
    if api.get_opt(&name).await?.is_none() {
        return Ok(());
    }
    let patch = json!({"metadata": {"finalizers": null}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    match api.delete(&name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bound_to_the_study_uid() {
        let a = round_key("s", "gender", "uid-1", 0, 3);
        let b = round_key("s", "gender", "uid-2", 0, 3);
        assert_ne!(a, b, "a re-created study charges again");
        assert_ne!(
            a,
            round_key("s", "gender", "uid-1", 1, 3),
            "a retry is a new release"
        );
        assert_eq!(a, round_key("s", "gender", "uid-1", 0, 3));
    }

    #[test]
    fn the_configmap_round_trips_and_keeps_its_finalizer() {
        let mut dl = DurableLedger {
            hospital: "north/st-mary".into(),
            ..Default::default()
        };
        assert!(dl.is_empty());
        dl.ledger
            .record(
                round_key("s", "x", "u", 0, 0),
                &[SubsampledGaussian::new(1.0, 0.01, 10).unwrap()],
            )
            .unwrap();
        let cm = configmap("caduceus-system", "north", "st-mary", &dl, false);
        assert_eq!(
            cm.metadata.finalizers.as_deref(),
            Some(&[LEDGER_FINALIZER.to_string()][..])
        );
        assert_eq!(cm.metadata.owner_references, None, "outlives the hospital");
        assert!(!cm.labels().contains_key(LABEL_LEDGER_COPY));
        let copy = configmap("caduceus-system", "caduceus-sites", "st-mary", &dl, true);
        assert_eq!(
            copy.labels().get(LABEL_LEDGER_COPY).map(String::as_str),
            Some("true")
        );
        assert_eq!(parse(&cm).unwrap(), dl);
        assert!(!parse(&cm).unwrap().is_empty());
        let mut bad = cm.clone();
        bad.data
            .as_mut()
            .unwrap()
            .insert(LEDGER_KEY.into(), "{not json".into());
        let err = parse(&bad).unwrap_err().to_string();
        assert!(err.contains("unreadable ledger"), "{err}");
    }
}
