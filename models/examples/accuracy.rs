//! Trains one model centrally on a seeded IID split of UTKFace and reports held-out accuracy:
//! a quick check that a model learns, and a centralised baseline.
//!
//! ```text
//! cargo run --release -p caduceus-models --example accuracy -- \
//!     [--data-dir DIR] [--arch small-cnn] [--task gender] [--train 6000] [--test 1000] [--epochs 3] [--lr 0.001]
//! ```
use std::path::PathBuf;

use anyhow::{Context, bail};
use caduceus_dataset::{Attribute, ImageSet, LoaderConfig, Manifest, SplitConfig};
use caduceus_models::{Arch, ClientStrategy, Model, Optimizer, TrainConfig, evaluate, train_local};

fn main() -> anyhow::Result<()> {
    let mut data_dir = caduceus_dataset::data_dir()
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
        .join("utkface-64");
    let (mut arch, mut task) = (Arch::SmallCnn, Attribute::Gender);
    let (mut train_n, mut test_n, mut epochs, mut lr) = (6000usize, 1000usize, 3usize, 1e-3f32);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data-dir" => data_dir = v.into(),
            "--arch" => arch = v.parse().map_err(anyhow::Error::msg)?,
            "--task" => task = v.parse().map_err(anyhow::Error::msg)?,
            "--train" => train_n = v.parse()?,
            "--test" => test_n = v.parse()?,
            "--epochs" => epochs = v.parse()?,
            "--lr" => lr = v.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    let report = caduceus_dataset::import(&data_dir)?;
    let total = train_n + test_n;
    let cfg = SplitConfig {
        hospitals: 1,
        test_fraction: test_n as f64 / total as f64,
        val_fraction: 0.0,
        limit: Some(total),
        seed: 1,
        ..Default::default()
    };
    let split = caduceus_dataset::split(&report.records, &cfg)?;
    let load =
        |records: Vec<_>| ImageSet::load(&Manifest::new(&data_dir, records), task, &LoaderConfig::default());
    let train = load(split.hospitals[0].train.clone())?;
    let test = load(split.test.clone())?;
    let mut model = Model::build(arch, task.num_classes(), 0)?;
    println!(
        "{arch} on {task}: {} train, {} test images",
        train.len(),
        test.len()
    );
    for epoch in 1..=epochs {
        let tc = TrainConfig {
            epochs: 1,
            batch_size: 64,
            optimizer: Optimizer::adamw(lr),
            seed: epoch as u64,
            ..Default::default()
        };
        let out = train_local(&mut model, &train, &tc, ClientStrategy::FedAvg)?;
        let ev = evaluate(&model, &test, 256)?;
        println!(
            "epoch {epoch}: train loss {:.3}  test loss {:.3}  test accuracy {:.3}  ({:.1} images/s)",
            out.mean_loss,
            ev.loss,
            ev.accuracy,
            out.images_per_second()
        );
    }
    Ok(())
}
