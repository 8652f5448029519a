//! Shared helpers of the control-plane tests. They run against the cluster that `e2e/cluster.sh up`
//! (`make cluster-up`) started, found through `KUBECONFIG`; without it they fail, never skip.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

/// The kubeconfig of the test cluster. Panics (fails the test) when it is not set.
pub fn kubeconfig() -> PathBuf {
    match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "KUBECONFIG={} does not exist: start the local control plane with `make cluster-up` \
                 (or `e2e/cluster.sh up`), or run everything with `make test`",
                p.display()
            );
            p
        }
        None => panic!(
            "KUBECONFIG is not set: these control-plane tests need a cluster. Run `make test`, or \
             `export KUBECONFIG=$(make -s cluster-up)` (or `e2e/cluster.sh up`) and run them again"
        ),
    }
}

pub async fn client() -> Client {
    let path = kubeconfig();
    let kc = Kubeconfig::read_from(&path).expect("reading KUBECONFIG");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("loading KUBECONFIG");
    Client::try_from(cfg).expect("building a client")
}

/// The repository root (the parent of `e2e/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e has a parent")
        .to_path_buf()
}

/// kubectl of the same version as the cluster: `$KUBECTL`, the one `cluster.sh` linked next to the
/// kubeconfig, or the cached build.
pub fn kubectl_path() -> PathBuf {
    if let Some(k) = std::env::var_os("KUBECTL").filter(|v| !v.is_empty()) {
        return PathBuf::from(k);
    }
    let kc = kubeconfig();
    let beside = kc.parent().map(|d| d.join("bin/kubectl"));
    if let Some(b) = beside.filter(|b| b.exists()) {
        return b;
    }
    let out = Command::new(repo_root().join("e2e/controlplane/build.sh"))
        .output()
        .expect("running e2e/controlplane/build.sh");
    assert!(
        out.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("kubectl")
}

/// Runs kubectl against the test cluster.
pub fn kubectl(args: &[&str]) -> Output {
    Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .output()
        .expect("running kubectl")
}

/// Runs kubectl and fails the test unless it succeeds; returns stdout.
pub fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {} failed:\nstdout: {}\nstderr: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The state dir of the cluster (where cluster.sh keeps logs and localnode keeps pod dirs).
/// Applies the CRDs from `crds/` (server-side) and waits until each is established.
pub fn install_crds() {
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        repo_root().join("crds").to_str().unwrap(),
    ]);
    for c in ["federatedstudies", "hospitalclients", "trainingrounds"] {
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{c}.fl.caduceus.dev"),
        ]);
    }
}

pub fn cluster_dir() -> PathBuf {
    kubeconfig()
        .parent()
        .expect("the kubeconfig has a parent dir")
        .to_path_buf()
}

/// A name that does not collide with earlier or parallel runs.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{:x}{:x}", std::process::id() % 4096, nanos % 65536)
}

/// Polls `f` until it returns `Some`, or fails the test after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A namespace for one test, deleted when the guard drops (also when the test panics).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = unique(prefix);
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"caduceus.dev/e2e": "true"}},
        }))
        .unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("creating the test namespace");
        // Pods are rejected until the ServiceAccount controller has made `default`.
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_for("the default ServiceAccount", Duration::from_secs(30), || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten() }
        })
        .await;
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Synchronous, so that it also runs during a panic; the namespace controller does the rest.
        let _ = Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .output();
    }
}

/// Deletes a namespace and waits until it is gone.
pub async fn delete_namespace_and_wait(client: &Client, name: &str, timeout: Duration) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    wait_for(&format!("namespace {name} to be deleted"), timeout, || {
        let api = api.clone();
        async move {
            match api.get_opt(name).await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await;
}

// Study fixtures shared by the operator and chart tests.

pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CADUCEUS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug")
}

pub fn data_dir() -> PathBuf {
    std::env::var_os("CADUCEUS_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/data"))
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Hospital shards (train/ and val/ manifests pointing at the shared images).
pub fn make_shards(dir: &Path, hospitals: usize) {
    let caduceus = bin_dir().join("caduceus");
    run(Command::new(&caduceus)
        .args(["data", "import", "--out"])
        .arg(dir.join("manifest"))
        .arg("--data-dir")
        .arg(data_dir().join("utkface-64")));
    run(Command::new(&caduceus)
        .args(["data", "split", "--manifest"])
        .arg(dir.join("manifest"))
        .args([
            "--hospitals",
            &hospitals.to_string(),
            "--limit",
            &(hospitals * 200).to_string(),
            "--scheme",
            "iid",
            "--out",
        ])
        .arg(dir.join("split")));
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

/// A plain HTTP/1.0 GET on loopback; returns the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to the metrics port");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "GET {path}: {head}"
    );
    body.to_string()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn apply(yaml: &str) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    kubectl_ok(&["apply", "-f", f.path().to_str().unwrap()]);
}

/// A hospital namespace with its data claim filled with shard `shard` (None: an empty claim).
#[allow(clippy::too_many_arguments)]
pub async fn hospital(
    client: &Client,
    ns: &str,
    name: &str,
    shard: Option<&Path>,
    budget: f64,
    consents: &[String],
    network: &str,
    path: &str,
) {
    apply(&format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: faces, namespace: {ns}}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: fl.caduceus.dev/v1alpha1
kind: HospitalClient
metadata: {{name: {name}, namespace: {ns}, labels: {{caduceus.dev/network: {network}}}}}
spec:
  data: {{claimName: faces, path: {path}}}
  privacyBudget: {{epsilon: {budget}, delta: 1.0e-5}}
  consentedStudies: [{}]
"#,
        consents.join(", ")
    ));
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    wait_for("the data claim to be bound", Duration::from_secs(60), || {
        let pvcs = pvcs.clone();
        async move {
            let p = pvcs.get_opt("faces").await.ok().flatten()?;
            (p.status?.phase.as_deref() == Some("Bound")).then_some(())
        }
    })
    .await;
    if let Some(s) = shard {
        copy_dir(
            s,
            &cluster_dir().join("localnode/pvcs").join(ns).join("faces/shard"),
        );
    }
}

/// The DP-SGD schedule of the test studies: noise multiplier, Poisson rate and steps per round.
pub const SIGMA: f64 = 1.0;
pub const Q: f64 = 0.05;
pub const STEPS: u64 = 3;

/// A small-cnn study with DP-SGD and TFHE over the hospitals labelled `network`, and its model-store claim.
pub fn study_yaml(ns: &str, name: &str, network: &str, rounds: u32, min: u32, deadline: u32) -> String {
    format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: models, namespace: {ns}}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: fl.caduceus.dev/v1alpha1
kind: FederatedStudy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  model: {{architecture: small-cnn}}
  task: {{label: gender, sensitiveAttributes: [race]}}
  rounds: {{total: {rounds}, minHospitals: {min}, deadlineSeconds: {deadline}, maxRetries: 1}}
  training: {{steps: {STEPS}, batchSize: 16, learningRate: 0.001}}
  privacy: {{noiseMultiplier: {SIGMA}, sampleRate: {Q}, clipNorm: 1.0, delta: 1.0e-5}}
  secureAggregation: {{mode: Tfhe}}
  fairness: {{minGroupSize: 5, degradedAfterRounds: 2}}
  hospitalSelector: {{matchLabels: {{caduceus.dev/network: {network}}}}}
  modelStore: {{claimName: models}}
"#
    )
}

/// `yaml` (of [`study_yaml`]) with its study suspended: it publishes its consent hash but starts no
/// round until [`resume`], so a test can have every hospital consent before the first round picks its
/// participants (`spec.suspend` is not among the terms consent covers).
pub fn suspended(yaml: &str) -> String {
    let out = yaml.replacen("\nspec:\n  model:", "\nspec:\n  suspend: true\n  model:", 1);
    assert_ne!(out, yaml, "no FederatedStudy spec to suspend in:\n{yaml}");
    out
}

/// Lifts `spec.suspend` from a study made with [`suspended`].
pub async fn resume(client: &Client, study_ns: &str, study: &str) {
    let api: Api<caduceus_crds::FederatedStudy> = Api::namespaced(client.clone(), study_ns);
    let patch = serde_json::json!({"spec": {"suspend": false}});
    api.patch(
        study,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .expect("resuming the study");
}

/// The study's consent hash, once the operator has published it in `status.consentHash`.
pub async fn consent_hash(client: &Client, study_ns: &str, study: &str) -> String {
    let api: Api<caduceus_crds::FederatedStudy> = Api::namespaced(client.clone(), study_ns);
    wait_for(
        &format!("{study_ns}/{study}'s consent hash"),
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move { api.get_opt(study).await.ok().flatten()?.status?.consent_hash }
        },
    )
    .await
}

/// What a hospital's owner does to join a study: reads the study's consent hash and lists
/// `consented` with `study_ref@hash` in place of any earlier entry for `study_ref`.
pub fn with_consent(consented: Vec<String>, study_ref: &str, hash: &str) -> Vec<String> {
    let mut list: Vec<String> = consented
        .into_iter()
        .filter(|c| c.split('@').next() != Some(study_ref))
        .collect();
    list.push(format!("{study_ref}@{hash}"));
    list
}

/// `namespace/name@hash` in `consentedStudies` (replacing a bare or older entry for the study).
pub async fn consent(client: &Client, study_ns: &str, study: &str, hospitals: &[(&str, &str)]) -> String {
    let hash = consent_hash(client, study_ns, study).await;
    let study_ref = format!("{study_ns}/{study}");
    for (hns, name) in hospitals {
        let api: Api<caduceus_crds::HospitalClient> = Api::namespaced(client.clone(), hns);
        let h = api.get(name).await.expect("the hospital to consent");
        let list = with_consent(h.spec.consented_studies, &study_ref, &hash);
        let patch = serde_json::json!({"spec": {"consentedStudies": list}});
        api.patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("patching consentedStudies");
    }
    hash
}

/// A child process killed when the test ends (also when it panics).
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET on loopback (HTTP/1.0); the JSON body of a 200 answer, else `None`.
pub fn get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    if !(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200")) {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// A tool the tests build from a Go module: `$var` (the Makefile sets it), or the path that `script`
/// (a build cached by version) prints.
pub fn tool_path(var: &str, script: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    PathBuf::from(run(&mut Command::new(repo_root().join(script))).trim())
}

/// The Helm CLI (`$CADUCEUS_HELM`, or `tools/helm/build.sh`).
pub fn helm_path() -> PathBuf {
    tool_path("CADUCEUS_HELM", "tools/helm/build.sh")
}

/// `helm` against the test cluster; its stdout, failing the test when it fails.
pub fn helm(args: &[&str]) -> String {
    run(Command::new(helm_path())
        .env("KUBECONFIG", kubeconfig())
        .args(args))
}

/// Jaeger all-in-one (`e2e/jaeger/config.yaml`, in-memory storage; `$CADUCEUS_JAEGER` or
/// `e2e/jaeger/build.sh`) receiving OTLP/gRPC on `otlp_addr`, its query API on 127.0.0.1:`query`,
/// logging to `log` (or nowhere); returns once the query API answers.
pub async fn start_jaeger(otlp_addr: &str, query: u16, log: Option<&Path>) -> Killed {
    let (out, err) = match log {
        Some(l) => {
            let f = std::fs::File::create(l).expect("creating Jaeger's log");
            (Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
        }
        None => (Stdio::null(), Stdio::null()),
    };
    let jaeger = Killed(
        Command::new(tool_path("CADUCEUS_JAEGER", "e2e/jaeger/build.sh"))
            .arg("--config")
            .arg(format!(
                "file:{}",
                repo_root().join("e2e/jaeger/config.yaml").display()
            ))
            .env("JAEGER_OTLP_GRPC", otlp_addr)
            .env("JAEGER_QUERY_HTTP", format!("127.0.0.1:{query}"))
            .env("JAEGER_QUERY_GRPC", format!("127.0.0.1:{}", free_port()))
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting jaeger"),
    );
    wait_for("Jaeger's query API", Duration::from_secs(60), || async {
        get_json(query, "/api/services")
    })
    .await;
    jaeger
}
