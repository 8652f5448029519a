//! Jobs and Pods on the real control plane, run by localnode. Needs `KUBECONFIG` from
//! `e2e/cluster.sh up` (`make cluster-up`); fails without it.

mod common;

use std::time::Duration;

use common::{TestNamespace, client, cluster_dir, wait_for};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

/// The image localnode maps to its own binary (cluster.sh passes `--image-map localnode=...`).
const IMAGE: &str = "localnode:e2e";

async fn create<K>(client: &Client, ns: &str, obj: serde_json::Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let o: K = serde_json::from_value(obj).expect("a valid object");
    api.create(&PostParams::default(), &o)
        .await
        .expect("creating an object")
}

async fn pod_phase(pods: &Api<Pod>, name: &str, phases: &[&str]) -> Option<Pod> {
    let p = pods.get_opt(name).await.ok().flatten()?;
    let phase = p.status.as_ref()?.phase.clone()?;
    phases.contains(&phase.as_str()).then_some(p)
}

fn status_of<'a>(pod: &'a Pod, container: &str) -> &'a ContainerStatus {
    let s = pod.status.as_ref().expect("pod status");
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)
        .unwrap_or_else(|| panic!("no status for container {container}: {s:?}"))
}

#[tokio::test]
async fn job_with_secret_env_and_volume_completes() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-job").await;
    let n = ns.name.as_str();
    create::<k8s_openapi::api::core::v1::Secret>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
               "stringData": {"token": "s3cret value"}}),
    )
    .await;
    create::<k8s_openapi::api::core::v1::ConfigMap>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
               "data": {"mode": "federated"}}),
    )
    .await;
    let job: Job = create(
        &client,
        n,
        json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "selftest"},
            "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 600, "template": {"spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "volumes": [
                    {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "token", "path": "sub/token"}]}},
                    {"name": "cfg", "configMap": {"name": "cfg"}},
                    {"name": "scratch", "emptyDir": {}}
                ],
                "initContainers": [{
                    "name": "check-env", "image": IMAGE,
                    "args": ["selftest-env", "MODE=federated", "GREETING=hello-federated",
                             format!("NS={n}"), "POD_IP=127.0.0.1", "CFG_mode=federated",
                             "LITERAL=$$(MODE)", "!KUBECONFIG"],
                    "env": [
                        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
                        {"name": "GREETING", "value": "hello-$(MODE)"},
                        {"name": "LITERAL", "value": "$$(MODE)"},
                        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
                    ],
                    "envFrom": [{"prefix": "CFG_", "configMapRef": {"name": "cfg"}}]
                }],
                "containers": [{
                    "name": "main", "image": IMAGE,
                    "args": ["selftest-read-file", "$(CREDS_FILE)", "$(TOKEN)"],
                    "env": [
                        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                        {"name": "CREDS_FILE", "value": "/etc/creds/sub/token"}
                    ],
                    "volumeMounts": [
                        {"name": "creds", "mountPath": "/etc/creds", "readOnly": true},
                        {"name": "scratch", "mountPath": "/scratch"}
                    ]
                }]
            }}}
        }),
    )
    .await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), n);
    let name = job.metadata.name.clone().unwrap();
    let done = wait_for("the Job to finish", Duration::from_secs(90), || {
        let jobs = jobs.clone();
        let name = name.clone();
        async move {
            let j = jobs.get(&name).await.ok()?;
            let conds = j.status.as_ref()?.conditions.clone()?;
            conds
                .iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
                .then_some(j)
        }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await
        .unwrap();
    let pod = list.items.first().expect("the Job's pod");
    let conds = done.status.unwrap().conditions.unwrap();
    assert!(
        conds.iter().any(|c| c.type_ == "Complete" && c.status == "True"),
        "the Job did not complete: {conds:?}\npod status: {:#?}",
        pod.status
    );
    assert_eq!(pod.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"));
    assert_eq!(pod.status.as_ref().unwrap().pod_ip.as_deref(), Some("127.0.0.1"));
    for c in ["check-env", "main"] {
        let t = status_of(pod, c)
            .state
            .as_ref()
            .unwrap()
            .terminated
            .clone()
            .unwrap();
        assert_eq!(
            (t.exit_code, t.reason.as_deref()),
            (0, Some("Completed")),
            "{c}: {t:?}"
        );
    }
    // The log went to the pod dir.
    let pod_dir = cluster_dir().join("localnode/pods").join(format!(
        "{n}_{}_{}",
        pod.metadata.name.as_deref().unwrap(),
        pod.metadata.uid.as_deref().unwrap()
    ));
    let log = std::fs::read_to_string(pod_dir.join("logs/main/0.log")).expect("the container log");
    assert!(log.contains("ok:"), "log: {log}");
    assert!(
        !pod_dir.join("volumes/creds").exists(),
        "secret volumes are removed when the pod ends"
    );
    jobs.delete(&name, &DeleteParams::background()).await.unwrap();
}

#[tokio::test]
async fn service_account_token_gives_pods_their_identity() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-sa").await;
    let n = ns.name.as_str();
    // `kubectl` maps to the cluster's kubectl; it reads the KUBECONFIG localnode writes from the
    // projected ServiceAccount token volume that admission adds.
    let pod: Pod = create(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "whoami"},
               "spec": {"restartPolicy": "Never", "containers": [{
                   "name": "kubectl", "image": "kubectl:v1.35",
                   "args": ["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]}]}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let done = wait_for("the pod to finish", Duration::from_secs(60), || {
        pod_phase(&pods, "whoami", &["Succeeded", "Failed"])
    })
    .await;
    let dir = cluster_dir()
        .join("localnode/pods")
        .join(format!("{n}_whoami_{}", pod.metadata.uid.as_deref().unwrap()));
    let log = std::fs::read_to_string(dir.join("logs/kubectl/0.log")).unwrap_or_default();
    assert_eq!(
        done.status.as_ref().unwrap().phase.as_deref(),
        Some("Succeeded"),
        "log: {log}\nstatus: {:#?}",
        done.status
    );
    assert_eq!(log.trim(), format!("system:serviceaccount:{n}:default"));
}

#[tokio::test]
async fn failing_pods_report_exit_code_and_message() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-fail").await;
    let n = ns.name.as_str();
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    create::<Pod>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fails"},
        "spec": {"restartPolicy": "Never", "containers": [
            {"name": "message-file", "image": IMAGE,
             "args": ["selftest-fail", "--code", "3", "--message", "boom: bad input",
                      "--termination-log", "/dev/termination-log"]},
            {"name": "log-fallback", "image": IMAGE,
             "terminationMessagePolicy": "FallbackToLogsOnError",
             "terminationMessagePath": "/var/run/msg",
             "env": [{"name": "RUST_BACKTRACE", "value": "0"}],
             "args": ["selftest-read-file", "/nonexistent/file", "x"]}
        ]}}),
    )
    .await;
    create::<Pod>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unmapped"},
               "spec": {"restartPolicy": "Never", "containers": [{"name": "web", "image": "nginx:1.27"}]}}),
    )
    .await;
    create::<Pod>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "flaky"},
               "spec": {"restartPolicy": "OnFailure",
                        "volumes": [{"name": "state", "emptyDir": {}}],
                        "containers": [{"name": "flaky", "image": IMAGE,
                            "args": ["selftest-flaky", "/state/marker"],
                            "volumeMounts": [{"name": "state", "mountPath": "/state"}]}]}}),
    )
    .await;

    let fails = wait_for("pod fails to fail", Duration::from_secs(60), || {
        pod_phase(&pods, "fails", &["Failed", "Succeeded"])
    })
    .await;
    assert_eq!(fails.status.as_ref().unwrap().phase.as_deref(), Some("Failed"));
    let t = status_of(&fails, "message-file")
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(t.exit_code, 3);
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert_eq!(t.message.as_deref(), Some("boom: bad input"));
    let t = status_of(&fails, "log-fallback")
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(t.exit_code, 1);
    let msg = t.message.unwrap_or_default();
    assert!(msg.contains("/nonexistent/file"), "fallback message: {msg:?}");

    let unmapped = wait_for("pod unmapped to fail", Duration::from_secs(30), || {
        pod_phase(&pods, "unmapped", &["Failed", "Succeeded", "Running"])
    })
    .await;
    let st = unmapped.status.unwrap();
    assert_eq!(st.phase.as_deref(), Some("Failed"));
    assert_eq!(st.reason.as_deref(), Some("ErrImageNeverPull"));
    let msg = st.message.unwrap_or_default();
    assert!(msg.contains("\"nginx:1.27\" is not mapped"), "{msg}");

    let flaky = wait_for("pod flaky to succeed", Duration::from_secs(60), || {
        pod_phase(&pods, "flaky", &["Succeeded", "Failed"])
    })
    .await;
    assert_eq!(flaky.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"));
    let cs = status_of(&flaky, "flaky");
    assert_eq!(cs.restart_count, 1);
    let last = cs.last_state.clone().unwrap().terminated.unwrap();
    assert_eq!(last.exit_code, 1);
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited already.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

#[tokio::test]
async fn deleting_a_running_pod_kills_its_process() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-del").await;
    let n = ns.name.as_str();
    let out = tempfile::tempdir().unwrap();
    let out_path = out.path().to_str().unwrap();
    // One process stops on SIGTERM, the other ignores it and needs the SIGKILL after the grace period.
    create::<Pod>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
               "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2,
                        "volumes": [{"name": "out", "hostPath": {"path": out_path, "type": "Directory"}}],
                        "containers": [
                            {"name": "polite", "image": IMAGE,
                             "args": ["selftest-sleep", "600", "--pid-file", "/out/polite.pid"],
                             "volumeMounts": [{"name": "out", "mountPath": "/out"}]},
                            {"name": "stubborn", "image": IMAGE,
                             "args": ["selftest-sleep", "600", "--ignore-sigterm", "--pid-file", "/out/stubborn.pid"],
                             "volumeMounts": [{"name": "out", "mountPath": "/out"}]}
                        ]}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    wait_for("pod sleeper to run", Duration::from_secs(60), || {
        pod_phase(&pods, "sleeper", &["Running"])
    })
    .await;
    let read_pid = |name: &str| {
        let p = out.path().join(name);
        async move {
            std::fs::read_to_string(&p)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        }
    };
    let polite = wait_for("polite.pid", Duration::from_secs(20), || read_pid("polite.pid")).await;
    let stubborn = wait_for("stubborn.pid", Duration::from_secs(20), || {
        read_pid("stubborn.pid")
    })
    .await;
    assert!(alive(polite) && alive(stubborn));

    let started = std::time::Instant::now();
    pods.delete("sleeper", &DeleteParams::default()).await.unwrap();
    wait_for("pod sleeper to be deleted", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            match pods.get_opt("sleeper").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(!alive(polite), "the polite process {polite} survived");
    assert!(!alive(stubborn), "the stubborn process {stubborn} survived");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the grace period was not honoured"
    );
}

#[tokio::test]
async fn pods_with_claims_get_a_provisioned_volume() {
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-pvc").await;
    let n = ns.name.as_str();
    create::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models"},
               "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}),
    )
    .await;
    // The scheduler only places this pod once the claim is bound to localnode's hostPath volume.
    create::<Pod>(
        &client,
        n,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writer"},
               "spec": {"restartPolicy": "Never",
                        "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": "models"}}],
                        "containers": [{"name": "w", "image": IMAGE,
                            "args": ["selftest-sleep", "0", "--pid-file", "/models/written-by-pod"],
                            "volumeMounts": [{"name": "store", "mountPath": "/models"}]}]}}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), n);
    let done = wait_for("pod writer to finish", Duration::from_secs(60), || {
        pod_phase(&pods, "writer", &["Succeeded", "Failed"])
    })
    .await;
    assert_eq!(done.status.as_ref().unwrap().phase.as_deref(), Some("Succeeded"));
    let file = cluster_dir()
        .join("localnode/pvcs")
        .join(n)
        .join("models/written-by-pod");
    assert!(file.is_file(), "{} is missing", file.display());
}
