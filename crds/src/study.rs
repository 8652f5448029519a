//! `FederatedStudy`: one federated training run across hospitals, in the coordinator's namespace.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A federated study: which model to train on which task, how rounds run, how updates are combined,
/// and the privacy, secure-aggregation and fairness rules every round obeys.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fl.caduceus.dev",
    version = "v1alpha1",
    kind = "FederatedStudy",
    plural = "federatedstudies",
    singular = "federatedstudy",
    namespaced,
    status = "FederatedStudyStatus",
    shortname = "study",
    shortname = "studies",
    shortname = "fs",
    category = "caduceus",
    doc = "A federated training study across hospitals.",
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.aggregation.strategy"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.currentRound"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".spec.rounds.total"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Accuracy", type_ = "number", json_path = ".status.accuracy"),
    printcolumn(name = "EOD", type_ = "number", json_path = ".status.equalizedOddsDifference"),
    printcolumn(
        name = "Admitted",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"HospitalsAdmitted\")].reason"
    ),
    printcolumn(
        name = "Fairness",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"FairnessDegraded\")].reason"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40")
        .message("metadata.name of a FederatedStudy must be at most 40 characters: Job and Secret names are derived from it")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.aggregation.strategy != 'FairFed' || (has(self.task.sensitiveAttributes) && size(self.task.sensitiveAttributes) > 0)")
        .message("task.sensitiveAttributes must name at least one attribute when aggregation.strategy is FairFed")
        .field_path(".task.sensitiveAttributes"),
    validation = Rule::new("!(self.secureAggregation.mode == 'Tfhe' && self.aggregation.strategy in ['TrimmedMean', 'Median', 'SCAFFOLD'])")
        .message("secureAggregation.mode Tfhe cannot be combined with aggregation.strategy TrimmedMean, Median or SCAFFOLD: TrimmedMean and Median must read individual updates, and SCAFFOLD's control variates are not encrypted")
        .field_path(".secureAggregation.mode")
)]
pub struct FederatedStudySpec {
    /// The network to train.
    pub model: ModelSpec,
    /// What to predict and which sensitive attributes to audit.
    pub task: TaskSpec,
    /// How many rounds, with how many hospitals, within which deadline.
    pub rounds: RoundsSpec,
    /// Local training in each hospital per round.
    #[serde(default)]
    pub training: LocalTrainingSpec,
    /// How the aggregator combines updates.
    #[serde(default)]
    pub aggregation: AggregationSpec,
    /// Record-level differential privacy (DP-SGD) in every hospital.
    #[serde(default)]
    pub privacy: PrivacySpec,
    /// Whether updates are encrypted so that the aggregator cannot read them.
    #[serde(default)]
    pub secure_aggregation: SecureAggregationSpec,
    /// Fairness thresholds that decide each round's `FairnessWithinThreshold` condition.
    #[serde(default)]
    pub fairness: FairnessSpec,
    /// Which HospitalClients (in any namespace) this study may use. They must also consent to it.
    pub hospital_selector: LabelSelector,
    /// Where the aggregator keeps global-model checkpoints.
    pub model_store: ModelStoreSpec,
    /// Container images for the study's workloads; the operator's defaults apply when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<ImagesSpec>,
    /// Stops scheduling new rounds while true; a running round finishes.
    #[serde(default)]
    pub suspend: bool,
}

/// The network architecture and its input.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Architecture name.
    pub architecture: Architecture,
    /// Side length in pixels of the square RGB input images.
    #[serde(default = "default_input_size")]
    #[schemars(range(min = 16, max = 512))]
    pub input_size: u32,
}

fn default_input_size() -> u32 {
    64
}

/// Architectures the trainer offers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    #[serde(rename = "small-cnn")]
    SmallCnn,
    #[serde(rename = "resnet8")]
    Resnet8,
    #[serde(rename = "mobilenet")]
    Mobilenet,
}

/// The prediction task and the fairness audit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// The label to predict.
    pub label: TaskLabel,
    /// Attributes whose groups are audited for fairness (metrics per group and per intersection).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(a, self.exists_one(b, b == a))").message("sensitiveAttributes must not repeat an attribute")
    )]
    pub sensitive_attributes: Vec<SensitiveAttribute>,
}

/// Labels a study can predict.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum TaskLabel {
    Gender,
    Race,
    AgeGroup,
}

/// Sensitive attributes that fairness is audited over.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum SensitiveAttribute {
    Race,
    AgeGroup,
    Gender,
}

/// Rounds, quorum and deadline.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.maxHospitals) || self.minHospitals <= self.maxHospitals")
        .message("rounds.minHospitals must not exceed rounds.maxHospitals")
        .field_path(".minHospitals")
)]
pub struct RoundsSpec {
    /// Number of rounds to run.
    #[schemars(range(min = 1, max = 100000))]
    pub total: u32,
    /// Quorum k: a round succeeds once at least this many hospitals sent an update by the deadline.
    #[serde(default = "default_min_hospitals")]
    #[schemars(range(min = 1, max = 10000))]
    pub min_hospitals: u32,
    /// At most this many hospitals take part in one round (n); all eligible hospitals when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_hospitals: Option<u32>,
    /// Seconds a round may run before it closes on quorum or fails.
    #[serde(default = "default_deadline_seconds")]
    #[schemars(range(min = 10, max = 604800))]
    pub deadline_seconds: u32,
    /// How often a round that failed (no quorum) is retried before the study fails.
    #[serde(default = "default_retries")]
    #[schemars(range(min = 0, max = 100))]
    pub max_retries: u32,
}

fn default_min_hospitals() -> u32 {
    2
}
fn default_deadline_seconds() -> u32 {
    1800
}
fn default_retries() -> u32 {
    2
}

/// Local training per round.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.epochs) && has(self.steps))")
        .message("set either training.epochs or training.steps, not both")
        .field_path(".steps"),
    validation = Rule::new("!has(self.momentum) || self.momentum == 0.0 || self.optimizer == 'SGD'")
        .message("training.momentum applies to optimizer SGD only")
        .field_path(".momentum")
)]
pub struct LocalTrainingSpec {
    /// Local epochs per round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: Option<u32>,
    /// Local optimiser steps per round, instead of epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000000))]
    pub steps: Option<u32>,
    /// Batch size (expected batch size under Poisson sampling with DP).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Learning rate.
    #[serde(default = "default_learning_rate")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("learningRate must be in (0, 10]"))]
    pub learning_rate: f64,
    /// Local optimiser. Under DP-SGD, SGD with momentum is usually the better choice
    /// (docs/privacy.md, "Choosing C, the batch and the learning rate").
    #[serde(default)]
    pub optimizer: LocalOptimizer,
    /// Heavy-ball momentum of the SGD optimiser (PyTorch's formulation); 0 is plain SGD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("momentum must be in [0, 1)"))]
    pub momentum: Option<f64>,
}

impl Default for LocalTrainingSpec {
    fn default() -> Self {
        Self {
            epochs: Some(1),
            steps: None,
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            optimizer: LocalOptimizer::default(),
            momentum: None,
        }
    }
}

/// The optimiser of local training.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LocalOptimizer {
    /// AdamW (decoupled weight decay 0.01).
    #[default]
    AdamW,
    /// SGD, with `momentum` if set.
    #[serde(rename = "SGD")]
    Sgd,
}

fn default_batch_size() -> u32 {
    64
}
fn default_learning_rate() -> f64 {
    0.01
}

/// How the aggregator combines hospital updates.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.strategy != 'FedProx' || has(self.mu)")
        .message("aggregation.mu is required when aggregation.strategy is FedProx")
        .field_path(".mu")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.strategy != 'FairFed' || has(self.beta)")
        .message("aggregation.beta is required when aggregation.strategy is FairFed")
        .field_path(".beta")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.strategy == 'TrimmedMean' || !has(self.trimFraction)")
        .message("aggregation.trimFraction only applies to strategy TrimmedMean")
        .field_path(".trimFraction")
)]
pub struct AggregationSpec {
    /// Aggregation rule.
    pub strategy: Strategy,
    /// FedProx proximal coefficient mu (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 100.0").message("mu must be in [0, 100]"))]
    pub mu: Option<f64>,
    /// FairFed fairness budget beta (≥ 0; 0 is FedAvg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 100.0").message("beta must be in [0, 100]"))]
    pub beta: Option<f64>,
    /// Server learning rate (SCAFFOLD's global step size); 1.0 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("serverLearningRate must be in (0, 10]"))]
    pub server_learning_rate: Option<f64>,
    /// Fraction of updates trimmed at each end, per coordinate (TrimmedMean).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 0.5").message("trimFraction must be in [0, 0.5)"))]
    pub trim_fraction: Option<f64>,
}

impl Default for AggregationSpec {
    fn default() -> Self {
        Self {
            strategy: Strategy::FedAvg,
            mu: None,
            beta: None,
            server_learning_rate: None,
            trim_fraction: None,
        }
    }
}

/// Aggregation rules. `TrimmedMean` and `Median` are robust rules that must read individual updates,
/// so they cannot run under secure aggregation.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    FedAvg,
    FedProx,
    #[serde(rename = "SCAFFOLD")]
    Scaffold,
    FairFed,
    TrimmedMean,
    Median,
}

/// Record-level differential privacy with DP-SGD.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.enabled || (has(self.noiseMultiplier) != has(self.targetEpsilon))")
        .message("with privacy.enabled, set exactly one of privacy.noiseMultiplier and privacy.targetEpsilon")
        .field_path(".noiseMultiplier")
)]
pub struct PrivacySpec {
    /// Whether DP-SGD is on.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Noise multiplier sigma: noise standard deviation divided by the clip norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1000.0").message("noiseMultiplier must be in (0, 1000]"))]
    pub noise_multiplier: Option<f64>,
    /// Target epsilon for the whole study per hospital; the operator derives the noise multiplier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1000.0").message("targetEpsilon must be in (0, 1000]"))]
    pub target_epsilon: Option<f64>,
    /// Per-example gradient clip norm C.
    #[serde(default = "default_clip_norm")]
    #[x_kube(validation = Rule::new("self > 0.0").message("clipNorm must be greater than 0"))]
    pub clip_norm: f64,
    /// delta of the (epsilon, delta) guarantee.
    #[serde(default = "default_delta")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("delta must be in (0, 1)"))]
    pub delta: f64,
    /// Privacy accountant.
    #[serde(default)]
    pub accountant: Accountant,
    /// Poisson sampling rate q of DP-SGD: each example joins each step's batch with this
    /// probability (the expected batch is q times the hospital's training examples; `batchSize` is
    /// not used under DP). Known before any data is read, so the operator can check every
    /// hospital's projected epsilon before a round starts.
    #[serde(default = "default_sample_rate")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("sampleRate must be in (0, 1]"))]
    pub sample_rate: f64,
    /// Noise multiplier of the evaluation counts each hospital reports per round (examples, correct
    /// predictions, per-group confusion counts on its validation data): they are released through a
    /// Gaussian mechanism with this multiplier and charged to the hospital's budget like DP-SGD
    /// (docs/privacy.md, "Evaluation counts under DP").
    #[serde(default = "default_evaluation_noise_multiplier")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1000.0").message("evaluationNoiseMultiplier must be in (0, 1000]"))]
    pub evaluation_noise_multiplier: f64,
}

impl Default for PrivacySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            noise_multiplier: Some(1.0),
            target_epsilon: None,
            clip_norm: default_clip_norm(),
            delta: default_delta(),
            accountant: Accountant::Pld,
            sample_rate: default_sample_rate(),
            evaluation_noise_multiplier: default_evaluation_noise_multiplier(),
        }
    }
}

fn default_sample_rate() -> f64 {
    0.01
}

/// The default noise multiplier of the evaluation counts (docs/privacy.md).
pub const DEFAULT_EVALUATION_NOISE_MULTIPLIER: f64 = caduceus_privacy::evaluation::DEFAULT_NOISE_MULTIPLIER;

fn default_evaluation_noise_multiplier() -> f64 {
    DEFAULT_EVALUATION_NOISE_MULTIPLIER
}

fn default_true() -> bool {
    true
}
fn default_clip_norm() -> f64 {
    1.0
}
fn default_delta() -> f64 {
    1e-5
}

/// Privacy accountants.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Accountant {
    /// Privacy-loss-distribution accountant (tight; pessimistic discretisation).
    #[default]
    #[serde(rename = "PLD")]
    Pld,
    /// Rényi-DP accountant.
    #[serde(rename = "RDP")]
    Rdp,
}

/// Secure aggregation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecureAggregationSpec {
    /// `None`, or `Tfhe`: updates are encrypted with a study key that only hospitals hold.
    #[serde(default)]
    pub mode: SecureAggregationMode,
}

/// Secure-aggregation modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SecureAggregationMode {
    #[default]
    None,
    Tfhe,
}

/// Fairness thresholds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FairnessSpec {
    /// Largest acceptable demographic-parity difference (max − min selection rate across groups).
    #[serde(default = "default_max_gap")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("maxDemographicParityDifference must be in [0, 1]"))]
    pub max_demographic_parity_difference: f64,
    /// Largest acceptable equalized-odds difference (max of the TPR and FPR gaps across groups).
    #[serde(default = "default_max_gap")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("maxEqualizedOddsDifference must be in [0, 1]"))]
    pub max_equalized_odds_difference: f64,
    /// Groups with fewer evaluation examples than this are reported as too small, not as extremes.
    #[serde(default = "default_min_group_size")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_group_size: u32,
    /// The study reports `FairnessDegraded` after this many consecutive violating rounds.
    #[serde(default = "default_degraded_after")]
    #[schemars(range(min = 1, max = 1000))]
    pub degraded_after_rounds: u32,
}

impl Default for FairnessSpec {
    fn default() -> Self {
        Self {
            max_demographic_parity_difference: default_max_gap(),
            max_equalized_odds_difference: default_max_gap(),
            min_group_size: default_min_group_size(),
            degraded_after_rounds: default_degraded_after(),
        }
    }
}

fn default_max_gap() -> f64 {
    0.1
}
fn default_min_group_size() -> u32 {
    30
}
fn default_degraded_after() -> u32 {
    2
}

/// The model store: a PersistentVolumeClaim in the study's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelStoreSpec {
    /// Name of the PersistentVolumeClaim.
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory inside the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("!self.split('/').exists(p, p == '..')").message("modelStore.path must not contain a '..' component"))]
    pub path: Option<String>,
}

/// Container images for the study's workloads.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregator: Option<String>,
}

/// The per-round DP-SGD mechanism of a study.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrivacyPlan {
    /// Noise multiplier sigma.
    pub noise_multiplier: f64,
    /// Poisson sampling rate q.
    pub sample_rate: f64,
    /// DP-SGD steps per hospital per round.
    pub steps_per_round: u64,
    /// Clip norm C.
    pub clip_norm: f64,
    /// delta of the reported epsilon.
    pub delta: f64,
    /// Epsilon of the whole planned study for one hospital that takes part in every round.
    pub planned_epsilon: f64,
    /// Noise multiplier of the evaluation counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation_noise_multiplier: Option<f64>,
    /// Evaluation releases of one trainer Job (one round).
    #[serde(default)]
    pub evaluation_releases: u64,
}

/// Observed state of a study.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederatedStudyStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` (its reasons include `PrivacyBudgetExhausted`) and `FairnessDegraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Number of the round in progress (1-based), or of the last round once the study is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_round: Option<u32>,
    /// Rounds that succeeded.
    #[serde(default)]
    pub completed_rounds: u32,
    /// Accuracy of the latest global model on the hospitals' validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Latest demographic-parity difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demographic_parity_difference: Option<f64>,
    /// Latest equalized-odds difference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equalized_odds_difference: Option<f64>,
    /// Hospitals (`namespace/name`) that took part in the latest round.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub participants: Vec<String>,
    /// Epsilon spent by this study per hospital (`namespace/name`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epsilon_spent: BTreeMap<String, f64>,
    /// The DP-SGD mechanism each hospital runs per round, fixed for the consent hash (the noise
    /// multiplier derived from `privacy.targetEpsilon` for the whole planned schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_plan: Option<PrivacyPlan>,
    /// What a hospital consents to: the hash of the study's terms (resolved images, model, task,
    /// rounds, local training, privacy, aggregation), to be named in `consentedStudies` as
    /// `namespace/name@hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_hash: Option<String>,
}
