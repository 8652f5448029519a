//! TrainingRounds are created only by the study controller: it signs each round it creates (HMAC-SHA256
//! over the round's namespace, name and spec, with a key that exists only in a Secret of the operator's
//! namespace) and puts the signature in the `fl.caduceus.dev/signature` annotation. The round controller
//! schedules nothing for a round whose signature does not verify, and the study controller ignores
//! (and deletes, when it is in the way) such rounds. Whoever may create TrainingRounds but cannot read
//! the operator's Secrets cannot forge one, whatever owner reference it carries.

use caduceus_crds::TrainingRound;
use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rand::RngCore;
use sha2::Sha256;

use crate::build;
use crate::context::{Error, Result};
use crate::names;

type HmacSha256 = Hmac<Sha256>;

const KEY_FIELD: &str = "key";

/// The bytes a round's signature covers.
fn message(round: &TrainingRound) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(b"caduceus-round-v1\n");
    m.extend_from_slice(round.namespace().unwrap_or_default().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(round.name_any().as_bytes());
    m.push(b'\n');
    m.extend_from_slice(&serde_json::to_vec(&round.spec).expect("a round spec serialises"));
    m
}

/// The signature of `round` under `key` (hex).
pub fn sign(key: &[u8], round: &TrainingRound) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&message(round));
    hex::encode(mac.finalize().into_bytes())
}

/// Signs `round` in place (sets the annotation).
pub fn attach(key: &[u8], round: &mut TrainingRound) {
    let sig = sign(key, round);
    round
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(names::ANNOTATION_SIGNATURE.into(), sig);
}

/// Whether `round` carries a valid signature under `key` (constant-time comparison).
pub fn verify(key: &[u8], round: &TrainingRound) -> bool {
    let Some(sig) = round
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_SIGNATURE))
        .and_then(|s| hex::decode(s).ok())
    else {
        return false;
    };
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&message(round));
    mac.verify_slice(&sig).is_ok()
}

/// The signing key: created once (32 bytes from the OS RNG) in the operator's namespace, read after.
pub async fn load_or_create_key(client: &Client, operator_ns: &str) -> Result<Vec<u8>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let s = match api.get_opt(names::SIGNING_KEY_SECRET).await? {
        Some(s) => s,
        None => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let want = build::secret(
                names::SIGNING_KEY_SECRET,
                operator_ns,
                [
                    (names::LABEL_MANAGED_BY.to_string(), names::MANAGED_BY.to_string()),
                    (
                        names::LABEL_COMPONENT.to_string(),
                        "round-signing-key".to_string(),
                    ),
                ]
                .into(),
                None,
                &[(KEY_FIELD, &key)],
            );
            let pp = PostParams {
                field_manager: Some(crate::FIELD_MANAGER.into()),
                ..Default::default()
            };
            match api.create(&pp, &want).await {
                Ok(s) => s,
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(names::SIGNING_KEY_SECRET).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let key = s
        .data
        .as_ref()
        .and_then(|d| d.get(KEY_FIELD))
        .map(|b| b.0.clone())
        .filter(|k| k.len() >= 32)
        .ok_or_else(|| {
            Error::Other(format!(
                "Secret {operator_ns}/{} has no {KEY_FIELD} of at least 32 bytes",
                names::SIGNING_KEY_SECRET
            ))
        })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_crds::TrainingRoundSpec;

    fn round() -> TrainingRound {
        let mut r = TrainingRound::new(
            "gender-r0",
            TrainingRoundSpec {
                study: "gender".into(),
                round: 0,
                attempt: 0,
                participants: vec!["north/st-mary".into()],
                min_participants: 1,
                study_uid: Some("u1".into()),
                consent_hash: Some("ab".into()),
                privacy: None,
            },
        );
        r.metadata.namespace = Some("studies".into());
        r
    }

    #[test]
    fn only_the_key_holder_can_make_a_valid_round() {
        let key = [7u8; 32];
        let mut r = round();
        assert!(!verify(&key, &r), "unsigned");
        attach(&key, &mut r);
        assert!(verify(&key, &r));
        assert!(!verify(&[8u8; 32], &r), "another key");
        let mut more = r.clone();
        more.spec.participants.push("south/evil".into());
        assert!(!verify(&key, &more), "a participant added after signing");
        let mut other = r.clone();
        other.metadata.name = Some("gender-r1".into());
        assert!(!verify(&key, &other), "bound to the name");
        let mut other = r.clone();
        other.metadata.namespace = Some("elsewhere".into());
        assert!(!verify(&key, &other), "bound to the namespace");
        let mut garbage = r.clone();
        garbage
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(names::ANNOTATION_SIGNATURE.into(), "zz".into());
        assert!(!verify(&key, &garbage));
    }

    #[test]
    fn the_signature_survives_a_json_round_trip() {
        let key = [1u8; 32];
        let mut r = round();
        r.spec.privacy = Some(caduceus_crds::study::PrivacyPlan {
            noise_multiplier: 0.7312345678901234,
            sample_rate: 0.05,
            steps_per_round: 3,
            clip_norm: 1.0,
            delta: 1e-5,
            planned_epsilon: 2.5,
            evaluation_noise_multiplier: Some(10.0),
            evaluation_releases: 2,
        });
        attach(&key, &mut r);
        let back: TrainingRound = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(verify(&key, &back));
    }
}
