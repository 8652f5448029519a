//! Trainer settings: flags or environment variables, and mounted files (TLS material, the shard).
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, bail};
use caduceus_dataset::Attribute;
use caduceus_models::Optimizer;
use clap::{ArgAction, Parser, ValueEnum};

/// Which rounds to take part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundSpec {
    /// From the round that is open now until the study ends (including the final evaluation).
    Follow,
    /// Rounds `first..=last` (the final-evaluation round counts as round R).
    Range(u32, u32),
}

impl FromStr for RoundSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("follow") || s.eq_ignore_ascii_case("all") {
            return Ok(RoundSpec::Follow);
        }
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("--rounds: {t:?} is not a round number"))
        };
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("--rounds {s}: the first round is after the last"));
                }
                Ok(RoundSpec::Range(a, b))
            }
            None => {
                let r = num(s)?;
                Ok(RoundSpec::Range(r, r))
            }
        }
    }
}

/// Local optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

/// Secure aggregation mode (must match the aggregator's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecureAggregationMode {
    /// Plaintext deltas.
    None,
    /// Encrypt every delta under the study key (TFHE/GLWE); decrypt the aggregates the aggregator serves.
    Tfhe,
}

/// Trains on one hospital's data and sends only model updates and aggregate evaluation counts to the
/// study's aggregator.
#[derive(Parser, Debug, Clone)]
#[command(name = "caduceus-trainer", version, about)]
pub struct TrainerArgs {
    /// This hospital's name (must match its client certificate).
    #[arg(long, env = "CADUCEUS_HOSPITAL")]
    pub hospital: String,
    /// Study identifier.
    #[arg(long, env = "CADUCEUS_STUDY_ID")]
    pub study_id: String,
    /// Shard directory holding `train/` and `val/` manifests (as `caduceus data split` writes them).
    #[arg(long, env = "CADUCEUS_SHARD")]
    pub shard: PathBuf,
    /// Where the images are, overriding the manifests' image root (for a data volume mounted elsewhere).
    #[arg(long, env = "CADUCEUS_IMAGE_ROOT")]
    pub image_root: Option<PathBuf>,
    /// Aggregator address, `host:port`.
    #[arg(long, env = "CADUCEUS_AGGREGATOR")]
    pub aggregator: String,
    /// Name to verify in the aggregator's certificate (default: the host part of --aggregator).
    #[arg(long, env = "CADUCEUS_SERVER_NAME")]
    pub server_name: Option<String>,
    /// PEM client certificate of this hospital.
    #[arg(long, env = "CADUCEUS_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of this hospital.
    #[arg(long, env = "CADUCEUS_TLS_KEY")]
    pub tls_key: PathBuf,
    /// PEM study CA certificate.
    #[arg(long, env = "CADUCEUS_TLS_CA")]
    pub tls_ca: PathBuf,
    /// Rounds to take part in: `follow` (until the study ends), `N`, or `A-B`.
    #[arg(long, env = "CADUCEUS_ROUNDS", default_value = "follow")]
    pub rounds: RoundSpec,
    /// Prediction task.
    #[arg(long, env = "CADUCEUS_TASK", default_value = "gender")]
    pub task: Attribute,
    /// Sensitive attributes whose group counts are reported (comma separated).
    #[arg(
        long,
        env = "CADUCEUS_SENSITIVE",
        value_delimiter = ',',
        default_value = "race,age-group"
    )]
    pub sensitive: Vec<Attribute>,
    /// Class counted as positive in the fairness confusion counts.
    #[arg(long, env = "CADUCEUS_POSITIVE_CLASS", default_value_t = 1)]
    pub positive_class: u32,
    /// Local epochs per round.
    #[arg(long, env = "CADUCEUS_LOCAL_EPOCHS", default_value_t = 1)]
    pub epochs: usize,
    /// Cap on local optimiser steps per round (with --epochs 0: exactly this many).
    #[arg(long = "local-steps", alias = "max-steps", env = "CADUCEUS_LOCAL_STEPS")]
    pub max_steps: Option<usize>,
    /// Batch size.
    #[arg(long, env = "CADUCEUS_BATCH_SIZE", default_value_t = 64)]
    pub batch_size: usize,
    /// Learning rate.
    #[arg(long, env = "CADUCEUS_LR", default_value_t = 1e-3)]
    pub lr: f32,
    /// Local optimiser (SCAFFOLD's control-variate formula assumes plain SGD).
    #[arg(long, env = "CADUCEUS_OPTIMIZER", value_enum, default_value = "adamw")]
    pub optimizer: OptimizerName,
    /// SGD momentum.
    #[arg(long, env = "CADUCEUS_MOMENTUM", default_value_t = 0.0)]
    pub momentum: f32,
    /// Random horizontal flips during local training.
    #[arg(long, env = "CADUCEUS_AUGMENT", default_value_t = true, action = ArgAction::Set)]
    pub augment: bool,
    /// Seed of local shuffling and augmentation (mixed with the round number).
    #[arg(long, env = "CADUCEUS_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Batch size of evaluation.
    #[arg(long, env = "CADUCEUS_EVAL_BATCH_SIZE", default_value_t = 256)]
    pub eval_batch_size: usize,
    /// Directory for state kept between rounds and restarts (SCAFFOLD's local control variate).
    #[arg(long, env = "CADUCEUS_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Keep retrying for this long while the aggregator is unreachable (it may be restarting).
    #[arg(long, env = "CADUCEUS_RETRY_SECS", default_value_t = 120)]
    pub retry_secs: u64,
    /// Write a one-line JSON summary here on exit (success or failure).
    #[arg(long, env = "CADUCEUS_SUMMARY_PATH")]
    pub summary_path: Option<PathBuf>,
    /// Image decoding threads (0 = all cores).
    #[arg(long, env = "CADUCEUS_LOADER_THREADS", default_value_t = 0)]
    pub loader_threads: usize,
    /// DP-SGD and the privacy budget.
    #[command(flatten)]
    pub dp: crate::dp::DpArgs,
    /// Secure aggregation: with `tfhe` the delta leaves the hospital only encrypted under the study key,
    /// and the hospital decrypts each round's aggregate itself (needs --study-key).
    #[arg(long, env = "CADUCEUS_SECURE_AGGREGATION", value_enum, default_value = "none")]
    pub secure_aggregation: SecureAggregationMode,
    /// The study key file (hospitals only; mode 0600). Never sent anywhere.
    #[arg(long, env = "CADUCEUS_STUDY_KEY")]
    pub study_key: Option<PathBuf>,
    /// Per-coordinate clip bound of encrypted update values (must match the aggregator's).
    #[arg(long, env = "CADUCEUS_SECAGG_CLIP", default_value_t = 1.0)]
    pub secagg_clip: f32,
    /// Refuse to decrypt an aggregate with fewer contributors than this (an aggregator could otherwise
    /// have a single hospital's update decrypted).
    #[arg(long, env = "CADUCEUS_SECAGG_MIN_CONTRIBUTORS", default_value_t = 2)]
    pub secagg_min_contributors: usize,
}

impl TrainerArgs {
    /// Checks the settings, naming the one that is wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        caduceus_pki::validate_hospital_name(&self.hospital).context("--hospital")?;
        caduceus_pki::validate_study_id(&self.study_id).context("--study-id")?;
        if self.batch_size == 0 {
            bail!("--batch-size must be positive");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            bail!("--epochs is 0 and no --local-steps given: nothing to train");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if self.positive_class as usize >= self.task.num_classes() {
            bail!(
                "--positive-class {} is not a class of task {} ({} classes)",
                self.positive_class,
                self.task,
                self.task.num_classes()
            );
        }
        if self.sensitive.contains(&self.task) {
            bail!(
                "--sensitive includes the task attribute {}; group metrics over the label itself are meaningless",
                self.task
            );
        }
        self.dp.validate()?;
        if !self.shard.is_dir() {
            bail!("--shard {} is not a directory", self.shard.display());
        }
        for (flag, p) in [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ] {
            if !p.is_file() {
                bail!("{flag} {} does not exist or is not a file", p.display());
            }
        }
        match (self.secure_aggregation, &self.study_key) {
            (SecureAggregationMode::Tfhe, None) => {
                bail!("--secure-aggregation tfhe needs --study-key (the study key file)")
            }
            (SecureAggregationMode::Tfhe, Some(p)) if !p.is_file() => {
                bail!("--study-key {} does not exist or is not a file", p.display())
            }
            (SecureAggregationMode::None, Some(_)) => {
                bail!("--study-key is only used with --secure-aggregation tfhe")
            }
            _ => {}
        }
        if self.secure_aggregation == SecureAggregationMode::Tfhe && self.secagg_min_contributors == 0 {
            bail!("--secagg-min-contributors must be at least 1");
        }
        Ok(())
    }

    /// The local optimiser.
    pub fn optimizer(&self) -> Optimizer {
        match self.optimizer {
            OptimizerName::Adamw => Optimizer::adamw(self.lr),
            OptimizerName::Sgd => Optimizer::sgd(self.lr, self.momentum),
        }
    }

    /// The TLS server name to verify.
    pub fn server_name(&self) -> String {
        if let Some(n) = &self.server_name {
            return n.clone();
        }
        let a = self
            .aggregator
            .trim_start_matches("https://")
            .trim_end_matches('/');
        if let Some(rest) = a.strip_prefix('[') {
            // [ipv6]:port
            return rest.split(']').next().unwrap_or(rest).to_string();
        }
        a.rsplit_once(':').map_or(a, |(h, _)| h).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_specs() {
        assert_eq!("follow".parse::<RoundSpec>().unwrap(), RoundSpec::Follow);
        assert_eq!("3".parse::<RoundSpec>().unwrap(), RoundSpec::Range(3, 3));
        assert_eq!("0-4".parse::<RoundSpec>().unwrap(), RoundSpec::Range(0, 4));
        assert!("4-1".parse::<RoundSpec>().is_err());
        assert!("x".parse::<RoundSpec>().unwrap_err().contains("--rounds"));
    }

    #[test]
    fn server_name_from_address() {
        let mut a = TrainerArgs::parse_from([
            "t",
            "--hospital",
            "h",
            "--study-id",
            "s",
            "--shard",
            "/x",
            "--aggregator",
            "localhost:50051",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "a",
        ]);
        assert_eq!(a.server_name(), "localhost");
        a.aggregator = "https://agg.study.svc:443".into();
        assert_eq!(a.server_name(), "agg.study.svc");
        a.aggregator = "[::1]:9".into();
        assert_eq!(a.server_name(), "::1");
        a.server_name = Some("other".into());
        assert_eq!(a.server_name(), "other");
    }
}
