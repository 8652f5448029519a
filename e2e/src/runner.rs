//! Running one Pod: volumes, init containers in order, then the app containers as local processes,
//! with restarts, status reports, deadlines and graceful termination.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::NodeContext;
use crate::env::container_env;
use crate::expand::expand_with;
use crate::image::is_executable;
use crate::rewrite::{PathMapping, PathRewriter};
use crate::sources::{ConfigError, Sources};
use crate::status::{
    ContainerRecord, PodRecord, State, exit_code_of, terminated_reason, termination_message,
};
use crate::volumes::{MaterialisedVolume, make_writable, materialise};

/// The env var that marks every process localnode starts (with the Pod UID), so that stray processes
/// can be found after a crash.
pub const POD_UID_ENV: &str = "CADUCEUS_LOCALNODE_POD_UID";
/// The env var that names the localnode state dir a process belongs to.
pub const STATE_DIR_ENV: &str = "CADUCEUS_LOCALNODE_STATE_DIR";

const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const CONFIG_RETRY: Duration = Duration::from_secs(2);

/// Why the Pod's processes must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The Pod has a deletionTimestamp: SIGTERM, this grace period, SIGKILL, then delete the Pod.
    Delete { grace_seconds: i64 },
    /// The Pod object is gone: kill at once.
    Gone,
    /// `activeDeadlineSeconds` passed.
    Deadline,
    /// localnode is shutting down.
    Shutdown,
}

pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The host directory of one Pod: `<state>/pods/<namespace>_<name>_<uid>`.
pub fn pod_dir(state_dir: &Path, pod: &Pod) -> PathBuf {
    state_dir.join("pods").join(format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.uid.as_deref().unwrap_or("")
    ))
}

struct PodRun {
    node: Arc<NodeContext>,
    pod: Pod,
    key: String,
    dir: PathBuf,
    record: Mutex<PodRecord>,
    dirty: Notify,
    stop: watch::Receiver<Option<Stop>>,
}

impl PodRun {
    fn update(&self, f: impl FnOnce(&mut PodRecord)) {
        {
            let mut r = self.record.lock().expect("record lock");
            f(&mut r);
            r.refresh_conditions();
        }
        self.dirty.notify_one();
    }

    fn stopped(&self) -> Option<Stop> {
        *self.stop.borrow()
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(
            self.node.client.clone(),
            self.pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    }

    async fn write_status(&self) -> Result<(), kube::Error> {
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
    async fn sleep_or_stop(&self, d: Duration) -> bool {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopped().is_some(),
            r = stop.wait_for(|s| s.is_some()) => { drop(r); true }
        }
    }
}

fn restart_policy(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into())
}

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

fn fail_pod(run: &PodRun, reason: &str, message: String) {
    warn!(pod = %run.key, reason, "{message}");
    run.update(|r| {
        r.phase = "Failed".into();
        r.reason = Some(reason.to_string());
        r.message = Some(message);
    });
}

async fn drive(run: &Arc<PodRun>) {
    let spec = run.pod.spec.clone().unwrap_or_default();
    // Images first: an unmapped image fails the Pod at once (there is nothing to pull).
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
            return;
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
            return;
        }
    }

    // Volumes, retried while the objects they need are missing.
    let facts = run.node.facts();
    let volumes = loop {
        if run.stopped().is_some() {
            finish_stopped(run);
            return;
        }
        let mut sources = Sources::new(
            run.node.client.clone(),
            run.pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        match materialise(&run.pod, &run.dir, &run.node.state_dir, &mut sources, &facts).await {
            Ok(v) => break v,
            Err(e) if e.is_transient() => {
                let msg = format!("MountVolume failed: {e}");
                warn!(pod = %run.key, "{msg}");
                run.update(|r| r.message = Some(msg));
                if run.sleep_or_stop(CONFIG_RETRY).await {
                    finish_stopped(run);
                    return;
                }
            }
            Err(e) => {
                fail_pod(run, "FailedMount", format!("volume setup failed: {e}"));
                return;
            }
        }
    };
    let sa_kubeconfig = write_sa_kubeconfig(run, &volumes);
    run.update(|r| {
        r.message = None;
        r.set_condition("PodReadyToStartContainers", true, None);
    });

    let policy = restart_policy(&run.pod);
    // Init containers, one after the other.
    for (i, c) in spec.init_containers.iter().flatten().enumerate() {
        let code = run_container(run, c, true, i, &volumes, sa_kubeconfig.as_deref(), &policy).await;
        if let Some(stop) = run.stopped() {
            finish_stopped_with(run, stop);
            return;
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
                return;
            }
        }
    }

    // App containers, all at once.
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
        let vols = volumes.clone();
        let sa = sa_kubeconfig.clone();
        let policy = policy.clone();
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

fn finish_stopped(run: &PodRun) {
    if let Some(stop) = run.stopped() {
        finish_stopped_with(run, stop);
    }
}

fn finish_stopped_with(run: &PodRun, stop: Stop) {
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

/// Writes a kubeconfig for the Pod's ServiceAccount token volume, if it has one, so that clients
/// that read `KUBECONFIG` (kube-rs, kubectl) act as the Pod's ServiceAccount.
fn write_sa_kubeconfig(run: &PodRun, volumes: &[MaterialisedVolume]) -> Option<PathBuf> {
    let spec = run.pod.spec.as_ref()?;
    let vol_name = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.mount_path.trim_end_matches('/') == SA_MOUNT)?
        .name
        .clone();
    let dir = &volumes.iter().find(|v| v.name == vol_name)?.host_path;
    let token = std::fs::read_to_string(dir.join("token")).ok()?;
    let ca = dir.join("ca.crt");
    let ns = run.pod.metadata.namespace.clone().unwrap_or_default();
    let cluster = if ca.is_file() {
        serde_json::json!({"server": run.node.api_url, "certificate-authority": ca})
    } else {
        serde_json::json!({"server": run.node.api_url, "insecure-skip-tls-verify": true})
    };
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localnode", "cluster": cluster}],
        "users": [{"name": "serviceaccount", "user": {"token": token.trim()}}],
        "contexts": [{"name": "pod", "context": {"cluster": "localnode", "user": "serviceaccount", "namespace": ns}}],
        "current-context": "pod",
    });
    let path = run.dir.join("volumes").join("serviceaccount.kubeconfig");
    std::fs::write(&path, serde_json::to_vec_pretty(&kc).ok()?).ok()?;
    Some(path)
}

/// Everything needed to start one container process.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub termination_log: PathBuf,
}

/// Resolves a command name the way localnode documents it: the image's own binary when the name
/// matches it, a binary of that name in the bin dir, an absolute host path, or a name on `PATH`.
pub fn resolve_program(name: &str, image_binary: &Path, bin_dir: &Path, path_env: &str) -> Option<PathBuf> {
    let base = Path::new(name).file_name()?;
    if Some(base) == image_binary.file_name() {
        return Some(image_binary.to_path_buf());
    }
    let in_bin = bin_dir.join(base);
    if !name.contains('/') && is_executable(&in_bin) {
        return Some(in_bin);
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    path_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

/// Builds the mount rewriter of one container (its volume mounts and its termination message path).
pub fn container_rewriter(
    c: &Container,
    volumes: &[MaterialisedVolume],
    termination_log: &Path,
) -> Result<PathRewriter, ConfigError> {
    let mut maps = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = volumes
            .iter()
            .find(|v| v.name == m.name)
            .ok_or_else(|| ConfigError::Invalid {
                what: format!("volumeMount {:?} of container {:?}", m.mount_path, c.name),
                detail: format!("no volume named {:?}", m.name),
            })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = vol.host_path.join(crate::volumes::safe_relative(sub)?);
                if !p.exists() {
                    std::fs::create_dir_all(&p).map_err(|source| ConfigError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                }
                p
            }
            None => vol.host_path.clone(),
        };
        if m.sub_path_expr.is_some() {
            return Err(ConfigError::Unsupported(format!(
                "subPathExpr on volumeMount {:?}",
                m.mount_path
            )));
        }
        maps.push(PathMapping {
            container: m.mount_path.clone(),
            host,
        });
    }
    let tpath = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    maps.push(PathMapping {
        container: tpath,
        host: termination_log.to_path_buf(),
    });
    Ok(PathRewriter::new(maps))
}

async fn prepare_launch(
    run: &PodRun,
    c: &Container,
    volumes: &[MaterialisedVolume],
    sa_kubeconfig: Option<&Path>,
    cdir: &Path,
) -> Result<Launch, ConfigError> {
    let node = &run.node;
    let image_binary = node
        .images
        .resolve(c.image.as_deref().unwrap_or(""))
        .map_err(|e| ConfigError::Invalid {
            what: format!("image of container {:?}", c.name),
            detail: e.to_string(),
        })?;
    let termination_log = cdir.join("termination-log");
    let rewriter = container_rewriter(c, volumes, &termination_log)?;
    let mut sources = Sources::new(
        node.client.clone(),
        run.pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let own = container_env(&run.pod, c, &mut sources, &node.facts()).await?;

    // Base environment first, then the container's own definitions override it.
    let mut env: Vec<(String, String)> = node.base_env.clone();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
        env.retain(|(n, _)| n != k);
        env.push((k.to_string(), v));
    };
    set(
        &mut env,
        "HOSTNAME",
        run.pod.metadata.name.clone().unwrap_or_default(),
    );
    set(&mut env, "HOME", cdir.display().to_string());
    if let Some(kc) = sa_kubeconfig {
        set(&mut env, "KUBECONFIG", kc.display().to_string());
    }
    set(
        &mut env,
        POD_UID_ENV,
        run.pod.metadata.uid.clone().unwrap_or_default(),
    );
    set(&mut env, STATE_DIR_ENV, node.state_dir.display().to_string());
    for (k, v) in own {
        set(&mut env, &k, rewriter.rewrite(&v));
    }
    // Our markers cannot be overridden.
    set(
        &mut env,
        POD_UID_ENV,
        run.pod.metadata.uid.clone().unwrap_or_default(),
    );

    // Rewrite first, then expand: env values are rewritten already, and must not be rewritten twice
    // (a host path can itself contain a mount path, e.g. a mount at /tmp).
    let expand = |s: &String| expand_with(&rewriter.rewrite(s), &env);
    let command: Vec<String> = c.command.iter().flatten().map(expand).collect();
    let args: Vec<String> = c.args.iter().flatten().map(expand).collect();
    let path_env = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let (program, mut argv) = match command.split_first() {
        None => (image_binary, Vec::new()),
        Some((first, rest)) => {
            let p = resolve_program(first, &image_binary, node.images.bin_dir(), &path_env).ok_or_else(
                || ConfigError::Invalid {
                    what: format!("command of container {:?}", c.name),
                    detail: format!(
                        "{first:?} is neither the image's binary, nor in {}, nor an executable on the host",
                        node.images.bin_dir().display()
                    ),
                },
            )?;
            (p, rest.to_vec())
        }
    };
    argv.extend(args);
    let working_dir = match c.working_dir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => rewriter
            .map_path(w)
            .or_else(|| Path::new(w).is_dir().then(|| PathBuf::from(w)))
            .unwrap_or_else(|| cdir.to_path_buf()),
        None => cdir.to_path_buf(),
    };
    Ok(Launch {
        program,
        args: argv,
        env,
        working_dir,
        termination_log,
    })
}

fn signal_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: killpg only sends a signal; a stale group id yields ESRCH, which we ignore.
        unsafe {
            libc::killpg(pgid, sig);
        }
    }
}

fn set_state(run: &PodRun, init: bool, idx: usize, f: impl FnOnce(&mut ContainerRecord)) {
    run.update(|r| {
        let list = if init { &mut r.init } else { &mut r.containers };
        if let Some(rec) = list.get_mut(idx) {
            f(rec);
        }
    });
}

/// Runs one container with its restart policy; returns its last exit code (None if never run).
async fn run_container(
    run: &Arc<PodRun>,
    c: &Container,
    init: bool,
    idx: usize,
    volumes: &[MaterialisedVolume],
    sa_kubeconfig: Option<&Path>,
    policy: &str,
) -> Option<i32> {
    let cdir = run.dir.join("containers").join(&c.name);
    let _ = std::fs::create_dir_all(&cdir);
    let log_dir = run.dir.join("logs").join(&c.name);
    let _ = std::fs::create_dir_all(&log_dir);
    let mut backoff = run.node.restart_backoff;
    let mut restarts = 0;
    loop {
        if run.stopped().is_some() {
            return None;
        }
        let launch = match prepare_launch(run, c, volumes, sa_kubeconfig, &cdir).await {
            Ok(l) => l,
            Err(e) if e.is_transient() => {
                let msg = e.to_string();
                set_state(run, init, idx, |rec| {
                    rec.state = State::waiting("CreateContainerConfigError", Some(msg));
                });
                if run.sleep_or_stop(CONFIG_RETRY).await {
                    return None;
                }
                continue;
            }
            Err(e) => {
                let msg = e.to_string();
                set_state(run, init, idx, |rec| {
                    rec.state = State::waiting("CreateContainerConfigError", Some(msg.clone()));
                });
                fail_pod(
                    run,
                    "CreateContainerConfigError",
                    format!("container {:?}: {msg}", c.name),
                );
                return Some(-1);
            }
        };
        let code = run_once(
            run,
            c,
            init,
            idx,
            &launch,
            &log_dir.join(format!("{restarts}.log")),
        )
        .await;
        let again = match policy {
            _ if run.stopped().is_some() => false,
            "Never" => false,
            "OnFailure" => code != 0,
            _ => !init || code != 0,
        };
        if !again {
            return Some(code);
        }
        restarts += 1;
        set_state(run, init, idx, |rec| {
            let last = std::mem::replace(
                &mut rec.state,
                State::waiting(
                    "CrashLoopBackOff",
                    Some(format!(
                        "back-off {}s restarting failed container",
                        backoff.as_secs_f32()
                    )),
                ),
            );
            rec.last_state = Some(last);
            rec.restart_count = restarts;
        });
        if run.sleep_or_stop(backoff).await {
            return Some(code);
        }
        backoff = (backoff * 2).min(run.node.max_restart_backoff);
    }
}

/// Starts the process once and waits for it (or stops it); returns the exit code.
async fn run_once(
    run: &Arc<PodRun>,
    c: &Container,
    init: bool,
    idx: usize,
    launch: &Launch,
    log_path: &Path,
) -> i32 {
    let _ = std::fs::write(&launch.termination_log, b"");
    let started_at = Timestamp::now();
    let spawned = std::fs::File::create(log_path).and_then(|log| {
        let mut cmd = tokio::process::Command::new(&launch.program);
        cmd.args(&launch.args)
            .env_clear()
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: prctl is async-signal-safe; it makes the kernel kill the process if localnode dies.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn()
    });
    let mut child = match spawned {
        Ok(ch) => ch,
        Err(e) => {
            let msg = format!("failed to start {}: {e}", launch.program.display());
            warn!(pod = %run.key, container = %c.name, "{msg}");
            let now = Timestamp::now();
            set_state(run, init, idx, |rec| {
                rec.state = State::Terminated {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(msg),
                    started_at: now,
                    finished_at: now,
                };
            });
            return 128;
        }
    };
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let _ = std::fs::write(log_path.with_extension("pid"), pid.to_string());
    info!(pod = %run.key, container = %c.name, pid, program = %launch.program.display(), "started");
    set_state(run, init, idx, |rec| {
        rec.state = State::Running { started_at };
        rec.container_id = Some(format!("localnode://{pid}"));
    });

    let mut stop = run.stop.clone();
    let waited = tokio::select! {
        s = child.wait() => Some(s),
        r = stop.wait_for(|s| s.is_some()) => { drop(r); None }
    };
    let status = match waited {
        Some(s) => s,
        None => {
            let how = run.stopped().unwrap_or(Stop::Gone);
            let grace = match how {
                Stop::Delete { grace_seconds } => grace_seconds.max(0) as u64,
                Stop::Gone => 0,
                Stop::Deadline | Stop::Shutdown => 2,
            };
            if grace > 0 {
                signal_group(pid, libc::SIGTERM);
                match tokio::time::timeout(Duration::from_secs(grace), child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        signal_group(pid, libc::SIGKILL);
                        child.wait().await
                    }
                }
            } else {
                signal_group(pid, libc::SIGKILL);
                child.wait().await
            }
        }
    };
    // Whatever the main process left behind in its group goes too (the kubelet kills the cgroup).
    signal_group(pid, libc::SIGKILL);
    let finished_at = Timestamp::now();
    let (code, signal) = match status {
        Ok(s) => exit_code_of(s),
        Err(e) => {
            warn!(pod = %run.key, container = %c.name, "waiting for the process: {e}");
            (255, None)
        }
    };
    let file = std::fs::read(&launch.termination_log).ok();
    let fallback = c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    let log = if fallback && code != 0 {
        std::fs::read(log_path).ok()
    } else {
        None
    };
    let message = termination_message(file.as_deref(), fallback, code, log.as_deref());
    info!(pod = %run.key, container = %c.name, pid, code, "exited");
    set_state(run, init, idx, |rec| {
        rec.state = State::Terminated {
            exit_code: code,
            signal,
            reason: terminated_reason(code).into(),
            message,
            started_at,
            finished_at,
        };
    });
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn program_resolution() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let mk = |p: &Path| {
            std::fs::write(p, b"#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let image_bin = bin.join("caduceus-trainer");
        mk(&image_bin);
        mk(&bin.join("caduceus"));
        let other = tmp.path().join("tool");
        mk(&other);
        let path_env = format!("/nonexistent:{}", tmp.path().display());
        let r = |n: &str| resolve_program(n, &image_bin, &bin, &path_env);
        assert_eq!(r("caduceus-trainer"), Some(image_bin.clone()));
        assert_eq!(r("/usr/local/bin/caduceus-trainer"), Some(image_bin.clone()));
        assert_eq!(r("caduceus"), Some(bin.join("caduceus")));
        assert_eq!(r("tool"), Some(other.clone()));
        assert_eq!(r(other.to_str().unwrap()), Some(other.clone()));
        assert_eq!(r("nope"), None);
        assert_eq!(r("/nope/tool2"), None);
    }

    #[test]
    fn rewriter_covers_mounts_and_termination_log() {
        let c = Container {
            name: "c".into(),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "secret".into(),
                    mount_path: "/etc/secret".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "data".into(),
                    mount_path: "/data/in".into(),
                    sub_path: Some("part".into()),
                    ..Default::default()
                },
            ]),
            termination_message_path: Some("/tmp/msg".into()),
            ..Default::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let vols = vec![
            MaterialisedVolume {
                name: "secret".into(),
                host_path: tmp.path().join("s"),
            },
            MaterialisedVolume {
                name: "data".into(),
                host_path: tmp.path().join("d"),
            },
        ];
        let r = container_rewriter(&c, &vols, &tmp.path().join("tlog")).unwrap();
        let t = tmp.path().display();
        assert_eq!(r.rewrite("/etc/secret/token"), format!("{t}/s/token"));
        assert_eq!(r.rewrite("--in=/data/in/x"), format!("--in={t}/d/part/x"));
        assert_eq!(r.rewrite("/tmp/msg"), format!("{t}/tlog"));
        assert!(tmp.path().join("d/part").is_dir(), "subPath dirs are created");

        let bad = Container {
            name: "c".into(),
            volume_mounts: Some(vec![VolumeMount {
                name: "missing".into(),
                mount_path: "/x".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let err = container_rewriter(&bad, &vols, &tmp.path().join("t")).unwrap_err();
        assert!(err.to_string().contains("no volume named \"missing\""), "{err}");
    }
}
