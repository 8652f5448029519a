//! The Pod loop: watches the Pods bound to this node and starts, stops and cleans up their workers.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::NodeContext;
use crate::runner::{POD_UID_ENV, STATE_DIR_ENV, Stop, delete_now, pod_key, run_pod};

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

/// Processes (pid) whose environment holds `NAME=value` for every given pair.
pub fn processes_with_env(pairs: &[(&str, &str)]) -> Vec<i32> {
    let wanted: Vec<Vec<u8>> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}").into_bytes())
        .collect();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(environ) = std::fs::read(Path::new("/proc").join(pid.to_string()).join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
        if wanted.iter().all(|w| vars.contains(&w.as_slice())) {
            out.push(pid);
        }
    }
    out
}

fn kill_all(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Kills every process a previous localnode with this state dir left behind.
pub fn kill_stale_processes(state_dir: &Path) -> usize {
    let dir = state_dir.display().to_string();
    let pids = processes_with_env(&[(STATE_DIR_ENV, dir.as_str())]);
    kill_all(&pids);
    pids.len()
}

/// A Pod that was running under an earlier localnode: its processes cannot be adopted, so they are
/// killed and the Pod is marked Failed (as a kubelet does for containers it cannot find).
async fn fail_orphan(ctx: &NodeContext, pod: &Pod) {
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = ctx.state_dir.display().to_string();
    kill_all(&processes_with_env(&[
        (POD_UID_ENV, uid.as_str()),
        (STATE_DIR_ENV, dir.as_str()),
    ]));
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now());
    let fix = |list: Option<&Vec<ContainerStatus>>| -> Vec<ContainerStatus> {
        list.into_iter()
            .flatten()
            .map(|cs| {
                let mut cs = cs.clone();
                let done = cs
                    .state
                    .as_ref()
                    .is_some_and(|s| s.terminated.is_some());
                if !done {
                    cs.ready = false;
                    cs.started = Some(false);
                    cs.state = Some(k8s_openapi::api::core::v1::ContainerState {
                        terminated: Some(k8s_openapi::api::core::v1::ContainerStateTerminated {
                            exit_code: 137,
                            reason: Some("ContainerStatusUnknown".into()),
                            message: Some(
                                "The container could not be located when the pod was terminated (localnode restarted)"
                                    .into(),
                            ),
                            finished_at: Some(now.clone()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                }
                cs
            })
            .collect()
    };
    let status = pod.status.clone().unwrap_or_default();
    let patch = serde_json::json!({"status": {
        "phase": "Failed",
        "reason": "NodeRestarted",
        "message": "localnode restarted while this pod was running; its processes were killed and cannot be adopted",
        "initContainerStatuses": fix(status.init_container_statuses.as_ref()),
        "containerStatuses": fix(status.container_statuses.as_ref()),
    }});
    let api: Api<Pod> = Api::namespaced(
        ctx.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    match api
        .patch_status(
            pod.metadata.name.as_deref().unwrap_or(""),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
    {
        Ok(_) => info!(pod = %pod_key(pod), "marked an orphaned pod Failed"),
        Err(e) => warn!(pod = %pod_key(pod), "marking an orphaned pod Failed: {e}"),
    }
}

struct Worker {
    handle: JoinHandle<()>,
}

/// Runs the Pod loop until the watch ends (it does not, short of a shutdown).
pub struct PodLoop {
    ctx: Arc<NodeContext>,
    workers: std::collections::HashMap<String, Worker>,
}

impl PodLoop {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        Self {
            ctx,
            workers: Default::default(),
        }
    }

    fn start(&mut self, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let rx = self.ctx.register_stop(&uid);
        let ctx = self.ctx.clone();
        let handle = tokio::spawn(run_pod(ctx, pod, rx));
        self.workers.insert(uid, Worker { handle });
    }

    async fn on_pod(&mut self, pod: Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let deleting = pod.metadata.deletion_timestamp.is_some();
        if let Some(w) = self.workers.get(&uid) {
            if deleting {
                if w.handle.is_finished() {
                    self.delete_terminal(&pod).await;
                } else {
                    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
                    self.ctx.stop_pod(&pod, Stop::Delete { grace_seconds: grace });
                }
            }
            return;
        }
        if is_terminal(&pod) {
            if deleting {
                self.delete_terminal(&pod).await;
            }
            return;
        }
        if deleting {
            // Never started here (or orphaned): nothing runs, so it can go at once.
            self.delete_terminal(&pod).await;
            return;
        }
        let started_before = pod.status.as_ref().and_then(|s| s.start_time.as_ref()).is_some();
        if started_before {
            fail_orphan(&self.ctx, &pod).await;
            return;
        }
        self.start(pod);
    }

    async fn delete_terminal(&self, pod: &Pod) {
        let api: Api<Pod> = Api::namespaced(
            self.ctx.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        delete_now(&api, pod).await;
    }

    fn on_gone(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.ctx.stop_pod(pod, Stop::Gone);
        self.ctx.forget_stop(&uid);
        self.workers.remove(&uid);
    }

    /// Watches the node's Pods and dispatches events until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let api: Api<Pod> = Api::all(self.ctx.client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.ctx.node_name));
        let mut stream = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
        let mut shutdown = std::pin::pin!(shutdown);
        let mut seen: HashSet<String> = HashSet::new();
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = &mut shutdown => break,
            };
            match ev {
                None => break,
                Some(Err(e)) => warn!("pod watch: {e}"),
                Some(Ok(Event::Init)) => seen.clear(),
                Some(Ok(Event::InitApply(p))) => {
                    seen.insert(p.metadata.uid.clone().unwrap_or_default());
                    self.on_pod(p).await;
                }
                Some(Ok(Event::InitDone)) => {
                    // Pods deleted while the watch was down.
                    let gone: Vec<String> = self
                        .workers
                        .keys()
                        .filter(|u| !seen.contains(*u))
                        .cloned()
                        .collect();
                    for uid in gone {
                        self.ctx.stop_uid(&uid, Stop::Gone);
                        self.ctx.forget_stop(&uid);
                        self.workers.remove(&uid);
                    }
                }
                Some(Ok(Event::Apply(p))) => self.on_pod(p).await,
                Some(Ok(Event::Delete(p))) => self.on_gone(&p),
            }
        }
        info!("shutting down: stopping {} pod workers", self.workers.len());
        for uid in self.workers.keys() {
            self.ctx.stop_uid(uid, Stop::Shutdown);
        }
        let handles: Vec<JoinHandle<()>> = self.workers.into_values().map(|w| w.handle).collect();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::future::join_all(handles),
        )
        .await;
    }
}
