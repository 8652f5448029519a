//! `caduceus simulate`: a whole federated study on one machine.
//!
//! It imports the face data, makes a (by default non-IID Dirichlet race) split into a held-out test set
//! and N hospital shards, generates a study CA with a server certificate and one client certificate per
//! hospital, and starts the real `caduceus-aggregator` and N `caduceus-trainer` processes on loopback
//! with mutual TLS. It prints a line per round (accuracy, loss, per-race accuracy, from the hospitals'
//! evaluation counts), then evaluates the final model on the held-out test set and writes a results
//! directory: `config.json` and `rounds.json` (the fairness crate's format, read by `caduceus report`),
//! `final-model.safetensors`, and `work/` (split, certificates, model store, logs, summaries).
//!
//! `--centralised` trains the same model on the pooled hospital shards in this process, for the same
//! total number of epochs (rounds × local epochs), and writes the same kind of results directory.
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use caduceus_dataset::{
    Attribute, ImageSet, LoaderConfig, Manifest, Race, SchemeKind, SplitConfig, SplitScheme,
    hospital_dir_name,
};
use caduceus_fairness::RoundResult;
use caduceus_fairness::results::{CONFIG_FILE, utkface_group_labels, write_rounds};
use caduceus_models::{Arch, ClientStrategy, Model, Optimizer, TrainConfig, train_local};
use clap::{Args, ValueEnum};

/// Aggregation strategies offered by the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    Fedavg,
    Fedprox,
    Scaffold,
    Fairfed,
}

impl StrategyArg {
    fn name(self) -> &'static str {
        match self {
            StrategyArg::Fedavg => "fedavg",
            StrategyArg::Fedprox => "fedprox",
            StrategyArg::Scaffold => "scaffold",
            StrategyArg::Fairfed => "fairfed",
        }
    }
}

/// Secure aggregation of the simulated study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecureAggregationArg {
    /// Plaintext updates.
    None,
    /// TFHE: hospitals encrypt their deltas; the aggregator sums ciphertexts and never holds the key.
    Tfhe,
}

impl SecureAggregationArg {
    fn name(self) -> &'static str {
        match self {
            SecureAggregationArg::None => "none",
            SecureAggregationArg::Tfhe => "tfhe",
        }
    }
}

/// Local optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    Adamw,
    Sgd,
}

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Number of hospitals (trainer processes).
    #[arg(long, default_value_t = 4)]
    pub hospitals: usize,
    /// Training rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Aggregation strategy.
    #[arg(long, value_enum, default_value = "fedavg")]
    pub strategy: StrategyArg,
    /// FedProx proximal coefficient mu.
    #[arg(long, default_value_t = 0.01)]
    pub fedprox_mu: f32,
    /// SCAFFOLD server learning rate.
    #[arg(long, default_value_t = 1.0)]
    pub scaffold_server_lr: f32,
    /// FairFed beta.
    #[arg(long, default_value_t = 1.0)]
    pub fairfed_beta: f32,
    /// Model architecture: small-cnn, resnet8 or mobilenet.
    #[arg(long, default_value = "small-cnn")]
    pub model: String,
    /// Split scheme: dirichlet (non-IID) or iid.
    #[arg(long, default_value = "dirichlet")]
    pub split: SchemeKind,
    /// Dirichlet concentration (smaller is more skewed).
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Attribute the non-IID split skews over.
    #[arg(long, default_value = "race")]
    pub split_attribute: Attribute,
    /// Prediction task.
    #[arg(long, default_value = "gender")]
    pub task: Attribute,
    /// Seed of the split, the initial model and local training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory holding `utkface-64/` (default: $CADUCEUS_DATA_DIR, else ../shared/data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Results directory (created; must be empty unless --overwrite).
    #[arg(long, default_value = "results/simulate")]
    pub results: PathBuf,
    /// Replace a previous run's files in the results directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Use at most this many images in total (a seeded random subset).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Fraction of images held out as the global test set.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Fraction of each hospital's images kept for its local validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub local_epochs: usize,
    /// Cap on local optimiser steps per round (0: no cap, whole epochs). The default keeps the demo
    /// within 10 minutes on 2 cores; hospitals with fewer batches than this train one epoch.
    #[arg(long, default_value_t = 20)]
    pub local_steps: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Local learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Local optimiser.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// Heavy-ball momentum of `--optimizer sgd` (PyTorch's formulation; 0: plain SGD).
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f32,
    /// Close a round at its deadline with this many updates (default: all hospitals).
    #[arg(long)]
    pub quorum_min: Option<u32>,
    /// Per-round deadline in seconds.
    #[arg(long, default_value_t = 900)]
    pub round_deadline_secs: u64,
    /// Train the same model centrally on the pooled shards instead (same total epochs).
    #[arg(long, alias = "centralized")]
    pub centralised: bool,
    /// Compute threads per trainer (default: the cores divided among the hospitals, at least 1).
    #[arg(long)]
    pub trainer_threads: Option<usize>,
    /// Study identifier.
    #[arg(long, default_value = "simulate")]
    pub study_id: String,
    /// DP-SGD and per-hospital privacy budgets.
    #[command(flatten)]
    pub dp: crate::simulate_dp::DpSimArgs,
    /// Secure aggregation: `tfhe` generates the study key into the hospitals' work directories only,
    /// runs the study on encrypted updates (FedAvg, FedProx, FairFed), and decrypts the final model on
    /// the hospital side before the test evaluation.
    #[arg(long, value_enum, default_value = "none")]
    pub secure_aggregation: SecureAggregationArg,
}

impl SimulateArgs {
    fn steps_cap(&self) -> Option<usize> {
        (self.local_steps > 0).then_some(self.local_steps)
    }
}

const HOSPITAL_PREFIX: &str = "hospital-";

fn image_dir(args: &SimulateArgs) -> PathBuf {
    args.data_dir
        .clone()
        .or_else(caduceus_dataset::data_dir)
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
        .join("utkface-64")
}

/// The directory holding `caduceus-aggregator` and `caduceus-trainer`: `$CADUCEUS_BIN_DIR`, else the
/// directory of this executable.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("CADUCEUS_BIN_DIR").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().context("locating the caduceus executable")?;
    Ok(exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

fn find_bin(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !p.is_file() {
        bail!(
            "{} not found; build it (cargo build --release -p {name}) or set CADUCEUS_BIN_DIR to the directory holding it",
            p.display()
        );
    }
    Ok(p)
}

/// Child processes that are killed (by their own pid) when the simulation ends early.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn race_name(code: &str) -> String {
    code.parse::<u8>()
        .ok()
        .and_then(Race::from_code)
        .map(|r| {
            let n = r.name();
            let mut c = n.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .unwrap_or_else(|| code.to_string())
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
fn print_round(r: &RoundResult, total: u32, seconds: Option<f64>) {
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

fn prepare_results_dir(args: &SimulateArgs) -> anyhow::Result<()> {
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

struct Prepared {
    split_dir: PathBuf,
    image_root: PathBuf,
    test: Manifest,
    split_summary: serde_json::Value,
}

fn prepare_data(args: &SimulateArgs, work: &Path) -> anyhow::Result<Prepared> {
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

fn optimizer(args: &SimulateArgs) -> Optimizer {
    match args.optimizer {
        OptimizerArg::Adamw => Optimizer::adamw(args.lr),
        OptimizerArg::Sgd => Optimizer::sgd(args.lr, args.momentum),
    }
}

fn validate(args: &SimulateArgs) -> anyhow::Result<Arch> {
    if args.hospitals == 0 {
        bail!("--hospitals must be at least 1");
    }
    if !(0.0..1.0).contains(&args.momentum) {
        bail!("--momentum {} must be in [0, 1)", args.momentum);
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.local_epochs == 0 && args.local_steps == 0 {
        bail!("--local-epochs is 0 and no --local-steps given");
    }
    if args.strategy == StrategyArg::Scaffold && args.optimizer == OptimizerArg::Adamw {
        eprintln!(
            "note: SCAFFOLD's control-variate update assumes plain SGD; with --optimizer adamw it is an approximation"
        );
    }
    args.dp.validate(args.hospitals)?;
    if args.dp.enabled() && args.centralised {
        bail!("--dp-* options apply to the federated study, not to --centralised");
    }
    if args.secure_aggregation == SecureAggregationArg::Tfhe {
        if args.centralised {
            bail!("--secure-aggregation applies to federated studies, not --centralised");
        }
        if args.strategy == StrategyArg::Scaffold {
            bail!(
                "--secure-aggregation tfhe supports --strategy fedavg, fedprox and fairfed, not scaffold \
                 (SCAFFOLD's control variates are not encrypted)"
            );
        }
    }
    if args.task == args.split_attribute && args.split == SchemeKind::Dirichlet {
        eprintln!("note: the split skews over the task's own label ({})", args.task);
    }
    args.model
        .parse::<Arch>()
        .map_err(|e| anyhow::anyhow!("--model: {e}"))
}

/// The sensitive attributes whose group counts the trainers report: the first two of race, age
/// group and gender that are not the task.
pub(crate) fn sensitive(task: Attribute) -> Vec<Attribute> {
    [Attribute::Race, Attribute::AgeGroup, Attribute::Gender]
        .into_iter()
        .filter(|a| *a != task)
        .take(2)
        .collect()
}

fn config_json(args: &SimulateArgs, prepared: &Prepared, mode: &str) -> serde_json::Value {
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

fn finish(
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

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // Training (centralised mode) and the final test evaluation run in this process.
    caduceus_trainer::tune_allocator();
    let arch = validate(&args)?;
    if !args.centralised {
        // Fail before any work when the binaries are missing.
        let bins = bin_dir()?;
        find_bin(&bins, "caduceus-aggregator")?;
        find_bin(&bins, "caduceus-trainer")?;
    }
    prepare_results_dir(&args)?;
    let work = args.results.join("work");
    std::fs::create_dir_all(&work)?;
    let prepared = prepare_data(&args, &work)?;
    if args.centralised {
        return run_centralised(&args, arch, &prepared, started);
    }
    run_federated(&args, arch, &prepared, started)
}

fn run_centralised(
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

fn spawn_logged(name: &str, mut cmd: Command, log: &Path, stdout_piped: bool) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stderr(Stdio::from(f.try_clone()?));
    if stdout_piped {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::from(f));
    }
    cmd.stdin(Stdio::null());
    cmd.spawn().with_context(|| format!("starting {name}"))
}

fn run_federated(
    args: &SimulateArgs,
    arch: Arch,
    prepared: &Prepared,
    started: Instant,
) -> anyhow::Result<()> {
    let bins = bin_dir()?;
    let aggregator_bin = find_bin(&bins, "caduceus-aggregator")?;
    let trainer_bin = find_bin(&bins, "caduceus-trainer")?;
    let work = args.results.join("work");
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)?;
    let names: Vec<String> = (0..args.hospitals)
        .map(|i| format!("{HOSPITAL_PREFIX}{i}"))
        .collect();
    let pki = caduceus_pki::write_study_pki(
        &work.join("pki"),
        &args.study_id,
        &names,
        &["localhost".to_string()],
        &["127.0.0.1".parse().expect("loopback address")],
    )?;
    let mut config = config_json(args, prepared, "federated");
    let mut dp_plan = crate::simulate_dp::plan_for(args, prepared.split_dir.as_path(), &mut config)?;
    std::fs::write(
        args.results.join(CONFIG_FILE),
        serde_json::to_vec_pretty(&config)?,
    )?;

    let port_file = work.join("aggregator.port");
    let store = work.join("model-store");
    let mut agg = Command::new(&aggregator_bin);
    agg.arg("--study-id")
        .arg(&args.study_id)
        .arg("--rounds")
        .arg(args.rounds.to_string())
        .arg("--strategy")
        .arg(args.strategy.name())
        .arg("--fedprox-mu")
        .arg(args.fedprox_mu.to_string())
        .arg("--scaffold-server-lr")
        .arg(args.scaffold_server_lr.to_string())
        .arg("--fairfed-beta")
        .arg(args.fairfed_beta.to_string())
        .arg("--hospitals")
        .arg(names.join(","))
        .arg("--round-deadline-secs")
        .arg(args.round_deadline_secs.to_string())
        .arg("--tls-cert")
        .arg(&pki.server.cert)
        .arg("--tls-key")
        .arg(&pki.server.key)
        .arg("--tls-ca")
        .arg(&pki.ca_cert)
        .arg("--model-store")
        .arg(&store)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--port-file")
        .arg(&port_file)
        .arg("--arch")
        .arg(arch.name())
        .arg("--num-classes")
        .arg(args.task.num_classes().to_string())
        .arg("--init-seed")
        .arg(args.seed.to_string())
        .arg("--summary-path")
        .arg(work.join("aggregator-summary.json"))
        .arg("--linger-secs")
        .arg("3");
    if let Some(q) = args.quorum_min {
        agg.arg("--quorum-min").arg(q.to_string());
    }
    if let Some(plan) = &dp_plan {
        agg.args(plan.aggregator_args());
    }
    let secure = match args.secure_aggregation {
        SecureAggregationArg::Tfhe => Some(secure::setup(args, &work, &names, &mut agg)?),
        SecureAggregationArg::None => None,
    };
    let mut children = Children(Vec::new());
    let mut agg_child = spawn_logged("the aggregator", agg, &logs.join("aggregator.log"), true)?;
    let agg_out = agg_child.stdout.take().context("aggregator stdout")?;
    children.0.push(("aggregator".into(), agg_child));

    // Wait for the port.
    let t = Instant::now();
    let port = loop {
        if let Ok(s) = std::fs::read_to_string(&port_file)
            && let Ok(p) = s.trim().parse::<u16>()
        {
            break p;
        }
        if let Ok(Some(status)) = children.0[0].1.try_wait() {
            bail!(
                "the aggregator exited ({status}) before listening:\n{}",
                tail(&logs.join("aggregator.log"), 20)
            );
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the aggregator did not start listening within 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "aggregator listening on 127.0.0.1:{port} (mTLS); starting {} trainers ({} strategy, {} model, {} rounds x {} local epochs)",
        args.hospitals,
        args.strategy.name(),
        arch,
        args.rounds,
        args.local_epochs
    );

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args
        .trainer_threads
        .unwrap_or_else(|| (cores / args.hospitals).max(1));
    let sens: Vec<&str> = sensitive(args.task).iter().map(|a| a.name()).collect();
    for (i, (name, tls)) in pki.hospitals.iter().enumerate() {
        let mut t = Command::new(&trainer_bin);
        t.arg("--hospital")
            .arg(name)
            .arg("--study-id")
            .arg(&args.study_id)
            .arg("--shard")
            .arg(prepared.split_dir.join(hospital_dir_name(i)))
            .arg("--aggregator")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--server-name")
            .arg("localhost")
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-ca")
            .arg(&tls.ca_cert)
            .arg("--task")
            .arg(args.task.name())
            .arg("--sensitive")
            .arg(sens.join(","))
            .arg("--epochs")
            .arg(args.local_epochs.to_string())
            .arg("--batch-size")
            .arg(args.batch_size.to_string())
            .arg("--lr")
            .arg(args.lr.to_string())
            .arg("--optimizer")
            .arg(match args.optimizer {
                OptimizerArg::Adamw => "adamw",
                OptimizerArg::Sgd => "sgd",
            })
            .arg("--momentum")
            .arg(args.momentum.to_string())
            .arg("--seed")
            .arg((args.seed + i as u64).to_string())
            .arg("--state-dir")
            .arg(work.join("state").join(name))
            .arg("--summary-path")
            .arg(work.join(format!("{name}-summary.json")))
            .arg("--loader-threads")
            .arg(threads.to_string())
            .env("RAYON_NUM_THREADS", threads.to_string());
        if let Some(s) = args.steps_cap() {
            t.arg("--local-steps").arg(s.to_string());
        }
        if let Some(plan) = &dp_plan {
            t.args(plan.trainer_args(i));
        }
        if let Some(sec) = &secure {
            sec.trainer_args(&mut t, name);
        }
        let child = spawn_logged(name, t, &logs.join(format!("{name}.log")), false)?;
        children.0.push((name.clone(), child));
    }

    // Round events from the aggregator's stdout.
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(agg_out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut rounds: Vec<RoundResult> = Vec::new();
    let mut failed_trainers: Vec<String> = Vec::new();
    let agg_status: ExitStatus = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["event"] == "round_closed"
                    && let Ok(mut r) = serde_json::from_value::<RoundResult>(v["result"].clone())
                {
                    let secs = v["round_seconds"].as_f64();
                    if let Some(s) = secs {
                        r.extra.insert("round_seconds".into(), serde_json::json!(s));
                    }
                    print_round(&r, args.rounds, secs);
                    if let Some(plan) = &mut dp_plan {
                        println!("{}", plan.record_round(&mut r)?);
                    }
                    rounds.push(r);
                    write_rounds(&args.results, &rounds)?;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(100)),
        }
        for (name, c) in children.0.iter_mut().skip(1) {
            if failed_trainers.contains(name) {
                continue;
            }
            if let Ok(Some(st)) = c.try_wait()
                && !st.success()
            {
                let log = logs.join(format!("{name}.log"));
                eprintln!(
                    "{name} failed ({st}); last lines of {}:\n{}",
                    log.display(),
                    tail(&log, 15)
                );
                failed_trainers.push(name.clone());
            }
        }
        let quorum = args.quorum_min.unwrap_or(args.hospitals as u32) as usize;
        if args.hospitals - failed_trainers.len() < quorum {
            bail!(
                "{} of {} trainers failed ({}); the study cannot reach its quorum of {quorum}",
                failed_trainers.len(),
                args.hospitals,
                failed_trainers.join(", ")
            );
        }
        if let Ok(Some(st)) = children.0[0].1.try_wait() {
            // Drain what is left of stdout.
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["event"] == "round_closed"
                    && let Ok(mut r) = serde_json::from_value::<RoundResult>(v["result"].clone())
                {
                    print_round(&r, args.rounds, v["round_seconds"].as_f64());
                    if let Some(plan) = &mut dp_plan {
                        println!("{}", plan.record_round(&mut r)?);
                    }
                    rounds.push(r);
                }
            }
            break st;
        }
    };
    write_rounds(&args.results, &rounds)?;
    if !agg_status.success() {
        bail!(
            "the aggregator failed ({agg_status}); last lines of {}:\n{}",
            logs.join("aggregator.log").display(),
            tail(&logs.join("aggregator.log"), 20)
        );
    }
    // Trainers exit on their own once the final evaluation is in.
    let t = Instant::now();
    for (name, c) in children.0.iter_mut().skip(1) {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() && !failed_trainers.contains(name) {
                        eprintln!(
                            "warning: {name} exited with {st}; see {}",
                            logs.join(format!("{name}.log")).display()
                        );
                    }
                    break;
                }
                Ok(None) if t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                _ => break,
            }
        }
    }
    let params = match &secure {
        Some(sec) => sec.final_model(&store, args.rounds)?,
        None => {
            caduceus_aggregation::ModelStore::open(&store)?
                .load_round(args.rounds)
                .context("reading the final checkpoint")?
                .params
        }
    };
    let model = Model::from_flat(arch, args.task.num_classes(), &params)?;
    finish(args, prepared, &model, &mut rounds, started)
}

/// `--secure-aggregation tfhe`: file-based key handoff to the hospitals, and the hospital-side
/// decryption of the final model.
mod secure {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use anyhow::{Context, bail};

    use super::SimulateArgs;

    /// Clip bound of encrypted update values (the trainers' and aggregator's default).
    const CLIP: f32 = 1.0;

    pub(super) struct Secure {
        keys: Vec<(String, PathBuf)>,
        min_contributors: usize,
    }

    /// Generates the study key and writes one copy into each hospital's work directory (mode 0600);
    /// the aggregator gets only the public fingerprint.
    pub(super) fn setup(
        args: &SimulateArgs,
        work: &Path,
        names: &[String],
        agg: &mut Command,
    ) -> anyhow::Result<Secure> {
        let key = caduceus_secagg::StudyKey::generate(&args.study_id).context("generating the study key")?;
        let mut keys = Vec::new();
        for name in names {
            let dir = work.join("state").join(name);
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("study.key");
            key.save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            keys.push((name.clone(), path));
        }
        agg.arg("--secure-aggregation")
            .arg("tfhe")
            .arg("--key-fingerprint")
            .arg(key.fingerprint().to_string())
            .arg("--secagg-clip")
            .arg(CLIP.to_string());
        let quorum = args.quorum_min.map_or(names.len(), |q| q as usize);
        println!(
            "secure aggregation (tfhe): study key {} written to the {} hospitals' work directories only",
            key.fingerprint(),
            names.len()
        );
        Ok(Secure {
            keys,
            min_contributors: quorum.clamp(1, 2),
        })
    }

    impl Secure {
        pub(super) fn trainer_args(&self, t: &mut Command, hospital: &str) {
            if let Some((_, path)) = self.keys.iter().find(|(n, _)| n == hospital) {
                t.arg("--secure-aggregation")
                    .arg("tfhe")
                    .arg("--study-key")
                    .arg(path)
                    .arg("--secagg-clip")
                    .arg(CLIP.to_string())
                    .arg("--secagg-min-contributors")
                    .arg(self.min_contributors.to_string());
            }
        }

        /// Acting as the first hospital (its key file): decrypts the final model from the model store.
        pub(super) fn final_model(&self, store: &Path, rounds: u32) -> anyhow::Result<Vec<f32>> {
            let (_, key) = self.keys.first().context("no hospital key")?;
            let t = std::time::Instant::now();
            let (round, params) =
                caduceus_trainer::secure::model_from_store(store, key, CLIP, self.min_contributors)
                    .context("decrypting the final model on the hospital side")?;
            if round != rounds {
                bail!("the model store ends at round {round}, not {rounds}");
            }
            println!(
                "final model rebuilt on the hospital side from {rounds} encrypted aggregates in {:.2} s",
                t.elapsed().as_secs_f64()
            );
            Ok(params)
        }
    }
}
