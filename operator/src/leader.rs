//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does it:
//! a replica acts only while it holds the Lease, renews it every `ttl / 3`, and takes over only a
//! Lease whose holder has not renewed it for `ttl`. Every write is guarded by `resourceVersion`, so
//! two candidates can never both win. kube-runtime 5 has no leader election and the crates that do
//! (kube-leader-election, kube-lease-manager) are built against older kube releases, hence this
//! small module.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

use crate::context::Result;

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    ttl: Duration,
}

/// Whether `holder` may be replaced by `me` at `now`.
pub fn can_take(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => {
            let ttl = spec.lease_duration_seconds.unwrap_or(15) as i64;
            match &spec.renew_time {
                Some(MicroTime(t)) => *t + SignedDuration::from_secs(ttl) < now,
                None => true,
            }
        }
    }
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, ttl: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            ttl,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, prev: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let same_holder = prev.and_then(|p| p.holder_identity.as_deref()) == Some(self.identity.as_str());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.ttl.as_secs() as i32),
            acquire_time: if same_holder {
                prev.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(
                prev.and_then(|p| p.lease_transitions).unwrap_or(0)
                    + if same_holder || prev.is_none() { 0 } else { 1 },
            ),
            ..Default::default()
        }
    }

    /// Acquires or renews the Lease; `true` while this replica holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let pp = PostParams {
            field_manager: Some(crate::FIELD_MANAGER.into()),
            ..Default::default()
        };
        match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                match self.api.create(&pp, &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
            Some(mut lease) => {
                if !can_take(lease.spec.as_ref(), &self.identity, now) {
                    return Ok(false);
                }
                lease.spec = Some(self.spec(lease.spec.as_ref(), now));
                // metadata.resourceVersion is kept: a concurrent write makes this a 409.
                match self.api.replace(&self.name, &pp, &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Gives the Lease up (on graceful shutdown) so that a standby takes over at once.
    pub async fn step_down(&self) -> Result<()> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await?
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            let pp = PostParams {
                field_manager: Some(crate::FIELD_MANAGER.into()),
                ..Default::default()
            };
            let _ = self.api.replace(&self.name, &pp, &lease).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lease_of_another_holder_is_not_taken() {
        let now = Timestamp::now();
        let spec = LeaseSpec {
            holder_identity: Some("other".into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(5))),
            ..Default::default()
        };
        assert!(!can_take(Some(&spec), "me", now));
        assert!(can_take(Some(&spec), "other", now));
        assert!(can_take(Some(&spec), "me", now + SignedDuration::from_secs(11)));
        assert!(can_take(None, "me", now));
    }
}
