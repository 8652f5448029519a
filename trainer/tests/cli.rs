//! The trainer binary's failure behaviour: a clear message, a non-zero exit code, and a summary file
//! that says what went wrong.
use std::process::Command;

fn trainer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caduceus-trainer"))
}

#[test]
fn help_lists_the_settings() {
    let out = trainer().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--hospital",
        "--shard",
        "--aggregator",
        "--tls-cert",
        "--rounds",
        "--summary-path",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn bad_settings_fail_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("out/summary.json");
    let out = trainer()
        .args(["--hospital", "hospital-0", "--study-id", "s1"])
        .arg("--shard")
        .arg(dir.path().join("no-such-shard"))
        .args(["--aggregator", "127.0.0.1:1"])
        .args(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"])
        .arg("--summary-path")
        .arg(&summary)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--shard"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["hospital"], "hospital-0");
    assert!(v["message"].as_str().unwrap().contains("no-such-shard"));

    let out = trainer()
        .args(["--hospital", "Not Valid", "--study-id", "s1", "--shard", "."])
        .args([
            "--aggregator",
            "x:1",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "a",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hospital"));
}

/// Under DP the trainer never sends exact evaluation counts: without an evaluation noise multiplier
/// it refuses to start, naming the flag and its environment variable.
#[test]
fn dp_without_an_evaluation_noise_multiplier_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let run = |extra: &[&str], env: Option<&str>| {
        let mut c = trainer();
        c.args(["--hospital", "hospital-0", "--study-id", "s1"])
            .arg("--shard")
            .arg(dir.path())
            .args(["--aggregator", "127.0.0.1:1"])
            .args(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"])
            .args(["--dp-noise-multiplier", "1.0"])
            .args(extra)
            .arg("--summary-path")
            .arg(&summary)
            .env_remove("CADUCEUS_DP_EVAL_NOISE_MULTIPLIER");
        if let Some(z) = env {
            c.env("CADUCEUS_DP_EVAL_NOISE_MULTIPLIER", z);
        }
        c.output().unwrap()
    };
    let out = run(&[], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--dp-eval-noise-multiplier") && err.contains("CADUCEUS_DP_EVAL_NOISE_MULTIPLIER"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(v["status"], "failed");
    assert!(v["rounds"].as_array().unwrap().is_empty(), "nothing ran");
    // With the flag (or its variable) the DP settings pass; the run then fails later, on the
    // missing TLS files.
    for (extra, env) in [
        (&["--dp-eval-noise-multiplier", "10"][..], None),
        (&[][..], Some("10")),
    ] {
        let out = run(extra, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            !err.contains("--dp-eval-noise-multiplier") && err.contains("--tls-cert"),
            "{err}"
        );
    }
}
