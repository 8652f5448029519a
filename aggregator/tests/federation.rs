//! A small federated study through the real `caduceus-aggregator` and `caduceus-trainer` binaries over
//! mutual TLS, on a few hundred real UTKFace images (2 hospitals, 2 rounds):
//!
//! - the hospitals' evaluation of the final model beats their evaluation of the initial model;
//! - a client certificate from another CA is refused at the TLS handshake;
//! - a certificate of the right CA naming an unexpected hospital, another study's id, a wrong round, a
//!   wrong shape and a NaN update are refused with their status codes;
//! - a second update from the same hospital in one round is refused (ALREADY_EXISTS);
//! - killing the aggregator (SIGKILL) between rounds and starting it again resumes from the checkpoint;
//! - a trainer sends one evaluation per round it takes part in: `--rounds 0` of a 2-round study sends
//!   1, and `--rounds 1-2` against the aggregator resumed at round 1 (the shape of an operator trainer
//!   Job, `CADUCEUS_ROUNDS="r-(r+1)"` with the final evaluation) sends 2, as
//!   `caduceus_privacy::evaluation_releases(1, false)` and `(1, true)` say (the CLI's DP test checks
//!   the function itself against a run).
//!
//! The data comes from `$CADUCEUS_DATA_DIR/utkface-64`, else `../shared/data/utkface-64` next to the
//! repository. The trainer binary is taken from the aggregator's target directory, and built there if it
//! is missing.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caduceus_aggregation::ModelStore;
use caduceus_dataset::{SplitConfig, SplitScheme, hospital_dir_name};
use caduceus_pki::{DEFAULT_VALIDITY, StudyCa, TlsPaths, write_pem};
use caduceus_proto::{ClientTls, Code, EvaluationCounts, FederationClient, UpdateHeader};
use common::{H0, H1, Proc, StudyDir, client_tls, expect_code};

const STUDY: &str = "itest";

fn data_dir() -> PathBuf {
    caduceus_dataset::data_dir()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
        .join("utkface-64")
}

/// The trainer binary, from the aggregator's target directory (built there if it is missing).
fn trainer_bin() -> PathBuf {
    let agg = PathBuf::from(env!("CARGO_BIN_EXE_caduceus-aggregator"));
    let dir = agg.parent().unwrap().to_path_buf();
    let trainer = dir.join(format!("caduceus-trainer{}", std::env::consts::EXE_SUFFIX));
    if !trainer.is_file() {
        // `cargo test -p caduceus-aggregator` does not build other packages' binaries: build it into
        // the same target directory and profile.
        let target_dir = dir.parent().unwrap();
        let profile = dir.file_name().unwrap().to_string_lossy().into_owned();
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "-p", "caduceus-trainer"])
            .env("CARGO_TARGET_DIR", target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile == "release" {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build -p caduceus-trainer");
        assert!(st.success(), "building caduceus-trainer failed");
    }
    trainer
}

struct Env {
    study: StudyDir,
    trainer_bin: PathBuf,
    split: PathBuf,
}

impl Env {
    fn path(&self, p: &str) -> PathBuf {
        self.study.path(p)
    }

    fn start_aggregator(&self, tag: &str) -> (Proc, u16) {
        let mut cmd = self.study.aggregator(tag, "store");
        cmd.args(["--strategy", "fedavg"])
            .args(["--arch", "small-cnn", "--init-seed", "1"])
            .args(["--round-deadline-secs", "300", "--linger-secs", "2"])
            .arg("--summary-path")
            .arg(self.path("aggregator-summary.json"));
        self.study.start(cmd, tag)
    }

    fn start_trainer(&self, i: usize, port: u16, rounds: &str) -> Proc {
        let (name, tls) = &self.study.pki.hospitals[i];
        let log = std::fs::File::create(self.path(&format!("{name}-{rounds}.log"))).unwrap();
        let child = Command::new(&self.trainer_bin)
            .args(["--hospital", name, "--study-id", STUDY, "--rounds", rounds])
            .arg("--shard")
            .arg(self.split.join(hospital_dir_name(i)))
            .args([
                "--aggregator",
                &format!("127.0.0.1:{port}"),
                "--server-name",
                "localhost",
            ])
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca_cert)
            .args([
                "--epochs",
                "3",
                "--batch-size",
                "32",
                "--lr",
                "0.001",
                "--seed",
                &i.to_string(),
            ])
            .args([
                "--sensitive",
                "race",
                "--loader-threads",
                "1",
                "--retry-secs",
                "60",
            ])
            .arg("--summary-path")
            .arg(self.path(&format!("{name}-summary.json")))
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting a trainer");
        Proc(child)
    }
}

fn setup() -> Env {
    let study = StudyDir::new(STUDY);
    let images = data_dir();
    assert!(
        images.is_dir(),
        "UTKFace images not found at {} (set CADUCEUS_DATA_DIR)",
        images.display()
    );
    let report = caduceus_dataset::import(&images).expect("import");
    let cfg = SplitConfig {
        hospitals: 2,
        test_fraction: 0.1,
        val_fraction: 0.35,
        scheme: SplitScheme::Iid,
        seed: 7,
        limit: Some(480),
        min_per_hospital: 20,
    };
    let split = caduceus_dataset::split(&report.records, &cfg).expect("split");
    let split_dir = study.path("split");
    split.write(&split_dir, &images, &cfg).expect("write split");
    Env {
        study,
        trainer_bin: trainer_bin(),
        split: split_dir,
    }
}

fn eval_counts() -> EvaluationCounts {
    EvaluationCounts {
        examples: 0,
        ..Default::default()
    }
}

async fn wait_until<F: Fn(&caduceus_proto::RoundStatus) -> bool>(
    client: &mut FederationClient,
    what: &str,
    timeout: Duration,
    f: F,
) -> caduceus_proto::RoundStatus {
    let t = Instant::now();
    loop {
        let st = client.status(None, Duration::ZERO).await.expect("status");
        if f(&st) {
            return st;
        }
        assert!(t.elapsed() < timeout, "timed out waiting for {what}: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_over_mtls_with_refusals_and_restart() {
    let env = setup();
    let (mut agg, port) = env.start_aggregator("a");
    let addr = format!("127.0.0.1:{port}");

    // A certificate for hospital-0 from another CA is refused during the TLS handshake.
    let rogue = StudyCa::generate(STUDY, DEFAULT_VALIDITY).unwrap();
    let rc = rogue.issue_hospital(H0, DEFAULT_VALIDITY).unwrap();
    let rogue_paths = TlsPaths {
        ca_cert: env.study.pki.ca_cert.clone(),
        cert: env.path("rogue.pem"),
        key: env.path("rogue-key.pem"),
    };
    write_pem(&rogue_paths.cert, &rc.cert_pem, false).unwrap();
    write_pem(&rogue_paths.key, &rc.key_pem, true).unwrap();
    let refused = match FederationClient::connect(&addr, &client_tls(&rogue_paths), STUDY).await {
        Err(e) => Some(e.to_string()),
        Ok(mut c) => c.status(None, Duration::ZERO).await.err().map(|e| e.to_string()),
    };
    assert!(refused.is_some(), "a certificate from another CA was accepted");

    let mut c0 = FederationClient::connect(&addr, &client_tls(&env.study.pki.hospitals[0].1), STUDY)
        .await
        .expect("connect as hospital-0");
    let st = c0.status(None, Duration::ZERO).await.unwrap();
    assert_eq!((st.current_round, st.total_rounds), (0, 2));

    // Round 0 through the real trainers.
    let mut t0 = env.start_trainer(0, port, "0");
    let mut t1 = env.start_trainer(1, port, "0");
    for t in [&mut t0, &mut t1] {
        let st = t.0.wait().unwrap();
        assert!(
            st.success(),
            "trainer failed for round 0: see {}",
            env.study.dir.path().display()
        );
    }
    wait_until(&mut c0, "round 1 to open", Duration::from_secs(60), |s| {
        s.current_round == 1
    })
    .await;

    // Kill the aggregator between rounds and start it again: it resumes from checkpoint 1.
    agg.0.kill().unwrap();
    agg.0.wait().unwrap();
    let store = ModelStore::open(env.path("store")).unwrap();
    assert_eq!(store.manifest().unwrap().unwrap().round, 1);
    let ckpt1 = store.load_round(1).unwrap();
    let (mut agg2, port) = env.start_aggregator("b");
    let addr = format!("127.0.0.1:{port}");
    let mut c0 = FederationClient::connect(&addr, &client_tls(&env.study.pki.hospitals[0].1), STUDY)
        .await
        .unwrap();
    let st = c0.status(None, Duration::ZERO).await.unwrap();
    assert_eq!(
        st.current_round, 1,
        "the restarted aggregator did not resume at round 1"
    );
    let gm = c0.fetch_model(1).await.unwrap();
    assert_eq!(gm.params, ckpt1.params, "served model differs from checkpoint 1");
    let n = gm.params.len();

    // Refusals, none of which is recorded.
    let header = |round: u32| UpdateHeader {
        round,
        num_examples: 10,
        evaluation: Some(eval_counts()),
        ..Default::default()
    };
    let zeros = vec![0.0f32; n];
    let mut nan = zeros.clone();
    nan[n / 2] = f32::NAN;
    expect_code(
        c0.submit(header(1), Some(&nan), None).await,
        Code::InvalidArgument,
        "NaN",
    );
    let mut inf = zeros.clone();
    inf[3] = f32::INFINITY;
    expect_code(
        c0.submit(header(1), Some(&inf), None).await,
        Code::InvalidArgument,
        "inf",
    );
    expect_code(
        c0.submit(header(1), Some(&zeros[1..]), None).await,
        Code::InvalidArgument,
        "parameters",
    );
    expect_code(
        c0.submit(header(0), Some(&zeros), None).await,
        Code::FailedPrecondition,
        "round 1 is open",
    );
    let mut other_study =
        FederationClient::connect(&addr, &client_tls(&env.study.pki.hospitals[0].1), "other-study")
            .await
            .unwrap();
    expect_code(
        other_study.submit(header(1), Some(&zeros), None).await,
        Code::PermissionDenied,
        "other-study",
    );
    let ca_pem = std::fs::read_to_string(&env.study.pki.ca_cert).unwrap();
    let ca_key = std::fs::read_to_string(&env.study.pki.ca_key).unwrap();
    let ca = StudyCa::from_pem(STUDY, &ca_pem, &ca_key).unwrap();
    let stranger = ca.issue_hospital("hospital-9", DEFAULT_VALIDITY).unwrap();
    let stranger_tls = ClientTls {
        ca_pem: ca_pem.clone(),
        cert_pem: stranger.cert_pem,
        key_pem: stranger.key_pem,
        server_name: "localhost".into(),
    };
    let mut c9 = FederationClient::connect(&addr, &stranger_tls, STUDY)
        .await
        .unwrap();
    expect_code(
        c9.status(None, Duration::ZERO).await,
        Code::PermissionDenied,
        "hospital-9",
    );
    let mut spoof = header(1);
    spoof.hospital = H1.into();
    expect_code(
        c0.submit(spoof, Some(&zeros), None).await,
        Code::PermissionDenied,
        "certificate",
    );
    let st = c0.status(None, Duration::ZERO).await.unwrap();
    assert!(
        st.received_from.is_empty(),
        "a refused update was recorded: {st:?}"
    );

    // Hospital-0's trainer takes part in round 1 (and the final evaluation, round 2, like an operator
    // trainer Job for round 1); a second update from hospital-0 is refused.
    let mut t0 = env.start_trainer(0, port, "1-2");
    wait_until(
        &mut c0,
        "hospital-0's round-1 update",
        Duration::from_secs(120),
        |s| s.received_from.iter().any(|h| h == H0),
    )
    .await;
    expect_code(
        c0.submit(header(1), Some(&zeros), None).await,
        Code::AlreadyExists,
        "already",
    );

    // Hospital-1 joins; round 1 closes, both evaluate the final model, and the study completes.
    let mut t1 = env.start_trainer(1, port, "1-2");
    for (name, t) in [(H0, &mut t0), (H1, &mut t1)] {
        let st = t.0.wait().unwrap();
        let summary = std::fs::read_to_string(env.path(&format!("{name}-summary.json"))).unwrap_or_default();
        assert!(st.success(), "{name} failed: {summary}");
        let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
        assert_eq!(v["status"], "succeeded", "{summary}");
    }
    let st = agg2.0.wait().unwrap();
    let summary = std::fs::read_to_string(env.path("aggregator-summary.json")).unwrap();
    assert!(st.success(), "aggregator failed: {summary}");
    let v: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(v["status"], "succeeded", "{summary}");
    assert_eq!(v["resumed_from_round"], 1, "{summary}");

    // Round records: 0 = initial model, 2 = final model, both evaluated by both hospitals.
    let read = |r: u32| -> caduceus_fairness::RoundResult {
        let p = env.path(&format!("store/round-{r:06}.json"));
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let (first, last) = (read(0), read(2));
    assert_eq!(first.participants, vec![H0.to_string(), H1.to_string()]);
    assert_eq!(last.participants, vec![H0.to_string(), H1.to_string()]);
    let (a0, a2) = (first.accuracy.unwrap(), last.accuracy.unwrap());
    eprintln!("federated validation accuracy: initial {a0:.3}, final {a2:.3}");
    assert!(
        a2 > a0 + 0.05,
        "accuracy did not improve: initial {a0:.3}, final {a2:.3}"
    );
    assert!(last.counts.attribute("race").is_some(), "no per-race counts");
    assert!(store.load_round(2).is_ok());

    // The evaluations each aggregator received from each hospital: one per round it took part in.
    for h in [H0, H1] {
        let accepted = |tag: &str| -> Vec<u32> {
            let log = std::fs::read_to_string(env.path(&format!("aggregator-{tag}.log"))).unwrap();
            log.lines()
                .filter(|l| l.contains("update accepted") && l.contains(&format!("hospital={h} ")))
                .filter_map(|l| l.split("round=").nth(1)?.split_whitespace().next()?.parse().ok())
                .collect()
        };
        // `--rounds 0`: training round 0 only (evaluation_releases(1, false)).
        assert_eq!(accepted("a"), vec![0], "{h}");
        // `--rounds 1-2`: training round 1 and the final evaluation (evaluation_releases(1, true)).
        assert_eq!(accepted("b"), vec![1, 2], "{h}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(env.path(&format!("{h}-summary.json"))).unwrap())
                .unwrap();
        assert_eq!(v["rounds"].as_array().unwrap().len(), 2, "{v}");
    }
}

/// Bad settings exit with code 2 and a message naming the setting.
#[test]
fn bad_settings_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let files =
        caduceus_pki::write_study_pki(dir.path(), STUDY, &[H0.to_string()], &["localhost".into()], &[])
            .unwrap();
    let agg = PathBuf::from(env!("CARGO_BIN_EXE_caduceus-aggregator"));
    let base = |extra: &[&str]| {
        let out = Command::new(&agg)
            .args(["--study-id", STUDY, "--rounds", "1", "--hospitals", H0])
            .arg("--tls-cert")
            .arg(&files.server.cert)
            .arg("--tls-key")
            .arg(&files.server.key)
            .arg("--tls-ca")
            .arg(&files.ca_cert)
            .arg("--model-store")
            .arg(dir.path().join("store"))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = base(&["--quorum-min", "3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--quorum-min"), "{err}");
    let (code, err) = base(&["--arch", "vgg99"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--arch"), "{err}");
    let (code, err) = base(&["--hospitals", "Bad Name"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--hospitals"), "{err}");
}

/// A round that misses its quorum by the deadline fails the study clearly (exit 1, summary says why).
#[test]
fn missed_quorum_fails_the_study() {
    let env = StudyDir::new(STUDY);
    let summary = env.path("summary.json");
    let out = env
        .aggregator("q", "store")
        .args([
            "--quorum-min",
            "1",
            "--round-deadline-secs",
            "1",
            "--linger-secs",
            "0",
        ])
        .args(["--arch", "resnet8"])
        .arg("--summary-path")
        .arg(&summary)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["status"], "failed");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("round 0 missed its quorum"), "{msg}");
    assert!(msg.contains("0 of the required 1"), "{msg}");
}
