//! The chart on the real node (`NODE=real`, `make e2e-node`): containerd and runc run the images of
//! `make images`, the CNI bridge gives every pod its own network namespace, kube-router enforces the
//! chart's NetworkPolicies, CoreDNS answers the pods' lookups. What the other tests only declare is
//! checked here on the running processes, from the host (`/proc`, `nsenter`):
//!
//! 1. `helm install` from the imported images into a namespace that enforces the restricted Pod
//!    Security profile (the time to a Ready operator is printed, for docs/benchmarks.md);
//! 2. the operator's, the aggregator's and the trainers' processes run as uid 65532 with no
//!    capabilities, `no_new_privs`, a seccomp filter and a read-only root filesystem; only the operator
//!    has a ServiceAccount token mounted;
//! 3. while a round runs (its two trainers stopped with SIGSTOP so that their pods stay up): hospital
//!    A's trainer reaches the aggregator but neither hospital B's pod nor the API server; the
//!    aggregator reaches neither the API server nor a trainer; the operator reaches the API server and
//!    not the kubelet; then the study completes;
//! 4. the pods' spans reach Jaeger (a host process on the node's bridge address) through the egress
//!    that `networkPolicy.tracing` opens: the round's trainers of both hospitals, the aggregator and the
//!    operator are in its query API;
//! 5. with hospital A's `caduceus-trainer` NetworkPolicy deleted, the next study's round fails: the
//!    policies are what lets a study work.
//!
//! On `localnode` (the default cluster of `make e2e`) this test has nothing to check and says so; with
//! `CADUCEUS_REQUIRE_REAL_NODE=1` (set by `make e2e-node`) it fails instead.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::{FederatedStudy, TrainingRound};
use common::{
    Killed, TestNamespace, apply, client, cluster_dir, consent, get_json, helm, install_crds, kubectl_ok,
    make_shards, repo_root, run, start_jaeger, study_yaml, unique, wait_for,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The image user of images/Dockerfile and images/build-oci.sh.
const IMAGE_UID: &str = "65532";

fn cluster_env() -> HashMap<String, String> {
    let text = std::fs::read_to_string(cluster_dir().join("cluster.env")).expect("reading cluster.env");
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Whether the cluster runs the real node; fails when it must (`CADUCEUS_REQUIRE_REAL_NODE=1`).
fn real_node() -> bool {
    let kind = cluster_env()
        .get("NODE_KIND")
        .cloned()
        .unwrap_or_else(|| "localnode".into());
    if kind == "real" {
        return true;
    }
    assert!(
        std::env::var("CADUCEUS_REQUIRE_REAL_NODE").as_deref() != Ok("1"),
        "CADUCEUS_REQUIRE_REAL_NODE=1 but the cluster's node is {kind}: start it with `NODE=real e2e/cluster.sh up` \
         (`make e2e-node` does)"
    );
    eprintln!("node test: nothing to check on the {kind} node (run `make e2e-node` for the real node)");
    false
}

/// The host PID of a container's first process (the one that is PID 1 in its PID namespace), found by
/// the container's id in the cgroups of every process.
fn container_pid(container_id: &str) -> Option<i32> {
    let id = container_id.rsplit("://").next().unwrap_or(container_id);
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if !cg.contains(id) {
            continue;
        }
        let st = proc_status(pid);
        if st
            .get("NSpid")
            .is_some_and(|v| v.split_whitespace().last() == Some("1"))
        {
            return Some(pid);
        }
    }
    None
}

fn proc_status(pid: i32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The mounts of a process: (mount point, options).
fn mounts(pid: i32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 5).then(|| (f[4].to_string(), f[5].to_string()))
        })
        .collect()
}

/// What the chart's securityContext promises, read from the running process.
fn assert_confined(what: &str, pid: i32, token_expected: bool) {
    let st = proc_status(pid);
    let uids: Vec<&str> = st
        .get("Uid")
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(
        uids,
        vec![IMAGE_UID; 4],
        "{what} (pid {pid}): real, effective, saved and fs uid"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            st.get(cap).map(String::as_str),
            Some("0000000000000000"),
            "{what} (pid {pid}): {cap}"
        );
    }
    assert_eq!(
        st.get("NoNewPrivs").map(String::as_str),
        Some("1"),
        "{what} (pid {pid}): no_new_privs"
    );
    // 2: a seccomp filter (RuntimeDefault, containerd's default profile) is installed.
    assert_eq!(
        st.get("Seccomp").map(String::as_str),
        Some("2"),
        "{what} (pid {pid}): seccomp mode"
    );
    let m = mounts(pid);
    let root = m
        .iter()
        .find(|(p, _)| p == "/")
        .unwrap_or_else(|| panic!("{what}: no / mount in {m:?}"));
    assert!(
        root.1.split(',').any(|o| o == "ro"),
        "{what} (pid {pid}): the root filesystem is {}",
        root.1
    );
    let token = m
        .iter()
        .any(|(p, _)| p.contains("/var/run/secrets/kubernetes.io/serviceaccount"));
    assert_eq!(
        token, token_expected,
        "{what} (pid {pid}): a ServiceAccount token is mounted: {token}"
    );
}

/// Whether a TCP connection from the network namespace of `pid` to `ip:port` opens within 3 s.
fn connects(pid: i32, ip: &str, port: u16) -> bool {
    Command::new("timeout")
        .args(["3", "nsenter", "-t", &pid.to_string(), "-n", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{ip}/{port}"))
        .stderr(Stdio::null())
        .status()
        .expect("running nsenter")
        .success()
}

/// A TCP listener on `port` in the network namespace of `pid` (a host process, in the pod's network
/// only), so that a refused connection is told apart from one that a policy drops.
fn listen_in(pid: i32, port: u16) -> Killed {
    let child = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
             s.bind(('0.0.0.0',{port}))\ns.listen(16)\nwhile True:\n    c,_=s.accept()\n    c.close()\n"
        ))
        .spawn()
        .expect("starting a listener");
    std::thread::sleep(Duration::from_millis(500));
    Killed(child)
}

/// The values of span tag `key` in the traces of `service` that Jaeger's query API holds.
fn tag_values(query: u16, service: &str, key: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(v) = get_json(query, &format!("/api/traces?service={service}&limit=50")) else {
        return out;
    };
    for t in v["data"].as_array().into_iter().flatten() {
        for sp in t["spans"].as_array().into_iter().flatten() {
            for tag in sp["tags"].as_array().into_iter().flatten() {
                if tag["key"].as_str() == Some(key)
                    && let Some(val) = tag["value"].as_str()
                {
                    out.insert(val.to_string());
                }
            }
        }
    }
    out
}

struct Running {
    name: String,
    ip: String,
    pid: i32,
}

/// The first running pod of `component` in `ns`, with its container's host PID.
async fn running_pod(client: &Client, ns: &str, component: &str) -> Option<Running> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/component={component}"));
    for p in pods.list(&lp).await.ok()?.items {
        let st = p.status.clone()?;
        let ip = st.pod_ip.clone()?;
        let cs = st.container_statuses?.into_iter().next()?;
        if cs.state.and_then(|s| s.running).is_none() {
            continue;
        }
        let pid = container_pid(&cs.container_id?)?;
        return Some(Running {
            name: p.metadata.name.unwrap_or_default(),
            ip,
            pid,
        });
    }
    None
}

/// A hospital whose data claim is a hostPath PersistentVolume on the node holding shard `shard` and
/// the images its manifests name (so the trainer reads nothing outside its claim).
fn hospital_on_node(ns: &str, name: &str, shard: &Path, consents: &[String], network: &str) {
    let pv = cluster_dir().join("node/pv").join(format!("{ns}-faces"));
    let dst = pv.join("shard");
    common::copy_dir(shard, &dst);
    let images = dst.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for part in ["train", "val"] {
        let mf = dst.join(part).join("manifest.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&mf).unwrap()).unwrap();
        let root = PathBuf::from(json["image_root"].as_str().expect("image_root"));
        let root = if root.is_absolute() {
            root
        } else {
            shard.join(part).join(root)
        };
        let labels = dst.join(part).join(json["labels"].as_str().expect("labels"));
        for row in std::fs::read_to_string(&labels).unwrap().lines().skip(1) {
            let file = row.split(',').next().expect("a record's file");
            std::fs::copy(root.join(file), images.join(file)).unwrap();
        }
        json["image_root"] = "../images".into();
        std::fs::write(&mf, serde_json::to_vec(&json).unwrap()).unwrap();
    }
    host_path_volume(ns, "faces", &pv);
    apply(&format!(
        r#"
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {{name: {name}, namespace: {ns}, labels: {{caduceus.dev/network: {network}}}}}
spec:
  data: {{claimName: faces, path: /shard}}
  privacyBudget: {{epsilon: 20.0, delta: 1.0e-5}}
  consentedStudies: [{}]
"#,
        consents.join(", ")
    ));
}

/// A PersistentVolume at `dir` on the node, bound to the claim `ns/claim`, owned by the image user
/// (what a provisioner with the pods' fsGroup would give).
fn host_path_volume(ns: &str, claim: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    run(Command::new("chown")
        .args(["-R", &format!("{IMAGE_UID}:{IMAGE_UID}")])
        .arg(dir));
    let pv = format!("{ns}-{claim}");
    apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {pv}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  hostPath: {{path: {dir}, type: Directory}}
  claimRef: {{namespace: {ns}, name: {claim}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {claim}, namespace: {ns}}}
spec: {{accessModes: [ReadWriteOnce], storageClassName: "", volumeName: {pv}, resources: {{requests: {{storage: 1Gi}}}}}}
"#,
        dir = dir.display()
    ));
}

/// The study yaml of [`study_yaml`] without its model-store claim (made by [`host_path_volume`]).
fn study_on_node(ns: &str, name: &str, network: &str, deadline: u32) -> String {
    let yaml = study_yaml(ns, name, network, 1, 2, deadline);
    let (_, study) = yaml.split_once("---").expect("the claim, then the study");
    study.to_string()
}

async fn study_end(client: &Client, ns: &str, name: &str, timeout: Duration) -> (String, String) {
    let studies: Api<FederatedStudy> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("study {name} to finish"), timeout, || {
        let studies = studies.clone();
        async move {
            let s = studies.get_opt(name).await.ok().flatten()?;
            let c = s.status?.conditions.condition(types::READY)?.clone();
            ["Completed", "RoundFailed", "Invalid", "PrivacyBudgetExhausted"]
                .contains(&c.reason.as_str())
                .then_some((c.reason, c.message))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_on_the_real_node_confines_every_pod() {
    if !real_node() {
        return;
    }
    let env = cluster_env();
    let api_port: u16 = env["API_PORT"].parse().unwrap();
    let node_dir = cluster_dir().join("node");
    let kubelet_port: u16 = std::fs::read_to_string(node_dir.join("kubelet.yaml"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("port: "))
        .expect("the kubelet's port")
        .trim()
        .parse()
        .unwrap();
    let gw = "10.88.0.1";
    let client = client().await;
    install_crds();

    let op_ns = TestNamespace::create(&client, "e2e-node").await;
    kubectl_ok(&[
        "label",
        "namespace",
        &op_ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ]);
    let sns = TestNamespace::create(&client, "e2e-node-study").await;
    let h0 = TestNamespace::create(&client, "e2e-node-h0").await;
    let h1 = TestNamespace::create(&client, "e2e-node-h1").await;
    let release = unique("node");

    // Jaeger on the host: OTLP on the node's bridge address (the pods' egress goes there), the query API
    // on loopback.
    let (otlp, query) = (common::free_port(), common::free_port());
    let _jaeger = start_jaeger(&format!("{gw}:{otlp}"), query, None).await;

    // 1. Install from the images imported into the node's containerd (never pulled).
    let t0 = Instant::now();
    let out = helm(&[
        "install",
        &release,
        repo_root().join("charts/caduceus").to_str().unwrap(),
        "-n",
        &op_ns.name,
        "--set",
        "crds.create=false",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        &format!("namespaces.studies={{{}}}", sns.name),
        "--set",
        &format!("namespaces.hospitals={{{},{}}}", h0.name, h1.name),
        "--set",
        &format!("networkPolicy.apiServer.cidrs={{{gw}/32}}"),
        "--set",
        &format!("networkPolicy.apiServer.ports={{{api_port}}}"),
        "--set",
        &format!("networkPolicy.dns.cidrs={{{gw}/32}}"),
        "--set",
        &format!("tracing.otlpEndpoint=http://{gw}:{otlp}"),
        "--set-json",
        &format!(r#"networkPolicy.tracing.to=[{{"ipBlock":{{"cidr":"{gw}/32"}}}}]"#),
        "--set",
        &format!("networkPolicy.tracing.ports={{{otlp}}}"),
        "--set",
        "logJson=false",
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    eprintln!(
        "node test: helm install to a Ready operator: {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // 2. The operator's process.
    let op = wait_for("the operator's container", Duration::from_secs(30), || {
        let client = client.clone();
        let ns = op_ns.name.clone();
        async move { running_pod(&client, &ns, "operator").await }
    })
    .await;
    assert_confined("the operator", op.pid, true);
    assert!(
        connects(op.pid, gw, api_port),
        "the operator cannot reach the API server"
    );
    assert!(
        !connects(op.pid, gw, kubelet_port),
        "the operator reaches the kubelet's port"
    );

    // 3. A study whose round is held while its pods are examined.
    let work = tempfile::tempdir().unwrap();
    make_shards(work.path(), 2);
    let network = unique("nodenet");
    let consents = vec![format!("{}/faces", sns.name), format!("{}/blocked", sns.name)];
    for (i, h) in [&h0, &h1].iter().enumerate() {
        let shard = work.path().join(format!("split/hospital-{i}"));
        hospital_on_node(&h.name, &format!("hospital-{i}"), &shard, &consents, &network);
    }
    host_path_volume(
        &sns.name,
        "models",
        &node_dir.join("pv").join(format!("{}-models", sns.name)),
    );
    apply(&study_on_node(&sns.name, "faces", &network, 600));
    let hospitals = [(h0.name.as_str(), "hospital-0"), (h1.name.as_str(), "hospital-1")];
    consent(&client, &sns.name, "faces", &hospitals).await;

    // Stop each trainer as soon as it runs (its pod and network namespace stay).
    let mut stopped: Vec<Option<Running>> = vec![None, None];
    let deadline = Instant::now() + Duration::from_secs(300);
    while stopped.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "the trainers did not both run within 300 s"
        );
        for (i, h) in [&h0, &h1].iter().enumerate() {
            if stopped[i].is_none()
                && let Some(t) = running_pod(&client, &h.name, "trainer").await
            {
                signal(t.pid, libc::SIGSTOP);
                stopped[i] = Some(t);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = stopped[0].take().unwrap();
    let b = stopped[1].take().unwrap();
    let agg = running_pod(&client, &sns.name, "aggregator")
        .await
        .expect("the aggregator runs");
    eprintln!(
        "node test: held trainers {} ({}) and {} ({}); aggregator {} ({})",
        a.name, a.ip, b.name, b.ip, agg.name, agg.ip
    );
    let checks = std::panic::catch_unwind(|| {
        assert_confined("hospital A's trainer", a.pid, false);
        assert_confined("hospital B's trainer", b.pid, false);
        assert_confined("the aggregator", agg.pid, false);
        let _listener = listen_in(b.pid, 8080);
        assert!(
            connects(b.pid, &b.ip, 8080),
            "the probe listener in B's pod does not answer"
        );
        assert!(
            connects(a.pid, &agg.ip, 50051),
            "hospital A's trainer cannot reach the aggregator"
        );
        assert!(
            !connects(a.pid, &b.ip, 8080),
            "hospital A's trainer reaches hospital B's pod"
        );
        assert!(
            !connects(a.pid, gw, api_port),
            "hospital A's trainer reaches the API server"
        );
        assert!(
            !connects(a.pid, "10.0.0.1", 443),
            "hospital A's trainer reaches the kubernetes Service"
        );
        assert!(
            !connects(agg.pid, gw, api_port),
            "the aggregator reaches the API server"
        );
        assert!(
            !connects(agg.pid, &b.ip, 8080),
            "the aggregator opens a connection to a trainer"
        );
    });
    for t in [&a, &b] {
        signal(t.pid, libc::SIGCONT);
    }
    if let Err(e) = checks {
        std::panic::resume_unwind(e);
    }
    let (reason, msg) = study_end(&client, &sns.name, "faces", Duration::from_secs(600)).await;
    assert_eq!(reason, "Completed", "{msg}");

    // 4. The spans of the round's pods left them through the chart's tracing egress.
    let hospitals_traced = wait_for(
        "both hospitals' trainer spans in Jaeger",
        Duration::from_secs(60),
        || async {
            let h = tag_values(query, "caduceus-trainer", "caduceus.hospital");
            (h.len() >= 2).then_some(h)
        },
    )
    .await;
    eprintln!("node test: trainer spans in Jaeger from {hospitals_traced:?}");
    for service in ["caduceus-aggregator", "caduceus-operator"] {
        let studies = tag_values(query, service, "caduceus.study");
        assert!(
            !studies.is_empty(),
            "no span of {service} with a caduceus.study tag in Jaeger"
        );
    }

    // 5. Without hospital A's trainer policy its trainer reaches nothing (the namespace's default
    //    deny), and the next study's round fails.
    kubectl_ok(&["delete", "networkpolicy", "caduceus-trainer", "-n", &h0.name]);
    apply(&study_on_node(&sns.name, "blocked", &network, 40));
    consent(&client, &sns.name, "blocked", &hospitals).await;
    let (reason, msg) = study_end(&client, &sns.name, "blocked", Duration::from_secs(400)).await;
    assert_eq!(
        reason, "RoundFailed",
        "the study ran with hospital A's trainer policy deleted: {msg}"
    );
    let rounds: Api<TrainingRound> = Api::namespaced(client.clone(), &sns.name);
    let failed = rounds.list(&ListParams::default()).await.unwrap().items;
    assert!(
        failed
            .iter()
            .filter(|r| r
                .metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("blocked")))
            .all(|r| !r
                .status
                .as_ref()
                .is_some_and(|s| s.conditions.is_true(types::SUCCEEDED))),
        "a round of the blocked study succeeded"
    );
    helm(&[
        "uninstall",
        &release,
        "-n",
        &op_ns.name,
        "--wait",
        "--timeout",
        "120s",
    ]);
}
