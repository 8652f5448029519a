//! `localnode`: a **test stand-in for kubelet, not a product feature**.
//!
//! There is no container runtime on the machines Caduceus is developed and tested on, so kind and
//! friends cannot run. `e2e/cluster.sh` starts a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler) and this program plays the node: it registers a Node,
//! watches the Pods bound to it, and runs each Pod's containers as plain local processes, reporting
//! their status the way a kubelet does, so that real Jobs of ours complete under the real Job
//! controller. It has no isolation of any kind (no namespaces, cgroups, chroot or network), runs no
//! images (an image name maps to a binary, see [`image`]), and makes volumes visible by rewriting
//! paths (see [`rewrite`] and [`volumes`]). See `docs/local-control-plane.md`.

pub mod env;
pub mod expand;
pub mod image;
pub mod kubelet;
pub mod node;
pub mod pv;
pub mod rewrite;
pub mod runner;
pub mod sources;
pub mod status;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::watch;

use crate::env::NodeFacts;
use crate::image::ImageMap;
use crate::node::Capacity;
use crate::runner::Stop;

/// What every part of localnode shares.
pub struct NodeContext {
    pub client: Client,
    pub node_name: String,
    /// The address reported as the node's InternalIP and as every Pod's IP.
    pub host_ip: String,
    pub state_dir: PathBuf,
    pub images: ImageMap,
    /// Variables every container starts with (PATH and the `--pass-env` ones).
    pub base_env: Vec<(String, String)>,
    /// The API server URL, for the kubeconfig written next to a ServiceAccount token volume.
    pub api_url: String,
    pub capacity: Capacity,
    pub labels: BTreeMap<String, String>,
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    pub started: Timestamp,
    stops: Mutex<HashMap<String, watch::Sender<Option<Stop>>>>,
}

impl NodeContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        node_name: String,
        host_ip: String,
        state_dir: PathBuf,
        images: ImageMap,
        base_env: Vec<(String, String)>,
        api_url: String,
        capacity: Capacity,
        labels: BTreeMap<String, String>,
    ) -> Self {
        Self {
            client,
            node_name,
            host_ip,
            state_dir,
            images,
            base_env,
            api_url,
            capacity,
            labels,
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(30),
            started: Timestamp::now(),
            stops: Mutex::new(HashMap::new()),
        }
    }

    pub fn facts(&self) -> NodeFacts {
        NodeFacts {
            node_name: self.node_name.clone(),
            host_ip: self.host_ip.clone(),
            pod_ip: self.host_ip.clone(),
        }
    }

    fn register_stop(&self, uid: &str) -> watch::Receiver<Option<Stop>> {
        let (tx, rx) = watch::channel(None);
        self.stops.lock().expect("stops lock").insert(uid.to_string(), tx);
        rx
    }

    fn forget_stop(&self, uid: &str) {
        self.stops.lock().expect("stops lock").remove(uid);
    }

    /// Asks a Pod's worker to stop. A harsher reason replaces a gentler one (Gone beats Delete).
    pub fn stop_uid(&self, uid: &str, how: Stop) {
        if let Some(tx) = self.stops.lock().expect("stops lock").get(uid) {
            tx.send_if_modified(|cur| match cur {
                None => {
                    *cur = Some(how);
                    true
                }
                Some(_) if how == Stop::Gone => {
                    *cur = Some(how);
                    true
                }
                Some(_) => false,
            });
        }
    }

    pub fn stop_pod(&self, pod: &Pod, how: Stop) {
        self.stop_uid(pod.metadata.uid.as_deref().unwrap_or(""), how);
    }
}
