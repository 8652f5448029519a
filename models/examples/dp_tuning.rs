//! DP-SGD on one hospital-sized shard of UTKFace, with the per-example gradient norms that
//! clipping sees: a harness for choosing C, the learning rate and the batch under DP.
//!
//! ```text
//! cargo run -p caduceus-models --example dp_tuning -- [--arch small-cnn] [--train 7000] \
//!     [--val 1500] [--batch 64] [--sigma 0.45] [--clip 1] [--optimizer sgd|adamw] [--lr 0.1] \
//!     [--momentum 0.9] [--wd 0] [--rounds 5] [--steps 20] [--seed 0]
//! ```
//! Trains `--rounds` × `--steps` DP-SGD steps with `train_local_dp` (the optimiser state restarts
//! every round, as in a federated round), and after each round prints validation accuracy and
//! loss and the quantiles of the unclipped per-example gradient norms on a fixed probe batch.
//! `--sigma 0` trains without DP (`train_local`) for the same steps.
use std::path::PathBuf;

use anyhow::{Context, bail};
use caduceus_dataset::{Attribute, ImageSet, LoaderConfig, Manifest};
use caduceus_models::dpsgd::{DpConfig, clipped_gradient_sum, train_local_dp};
use caduceus_models::{
    Arch, ClientStrategy, ClipStats, Model, Optimizer, TrainConfig, evaluate, train_local,
};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

fn main() -> anyhow::Result<()> {
    let mut data_dir = caduceus_dataset::data_dir()
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
        .join("utkface-64");
    let mut arch = Arch::SmallCnn;
    let (mut n_train, mut n_val, mut batch) = (7000usize, 1500usize, 64usize);
    let (mut sigma, mut clip, mut lr, mut momentum) = (0.45f64, 1.0f64, 0.1f32, 0.9f32);
    let (mut rounds, mut steps, mut seed) = (5usize, 20usize, 0u64);
    let mut adamw = false;
    let mut wd = 0f32;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data-dir" => data_dir = value.into(),
            "--arch" => arch = value.parse().map_err(anyhow::Error::msg)?,
            "--train" => n_train = value.parse()?,
            "--val" => n_val = value.parse()?,
            "--batch" => batch = value.parse()?,
            "--sigma" => sigma = value.parse()?,
            "--clip" => clip = value.parse()?,
            "--lr" => lr = value.parse()?,
            "--momentum" => momentum = value.parse()?,
            "--rounds" => rounds = value.parse()?,
            "--steps" => steps = value.parse()?,
            "--seed" => seed = value.parse()?,
            "--wd" => wd = value.parse()?,
            "--optimizer" => adamw = value == "adamw",
            _ => bail!("unknown flag {flag}"),
        }
    }
    let report = caduceus_dataset::import(&data_dir)?;
    let mut records = report.records;
    records.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    records.truncate(n_train + n_val);
    let all = ImageSet::load(
        &Manifest::new(&data_dir, records),
        Attribute::Gender,
        &LoaderConfig::default(),
    )?;
    let train = all.subset(&(0..n_train).collect::<Vec<_>>());
    let val = all.subset(&(n_train..all.len()).collect::<Vec<_>>());
    let probe: Vec<usize> = (0..256.min(n_train)).collect();
    let (mut imgs, mut labels) = (Vec::new(), Vec::new());
    train.fill_batch(&probe, None, &mut imgs, &mut labels);
    let px = Tensor::from_slice(&imgs, (probe.len(), 3, train.height, train.width), &Device::Cpu)?;
    let py = Tensor::from_slice(&labels, probe.len(), &Device::Cpu)?;

    let mut model = Model::build(arch, 2, seed)?;
    println!(
        "{arch}: {} params, train {n_train}, val {}, batch {batch}, σ {sigma}, C {clip}, {} lr {lr} momentum {momentum}, {rounds}×{steps} steps",
        model.param_count(),
        val.len(),
        if adamw { "adamw" } else { "sgd" }
    );
    let optimizer = if adamw {
        Optimizer::adamw(lr)
    } else {
        Optimizer::Sgd {
            lr,
            momentum,
            weight_decay: wd,
        }
    };
    for round in 0..=rounds {
        let mut probe = clipped_gradient_sum(&model, &px, &py, clip)?;
        let clipped = probe.factors.iter().filter(|&&f| f < 1.0).count();
        let norms = ClipStats::from_norms(&mut probe.norms, clipped);
        let e = evaluate(&model, &val, 256)?;
        let w: f64 = model
            .flatten()?
            .iter()
            .map(|v| f64::from(*v).powi(2))
            .sum::<f64>()
            .sqrt();
        println!(
            "round {round}: val acc {:.4} loss {:.4} | ‖w‖ {w:.2} | per-example ‖g‖ p10 {:.3} p50 {:.3} p90 {:.3}, {:.0}% above C",
            e.accuracy,
            e.loss,
            norms.norm_p10,
            norms.norm_median,
            norms.norm_p90,
            100.0 * norms.clipped_fraction
        );
        if round == rounds {
            break;
        }
        let cfg = TrainConfig {
            epochs: 0,
            max_steps: Some(steps),
            batch_size: batch,
            optimizer,
            seed: seed + round as u64,
            augment: true,
        };
        if sigma > 0.0 {
            let dp = DpConfig {
                noise_multiplier: sigma,
                clip_norm: clip,
                sample_rate: batch as f64 / n_train as f64,
            };
            train_local_dp(&mut model, &train, &cfg, ClientStrategy::FedAvg, &dp)?;
        } else {
            train_local(&mut model, &train, &cfg, ClientStrategy::FedAvg)?;
        }
    }
    Ok(())
}
