//! Planning a study before it runs: the results directory, the data split into hospitals, `config.json`
//! and the DP plan of each hospital's rounds.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use caduceus_dataset::{Attribute, Manifest, SchemeKind, SplitConfig, SplitScheme, hospital_dir_name};
use caduceus_fairness::results::utkface_group_labels;

use super::args::{SimulateArgs, optimizer};
use super::dp::DpPlan;

fn image_dir(args: &SimulateArgs) -> PathBuf {
    args.data_dir
        .clone()
        .or_else(caduceus_dataset::data_dir)
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
        .join("utkface-64")
}

pub(super) fn prepare_results_dir(args: &SimulateArgs) -> anyhow::Result<()> {
    let dir = &args.results;
    if dir.exists() {
        let non_empty = std::fs::read_dir(dir)
            .with_context(|| format!("--results {}", dir.display()))?
            .next()
            .is_some();
        if non_empty {
            if !args.overwrite {
                bail!(
                    "results directory {} is not empty; choose another --results or pass --overwrite",
                    dir.display()
                );
            }
            for name in ["work", "rounds.json", "config.json", "final-model.safetensors"] {
                let p = dir.join(name);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
                } else if p.exists() {
                    std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
                }
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// The data of a run: the split on disk, the image root and the held-out test set.
pub(super) struct Prepared {
    pub(super) split_dir: PathBuf,
    pub(super) image_root: PathBuf,
    pub(super) test: Manifest,
    split_summary: serde_json::Value,
}

pub(super) fn prepare_data(args: &SimulateArgs, work: &Path) -> anyhow::Result<Prepared> {
    let dir = image_dir(args);
    let root = dir.canonicalize().with_context(|| {
        format!(
            "image directory {} (set --data-dir or CADUCEUS_DATA_DIR)",
            dir.display()
        )
    })?;
    let t = Instant::now();
    let report = caduceus_dataset::import(&root)?;
    if report.records.is_empty() {
        bail!("{}: no UTKFace file names found", root.display());
    }
    let scheme = match args.split {
        SchemeKind::Iid => SplitScheme::Iid,
        SchemeKind::Dirichlet => SplitScheme::Dirichlet {
            alpha: args.alpha,
            attribute: args.split_attribute,
        },
    };
    let cfg = SplitConfig {
        hospitals: args.hospitals,
        test_fraction: args.test_fraction,
        val_fraction: args.val_fraction,
        scheme,
        seed: args.seed,
        limit: args.limit,
        min_per_hospital: 20,
    };
    let split = caduceus_dataset::split(&report.records, &cfg)?;
    let split_dir = work.join("split");
    split.write(&split_dir, &root, &cfg)?;
    let race_counts = |rs: &[caduceus_dataset::Record]| caduceus_dataset::class_counts(rs, Attribute::Race);
    let hospitals: Vec<serde_json::Value> = split
        .hospitals
        .iter()
        .enumerate()
        .map(|(i, h)| {
            serde_json::json!({
                "name": hospital_dir_name(i),
                "train": h.train.len(),
                "val": h.val.len(),
                "race_counts_train": race_counts(&h.train),
            })
        })
        .collect();
    println!(
        "data: {} images imported ({} names skipped, {} duplicate groups) in {:.1} s; split {scheme}: test {}, hospitals {}",
        report.records.len(),
        report.skipped.len(),
        report.duplicates.len(),
        t.elapsed().as_secs_f64(),
        split.test.len(),
        split
            .hospitals
            .iter()
            .map(|h| format!("{}+{}", h.train.len(), h.val.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Prepared {
        split_dir,
        test: Manifest::new(&root, split.test.clone()),
        image_root: root,
        split_summary: serde_json::json!({
            "scheme": scheme.to_string(),
            "config": cfg,
            "imported": report.records.len(),
            "skipped_names": report.skipped.len(),
            "duplicate_groups": report.duplicates.len(),
            "test": split.test.len(),
            "hospitals": hospitals,
        }),
    })
}

/// The sensitive attributes whose group counts the trainers report: the first two of race, age
/// group and gender that are not the task.
pub(super) fn sensitive(task: Attribute) -> Vec<Attribute> {
    [Attribute::Race, Attribute::AgeGroup, Attribute::Gender]
        .into_iter()
        .filter(|a| *a != task)
        .take(2)
        .collect()
}

pub(super) fn config_json(args: &SimulateArgs, prepared: &Prepared, mode: &str) -> serde_json::Value {
    serde_json::json!({
        "mode": mode,
        "study_id": args.study_id,
        "hospitals": args.hospitals,
        "rounds": args.rounds,
        "strategy": if mode == "centralised" { "centralised" } else { args.strategy.name() },
        "fedprox_mu": args.fedprox_mu,
        "scaffold_server_lr": args.scaffold_server_lr,
        "fairfed_beta": args.fairfed_beta,
        "model": args.model,
        "task": args.task.name(),
        "sensitive_attributes": sensitive(args.task).iter().map(|a| a.name()).collect::<Vec<_>>(),
        "positive_class": 1,
        "seed": args.seed,
        "limit": args.limit,
        "local_epochs": args.local_epochs,
        "local_steps": args.steps_cap(),
        "batch_size": args.batch_size,
        "optimizer": optimizer(args),
        "quorum_min": args.quorum_min,
        "secure_aggregation": args.secure_aggregation.name(),
        "round_deadline_secs": args.round_deadline_secs,
        "image_root": prepared.image_root,
        "split": prepared.split_summary,
        "group_labels": utkface_group_labels(),
        "caduceus_version": env!("CARGO_PKG_VERSION"),
        "command_line": std::env::args().collect::<Vec<_>>(),
    })
}

/// The plan of a `caduceus simulate` run with DP (None without): reads the hospitals' training
/// set sizes from the split, prints the plan and adds it to `config.json`.
pub(super) fn dp_plan_for(
    args: &SimulateArgs,
    split_dir: &Path,
    config: &mut serde_json::Value,
) -> anyhow::Result<Option<DpPlan>> {
    if !args.dp.enabled() {
        return Ok(None);
    }
    let mut sizes = Vec::new();
    for i in 0..args.hospitals {
        let dir = split_dir.join(caduceus_dataset::hospital_dir_name(i));
        let shard =
            caduceus_dataset::ShardManifests::read(&dir).with_context(|| format!("{}", dir.display()))?;
        sizes.push(shard.train.records.len());
    }
    let sensitive = sensitive(args.task);
    let plan = DpPlan::new(
        &args.dp,
        &args.study_id,
        args.rounds,
        &sizes,
        args.batch_size,
        args.local_epochs,
        (args.local_steps > 0).then_some(args.local_steps),
        caduceus_trainer::eval::released_tables(&sensitive, args.task),
    )?;
    println!("{}", plan.describe(args.rounds));
    config["dp"] = serde_json::json!({
        "noise_multiplier": args.dp.dp_noise_multiplier,
        "clip_norm": plan.clip_norm,
        "delta": plan.delta,
        "target_epsilon": args.dp.dp_target_epsilon,
        "evaluation_noise_multiplier": plan.eval_noise_multiplier,
        "evaluation_tables": plan.eval_tables,
        "evaluation_noise_std": plan.eval_noise_multiplier * f64::from(plan.eval_tables).sqrt(),
        "accountant": "pld",
        "hospitals": plan.hospitals.iter().map(|h| serde_json::json!({
            "name": h.name,
            "sample_rate": h.sample_rate,
            "steps_per_round": h.steps_per_round,
            "noise_multiplier": h.noise_multiplier,
            "budget": h.budget,
            "last_round": h.last_round,
            "evaluation_releases": h.evaluation_releases,
        })).collect::<Vec<_>>(),
    });
    Ok(Some(plan))
}
