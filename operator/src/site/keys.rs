//! The TFHE study keys a site holds: one Secret per study in the operator's namespace
//! (`caduceus-study-key-<study id>`, with the key and its fingerprint), made when the coordinator
//! asks this site to generate a key, or stored when an assignment brings a key sealed to this site.
//! The key never leaves the site except sealed to another site's X25519 key.

use std::collections::BTreeMap;

use caduceus_proto::v1::{KeyRequest, SealedKey, SealedKeys};
use caduceus_secagg::StudyKey;
use caduceus_secagg::seal::{self, SealKeyPair};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};

use crate::build;
use crate::context::{Error, Result};
use crate::names;

pub const COMPONENT: &str = "site-study-key";
const KEY: &str = "study.key";
const FINGERPRINT: &str = "fingerprint";
const STUDY_ID: &str = "study-id";

/// The Secret that holds study `study_id`'s key at this site.
pub fn secret_name(study_id: &str) -> String {
    format!("caduceus-study-key-{study_id}")
}

fn data<'a>(s: &'a Secret, key: &str) -> Option<&'a [u8]> {
    s.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

fn key_of(s: &Secret) -> Result<StudyKey> {
    let bytes = data(s, KEY).ok_or_else(|| Error::Key(format!("Secret {} has no {KEY}", s.name_any())))?;
    StudyKey::from_bytes(bytes).map_err(|e| Error::Key(format!("Secret {}: {e}", s.name_any())))
}

/// The key of `study_id` this site holds, if any.
pub async fn held(client: &Client, operator_ns: &str, study_id: &str) -> Result<Option<StudyKey>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    match api.get_opt(&secret_name(study_id)).await? {
        Some(s) => Ok(Some(key_of(&s)?)),
        None => Ok(None),
    }
}

/// Stores `key` (create-if-absent: a key this site holds already wins, and is returned).
pub async fn store(client: &Client, operator_ns: &str, key: StudyKey) -> Result<StudyKey> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let study_id = key.study_id().to_string();
    let name = secret_name(&study_id);
    let bytes = key.to_bytes();
    let fp = key.fingerprint().to_string();
    let labels = BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGED_BY.to_string()),
        (names::LABEL_COMPONENT.to_string(), COMPONENT.to_string()),
    ]);
    let s = build::secret(
        &name,
        operator_ns,
        labels,
        None,
        &[
            (KEY, bytes.as_slice()),
            (FINGERPRINT, fp.as_bytes()),
            (STUDY_ID, study_id.as_bytes()),
        ],
    );
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.create(&pp, &s).await {
        Ok(_) => Ok(key),
        Err(kube::Error::Api(e)) if e.code == 409 => key_of(&api.get(&name).await?),
        Err(e) => Err(e.into()),
    }
}

/// The key of `study_id`: the one held, or a new one (`caduceus_secagg::StudyKey::generate`).
pub async fn load_or_generate(client: &Client, operator_ns: &str, study_id: &str) -> Result<StudyKey> {
    if let Some(k) = held(client, operator_ns, study_id).await? {
        return Ok(k);
    }
    let key = StudyKey::generate(study_id).map_err(|e| Error::Key(e.to_string()))?;
    tracing::info!(study_id, "generated the study key");
    store(client, operator_ns, key).await
}

/// Study id → fingerprint of every key this site holds (for `SiteHello`).
pub async fn fingerprints(client: &Client, operator_ns: &str) -> Result<BTreeMap<String, String>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let lp = ListParams::default().labels(&format!("{}={COMPONENT}", names::LABEL_COMPONENT));
    Ok(api
        .list(&lp)
        .await?
        .items
        .iter()
        .filter_map(|s| {
            let id = String::from_utf8(data(s, STUDY_ID)?.to_vec()).ok()?;
            let fp = String::from_utf8(data(s, FINGERPRINT)?.to_vec()).ok()?;
            Some((id, fp))
        })
        .collect())
}

/// Seals `key` to each recipient (pure but for the randomness of the seal). A recipient whose
/// public key is not 32 bytes is left out, with a warning.
pub fn seal_to(key: &StudyKey, req: &KeyRequest) -> Result<SealedKeys> {
    let mut keys = Vec::new();
    for r in &req.recipients {
        let Ok(pk) = <[u8; 32]>::try_from(r.seal_public_key.as_slice()) else {
            tracing::warn!(
                hospital = r.hospital,
                "the key request names a sealing key of {} bytes (not 32): not sealed to it",
                r.seal_public_key.len()
            );
            continue;
        };
        let sealed =
            seal::seal(key, &pk).map_err(|e| Error::Key(format!("sealing to {}: {e}", r.hospital)))?;
        keys.push(SealedKey {
            hospital: r.hospital.clone(),
            sealed,
        });
    }
    Ok(SealedKeys {
        study_id: req.study_id.clone(),
        fingerprint: key.fingerprint().to_string(),
        keys,
    })
}

/// Opens the study key an assignment brought, sealed to this site.
pub fn open(
    sealed: &[u8],
    me: &SealKeyPair,
    study_id: &str,
    fingerprint: &str,
) -> std::result::Result<StudyKey, String> {
    seal::open(sealed, me, study_id, fingerprint).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_proto::v1::KeyRecipient;

    #[test]
    fn each_recipient_opens_its_own_blob_only() {
        let key = StudyKey::generate("studies-gender").unwrap();
        let a = SealKeyPair::generate().unwrap();
        let b = SealKeyPair::generate().unwrap();
        let req = KeyRequest {
            study_id: "studies-gender".into(),
            recipients: vec![
                KeyRecipient {
                    hospital: "sites/a".into(),
                    seal_public_key: a.public_key().to_vec(),
                },
                KeyRecipient {
                    hospital: "sites/b".into(),
                    seal_public_key: b.public_key().to_vec(),
                },
                KeyRecipient {
                    hospital: "sites/bad".into(),
                    seal_public_key: vec![1, 2, 3],
                },
            ],
        };
        let sealed = seal_to(&key, &req).unwrap();
        let fp = key.fingerprint().to_string();
        assert_eq!(sealed.fingerprint, fp);
        assert_eq!(sealed.keys.len(), 2, "a malformed public key is left out");
        let opened = open(&sealed.keys[0].sealed, &a, "studies-gender", &fp).unwrap();
        assert_eq!(opened.fingerprint(), key.fingerprint());
        assert!(open(&sealed.keys[0].sealed, &b, "studies-gender", &fp).is_err());
        assert!(open(&sealed.keys[1].sealed, &b, "studies-other", &fp).is_err());
        assert_eq!(secret_name("studies-gender"), "caduceus-study-key-studies-gender");
    }
}
