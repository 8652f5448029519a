//! Aggregator settings: every one can come from a flag or an environment variable, and files (TLS
//! material, the hospital list, an initial model) are read from mounted paths, so the operator can run the
//! binary unchanged as a Kubernetes Job.
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use caduceus_aggregation::Strategy;
use caduceus_fairness::FairnessMetric;
use caduceus_models::Arch;
use clap::{ArgAction, Parser, ValueEnum};

/// Aggregation strategy names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyName {
    Fedavg,
    Fedprox,
    Scaffold,
    Fairfed,
}

/// Fairness metric FairFed balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FairnessMetricName {
    /// Equalized-odds difference.
    Eod,
    /// Demographic-parity difference.
    Dpd,
}

/// Secure aggregation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecureAggregationName {
    /// Plaintext updates (the aggregator sees every hospital's delta).
    None,
    /// TFHE (GLWE) additive encryption: the aggregator sums ciphertexts and never sees a delta.
    Tfhe,
}

/// Default per-coordinate clip bound of encrypted update values (must match the trainers').
pub const DEFAULT_SECAGG_CLIP: f32 = 1.0;

/// The public secure-aggregation parameters of a study: clip bound `clip`, default sum bounds.
pub fn secagg_params(clip: f32) -> anyhow::Result<caduceus_secagg::SecAggParams> {
    caduceus_secagg::SecAggParams::new(clip, caduceus_secagg::SumBounds::default())
        .map_err(|e| anyhow::anyhow!("secure-aggregation parameters: {e}"))
}

/// Parses a 32-hex-digit key fingerprint.
pub fn parse_fingerprint(hex_str: &str) -> anyhow::Result<caduceus_secagg::Fingerprint> {
    let bytes = hex::decode(hex_str.trim()).map_err(|e| anyhow::anyhow!("not hex: {e}"))?;
    let arr: [u8; 16] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| anyhow::anyhow!("{} bytes, expected 16 (32 hex digits)", b.len()))?;
    Ok(caduceus_secagg::Fingerprint(arr))
}

/// Validated secure-aggregation settings of the aggregator: public values only (it has no key).
#[derive(Debug, Clone)]
pub struct SecAggConfig {
    pub params: caduceus_secagg::SecAggParams,
    pub key_fingerprint: caduceus_secagg::Fingerprint,
}

/// Serves the rounds of one federated study over gRPC with mutual TLS, aggregates the hospitals'
/// updates and checkpoints the global model after every round.
#[derive(Parser, Debug, Clone)]
#[command(name = "caduceus-aggregator", version, about)]
pub struct AggregatorArgs {
    /// Study identifier; updates for another study are refused.
    #[arg(long, env = "CADUCEUS_STUDY_ID")]
    pub study_id: String,
    /// Number of training rounds.
    #[arg(long, env = "CADUCEUS_ROUNDS")]
    pub rounds: u32,
    /// Server-side aggregation rule.
    #[arg(long, env = "CADUCEUS_STRATEGY", value_enum, default_value = "fedavg")]
    pub strategy: StrategyName,
    /// FedProx proximal coefficient mu (sent to trainers).
    #[arg(long, env = "CADUCEUS_FEDPROX_MU", default_value_t = 0.01)]
    pub fedprox_mu: f32,
    /// SCAFFOLD server learning rate eta_g.
    #[arg(long, env = "CADUCEUS_SCAFFOLD_SERVER_LR", default_value_t = 1.0)]
    pub scaffold_server_lr: f32,
    /// FairFed beta (0 = FedAvg).
    #[arg(long, env = "CADUCEUS_FAIRFED_BETA", default_value_t = 1.0)]
    pub fairfed_beta: f32,
    /// Sensitive attribute FairFed balances.
    #[arg(long, env = "CADUCEUS_FAIRFED_ATTRIBUTE", default_value = "race")]
    pub fairfed_attribute: String,
    /// Fairness metric FairFed balances.
    #[arg(long, env = "CADUCEUS_FAIRFED_METRIC", value_enum, default_value = "eod")]
    pub fairfed_metric: FairnessMetricName,
    /// Groups smaller than this are "too little data" in fairness metrics.
    #[arg(long, env = "CADUCEUS_MIN_GROUP_SIZE", default_value_t = caduceus_fairness::DEFAULT_MIN_GROUP_SIZE)]
    pub min_group_size: u64,
    /// Expected hospitals (comma separated); only certificates naming one of them are admitted.
    #[arg(long, env = "CADUCEUS_HOSPITALS", value_delimiter = ',')]
    pub hospitals: Vec<String>,
    /// A file listing expected hospitals, one per line (added to --hospitals).
    #[arg(long, env = "CADUCEUS_HOSPITALS_FILE")]
    pub hospitals_file: Option<PathBuf>,
    /// Close a round at its deadline once this many updates are in (default: all hospitals).
    #[arg(long, env = "CADUCEUS_QUORUM_MIN")]
    pub quorum_min: Option<u32>,
    /// Close a round as soon as this many updates are in (default: all hospitals).
    #[arg(long, env = "CADUCEUS_QUORUM_MAX")]
    pub quorum_max: Option<u32>,
    /// Hospitals that leave after a given round, `hospital=round,...` (e.g. when their next round
    /// would exceed their privacy budget): later rounds close without waiting for them (the quorums
    /// shrink to the hospitals still taking part).
    #[arg(long, env = "CADUCEUS_HOSPITAL_LAST_ROUND", value_delimiter = ',')]
    pub hospital_last_round: Vec<String>,
    /// Per-round deadline in seconds, counted from the moment the round opens.
    #[arg(long, env = "CADUCEUS_ROUND_DEADLINE_SECS", default_value_t = 600)]
    pub round_deadline_secs: u64,
    /// Cut off an update upload (DEADLINE_EXCEEDED) that sends no message for this many seconds.
    #[arg(long, env = "CADUCEUS_UPLOAD_IDLE_TIMEOUT_SECS", default_value_t = 60)]
    pub upload_idle_timeout_secs: u64,
    /// Cut off an update upload (DEADLINE_EXCEEDED) that takes longer than this many seconds in all.
    #[arg(long, env = "CADUCEUS_UPLOAD_TIMEOUT_SECS", default_value_t = 600)]
    pub upload_timeout_secs: u64,
    /// PEM server certificate (its SANs must include the name trainers dial).
    #[arg(long, env = "CADUCEUS_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM server private key.
    #[arg(long, env = "CADUCEUS_TLS_KEY")]
    pub tls_key: PathBuf,
    /// PEM study CA certificate; client certificates must chain to it.
    #[arg(long, env = "CADUCEUS_TLS_CA")]
    pub tls_ca: PathBuf,
    /// Model store directory: checkpoints, manifest and round records.
    #[arg(long, env = "CADUCEUS_MODEL_STORE")]
    pub model_store: PathBuf,
    /// Listen address. The default binds all interfaces so Kubernetes probes reach it; use
    /// 127.0.0.1:0 on one machine (the chosen port goes to --port-file).
    #[arg(long, env = "CADUCEUS_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Write the bound port here once listening (useful with port 0).
    #[arg(long, env = "CADUCEUS_PORT_FILE")]
    pub port_file: Option<PathBuf>,
    /// Model architecture (small-cnn, resnet8, mobilenet).
    #[arg(long, env = "CADUCEUS_ARCH", default_value = "small-cnn")]
    pub arch: String,
    /// Number of classes of the task (2 for gender).
    #[arg(long, env = "CADUCEUS_NUM_CLASSES", default_value_t = 2)]
    pub num_classes: usize,
    /// Seed of the initial model's weights.
    #[arg(long, env = "CADUCEUS_INIT_SEED", default_value_t = 0)]
    pub init_seed: u64,
    /// Start from this safetensors model instead of a seeded initialisation.
    #[arg(long, env = "CADUCEUS_INITIAL_MODEL")]
    pub initial_model: Option<PathBuf>,
    /// Write a one-line JSON summary here on exit (success or failure).
    #[arg(long, env = "CADUCEUS_SUMMARY_PATH")]
    pub summary_path: Option<PathBuf>,
    /// Write a compact JSON result of the last round here on exit (at most 4 KiB: its status, the
    /// hospitals aggregated, accuracy, loss and per-attribute fairness gaps). Pointed at the
    /// container's termination-message path, it is how the operator learns a round's outcome.
    #[arg(long, env = "CADUCEUS_RESULT_FILE")]
    pub result_file: Option<PathBuf>,
    /// After the last training round, let hospitals evaluate the final model (an evaluation-only round).
    #[arg(long, env = "CADUCEUS_FINAL_EVALUATION", default_value_t = true, action = ArgAction::Set)]
    pub final_evaluation: bool,
    /// Seconds to keep answering status calls after the study ends, so trainers learn the outcome.
    #[arg(long, env = "CADUCEUS_LINGER_SECS", default_value_t = 2)]
    pub linger_secs: u64,
    /// Secure aggregation: with `tfhe` hospitals send encrypted deltas, the aggregator sums them
    /// without decrypting and serves the encrypted aggregate (FedAvg, FedProx, FairFed). There is no
    /// key option: the aggregator never holds the study key.
    #[arg(long, env = "CADUCEUS_SECURE_AGGREGATION", value_enum, default_value = "none")]
    pub secure_aggregation: SecureAggregationName,
    /// Public fingerprint (32 hex digits) of the study key; ciphertexts under any other key are refused.
    #[arg(long, env = "CADUCEUS_KEY_FINGERPRINT")]
    pub key_fingerprint: Option<String>,
    /// Per-coordinate clip bound of encrypted update values (must match the trainers').
    #[arg(long, env = "CADUCEUS_SECAGG_CLIP", default_value_t = DEFAULT_SECAGG_CLIP)]
    pub secagg_clip: f32,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct StudyConfig {
    pub study_id: String,
    pub rounds: u32,
    pub strategy: Strategy,
    pub fairfed_attribute: String,
    pub fairfed_metric: FairnessMetric,
    pub min_group_size: u64,
    pub hospitals: BTreeSet<String>,
    pub quorum_min: u32,
    pub quorum_max: u32,
    /// Last round of hospitals that leave early (see `--hospital-last-round`).
    pub last_rounds: std::collections::BTreeMap<String, u32>,
    pub round_deadline: Duration,
    /// An upload that sends nothing for this long is cut off.
    pub upload_idle_timeout: Duration,
    /// An upload that lasts longer than this is cut off.
    pub upload_timeout: Duration,
    pub arch: Arch,
    pub num_classes: usize,
    pub init_seed: u64,
    pub initial_model: Option<PathBuf>,
    pub model_store: PathBuf,
    pub final_evaluation: bool,
    /// Secure aggregation (public parameters and key fingerprint), when on.
    pub secagg: Option<SecAggConfig>,
}

impl AggregatorArgs {
    /// Checks the settings and names the one that is wrong.
    pub fn validate(&self) -> anyhow::Result<StudyConfig> {
        caduceus_pki::validate_study_id(&self.study_id).context("--study-id")?;
        if self.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        let strategy = match self.strategy {
            StrategyName::Fedavg => Strategy::FedAvg,
            StrategyName::Fedprox => Strategy::FedProx { mu: self.fedprox_mu },
            StrategyName::Scaffold => Strategy::Scaffold {
                server_lr: self.scaffold_server_lr,
            },
            StrategyName::Fairfed => Strategy::FairFed {
                beta: self.fairfed_beta,
            },
        };
        strategy.validate().context("--strategy parameters")?;
        let mut hospitals: BTreeSet<String> = BTreeSet::new();
        for h in &self.hospitals {
            let h = h.trim();
            if !h.is_empty() {
                hospitals.insert(h.to_string());
            }
        }
        if let Some(path) = &self.hospitals_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--hospitals-file {}", path.display()))?;
            for line in text.lines() {
                let h = line.trim();
                if !h.is_empty() && !h.starts_with('#') {
                    hospitals.insert(h.to_string());
                }
            }
        }
        if hospitals.is_empty() {
            bail!("no expected hospitals: give --hospitals or --hospitals-file");
        }
        for h in &hospitals {
            caduceus_pki::validate_hospital_name(h).context("--hospitals")?;
        }
        let n = hospitals.len() as u32;
        let quorum_max = self.quorum_max.unwrap_or(n);
        let quorum_min = self.quorum_min.unwrap_or(quorum_max);
        if quorum_max == 0 || quorum_max > n {
            bail!("--quorum-max must be between 1 and the number of hospitals ({n}), got {quorum_max}");
        }
        if quorum_min == 0 || quorum_min > quorum_max {
            bail!("--quorum-min must be between 1 and --quorum-max ({quorum_max}), got {quorum_min}");
        }
        let mut last_rounds = std::collections::BTreeMap::new();
        for item in &self.hospital_last_round {
            let Some((h, r)) = item.split_once('=') else {
                bail!("--hospital-last-round: expected hospital=round, got {item:?}");
            };
            let (h, r) = (h.trim(), r.trim());
            if !hospitals.contains(h) {
                bail!("--hospital-last-round: {h} is not an expected hospital");
            }
            let r: u32 = r
                .parse()
                .map_err(|_| anyhow::anyhow!("--hospital-last-round: {r:?} is not a round number"))?;
            last_rounds.insert(h.to_string(), r);
        }
        if self.round_deadline_secs == 0 {
            bail!("--round-deadline-secs must be positive");
        }
        if self.upload_idle_timeout_secs == 0 {
            bail!("--upload-idle-timeout-secs must be positive");
        }
        if self.upload_timeout_secs == 0 {
            bail!("--upload-timeout-secs must be positive");
        }
        let arch: Arch = self
            .arch
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--arch: {e}"))?;
        if self.num_classes < 2 {
            bail!("--num-classes must be at least 2");
        }
        if let Some(p) = &self.initial_model
            && !p.is_file()
        {
            bail!("--initial-model {} does not exist", p.display());
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
        let secagg = match self.secure_aggregation {
            SecureAggregationName::None => {
                if self.key_fingerprint.is_some() {
                    bail!("--key-fingerprint is only used with --secure-aggregation tfhe");
                }
                None
            }
            SecureAggregationName::Tfhe => {
                if matches!(strategy, Strategy::Scaffold { .. }) {
                    bail!(
                        "--secure-aggregation tfhe supports --strategy fedavg, fedprox and fairfed, not scaffold: \
                         SCAFFOLD's server control variate is a second aggregate that every hospital would \
                         have to decrypt and track; run SCAFFOLD without secure aggregation"
                    );
                }
                let fp = self.key_fingerprint.as_deref().ok_or_else(|| {
                    anyhow::anyhow!(
                        "--secure-aggregation tfhe needs --key-fingerprint (the study key's public fingerprint)"
                    )
                })?;
                let key_fingerprint = parse_fingerprint(fp).context("--key-fingerprint")?;
                let params = secagg_params(self.secagg_clip).context("--secagg-clip")?;
                if hospitals.len() as u32 > params.bounds().max_hospitals {
                    bail!(
                        "secure aggregation supports at most {} hospitals",
                        params.bounds().max_hospitals
                    );
                }
                Some(SecAggConfig {
                    params,
                    key_fingerprint,
                })
            }
        };
        Ok(StudyConfig {
            secagg,
            study_id: self.study_id.clone(),
            rounds: self.rounds,
            strategy,
            fairfed_attribute: self.fairfed_attribute.clone(),
            fairfed_metric: match self.fairfed_metric {
                FairnessMetricName::Eod => FairnessMetric::EqualizedOdds,
                FairnessMetricName::Dpd => FairnessMetric::DemographicParity,
            },
            min_group_size: self.min_group_size,
            hospitals,
            quorum_min,
            quorum_max,
            last_rounds,
            round_deadline: Duration::from_secs(self.round_deadline_secs),
            upload_idle_timeout: Duration::from_secs(self.upload_idle_timeout_secs),
            upload_timeout: Duration::from_secs(self.upload_timeout_secs),
            arch,
            num_classes: self.num_classes,
            init_seed: self.init_seed,
            initial_model: self.initial_model.clone(),
            model_store: self.model_store.clone(),
            final_evaluation: self.final_evaluation,
        })
    }
}

impl StudyConfig {
    /// Hospitals still taking part in `round` (those without a last round before it).
    pub fn active_hospitals(&self, round: u32) -> u32 {
        self.hospitals
            .iter()
            .filter(|h| self.last_rounds.get(*h).is_none_or(|&last| last >= round))
            .count() as u32
    }

    /// (quorum_min, quorum_max) of `round`: the configured quorums, capped by the hospitals still
    /// taking part (at least 1).
    pub fn quorums(&self, round: u32) -> (u32, u32) {
        let active = self.active_hospitals(round).max(1);
        let max = self.quorum_max.min(active);
        (self.quorum_min.min(max), max)
    }
}
