//! A Pod on this node: its key, its host directory, its restart policy, and why its processes stop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

/// How long to wait before retrying a Pod's configuration (volumes, env) whose objects are missing.
pub(super) const CONFIG_RETRY: Duration = Duration::from_secs(2);

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

/// The `namespace/name` key of a Pod.
#[must_use]
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

/// The host directory of one Pod: `<state>/pods/<namespace>_<name>_<uid>`.
#[must_use]
pub fn pod_dir(state_dir: &Path, pod: &Pod) -> PathBuf {
    state_dir.join("pods").join(format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or(""),
        pod.metadata.uid.as_deref().unwrap_or("")
    ))
}

pub(super) fn restart_policy(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into())
}
