//! The operator on the real local control plane, with pods run by localnode.
//!
//! One study, three hospitals in three namespaces, three rounds, DP-SGD and TFHE on; a fourth
//! hospital with a tiny budget is left out with `PrivacyBudgetExhausted`. The operator is killed
//! (SIGKILL) and restarted at five points of the study; afterwards there must be exactly one
//! TrainingRound and one Job per round and hospital, and each ledger must equal the accountant's
//! figure for the three rounds that ran (nothing counted twice). Then a second study with a broken
//! hospital completes on quorum, a trainer holding the first study's certificate is refused by the
//! second study's aggregator, and deleting the first study removes everything it owned.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use caduceus_crds::conditions::{ConditionExt, types};
use caduceus_crds::{FederatedStudy, HospitalClient, TrainingRound};
use caduceus_privacy::ledger::PrivacyLedger;
use caduceus_privacy::{AccountantKind, SubsampledGaussian};
use common::{
    Q, SIGMA, STEPS, TestNamespace, apply, bin_dir, client, consent, free_port, hospital, http_get,
    install_crds, kubeconfig, kubectl, kubectl_ok, make_shards, resume, study_yaml, suspended, unique,
    wait_for,
};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};

const ROUNDS: u32 = 3;

struct Operator {
    child: Option<Child>,
    ns: String,
    /// `--watch-namespaces`: the study and hospital namespaces it serves.
    watch: String,
    metrics_port: u16,
    log: PathBuf,
}

impl Operator {
    fn start(ns: &str, watch: &[&str], metrics_port: u16, log: PathBuf) -> Self {
        let mut o = Operator {
            child: None,
            ns: ns.into(),
            watch: watch.join(","),
            metrics_port,
            log,
        };
        o.spawn();
        o
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin_dir().join("caduceus-operator"))
            .env("KUBECONFIG", kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .args([
                "--namespace",
                &self.ns,
                "--endpoint-mode",
                "loopback",
                "--lease-seconds",
                "6",
                "--watch-namespaces",
                &self.watch,
            ])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(["--identity", &format!("e2e-{}", std::process::id())])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting caduceus-operator");
        self.child = Some(child);
    }

    /// SIGKILL (no graceful shutdown) and start again.
    fn kill_and_restart(&mut self, point: &str) {
        eprintln!("killing the operator: {point}");
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn study_reason(api: &Api<FederatedStudy>, name: &str) -> Option<(String, String)> {
    let s = api.get_opt(name).await.ok().flatten()?;
    let c = s.status?.conditions.condition(types::READY)?.clone();
    Some((c.reason, c.message))
}

async fn rounds(api: &Api<TrainingRound>, study: &str) -> Vec<TrainingRound> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|r| r.spec.study == study)
        .collect()
}

/// ε of `rounds` rounds: DP-SGD and the noised evaluation counts (one evaluation of the received
/// model per round and one of the final model, at the default evaluation noise multiplier).
fn expected_epsilon(rounds: u64) -> f64 {
    let mut l = PrivacyLedger::new();
    let eval = SubsampledGaussian {
        noise_multiplier: caduceus_crds::study::DEFAULT_EVALUATION_NOISE_MULTIPLIER,
        sample_rate: 1.0,
        steps: 2,
    };
    for r in 0..rounds {
        l.record(
            caduceus_privacy::ledger::RoundKey::new("x", r),
            &[SubsampledGaussian::new(SIGMA, Q, STEPS).unwrap(), eval],
        )
        .unwrap();
    }
    l.epsilon(1e-5, AccountantKind::Pld).unwrap()
}

async fn epsilon_of(client: &Client, ns: &str, name: &str) -> Option<f64> {
    let h = Api::<HospitalClient>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?;
    h.status?.epsilon_spent
}

#[tokio::test]
async fn operator_runs_studies_end_to_end() {
    let client = client().await;
    let work = tempfile::tempdir().unwrap();
    make_shards(work.path(), 3);
    let split = work.path().join("split");

    let op_ns = TestNamespace::create(&client, "e2e-op").await;
    let sns = TestNamespace::create(&client, "e2e-study").await;
    let h: Vec<TestNamespace> = vec![
        TestNamespace::create(&client, "e2e-h0").await,
        TestNamespace::create(&client, "e2e-h1").await,
        TestNamespace::create(&client, "e2e-h2").await,
        TestNamespace::create(&client, "e2e-h3").await,
    ];
    let network = unique("net");
    let main = "faces";
    let flaky = "flaky";
    let consents = vec![format!("{}/{main}", sns.name), format!("{}/{flaky}", sns.name)];
    install_crds();
    #[allow(clippy::needless_range_loop)]
    for i in 0..3 {
        let shard = split.join(format!("hospital-{i}"));
        hospital(
            &client,
            &h[i].name,
            &format!("hospital-{i}"),
            Some(&shard),
            50.0,
            &consents,
            &network,
            "/shard",
        )
        .await;
    }
    // A hospital whose budget cannot pay for a single round.
    hospital(
        &client,
        &h[3].name,
        "tiny-budget",
        Some(&split.join("hospital-0")),
        0.01,
        &consents[..1],
        &network,
        "/shard",
    )
    .await;

    let metrics_port = free_port();
    let watch = [
        sns.name.as_str(),
        h[0].name.as_str(),
        h[1].name.as_str(),
        h[2].name.as_str(),
        h[3].name.as_str(),
    ];
    let mut op = Operator::start(
        &op_ns.name,
        &watch,
        metrics_port,
        work.path().join("operator.log"),
    );
    let studies: Api<FederatedStudy> = Api::namespaced(client.clone(), &sns.name);
    let trs: Api<TrainingRound> = Api::namespaced(client.clone(), &sns.name);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &sns.name);

    apply(&study_yaml(&sns.name, main, &network, ROUNDS, 3, 120));
    let log = work.path().join("operator.log");
    let dump = || std::fs::read_to_string(&log).unwrap_or_default();

    // Kill 1: as soon as the study exists (before or while round 0 is created).
    op.kill_and_restart("right after the study was created");
    // The hospitals consent to the study's terms (bare names are never admitted).
    consent(
        &client,
        &sns.name,
        main,
        &[
            (&h[0].name, "hospital-0"),
            (&h[1].name, "hospital-1"),
            (&h[2].name, "hospital-2"),
            (&h[3].name, "tiny-budget"),
        ],
    )
    .await;
    // Kill 2: once round 0 exists.
    wait_for("round 0", Duration::from_secs(120), || async {
        (!rounds(&trs, main).await.is_empty()).then_some(())
    })
    .await;
    op.kill_and_restart("round 0 exists");
    // Kill 3: once round 1's aggregator Job exists.
    wait_for("round 1's aggregator Job", Duration::from_secs(400), || async {
        jobs.get_opt(&format!("{main}-r1-agg"))
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await;
    op.kill_and_restart("round 1's aggregator Job exists");
    // Kill 4: once round 1 succeeded (its ledger commit and status just written).
    wait_for("round 1 to finish", Duration::from_secs(400), || async {
        let r = trs.get_opt(&format!("{main}-r1")).await.ok().flatten()?;
        r.status?
            .conditions
            .condition(types::SUCCEEDED)
            .filter(|c| c.status != "Unknown")
            .map(|_| ())
    })
    .await;
    op.kill_and_restart("round 1 finished");
    // Kill 5: while round 2 runs.
    wait_for("round 2", Duration::from_secs(120), || async {
        trs.get_opt(&format!("{main}-r2"))
            .await
            .ok()
            .flatten()
            .map(|_| ())
    })
    .await;
    op.kill_and_restart("round 2 runs");

    let (reason, msg) = wait_for("the study to end", Duration::from_secs(600), || async {
        let (r, m) = study_reason(&studies, main).await?;
        (r == "Completed" || r == "RoundFailed").then_some((r, m))
    })
    .await;
    assert_eq!(reason, "Completed", "{msg}\noperator log:\n{}", dump());

    // Every round succeeded, once.
    let all = rounds(&trs, main).await;
    assert_eq!(
        all.len(),
        ROUNDS as usize,
        "one TrainingRound per round: {:?}",
        all.iter().map(|r| r.metadata.name.clone()).collect::<Vec<_>>()
    );
    for r in &all {
        let st = r.status.as_ref().expect("round status");
        assert!(st.conditions.is_true(types::SUCCEEDED), "{:?}", st.conditions);
        assert!(
            st.conditions
                .condition(types::FAIRNESS_WITHIN_THRESHOLD)
                .is_some(),
            "a fairness condition: {:?}",
            st.conditions
        );
        assert!(
            st.accuracy.is_some() && st.equalized_odds_difference.is_some() && st.epsilon_spent_max.is_some(),
            "{st:?}"
        );
        assert_eq!(
            r.spec.participants.len(),
            3,
            "the tiny-budget hospital is left out: {:?}",
            r.spec.participants
        );
    }
    let table = kubectl_ok(&["get", "rounds", "-n", &sns.name]);
    for col in ["ACCURACY", "EOD", "EPSILON", "FAIR"] {
        assert!(table.contains(col), "{table}");
    }
    assert!(
        table.contains(&format!("{main}-r2")) && table.contains("Succeeded"),
        "{table}"
    );
    let study = studies.get(main).await.unwrap();
    let sst = study.status.clone().unwrap();
    assert!(
        sst.conditions.condition(types::FAIRNESS_DEGRADED).is_some(),
        "{:?}",
        sst.conditions
    );
    assert_eq!(sst.completed_rounds, ROUNDS);

    // One aggregator Job per round, one trainer Job per round and hospital: no duplicates.
    let agg_jobs = jobs
        .list(&ListParams::default().labels(&format!("fl.caduceus.dev/study={main}")))
        .await
        .unwrap()
        .items;
    assert_eq!(agg_jobs.len(), ROUNDS as usize, "aggregator Jobs");
    for ns in h.iter().take(3) {
        let tj = Api::<Job>::namespaced(client.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        assert_eq!(tj.len(), ROUNDS as usize, "trainer Jobs in {}", ns.name);
    }

    // Each ledger equals the accountant's ε for the three rounds that ran: nothing counted twice.
    let want = expected_epsilon(ROUNDS as u64);
    for (i, ns) in h.iter().take(3).enumerate() {
        let got = epsilon_of(&client, &ns.name, &format!("hospital-{i}"))
            .await
            .expect("epsilonSpent");
        assert!(
            (got - want).abs() < 1e-5,
            "hospital-{i}: ledger ε {got} vs accountant {want}"
        );
    }
    let tiny = Api::<HospitalClient>::namespaced(client.clone(), &h[3].name)
        .get("tiny-budget")
        .await
        .unwrap();
    let cond = tiny
        .status
        .unwrap()
        .conditions
        .condition(types::PRIVACY_BUDGET_EXHAUSTED)
        .cloned()
        .expect("PrivacyBudgetExhausted");
    assert_eq!(cond.status, "True");
    assert!(
        cond.message.contains("above the budget of 0.01"),
        "{}",
        cond.message
    );

    // The aggregator's ServiceAccount cannot read the study key (nor any Secret).
    let sa = format!("system:serviceaccount:{}:caduceus-aggregator", sns.name);
    for ns in [&op_ns.name, &h[0].name, &sns.name] {
        let out = kubectl(&["auth", "can-i", "get", "secrets", "-n", ns, "--as", &sa]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "the aggregator may read Secrets in {ns}"
        );
    }
    let key_secrets = Api::<Secret>::namespaced(client.clone(), &h[0].name)
        .list(&ListParams::default().labels("app.kubernetes.io/component=study-key"))
        .await
        .unwrap()
        .items;
    assert_eq!(
        key_secrets.len(),
        1,
        "the study key is copied into the hospital's namespace"
    );

    // Metrics.
    let metrics = http_get(metrics_port, "/metrics");
    for m in [
        "caduceus_reconciliations_total",
        "caduceus_reconcile_duration_seconds",
        "caduceus_privacy_epsilon_spent",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics:\n{metrics}");
    }
    assert_eq!(http_get(metrics_port, "/healthz").trim(), "ok");

    // A second study with a hospital whose data path is wrong: the round completes on quorum.
    hospital(
        &client,
        &h[3].name,
        "broken",
        None,
        50.0,
        &consents[1..],
        &network,
        "/no-such-shard",
    )
    .await;
    // The tiny-budget hospital does not consent to this study; hospital-0..2 and `broken` do. The
    // study waits suspended until all four have: three are a quorum, and a round started on the
    // first three would leave `broken` out.
    apply(&suspended(&study_yaml(&sns.name, flaky, &network, 1, 3, 40)));
    consent(
        &client,
        &sns.name,
        flaky,
        &[
            (&h[0].name, "hospital-0"),
            (&h[1].name, "hospital-1"),
            (&h[2].name, "hospital-2"),
            (&h[3].name, "broken"),
        ],
    )
    .await;
    resume(&client, &sns.name, flaky).await;
    // A trainer holding the first study's certificate is refused by the second study's aggregator.
    let agg_pod_running = wait_for(
        "the second study's aggregator Job",
        Duration::from_secs(180),
        || async {
            jobs.get_opt(&format!("{flaky}-r0-agg"))
                .await
                .ok()
                .flatten()?
                .status?
                .active
                .filter(|a| *a > 0)
        },
    )
    .await;
    let _ = agg_pod_running;
    let svc = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &sns.name)
        .get(&format!("{flaky}-aggregator"))
        .await
        .unwrap();
    let port = svc.spec.unwrap().ports.unwrap()[0].node_port.unwrap();
    let certs = tempfile::tempdir().unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &h[0].name);
    let main_cert = secrets
        .list(&ListParams::default().labels(&format!(
            "fl.caduceus.dev/study={main},app.kubernetes.io/component=client-certificate"
        )))
        .await
        .unwrap()
        .items
        .pop()
        .expect("hospital-0's certificate for the first study");
    for (k, v) in main_cert.data.unwrap() {
        std::fs::write(certs.path().join(&k), v.0).unwrap();
    }
    let intruder = Command::new(bin_dir().join("caduceus-trainer"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .args([
            "--hospital",
            &caduceus_operator::names::hospital_id(&h[0].name, "hospital-0"),
            "--study-id",
            &format!("{}-{flaky}", sns.name),
        ])
        .arg("--shard")
        .arg(split.join("hospital-0"))
        .args([
            "--aggregator",
            &format!("127.0.0.1:{port}"),
            "--server-name",
            &format!("{flaky}-aggregator.{}.svc", sns.name),
        ])
        .arg("--tls-cert")
        .arg(certs.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(certs.path().join("tls.key"))
        .arg("--tls-ca")
        .arg(certs.path().join("ca.crt"))
        .args(["--rounds", "0-1", "--local-steps", "1", "--retry-secs", "5"])
        .output()
        .expect("running an intruding trainer");
    let err = String::from_utf8_lossy(&intruder.stderr);
    assert!(
        !intruder.status.success(),
        "a trainer with another study's certificate was served:\n{err}"
    );
    assert!(
        err.to_lowercase().contains("certificate")
            || err.to_lowercase().contains("tls")
            || err.to_lowercase().contains("handshake"),
        "the refusal should be about the certificate:\n{err}"
    );

    let (reason, msg) = wait_for("the second study to end", Duration::from_secs(400), || async {
        let (r, m) = study_reason(&studies, flaky).await?;
        (r == "Completed" || r == "RoundFailed").then_some((r, m))
    })
    .await;
    assert_eq!(reason, "Completed", "{msg}\noperator log:\n{}", dump());
    let r0 = trs.get(&format!("{flaky}-r0")).await.unwrap();
    let st = r0.status.unwrap();
    assert_eq!(st.participation.as_deref(), Some("3/4"), "{st:?}");
    let succeeded = st.conditions.condition(types::SUCCEEDED).unwrap();
    assert!(
        succeeded.message.contains("trainer Jobs failed"),
        "{}",
        succeeded.message
    );

    // Deleting the first study removes everything it owned, in every namespace.
    studies.delete(main, &DeleteParams::default()).await.unwrap();
    wait_for(
        "the first study to be deleted",
        Duration::from_secs(120),
        || async { studies.get_opt(main).await.ok().flatten().is_none().then_some(()) },
    )
    .await;
    let owned = format!(
        "fl.caduceus.dev/study={main},fl.caduceus.dev/study-namespace={}",
        sns.name
    );
    wait_for(
        "the first study's objects to be garbage-collected",
        Duration::from_secs(120),
        || {
            let (client, owned, trs) = (client.clone(), owned.clone(), trs.clone());
            async move {
                let lp = ListParams::default().labels(&owned);
                let j = Api::<Job>::all(client.clone()).list(&lp).await.ok()?.items.len();
                let s = Api::<Secret>::all(client.clone())
                    .list(&lp)
                    .await
                    .ok()?
                    .items
                    .len();
                let r = rounds(&trs, main).await.len();
                (j + s + r == 0).then_some(())
            }
        },
    )
    .await;
    let mut left: BTreeMap<String, usize> = BTreeMap::new();
    for r in rounds(&trs, flaky).await {
        *left.entry(r.spec.study).or_default() += 1;
    }
    assert_eq!(left.get(flaky), Some(&1), "the second study is untouched");
    drop(op);
}
