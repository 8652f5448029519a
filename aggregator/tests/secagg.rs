//! Secure aggregation (`--secure-aggregation tfhe`) through the real `caduceus-aggregator` binary over
//! mutual TLS, with this test playing two hospitals that hold the study key:
//!
//! - the aggregator holds no key material: its command line (`/proc/PID/cmdline`), environment
//!   (`/proc/PID/environ`), the files it has open (`/proc/PID/fd`), its model store and its log contain
//!   neither the key file's bytes nor the key's secret bits (nor their hex), and it has no key option;
//! - encrypted updates bound to the wrong round, made under another key, or truncated are refused with
//!   a clear gRPC status, and so are plaintext updates;
//! - the encrypted aggregate it serves decrypts (hospital side) to the weighted mean of the deltas
//!   within the stated quantisation error, and it is checkpointed: a restarted aggregator resumes and
//!   serves the same ciphertexts;
//! - SCAFFOLD and a missing key fingerprint are refused at start-up.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use caduceus_proto::{ClientError, Code, FederationClient, UpdateHeader};
use caduceus_secagg::{AcceptPolicy, Decryptor, Encryptor, SecAggParams, StudyKey, SumBounds};
use common::{H0, H1, Proc, StudyDir, sample_counts};

const STUDY: &str = "secagg-itest";

struct Env {
    study: StudyDir,
    key: StudyKey,
    key_path: PathBuf,
}

impl Env {
    fn new() -> Env {
        let study = StudyDir::new(STUDY);
        // The key lives in a hospital's directory; the aggregator is only told its fingerprint.
        let key = StudyKey::generate(STUDY).unwrap();
        let hdir = study.path("hospital-0");
        std::fs::create_dir_all(&hdir).unwrap();
        let key_path = hdir.join("study.key");
        key.save(&key_path).unwrap();
        Env { study, key, key_path }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.study.path(p)
    }

    fn aggregator(&self, tag: &str, extra: &[&str]) -> Command {
        let mut c = self.study.aggregator(tag, "store");
        c.args(["--arch", "small-cnn", "--init-seed", "3"])
            .args(["--round-deadline-secs", "300", "--linger-secs", "1"])
            .args(extra);
        c
    }

    fn start(&self, tag: &str) -> (Proc, u16) {
        let fp = self.key.fingerprint().to_string();
        let cmd = self.aggregator(tag, &["--secure-aggregation", "tfhe", "--key-fingerprint", &fp]);
        self.study.start(cmd, tag)
    }

    async fn client(&self, i: usize, port: u16) -> FederationClient {
        self.study.client(i, port).await
    }
}

fn params() -> SecAggParams {
    SecAggParams::new(1.0, SumBounds::default()).unwrap()
}

fn header(round: u32, n: usize, num_examples: u64, fp: &str) -> UpdateHeader {
    UpdateHeader {
        round,
        num_examples,
        num_parameters: n as u64,
        key_fingerprint: fp.to_string(),
        evaluation: Some(sample_counts()),
        ..Default::default()
    }
}

fn expect_code<T: std::fmt::Debug>(r: Result<T, ClientError>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got success {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), Some(code), "wrong status for {needle}: {e}");
            assert!(
                e.to_string().to_lowercase().contains(&needle.to_lowercase()),
                "status message lacks {needle:?}: {e}"
            );
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The byte strings that would betray the key: the whole key file, its secret bits (raw and hex), and
/// every 32-byte window of the secret (a partial leak).
fn secrets(key: &StudyKey) -> Vec<(String, Vec<u8>)> {
    let file = key.to_bytes().to_vec();
    let id_len = file[10] as usize;
    let secret = file[11 + id_len..file.len() - 16].to_vec();
    assert_eq!(secret.len(), 256, "2048 key bits");
    let mut out = vec![
        ("key file".to_string(), file.clone()),
        ("secret bits".to_string(), secret.clone()),
        ("secret bits (hex)".to_string(), hex::encode(&secret).into_bytes()),
    ];
    for (i, w) in secret.windows(32).enumerate().step_by(32) {
        out.push((format!("secret bytes {i}..{}", i + 32), w.to_vec()));
    }
    out
}

fn scan(what: &str, bytes: &[u8], secrets: &[(String, Vec<u8>)], key_path: &Path) {
    for (name, s) in secrets {
        assert!(!contains(bytes, s), "{what} contains the {name}");
    }
    let p = key_path.to_string_lossy();
    assert!(!contains(bytes, p.as_bytes()), "{what} names the key file {p}");
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Scans the running aggregator (cmdline, environ, open files) and its store and log for key material.
fn scan_aggregator(env: &Env, pid: u32, tag: &str) {
    let secrets = secrets(&env.key);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap();
    assert!(contains(&cmdline, b"--key-fingerprint"), "cmdline read");
    scan("the aggregator's command line", &cmdline, &secrets, &env.key_path);
    let environ = std::fs::read(proc_dir.join("environ")).unwrap();
    scan("the aggregator's environment", &environ, &secrets, &env.key_path);
    let mut opened = 0;
    for fd in std::fs::read_dir(proc_dir.join("fd")).unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        assert_ne!(target, env.key_path, "the aggregator has the key file open");
        scan(
            "an open file's path",
            target.to_string_lossy().as_bytes(),
            &secrets,
            &env.key_path,
        );
        if target.is_file()
            && let Ok(bytes) = std::fs::read(&target)
        {
            scan(
                &format!("open file {}", target.display()),
                &bytes,
                &secrets,
                &env.key_path,
            );
            opened += 1;
        }
    }
    assert!(opened > 0, "no open regular file was scanned (the log at least)");
    let mut files = Vec::new();
    files_under(&env.path("store"), &mut files);
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("secagg-aggregate-000000")),
        "the encrypted aggregate was not checkpointed: {files:?}"
    );
    for f in files {
        scan(
            &format!("store file {}", f.display()),
            &std::fs::read(&f).unwrap(),
            &secrets,
            &env.key_path,
        );
    }
    let log = std::fs::read(env.path(&format!("aggregator-{tag}.log"))).unwrap();
    scan("the aggregator's log", &log, &secrets, &env.key_path);
}

async fn wait_round(c: &mut FederationClient, round: u32) {
    let t = Instant::now();
    loop {
        let st = c.status(Some(round), Duration::from_secs(5)).await.unwrap();
        if st.current_round >= round {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "round {round} did not open: {st:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_sums_ciphertexts_without_the_key() {
    let env = Env::new();
    let p = params();
    let fp = env.key.fingerprint().to_string();
    let (agg, port) = env.start("a");
    let mut c0 = env.client(0, port).await;
    let mut c1 = env.client(1, port).await;

    let gm = c0.fetch_secure_model(0, None).await.unwrap();
    assert_eq!(gm.info.key_fingerprint, fp);
    assert!(gm.aggregates.is_empty());
    let x0 = gm.base_params.clone().expect("the public initial model");
    let n = x0.len();
    assert!(
        c0.fetch_model(0).await.is_err(),
        "a plaintext fetch must be refused by the client"
    );

    let e0 = Encryptor::new(&env.key, &p, H0).unwrap();
    let e1 = Encryptor::new(&env.key, &p, H1).unwrap();
    let d0: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect();
    let d1: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * -2e-3).collect();

    // Refusals, none of which is recorded.
    let wrong_round = e0.encrypt_update(1, &d0).unwrap();
    expect_code(
        c0.submit_encrypted(header(0, n, 30, &fp), &wrong_round).await,
        Code::FailedPrecondition,
        "round mismatch",
    );
    let other_key = StudyKey::generate(STUDY).unwrap();
    let eo = Encryptor::new(&other_key, &p, H0).unwrap();
    let under_other = eo.encrypt_update(0, &d0).unwrap();
    expect_code(
        c0.submit_encrypted(
            header(0, n, 30, &other_key.fingerprint().to_string()),
            &under_other,
        )
        .await,
        Code::FailedPrecondition,
        "key",
    );
    expect_code(
        c0.submit_encrypted(header(0, n, 30, &fp), &under_other).await,
        Code::FailedPrecondition,
        "key fingerprint mismatch",
    );
    let good0 = e0.encrypt_update(0, &d0).unwrap();
    let mut truncated = good0.clone();
    let last = truncated.last_mut().unwrap();
    last.truncate(last.len() - 100);
    expect_code(
        c0.submit_encrypted(header(0, n, 30, &fp), &truncated).await,
        Code::InvalidArgument,
        "encrypted update refused",
    );
    expect_code(
        c0.submit_encrypted(header(0, n, 30, &fp), &good0[..good0.len() - 1])
            .await,
        Code::InvalidArgument,
        "incomplete",
    );
    // A chunk claiming another hospital than the client certificate.
    let as_h1 = e1.encrypt_update(0, &d1).unwrap();
    expect_code(
        c0.submit_encrypted(header(0, n, 30, &fp), &as_h1).await,
        Code::PermissionDenied,
        "sender",
    );
    let plain = UpdateHeader {
        round: 0,
        num_examples: 30,
        evaluation: Some(sample_counts()),
        ..Default::default()
    };
    expect_code(
        c0.submit(plain, Some(&d0), None).await,
        Code::FailedPrecondition,
        "plaintext updates are refused",
    );
    let st = c0.status(None, Duration::ZERO).await.unwrap();
    assert!(
        st.received_from.is_empty(),
        "a refused update was recorded: {st:?}"
    );

    // Two valid encrypted updates (FedAvg weights 30 and 10) close round 0.
    c0.submit_encrypted(header(0, n, 30, &fp), &good0).await.unwrap();
    c1.submit_encrypted(header(0, n, 10, &fp), &as_h1).await.unwrap();
    wait_round(&mut c0, 1).await;

    // Hospital side: decrypt the served aggregate; it is the weighted mean within the stated error.
    let gm1 = c1.fetch_secure_model(1, None).await.unwrap();
    assert_eq!(gm1.base_params.as_deref(), Some(&x0[..]));
    assert_eq!(gm1.aggregates.len(), 1);
    let dec = Decryptor::new(&env.key, &p).unwrap();
    let sum = dec
        .decrypt_aggregate(0, &gm1.aggregates[0].1, &AcceptPolicy::new(2))
        .unwrap();
    assert_eq!(sum.contributors, vec![(H0.to_string(), 30), (H1.to_string(), 10)]);
    let mean = sum.mean(&p);
    let bound = p.quantisation_error_bound() + 1e-7;
    for i in 0..n {
        let want = (30.0 * f64::from(d0[i]) + 10.0 * f64::from(d1[i])) / 40.0;
        assert!(
            (f64::from(mean[i]) - want).abs() <= bound,
            "value {i}: {} vs {want} (bound {bound})",
            mean[i]
        );
    }
    // Only the aggregates after the model a hospital holds are sent when it says so.
    let tail = c1.fetch_secure_model(1, Some(1)).await.unwrap();
    assert!(tail.base_params.is_none() && tail.aggregates.is_empty());

    // No key material anywhere in or around the running aggregator.
    scan_aggregator(&env, agg.0.id(), "a");

    // Restart: it resumes at round 1 and serves the same ciphertexts from its checkpoint.
    drop(agg);
    let (agg2, port) = env.start("b");
    let mut c0 = env.client(0, port).await;
    let st = c0.status(None, Duration::ZERO).await.unwrap();
    assert_eq!(st.current_round, 1, "did not resume at round 1");
    let again = c0.fetch_secure_model(1, None).await.unwrap();
    assert_eq!(again.aggregates, gm1.aggregates, "resumed aggregate differs");
    scan_aggregator(&env, agg2.0.id(), "b");
}

#[test]
fn aggregator_refuses_scaffold_and_has_no_key_option() {
    let env = Env::new();
    let fp = env.key.fingerprint().to_string();
    let out = env
        .aggregator(
            "s",
            &[
                "--secure-aggregation",
                "tfhe",
                "--key-fingerprint",
                &fp,
                "--strategy",
                "scaffold",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scaffold"), "{err}");
    let out = env
        .aggregator("f", &["--secure-aggregation", "tfhe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--key-fingerprint"), "{err}");
    let key = env.key_path.to_string_lossy().to_string();
    for opt in ["--study-key", "--key", "--secret-key", "--key-file"] {
        let out = env
            .aggregator(
                "k",
                &[
                    "--secure-aggregation",
                    "tfhe",
                    "--key-fingerprint",
                    &fp,
                    opt,
                    &key,
                ],
            )
            .output()
            .unwrap();
        assert!(!out.status.success(), "{opt} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unexpected argument"), "{opt}: {err}");
    }
    let help = env.aggregator("h", &["--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--key-fingerprint") && !help.contains("--study-key"),
        "{help}"
    );
}
