//! Several local control planes side by side (one per `e2e/cluster.sh` state dir), for the tests that
//! need more than the one shared cluster (`KUBECONFIG`) of the other tests: the coordinator and site
//! clusters of `tests/sites.rs`. Every call names its cluster; nothing here reads `KUBECONFIG`.
//! Included with `#[path = "common/cluster.rs"] mod cluster;` next to `mod common;`.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ServiceAccount};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};

use crate::common::{bin_dir, copy_dir, repo_root, wait_for};

/// The directory of the cached control-plane binaries (what `e2e/controlplane/build.sh` prints), if
/// they are all there. Found without building: a test skips rather than start a cold Go build.
pub fn controlplane_bins() -> Option<PathBuf> {
    let dir = repo_root().join("e2e/controlplane");
    let modver = |module: &str, file: &Path| -> Option<String> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["require", m, v, ..] if *m == module => Some(v.to_string()),
                [m, v, ..] if *m == module && v.starts_with('v') => Some(v.to_string()),
                _ => None,
            }
        })
    };
    let k8s = modver("k8s.io/kubernetes", &dir.join("k8s/go.mod"))?;
    let etcd = modver("go.etcd.io/etcd/server/v3", &dir.join("etcd/go.mod"))?;
    let cache = std::env::var_os("CADUCEUS_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/caduceus")))?;
    let out = cache.join(format!("controlplane/k8s-{k8s}-etcd-{etcd}"));
    [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "etcd",
    ]
    .iter()
    .all(|b| out.join(b).is_file())
    .then_some(out)
}

/// One local control plane with its own localnode, started by `e2e/cluster.sh up` in state dir
/// `dir`, stopped (`e2e/cluster.sh down`) when dropped, also during a panic. `CADUCEUS_KEEP_CLUSTERS=1`
/// leaves it running for a look afterwards.
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub api_port: u16,
}

fn cluster_sh(dir: &Path, verb: &str, extra_apiserver_args: &str) -> Output {
    let mut c = Command::new(repo_root().join("e2e/cluster.sh"));
    c.arg(verb)
        .env("CADUCEUS_CLUSTER_DIR", dir)
        .env("LOCALNODE_BIN", bin_dir().join("localnode"))
        .env("CADUCEUS_BIN_DIR", bin_dir())
        .stdin(Stdio::null());
    if !extra_apiserver_args.is_empty() {
        c.env("CLUSTER_APISERVER_EXTRA_ARGS", extra_apiserver_args);
    }
    c.output().expect("running e2e/cluster.sh")
}

impl Cluster {
    /// Starts (after stopping whatever an earlier run left in `dir`) a cluster.
    pub fn up(name: &str, dir: &Path, extra_apiserver_args: &str) -> Self {
        let _ = cluster_sh(dir, "down", "");
        let t0 = Instant::now();
        let mut out = cluster_sh(dir, "up", extra_apiserver_args);
        if !out.status.success() {
            // Clusters started side by side can, rarely, pick the same free port: once more.
            eprintln!(
                "cluster {name}: up failed, retrying once:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = cluster_sh(dir, "down", "");
            out = cluster_sh(dir, "up", extra_apiserver_args);
        }
        assert!(
            out.status.success(),
            "e2e/cluster.sh up ({name}, {}) failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("cluster.env")).expect("cluster.env");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing from cluster.env"))
                .to_string()
        };
        let c = Cluster {
            name: name.into(),
            dir: dir.to_path_buf(),
            kubeconfig: PathBuf::from(get("KUBECONFIG")),
            kubectl: PathBuf::from(get("KUBECTL")),
            api_port: get("API_PORT").parse().expect("API_PORT"),
        };
        eprintln!(
            "cluster {name} up in {:.1}s: API server 127.0.0.1:{}, state {}",
            t0.elapsed().as_secs_f64(),
            c.api_port,
            dir.display()
        );
        c
    }

    /// Starts several clusters at once: `(name, state dir, extra kube-apiserver args)`.
    pub fn up_all(specs: &[(&str, PathBuf, String)]) -> Vec<Cluster> {
        std::thread::scope(|s| {
            let hs: Vec<_> = specs
                .iter()
                .enumerate()
                .map(|(i, (n, d, a))| {
                    s.spawn(move || {
                        // A small stagger: the port picks of cluster.sh do not race as often.
                        std::thread::sleep(Duration::from_millis(700 * i as u64));
                        Cluster::up(n, d, a)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("starting a cluster"))
                .collect()
        })
    }

    pub async fn client(&self) -> Client {
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("loading the kubeconfig");
        Client::try_from(cfg).expect("building a client")
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl")
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "[{}] kubectl {} failed:\nstdout: {}\nstderr: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply(&self, yaml: &str) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), yaml).unwrap();
        self.kubectl_ok(&["apply", "-f", f.path().to_str().unwrap()]);
    }

    /// The CRDs from `crds/`, established.
    pub fn install_crds(&self) {
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            repo_root().join("crds").to_str().unwrap(),
        ]);
        for c in ["federatedstudies", "hospitalclients", "trainingrounds"] {
            self.kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{c}.fl.caduceus.dev"),
            ]);
        }
    }

    /// A namespace, with its `default` ServiceAccount (Pods are refused before it exists).
    pub async fn namespace(&self, client: &Client, name: &str) {
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{caduceus.dev/e2e: \"true\"}}}}\n"
        ));
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
        wait_for(
            &format!("[{}] the default ServiceAccount of {name}", self.name),
            Duration::from_secs(60),
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok().flatten() }
            },
        )
        .await;
    }

    /// Where localnode keeps the data of claim `ns/claim`.
    pub fn pvc_dir(&self, ns: &str, claim: &str) -> PathBuf {
        self.dir.join("localnode/pvcs").join(ns).join(claim)
    }

    /// A hospital of this cluster: data claim `faces` in `ns` filled with `shard` (at `/shard`), and
    /// its HospitalClient `name` labelled `caduceus.dev/network: network`, consenting to nothing yet.
    pub async fn hospital(
        &self,
        client: &Client,
        ns: &str,
        name: &str,
        shard: &Path,
        budget: f64,
        network: &str,
    ) {
        self.apply(&format!(
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
  data: {{claimName: faces, path: /shard}}
  privacyBudget: {{epsilon: {budget}, delta: 1.0e-5}}
  consentedStudies: []
"#
        ));
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        wait_for(
            &format!("[{}] the data claim {ns}/faces to be bound", self.name),
            Duration::from_secs(60),
            || {
                let pvcs = pvcs.clone();
                async move {
                    let p = pvcs.get_opt("faces").await.ok().flatten()?;
                    (p.status?.phase.as_deref() == Some("Bound")).then_some(())
                }
            },
        )
        .await;
        copy_dir(shard, &self.pvc_dir(ns, "faces").join("shard"));
    }

    /// The pids of the processes localnode runs for this cluster's Pods.
    pub fn pod_pids(&self) -> Vec<i32> {
        let marker = format!(
            "CADUCEUS_LOCALNODE_STATE_DIR={}",
            self.dir.join("localnode").display()
        );
        pids_with_env(&marker)
    }

    /// The log of a cluster component (`kube-apiserver`, `localnode`, ...).
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{component}.log"))).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the cluster looked like when the test failed, before it goes.
            let out = self.kubectl(&[
                "get",
                "federatedstudies,trainingrounds,hospitalclients,jobs,pods",
                "-A",
                "-o",
                "wide",
            ]);
            eprintln!(
                "== cluster {} at the failure:\n{}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let out = self.kubectl(&[
                "get",
                "trainingrounds,jobs",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.kind} {.metadata.namespace}/{.metadata.name}: {.status.conditions}{\"\\n\"}{end}",
            ]);
            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
        }
        if std::env::var("CADUCEUS_KEEP_CLUSTERS").as_deref() == Ok("1") {
            eprintln!(
                "cluster {} left running (CADUCEUS_KEEP_CLUSTERS=1): CADUCEUS_CLUSTER_DIR={} e2e/cluster.sh down",
                self.name,
                self.dir.display()
            );
            return;
        }
        let out = cluster_sh(&self.dir, "down", "");
        if !out.status.success() {
            eprintln!(
                "cluster {}: down failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Every live process whose environment holds `entry` (`NAME=value`) exactly.
pub fn pids_with_env(entry: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == entry.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Sends `sig` to `pid` (SIGSTOP, SIGCONT, SIGKILL ...); errors (a process already gone) are ignored.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A `caduceus-operator` process (any role) against one cluster, logging to a file (appended across
/// restarts). Killed when dropped.
pub struct OperatorProc {
    pub name: String,
    kubeconfig: PathBuf,
    args: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl OperatorProc {
    pub fn start(name: &str, cluster: &Cluster, args: Vec<String>, log: PathBuf) -> Self {
        let mut o = OperatorProc {
            name: name.into(),
            kubeconfig: cluster.kubeconfig.clone(),
            args,
            log,
            child: None,
        };
        o.spawn();
        o
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin_dir().join("caduceus-operator"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("CADUCEUS_SITES_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting caduceus-operator");
        eprintln!("{}: caduceus-operator started (pid {})", self.name, child.id());
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Whether the process has exited (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// SIGKILL, no graceful shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn kill_and_restart(&mut self, point: &str) {
        eprintln!("{}: SIGKILL ({point}) and restart", self.name);
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Socket inodes of a process's open file descriptors.
fn socket_inodes(pid: i32) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in rd.flatten() {
        if let Ok(t) = std::fs::read_link(e.path())
            && let Some(s) = t.to_str()
            && let Some(i) = s.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']'))
            && let Ok(i) = i.parse()
        {
            out.insert(i);
        }
    }
    out
}

/// TCP sockets of this network namespace: inode -> (remote port, state), IPv4 and IPv6.
fn tcp_table() -> BTreeMap<u64, (u16, u8)> {
    let mut out = BTreeMap::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for l in text.lines().skip(1) {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.len() < 10 {
                continue;
            }
            let port = w[2]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let st = u8::from_str_radix(w[3], 16).ok();
            if let (Some(port), Some(st), Ok(inode)) = (port, st, w[9].parse::<u64>())
                && inode != 0
            {
                out.insert(inode, (port, st));
            }
        }
    }
    out
}

/// One observed connection of a watched process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeenConnection {
    pub pid: i32,
    pub comm: String,
    pub remote_port: u16,
}

/// Samples, every `every`, the TCP connections of the processes `pids()` names (each pid's socket
/// inodes from `/proc/<pid>/fd` matched to `/proc/net/tcp{,6}`; `/proc/<pid>/net/tcp` alone would show
/// every socket of the network namespace), and records those to the `forbidden` remote ports and, as a
/// check that the sampling sees anything at all, those to the `expected` ports.
pub struct ConnectionWatch {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
    pub forbidden_seen: Arc<Mutex<BTreeSet<SeenConnection>>>,
    pub expected_seen: Arc<Mutex<BTreeSet<SeenConnection>>>,
    pub samples: Arc<Mutex<u64>>,
    /// Every (pid, command name) that was sampled at least once.
    pub watched: Arc<Mutex<BTreeSet<(i32, String)>>>,
}

impl ConnectionWatch {
    pub fn start(
        pids: impl Fn() -> Vec<i32> + Send + 'static,
        forbidden: Vec<u16>,
        expected: Vec<u16>,
        every: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let forbidden_seen = Arc::new(Mutex::new(BTreeSet::new()));
        let expected_seen = Arc::new(Mutex::new(BTreeSet::new()));
        let samples = Arc::new(Mutex::new(0u64));
        let watched = Arc::new(Mutex::new(BTreeSet::new()));
        let (s, f, e, n, w) = (
            stop.clone(),
            forbidden_seen.clone(),
            expected_seen.clone(),
            samples.clone(),
            watched.clone(),
        );
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let table = tcp_table();
                for pid in pids() {
                    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .unwrap_or_default()
                        .trim()
                        .to_string();
                    w.lock().unwrap().insert((pid, comm.clone()));
                    for inode in socket_inodes(pid) {
                        // Listening sockets (state 0x0A) have remote port 0.
                        let Some(&(port, st)) = table.get(&inode) else {
                            continue;
                        };
                        if st == 0x0A {
                            continue;
                        }
                        let c = SeenConnection {
                            pid,
                            comm: comm.clone(),
                            remote_port: port,
                        };
                        if forbidden.contains(&port) {
                            f.lock().unwrap().insert(c);
                        } else if expected.contains(&port) {
                            e.lock().unwrap().insert(c);
                        }
                    }
                }
                *n.lock().unwrap() += 1;
                std::thread::sleep(every);
            }
        });
        ConnectionWatch {
            stop,
            handle: Some(handle),
            forbidden_seen,
            expected_seen,
            samples,
            watched,
        }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ConnectionWatch {
    fn drop(&mut self) {
        self.stop();
    }
}
