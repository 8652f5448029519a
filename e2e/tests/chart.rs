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
//! The offline checks (lint, schema violations, alerts against the operator's metrics) are in
//! `charts/caduceus/tests/check-chart.sh`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use common::{
    TestNamespace, apply, client, cluster_dir, free_port, hospital, http_get, kubeconfig, kubectl,
    kubectl_ok, make_shards, repo_root, run, study_yaml, unique, wait_for,
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

fn helm_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CADUCEUS_HELM").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let out = run(&mut Command::new(repo_root().join("tools/helm/build.sh")));
    PathBuf::from(out.trim())
}

fn chart() -> PathBuf {
    repo_root().join("charts/caduceus")
}

fn helm(args: &[&str]) -> String {
    run(Command::new(helm_path())
        .env("KUBECONFIG", kubeconfig())
        .args(args))
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
    template_and_dry_run(&[]);
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
    let sns = TestNamespace::create(&client, "e2e-chart-study").await;
    let h0 = TestNamespace::create(&client, "e2e-chart-h0").await;
    let h1 = TestNamespace::create(&client, "e2e-chart-h1").await;
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
