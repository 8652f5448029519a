//! `HospitalClient`: a hospital that can join studies, in the hospital's own namespace.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A hospital: where its data lies, its privacy budget, the studies it consents to, and how its trainer
/// pods are scheduled. Its data never leaves its namespace's volumes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fl.caduceus.dev",
    version = "v1alpha1",
    kind = "HospitalClient",
    plural = "hospitalclients",
    singular = "hospitalclient",
    namespaced,
    status = "HospitalClientStatus",
    shortname = "hospital",
    shortname = "hospitals",
    shortname = "hc",
    category = "caduceus",
    doc = "A hospital that takes part in federated studies.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Budget",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"PrivacyBudgetExhausted\")].reason"
    ),
    printcolumn(name = "Epsilon", type_ = "number", json_path = ".status.epsilonSpent"),
    printcolumn(
        name = "Budget-Epsilon",
        type_ = "number",
        json_path = ".spec.privacyBudget.epsilon"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct HospitalClientSpec {
    /// The hospital's data.
    pub data: DataSpec,
    /// The differential-privacy budget for this data, across every study that uses it.
    pub privacy_budget: PrivacyBudget,
    /// Studies this hospital consents to join, as `namespace/name` of the FederatedStudy.
    #[serde(default)]
    #[schemars(
        length(max = 256),
        inner(
            pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
            length(max = 127)
        )
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub consented_studies: Vec<String>,
    /// Scheduling hints for this hospital's trainer pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<TrainerPodSpec>,
}

/// Where a hospital's images lie.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.path.contains('..')")
        .message("data.path must not contain '..'")
        .field_path(".path")
)]
pub struct DataSpec {
    /// PersistentVolumeClaim in the hospital's namespace, mounted read-only into trainer pods.
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 253))]
    pub claim_name: String,
    /// Directory (or manifest file) inside the volume.
    #[serde(default = "default_data_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// How the data is laid out.
    #[serde(default)]
    pub format: DataFormat,
}

fn default_data_path() -> String {
    "/".to_string()
}

/// Data layouts the trainer reads.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DataFormat {
    /// A `caduceus data` manifest (labels.csv beside the images).
    #[default]
    Manifest,
    /// A directory of UTKFace-style `AGE_GENDER_RACE_DATETIME.jpg` files.
    UtkfaceFilenames,
}

/// An (epsilon, delta) budget.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrivacyBudget {
    /// Total epsilon this hospital allows to be spent on its data.
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1000.0").message("epsilon must be in (0, 1000]"))]
    pub epsilon: f64,
    /// delta of the budget.
    #[serde(default = "default_delta")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("delta must be in (0, 1)"))]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

/// Scheduling hints for trainer pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TrainerPodSpec {
    /// Resources of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node selector for trainer pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for trainer pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
}

/// Observed state of a hospital, including its privacy ledger.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HospitalClientStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `PrivacyBudgetExhausted`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Epsilon spent so far on this hospital's data (composition of every recorded mechanism).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_spent: Option<f64>,
    /// Epsilon left in the budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_remaining: Option<f64>,
    /// The privacy ledger: every mechanism run on this hospital's data, with the rounds it covers
    /// and reservations of rounds that are running (see `caduceus_privacy::ledger`). Identical
    /// mechanisms are merged and rounds kept as ranges, so it stays small after thousands of rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<caduceus_privacy::ledger::PrivacyLedger>,
}
