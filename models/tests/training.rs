//! Training tests on a few hundred real UTKFace images when the shared data is present
//! (`CADUCEUS_DATA_DIR`, else `../shared/data` beside the repository), on synthetic faces otherwise.
use std::path::PathBuf;

use caduceus_dataset::{Attribute, Gender, ImageSet, Labels, LoaderConfig, Manifest, Race};
use caduceus_models::{
    Arch, ClientStrategy, Model, Optimizer, TrainConfig, evaluate, scaffold_control, train_local,
};

fn data_dir() -> Option<PathBuf> {
    let dir = caduceus_dataset::data_dir()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
        .join("utkface-64");
    dir.is_dir().then_some(dir)
}

/// `n` examples for the gender task: real images if the data is there (a fixed, sorted subset),
/// else synthetic ones whose class decides a brightness pattern.
fn gender_data(n: usize) -> ImageSet {
    if let Some(dir) = data_dir() {
        let report = caduceus_dataset::import(&dir).expect("import");
        // Every 20th record: a spread over ages and races, the same on every run.
        let records = report.records.into_iter().step_by(20).take(n).collect();
        let manifest = Manifest::new(dir, records);
        return ImageSet::load(&manifest, Attribute::Gender, &LoaderConfig::default()).expect("load");
    }
    eprintln!("utkface-64 not found: synthetic data");
    let mut images = Vec::new();
    let mut attributes = Vec::new();
    for i in 0..n {
        let gender = Gender::ALL[i % 2];
        for c in 0..3 {
            for y in 0..64 {
                for x in 0..64 {
                    let pattern = if gender == Gender::Male { x < 32 } else { y < 32 };
                    let noise =
                        (((i * 7919 + c * 104_729 + y * 613 + x * 31) % 1000) as f32 / 1000.0 - 0.5) * 1.5;
                    images.push(if pattern { 0.5 } else { -0.5 } + noise);
                }
            }
        }
        attributes.push(Labels {
            age: 30,
            gender,
            race: Race::ALL[i % 5],
        });
    }
    let files = (0..n).map(|i| format!("synthetic-{i}")).collect();
    ImageSet::new(Attribute::Gender, 64, 64, images, attributes, files).unwrap()
}

fn sgd(lr: f32) -> Optimizer {
    Optimizer::sgd(lr, 0.0)
}

fn distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt()
}

#[test]
fn a_few_steps_reduce_the_loss_for_every_arch() {
    // Fits 32 images for 16 steps and checks the loss on them: cheap, and fails if gradients,
    // the optimiser or the parameter write-back are broken.
    let data = gender_data(32);
    for arch in Arch::ALL {
        let mut model = Model::build(arch, 2, 1).unwrap();
        let before = evaluate(&model, &data, 32).unwrap();
        let cfg = TrainConfig {
            epochs: 8,
            batch_size: 16,
            optimizer: Optimizer::adamw(1e-3),
            seed: 1,
            augment: false,
            ..Default::default()
        };
        let out = train_local(&mut model, &data, &cfg, ClientStrategy::FedAvg).unwrap();
        let after = evaluate(&model, &data, 32).unwrap();
        eprintln!(
            "{arch}: loss {:.3} -> {:.3}, accuracy {:.3} -> {:.3}, {:.0} img/s",
            before.loss,
            after.loss,
            before.accuracy,
            after.accuracy,
            out.images_per_second()
        );
        assert_eq!(out.steps, 16);
        assert_eq!(out.num_examples, 32);
        assert_eq!(out.examples_seen, 8 * 32);
        assert_eq!(out.params, model.flatten().unwrap());
        assert!(
            after.loss < before.loss - 0.03,
            "{arch}: loss {} -> {}",
            before.loss,
            after.loss
        );
        assert!(
            out.last_epoch_loss < out.mean_loss,
            "{arch}: {} vs {}",
            out.last_epoch_loss,
            out.mean_loss
        );
    }
}

#[test]
fn same_seed_same_training() {
    let data = gender_data(96);
    let cfg = TrainConfig {
        max_steps: Some(3),
        epochs: 0,
        batch_size: 32,
        seed: 5,
        ..Default::default()
    };
    let run = || {
        let mut m = Model::build(Arch::SmallCnn, 2, 3).unwrap();
        train_local(&mut m, &data, &cfg, ClientStrategy::FedAvg)
            .unwrap()
            .params
    };
    assert_eq!(run(), run());
}

#[test]
fn fedprox_with_huge_mu_stays_near_global() {
    let data = gender_data(128);
    let cfg = TrainConfig {
        epochs: 0,
        max_steps: Some(8),
        batch_size: 16,
        optimizer: sgd(0.05),
        seed: 2,
        augment: false,
    };
    let global = Model::build(Arch::SmallCnn, 2, 4).unwrap().flatten().unwrap();
    let run = |strategy| {
        let mut m = Model::from_flat(Arch::SmallCnn, 2, &global).unwrap();
        train_local(&mut m, &data, &cfg, strategy).unwrap().params
    };
    let free = distance(&run(ClientStrategy::FedAvg), &global);
    // lr·mu = 1: every step pulls the weights all the way back to the global model.
    let prox = distance(&run(ClientStrategy::FedProx { mu: 20.0 }), &global);
    eprintln!("distance from global: fedavg {free:.4}, fedprox {prox:.4}");
    assert!(prox < 0.4 * free, "fedprox {prox} vs fedavg {free}");
}

#[test]
fn scaffold_corrects_gradients_and_returns_the_control_variate() {
    let data = gender_data(64);
    let global = Model::build(Arch::SmallCnn, 2, 6).unwrap().flatten().unwrap();
    let p = global.len();
    let lr = 0.01;
    let cfg = TrainConfig {
        epochs: 0,
        max_steps: Some(1),
        batch_size: 32,
        optimizer: sgd(lr),
        seed: 3,
        augment: false,
    };
    let c: Vec<f32> = (0..p).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    let ci: Vec<f32> = (0..p).map(|i| ((i % 5) as f32 - 2.0) * 0.05).collect();

    let mut plain = Model::from_flat(Arch::SmallCnn, 2, &global).unwrap();
    let avg = train_local(&mut plain, &data, &cfg, ClientStrategy::FedAvg).unwrap();
    let mut corrected = Model::from_flat(Arch::SmallCnn, 2, &global).unwrap();
    let strategy = ClientStrategy::Scaffold {
        global_control: &c,
        local_control: &ci,
    };
    let sc = train_local(&mut corrected, &data, &cfg, strategy).unwrap();
    // One SGD step on the same batch: w_scaffold = w_fedavg − lr·(c − c_i).
    for i in (0..p).step_by(997) {
        let expected = avg.params[i] - lr * (c[i] - ci[i]);
        assert!(
            (sc.params[i] - expected).abs() < 1e-5,
            "param {i}: {} vs {expected}",
            sc.params[i]
        );
    }
    // c_i⁺ = c_i − c + (w_global − w_local)/(K·lr) with K = 1, which here equals g + c_i − c + c = g + ... :
    let update = sc.control.expect("scaffold returns a control update");
    for i in (0..p).step_by(997) {
        let expected = ci[i] - c[i] + (global[i] - sc.params[i]) / lr;
        assert!((update.local_control[i] - expected).abs() < 1e-3, "c_i+ {i}");
        assert!((update.delta[i] - (update.local_control[i] - ci[i])).abs() < 1e-6);
    }
    assert!(avg.control.is_none());
}

#[test]
fn scaffold_formula_by_hand() {
    // c_i = [1, 0], c = [0.5, 0.5], w_global = [1, 2], w_local = [0.8, 2.4], K = 4, lr = 0.1:
    // c_i⁺ = c_i − c + (w_global − w_local)/(0.4) = [1 − 0.5 + 0.5, 0 − 0.5 − 1] = [1, −1.5].
    let u = scaffold_control(&[1.0, 0.0], &[0.5, 0.5], &[1.0, 2.0], &[0.8, 2.4], 4, 0.1);
    assert!(
        (u.local_control[0] - 1.0).abs() < 1e-6 && (u.local_control[1] + 1.5).abs() < 1e-6,
        "{u:?}"
    );
    assert!((u.delta[0] - 0.0).abs() < 1e-6 && (u.delta[1] + 1.5).abs() < 1e-6);
    let none = scaffold_control(&[1.0], &[0.5], &[1.0], &[0.0], 0, 0.1);
    assert_eq!(none.local_control, vec![1.0]);
}

#[test]
fn bad_inputs_are_refused() {
    let data = gender_data(8);
    let mut five = Model::build(Arch::ResNet8, 5, 0).unwrap();
    let err = train_local(&mut five, &data, &TrainConfig::default(), ClientStrategy::FedAvg).unwrap_err();
    assert!(err.to_string().contains("classes"), "{err}");
    let mut m = Model::build(Arch::SmallCnn, 2, 0).unwrap();
    let short = vec![0.0; 3];
    let s = ClientStrategy::Scaffold {
        global_control: &short,
        local_control: &short,
    };
    assert!(train_local(&mut m, &data, &TrainConfig::default(), s).is_err());
    let cfg = TrainConfig {
        batch_size: 0,
        ..Default::default()
    };
    assert!(train_local(&mut m, &data, &cfg, ClientStrategy::FedAvg).is_err());
}
