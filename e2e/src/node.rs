//! Registering the Node and keeping it Ready (status heartbeat and node Lease).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use tracing::{info, warn};

use crate::NodeContext;

/// Node capacity advertised to the scheduler.
#[derive(Debug, Clone)]
pub struct Capacity {
    pub cpu: String,
    pub memory: String,
    pub pods: String,
}

/// Taints the API server adds to new Nodes (TaintNodesByCondition admission). The node lifecycle
/// controller would remove them once the Node is Ready; localnode does not need that controller, so it
/// removes them itself.
const STARTUP_TAINTS: [&str; 2] = ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"];

pub fn node_labels(name: &str, extra: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert("kubernetes.io/hostname".to_string(), name.to_string());
    l.insert("kubernetes.io/os".to_string(), "linux".to_string());
    l.insert("kubernetes.io/arch".to_string(), go_arch().to_string());
    l.insert("caduceus.dev/localnode".to_string(), "true".to_string());
    l.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    l
}

pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn conditions(now: Timestamp, since: Timestamp) -> Vec<NodeCondition> {
    let cond = |t: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: t.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    };
    vec![
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "localnode does not track memory",
        ),
        cond(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "localnode does not track disk",
        ),
        cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "localnode does not track PIDs",
        ),
        cond(
            "Ready",
            "True",
            "KubeletReady",
            "localnode (a test stand-in for kubelet) is posting ready status",
        ),
    ]
}

fn node_status(ctx: &NodeContext, now: Timestamp, since: Timestamp) -> NodeStatus {
    let mut cap = BTreeMap::new();
    cap.insert("cpu".to_string(), Quantity(ctx.capacity.cpu.clone()));
    cap.insert("memory".to_string(), Quantity(ctx.capacity.memory.clone()));
    cap.insert("pods".to_string(), Quantity(ctx.capacity.pods.clone()));
    cap.insert("ephemeral-storage".to_string(), Quantity("100Gi".into()));
    NodeStatus {
        capacity: Some(cap.clone()),
        allocatable: Some(cap),
        conditions: Some(conditions(now, since)),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: ctx.host_ip.clone(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: ctx.node_name.clone(),
            },
        ]),
        daemon_endpoints: Some(NodeDaemonEndpoints::default()),
        node_info: Some(NodeSystemInfo {
            architecture: go_arch().into(),
            boot_id: String::new(),
            container_runtime_version: "localnode://none".into(),
            kernel_version: String::new(),
            kube_proxy_version: String::new(),
            kubelet_version: format!("localnode-{}", env!("CARGO_PKG_VERSION")),
            machine_id: String::new(),
            operating_system: "linux".into(),
            os_image: "localnode (test stand-in for kubelet; no container runtime)".into(),
            system_uuid: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node (or takes over an existing one of the same name) and marks it Ready.
pub async fn register(ctx: &NodeContext) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let labels = node_labels(&ctx.node_name, &ctx.labels);
    let node = Node {
        metadata: ObjectMeta {
            name: Some(ctx.node_name.clone()),
            labels: Some(labels.clone()),
            annotations: Some(
                [(
                    "caduceus.dev/localnode".to_string(),
                    "a test stand-in for kubelet that runs pods as local processes".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec::default()),
        status: None,
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => info!(node = %ctx.node_name, "registered node"),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            info!(node = %ctx.node_name, "node exists; taking it over");
            let patch = serde_json::json!({"metadata": {"labels": labels}});
            api.patch(&ctx.node_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Err(e) => return Err(anyhow::anyhow!("creating Node {}: {e}", ctx.node_name)),
    }
    post_status(ctx, ctx.started).await?;
    remove_startup_taints(ctx).await?;
    Ok(())
}

async fn post_status(ctx: &NodeContext, since: Timestamp) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let status = node_status(ctx, Timestamp::now(), since);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(&ctx.node_name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

async fn remove_startup_taints(ctx: &NodeContext) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let node = api.get(&ctx.node_name).await?;
    let taints: Vec<Taint> = node.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept: Vec<Taint> = taints
        .iter()
        .filter(|t| !STARTUP_TAINTS.contains(&t.key.as_str()))
        .cloned()
        .collect();
    if kept.len() != taints.len() {
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": kept},
        });
        api.patch(&ctx.node_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        info!(node = %ctx.node_name, "removed the not-ready startup taints");
    }
    Ok(())
}

async fn renew_lease(ctx: &NodeContext) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(ctx.node_name.clone()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(ctx.node_name.clone()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..Default::default()
        }),
    };
    let pp = PatchParams::apply("localnode").force();
    api.patch(&ctx.node_name, &pp, &Patch::Apply(&lease)).await?;
    Ok(())
}

/// Posts node status and renews the Lease every `every`, forever. Also re-removes startup taints in
/// case the Node was re-created.
pub async fn heartbeat(ctx: std::sync::Arc<NodeContext>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = post_status(&ctx, ctx.started).await {
            warn!("node heartbeat: {e}");
            if let Err(e) = register(&ctx).await {
                warn!("re-registering node: {e}");
            }
        }
        if let Err(e) = renew_lease(&ctx).await {
            warn!("node lease: {e}");
        }
    }
}

/// The first Lease write, at startup.
pub async fn init_lease(ctx: &NodeContext) {
    if let Err(e) = renew_lease(ctx).await {
        warn!("node lease: {e}");
    }
}
