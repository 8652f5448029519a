//! What a hospital consents to: the terms of a study, hashed. A hospital names the hash in
//! `consentedStudies` (`namespace/name@hash`); any change to the terms gives a new hash, so a study
//! cannot change what runs on a hospital's data (image, privacy, rounds, …) after the hospital
//! agreed to it.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::study::{
    AggregationSpec, FederatedStudySpec, LocalTrainingSpec, ModelSpec, PrivacySpec, SecureAggregationSpec,
    TaskSpec,
};

/// The terms of a study that consent covers. Deliberately left out: `suspend`, the fairness
/// thresholds, the hospital selector, the model store and the round deadline, which change nothing
/// that runs on a hospital's data or what leaves it.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsentTerms<'a> {
    /// Hash format version, so that a future change of the terms can never collide with this one.
    pub version: u32,
    /// `namespace/name` of the study.
    pub study: String,
    /// The trainer image that runs on the hospital's data (the study's, else the operator's default).
    pub trainer_image: &'a str,
    /// The aggregator image that receives the hospital's updates.
    pub aggregator_image: &'a str,
    pub model: &'a ModelSpec,
    pub task: &'a TaskSpec,
    pub total_rounds: u32,
    pub max_retries: u32,
    pub min_hospitals: u32,
    pub max_hospitals: Option<u32>,
    pub training: &'a LocalTrainingSpec,
    pub privacy: &'a PrivacySpec,
    pub secure_aggregation: &'a SecureAggregationSpec,
    pub aggregation: &'a AggregationSpec,
}

impl<'a> ConsentTerms<'a> {
    /// The terms of `spec` (study `namespace/name`) with the images that will really run.
    pub fn new(
        study: &str,
        spec: &'a FederatedStudySpec,
        trainer_image: &'a str,
        aggregator_image: &'a str,
    ) -> Self {
        Self {
            version: 1,
            study: study.to_string(),
            trainer_image,
            aggregator_image,
            model: &spec.model,
            task: &spec.task,
            total_rounds: spec.rounds.total,
            max_retries: spec.rounds.max_retries,
            min_hospitals: spec.rounds.min_hospitals,
            max_hospitals: spec.rounds.max_hospitals,
            training: &spec.training,
            privacy: &spec.privacy,
            secure_aggregation: &spec.secure_aggregation,
            aggregation: &spec.aggregation,
        }
    }

    /// Lower-case hex SHA-256 of the terms' JSON (fields in declaration order, so stable).
    pub fn hash(&self) -> String {
        let bytes = serde_json::to_vec(self).expect("the terms serialise");
        hex::encode(Sha256::digest(&bytes))
    }
}

/// The images a study runs: its own when it names them, else the operator's defaults.
pub fn resolved_images<'a>(
    spec: &'a FederatedStudySpec,
    default_trainer: &'a str,
    default_aggregator: &'a str,
) -> (&'a str, &'a str) {
    let images = spec.images.as_ref();
    (
        images
            .and_then(|i| i.trainer.as_deref())
            .unwrap_or(default_trainer),
        images
            .and_then(|i| i.aggregator.as_deref())
            .unwrap_or(default_aggregator),
    )
}

/// The consent hash of study `namespace/name` with `spec`, given the operator's default images.
pub fn consent_hash(
    study: &str,
    spec: &FederatedStudySpec,
    default_trainer: &str,
    default_aggregator: &str,
) -> String {
    let (t, a) = resolved_images(spec, default_trainer, default_aggregator);
    ConsentTerms::new(study, spec, t, a).hash()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FederatedStudySpec {
        serde_json::from_value(serde_json::json!({
            "model": {"architecture": "small-cnn"},
            "task": {"label": "gender"},
            "rounds": {"total": 3},
            "hospitalSelector": {},
            "modelStore": {"claimName": "m"},
        }))
        .unwrap()
    }

    #[test]
    fn the_hash_covers_what_runs_and_nothing_else() {
        let s = spec();
        let h = consent_hash("a/b", &s, "t:1", "a:1");
        assert_eq!(h.len(), 64);
        assert_eq!(h, consent_hash("a/b", &s, "t:1", "a:1"), "stable");
        assert_ne!(h, consent_hash("a/c", &s, "t:1", "a:1"), "bound to the study");
        assert_ne!(
            h,
            consent_hash("a/b", &s, "t:2", "a:1"),
            "the operator's default image"
        );
        let mut s2 = s.clone();
        s2.images = Some(crate::study::ImagesSpec {
            trainer: Some("evil:1".into()),
            aggregator: None,
        });
        assert_ne!(h, consent_hash("a/b", &s2, "t:1", "a:1"), "the study's image");
        let mut s2 = s.clone();
        s2.privacy.noise_multiplier = Some(0.5);
        assert_ne!(h, consent_hash("a/b", &s2, "t:1", "a:1"), "privacy");
        let mut s2 = s.clone();
        s2.rounds.total = 30;
        assert_ne!(h, consent_hash("a/b", &s2, "t:1", "a:1"), "rounds");
        let mut s2 = s.clone();
        s2.rounds.max_retries = 9;
        assert_ne!(
            h,
            consent_hash("a/b", &s2, "t:1", "a:1"),
            "retries spend budget too"
        );
        let mut s2 = s.clone();
        s2.privacy.enabled = false;
        assert_ne!(h, consent_hash("a/b", &s2, "t:1", "a:1"), "turning DP off");
        // Operational fields do not need fresh consent.
        let mut s2 = s.clone();
        s2.suspend = true;
        s2.rounds.deadline_seconds = 99;
        s2.fairness.min_group_size = 7;
        assert_eq!(h, consent_hash("a/b", &s2, "t:1", "a:1"));
    }
}
