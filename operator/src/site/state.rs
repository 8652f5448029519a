//! The site's durable state: the newest (round, attempt) seen per study UID and a record of every
//! assignment, in ConfigMap `caduceus-site-state` of the operator's namespace. Written like the
//! ledger (read, modify, replace guarded by `resourceVersion`, retried on conflict), so refusals of
//! stale or replayed assignments, and the answer to a repeated one, survive a restart.

use std::collections::BTreeMap;

use caduceus_privacy::ledger::RoundKey;
use caduceus_proto::v1::{AssignmentPhase, AssignmentState};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::context::{Error, Result};
use crate::names;

pub const STATE_CONFIGMAP: &str = "caduceus-site-state";
pub const STATE_KEY: &str = "state.json";
/// Terminal records are dropped this long after their assignment expired (a repeat of it is
/// `Expired` by then, and an older round `Stale`).
pub const KEEP_AFTER_EXPIRY_SECS: i64 = 7 * 86400;

/// Where an assignment stands at this site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Accepted,
    Started,
    Succeeded,
    Failed,
    Refused,
    Cancelled,
}

impl Phase {
    pub fn to_proto(self) -> AssignmentPhase {
        match self {
            Phase::Accepted => AssignmentPhase::Accepted,
            Phase::Started => AssignmentPhase::Started,
            Phase::Succeeded => AssignmentPhase::Succeeded,
            Phase::Failed => AssignmentPhase::Failed,
            Phase::Refused => AssignmentPhase::Refused,
            Phase::Cancelled => AssignmentPhase::Cancelled,
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, Phase::Accepted | Phase::Started)
    }
}

/// The trainer of an accepted assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trainer {
    /// The trainer Job, in the site's hospital namespace.
    pub job: String,
    /// Its TLS Secret (key now, certificate with `Start`).
    pub tls_secret: String,
    /// The round's key in the site's ledger.
    pub key: RoundKey,
    /// Whether the round is DP (reserved, and settled as such).
    pub dp: bool,
    /// The id the trainer's certificate must name.
    pub hospital_id: String,
    /// Unix seconds after which a trainer that never started is given up (its reservation released).
    pub give_up_at: i64,
}

/// One assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub phase: Phase,
    /// `Reason: message` (refusals, failures, cancellations).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The trainer's CSR (with ACCEPTED).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub csr_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<Trainer>,
    /// Whether the round is DP (its answers carry ε).
    #[serde(default)]
    pub dp: bool,
    /// The assignment's `expires_at` (0: unknown).
    #[serde(default)]
    pub expires_at: i64,
    /// Unix seconds of the last change.
    #[serde(default)]
    pub updated_at: i64,
}

impl Record {
    pub fn new(phase: Phase, message: impl Into<String>, expires_at: i64, now: i64) -> Self {
        Self {
            phase,
            message: message.into(),
            csr_pem: String::new(),
            trainer: None,
            dp: false,
            expires_at,
            updated_at: now,
        }
    }

    pub fn dp(&self) -> bool {
        self.dp || self.trainer.as_ref().is_some_and(|t| t.dp)
    }

    /// The answer for this record (ε added by the caller).
    pub fn to_proto(&self, id: &str, epsilon_spent: Option<f64>) -> AssignmentState {
        AssignmentState {
            assignment_id: id.to_string(),
            phase: self.phase.to_proto() as i32,
            message: self.message.clone(),
            epsilon_spent,
            csr_pem: if self.phase == Phase::Accepted {
                self.csr_pem.clone()
            } else {
                String::new()
            },
        }
    }
}

/// What the ConfigMap holds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteState {
    /// The newest `[round, attempt]` seen per study UID.
    #[serde(default)]
    pub seen: BTreeMap<String, [u32; 2]>,
    /// Every assignment by id.
    #[serde(default)]
    pub assignments: BTreeMap<String, Record>,
}

impl SiteState {
    pub fn seen(&self, study_uid: &str) -> Option<(u32, u32)> {
        self.seen.get(study_uid).map(|[r, a]| (*r, *a))
    }

    /// Raises the high-water mark of a study; whether it moved.
    pub fn see(&mut self, study_uid: &str, order: (u32, u32)) -> bool {
        if self.seen(study_uid).is_some_and(|s| s >= order) {
            return false;
        }
        self.seen.insert(study_uid.to_string(), [order.0, order.1]);
        true
    }

    /// Drops terminal records long past their expiry; whether any went.
    pub fn prune(&mut self, now: i64) -> bool {
        let before = self.assignments.len();
        self.assignments.retain(|_, r| {
            !(r.phase.is_terminal() && r.expires_at > 0 && now > r.expires_at + KEEP_AFTER_EXPIRY_SECS)
        });
        before != self.assignments.len()
    }
}

fn parse(cm: &ConfigMap) -> Result<SiteState> {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get(STATE_KEY)) else {
        return Ok(SiteState::default());
    };
    serde_json::from_str(text).map_err(|e| {
        Error::Other(format!(
            "ConfigMap {} holds unreadable site state ({e}); it is left as it is",
            cm.name_any()
        ))
    })
}

fn configmap(operator_ns: &str, s: &SiteState) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": STATE_CONFIGMAP,
            "namespace": operator_ns,
            "labels": {
                names::LABEL_MANAGED_BY: names::MANAGED_BY,
                names::LABEL_COMPONENT: "site-state",
            },
        },
        "data": {STATE_KEY: serde_json::to_string(s).expect("serialises")},
    }))
    .expect("a valid ConfigMap")
}

pub async fn load(client: &Client, operator_ns: &str) -> Result<SiteState> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    match api.get_opt(STATE_CONFIGMAP).await? {
        Some(cm) => parse(&cm),
        None => Ok(SiteState::default()),
    }
}

/// Applies `f` (which returns whether it changed anything) and writes the state back with
/// optimistic concurrency. Returns the state as written.
pub async fn update<F>(client: &Client, operator_ns: &str, mut f: F) -> Result<SiteState>
where
    F: FnMut(&mut SiteState) -> Result<bool>,
{
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), operator_ns);
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    for _ in 0..8 {
        let cur = api.get_opt(STATE_CONFIGMAP).await?;
        let mut s = match &cur {
            Some(cm) => parse(cm)?,
            None => SiteState::default(),
        };
        if !f(&mut s)? {
            return Ok(s);
        }
        let res = match cur {
            None => api.create(&pp, &configmap(operator_ns, &s)).await,
            Some(mut cm) => {
                cm.data
                    .get_or_insert_with(Default::default)
                    .insert(STATE_KEY.into(), serde_json::to_string(&s).expect("serialises"));
                api.replace(STATE_CONFIGMAP, &pp, &cm).await
            }
        };
        match res {
            Ok(_) => return Ok(s),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Other(format!(
        "{operator_ns}/{STATE_CONFIGMAP}: it kept changing under us"
    )))
}

/// Writes one record (and nothing else).
pub async fn put(client: &Client, operator_ns: &str, id: &str, record: Record) -> Result<()> {
    update(client, operator_ns, |s| {
        if s.assignments.get(id) == Some(&record) {
            return Ok(false);
        }
        s.assignments.insert(id.to_string(), record.clone());
        Ok(true)
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_water_mark_only_rises() {
        let mut s = SiteState::default();
        assert!(s.see("u", (1, 0)));
        assert!(s.see("u", (1, 1)));
        assert!(!s.see("u", (1, 0)));
        assert!(!s.see("u", (1, 1)));
        assert!(s.see("u", (2, 0)));
        assert_eq!(s.seen("u"), Some((2, 0)));
        assert_eq!(s.seen("v"), None);
    }

    #[test]
    fn only_old_terminal_records_are_pruned() {
        let mut s = SiteState::default();
        s.assignments
            .insert("old".into(), Record::new(Phase::Succeeded, "", 100, 100));
        s.assignments
            .insert("running".into(), Record::new(Phase::Started, "", 100, 100));
        s.assignments
            .insert("recent".into(), Record::new(Phase::Refused, "x", 10_000_000, 100));
        assert!(!s.prune(100 + KEEP_AFTER_EXPIRY_SECS));
        assert!(s.prune(101 + KEEP_AFTER_EXPIRY_SECS));
        assert_eq!(
            s.assignments.keys().collect::<Vec<_>>(),
            vec!["recent", "running"]
        );
    }

    #[test]
    fn the_configmap_round_trips() {
        let mut s = SiteState::default();
        s.see("u", (3, 1));
        let mut r = Record::new(Phase::Accepted, "", 5, 1);
        r.csr_pem = "CSR".into();
        r.trainer = Some(Trainer {
            job: "j".into(),
            tls_secret: "j-tls".into(),
            key: RoundKey::new("s/x@u#1", 3),
            dp: true,
            hospital_id: "h".into(),
            give_up_at: 9,
        });
        s.assignments.insert("a".into(), r.clone());
        assert_eq!(parse(&configmap("ns", &s)).unwrap(), s);
        let p = r.to_proto("a", Some(1.5));
        assert_eq!(p.phase, AssignmentPhase::Accepted as i32);
        assert_eq!(p.csr_pem, "CSR");
        r.phase = Phase::Started;
        assert_eq!(
            r.to_proto("a", None).csr_pem,
            "",
            "the CSR goes with ACCEPTED only"
        );
    }
}
