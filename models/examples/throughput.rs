//! Training throughput per architecture on real UTKFace images: images per second for forward,
//! backward and optimiser step together, as the trainer runs them.
//!
//! ```text
//! cargo run --release -p caduceus-models --example throughput -- \
//!     --data-dir ../shared/data/utkface-64 --images 2048 --steps 30 --batch 64 \
//!     [--archs small-cnn,resnet8] [--conv im2col,candle] [--profile]
//! ```
//! `--data-dir` defaults to `$CADUCEUS_DATA_DIR/utkface-64`. Threads: `RAYON_NUM_THREADS`
//! (default: all cores). `--profile` also times the forward pass, the backward pass and the rest
//! (gradient copy + optimiser) separately, and each convolution's three kernels (forward, input
//! gradient, weight gradient) at the small CNN's shapes, as candle computes them.
//! `--conv` picks the convolution kernels (default im2col; `candle` is candle's own conv2d).
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use caduceus_dataset::{Attribute, ImageSet, LoaderConfig, Manifest};
use caduceus_models::{
    Arch, ClientStrategy, ConvImpl, Mode, Model, Optimizer, TrainConfig, set_conv_impl, train_local,
};
use candle_core::{Device, Tensor};

struct Args {
    data_dir: PathBuf,
    images: usize,
    steps: usize,
    batch: usize,
    archs: Vec<Arch>,
    profile: bool,
    conv: Vec<ConvImpl>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        data_dir: caduceus_dataset::data_dir()
            .unwrap_or_else(|| PathBuf::from("../shared/data"))
            .join("utkface-64"),
        images: 2048,
        steps: 30,
        batch: 64,
        archs: Arch::ALL.to_vec(),
        profile: false,
        conv: vec![ConvImpl::Im2col],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--profile" {
            args.profile = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--data-dir" => args.data_dir = value.into(),
            "--images" => args.images = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--batch" => args.batch = value.parse()?,
            "--archs" => {
                args.archs = value
                    .split(',')
                    .map(|s| s.parse().map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?
            }
            "--conv" => {
                args.conv = value
                    .split(',')
                    .map(|s| match s {
                        "im2col" => Ok(ConvImpl::Im2col),
                        "candle" => Ok(ConvImpl::Candle),
                        _ => bail!("--conv takes im2col and/or candle"),
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    // As training does (train_local calls it too): the steps below reuse freed buffers.
    caduceus_models::keep_freed_memory();
    let args = parse_args()?;
    let t = Instant::now();
    let report = caduceus_dataset::import(&args.data_dir)?;
    let records: Vec<_> = report.records.into_iter().take(args.images).collect();
    let n = records.len();
    let data = ImageSet::load(
        &Manifest::new(&args.data_dir, records),
        Attribute::Gender,
        &LoaderConfig::default(),
    )?;
    println!(
        "loaded {n} images in {:.2}s; threads {}",
        t.elapsed().as_secs_f64(),
        rayon_threads()
    );
    for &conv in &args.conv {
        set_conv_impl(conv);
        for &arch in &args.archs {
            let mut model = Model::build(arch, 2, 0)?;
            let warm = TrainConfig {
                epochs: 0,
                max_steps: Some(2),
                batch_size: args.batch,
                optimizer: Optimizer::default(),
                seed: 0,
                augment: true,
            };
            train_local(&mut model, &data, &warm, ClientStrategy::FedAvg)?;
            let cfg = TrainConfig {
                max_steps: Some(args.steps),
                ..warm
            };
            let out = train_local(&mut model, &data, &cfg, ClientStrategy::FedAvg)?;
            println!(
                "{arch:10} {conv:?} conv {:>9} params  batch {}  {} steps  {:7.1} images/s  (loss {:.3})",
                model.param_count(),
                args.batch,
                out.steps,
                out.images_per_second(),
                out.mean_loss
            );
            if args.profile {
                profile_steps(&model, &data, args.batch, args.steps.min(10))?;
            }
        }
    }
    if args.profile {
        profile_small_cnn_convs(args.batch)?;
    }
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map(|p| p.get().to_string())
            .unwrap_or_default()
    })
}

/// Times forward, backward and the rest of a training step (what `train_local` does besides).
fn profile_steps(model: &Model, data: &ImageSet, batch: usize, steps: usize) -> anyhow::Result<()> {
    let (mut fwd, mut bwd, mut rest) = (0.0, 0.0, 0.0);
    let idx: Vec<usize> = (0..batch.min(data.len())).collect();
    let (mut imgs, mut labels) = (Vec::new(), Vec::new());
    let mut flat = model.flatten()?;
    for _ in 0..steps {
        let t0 = Instant::now();
        data.fill_batch(&idx, None, &mut imgs, &mut labels);
        let x = Tensor::from_slice(&imgs, (idx.len(), 3, data.height, data.width), &Device::Cpu)?;
        let y = Tensor::from_slice(&labels, idx.len(), &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x, Mode::Train)?, &y)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        // Gradient copy-out and a parameter write-back, as train_local does each step.
        let mut off = 0;
        for v in model.vars() {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                for (w, gi) in flat[off..off + g.len()].iter_mut().zip(&g) {
                    *w -= 0.0 * gi;
                }
                off += g.len();
            }
        }
        let t3 = Instant::now();
        fwd += (t1 - t0).as_secs_f64();
        bwd += (t2 - t1).as_secs_f64();
        rest += (t3 - t2).as_secs_f64();
    }
    let total = fwd + bwd + rest;
    println!(
        "    per step: forward {:.1} ms ({:.0}%), backward {:.1} ms ({:.0}%), gradient copy {:.1} ms ({:.0}%)",
        1e3 * fwd / steps as f64,
        100.0 * fwd / total,
        1e3 * bwd / steps as f64,
        100.0 * bwd / total,
        1e3 * rest / steps as f64,
        100.0 * rest / total
    );
    Ok(())
}

/// The three kernels of each small-CNN convolution, run as candle's backward runs them.
fn profile_small_cnn_convs(batch: usize) -> anyhow::Result<()> {
    println!("small-cnn convolutions, batch {batch}, ms per call:");
    let dev = Device::Cpu;
    let reps = 3;
    for (c_in, c_out, hw) in [(3, 32, 64), (32, 64, 32), (64, 128, 16)] {
        let x = Tensor::randn(0f32, 1.0, (batch, c_in, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (batch, c_out, hw, hw), &dev)?;
        let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<f64> {
            f()?;
            let t = Instant::now();
            for _ in 0..reps {
                f()?;
            }
            Ok(1e3 * t.elapsed().as_secs_f64() / reps as f64)
        };
        let fwd = time(&|| x.conv2d(&w, 1, 1, 1, 1))?;
        let grad_in = time(&|| g.conv_transpose2d(&w, 1, 0, 1, 1))?;
        let grad_w = time(&|| {
            x.transpose(0, 1)?
                .conv2d(&g.transpose(0, 1)?, 1, 1, 1, 1)?
                .transpose(0, 1)
        })?;
        println!(
            "    conv {c_in:>3}->{c_out:<3} at {hw}x{hw}: forward {fwd:7.1}  input-grad (conv_transpose2d) {grad_in:7.1}  \
             weight-grad {grad_w:7.1}"
        );
    }
    Ok(())
}
