//! The shared state of one running Pod: its status record, its stop signal, and its status writes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::{Notify, watch};
use tracing::warn;

use super::pod::Stop;
use crate::NodeContext;
use crate::status::{ContainerRecord, PodRecord, State};

/// One Pod being run: what its tasks share.
pub(super) struct PodRun {
    pub(super) node: Arc<NodeContext>,
    pub(super) pod: Pod,
    pub(super) key: String,
    pub(super) dir: PathBuf,
    pub(super) record: Mutex<PodRecord>,
    pub(super) dirty: Notify,
    pub(super) stop: watch::Receiver<Option<Stop>>,
}

impl PodRun {
    pub(super) fn update(&self, f: impl FnOnce(&mut PodRecord)) {
        {
            let mut r = self.record.lock().expect("record lock");
            f(&mut r);
            r.refresh_conditions();
        }
        self.dirty.notify_one();
    }

    pub(super) fn stopped(&self) -> Option<Stop> {
        *self.stop.borrow()
    }

    pub(super) fn pods(&self) -> Api<Pod> {
        Api::namespaced(
            self.node.client.clone(),
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    }

    pub(super) async fn write_status(&self) -> Result<(), kube::Error> {
        let status = self.record.lock().expect("record lock").render();
        let patch = serde_json::json!({ "status": status });
        self.pods()
            .patch_status(
                self.pod.metadata.name.as_deref().unwrap_or(""),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
            .map(|_| ())
    }

    /// Waits until `d` passes or the Pod must stop; true if it must stop.
    pub(super) async fn sleep_or_stop(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            () = tokio::time::sleep(d) => self.stopped().is_some(),
            r = stop.wait_for(Option::is_some) => { drop(r); true }
        }
    }
}

pub(super) fn fail_pod(run: &PodRun, reason: &str, message: String) {
    warn!(pod = %run.key, reason, "{message}");
    run.update(|r| {
        r.phase = "Failed".into();
        r.reason = Some(reason.to_string());
        r.message = Some(message);
    });
}

pub(super) fn finish_stopped(run: &PodRun) {
    if let Some(stop) = run.stopped() {
        finish_stopped_with(run, stop);
    }
}

pub(super) fn finish_stopped_with(run: &PodRun, stop: Stop) {
    run.update(|r| {
        r.phase = "Failed".into();
        if stop == Stop::Deadline {
            r.reason = Some("DeadlineExceeded".into());
            r.message = Some("Pod was active on the node longer than the specified deadline".into());
        }
        for c in r.init.iter_mut().chain(r.containers.iter_mut()) {
            if !c.state.is_terminated() {
                c.state = State::waiting("ContainerCreating", None);
            }
        }
    });
}

pub(super) fn set_state(run: &PodRun, init: bool, idx: usize, f: impl FnOnce(&mut ContainerRecord)) {
    run.update(|r| {
        let list = if init { &mut r.init } else { &mut r.containers };
        if let Some(rec) = list.get_mut(idx) {
            f(rec);
        }
    });
}
