//! One container as a local process: its restarts with back-off, graceful termination, exit status.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::jiff::Timestamp;
use tokio::process::Child;
use tracing::{info, warn};

use super::launch::{Launch, prepare_launch};
use super::pod::{CONFIG_RETRY, Stop};
use super::state::{PodRun, fail_pod, set_state};
use crate::status::{State, exit_code_of, terminated_reason, termination_message};
use crate::volumes::MaterialisedVolume;

fn signal_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: killpg only sends a signal; a stale group id yields ESRCH, which we ignore.
        unsafe {
            libc::killpg(pgid, sig);
        }
    }
}

/// Runs one container with its restart policy; returns its last exit code (None if never run).
pub(super) async fn run_container(
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

/// Starts the process in its own process group, its output going to `log_path`.
fn spawn(launch: &Launch, log_path: &Path) -> std::io::Result<Child> {
    std::fs::File::create(log_path).and_then(|log| {
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
    })
}

/// Stops a running process the way its stop reason asks: SIGTERM and a grace period, or SIGKILL.
async fn stop_process(run: &PodRun, child: &mut Child, pid: i32) -> std::io::Result<ExitStatus> {
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
    let spawned = spawn(launch, log_path);
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
    let pid = child.id().map_or(0, |p| p as i32);
    let _ = std::fs::write(log_path.with_extension("pid"), pid.to_string());
    info!(pod = %run.key, container = %c.name, pid, program = %launch.program.display(), "started");
    set_state(run, init, idx, |rec| {
        rec.state = State::Running { started_at };
        rec.container_id = Some(format!("localnode://{pid}"));
    });

    let mut stop = run.stop.clone();
    let waited = tokio::select! {
        s = child.wait() => Some(s),
        r = stop.wait_for(Option::is_some) => { drop(r); None }
    };
    let status = match waited {
        Some(s) => s,
        None => stop_process(run, &mut child, pid).await,
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
