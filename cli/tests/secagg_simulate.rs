//! `caduceus simulate --secure-aggregation tfhe` on a few hundred real images (2 hospitals, 2 rounds)
//! against the plaintext study with the same seed:
//! - the model after round 1 (initial model + the decrypted round-0 aggregate, rebuilt here as a
//!   hospital would) matches the plaintext study's checkpoint 1 within the stated quantisation error;
//! - the final model (decrypted on the hospital side by the runner) has a held-out test accuracy
//!   within 0.5 points of the plaintext one (after round 1 the runs train from models that differ by
//!   the quantisation error, and local training amplifies that, so later rounds are compared by
//!   accuracy, not per parameter);
//! - config.json records the mode, and the study key exists only in the hospitals' work directories.
//!
//! Data: `$CADUCEUS_DATA_DIR/utkface-64`, else `../shared/data/utkface-64` next to the repository.
use std::path::{Path, PathBuf};
use std::process::Command;

use caduceus_fairness::StudyResults;

fn data_dir() -> PathBuf {
    caduceus_dataset::data_dir()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

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
        assert!(cmd.status().unwrap().success(), "building the binaries failed");
    }
}

fn run(results: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_caduceus"))
        .arg("simulate")
        .arg("--data-dir")
        .arg(data_dir())
        .args([
            "--limit",
            "300",
            "--hospitals",
            "2",
            "--rounds",
            "2",
            "--seed",
            "5",
        ])
        .args(["--split", "iid", "--batch-size", "32", "--local-steps", "3"])
        .args(["--trainer-threads", "1"])
        .args(extra)
        .arg("--results")
        .arg(results)
        .output()
        .unwrap();
    let text = format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
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

#[test]
fn encrypted_study_matches_the_plaintext_study() {
    ensure_bins();
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let enc = dir.path().join("enc");
    run(&plain, &[]);
    let out = run(&enc, &["--secure-aggregation", "tfhe"]);
    assert!(out.contains("rebuilt on the hospital side"), "{out}");

    let rp = StudyResults::load(&plain).unwrap();
    let re = StudyResults::load(&enc).unwrap();
    assert_eq!(rp.config["secure_aggregation"], "none");
    assert_eq!(re.config["secure_aggregation"], "tfhe");

    // Same split, same seeds, example counts summing to under 1024 (exact integer weights): the
    // round-1 models agree within the quantisation error of one round (B/(2M) = 2^-24 · B with B = 1,
    // the default clip and bounds) plus f32 rounding.
    let store_p = caduceus_aggregation::ModelStore::open(plain.join("work/model-store")).unwrap();
    let store_e = caduceus_aggregation::ModelStore::open(enc.join("work/model-store")).unwrap();
    let xp = store_p.load_round(1).unwrap().params;
    let mut xe = store_e.load_round(0).unwrap().params;
    assert_eq!(
        xe,
        store_p.load_round(0).unwrap().params,
        "same public initial model"
    );
    let key = caduceus_secagg::StudyKey::load(&enc.join("work/state/hospital-0/study.key")).unwrap();
    let params = caduceus_trainer::secure::params(1.0).unwrap();
    let dec = caduceus_secagg::Decryptor::new(&key, &params).unwrap();
    let bundle = std::fs::read(store_e.dir().join("secagg-aggregate-000000.bin")).unwrap();
    let chunks = caduceus_secagg::decode_bundle(&bundle).unwrap();
    caduceus_trainer::secure::apply_aggregate(
        &dec,
        &params,
        &caduceus_secagg::AcceptPolicy::new(2),
        0,
        &chunks,
        &mut xe,
    )
    .unwrap();
    assert_eq!(xp.len(), xe.len());
    let q = 0.5 / f64::from((1u32 << 24) - 1);
    let mut worst = 0.0f64;
    for (i, (a, b)) in xp.iter().zip(&xe).enumerate() {
        let tol = q + 4.0 * f64::from(f32::EPSILON) * f64::from(a.abs().max(1.0));
        let d = f64::from((a - b).abs());
        assert!(
            d <= tol,
            "parameter {i}: plaintext {a}, encrypted {b} (|diff| {d} > {tol})"
        );
        worst = worst.max(d);
    }
    eprintln!(
        "round 1: max |plaintext - encrypted| = {worst:e} over {} parameters",
        xp.len()
    );
    let load = |d: &Path| {
        caduceus_models::Model::load(d.join("final-model.safetensors"))
            .unwrap()
            .flatten()
            .unwrap()
    };
    let final_diff = load(&plain)
        .iter()
        .zip(&load(&enc))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!("final (round 2): max |plaintext - encrypted| = {final_diff:e}");
    let acc = |r: &StudyResults| r.rounds.last().unwrap().test_accuracy.unwrap();
    assert!(
        (acc(&rp) - acc(&re)).abs() <= 0.005,
        "test accuracy {} (plaintext) vs {} (encrypted)",
        acc(&rp),
        acc(&re)
    );

    // The key file exists only in the hospitals' work directories; the aggregator's store, logs and
    // summaries do not contain its secret bytes.
    let mut files = Vec::new();
    files_under(&enc, &mut files);
    let keys: Vec<&PathBuf> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "study.key"))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for k in &keys {
        assert!(k.starts_with(enc.join("work/state")), "{}", k.display());
    }
    let key_bytes = std::fs::read(keys[0]).unwrap();
    let secret = &key_bytes[11 + key_bytes[10] as usize..key_bytes.len() - 16];
    for f in files.iter().filter(|f| !keys.contains(f)) {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "{} contains the key's secret bytes",
            f.display()
        );
    }
    let store = enc.join("work/model-store");
    assert!(store.join("secagg-aggregate-000001.bin").is_file());
    let rec = &re.rounds[0];
    assert_eq!(rec.extra["secure_aggregation"]["scheme"], "tfhe");
}
