//! A closed round's record: the hospitals' pooled evaluation, what each of them reported, and
//! `FairFed`'s weights.
use std::collections::BTreeMap;

use caduceus_aggregation::Strategy;
use caduceus_fairness::RoundResult;
use caduceus_proto::Evaluation;

use super::study::Received;
use crate::config::StudyConfig;

/// The record of round `round`: the participants' evaluation of the model the round started from,
/// summed, and each hospital's own figures.
pub(super) fn round_record(
    cfg: &StudyConfig,
    round: u32,
    received: &BTreeMap<String, Received>,
) -> RoundResult {
    let mut eval = Evaluation::default();
    for r in received.values() {
        eval.merge(&r.evaluation);
    }
    let mut record = RoundResult {
        round,
        strategy: cfg.strategy.name().to_string(),
        participants: received.keys().cloned().collect(),
        accuracy: eval.accuracy(),
        loss: eval.mean_loss(),
        counts: eval.counts.clone(),
        ..Default::default()
    };
    record
        .extra
        .insert("examples".into(), serde_json::json!(eval.examples));
    let local: BTreeMap<&String, serde_json::Value> = received
        .iter()
        .map(|(h, r)| {
            (
                h,
                serde_json::json!({
                    "num_examples": r.num_examples,
                    "local_steps": r.local_steps,
                    "train_loss": r.train_loss,
                    "val_examples": r.evaluation.examples,
                    "val_accuracy": r.evaluation.accuracy(),
                    "privacy": r.privacy.as_ref().map(|p| serde_json::json!({
                        "noise_multiplier": p.noise_multiplier,
                        "sample_rate": p.sample_rate,
                        "steps": p.steps,
                        "clip_norm": p.clip_norm,
                    })),
                    // The evaluation counts' own Gaussian mechanism (one release), under DP.
                    "evaluation_privacy": r.evaluation.privacy.as_ref().map(|p| serde_json::json!({
                        "noise_multiplier": p.noise_multiplier,
                        "noise_std": p.noise_std,
                        "sensitivity": p.sensitivity,
                    })),
                }),
            )
        })
        .collect();
    record.extra.insert("hospitals".into(), serde_json::json!(local));
    // Under DP every summed count carries the noise of each noised hospital's count: report its
    // standard deviation, so that readers of the counts can judge small groups.
    let noise_var: f64 = received
        .values()
        .filter_map(|r| r.evaluation.privacy.as_ref())
        .map(|p| p.noise_std * p.noise_std)
        .sum();
    if noise_var > 0.0 {
        record
            .extra
            .insert("evaluation_noise_std".into(), serde_json::json!(noise_var.sqrt()));
    }
    record
}

/// `FairFed`'s aggregation weights for a training round (in `received`'s order), from the fairness
/// engine; updates `fairfed` (the weights by hospital) and records the local fairness gaps. `None` for
/// other strategies, which weight by their own rule.
pub(super) fn fairfed_weights(
    cfg: &StudyConfig,
    received: &BTreeMap<String, Received>,
    fairfed: &mut BTreeMap<String, f64>,
    record: &mut RoundResult,
) -> Result<Option<Vec<f64>>, String> {
    let Strategy::FairFed { beta } = cfg.strategy else {
        return Ok(None);
    };
    let participants: Vec<&String> = received.keys().collect();
    let counts: Vec<u64> = received.values().map(|r| r.num_examples).collect();
    let init = caduceus_fairness::fairfed::initial_weights(&counts).map_err(|e| format!("FairFed: {e}"))?;
    let prev: Vec<f64> = participants
        .iter()
        .zip(&init)
        .map(|(h, w0)| fairfed.get(*h).copied().unwrap_or(*w0))
        .collect();
    let locals: Vec<caduceus_fairness::GroupCounts> =
        received.values().map(|r| r.evaluation.counts.clone()).collect();
    let (w, gaps) = caduceus_fairness::fairfed::round(
        &prev,
        &locals,
        &cfg.fairfed_attribute,
        cfg.fairfed_metric,
        f64::from(beta),
        cfg.min_group_size,
    )
    .map_err(|e| format!("FairFed: {e}"))?;
    for (h, wk) in participants.iter().zip(&w) {
        fairfed.insert((*h).clone(), *wk);
    }
    record.extra.insert(
        "fairfed_gaps".into(),
        serde_json::json!(participants.iter().zip(&gaps).collect::<BTreeMap<_, _>>()),
    );
    Ok(Some(w))
}
