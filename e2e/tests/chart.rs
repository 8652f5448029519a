//! The Helm chart on the real local control plane.
//!
//! 1. `helm template` with the default and the full-featured values, applied with
//!    `kubectl apply --dry-run=server` (the real prometheus-operator CRDs are installed first, so the
//!    ServiceMonitor and PrometheusRule are validated against their schemas);
//! 2. a real `helm install` into a namespace that enforces the restricted Pod Security profile: the
//!    operator runs as the chart's Deployment (a pod run by localnode, with the chart's ServiceAccount
//!    and nothing but the chart's RBAC), and a study with two hospitals, DP-SGD and TFHE runs to
//!    completion through it;
//! 3. the ServiceAccount may do what the operator needs and nothing more that we check;
//! 4. `helm uninstall` keeps the CRDs (and so every study), as `crds.keep` promises.
//!
//! `chart_confines_the_operator_to_its_namespaces` (independent of the study) installs the chart
//! without an operator pod and checks, against the API server: the ServiceAccount's Roles exist only in
//! the namespaces it serves (Secrets, Jobs there; nothing in another namespace; no cluster-wide Secret
//! list), the NetworkPolicies are in place, and the ValidatingAdmissionPolicies reject a hand-made pod
//! or Job that labels itself as a Caduceus trainer or aggregator while the Job controller may still
//! create the pods of the operator's Jobs (and the same pod outside the served namespaces is untouched,
//! which is why `e2e/tests/operator.rs`, running the operator as the cluster admin, is not affected).
//! The local control plane has no CNI, so NetworkPolicies are validated and installed, not enforced.
//!
//! The offline checks (lint, schema violations, the RBAC, NetworkPolicy and admission rules against
//! the values, alerts against the operator's metrics) are in `charts/caduceus/tests/check-chart.sh`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use common::{
    TestNamespace, apply, client, cluster_dir, consent, free_port, helm, helm_path, hospital, http_get,
    kubeconfig, kubectl, kubectl_ok, make_shards, repo_root, run, study_yaml, unique, wait_for,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::ListParams;

const CRDS: [&str; 3] = [
    "federatedstudies.fl.caduceus.dev",
    "hospitalclients.fl.caduceus.dev",
    "trainingrounds.fl.caduceus.dev",
];

fn chart() -> PathBuf {
    repo_root().join("charts/caduceus")
}

/// Renders the chart and has the API server validate every object (nothing is created).
fn template_and_dry_run(values: &[&str]) {
    let chart = chart();
    let mut args = vec![
        "template",
        "caduceus",
        chart.to_str().unwrap(),
        "-n",
        "caduceus-system",
    ];
    args.extend_from_slice(values);
    let rendered = helm(&args);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &rendered).unwrap();
    let out = kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "--server-side",
        "--force-conflicts",
        "--field-manager=chart-test",
        "-f",
        f.path().to_str().unwrap(),
    ]);
    assert!(out.contains("deployment.apps/caduceus"), "{out}");
}

fn prometheus_crds() -> PathBuf {
    if let Some(p) = std::env::var_os("CADUCEUS_PROMETHEUS_CRDS").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let out = run(&mut Command::new(
        repo_root().join("tools/prometheus-operator/crds.sh"),
    ));
    PathBuf::from(out.trim())
}

fn ensure_namespace(name: &str) {
    let out = kubectl(&["create", "namespace", name]);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("AlreadyExists"),
        "creating namespace {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CRDs that an earlier test applied with kubectl are adopted by the release, the way Helm
/// documents for existing objects.
fn adopt_crds(release: &str, namespace: &str) {
    for crd in CRDS {
        if kubectl(&["get", "crd", crd]).status.success() {
            kubectl_ok(&[
                "label",
                "--overwrite",
                "crd",
                crd,
                "app.kubernetes.io/managed-by=Helm",
            ]);
            kubectl_ok(&[
                "annotate",
                "--overwrite",
                "crd",
                crd,
                &format!("meta.helm.sh/release-name={release}"),
                &format!("meta.helm.sh/release-namespace={namespace}"),
            ]);
        }
    }
}

fn can_i(verb_resource: &[&str], sa: &str) -> bool {
    let mut args = vec!["auth", "can-i"];
    args.extend_from_slice(verb_resource);
    args.extend_from_slice(&["--as", sa]);
    let out = kubectl(&args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test]
async fn chart_installs_and_runs_a_study() {
    let client = client().await;

    // 1. Render and validate server-side, default and full-featured values.
    let prom = prometheus_crds();
    for f in [
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_prometheusrules.yaml",
    ] {
        kubectl_ok(&["apply", "--server-side", "-f", prom.join(f).to_str().unwrap()]);
    }
    for crd in ["servicemonitors", "prometheusrules"] {
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}.monitoring.coreos.com"),
        ]);
    }
    for ns in [
        "caduceus-system",
        "caduceus-studies",
        "hospital-st-mary",
        "hospital-riverside",
    ] {
        ensure_namespace(ns);
    }
    // The defaults leave the served namespaces and the API server's CIDRs empty (the render fails);
    // values-required.yaml sets what every install must set.
    let required = chart().join("tests/values-required.yaml");
    template_and_dry_run(&["-f", required.to_str().unwrap()]);
    let full = chart().join("tests/values-full.yaml");
    template_and_dry_run(&["-f", full.to_str().unwrap()]);

    // 2. A real install; the operator is the chart's pod.
    let op_ns = TestNamespace::create(&client, "e2e-chart").await;
    // The API server's PodSecurity admission enforces the restricted profile on the operator's pod:
    // a pod that violates it is never created and `helm install --wait` fails.
    kubectl_ok(&[
        "label",
        "namespace",
        &op_ns.name,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    ]);
    // The namespaces the operator serves exist before the install (its Roles go there).
    let sns = TestNamespace::create(&client, "e2e-chart-study").await;
    let h0 = TestNamespace::create(&client, "e2e-chart-h0").await;
    let h1 = TestNamespace::create(&client, "e2e-chart-h1").await;
    let release = unique("chart");
    adopt_crds(&release, &op_ns.name);
    let metrics_port = free_port();
    let out = helm(&[
        "install",
        &release,
        chart().to_str().unwrap(),
        "-n",
        &op_ns.name,
        "--set",
        &format!("namespaces.studies={{{}}}", sns.name),
        "--set",
        &format!("namespaces.hospitals={{{},{}}}", h0.name, h1.name),
        // The API server listens on loopback; localnode runs pods on the host network.
        "--set",
        "networkPolicy.apiServer.cidrs={127.0.0.1/32}",
        "--set",
        "workloads.endpointMode=loopback",
        "--set",
        &format!("metrics.port={metrics_port}"),
        "--set",
        "logJson=false",
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    for crd in CRDS {
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ]);
    }
    let fullname = if release.contains("caduceus") {
        release.clone()
    } else {
        format!("{release}-caduceus")
    };
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &op_ns.name);
    let d = deployments.get(&fullname).await.expect("the operator Deployment");
    assert_eq!(d.status.and_then(|s| s.ready_replicas), Some(1));
    // The operator's own health and metrics, from the pod (localnode shares the host network).
    wait_for(
        "the operator's metrics port",
        Duration::from_secs(60),
        || async move {
            std::net::TcpStream::connect(("127.0.0.1", metrics_port))
                .ok()
                .map(|_| ())
        },
    )
    .await;
    assert_eq!(http_get(metrics_port, "/healthz").trim(), "ok");

    // A study with two hospitals, DP-SGD and TFHE, run entirely by the installed operator.
    let work = tempfile::tempdir().unwrap();
    make_shards(work.path(), 2);
    let network = unique("chartnet");
    let consents = vec![format!("{}/faces", sns.name)];
    for (i, h) in [&h0, &h1].iter().enumerate() {
        let shard = work.path().join(format!("split/hospital-{i}"));
        hospital(
            &client,
            &h.name,
            &format!("hospital-{i}"),
            Some(&shard),
            20.0,
            &consents,
            &network,
            "/shard",
        )
        .await;
    }
    apply(&study_yaml(&sns.name, "faces", &network, 2, 2, 600));
    // The hospitals consent to the study's terms (its status.consentHash), as their owners would.
    consent(
        &client,
        &sns.name,
        "faces",
        &[(&h0.name, "hospital-0"), (&h1.name, "hospital-1")],
    )
    .await;
    let studies: Api<FederatedStudy> = Api::namespaced(client.clone(), &sns.name);
    // localnode keeps each container's log under its state directory (no kubelet log endpoint).
    let op_pods = cluster_dir().join("localnode/pods");
    let dump = || {
        let mut out = String::from("operator log (tail):\n");
        for e in std::fs::read_dir(&op_pods).into_iter().flatten().flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{}_", op_ns.name))
            {
                let log = e.path().join("logs/operator/0.log");
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out += &lines[lines.len().saturating_sub(60)..].join("\n");
            }
        }
        out
    };
    let (reason, msg) = wait_for("the study to finish", Duration::from_secs(900), || {
        let studies = studies.clone();
        async move {
            let s = studies.get_opt("faces").await.ok().flatten()?;
            let c = s.status?.conditions.condition(types::READY)?.clone();
            ["Completed", "RoundFailed", "Invalid", "PrivacyBudgetExhausted"]
                .contains(&c.reason.as_str())
                .then_some((c.reason, c.message))
        }
    })
    .await;
    assert_eq!(reason, "Completed", "{msg}\n{}", dump());
    let rounds: Api<TrainingRound> = Api::namespaced(client.clone(), &sns.name);
    let done = rounds.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(done.len(), 2, "one TrainingRound per round");
    for r in &done {
        assert!(
            r.status
                .as_ref()
                .is_some_and(|s| s.conditions.is_true(types::SUCCEEDED)),
            "{r:?}"
        );
    }
    // The ledger was written through the chart's RBAC (hospitalclients/status).
    for (i, h) in [&h0, &h1].iter().enumerate() {
        let hc = Api::<HospitalClient>::namespaced(client.clone(), &h.name)
            .get(&format!("hospital-{i}"))
            .await
            .unwrap();
        let eps = hc.status.and_then(|s| s.epsilon_spent).unwrap_or(0.0);
        assert!(eps > 0.0, "hospital-{i} has no ε recorded");
    }
    let metrics = http_get(metrics_port, "/metrics");
    for m in [
        "caduceus_rounds_total",
        "caduceus_privacy_epsilon_spent",
        "caduceus_fairness_threshold",
        "caduceus_round_started_timestamp_seconds",
    ] {
        assert!(metrics.contains(m), "/metrics lacks {m}");
    }
    assert!(
        metrics.contains(&format!(
            "caduceus_round_started_timestamp_seconds{{namespace=\"{}\",study=\"faces\"}} 0",
            sns.name
        )),
        "no round runs after the study completed:\n{metrics}"
    );

    // 3. Least privilege, as the API server sees it.
    let sa = format!("system:serviceaccount:{}:{fullname}", op_ns.name);
    for allowed in [
        &["create", "jobs.batch", "-n", &h0.name][..],
        &[
            "patch",
            "trainingrounds.fl.caduceus.dev",
            "--subresource=status",
            "-n",
            &sns.name,
        ],
        &[
            "update",
            "hospitalclients.fl.caduceus.dev",
            "--subresource=status",
            "-n",
            &h0.name,
        ],
        &["create", "secrets", "-n", &h1.name],
        &["update", "leases.coordination.k8s.io", "-n", &op_ns.name],
        &["update", "configmaps", "-n", &op_ns.name],
    ] {
        assert!(can_i(allowed, &sa), "the operator may not {allowed:?}");
    }
    for denied in [
        &["create", "pods", "-n", &h0.name][..],
        &["get", "configmaps", "-n", &h0.name],
        &["delete", "namespaces"],
        &["update", "hospitalclients.fl.caduceus.dev", "-n", &h0.name],
        &["delete", "federatedstudies.fl.caduceus.dev", "-n", &sns.name],
        &["create", "clusterroles.rbac.authorization.k8s.io"],
        &["update", "leases.coordination.k8s.io", "-n", &sns.name],
        &["list", "secrets", "--all-namespaces"],
        &["create", "jobs.batch", "-n", "default"],
        &["*", "*"],
    ] {
        assert!(!can_i(denied, &sa), "the operator may {denied:?}");
    }

    // 4. Delete the study while the operator runs (its finalizer cleans up), then uninstall: the
    //    CRDs stay.
    kubectl_ok(&[
        "delete",
        "federatedstudy",
        "faces",
        "-n",
        &sns.name,
        "--timeout=120s",
    ]);
    helm(&[
        "uninstall",
        &release,
        "-n",
        &op_ns.name,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in CRDS {
        assert!(
            crds.get_opt(crd).await.unwrap().is_some(),
            "{crd} was deleted by helm uninstall despite crds.keep"
        );
    }
    assert!(
        deployments.get_opt(&fullname).await.unwrap().is_none(),
        "the operator Deployment outlived helm uninstall"
    );
}

/// Whether `user` (a ServiceAccount of `user_ns`) may `verb` the resource, as the API server's
/// authorizer decides (a SubjectAccessReview, which needs no discovery of the resource).
fn subject_access_review(
    user: &str,
    user_ns: &str,
    verb: &str,
    group: &str,
    resource: &str,
    subresource: &str,
    ns: &str,
) -> bool {
    let review = format!(
        r#"apiVersion: authorization.k8s.io/v1
kind: SubjectAccessReview
spec:
  user: "{user}"
  groups: [system:serviceaccounts, "system:serviceaccounts:{user_ns}", system:authenticated]
  resourceAttributes: {{verb: {verb}, group: "{group}", resource: {resource}, subresource: "{subresource}", namespace: "{ns}"}}
"#
    );
    let out = kubectl_with_file(&["create", "-o", "jsonpath={.status.allowed}"], &review);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

/// Uninstalls a release when dropped, also when the test panics (its cluster-scoped objects, the
/// ClusterRole and the admission policies, would outlive its namespace).
struct Uninstall {
    release: String,
    namespace: String,
}

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Command::new(helm_path())
            .env("KUBECONFIG", kubeconfig())
            .args([
                "uninstall",
                &self.release,
                "-n",
                &self.namespace,
                "--ignore-not-found",
            ])
            .output();
    }
}

/// `kubectl ARGS -f <yaml>`: the output, successful or not.
fn kubectl_with_file(args: &[&str], yaml: &str) -> std::process::Output {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), yaml).unwrap();
    let mut all = args.to_vec();
    all.extend_from_slice(&["-f", f.path().to_str().unwrap()]);
    kubectl(&all)
}

/// A pod that never runs (a scheduling gate keeps it Pending), with the given labels.
fn gated_pod(name: &str, ns: &str, labels: &str, service_account: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{{labels}}}
spec:
  serviceAccountName: {service_account}
  automountServiceAccountToken: false
  schedulingGates: [{{name: caduceus.dev/e2e-never}}]
  containers:
    - name: c
      image: localnode
      command: [/bin/true]
"#
    )
}

/// A Job whose pods never run, labelled like a trainer round Job on itself and its pod template.
fn gated_job(name: &str, ns: &str, service_account: &str) -> String {
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
  namespace: {ns}
  labels: {{{TRAINER_LABELS}}}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {{{TRAINER_LABELS}}}
    spec:
      restartPolicy: Never
      serviceAccountName: {service_account}
      automountServiceAccountToken: false
      schedulingGates: [{{name: caduceus.dev/e2e-never}}]
      containers:
        - name: trainer
          image: localnode
          command: [/bin/true]
"#
    )
}

const TRAINER_LABELS: &str =
    "app.kubernetes.io/managed-by: caduceus-operator, app.kubernetes.io/component: trainer";
const AGGREGATOR_LABELS: &str =
    "app.kubernetes.io/managed-by: caduceus-operator, app.kubernetes.io/component: aggregator";
/// The message of the chart's round-pods ValidatingAdmissionPolicy (templates/admissionpolicy.yaml).
const POD_DENIED: &str = "a pod cannot label itself as a Caduceus trainer or aggregator";

fn assert_denied(out: &std::process::Output, message: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ValidatingAdmissionPolicy") && stderr.contains(message),
        "{what} was not denied with '{message}':\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn assert_allowed(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} was refused:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The chart's namespaced RBAC, NetworkPolicies and admission policies against the real API server.
/// No operator pod runs (replicaCount 0, CRDs not managed by this release), so this test needs
/// nothing of the operator's code and does not disturb another release's operator.
#[tokio::test]
async fn chart_confines_the_operator_to_its_namespaces() {
    let client = client().await;
    let op_ns = TestNamespace::create(&client, "e2e-confine").await;
    let sns = TestNamespace::create(&client, "e2e-confine-study").await;
    let hns = TestNamespace::create(&client, "e2e-confine-h").await;
    let other = TestNamespace::create(&client, "e2e-confine-other").await;
    let release = unique("confine");
    let _uninstall = Uninstall {
        release: release.clone(),
        namespace: op_ns.name.clone(),
    };
    let out = helm(&[
        "install",
        &release,
        chart().to_str().unwrap(),
        "-n",
        &op_ns.name,
        "--set",
        "crds.create=false",
        "--set",
        "replicaCount=0",
        "--set",
        &format!("namespaces.studies={{{}}}", sns.name),
        "--set",
        &format!("namespaces.hospitals={{{}}}", hns.name),
        "--set",
        "networkPolicy.apiServer.cidrs={127.0.0.1/32}",
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let fullname = format!("{release}-caduceus");
    let sa = format!("system:serviceaccount:{}:{fullname}", op_ns.name);

    // RBAC: namespaced grants only, in the namespaces it serves and its own.
    for allowed in [
        &["get", "secrets", "-n", &sns.name][..],
        &["list", "secrets", "-n", &hns.name],
        &["create", "secrets", "-n", &hns.name],
        &["delete", "secrets", "-n", &sns.name],
        &["create", "jobs.batch", "-n", &sns.name],
        &["create", "jobs.batch", "-n", &hns.name],
        &["watch", "jobs.batch", "-n", &hns.name],
        &["get", "pods", "-n", &hns.name],
        &["create", "services", "-n", &sns.name],
        &["create", "serviceaccounts", "-n", &hns.name],
        &["list", "persistentvolumeclaims", "-n", &hns.name],
        &["create", "events.events.k8s.io", "-n", &hns.name],
        // Its own namespace: keys, ledgers (with their finalizer), the Lease.
        &["watch", "secrets", "-n", &op_ns.name],
        &["update", "secrets", "-n", &op_ns.name],
        &["update", "configmaps", "-n", &op_ns.name],
        &["update", "leases.coordination.k8s.io", "-n", &op_ns.name],
    ] {
        assert!(can_i(allowed, &sa), "the operator may not {allowed:?}");
    }
    // Its custom resources, everywhere (asked with a SubjectAccessReview: this release installs no
    // CRDs, and `kubectl auth can-i` answers "no" for a resource the API server does not serve).
    let sa_ns = op_ns.name.as_str();
    for (verb, resource, subresource, ns, want) in [
        ("watch", "federatedstudies", "", "", true),
        (
            "update",
            "federatedstudies",
            "finalizers",
            other.name.as_str(),
            true,
        ),
        ("list", "hospitalclients", "", "", true),
        ("update", "hospitalclients", "status", other.name.as_str(), true),
        ("create", "trainingrounds", "", other.name.as_str(), true),
        ("update", "hospitalclients", "", other.name.as_str(), false),
        ("delete", "federatedstudies", "", other.name.as_str(), false),
    ] {
        assert_eq!(
            subject_access_review(&sa, sa_ns, verb, "fl.caduceus.dev", resource, subresource, ns),
            want,
            "{verb} {resource}/{subresource} in '{ns}'"
        );
    }
    for denied in [
        // Not a namespace it serves.
        &["get", "secrets", "-n", &other.name][..],
        &["list", "secrets", "-n", &other.name],
        &["create", "jobs.batch", "-n", &other.name],
        &["get", "pods", "-n", &other.name],
        &["create", "serviceaccounts", "-n", &other.name],
        &["get", "secrets", "-n", "kube-system"],
        // Nothing core or batch cluster-wide.
        &["list", "secrets", "--all-namespaces"],
        &["get", "secrets", "--all-namespaces"],
        &["list", "jobs.batch", "--all-namespaces"],
        &["list", "pods", "--all-namespaces"],
        // Not even where it serves.
        &["create", "pods", "-n", &hns.name],
        &["update", "secrets", "-n", &hns.name],
        &["watch", "secrets", "-n", &sns.name],
        &["get", "configmaps", "-n", &hns.name],
        &["create", "services", "-n", &hns.name],
        &[
            "create",
            "serviceaccounts",
            "--subresource=token",
            "-n",
            &hns.name,
        ],
        &[
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            "-n",
            &hns.name,
        ],
        &["update", "leases.coordination.k8s.io", "-n", &sns.name],
        &["impersonate", "serviceaccounts", "-n", &hns.name],
        &["*", "*"],
    ] {
        assert!(!can_i(denied, &sa), "the operator may {denied:?}");
    }

    // NetworkPolicies: a default deny and the round-pod policies in each served namespace only.
    let op_policy = format!("{fullname}-operator");
    for (ns, name) in [
        (&sns.name, "caduceus-default-deny"),
        (&sns.name, "caduceus-aggregator"),
        (&hns.name, "caduceus-default-deny"),
        (&hns.name, "caduceus-trainer"),
        (&op_ns.name, op_policy.as_str()),
    ] {
        kubectl_ok(&["get", "networkpolicy", name, "-n", ns]);
    }
    let none = kubectl_ok(&["get", "networkpolicies", "-n", &other.name, "-o", "name"]);
    assert!(
        none.trim().is_empty(),
        "NetworkPolicies outside the served namespaces: {none}"
    );

    // The round pods' ServiceAccounts, as the operator makes them (a pod naming a missing one would be
    // refused before the admission policies run).
    for (ns, account) in [
        (&hns.name, "caduceus-trainer"),
        (&sns.name, "caduceus-aggregator"),
    ] {
        assert_allowed(
            &kubectl_with_file(
                &["apply"],
                &format!(
                    "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {account}, namespace: {ns}}}\nautomountServiceAccountToken: false\n"
                ),
            ),
            "a round ServiceAccount",
        );
    }

    // Admission: the cluster admin (not the Job controller) cannot make a pod that claims to be a
    // trainer or an aggregator in a served namespace, neither by creating it nor by labelling it.
    let dry = ["create", "--dry-run=server"];
    // The API server enforces a new policy and binding a few seconds after they are created.
    let (pod, job) = (
        gated_pod("probe", &hns.name, TRAINER_LABELS, "caduceus-trainer"),
        gated_job("probe", &hns.name, "caduceus-trainer"),
    );
    wait_for(
        "the admission policies to be enforced",
        Duration::from_secs(60),
        || {
            let refused = |yaml: &str| {
                let out = kubectl_with_file(&dry, yaml);
                !out.status.success()
                    && String::from_utf8_lossy(&out.stderr).contains("ValidatingAdmissionPolicy")
            };
            let both = refused(&pod) && refused(&job);
            async move { both.then_some(()) }
        },
    )
    .await;
    assert_denied(
        &kubectl_with_file(
            &dry,
            &gated_pod("fake-trainer", &hns.name, TRAINER_LABELS, "caduceus-trainer"),
        ),
        POD_DENIED,
        "a hand-made trainer pod",
    );
    assert_denied(
        &kubectl_with_file(
            &dry,
            &gated_pod(
                "fake-aggregator",
                &sns.name,
                AGGREGATOR_LABELS,
                "caduceus-aggregator",
            ),
        ),
        POD_DENIED,
        "a hand-made aggregator pod",
    );
    assert_allowed(
        &kubectl_with_file(
            &["create"],
            &gated_pod("plain", &hns.name, "app: plain", "default"),
        ),
        "an unlabelled pod",
    );
    let relabel = kubectl(&[
        "label",
        "pod",
        "plain",
        "-n",
        &hns.name,
        "app.kubernetes.io/managed-by=caduceus-operator",
        "app.kubernetes.io/component=trainer",
    ]);
    assert_denied(&relabel, POD_DENIED, "labelling a pod as a trainer");
    // Outside the served namespaces the policy does not apply (the operator e2e runs there as admin).
    assert_allowed(
        &kubectl_with_file(
            &dry,
            &gated_pod("fake-trainer", &other.name, TRAINER_LABELS, "default"),
        ),
        "a labelled pod in a namespace the chart does not serve",
    );

    // Jobs with the label come only from the operator's ServiceAccount, and run as our account
    // without a token.
    assert_denied(
        &kubectl_with_file(&dry, &gated_job("fake-round", &hns.name, "caduceus-trainer")),
        "only the Caduceus operator",
        "a labelled Job made by the cluster admin",
    );
    let as_operator = ["create", "--as", sa.as_str()];
    let dry_as_operator = ["create", "--dry-run=server", "--as", sa.as_str()];
    assert_denied(
        &kubectl_with_file(&dry_as_operator, &gated_job("any-account", &hns.name, "default")),
        "must run as ServiceAccount caduceus-aggregator or caduceus-trainer",
        "an operator Job that runs as another ServiceAccount",
    );
    assert_denied(
        &kubectl_with_file(
            &dry_as_operator,
            &gated_job("with-token", &hns.name, "caduceus-trainer").replace(
                "automountServiceAccountToken: false",
                "automountServiceAccountToken: true",
            ),
        ),
        "automountServiceAccountToken: false",
        "an operator Job that mounts a token",
    );
    let unlabelled = gated_job("unlabelled", &hns.name, "default").replace(TRAINER_LABELS, "app: other");
    assert_denied(
        &kubectl_with_file(&dry_as_operator, &unlabelled),
        "must run as ServiceAccount caduceus-aggregator or caduceus-trainer",
        "an unlabelled operator Job that runs as another ServiceAccount",
    );

    // The operator's Job is admitted, and the Job controller (as the user it really is on this
    // control plane) may create its labelled pod.
    assert_allowed(
        &kubectl_with_file(&as_operator, &gated_job("round", &hns.name, "caduceus-trainer")),
        "the operator's trainer Job",
    );
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &hns.name);
    let hns_name = hns.name.clone();
    let created = wait_for(
        "the Job controller to create the trainer pod (or to fail to)",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            let ns = hns_name.clone();
            async move {
                let l = pods
                    .list(&ListParams::default().labels("job-name=round"))
                    .await
                    .ok()?;
                if !l.items.is_empty() {
                    return Some(Ok(()));
                }
                let failed = kubectl_ok(&[
                    "get",
                    "events",
                    "-n",
                    &ns,
                    "--field-selector",
                    "reason=FailedCreate",
                    "-o",
                    "jsonpath={.items[*].message}",
                ]);
                (!failed.trim().is_empty()).then_some(Err(failed))
            }
        },
    )
    .await;
    assert_eq!(
        created,
        Ok(()),
        "the Job controller was refused the operator's pod"
    );
    // Foreground deletion: the garbage collector and the Job controller remove their finalizers from
    // the labelled Job and pod (updates that keep the label, which the policies let through).
    kubectl_ok(&[
        "delete",
        "job",
        "round",
        "-n",
        &hns.name,
        "--cascade=foreground",
        "--timeout=60s",
    ]);

    helm(&[
        "uninstall",
        &release,
        "-n",
        &op_ns.name,
        "--wait",
        "--timeout",
        "120s",
    ]);
    let left = kubectl_ok(&[
        "get",
        "validatingadmissionpolicies,validatingadmissionpolicybindings",
        "-o",
        "name",
    ]);
    assert!(
        !left.contains(&release),
        "admission policies outlived helm uninstall: {left}"
    );
}
