//! The command-line arguments of `caduceus simulate` (clap), with their checks.
use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::bail;
use caduceus_dataset::{Attribute, SchemeKind};
use caduceus_models::{Arch, Optimizer};
use caduceus_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER;
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
    pub(super) fn name(self) -> &'static str {
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
    pub(super) fn name(self) -> &'static str {
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

impl OptimizerArg {
    pub(super) fn name(self) -> &'static str {
        match self {
            OptimizerArg::Adamw => "adamw",
            OptimizerArg::Sgd => "sgd",
        }
    }
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
    pub dp: DpSimArgs,
    /// Secure aggregation: `tfhe` generates the study key into the hospitals' work directories only,
    /// runs the study on encrypted updates (FedAvg, FedProx, FairFed), and decrypts the final model on
    /// the hospital side before the test evaluation.
    #[arg(long, value_enum, default_value = "none")]
    pub secure_aggregation: SecureAggregationArg,
}

impl SimulateArgs {
    pub(super) fn steps_cap(&self) -> Option<usize> {
        (self.local_steps > 0).then_some(self.local_steps)
    }
}

/// The local optimiser the options choose.
pub(super) fn optimizer(args: &SimulateArgs) -> Optimizer {
    match args.optimizer {
        OptimizerArg::Adamw => Optimizer::adamw(args.lr),
        OptimizerArg::Sgd => Optimizer::sgd(args.lr, args.momentum),
    }
}

/// Checks the options before any work, and returns the model architecture they name.
pub(super) fn validate(args: &SimulateArgs) -> anyhow::Result<Arch> {
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

/// DP options of `caduceus simulate`.
#[derive(Args, Debug, Clone)]
pub struct DpSimArgs {
    /// Train with DP-SGD at this noise multiplier σ.
    #[arg(long)]
    pub dp_noise_multiplier: Option<f64>,
    /// DP-SGD per-example clip norm C.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip_norm: f64,
    /// Train with DP-SGD, each hospital's σ chosen so that its whole schedule (all rounds, its
    /// own sample rate and steps) reaches this ε at --dp-delta: the smallest σ that keeps it
    /// within, so that no hospital adds more noise than its guarantee needs.
    #[arg(long, conflicts_with = "dp_noise_multiplier")]
    pub dp_target_epsilon: Option<f64>,
    /// δ of the privacy guarantee, the budgets and the reported ε.
    #[arg(long, default_value_t = 1e-5)]
    pub dp_delta: f64,
    /// Privacy budget ε of every hospital.
    #[arg(long)]
    pub epsilon_budget: Option<f64>,
    /// Privacy budgets of single hospitals, `hospital-0=E,...` (override --epsilon-budget).
    #[arg(long, value_delimiter = ',')]
    pub hospital_budget: Vec<String>,
    /// Noise multiplier z of the evaluation counts the hospitals send every round under DP (noise
    /// standard deviation z·√tables per count; each round's release costs a Gaussian mechanism at
    /// z). The default 10 costs ε = 0.34 per release on its own at δ = 1e-5 and shifts the DP-SGD
    /// σ of the ε = 8 demo by about 1%, with per-count noise of standard deviation 20 (4 tables);
    /// see docs/privacy.md, "Evaluation counts under DP".
    #[arg(long, default_value_t = DEFAULT_NOISE_MULTIPLIER)]
    pub dp_eval_noise_multiplier: f64,
}

impl DpSimArgs {
    pub fn enabled(&self) -> bool {
        self.dp_noise_multiplier.is_some() || self.dp_target_epsilon.is_some()
    }

    /// Checks the values, naming the option that is wrong.
    pub fn validate(&self, hospitals: usize) -> anyhow::Result<BTreeMap<String, f64>> {
        let positive = |flag: &str, v: f64| -> anyhow::Result<()> {
            if !(v.is_finite() && v > 0.0) {
                bail!("{flag} must be a positive number, got {v}");
            }
            Ok(())
        };
        if let Some(s) = self.dp_noise_multiplier {
            positive("--dp-noise-multiplier", s)?;
        }
        if let Some(e) = self.dp_target_epsilon {
            positive("--dp-target-epsilon", e)?;
        }
        positive("--dp-clip-norm", self.dp_clip_norm)?;
        positive("--dp-eval-noise-multiplier", self.dp_eval_noise_multiplier)?;
        if !(self.dp_delta > 0.0 && self.dp_delta < 1.0) {
            bail!("--dp-delta must be in (0, 1), got {}", self.dp_delta);
        }
        let mut budgets = BTreeMap::new();
        if let Some(e) = self.epsilon_budget {
            positive("--epsilon-budget", e)?;
            for i in 0..hospitals {
                budgets.insert(format!("hospital-{i}"), e);
            }
        }
        for item in &self.hospital_budget {
            let Some((h, e)) = item.split_once('=') else {
                bail!("--hospital-budget: expected hospital-N=EPSILON, got {item:?}");
            };
            let h = h.trim();
            let valid = h
                .strip_prefix("hospital-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n < hospitals);
            if !valid {
                bail!(
                    "--hospital-budget: {h} is not one of hospital-0..hospital-{}",
                    hospitals - 1
                );
            }
            let e: f64 = e
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--hospital-budget {h}: {e:?} is not a number"))?;
            positive("--hospital-budget", e)?;
            budgets.insert(h.to_string(), e);
        }
        if !self.enabled() && !budgets.is_empty() {
            bail!("--epsilon-budget and --hospital-budget need --dp-noise-multiplier or --dp-target-epsilon");
        }
        Ok(budgets)
    }
}
