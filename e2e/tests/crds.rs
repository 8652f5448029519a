//! The generated CRDs on the real API server: they install, every example is accepted, every file of
//! the invalid catalogue is rejected with the expected message, and kubectl shows the printer
//! columns and the `caduceus` category. Needs `KUBECONFIG` from `e2e/cluster.sh up`
//! (`make cluster-up`); fails without it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestNamespace, client, delete_namespace_and_wait, kubectl, kubectl_ok, repo_root, wait_for};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Mutex;

/// The tests here share the CRDs; installing them is serialised.
static INSTALL: Mutex<bool> = Mutex::const_new(false);

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    files
}

fn docs(path: &Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize;

fn str_at<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

/// Installs every CRD under `crds/` with kubectl and waits until each is Established.
async fn install_crds() {
    let mut done = INSTALL.lock().await;
    if *done {
        return;
    }
    let dir = repo_root().join("crds");
    let files = yaml_files(&dir);
    assert!(
        !files.is_empty(),
        "no CRD YAML under {}: generate it with `cargo run -p caduceus-crds --bin crdgen`",
        dir.display()
    );
    let mut names = Vec::new();
    for f in &files {
        for d in docs(f) {
            assert_eq!(
                str_at(&d, &["kind"]),
                Some("CustomResourceDefinition"),
                "{} holds something other than a CRD",
                f.display()
            );
            names.push(str_at(&d, &["metadata", "name"]).unwrap().to_string());
        }
    }
    assert!(
        names.len() >= 3,
        "expected the three Caduceus CRDs, found {names:?}"
    );
    kubectl_ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        dir.to_str().unwrap(),
    ]);
    for n in &names {
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{n}"),
        ]);
    }
    // Discovery (and so kubectl's short names and categories) can lag a moment behind Established.
    wait_for("the CRDs in discovery", Duration::from_secs(30), || async {
        let out = kubectl(&["api-resources", "--api-group=fl.caduceus.dev", "-o", "name"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        names.iter().all(|n| text.contains(n.as_str())).then_some(())
    })
    .await;
    *done = true;
}

#[tokio::test]
async fn every_example_is_accepted() {
    install_crds().await;
    let client = client().await;
    let dir = repo_root().join("examples");
    let files = yaml_files(&dir);
    assert!(!files.is_empty(), "no examples under {}", dir.display());

    // Namespaces the examples need: those they create and those they name. Reuse existing ones;
    // delete only those this test created.
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let mut needed: Vec<String> = Vec::new();
    for f in &files {
        for d in docs(f) {
            let ns = if str_at(&d, &["kind"]) == Some("Namespace") {
                str_at(&d, &["metadata", "name"])
            } else {
                str_at(&d, &["metadata", "namespace"])
            };
            if let Some(ns) = ns
                && !needed.iter().any(|n| n == ns)
            {
                needed.push(ns.to_string());
            }
        }
    }
    let mut created = Vec::new();
    for ns in &needed {
        // A namespace left Terminating by an earlier run must be gone before it can be made again.
        if let Ok(Some(existing)) = ns_api.get_opt(ns).await {
            if existing.metadata.deletion_timestamp.is_some() {
                delete_namespace_and_wait(&client, ns, Duration::from_secs(60)).await;
                created.push(ns.clone());
            }
        } else {
            created.push(ns.clone());
        }
    }

    for f in &files {
        // The examples name their namespaces (kubectl refuses `-n` with a different one).
        let out = kubectl(&["create", "-f", f.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // An object an earlier run left behind is fine; anything else is a rejection.
        let only_exists = !out.status.success()
            && stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .all(|l| l.contains("AlreadyExists") || l.contains("already exists"));
        assert!(
            out.status.success() || only_exists,
            "example {} was rejected:\n{stderr}",
            f.display()
        );
    }
    // Every object is really there, then goes again (namespaces last).
    for f in files.iter().rev() {
        let is_ns_file = docs(f).iter().all(|d| str_at(d, &["kind"]) == Some("Namespace"));
        if is_ns_file {
            continue;
        }
        kubectl_ok(&["get", "-f", f.to_str().unwrap()]);
        kubectl_ok(&["delete", "--wait=false", "-f", f.to_str().unwrap()]);
    }
    for ns in &created {
        kubectl_ok(&["delete", "namespace", ns, "--wait=false", "--ignore-not-found"]);
    }
}

/// `# expect: <substring>` lines of a catalogue file.
fn expectations(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# expect:"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::test]
async fn invalid_resources_are_rejected_naming_the_field() {
    install_crds().await;
    let client = client().await;
    let dir = repo_root().join("e2e/invalid");
    let files = yaml_files(&dir);
    let with_expectations = files.iter().filter(|f| !expectations(f).is_empty()).count();
    assert!(
        with_expectations >= 15,
        "the invalid catalogue {} needs at least 15 files with `# expect:` lines, has {with_expectations}",
        dir.display()
    );
    let ns = TestNamespace::create(&client, "e2e-invalid").await;
    let mut failures = Vec::new();
    for f in &files {
        let expect = expectations(f);
        assert!(!expect.is_empty(), "{} has no `# expect:` line", f.display());
        // Some entries are invalid updates: every document but the last is created first.
        // Each entry runs in the test namespace, whatever namespace the file names.
        let all: Vec<serde_yaml::Value> = docs(f)
            .into_iter()
            .map(|mut d| {
                if let Some(md) = d.get_mut("metadata").and_then(|m| m.as_mapping_mut()) {
                    md.remove("namespace");
                }
                d
            })
            .collect();
        assert!(!all.is_empty(), "{} holds no document", f.display());
        let (setup, last) = all.split_at(all.len() - 1);
        for d in setup {
            let y = serde_yaml::to_string(d).unwrap();
            let tmp = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(tmp.path(), y).unwrap();
            kubectl_ok(&["apply", "-n", &ns.name, "-f", tmp.path().to_str().unwrap()]);
        }
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), serde_yaml::to_string(&last[0]).unwrap()).unwrap();
        let verb = if setup.is_empty() { "create" } else { "apply" };
        let out = kubectl(&[verb, "-n", &ns.name, "-f", tmp.path().to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if out.status.success() {
            failures.push(format!("{name}: accepted, but should be rejected"));
            continue;
        }
        for e in &expect {
            if !stderr.contains(e.as_str()) {
                failures.push(format!("{name}: the error lacks {e:?}; it was:\n{stderr}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid resources misbehaved:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn kubectl_shows_round_columns_and_the_caduceus_category() {
    install_crds().await;
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-rounds").await;
    let gvk = GroupVersionKind::gvk("fl.caduceus.dev", "v1alpha1", "TrainingRound");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "trainingrounds");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    let round: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "fl.caduceus.dev/v1alpha1", "kind": "TrainingRound",
        "metadata": {"name": "demo-r2"},
        "spec": {"study": "demo", "round": 2, "minParticipants": 2,
                 "participants": ["hospital-a/a", "hospital-b/b", "hospital-c/c"]}
    }))
    .unwrap();
    api.create(&PostParams::default(), &round)
        .await
        .expect("creating a TrainingRound");
    let status = json!({"status": {
        "observedGeneration": 1,
        "participation": "3/3",
        "reported": ["hospital-a/a", "hospital-b/b", "hospital-c/c"],
        "accuracy": 0.87,
        "equalizedOddsDifference": 0.04,
        "epsilonSpent": {"hospital-a/a": 1.5, "hospital-b/b": 1.2, "hospital-c/c": 0.9},
        "epsilonSpentMax": 1.5,
        "conditions": [
            {"type": "Succeeded", "status": "True", "reason": "QuorumReached", "message": "3/3",
             "lastTransitionTime": "2026-11-27T00:00:00Z", "observedGeneration": 1},
            {"type": "FairnessWithinThreshold", "status": "True", "reason": "WithinThreshold",
             "message": "EOD 0.04 <= 0.1", "lastTransitionTime": "2026-11-27T00:00:00Z",
             "observedGeneration": 1}
        ]
    }});
    api.patch_status("demo-r2", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("writing the status through the status subresource");

    let out = kubectl_ok(&["get", "rounds", "-n", &ns.name]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    for col in [
        "NAME",
        "STUDY",
        "ROUND",
        "STATUS",
        "PARTICIPANTS",
        "ACCURACY",
        "EOD",
        "EPSILON",
        "FAIR",
        "AGE",
    ] {
        assert!(
            header.iter().any(|h| h.eq_ignore_ascii_case(col)),
            "column {col} missing from `kubectl get rounds`:\n{out}"
        );
    }
    let row: Vec<&str> = lines
        .find(|l| l.starts_with("demo-r2"))
        .unwrap_or_else(|| panic!("no demo-r2 row:\n{out}"))
        .split_whitespace()
        .collect();
    let col = |name: &str| -> &str {
        let i = header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .unwrap_or_else(|| panic!("no column {name}: {header:?}"));
        row.get(i).copied().unwrap_or("")
    };
    assert_eq!(col("STUDY"), "demo", "{out}");
    assert_eq!(col("ROUND"), "2", "{out}");
    assert_eq!(col("STATUS"), "QuorumReached", "{out}");
    assert_eq!(col("PARTICIPANTS"), "3/3", "{out}");
    assert_eq!(col("ACCURACY"), "0.87", "{out}");
    assert_eq!(col("EOD"), "0.04", "{out}");
    assert_eq!(col("EPSILON"), "1.5", "{out}");
    assert_eq!(col("FAIR"), "True", "{out}");

    // Short names and the category.
    let one = kubectl_ok(&["get", "round", "demo-r2", "-n", &ns.name, "-o", "name"]);
    assert_eq!(one.trim(), "traininground.fl.caduceus.dev/demo-r2");
    let all = kubectl_ok(&["get", "caduceus", "-n", &ns.name, "-o", "name"]);
    assert!(
        all.lines()
            .any(|l| l.trim() == "traininground.fl.caduceus.dev/demo-r2"),
        "`kubectl get caduceus` does not list the round:\n{all}"
    );
    // The spec is immutable.
    let out = kubectl(&[
        "patch",
        "round",
        "demo-r2",
        "-n",
        &ns.name,
        "--type=merge",
        "-p",
        r#"{"spec":{"round":3}}"#,
    ]);
    assert!(!out.status.success(), "a round's spec could be changed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("immutable"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    api.delete("demo-r2", &Default::default()).await.unwrap();
}

/// The CEL rule that forbids TFHE with the strategies that must read (or separately aggregate)
/// individual updates, checked with the strategy values as serde writes them from the enum, so a
/// rule that compares with a misspelt literal (it once said 'Scaffold' for `SCAFFOLD`) fails here.
#[tokio::test]
async fn tfhe_is_refused_with_every_strategy_it_cannot_serve() {
    use caduceus_crds::study::Strategy;
    install_crds().await;
    let client = client().await;
    let ns = TestNamespace::create(&client, "e2e-cel").await;
    let gvk = GroupVersionKind::gvk("fl.caduceus.dev", "v1alpha1", "FederatedStudy");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns.name, &ApiResource::from_gvk(&gvk));
    let all = [
        Strategy::FedAvg,
        Strategy::FedProx,
        Strategy::Scaffold,
        Strategy::FairFed,
        Strategy::TrimmedMean,
        Strategy::Median,
    ];
    for (i, s) in all.into_iter().enumerate() {
        let refused = matches!(s, Strategy::Scaffold | Strategy::TrimmedMean | Strategy::Median);
        let strategy = serde_json::to_value(s).unwrap();
        let mut aggregation = json!({"strategy": strategy});
        match s {
            Strategy::FedProx => aggregation["mu"] = json!(0.1),
            Strategy::FairFed => aggregation["beta"] = json!(1.0),
            _ => {}
        }
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "fl.caduceus.dev/v1alpha1", "kind": "FederatedStudy",
            "metadata": {"name": format!("tfhe-{i}")},
            "spec": {
                "model": {"architecture": "small-cnn"},
                "task": {"label": "gender", "sensitiveAttributes": ["race"]},
                "rounds": {"total": 1},
                "aggregation": aggregation,
                "secureAggregation": {"mode": "Tfhe"},
                "hospitalSelector": {},
                "modelStore": {"claimName": "m"},
            },
        }))
        .unwrap();
        let pp = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match api.create(&pp, &obj).await {
            Ok(_) => assert!(!refused, "TFHE with {strategy} was admitted"),
            Err(kube::Error::Api(e)) => {
                assert!(refused, "TFHE with {strategy} was refused: {}", e.message);
                assert!(
                    e.message
                        .contains("secureAggregation.mode Tfhe cannot be combined"),
                    "{strategy}: {}",
                    e.message
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
}
