//! The phases of one Pod: images, volumes, init containers in order, then the app containers.

use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use tracing::warn;

use super::launch::write_sa_kubeconfig;
use super::pod::{CONFIG_RETRY, Stop, restart_policy};
use super::process::run_container;
use super::state::{PodRun, fail_pod, finish_stopped, finish_stopped_with};
use crate::sources::Sources;
use crate::status::State;
use crate::volumes::{MaterialisedVolume, materialise};

/// Runs the Pod through its phases and leaves its final phase in its record.
pub(super) async fn drive(run: &Arc<PodRun>) {
    let spec = run.pod.spec.clone().unwrap_or_default();
    if !check_images(run, &spec) {
        return;
    }
    let Some(volumes) = mount_volumes(run).await else {
        return;
    };
    let sa_kubeconfig = write_sa_kubeconfig(run, &volumes);
    run.update(|r| {
        r.message = None;
        r.set_condition("PodReadyToStartContainers", true, None);
    });
    let policy = restart_policy(&run.pod);
    if run_init_containers(run, &spec, &volumes, sa_kubeconfig.as_deref(), &policy).await {
        run_app_containers(run, &spec, &volumes, sa_kubeconfig.as_deref(), &policy).await;
    }
}

/// Images first: an unmapped image fails the Pod at once (there is nothing to pull). False if the
/// Pod failed.
fn check_images(run: &PodRun, spec: &PodSpec) -> bool {
    let all: Vec<&Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect();
    for c in &all {
        if let Err(e) = run.node.images.resolve(c.image.as_deref().unwrap_or("")) {
            let msg = e.to_string();
            run.update(|r| {
                for rec in r.init.iter_mut().chain(r.containers.iter_mut()) {
                    if rec.name == c.name {
                        rec.state = State::waiting("ErrImageNeverPull", Some(msg.clone()));
                    }
                }
            });
            fail_pod(run, "ErrImageNeverPull", format!("container {:?}: {msg}", c.name));
            return false;
        }
        if c.restart_policy.as_deref() == Some("Always") {
            fail_pod(
                run,
                "Unsupported",
                format!(
                    "init container {:?} has restartPolicy Always (a sidecar); localnode does not run sidecars",
                    c.name
                ),
            );
            return false;
        }
    }
    true
}

/// The Pod's volumes, retried while the objects they need are missing. None if the Pod failed or
/// must stop.
async fn mount_volumes(run: &PodRun) -> Option<Vec<MaterialisedVolume>> {
    let facts = run.node.facts();
    loop {
        if run.stopped().is_some() {
            finish_stopped(run);
            return None;
        }
        let mut sources = Sources::new(
            run.node.client.clone(),
            run.pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        match materialise(&run.pod, &run.dir, &run.node.state_dir, &mut sources, &facts).await {
            Ok(v) => return Some(v),
            Err(e) if e.is_transient() => {
                let msg = format!("MountVolume failed: {e}");
                warn!(pod = %run.key, "{msg}");
                run.update(|r| r.message = Some(msg));
                if run.sleep_or_stop(CONFIG_RETRY).await {
                    finish_stopped(run);
                    return None;
                }
            }
            Err(e) => {
                fail_pod(run, "FailedMount", format!("volume setup failed: {e}"));
                return None;
            }
        }
    }
}

/// The init containers, one after the other. False if one failed or the Pod must stop.
async fn run_init_containers(
    run: &Arc<PodRun>,
    spec: &PodSpec,
    volumes: &[MaterialisedVolume],
    sa_kubeconfig: Option<&Path>,
    policy: &str,
) -> bool {
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let code = run_container(run, c, true, i, volumes, sa_kubeconfig, policy).await;
        if let Some(stop) = run.stopped() {
            finish_stopped_with(run, stop);
            return false;
        }
        match code {
            Some(0) => {}
            _ => {
                run.update(|r| {
                    r.phase = "Failed".into();
                    for c in &mut r.containers {
                        c.state = State::waiting("PodInitializing", None);
                    }
                });
                return false;
            }
        }
    }
    true
}

/// The app containers, all at once, and the Pod's final phase.
async fn run_app_containers(
    run: &Arc<PodRun>,
    spec: &PodSpec,
    volumes: &[MaterialisedVolume],
    sa_kubeconfig: Option<&Path>,
    policy: &str,
) {
    run.update(|r| {
        r.phase = "Running".into();
        for c in &mut r.containers {
            c.state = State::waiting("ContainerCreating", None);
        }
    });
    let mut tasks = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let run2 = run.clone();
        let c = c.clone();
        let vols = volumes.to_vec();
        let sa = sa_kubeconfig.map(Path::to_path_buf);
        let policy = policy.to_string();
        tasks.push(tokio::spawn(async move {
            run_container(&run2, &c, false, i, &vols, sa.as_deref(), &policy).await
        }));
    }
    let mut all_ok = true;
    for t in tasks {
        match t.await {
            Ok(Some(0)) => {}
            _ => all_ok = false,
        }
    }
    let stop = run.stopped();
    run.update(|r| {
        r.phase = if all_ok && stop.is_none() {
            "Succeeded".into()
        } else if all_ok && matches!(stop, Some(Stop::Delete { .. })) {
            // Containers that exited 0 on SIGTERM: the kubelet reports Succeeded.
            "Succeeded".into()
        } else {
            "Failed".into()
        };
        if stop == Some(Stop::Deadline) {
            r.reason = Some("DeadlineExceeded".into());
            r.message = Some("Pod was active on the node longer than the specified deadline".into());
        }
    });
}
