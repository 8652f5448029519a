//! Secure aggregation on the hospital side: encrypt the delta under the study key, and rebuild the
//! global model from the public initial model and the encrypted aggregates the aggregator serves.
//!
//! The aggregator cannot decrypt, so it cannot form `x_{k+1} = x_k + Σ w_i Δ_i / Σ w_i`. It serves the
//! encrypted sum `Σ w_i q_i` (public integer weights `w_i`); every hospital decrypts it exactly and
//! applies `x_{k+1} = x_k + Σ w_i q_i / (S Σ w_i)`. Decryption is exact and the arithmetic
//! deterministic, so all hospitals hold the identical model.
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use caduceus_proto::SecureGlobalModel;
use caduceus_secagg::{AcceptPolicy, Decryptor, Encryptor, SecAggParams, StudyKey, SumBounds};

/// The public parameters of a study with clip bound `clip` (the aggregator derives the same).
pub fn params(clip: f32) -> anyhow::Result<SecAggParams> {
    SecAggParams::new(clip, SumBounds::default()).map_err(|e| anyhow!("secure-aggregation parameters: {e}"))
}

/// Decrypts round `round`'s aggregate and adds the weighted mean delta to `model`.
pub fn apply_aggregate(
    dec: &Decryptor,
    params: &SecAggParams,
    policy: &AcceptPolicy,
    round: u32,
    chunks: &[Vec<u8>],
    model: &mut [f32],
) -> anyhow::Result<()> {
    let sum = dec
        .decrypt_aggregate(u64::from(round), chunks, policy)
        .with_context(|| format!("decrypting the aggregate of round {round}"))?;
    if sum.sums.len() != model.len() {
        bail!(
            "the aggregate of round {round} has {} values, the model {}",
            sum.sums.len(),
            model.len()
        );
    }
    let mean = sum.mean(params);
    for (x, d) in model.iter_mut().zip(&mean) {
        *x += *d;
    }
    Ok(())
}

/// A hospital's secure-aggregation state: its key, and the newest model it has rebuilt.
pub struct SecureSession {
    key: StudyKey,
    params: SecAggParams,
    enc: Encryptor,
    dec: Decryptor,
    policy: AcceptPolicy,
    model: Option<(u32, Vec<f32>)>,
}

impl std::fmt::Debug for SecureSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureSession")
            .field("key", &self.key)
            .field("round", &self.model.as_ref().map(|m| m.0))
            .finish_non_exhaustive()
    }
}

impl SecureSession {
    /// Loads the study key and checks that it belongs to `study_id`.
    pub fn open(
        key_path: &Path,
        study_id: &str,
        hospital: &str,
        clip: f32,
        min_contributors: usize,
    ) -> anyhow::Result<Self> {
        let key = StudyKey::load(key_path).with_context(|| format!("--study-key {}", key_path.display()))?;
        if key.study_id() != study_id {
            bail!(
                "--study-key {} is the key of study {:?}, not {study_id:?}",
                key_path.display(),
                key.study_id()
            );
        }
        let params = params(clip)?;
        Ok(SecureSession {
            enc: Encryptor::new(&key, &params, hospital)?,
            dec: Decryptor::new(&key, &params)?,
            policy: AcceptPolicy::new(min_contributors),
            key,
            params,
            model: None,
        })
    }

    /// Hex fingerprint of the study key (public).
    pub fn fingerprint_hex(&self) -> String {
        self.key.fingerprint().to_string()
    }

    /// The round whose model this hospital holds, if any.
    pub fn have_round(&self) -> Option<u32> {
        self.model.as_ref().map(|m| m.0)
    }

    /// Rebuilds the model of `gm.header.round` from what was served and what this hospital holds.
    pub fn model_for(&mut self, gm: &SecureGlobalModel) -> anyhow::Result<Vec<f32>> {
        if gm.info.key_fingerprint != self.fingerprint_hex() {
            bail!(
                "the aggregator runs the study under key {}, our --study-key is {}",
                gm.info.key_fingerprint,
                self.fingerprint_hex()
            );
        }
        if gm.info.params_fingerprint != self.params.fingerprint().to_string() {
            bail!(
                "the aggregator's secure-aggregation parameters (clip {}) differ from ours (clip {}): \
                 set the same --secagg-clip",
                gm.info.clip,
                self.params.clip()
            );
        }
        let base = gm.info.base_round;
        let mut model = match (&gm.base_params, &self.model) {
            (Some(p), _) if base == 0 => p.clone(),
            (None, Some((r, m))) if *r == base => m.clone(),
            _ => bail!("the aggregator served no model to start from at round {base}"),
        };
        for (round, chunks) in &gm.aggregates {
            apply_aggregate(&self.dec, &self.params, &self.policy, *round, chunks, &mut model)?;
        }
        if let Some(i) = model.iter().position(|v| !v.is_finite()) {
            bail!("the decrypted model has a non-finite value at {i}");
        }
        self.model = Some((gm.header.round, model.clone()));
        Ok(model)
    }

    /// Clips, quantises and encrypts `delta` for `round`.
    pub fn encrypt(&self, round: u32, delta: &[f32]) -> anyhow::Result<Vec<Vec<u8>>> {
        self.enc
            .encrypt_update(u64::from(round), delta)
            .with_context(|| format!("encrypting the update of round {round}"))
    }
}

/// Acting as a hospital (holding the key): rebuilds the newest model of a secure-aggregation study
/// from the aggregator's model store — the public initial model plus the decrypted aggregates the
/// newest checkpoint lists. Returns `(round, parameters)`.
pub fn model_from_store(
    store_dir: &Path,
    key_path: &Path,
    clip: f32,
    min_contributors: usize,
) -> anyhow::Result<(u32, Vec<f32>)> {
    let key = StudyKey::load(key_path).with_context(|| format!("study key {}", key_path.display()))?;
    let params = params(clip)?;
    let dec = Decryptor::new(&key, &params)?;
    let policy = AcceptPolicy::new(min_contributors);
    let store = caduceus_aggregation::ModelStore::open(store_dir)?;
    let latest = store
        .load_latest()?
        .ok_or_else(|| anyhow!("{} holds no checkpoint", store_dir.display()))?;
    let ckpt = latest.checkpoint;
    let info = &ckpt.meta.extra["secure_aggregation"];
    if info["key_fingerprint"].as_str() != Some(key.fingerprint().to_string().as_str()) {
        bail!(
            "{} is not a secure-aggregation study under key {}",
            store_dir.display(),
            key.fingerprint()
        );
    }
    let mut model = ckpt.params;
    for r in 0..ckpt.meta.round {
        let path = store_dir.join(format!("secagg-aggregate-{r:06}.bin"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let chunks = caduceus_secagg::decode_bundle(&bytes).with_context(|| path.display().to_string())?;
        apply_aggregate(&dec, &params, &policy, r, &chunks, &mut model)?;
    }
    Ok((ckpt.meta.round, model))
}
