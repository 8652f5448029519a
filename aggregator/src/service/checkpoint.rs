//! Checkpoints of a study: their metadata, resuming from (or initialising) the model store, round
//! records and the encrypted aggregate files of secure aggregation.
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use caduceus_aggregation::{Checkpoint, CheckpointMeta, ModelStore, TensorMeta, checkpoint::now_unix_ms};
use caduceus_fairness::RoundResult;
use sha2::Digest;

use super::aggregate::{EncryptedAggregates, RoundAggregator};
use crate::config::StudyConfig;

/// File (in the model store) of the encrypted aggregate of closed round `round`.
#[must_use]
pub fn aggregate_file_name(round: u32) -> String {
    format!("secagg-aggregate-{round:06}.bin")
}

/// File (in the model store) of the record of round `round`.
pub(super) fn record_name(round: u32) -> String {
    format!("round-{round:06}.json")
}

/// The metadata of a checkpoint of this study holding the model of `round`.
pub(super) fn meta(
    cfg: &StudyConfig,
    specs: &[TensorMeta],
    round: u32,
    extra: serde_json::Value,
) -> CheckpointMeta {
    CheckpointMeta {
        format_version: caduceus_aggregation::checkpoint::FORMAT_VERSION,
        study_id: cfg.study_id.clone(),
        round,
        total_rounds: cfg.rounds,
        arch: cfg.arch.name().to_string(),
        strategy: cfg.strategy,
        tensors: specs.to_vec(),
        params_sha256: String::new(),
        control_sha256: None,
        created_unix_ms: now_unix_ms(),
        extra,
    }
}

/// The newest valid checkpoint of the store, checked against the study's settings, or (for a new
/// study) the initial model, saved as checkpoint 0. Also returns the round resumed from.
pub(super) fn resume_or_init(
    cfg: &StudyConfig,
    store: &ModelStore,
    specs: &[TensorMeta],
    template: &caduceus_models::Model,
    aggregator: &dyn RoundAggregator,
) -> anyhow::Result<(Checkpoint, Option<u32>)> {
    if let Some(r) = store.load_latest().context("reading the model store")? {
        for s in &r.skipped {
            tracing::warn!("skipping a checkpoint that does not verify: {s}");
        }
        let c = r.checkpoint;
        if c.meta.study_id != cfg.study_id {
            anyhow::bail!(
                "the model store {} belongs to study {:?}, not {:?}",
                cfg.model_store.display(),
                c.meta.study_id,
                cfg.study_id
            );
        }
        if c.meta.tensors != specs {
            anyhow::bail!(
                "checkpoint {} does not match --arch {} with {} classes",
                r.path.display(),
                cfg.arch,
                cfg.num_classes
            );
        }
        if c.meta.round > cfg.rounds {
            anyhow::bail!(
                "checkpoint {} is for round {}, beyond --rounds {}",
                r.path.display(),
                c.meta.round,
                cfg.rounds
            );
        }
        aggregator.check_store(&cfg.model_store, &c.meta.extra)?;
        tracing::info!(round = c.meta.round, path = %r.path.display(), "resuming from checkpoint");
        let round = c.meta.round;
        return Ok((c, Some(round)));
    }
    let params = match &cfg.initial_model {
        Some(p) => {
            let m = caduceus_models::Model::load(p)
                .with_context(|| format!("--initial-model {}", p.display()))?;
            if m.arch() != cfg.arch || m.num_classes() != cfg.num_classes {
                anyhow::bail!(
                    "--initial-model {} is a {} model with {} classes, not {} with {}",
                    p.display(),
                    m.arch(),
                    m.num_classes(),
                    cfg.arch,
                    cfg.num_classes
                );
            }
            m.flatten()?
        }
        None => template.flatten()?,
    };
    let control = cfg.strategy.uses_control().then(|| vec![0.0; params.len()]);
    let c = Checkpoint {
        meta: meta(cfg, specs, 0, aggregator.initial_extra()),
        params,
        control,
    };
    store.save(&c).context("writing the initial checkpoint")?;
    Ok((c, None))
}

/// The round records of the rounds up to the checkpoint's (`round`); records of rounds ≥ the
/// checkpoint's are from a round that is being redone and are left out.
pub(super) fn load_history(store: &ModelStore, cfg: &StudyConfig, round: u32) -> Vec<RoundResult> {
    let mut history = Vec::new();
    for r in 0..=round.min(cfg.rounds) {
        let path = store.dir().join(record_name(r));
        if let Ok(bytes) = std::fs::read(&path) {
            match serde_json::from_slice::<RoundResult>(&bytes) {
                Ok(rec) => history.push(rec),
                Err(e) => tracing::warn!("ignoring unreadable round record {}: {e}", path.display()),
            }
        }
    }
    history.retain(|r| r.round < round || (round == cfg.rounds && r.round == cfg.rounds));
    history
}

/// The `FairFed` weights a checkpoint carries (none for other strategies).
pub(super) fn fairfed_weights(extra: &serde_json::Value) -> BTreeMap<String, f64> {
    extra
        .get("fairfed_weights")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default()
}

/// Loads the encrypted aggregates of rounds `0..upto` recorded in a checkpoint's metadata.
pub(super) fn load_aggregates(
    store: &ModelStore,
    extra: &serde_json::Value,
    upto: u32,
) -> anyhow::Result<EncryptedAggregates> {
    let list = extra["secure_aggregation"]["aggregates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for r in 0..upto {
        let entry = list
            .iter()
            .find(|e| e["round"].as_u64() == Some(u64::from(r)))
            .ok_or_else(|| {
                anyhow::anyhow!("the checkpoint does not list the encrypted aggregate of round {r}")
            })?;
        let path = store.dir().join(aggregate_file_name(r));
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let digest = hex::encode(sha2::Sha256::digest(&bytes));
        if Some(digest.as_str()) != entry["sha256"].as_str() {
            anyhow::bail!("{} does not match the checkpoint's digest", path.display());
        }
        let chunks =
            caduceus_secagg::decode_bundle(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        out.push(Arc::new(chunks));
    }
    Ok(out)
}

/// Writes the encrypted aggregate of closed round `round` (atomically) and lists the aggregate files
/// of rounds `0..=round` with their digests, for the next checkpoint's metadata.
pub(super) fn write_aggregate(
    store: &ModelStore,
    round: u32,
    chunks: &[Vec<u8>],
) -> Result<Vec<serde_json::Value>, String> {
    let bundle = caduceus_secagg::encode_bundle(chunks);
    let digest = hex::encode(sha2::Sha256::digest(&bundle));
    caduceus_aggregation::checkpoint::write_atomic(&store.dir().join(aggregate_file_name(round)), &bundle)
        .map_err(|e| e.to_string())?;
    let listed: Vec<serde_json::Value> = (0..=round)
        .map(|r| {
            let bytes = if r == round {
                Ok(bundle.clone())
            } else {
                std::fs::read(store.dir().join(aggregate_file_name(r)))
            };
            bytes.map(|b| {
                serde_json::json!({
                    "round": r,
                    "file": aggregate_file_name(r),
                    "sha256": hex::encode(sha2::Sha256::digest(&b)),
                })
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("re-reading an aggregate file: {e}"))?;
    debug_assert_eq!(
        listed.last().and_then(|v| v["sha256"].as_str()),
        Some(digest.as_str())
    );
    Ok(listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_files_round_trip_and_a_changed_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let rounds = [vec![vec![1u8, 2, 3], vec![4]], vec![vec![5u8; 10]]];
        let mut listed = Vec::new();
        for (r, chunks) in (0u32..).zip(&rounds) {
            listed = write_aggregate(&store, r, chunks).unwrap();
        }
        assert_eq!(listed.len(), 2, "{listed:?}");
        let extra = serde_json::json!({"secure_aggregation": {"aggregates": listed}});
        let loaded = load_aggregates(&store, &extra, 2).unwrap();
        let loaded: Vec<Vec<Vec<u8>>> = loaded.iter().map(|a| a.as_ref().clone()).collect();
        assert_eq!(loaded, rounds);
        assert_eq!(load_aggregates(&store, &extra, 1).unwrap().len(), 1);

        let e = load_aggregates(&store, &extra, 3).unwrap_err();
        assert!(e.to_string().contains("round 2"), "{e}");
        std::fs::write(dir.path().join(aggregate_file_name(0)), b"changed").unwrap();
        let e = load_aggregates(&store, &extra, 2).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn history_leaves_out_records_of_a_round_being_redone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = super::super::test_config(dir.path(), &[]);
        let store = ModelStore::open(dir.path().join("records")).unwrap();
        for round in 0..=2 {
            let rec = RoundResult {
                round,
                ..Default::default()
            };
            store.write_json(&record_name(round), &rec).unwrap();
        }
        let rounds = |h: Vec<RoundResult>| h.iter().map(|r| r.round).collect::<Vec<_>>();
        assert_eq!(rounds(load_history(&store, &cfg, 0)), Vec::<u32>::new());
        assert_eq!(rounds(load_history(&store, &cfg, 1)), vec![0]);
        // At the last checkpoint the final evaluation's record (round R) is kept.
        assert_eq!(rounds(load_history(&store, &cfg, 2)), vec![0, 1, 2]);
        std::fs::write(store.dir().join(record_name(1)), "not json").unwrap();
        assert_eq!(rounds(load_history(&store, &cfg, 2)), vec![0, 2]);
    }
}
