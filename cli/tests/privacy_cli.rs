//! Runs the `caduceus privacy` subcommands as a user would.
use std::process::{Command, Output};

fn caduceus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caduceus"))
        .args(args)
        .output()
        .expect("the caduceus binary runs")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

const SCHEDULE: [&str; 6] = ["--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"];

#[test]
fn epsilon_json_with_both_accountants() {
    // Opacus' test vector (opacus/tests/accountants_test.py): RDP ε = 7.32911117143.
    let mut args = vec!["privacy", "epsilon", "--noise-multiplier", "1.5"];
    args.extend(SCHEDULE);
    args.extend(["--accountant", "rdp", "--json"]);
    let v = json(&caduceus(&args));
    assert!(
        (v["epsilon"].as_f64().unwrap() - 7.329_111_171_43).abs() < 1e-6,
        "{v}"
    );
    assert_eq!(v["delta"].as_f64(), Some(1e-5));
    assert_eq!(v["accountant"], "rdp");

    // PLD is the default and tighter.
    let mut args = vec!["privacy", "epsilon", "--noise-multiplier", "1.5"];
    args.extend(SCHEDULE);
    args.push("--json");
    let v = json(&caduceus(&args));
    assert_eq!(v["accountant"], "pld");
    let pld = v["epsilon"].as_f64().unwrap();
    assert!(pld > 6.7 && pld < 6.78, "{v}");
}

#[test]
fn epsilon_plain_text() {
    let mut args = vec!["privacy", "epsilon", "--noise-multiplier", "1.5"];
    args.extend(SCHEDULE);
    args.extend(["--accountant", "rdp"]);
    let out = caduceus(&args);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("epsilon = 7.329111"), "{text}");
}

#[test]
fn noise_round_trips_through_epsilon() {
    let mut args = vec!["privacy", "noise", "--target-epsilon", "8"];
    args.extend(SCHEDULE);
    args.extend(["--accountant", "rdp", "--json"]);
    let v = json(&caduceus(&args));
    let sigma = v["noise_multiplier"].as_f64().unwrap();
    // Opacus' get_noise_multiplier gives 1.416 for this schedule (to its 0.01 ε tolerance).
    assert!(sigma > 1.40 && sigma <= 1.41605, "{v}");
    let sigma_s = sigma.to_string();
    let mut args = vec!["privacy", "epsilon", "--noise-multiplier", &sigma_s];
    args.extend(SCHEDULE);
    args.extend(["--accountant", "rdp", "--json"]);
    let e = json(&caduceus(&args));
    assert!(e["epsilon"].as_f64().unwrap() <= 8.0, "{e}");
}

#[test]
fn bad_arguments_name_the_flag() {
    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "0",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "-1",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "1.5",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--sample-rate",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--sample-rate",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "0",
                "--delta",
                "1e-5",
            ],
            "--steps",
        ),
        (
            &[
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1",
            ],
            "--delta",
        ),
        (
            &[
                "noise",
                "--target-epsilon",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "0",
            ],
            "--delta",
        ),
    ];
    for (args, flag) in cases {
        let mut full = vec!["privacy"];
        full.extend(args);
        let out = caduceus(&full);
        assert!(!out.status.success(), "{full:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{full:?}: {err}");
    }
}
