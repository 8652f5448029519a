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
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name of a HospitalClient must be a DNS label (at most 63 characters, no '.'): it is used as a label value and in certificate names")
)]
#[serde(rename_all = "camelCase")]
pub struct HospitalClientSpec {
    /// The hospital's data.
    pub data: DataSpec,
    /// The differential-privacy budget for this data, across every study that uses it.
    pub privacy_budget: PrivacyBudget,
    /// Studies this hospital consents to join, each as `namespace/name@<consent hash>`: the hash
    /// (`status.consentHash` of the FederatedStudy, or `caduceus study consent-hash`) binds the consent
    /// to what the study will do (its images, model, task, rounds, local training, privacy and
    /// aggregation settings). A study whose spec changes gets a new hash and needs fresh consent. A
    /// bare `namespace/name` is accepted by the API but never admitted: the hospital's
    /// `status.admissions` then names the hash to approve.
    #[serde(default)]
    #[schemars(
        length(max = 256),
        inner(
            pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?(@[0-9a-f]{64})?$"),
            length(max = 200)
        )
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub consented_studies: Vec<String>,
    /// Trainer images that may run on this hospital's data. Each entry is an image digest
    /// (`sha256:<64 hex>`), an image pinned by digest (`registry/repo@sha256:<64 hex>`), or a
    /// registry or repository prefix ending in `/` (every image under it is trusted, whatever its
    /// tag). Empty: only the operator's own trainer image (its `--trainer-image`) may run; a study
    /// that names another image is refused for this hospital with a condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 512)))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self.all(i, i.endsWith('/') || i.matches('^sha256:[0-9a-f]{64}$') || i.matches('^[^@]+@sha256:[0-9a-f]{64}$'))")
            .message("each allowedTrainerImages entry must be a digest (sha256:<64 hex>), an image pinned by digest (repo@sha256:<64 hex>) or a registry/repository prefix ending in '/'")
    )]
    pub allowed_trainer_images: Vec<String>,
    /// Whether this hospital may join studies without differential privacy (`privacy.enabled:
    /// false`). Off by default: a non-private study releases unnoised updates, outside any budget.
    #[serde(default)]
    pub allow_non_private_studies: bool,
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
    /// Whether each study that selects this hospital is admitted, and why not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["study".into()]))]
    pub admissions: Vec<StudyAdmission>,
    /// The durable copy of the ledger (`namespace/name` of a ConfigMap in the operator's namespace):
    /// it outlives this object, and a re-created HospitalClient of the same namespace and name gets
    /// its ledger back from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_ref: Option<String>,
    /// A mirror of the privacy ledger (the durable copy is authoritative): every mechanism run on this hospital's data, with the rounds it covers
    /// and reservations of rounds that are running (see `caduceus_privacy::ledger`). Identical
    /// mechanisms are merged and rounds kept as ranges, so it stays small after thousands of rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<caduceus_privacy::ledger::PrivacyLedger>,
}

/// A study's admission of this hospital, as the operator last decided it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StudyAdmission {
    /// `namespace/name` of the FederatedStudy.
    pub study: String,
    /// Whether the hospital takes part in the study's next round.
    pub admitted: bool,
    /// A CamelCase reason: `Admitted`, `NoConsent`, `ConsentOutdated`, `TrainerImageNotAllowed`,
    /// `NonPrivateNotAllowed`, `BudgetExhausted`, `NotReady`, `NamespaceNotServed`.
    pub reason: String,
    /// What is wrong and what to do about it.
    pub message: String,
    /// The study's current consent hash (what `consentedStudies` must name to consent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent_hash: Option<String>,
}

impl HospitalClientSpec {
    /// Whether `image` may run on this hospital's data; `operator_default` is the operator's own
    /// trainer image, the only one allowed when `allowedTrainerImages` is empty.
    pub fn allows_trainer_image(&self, image: &str, operator_default: &str) -> bool {
        if self.allowed_trainer_images.is_empty() {
            return image == operator_default;
        }
        self.allowed_trainer_images
            .iter()
            .any(|entry| image_matches(entry, image))
    }

    /// The consent this hospital gave to `study_ref` (`namespace/name`): `None` without one,
    /// `Some(None)` for a bare name (no hash), `Some(Some(hash))` otherwise.
    pub fn consent_for(&self, study_ref: &str) -> Option<Option<&str>> {
        let mut found = None;
        for c in &self.consented_studies {
            match c.split_once('@') {
                Some((s, h)) if s == study_ref => return Some(Some(h)),
                None if c == study_ref => found = Some(None),
                _ => {}
            }
        }
        found
    }

    /// Whether this hospital consents to `study_ref` with exactly `hash`.
    pub fn consents_to(&self, study_ref: &str, hash: &str) -> bool {
        self.consented_studies
            .iter()
            .any(|c| c.split_once('@') == Some((study_ref, hash)))
    }
}

/// One `allowedTrainerImages` entry against an image reference.
pub fn image_matches(entry: &str, image: &str) -> bool {
    if entry.ends_with('/') {
        return image.starts_with(entry) && image.len() > entry.len();
    }
    if let Some(digest) = entry.strip_prefix("sha256:").filter(|_| !entry.contains('@')) {
        return image.rsplit_once("@sha256:").is_some_and(|(_, d)| d == digest);
    }
    entry.contains("@sha256:") && image == entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(images: &[&str], consents: &[&str]) -> HospitalClientSpec {
        serde_json::from_value(serde_json::json!({
            "data": {"claimName": "faces"},
            "privacyBudget": {"epsilon": 8.0},
            "consentedStudies": consents,
            "allowedTrainerImages": images,
        }))
        .unwrap()
    }

    const D: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn empty_allow_list_admits_only_the_operator_default() {
        let s = spec(&[], &[]);
        assert!(s.allows_trainer_image("caduceus-trainer:0.1.0", "caduceus-trainer:0.1.0"));
        assert!(!s.allows_trainer_image("evil/trainer:latest", "caduceus-trainer:0.1.0"));
    }

    #[test]
    fn digests_and_prefixes() {
        let pinned = format!("reg.example/ml/trainer@sha256:{D}");
        let s = spec(&[&format!("sha256:{D}"), "reg.example/caduceus/"], &[]);
        assert!(s.allows_trainer_image(&pinned, "x"));
        assert!(s.allows_trainer_image("reg.example/caduceus/trainer:1", "x"));
        assert!(!s.allows_trainer_image("reg.example/caduceus-evil/trainer:1", "x"));
        assert!(!s.allows_trainer_image("reg.example/ml/trainer:1", "x"));
        assert!(
            !s.allows_trainer_image("x", "x"),
            "a non-empty list replaces the default"
        );
        let s = spec(&[&pinned], &[]);
        assert!(s.allows_trainer_image(&pinned, "x"));
        assert!(!s.allows_trainer_image(&format!("other/trainer@sha256:{D}"), "x"));
        assert!(!s.allows_trainer_image("reg.example/ml/trainer", "x"));
    }

    #[test]
    fn consent_is_bound_to_a_hash() {
        let s = spec(&[], &["studies/a", &format!("studies/b@{D}")]);
        assert_eq!(s.consent_for("studies/a"), Some(None));
        assert_eq!(s.consent_for("studies/b"), Some(Some(D)));
        assert_eq!(s.consent_for("studies/c"), None);
        assert!(s.consents_to("studies/b", D));
        assert!(!s.consents_to("studies/a", D));
        assert!(!s.consents_to("studies/b", &D.replace('0', "1")));
    }
}
