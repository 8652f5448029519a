//! `TrainingRound`: one round of a study. Created by the operator and owned by its study.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// One round of a federated study. Its spec is immutable once created.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fl.caduceus.dev",
    version = "v1alpha1",
    kind = "TrainingRound",
    plural = "trainingrounds",
    singular = "traininground",
    namespaced,
    status = "TrainingRoundStatus",
    shortname = "round",
    shortname = "rounds",
    shortname = "tr",
    category = "caduceus",
    doc = "One round of a federated study, created by the operator.",
    printcolumn(name = "Study", type_ = "string", json_path = ".spec.study"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".spec.round"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Succeeded\")].reason"
    ),
    printcolumn(name = "Participants", type_ = "string", json_path = ".status.participation"),
    printcolumn(name = "Accuracy", type_ = "number", json_path = ".status.accuracy"),
    printcolumn(name = "EOD", type_ = "number", json_path = ".status.equalizedOddsDifference"),
    printcolumn(name = "Epsilon", type_ = "number", json_path = ".status.epsilonSpentMax"),
    printcolumn(
        name = "Fair",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"FairnessWithinThreshold\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("TrainingRound spec is immutable"))]
pub struct TrainingRoundSpec {
    /// Name of the FederatedStudy in this namespace.
    #[schemars(pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(min = 1, max = 63))]
    pub study: String,
    /// Round index, from 0.
    #[schemars(range(min = 0, max = 100000))]
    pub round: u32,
    /// Attempt number of this round (retries after a failed round count up from 0).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub attempt: u32,
    /// Hospitals chosen for the round, as `namespace/name`.
    #[schemars(
        length(min = 1, max = 10000),
        inner(
            pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
            length(max = 127)
        )
    )]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub participants: Vec<String>,
    /// Quorum k for this round.
    #[schemars(range(min = 1, max = 10000))]
    pub min_participants: u32,
    /// UID of the FederatedStudy that created the round (rounds of a deleted and re-created study
    /// are not its successor's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub study_uid: Option<String>,
    /// The study's consent hash when the round was created; the round runs only while the study
    /// still has it, and every participant consented to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub consent_hash: Option<String>,
    /// The DP-SGD and evaluation mechanisms reserved in each participant's ledger for this round;
    /// the trainer Jobs run exactly these. Absent without DP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::study::PrivacyPlan>,
}

/// Observed state of a round.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRoundStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Succeeded`, `QuorumReached`, `FairnessWithinThreshold`. `Succeeded` is `Unknown` with reason
    /// `Running` while the round runs, then `Settling` (its message names how it ended) while its
    /// participants' ledgers are settled, then `True` or `False`. A round that the operator did not
    /// create (no valid signature) ends at once with `Succeeded=False`, reason `NotCreatedByOperator`,
    /// and nothing is scheduled for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Hospitals whose update was aggregated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reported: Vec<String>,
    /// `reported/participants` for display, e.g. `3/4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participation: Option<String>,
    /// Accuracy of the round's global model on the hospitals' validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean loss on the hospitals' validation data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Demographic-parity difference across the audited groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demographic_parity_difference: Option<f64>,
    /// Equalized-odds difference across the audited groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equalized_odds_difference: Option<f64>,
    /// Worst-group accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst_group_accuracy: Option<f64>,
    /// Epsilon spent by each hospital up to and including this round.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epsilon_spent: BTreeMap<String, f64>,
    /// The largest of `epsilonSpent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_spent_max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
