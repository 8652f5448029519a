//! The TFHE study key in sites mode: the coordinator relays it sealed and never holds it.
//!
//! Secret `sealed-…` (operator namespace, [`names::sealed_key_secret`]) keeps, per study, the key's
//! `fingerprint` and one sealed blob per site (`site.<hospital>`), plus `holder.<hospital>` for the
//! site that made the key (it needs no blob). Blobs are sealed to each site's X25519 key by the
//! site that holds the key (`caduceus_secagg::seal`); the coordinator cannot open them.

use std::collections::BTreeMap;

use caduceus_proto::v1::{KeyRecipient, SealedKeys};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::Gateway;
use crate::context::{Error, Result};
use crate::names;

/// What the coordinator knows of a study's key.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SealedSet {
    pub fingerprint: Option<String>,
    /// hospital → sealed blob.
    pub blobs: BTreeMap<String, Vec<u8>>,
    /// Sites that made (hold) the key.
    pub holders: Vec<String>,
}

impl SealedSet {
    /// Whether `hospital` can get the key: it holds it, or a blob is sealed to it.
    pub fn covers(&self, hospital: &str) -> bool {
        self.holders.iter().any(|h| h == hospital) || self.blobs.contains_key(hospital)
    }
}

/// Reads a study's sealed keys (empty when none yet).
pub async fn load(client: &Client, operator_ns: &str, study_id: &str) -> Result<SealedSet> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let Some(s) = api.get_opt(&names::sealed_key_secret(study_id)).await? else {
        return Ok(SealedSet::default());
    };
    let mut set = SealedSet::default();
    for (k, v) in s.data.unwrap_or_default() {
        if k == "fingerprint" {
            set.fingerprint = String::from_utf8(v.0).ok();
        } else if let Some(h) = k.strip_prefix("site.") {
            set.blobs.insert(h.to_string(), v.0);
        } else if let Some(h) = k.strip_prefix("holder.") {
            set.holders.push(h.to_string());
        }
    }
    Ok(set)
}

/// Stores a site's answer to a key request. The first answer fixes the study's fingerprint; an
/// answer with another fingerprint (a second key) is refused.
pub async fn store(client: &Client, operator_ns: &str, holder: &str, answer: &SealedKeys) -> Result<()> {
    let have = load(client, operator_ns, &answer.study_id).await?;
    if let Some(fp) = &have.fingerprint
        && fp != &answer.fingerprint
    {
        return Err(Error::Key(format!(
            "site {holder} sealed a key of fingerprint {} for study {}, whose key is {fp}",
            answer.fingerprint, answer.study_id
        )));
    }
    let mut data: BTreeMap<String, ByteString> = BTreeMap::new();
    data.insert(
        "fingerprint".into(),
        ByteString(answer.fingerprint.clone().into_bytes()),
    );
    data.insert(format!("holder.{holder}"), ByteString(b"1".to_vec()));
    for k in &answer.keys {
        caduceus_pki::validate_hospital_name(&k.hospital)?;
        data.insert(format!("site.{}", k.hospital), ByteString(k.sealed.clone()));
    }
    let name = names::sealed_key_secret(&answer.study_id);
    let patch = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": operator_ns, "labels": {
            names::LABEL_MANAGED_BY: names::MANAGED_BY,
            names::LABEL_COMPONENT: "sealed-study-key",
        }},
        "type": "Opaque",
        "data": data,
    });
    // Each holder owns its own keys (field manager per holder), so two answers merge.
    Api::<Secret>::namespaced(client.clone(), operator_ns)
        .patch(
            &name,
            &PatchParams::apply(&format!("caduceus-gateway-{holder}")).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

/// Makes sure every site in `sites` can get the study key: when one cannot, asks a connected
/// holder (or, when there is no key yet, the first site in name order) to seal it. Returns the
/// key's fingerprint once every site is covered, `None` while waiting.
pub async fn ensure(
    gw: &Gateway,
    client: &Client,
    operator_ns: &str,
    study_id: &str,
    sites: &[String],
) -> Result<Option<String>> {
    let set = load(client, operator_ns, study_id).await?;
    let missing: Vec<&String> = sites.iter().filter(|h| !set.covers(h)).collect();
    if missing.is_empty() && set.fingerprint.is_some() {
        return Ok(set.fingerprint);
    }
    // A connected site that holds the key (with the study's fingerprint, once there is one).
    let holder = sites
        .iter()
        .chain(set.holders.iter())
        .find(|h| {
            gw.key_facts(h, study_id)
                .is_some_and(|(_, fp)| match (&fp, &set.fingerprint) {
                    (Some(f), Some(want)) => f == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
        })
        .cloned()
        .or_else(|| {
            // No key anywhere yet: the first site makes it (it must be connected).
            let first = sites.iter().min()?;
            (set.fingerprint.is_none() && gw.connected(first)).then(|| first.clone())
        });
    let Some(holder) = holder else {
        tracing::info!(study_id, "waiting for a site that holds the study key to connect");
        return Ok(None);
    };
    let recipients: Vec<KeyRecipient> = missing
        .iter()
        .filter(|h| **h != &holder)
        .filter_map(|h| {
            let (pk, _) = gw.key_facts(h, study_id)?;
            Some(KeyRecipient {
                hospital: (*h).clone(),
                seal_public_key: pk,
            })
        })
        .collect();
    gw.request_keys(&holder, study_id, recipients);
    Ok(None)
}
