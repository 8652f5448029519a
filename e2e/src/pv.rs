//! A tiny PersistentVolume provisioner, so that Pods with PersistentVolumeClaims can be scheduled.
//!
//! The scheduler does not place a Pod whose claims are unbound. For every Pending claim without a
//! volume, localnode creates a `hostPath` PersistentVolume named `pvc-<claim uid>` that points at
//! `<state dir>/pvcs/<namespace>/<claim>` and is pre-bound to the claim; the PV binder controller
//! of kube-controller-manager then binds the two. When the claim is deleted the volume is Released
//! and localnode deletes it and its directory (the `Delete` reclaim policy of dynamic provisioning).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use crate::NodeContext;
use crate::volumes::{make_writable, pvc_dir};

pub const MANAGED_BY: &str = "caduceus.dev/localnode-provisioned";

/// The PersistentVolume localnode creates for a claim.
pub fn volume_for(claim: &PersistentVolumeClaim, ctx: &NodeContext) -> Option<PersistentVolume> {
    let ns = claim.namespace()?;
    let name = claim.metadata.name.clone()?;
    let uid = claim.metadata.uid.clone()?;
    let spec = claim.spec.clone().unwrap_or_default();
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    let mut capacity = BTreeMap::new();
    capacity.insert("storage".to_string(), storage);
    Some(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(format!("pvc-{uid}")),
            labels: Some([(MANAGED_BY.to_string(), ctx.node_name.clone())].into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(capacity),
            access_modes: spec.access_modes.clone(),
            storage_class_name: spec.storage_class_name.clone(),
            volume_mode: spec.volume_mode.clone(),
            persistent_volume_reclaim_policy: Some("Retain".into()),
            host_path: Some(HostPathVolumeSource {
                path: pvc_dir(&ctx.state_dir, &ns, &name).display().to_string(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(ns),
                name: Some(name),
                uid: Some(uid),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    })
}

fn needs_volume(c: &PersistentVolumeClaim) -> bool {
    c.metadata.deletion_timestamp.is_none()
        && c.spec.as_ref().and_then(|s| s.volume_name.as_ref()).is_none()
        && c.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound")
}

/// Watches claims and volumes forever.
pub async fn provision(ctx: Arc<NodeContext>) {
    let claims: Api<PersistentVolumeClaim> = Api::all(ctx.client.clone());
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claim_events = watcher::watcher(claims, watcher::Config::default())
        .default_backoff()
        .map_ok(either_claim);
    let volume_events = watcher::watcher(
        volumes.clone(),
        watcher::Config::default().labels(&format!("{MANAGED_BY}={}", ctx.node_name)),
    )
    .default_backoff()
    .map_ok(either_volume);
    let mut events = std::pin::pin!(futures::stream::select(claim_events, volume_events));
    while let Some(ev) = events.next().await {
        match ev {
            Ok(Some(Item::Claim(c))) if needs_volume(&c) => {
                if let Some(pv) = volume_for(&c, &ctx) {
                    if let Some(path) = pv.spec.as_ref().and_then(|s| s.host_path.as_ref()) {
                        let _ = std::fs::create_dir_all(&path.path);
                    }
                    match volumes.create(&PostParams::default(), &pv).await {
                        Ok(_) => {
                            info!(claim = %format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()), "provisioned a hostPath volume")
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => warn!("provisioning a volume for {}: {e}", c.name_any()),
                    }
                }
            }
            Ok(Some(Item::Volume(v)))
                if v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released") =>
            {
                let name = v.name_any();
                match volumes.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        if let Some(p) = v.spec.as_ref().and_then(|s| s.host_path.as_ref()) {
                            let dir = std::path::Path::new(&p.path);
                            // Only directories below our own state dir are ever removed.
                            if dir.starts_with(ctx.state_dir.join("pvcs")) {
                                make_writable(dir);
                                let _ = std::fs::remove_dir_all(dir);
                                // The namespace's dir goes with its last claim.
                                if let Some(parent) = dir.parent() {
                                    let _ = std::fs::remove_dir(parent);
                                }
                            }
                        }
                        info!(volume = %name, "deleted a released volume");
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => warn!("deleting released volume {name}: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) => warn!("volume provisioner watch: {e}"),
        }
    }
}

enum Item {
    Claim(Box<PersistentVolumeClaim>),
    Volume(Box<PersistentVolume>),
}

fn either_claim(e: Event<PersistentVolumeClaim>) -> Option<Item> {
    match e {
        Event::Apply(c) | Event::InitApply(c) => Some(Item::Claim(Box::new(c))),
        _ => None,
    }
}

fn either_volume(e: Event<PersistentVolume>) -> Option<Item> {
    match e {
        Event::Apply(v) | Event::InitApply(v) => Some(Item::Volume(Box::new(v))),
        _ => None,
    }
}
