//! `caduceus simulate` end to end on a few hundred real images: the federated mode through the real
//! aggregator and trainer binaries, the centralised mode, and the results directory that
//! `caduceus report` reads. Also its refusals (missing binaries, a results directory in use).
//!
//! Data: `$CADUCEUS_DATA_DIR/utkface-64`, else `../shared/data/utkface-64` next to the repository.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use caduceus_fairness::StudyResults;

fn data_dir() -> PathBuf {
    caduceus_dataset::data_dir()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

fn caduceus() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_caduceus"));
    c.arg("simulate").arg("--data-dir").arg(data_dir());
    c
}

/// The aggregator and trainer binaries next to `caduceus`, built there if missing (`cargo test -p
/// caduceus` does not build other packages' binaries).
fn ensure_bins() {
    let dir = Path::new(env!("CARGO_BIN_EXE_caduceus"))
        .parent()
        .unwrap()
        .to_path_buf();
    let missing = ["caduceus-aggregator", "caduceus-trainer"]
        .iter()
        .any(|b| !dir.join(format!("{b}{}", std::env::consts::EXE_SUFFIX)).is_file());
    if missing {
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.args(["build", "-p", "caduceus-aggregator", "-p", "caduceus-trainer"])
            .env("CARGO_TARGET_DIR", dir.parent().unwrap())
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building the binaries failed");
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn missing_binaries_are_named() {
    let empty = tempfile::tempdir().unwrap();
    let out = caduceus()
        .arg("--results")
        .arg(empty.path().join("r"))
        .env("CADUCEUS_BIN_DIR", empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("caduceus-aggregator") && err.contains("CADUCEUS_BIN_DIR"),
        "{err}"
    );
    assert!(
        !empty.path().join("r").exists(),
        "nothing is written before the check"
    );
}

#[test]
fn results_directory_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "x").unwrap();
    let out = caduceus()
        .arg("--centralised")
        .arg("--results")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--overwrite"),
        "{}",
        text(&out)
    );
    assert!(dir.path().join("keep.txt").exists());
}

fn check_results(dir: &Path, rounds: u32, participants: usize) -> StudyResults {
    let r = StudyResults::load(dir).expect("results directory readable by caduceus report");
    assert_eq!(r.rounds.len() as u32, rounds + 1, "records 0..=R");
    for (i, rec) in r.rounds.iter().enumerate() {
        assert_eq!(rec.round, i as u32);
        assert_eq!(rec.participants.len(), participants);
        assert!(rec.accuracy.is_some_and(|a| (0.0..=1.0).contains(&a)));
        assert!(
            rec.counts.attribute("race").is_some(),
            "per-race counts in round {i}"
        );
    }
    let last = r.rounds.last().unwrap();
    assert!(last.test_accuracy.is_some_and(|a| a > 0.0), "final test accuracy");
    assert_eq!(r.group_labels().unwrap()["race"]["0"], "White");
    assert!(dir.join("final-model.safetensors").is_file());
    let model = caduceus_models::Model::load(dir.join("final-model.safetensors")).unwrap();
    assert_eq!(model.arch().name(), "small-cnn");
    r
}

#[test]
fn federated_and_centralised_runs_write_results() {
    ensure_bins();
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("fed");
    let common = |c: &mut Command| {
        c.args([
            "--limit",
            "300",
            "--hospitals",
            "2",
            "--rounds",
            "1",
            "--seed",
            "3",
        ])
        .args(["--split", "dirichlet", "--alpha", "1.0", "--batch-size", "32"])
        .args(["--local-steps", "3"]);
    };
    let mut c = caduceus();
    common(&mut c);
    let out = c.arg("--results").arg(&fed).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("initial model") && stdout.contains("per race"),
        "{stdout}"
    );
    assert!(stdout.contains("held-out test set"), "{stdout}");
    let r = check_results(&fed, 1, 2);
    assert_eq!(r.config["mode"], "federated");
    assert_eq!(r.config["strategy"], "fedavg");
    let agg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fed.join("work/aggregator-summary.json")).unwrap())
            .unwrap();
    assert_eq!(agg["status"], "succeeded");
    // The step cap reaches the trainers.
    for h in ["hospital-0", "hospital-1"] {
        let s: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fed.join(format!("work/{h}-summary.json"))).unwrap(),
        )
        .unwrap();
        let trained: Vec<u64> = s["rounds"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["evaluation_only"] == false)
            .map(|r| r["local_steps"].as_u64().unwrap())
            .collect();
        assert!(
            !trained.is_empty() && trained.iter().all(|&n| (1..=3).contains(&n)),
            "{h}: {s}"
        );
    }

    let cen = dir.path().join("cen");
    let mut c = caduceus();
    common(&mut c);
    let out = c
        .arg("--centralised")
        .arg("--results")
        .arg(&cen)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let r = check_results(&cen, 1, 1);
    assert_eq!(r.config["mode"], "centralised");
    // Same split: both runs evaluate on the same held-out test set.
    assert_eq!(
        r.config["split"]["test"],
        check_results(&fed, 1, 2).config["split"]["test"]
    );
}

/// DP-SGD through the real binaries: the trainers report their spending, the runner prints and
/// records ε per hospital per round, and a hospital whose next round would exceed its budget stops
/// taking part (the others go on, and rounds do not wait for it). The evaluation counts are
/// released under DP: noised, every group of the fixed domains reported, no loss, one release per
/// round a hospital takes part in (`evaluation_releases`), all of it in ε.
#[test]
fn dp_run_records_epsilon_per_hospital_and_stops_a_hospital_at_its_budget() {
    ensure_bins();
    let dir = tempfile::tempdir().unwrap();
    let res = dir.path().join("dp");
    // iid split of 300 images: ~108 training images per hospital, q = 32/108 ≈ 0.3, 2 steps per
    // round. At σ = 1.5 one round costs ε ≈ 1.9 and two ≈ 2.5 (δ = 1e-5), so a budget of 2.2 lets
    // hospital-1 train one or two of the three rounds (q between 0.25 and 0.35).
    let out = caduceus()
        .args([
            "--limit",
            "300",
            "--hospitals",
            "2",
            "--rounds",
            "3",
            "--seed",
            "3",
        ])
        .args(["--split", "iid", "--batch-size", "32", "--local-steps", "2"])
        .args(["--dp-noise-multiplier", "1.5", "--dp-clip-norm", "1.0"])
        .args(["--hospital-budget", "hospital-1=2.2"])
        .arg("--results")
        .arg(&res)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hospital-0: σ=1.5000")
            && stdout.contains("hospital-1: σ=1.5000")
            && stdout.contains("ε spent"),
        "{stdout}"
    );
    let r = StudyResults::load(&res).unwrap();
    let plan = &r.config["dp"]["hospitals"];
    assert!(plan[0]["last_round"].is_null());
    let last = plan[1]["last_round"].as_u64().expect("hospital-1 leaves early") as u32;
    assert!(last < 2, "{plan}");
    assert_eq!(r.rounds.len(), 4, "records 0..=3");
    for rec in &r.rounds {
        assert_eq!(rec.delta, Some(1e-5));
        let e1 = rec.epsilon["hospital-1"];
        assert!(e1 <= 2.2, "round {}: hospital-1 spent {e1}", rec.round);
        let has1 = rec.participants.iter().any(|p| p == "hospital-1");
        assert_eq!(
            has1,
            rec.round <= last,
            "round {}: {:?}",
            rec.round,
            rec.participants
        );
        if rec.round < 3 {
            // What the trainers reported for this training round.
            let p = &rec.extra["hospitals"]["hospital-0"]["privacy"];
            assert_eq!(p["steps"], 2);
            assert_eq!(p["noise_multiplier"], 1.5);
            assert_eq!(
                p["sample_rate"].as_f64(),
                plan[0]["sample_rate"].as_f64(),
                "the sample rate used is the planned one"
            );
        }
    }
    let fin = r.rounds.last().unwrap();
    assert!(fin.epsilon["hospital-0"] > fin.epsilon["hospital-1"]);
    assert!(r.rounds[1].epsilon["hospital-0"] > 0.0);

    // Evaluation counts under DP. The evaluations the aggregator received from each hospital are
    // what `evaluation_releases` says: hospital-0 follows the 3 rounds and the final evaluation,
    // hospital-1 runs `--rounds 0-last`.
    use caduceus_privacy::evaluation::{evaluation_mechanism, evaluation_releases};
    let z = r.config["dp"]["evaluation_noise_multiplier"].as_f64().unwrap();
    assert_eq!(z, caduceus_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER);
    let received = |h: &str| {
        r.rounds
            .iter()
            .filter(|rec| {
                rec.extra["hospitals"][h]["evaluation_privacy"]["noise_multiplier"].as_f64() == Some(z)
            })
            .count() as u64
    };
    assert_eq!(received("hospital-0"), evaluation_releases(3, true));
    assert_eq!(received("hospital-1"), evaluation_releases(last + 1, false));
    assert_eq!(plan[0]["evaluation_releases"], evaluation_releases(3, true));
    assert_eq!(
        plan[1]["evaluation_releases"],
        evaluation_releases(last + 1, false)
    );
    let accepted = std::fs::read_to_string(res.join("work/logs/aggregator.log"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("update accepted") && l.contains("hospital=hospital-0 "))
        .count() as u64;
    assert_eq!(accepted, evaluation_releases(3, true));
    for rec in &r.rounds {
        // Every group of both attributes' domains and of their intersection, zeros included.
        assert_eq!(
            rec.counts.attribute("race").map(|g| g.len()),
            Some(5),
            "round {}",
            rec.round
        );
        assert_eq!(rec.counts.attribute("age-group").map(|g| g.len()), Some(9));
        assert_eq!(rec.counts.attribute("age-group&race").map(|g| g.len()), Some(45));
        assert_eq!(rec.loss, None, "the loss is not released under DP");
        assert!(rec.extra["evaluation_noise_std"].as_f64().unwrap() >= 2.0 * z);
    }
    // ε per hospital includes the evaluation releases: hospital-0's is that of its 3 rounds of
    // DP-SGD and its 4 evaluations.
    let q0 = plan[0]["sample_rate"].as_f64().unwrap();
    let sgd = caduceus_privacy::SubsampledGaussian::new(1.5, q0, 6).unwrap();
    let pld = |m: &[caduceus_privacy::SubsampledGaussian]| {
        caduceus_privacy::AccountantKind::Pld.epsilon(m, 1e-5).unwrap()
    };
    let expected = pld(&[sgd, evaluation_mechanism(z, 4).unwrap()]);
    assert!(
        (fin.epsilon["hospital-0"] - expected).abs() < 1e-9,
        "{} vs {expected}",
        fin.epsilon["hospital-0"]
    );
    assert!(fin.epsilon["hospital-0"] > pld(&[sgd]));
    // The local summaries say what the evaluations cost, and keep the exact local figures.
    let s0: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("work/hospital-0-summary.json")).unwrap())
            .unwrap();
    let rounds0 = s0["rounds"].as_array().unwrap();
    assert_eq!(rounds0.len(), 4, "{s0}");
    let e = &rounds0[3]["evaluation_privacy"];
    assert_eq!(e["releases"], 4, "{s0}");
    assert_eq!(e["noise_multiplier"], z);
    assert!(
        (e["epsilon_spent"].as_f64().unwrap() - expected).abs() < 1e-9,
        "{s0}"
    );
    assert!(e["epsilon_evaluation"].as_f64().unwrap() < expected);
    assert!(
        rounds0[3]["val_loss"].as_f64().is_some(),
        "the exact loss stays local"
    );
    // The trainer left on its own terms and says so; its ledger is on disk.
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(res.join("work/hospital-1-summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["status"], "succeeded", "{s}");
    let rounds = s["rounds"].as_array().unwrap();
    assert_eq!(rounds.len() as u32, last + 1, "{s}");
    assert!(
        rounds
            .iter()
            .all(|x| x["privacy"]["epsilon_spent"].as_f64().unwrap() <= 2.2)
    );
    assert!(res.join("work/state/hospital-1/privacy-ledger.json").is_file());
}
