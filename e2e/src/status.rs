//! The Pod status model localnode keeps for each Pod, and its rendering into a `PodStatus` the way a
//! kubelet reports it (phase, conditions, init and app container statuses).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The largest termination message the kubelet keeps (bytes).
pub const MAX_TERMINATION_MESSAGE: usize = 4096;
/// How much of the log FallbackToLogsOnError keeps: the last 80 lines, at most 2048 bytes.
pub const FALLBACK_LOG_LINES: usize = 80;
pub const FALLBACK_LOG_BYTES: usize = 2048;

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: Timestamp,
        finished_at: Timestamp,
    },
}

impl State {
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        State::Waiting {
            reason: reason.to_string(),
            message,
        }
    }

    pub fn is_terminated(&self) -> bool {
        matches!(self, State::Terminated { .. })
    }

    pub fn exit_code(&self) -> Option<i32> {
        match self {
            State::Terminated { exit_code, .. } => Some(*exit_code),
            _ => None,
        }
    }

    fn render(&self) -> ContainerState {
        match self {
            State::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            State::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..Default::default()
            },
            State::Terminated {
                exit_code,
                signal,
                reason,
                message,
                started_at,
                finished_at,
            } => ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: *exit_code,
                    signal: *signal,
                    reason: Some(reason.clone()),
                    message: message.clone(),
                    started_at: Some(Time(*started_at)),
                    finished_at: Some(Time(*finished_at)),
                    container_id: None,
                }),
                ..Default::default()
            },
        }
    }
}

/// The reason the kubelet gives a terminated container.
pub fn terminated_reason(exit_code: i32) -> &'static str {
    if exit_code == 0 { "Completed" } else { "Error" }
}

/// Exit code as a container runtime reports it: the status, or 128 + signal number.
pub fn exit_code_of(status: std::process::ExitStatus) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(s)),
        (None, None) => (255, None),
    }
}

/// The termination message from the message file, or (with FallbackToLogsOnError and a failure)
/// the tail of the log.
pub fn termination_message(
    file_contents: Option<&[u8]>,
    fallback_to_logs: bool,
    exit_code: i32,
    log: Option<&[u8]>,
) -> Option<String> {
    let from_file = file_contents
        .map(|b| &b[..b.len().min(MAX_TERMINATION_MESSAGE)])
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .filter(|s| !s.is_empty());
    if from_file.is_some() {
        return from_file;
    }
    if fallback_to_logs && exit_code != 0 {
        return log.map(log_tail).filter(|s| !s.is_empty());
    }
    None
}

/// The last [`FALLBACK_LOG_LINES`] lines of a log, at most [`FALLBACK_LOG_BYTES`] bytes.
pub fn log_tail(log: &[u8]) -> String {
    let text = String::from_utf8_lossy(log);
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let lines: Vec<&str> = trimmed.split('\n').collect();
    let start = lines.len().saturating_sub(FALLBACK_LOG_LINES);
    let mut s = lines[start..].join("\n");
    if s.len() > FALLBACK_LOG_BYTES {
        let mut cut = s.len() - FALLBACK_LOG_BYTES;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = s[cut..].to_string();
    }
    s
}

#[derive(Debug, Clone)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last_state: Option<State>,
    pub restart_count: i32,
    pub container_id: Option<String>,
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str, waiting_reason: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            state: State::waiting(waiting_reason, None),
            last_state: None,
            restart_count: 0,
            container_id: None,
        }
    }

    fn render(&self) -> ContainerStatus {
        let running = matches!(self.state, State::Running { .. });
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: format!("localnode://{}", self.image),
            container_id: self.container_id.clone(),
            ready: running,
            started: Some(running),
            restart_count: self.restart_count,
            state: Some(self.state.render()),
            last_state: Some(self.last_state.as_ref().map(State::render).unwrap_or_default()),
            ..Default::default()
        }
    }
}

/// Everything localnode reports about one Pod.
#[derive(Debug, Clone)]
pub struct PodRecord {
    pub phase: String,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub start_time: Timestamp,
    pub host_ip: String,
    pub pod_ip: String,
    pub init: Vec<ContainerRecord>,
    pub containers: Vec<ContainerRecord>,
    /// condition type → (status, reason, last transition)
    conditions: BTreeMap<&'static str, (bool, Option<String>, Timestamp)>,
}

impl PodRecord {
    pub fn new(host_ip: &str, init: Vec<ContainerRecord>, containers: Vec<ContainerRecord>) -> Self {
        let now = Timestamp::now();
        let mut r = Self {
            phase: "Pending".into(),
            reason: None,
            message: None,
            start_time: now,
            host_ip: host_ip.to_string(),
            pod_ip: host_ip.to_string(),
            init,
            containers,
            conditions: BTreeMap::new(),
        };
        r.set_condition("PodReadyToStartContainers", false, None);
        let no_init = r.init.is_empty();
        r.set_condition("Initialized", no_init, None);
        r.set_condition("ContainersReady", false, None);
        r.set_condition("Ready", false, None);
        r
    }

    /// Sets a condition, keeping its transition time when the status does not change.
    pub fn set_condition(&mut self, kind: &'static str, status: bool, reason: Option<&str>) {
        let now = Timestamp::now();
        let reason = reason.map(str::to_string);
        match self.conditions.get_mut(kind) {
            Some(c) if c.0 == status => c.1 = reason,
            _ => {
                self.conditions.insert(kind, (status, reason, now));
            }
        }
    }

    pub fn condition(&self, kind: &str) -> Option<bool> {
        self.conditions.get(kind).map(|c| c.0)
    }

    pub fn is_terminal(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }

    /// Recomputes the readiness conditions from the container states.
    pub fn refresh_conditions(&mut self) {
        let init_done = self.init.iter().all(|c| c.state.exit_code() == Some(0));
        self.set_condition("Initialized", init_done, None);
        let all_running = !self.containers.is_empty()
            && self
                .containers
                .iter()
                .all(|c| matches!(c.state, State::Running { .. }));
        let reason = if self.is_terminal() {
            Some("PodCompleted")
        } else if all_running {
            None
        } else {
            Some("ContainersNotReady")
        };
        self.set_condition("ContainersReady", all_running, reason);
        self.set_condition("Ready", all_running, reason);
        if self.is_terminal() {
            self.set_condition("PodReadyToStartContainers", false, None);
        }
    }

    pub fn render(&self) -> PodStatus {
        let conditions = self
            .conditions
            .iter()
            .map(|(kind, (status, reason, at))| PodCondition {
                type_: kind.to_string(),
                status: if *status { "True" } else { "False" }.into(),
                reason: reason.clone(),
                last_transition_time: Some(Time(*at)),
                ..Default::default()
            })
            .collect();
        PodStatus {
            phase: Some(self.phase.clone()),
            reason: self.reason.clone(),
            message: self.message.clone(),
            start_time: Some(Time(self.start_time)),
            host_ip: Some(self.host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.clone(),
            }]),
            pod_ip: Some(self.pod_ip.clone()),
            pod_ips: Some(vec![PodIP {
                ip: self.pod_ip.clone(),
            }]),
            qos_class: None,
            conditions: Some(conditions),
            init_container_statuses: Some(self.init.iter().map(ContainerRecord::render).collect()),
            container_statuses: Some(self.containers.iter().map(ContainerRecord::render).collect()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_exit_codes() {
        assert_eq!(terminated_reason(0), "Completed");
        assert_eq!(terminated_reason(3), "Error");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            exit_code_of(std::process::ExitStatus::from_raw(3 << 8)),
            (3, None)
        );
        assert_eq!(
            exit_code_of(std::process::ExitStatus::from_raw(9)),
            (137, Some(9))
        );
        assert_eq!(
            exit_code_of(std::process::ExitStatus::from_raw(15)),
            (143, Some(15))
        );
    }

    #[test]
    fn termination_messages() {
        assert_eq!(
            termination_message(Some(b"boom"), true, 1, Some(b"log")),
            Some("boom".into())
        );
        assert_eq!(termination_message(Some(b""), false, 1, Some(b"log")), None);
        assert_eq!(
            termination_message(None, true, 1, Some(b"a\nb\n")),
            Some("a\nb".into())
        );
        assert_eq!(
            termination_message(None, true, 0, Some(b"a\n")),
            None,
            "only on error"
        );
        let big = vec![b'x'; 10_000];
        assert_eq!(
            termination_message(Some(&big), false, 0, None).unwrap().len(),
            MAX_TERMINATION_MESSAGE
        );
    }

    #[test]
    fn log_tail_limits() {
        let log: String = (0..200).map(|i| format!("line {i}\n")).collect();
        let t = log_tail(log.as_bytes());
        assert_eq!(t.lines().count(), FALLBACK_LOG_LINES);
        assert!(t.ends_with("line 199"));
        let long = "é".repeat(3000);
        let t = log_tail(long.as_bytes());
        assert!(t.len() <= FALLBACK_LOG_BYTES && !t.is_empty());
    }

    #[test]
    fn conditions_follow_states() {
        let mut r = PodRecord::new(
            "127.0.0.1",
            vec![ContainerRecord::new("init", "i", "PodInitializing")],
            vec![ContainerRecord::new("main", "m", "PodInitializing")],
        );
        assert_eq!(r.condition("Initialized"), Some(false));
        let t0 = r.conditions["Initialized"].2;
        r.refresh_conditions();
        assert_eq!(r.conditions["Initialized"].2, t0, "no transition, same time");
        let now = Timestamp::now();
        r.init[0].state = State::Terminated {
            exit_code: 0,
            signal: None,
            reason: "Completed".into(),
            message: None,
            started_at: now,
            finished_at: now,
        };
        r.containers[0].state = State::Running { started_at: now };
        r.phase = "Running".into();
        r.refresh_conditions();
        assert_eq!(r.condition("Initialized"), Some(true));
        assert_eq!(r.condition("Ready"), Some(true));
        let s = r.render();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.unwrap()[0];
        assert!(cs.ready && cs.state.as_ref().unwrap().running.is_some());
        r.phase = "Succeeded".into();
        r.containers[0].state = State::Terminated {
            exit_code: 0,
            signal: None,
            reason: "Completed".into(),
            message: None,
            started_at: now,
            finished_at: now,
        };
        r.refresh_conditions();
        assert_eq!(r.condition("Ready"), Some(false));
        let ready = r
            .render()
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.reason.as_deref(), Some("PodCompleted"));
    }
}
