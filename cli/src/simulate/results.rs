//! What a run prints and writes: one line per round, the held-out test evaluation, the final model.
use std::time::Instant;

use anyhow::Context;
use caduceus_dataset::{Attribute, ImageSet, LoaderConfig, Manifest, Race};
use caduceus_fairness::RoundResult;
use caduceus_fairness::results::write_rounds;
use caduceus_models::Model;

use super::args::SimulateArgs;
use super::plan::{Prepared, sensitive};

fn race_name(code: &str) -> String {
    code.parse::<u8>().ok().and_then(Race::from_code).map_or_else(
        || code.to_string(),
        |r| {
            let n = r.name();
            let mut c = n.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        },
    )
}

fn per_race(r: &RoundResult) -> String {
    r.counts
        .attribute("race")
        .map(|groups| {
            groups
                .iter()
                .map(|(g, c)| match c.accuracy() {
                    Some(a) => format!("{} {:.3}", race_name(g), a),
                    None => format!("{} -", race_name(g)),
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .unwrap_or_default()
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// One progress line: the hospitals' evaluation of the model after `r.round` rounds (record 0 is the
/// initial model), and how long the next round took to train and aggregate.
pub(super) fn print_round(r: &RoundResult, total: u32, seconds: Option<f64>) {
    let label = if r.round == 0 {
        "initial model".to_string()
    } else {
        format!("after round {}/{total}", r.round)
    };
    let timing = match seconds {
        Some(s) if r.round < total => format!("  | round {} took {s:.1} s", r.round + 1),
        _ => String::new(),
    };
    println!(
        "{label:<18} val acc {}  loss {}  | per race: {}  | {} hospitals{timing}",
        fmt_opt(r.accuracy),
        fmt_opt(r.loss),
        per_race(r),
        r.participants.len(),
    );
}

/// The final model's accuracy on the held-out test set, overall and per race.
fn test_evaluation(
    model: &Model,
    test: &Manifest,
    task: Attribute,
) -> anyhow::Result<(f64, caduceus_proto::Evaluation)> {
    let set = ImageSet::load(test, task, &LoaderConfig::default()).context("loading test images")?;
    let e = caduceus_trainer::evaluate_counts(model, &set, &sensitive(task), 1, 256)?;
    Ok((e.accuracy().unwrap_or(0.0), e))
}

pub(super) fn finish(
    args: &SimulateArgs,
    prepared: &Prepared,
    model: &Model,
    rounds: &mut [RoundResult],
    started: Instant,
) -> anyhow::Result<()> {
    let (acc, eval) = test_evaluation(model, &prepared.test, args.task)?;
    let per_race_test: Vec<(String, Option<f64>)> = eval
        .counts
        .attribute("race")
        .map(|g| {
            let mut v: Vec<(&String, &caduceus_fairness::ConfusionCounts)> = g.iter().collect();
            v.sort_by_key(|(k, _)| k.parse::<u32>().unwrap_or(u32::MAX));
            v.into_iter().map(|(k, c)| (race_name(k), c.accuracy())).collect()
        })
        .unwrap_or_default();
    if let Some(last) = rounds.last_mut() {
        last.test_accuracy = Some(acc);
        last.extra.insert(
            "test_counts".into(),
            serde_json::to_value(&eval.counts).unwrap_or_default(),
        );
        last.extra
            .insert("test_loss".into(), serde_json::json!(eval.mean_loss()));
    }
    write_rounds(&args.results, rounds)?;
    let path = args.results.join("final-model.safetensors");
    model
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "held-out test set ({} images): accuracy {acc:.4}; per race: {}",
        eval.examples,
        per_race_test
            .iter()
            .map(|(k, v)| format!("{k} {}", v.map_or("-".into(), |a| format!("{a:.3}"))))
            .collect::<Vec<_>>()
            .join("  ")
    );
    println!(
        "done in {:.1} s; results in {} (final model {})",
        started.elapsed().as_secs_f64(),
        args.results.display(),
        path.display()
    );
    Ok(())
}
