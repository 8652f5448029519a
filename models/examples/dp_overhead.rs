//! DP-SGD step time against a non-private step of the same model and the same batch, in the same
//! run, per architecture, on real UTKFace images.
//!
//! ```text
//! cargo run -p caduceus-models --example dp_overhead -- [--batch 64] [--reps 5] \
//!     [--archs small-cnn,resnet8,mobilenet] [--data-dir ../shared/data/utkface-64]
//! ```
//! Non-private step: forward, mean cross-entropy, backward, gradients copied into one flat vector
//! (what `train_local` does before the optimiser). DP step: `dpsgd::private_gradient`: forward
//! recording the layers, one activation-only backward, per-example norms, clipping, the clipped
//! sum in f64, exact discrete-Gaussian noise and division by the expected batch. The optimiser
//! update (identical for both) is left out. The two kinds of step alternate, `--reps` each after
//! one warm-up of each, and the medians are reported. Threads: `RAYON_NUM_THREADS`.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use caduceus_dataset::{Attribute, ImageSet, LoaderConfig, Manifest};
use caduceus_models::dpsgd::private_gradient;
use caduceus_models::{Arch, Mode, Model};
use caduceus_privacy::noise::GaussianNoise;
use candle_core::{Device, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn plain_step(model: &Model, x: &Tensor, y: &Tensor, out: &mut [f32]) -> anyhow::Result<()> {
    let loss = candle_nn::loss::cross_entropy(&model.forward(x, Mode::Train)?, y)?;
    let grads = loss.backward()?;
    let mut off = 0;
    for v in model.vars() {
        let g = grads.get(v.as_tensor()).context("gradient")?;
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        out[off..off + g.len()].copy_from_slice(&g);
        off += g.len();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // As training does (train_local calls it too): the steps below reuse freed buffers.
    caduceus_models::keep_freed_memory();
    let mut data_dir = caduceus_dataset::data_dir()
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
        .join("utkface-64");
    let (mut batch, mut reps) = (64usize, 5usize);
    let mut archs = Arch::ALL.to_vec();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data-dir" => data_dir = value.into(),
            "--batch" => batch = value.parse()?,
            "--reps" => reps = value.parse()?,
            "--archs" => {
                archs = value
                    .split(',')
                    .map(|s| s.parse().map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    let report = caduceus_dataset::import(&data_dir)?;
    let records: Vec<_> = report.records.into_iter().take(batch).collect();
    let data = ImageSet::load(
        &Manifest::new(&data_dir, records),
        Attribute::Gender,
        &LoaderConfig::default(),
    )?;
    let idx: Vec<usize> = (0..data.len()).collect();
    let (mut imgs, mut labels) = (Vec::new(), Vec::new());
    data.fill_batch(&idx, None, &mut imgs, &mut labels);
    let x = Tensor::from_slice(&imgs, (idx.len(), 3, data.height, data.width), &Device::Cpu)?;
    let y = Tensor::from_slice(&labels, idx.len(), &Device::Cpu)?;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!(
        "batch {} real images, {reps} reps after 1 warm-up, threads {threads}; medians",
        idx.len()
    );
    println!(
        "{:<10} {:>9} {:>14} {:>10} {:>8}",
        "model", "params", "non-private", "DP-SGD", "ratio"
    );
    for arch in archs {
        let model = Model::build(arch, 2, 0)?;
        let p = model.param_count();
        let mut flat = vec![0f32; p];
        let mut noise = GaussianNoise::new(1.0, 1.0, p)?;
        let (mut plain, mut dp) = (Vec::new(), Vec::new());
        for rep in 0..=reps {
            let t = Instant::now();
            plain_step(&model, &x, &y, &mut flat)?;
            let a = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let (g, _) = private_gradient(&model, &x, &y, 1.0, &mut noise, idx.len() as f64)?;
            let b = t.elapsed().as_secs_f64();
            assert_eq!(g.len(), p);
            if rep > 0 {
                plain.push(a);
                dp.push(b);
            }
        }
        let (a, b) = (median(plain), median(dp));
        println!(
            "{:<10} {:>9} {:>11.1} ms {:>7.1} ms {:>7.2}x",
            arch.name(),
            p,
            a * 1e3,
            b * 1e3,
            b / a
        );
    }
    Ok(())
}
