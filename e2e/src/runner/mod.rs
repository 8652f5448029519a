//! Running one Pod: volumes, init containers in order, then the app containers as local processes,
//! with restarts, status reports, deadlines and graceful termination.
//!
//! By concern, each module using only those before it: `pod` (identity, stop reasons), `state` (the
//! shared record and status writes), `launch` (a container's program, env and paths), `process` (a
//! container's process and restarts), `drive` (the Pod's phases); this entry point starts a Pod's
//! tasks and cleans up after it.

mod drive;
mod launch;
mod pod;
mod process;
mod state;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, Preconditions};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

pub use launch::{Launch, POD_UID_ENV, STATE_DIR_ENV, container_rewriter, resolve_program};
pub use pod::{Stop, pod_dir, pod_key};

use crate::NodeContext;
use crate::status::{ContainerRecord, PodRecord};
use crate::volumes::make_writable;
use drive::drive;
use state::PodRun;

/// Runs the Pod to its end. `stop` tells when its processes must stop.
pub async fn run_pod(node: Arc<NodeContext>, pod: Pod, stop: watch::Receiver<Option<Stop>>) {
    let spec = pod.spec.clone().unwrap_or_default();
    let init: Vec<ContainerRecord> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or(""), "PodInitializing"))
        .collect();
    let waiting = if init.is_empty() {
        "ContainerCreating"
    } else {
        "PodInitializing"
    };
    let containers: Vec<ContainerRecord> = spec
        .containers
        .iter()
        .map(|c| ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or(""), waiting))
        .collect();
    let run = Arc::new(PodRun {
        key: pod_key(&pod),
        dir: pod_dir(&node.state_dir, &pod),
        record: Mutex::new(PodRecord::new(&node.host_ip, init, containers)),
        dirty: Notify::new(),
        node,
        pod,
        stop,
    });
    info!(pod = %run.key, "starting pod");

    // The status writer coalesces updates.
    let writer = {
        let run = run.clone();
        tokio::spawn(async move {
            loop {
                run.dirty.notified().await;
                if let Err(e) = run.write_status().await {
                    warn!(pod = %run.key, "writing status: {e}");
                    if matches!(&e, kube::Error::Api(s) if s.code == 404) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    run.dirty.notify_one();
                }
            }
        })
    };
    run.dirty.notify_one();

    // activeDeadlineSeconds
    let deadline_task = spec.active_deadline_seconds.map(|secs| {
        let run = run.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs.max(0) as u64)).await;
            run.node.stop_pod(&run.pod, Stop::Deadline);
        })
    });

    drive(&run).await;

    if let Some(t) = deadline_task {
        t.abort();
    }
    writer.abort();
    // Final status, written directly, with retries.
    for attempt in 0..5 {
        match run.write_status().await {
            Ok(()) => break,
            Err(kube::Error::Api(s)) if s.code == 404 => break,
            Err(e) => {
                warn!(pod = %run.key, attempt, "writing final status: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let phase = run.record.lock().expect("record lock").phase.clone();
    info!(pod = %run.key, %phase, "pod finished");
    // Secrets and tokens do not outlive the Pod; logs stay.
    let vols = run.dir.join("volumes");
    make_writable(&vols);
    let _ = std::fs::remove_dir_all(&vols);
    // A Pod being deleted goes once its processes are gone, whatever stopped them first.
    let api = run.pods();
    if let Ok(Some(latest)) = api.get_opt(run.pod.metadata.name.as_deref().unwrap_or("")).await
        && latest.metadata.uid == run.pod.metadata.uid
        && latest.metadata.deletion_timestamp.is_some()
    {
        delete_now(&api, &latest).await;
    }
}

/// Deletes a Pod with grace period 0 (what the kubelet does once its containers are gone).
pub async fn delete_now(api: &Api<Pod>, pod: &Pod) {
    let dp = DeleteParams::default()
        .grace_period(0)
        .preconditions(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        });
    match api.delete(pod.metadata.name.as_deref().unwrap_or(""), &dp).await {
        Ok(_) => info!(pod = %pod_key(pod), "deleted"),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
        Err(e) => warn!(pod = %pod_key(pod), "deleting: {e}"),
    }
}
