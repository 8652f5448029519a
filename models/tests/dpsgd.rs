//! DP-SGD: per-example norms and clipping against an exact per-example reference (one backward
//! pass per example, test-only), the noise scale, and a DP training run.
use caduceus_dataset::{Attribute, Gender, ImageSet, Labels, Race};
use caduceus_models::dpsgd::{clipped_gradient_sum, private_gradient};
use caduceus_models::{Arch, ClientStrategy, DpConfig, Mode, Model, TrainConfig, train_local_dp};
use caduceus_privacy::noise::GaussianNoise;
use candle_core::{Device, Tensor};
use rand::SeedableRng;

/// A random batch of `n` 64×64 images and binary labels.
fn batch(n: usize, seed: u64) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    dev.set_seed(seed).ok();
    let x = Tensor::randn(0f32, 1.0, (n, 3, 64, 64), &dev).unwrap();
    let y: Vec<u32> = (0..n as u32).map(|i| (i * 7 + seed as u32) % 2).collect();
    (x, Tensor::from_vec(y, n, &dev).unwrap())
}

/// Exact per-example gradients: one batch-1 backward per example (the slow reference).
fn reference_grads(model: &Model, x: &Tensor, y: &Tensor) -> Vec<Vec<f32>> {
    (0..x.dim(0).unwrap())
        .map(|i| {
            let xi = x.narrow(0, i, 1).unwrap();
            let yi = y.narrow(0, i, 1).unwrap();
            let logits = model.forward(&xi, Mode::Train).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &yi).unwrap();
            let grads = loss.backward().unwrap();
            let mut flat = Vec::new();
            for v in model.vars() {
                let g = grads.get(v.as_tensor()).expect("every parameter has a gradient");
                flat.extend(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            flat
        })
        .collect()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&a| f64::from(a) * f64::from(a)).sum::<f64>().sqrt()
}

#[test]
fn per_example_norms_and_sums_match_the_exact_reference_on_every_model() {
    for arch in Arch::ALL {
        let model = Model::build(arch, 2, 7).unwrap();
        let (x, y) = batch(4, 1);
        let reference = reference_grads(&model, &x, &y);
        // A clip norm above every gradient: nothing is clipped, the sum is the plain sum.
        let out = clipped_gradient_sum(&model, &x, &y, 1e6).unwrap();
        assert_eq!(out.norms.len(), 4);
        for (i, r) in reference.iter().enumerate() {
            let (ours, exact) = (out.norms[i], norm(r));
            assert!(
                (ours - exact).abs() <= 1e-4 * exact + 1e-6,
                "{arch}: example {i}: norm {ours} vs exact {exact}"
            );
            assert_eq!(out.factors[i], 1.0);
        }
        let scale = out.sum.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
        for (j, s) in out.sum.iter().enumerate() {
            let exact: f64 = reference.iter().map(|r| f64::from(r[j])).sum();
            assert!(
                (s - exact).abs() <= 1e-3 * scale,
                "{arch}: coordinate {j}: {s} vs exact {exact}"
            );
        }
    }
}

#[test]
fn unclipped_per_example_sum_is_the_non_private_batch_gradient_on_every_model() {
    // The per-example taps against the other path: one batched backward of the summed loss in
    // Mode::Train (what train_local differentiates, times the batch), as f32 GEMMs over the batch.
    // Measured: at most 8e-7 of the largest coordinate over 4 seeds per model; 1e-5 allowed.
    for arch in Arch::ALL {
        let model = Model::build(arch, 2, 11).unwrap();
        let (x, y) = batch(6, 4);
        let logits = model.forward(&x, Mode::Train).unwrap();
        let loss = (candle_nn::loss::cross_entropy(&logits, &y).unwrap() * 6.0).unwrap();
        let grads = loss.backward().unwrap();
        let mut exact = Vec::new();
        for v in model.vars() {
            let g = grads.get(v.as_tensor()).expect("every parameter has a gradient");
            exact.extend(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let out = clipped_gradient_sum(&model, &x, &y, 1e6).unwrap();
        assert!(out.factors.iter().all(|&f| f == 1.0));
        assert_eq!(out.sum.len(), exact.len());
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (j, (s, e)) in out.sum.iter().zip(&exact).enumerate() {
            assert!(
                (s - f64::from(*e)).abs() <= 1e-5 * f64::from(scale),
                "{arch}: coordinate {j}: taps {s} vs batch gradient {e}"
            );
        }
    }
}

#[test]
fn every_per_example_gradient_is_clipped_to_c_on_every_model() {
    for arch in Arch::ALL {
        let model = Model::build(arch, 2, 3).unwrap();
        let (x, y) = batch(5, 2);
        let reference = reference_grads(&model, &x, &y);
        let mut exact_norms: Vec<f64> = reference.iter().map(|r| norm(r)).collect();
        exact_norms.sort_by(f64::total_cmp);
        // Between the second and third smallest norms: three examples are clipped, two are not.
        let clip = (exact_norms[1] + exact_norms[2]) / 2.0;
        let out = clipped_gradient_sum(&model, &x, &y, clip).unwrap();
        let mut clipped = 0;
        for (i, r) in reference.iter().enumerate() {
            let after = out.factors[i] * norm(r);
            // The exact gradient scaled by our factor; float tolerance of the two computations.
            assert!(
                after <= clip * (1.0 + 1e-4),
                "{arch}: example {i}: {after} > C = {clip}"
            );
            assert!(out.factors[i] * out.norms[i] <= clip, "{arch}: example {i}");
            if out.factors[i] < 1.0 {
                clipped += 1;
                assert!(
                    (after - clip).abs() <= 1e-4 * clip,
                    "{arch}: clipped to {after}, not C"
                );
            }
        }
        assert!(clipped >= 3, "{arch}: only {clipped} examples clipped");
        // The sum is Σ cᵢ·gᵢ of the exact gradients, and its norm is at most n·C.
        let scale = out.sum.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
        for (j, s) in out.sum.iter().enumerate() {
            let exact: f64 = reference
                .iter()
                .zip(&out.factors)
                .map(|(r, c)| c * f64::from(r[j]))
                .sum();
            assert!((s - exact).abs() <= 1e-3 * scale, "{arch}: coordinate {j}");
        }
        let sum_norm = out.sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(sum_norm <= 5.0 * clip * (1.0 + 1e-6));
    }
}

#[test]
fn noise_of_a_dp_step_has_standard_deviation_sigma_c() {
    // resnet8 has ~78k parameters: the sample standard deviation over its coordinates is within
    // ~0.3% of the truth (one standard error), the test allows 2%.
    let model = Model::build(Arch::ResNet8, 2, 5).unwrap();
    let (x, y) = batch(3, 3);
    for (sigma, clip) in [(1.0, 0.5), (3.0, 2.0)] {
        let mut noise = GaussianNoise::new(clip, sigma, model.param_count()).unwrap();
        let expected_batch = 4.0;
        let (grad, batch) = private_gradient(&model, &x, &y, clip, &mut noise, expected_batch).unwrap();
        let z: Vec<f64> = grad
            .iter()
            .zip(&batch.sum)
            .map(|(g, s)| f64::from(*g) * expected_batch - s)
            .collect();
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let sd = (z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)).sqrt();
        let target = sigma * clip;
        assert!(
            (sd / target - 1.0).abs() < 0.02,
            "σ={sigma} C={clip}: sd {sd} vs σ·C {target}"
        );
        assert!(mean.abs() < 5.0 * target / n.sqrt(), "mean {mean}");
        assert!(noise.noise_std() >= target && noise.noise_std() <= 1.001 * target);
        // Fourth moment of a Gaussian: kurtosis 3 (a uniform or Laplace noise would fail).
        let kurt = z.iter().map(|v| ((v - mean) / sd).powi(4)).sum::<f64>() / n;
        assert!((kurt - 3.0).abs() < 0.15, "kurtosis {kurt}");
    }
}

fn synthetic(n: usize) -> ImageSet {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let images: Vec<f32> = (0..n * 3 * 64 * 64)
        .map(|_| rand::Rng::random_range(&mut rng, -1.0f32..1.0))
        .collect();
    let attributes = (0..n)
        .map(|i| Labels {
            age: 30,
            gender: Gender::ALL[i % 2],
            race: Race::ALL[i % 5],
        })
        .collect();
    let files = (0..n).map(|i| format!("s{i}")).collect();
    ImageSet::new(Attribute::Gender, 64, 64, images, attributes, files).unwrap()
}

#[test]
fn dp_training_reports_what_it_spent_and_moves_the_weights() {
    let data = synthetic(40);
    for arch in Arch::ALL {
        let mut model = Model::build(arch, 2, 1).unwrap();
        let before = model.flatten().unwrap();
        let cfg = TrainConfig {
            epochs: 0,
            max_steps: Some(3),
            batch_size: 8,
            ..TrainConfig::default()
        };
        let dp = DpConfig {
            noise_multiplier: 1.1,
            clip_norm: 1.0,
            sample_rate: 0.25,
        };
        let out = train_local_dp(&mut model, &data, &cfg, ClientStrategy::FedAvg, &dp).unwrap();
        let spend = out.privacy.expect("DP outcome");
        assert_eq!(out.steps, 3);
        assert_eq!(spend.steps, 3);
        assert_eq!(spend.sample_rate, 0.25);
        assert_eq!(spend.noise_multiplier, 1.1);
        assert_eq!(spend.clip_norm, 1.0);
        assert_eq!(out.num_examples, 40);
        // Poisson batches: 3 steps of Binomial(40, 0.25), mean 10 (a 6σ band).
        assert!(
            spend.mean_batch > 3.0 && spend.mean_batch < 17.0,
            "{}",
            spend.mean_batch
        );
        assert_ne!(out.params, before);
        assert!(out.params.iter().all(|v| v.is_finite()));
    }
    // Epochs: ⌈1/q⌉ steps per expected pass.
    let mut model = Model::build(Arch::ResNet8, 2, 1).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        max_steps: None,
        batch_size: 16,
        ..TrainConfig::default()
    };
    let dp = DpConfig {
        noise_multiplier: 1.0,
        clip_norm: 1.0,
        sample_rate: 0.3,
    };
    let out = train_local_dp(&mut model, &data, &cfg, ClientStrategy::FedAvg, &dp).unwrap();
    assert_eq!(out.steps, 4);
}

#[test]
fn bad_dp_settings_are_refused_by_name() {
    let data = synthetic(4);
    let mut model = Model::build(Arch::ResNet8, 2, 1).unwrap();
    let cfg = TrainConfig {
        epochs: 0,
        max_steps: Some(1),
        ..TrainConfig::default()
    };
    for (dp, word) in [
        (
            DpConfig {
                noise_multiplier: 0.0,
                clip_norm: 1.0,
                sample_rate: 0.5,
            },
            "noise multiplier",
        ),
        (
            DpConfig {
                noise_multiplier: 1.0,
                clip_norm: -1.0,
                sample_rate: 0.5,
            },
            "clip norm",
        ),
        (
            DpConfig {
                noise_multiplier: 1.0,
                clip_norm: 1.0,
                sample_rate: 1.5,
            },
            "sample rate",
        ),
    ] {
        let e = train_local_dp(&mut model, &data, &cfg, ClientStrategy::FedAvg, &dp).unwrap_err();
        assert!(e.to_string().contains(word), "{e}");
    }
}

#[test]
fn clip_statistics_count_the_examples_above_c() {
    use caduceus_models::ClipStats;
    let mut norms = vec![5.0, 0.5, 3.0, 9.0, 1.0, 2.0, 4.0, 8.0, 7.0, 6.0, 0.1];
    let s = ClipStats::from_norms(&mut norms, 4);
    assert_eq!(s.norm_median, 4.0);
    assert_eq!(s.norm_p10, 0.5);
    assert_eq!(s.norm_p90, 8.0);
    assert!((s.clipped_fraction - 4.0 / 11.0).abs() < 1e-12);
    assert_eq!(ClipStats::from_norms(&mut [], 0), ClipStats::default());

    // A real run: with C far below every norm all examples are clipped, far above none is, and the
    // norms (unclipped) do not depend on C.
    let data = synthetic(24);
    let cfg = TrainConfig {
        epochs: 0,
        max_steps: Some(2),
        batch_size: 8,
        ..TrainConfig::default()
    };
    let mut stats = Vec::new();
    for clip_norm in [1e-6, 1e6] {
        let mut model = Model::build(Arch::SmallCnn, 2, 3).unwrap();
        let dp = DpConfig {
            noise_multiplier: 1.0,
            clip_norm,
            sample_rate: 0.5,
        };
        let out = train_local_dp(&mut model, &data, &cfg, ClientStrategy::FedAvg, &dp).unwrap();
        stats.push(out.privacy.unwrap().clipping);
    }
    assert_eq!(stats[0].clipped_fraction, 1.0, "{:?}", stats[0]);
    assert_eq!(stats[1].clipped_fraction, 0.0, "{:?}", stats[1]);
    for s in &stats {
        assert!(
            s.norm_p10 > 1e-6
                && s.norm_p10 <= s.norm_median
                && s.norm_median <= s.norm_p90
                && s.norm_p90 < 1e6,
            "{s:?}"
        );
    }
}
