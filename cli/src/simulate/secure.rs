//! `--secure-aggregation tfhe`: the file-based key handoff to the hospitals and the hospital-side decryption of the final model.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::args::SimulateArgs;

/// Clip bound of encrypted update values (the trainers' and aggregator's default).
const CLIP: f32 = 1.0;

pub(super) struct Secure {
    keys: Vec<(String, PathBuf)>,
    min_contributors: usize,
}

/// Generates the study key and writes one copy into each hospital's work directory (mode 0600);
/// the aggregator gets only the public fingerprint.
pub(super) fn setup(
    args: &SimulateArgs,
    work: &Path,
    names: &[String],
    agg: &mut Command,
) -> anyhow::Result<Secure> {
    let key = caduceus_secagg::StudyKey::generate(&args.study_id).context("generating the study key")?;
    let mut keys = Vec::new();
    for name in names {
        let dir = work.join("state").join(name);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("study.key");
        key.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        keys.push((name.clone(), path));
    }
    agg.arg("--secure-aggregation")
        .arg("tfhe")
        .arg("--key-fingerprint")
        .arg(key.fingerprint().to_string())
        .arg("--secagg-clip")
        .arg(CLIP.to_string());
    let quorum = args.quorum_min.map_or(names.len(), |q| q as usize);
    println!(
        "secure aggregation (tfhe): study key {} written to the {} hospitals' work directories only",
        key.fingerprint(),
        names.len()
    );
    Ok(Secure {
        keys,
        min_contributors: quorum.clamp(1, 2),
    })
}

impl Secure {
    pub(super) fn trainer_args(&self, t: &mut Command, hospital: &str) {
        if let Some((_, path)) = self.keys.iter().find(|(n, _)| n == hospital) {
            t.arg("--secure-aggregation")
                .arg("tfhe")
                .arg("--study-key")
                .arg(path)
                .arg("--secagg-clip")
                .arg(CLIP.to_string())
                .arg("--secagg-min-contributors")
                .arg(self.min_contributors.to_string());
        }
    }

    /// Acting as the first hospital (its key file): decrypts the final model from the model store.
    pub(super) fn final_model(&self, store: &Path, rounds: u32) -> anyhow::Result<Vec<f32>> {
        let (_, key) = self.keys.first().context("no hospital key")?;
        let t = std::time::Instant::now();
        let (round, params) =
            caduceus_trainer::secure::model_from_store(store, key, CLIP, self.min_contributors)
                .context("decrypting the final model on the hospital side")?;
        if round != rounds {
            bail!("the model store ends at round {round}, not {rounds}");
        }
        println!(
            "final model rebuilt on the hospital side from {rounds} encrypted aggregates in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        Ok(params)
    }
}
