//! `--centralised`: the same model trained on the pooled hospital shards in this process.
use std::time::Instant;

use caduceus_dataset::{ImageSet, LoaderConfig, Manifest, hospital_dir_name};
use caduceus_fairness::RoundResult;
use caduceus_fairness::results::{CONFIG_FILE, write_rounds};
use caduceus_models::{Arch, ClientStrategy, Model, TrainConfig, train_local};

use super::args::{SimulateArgs, optimizer};
use super::plan::{Prepared, config_json, sensitive};
use super::results::{finish, print_round};

pub(super) fn run_centralised(
    args: &SimulateArgs,
    arch: Arch,
    prepared: &Prepared,
    started: Instant,
) -> anyhow::Result<()> {
    let config = config_json(args, prepared, "centralised");
    std::fs::write(
        args.results.join(CONFIG_FILE),
        serde_json::to_vec_pretty(&config)?,
    )?;
    let mut train_records = Vec::new();
    let mut val_records = Vec::new();
    for i in 0..args.hospitals {
        let s = caduceus_dataset::ShardManifests::read(prepared.split_dir.join(hospital_dir_name(i)))?;
        train_records.extend(s.train.records);
        val_records.extend(s.val.records);
    }
    let loader = LoaderConfig::default();
    let train = ImageSet::load(
        &Manifest::new(&prepared.image_root, train_records),
        args.task,
        &loader,
    )?;
    let val = ImageSet::load(
        &Manifest::new(&prepared.image_root, val_records),
        args.task,
        &loader,
    )?;
    println!(
        "centralised: {} on {} pooled training images, {} validation images, {} rounds x {} epochs",
        arch,
        train.len(),
        val.len(),
        args.rounds,
        args.local_epochs
    );
    let mut model = Model::build(arch, args.task.num_classes(), args.seed)?;
    let sens = sensitive(args.task);
    let mut rounds = Vec::new();
    for r in 0..=args.rounds {
        let t = Instant::now();
        let e = caduceus_trainer::evaluate_counts(&model, &val, &sens, 1, 256)?;
        let mut rec = RoundResult {
            round: r,
            strategy: "centralised".into(),
            participants: vec!["pooled".into()],
            accuracy: e.accuracy(),
            loss: e.mean_loss(),
            counts: e.counts.clone(),
            ..Default::default()
        };
        rec.extra.insert("examples".into(), serde_json::json!(e.examples));
        if r < args.rounds {
            let cfg = TrainConfig {
                epochs: args.local_epochs,
                max_steps: args.steps_cap(),
                batch_size: args.batch_size,
                optimizer: optimizer(args),
                seed: args.seed ^ (u64::from(r) << 32) ^ 0x5eed,
                augment: true,
            };
            let out = train_local(&mut model, &train, &cfg, ClientStrategy::FedAvg)?;
            rec.extra
                .insert("train_loss".into(), serde_json::json!(out.mean_loss));
            rec.extra.insert(
                "images_per_second".into(),
                serde_json::json!(out.images_per_second()),
            );
        } else {
            rec.extra
                .insert("evaluation_only".into(), serde_json::json!(true));
        }
        print_round(&rec, args.rounds, Some(t.elapsed().as_secs_f64()));
        rounds.push(rec);
        write_rounds(&args.results, &rounds)?;
    }
    finish(args, prepared, &model, &mut rounds, started)
}
