//! Names and labels of everything the operator creates. Every name is a pure function of the study,
//! round and attempt, so a restarted operator finds (never duplicates) what it made before.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

pub const MANAGED_BY: &str = "caduceus-operator";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_STUDY: &str = "fl.caduceus.dev/study";
pub const LABEL_STUDY_NAMESPACE: &str = "fl.caduceus.dev/study-namespace";
pub const LABEL_ROUND: &str = "fl.caduceus.dev/round";
pub const LABEL_ATTEMPT: &str = "fl.caduceus.dev/attempt";
pub const LABEL_HOSPITAL: &str = "fl.caduceus.dev/hospital";
pub const LABEL_HOSPITAL_NAMESPACE: &str = "fl.caduceus.dev/hospital-namespace";
/// The annotation that carries the operator's signature of a TrainingRound (see [`crate::signing`]).
pub const ANNOTATION_SIGNATURE: &str = "fl.caduceus.dev/signature";
/// The annotation on a HospitalClient that allows deleting it together with its privacy ledger.
pub const ANNOTATION_FORGET_LEDGER: &str = "fl.caduceus.dev/forget-privacy-ledger";
/// The ServiceAccount of trainer pods in each hospital namespace: no token, no RBAC.
pub const TRAINER_SERVICE_ACCOUNT: &str = "caduceus-trainer";
/// The Secret (operator's namespace) holding the key that signs TrainingRounds.
pub const SIGNING_KEY_SECRET: &str = "caduceus-round-signing-key";
/// The ServiceAccount of aggregator pods: no token, no RBAC.
pub const AGGREGATOR_SERVICE_ACCOUNT: &str = "caduceus-aggregator";
/// The gRPC port of the aggregator.
pub const AGGREGATOR_PORT: i32 = 50051;

/// First `n` hex digits of SHA-256 of `s`.
pub fn short_hash(s: &str, n: usize) -> String {
    let d = Sha256::digest(s.as_bytes());
    hex::encode(d)[..n].to_string()
}

/// `a-b` as a DNS label (≤ 63 characters): shortened with a hash when too long.
fn label_join(a: &str, b: &str) -> String {
    let joined = format!("{a}-{b}");
    if joined.len() <= 63 {
        return joined;
    }
    let h = short_hash(&joined, 8);
    let keep = 63 - 9;
    format!("{}-{h}", joined[..keep].trim_end_matches('-'))
}

/// The study id used in certificates and by the aggregator and trainers: `<namespace>-<name>`.
pub fn study_id(namespace: &str, name: &str) -> String {
    label_join(namespace, name)
}

/// A hospital's id in certificates and in the aggregator: a readable `<namespace>-<name>` prefix
/// and 16 hex digits of SHA-256 of `namespace/name`, so that `north/st-mary` and `north-st/mary`
/// (whose plain join is the same) get different ids. A DNS label of at most 63 characters.
pub fn hospital_id(namespace: &str, name: &str) -> String {
    let h = short_hash(&format!("{namespace}/{name}"), 16);
    let readable = format!("{namespace}-{name}");
    let keep = 63 - 17;
    let prefix = if readable.len() > keep {
        readable[..keep].trim_end_matches('-')
    } else {
        readable.as_str()
    };
    format!("{prefix}-{h}")
}

/// `namespace/name` of a hospital, as `TrainingRound.spec.participants` lists it.
pub fn hospital_ref(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The TrainingRound of round `round`, attempt `attempt`.
pub fn round_name(study: &str, round: u32, attempt: u32) -> String {
    if attempt == 0 {
        format!("{study}-r{round}")
    } else {
        format!("{study}-r{round}-a{attempt}")
    }
}

pub fn aggregator_job(round_name: &str) -> String {
    format!("{round_name}-agg")
}

/// A trainer Job lives in the hospital's namespace, where studies of several namespaces and several
/// hospitals may run: the hash covers the study's namespace and the hospital.
pub fn trainer_job(study_namespace: &str, round_name: &str, hospital: &str) -> String {
    format!(
        "{round_name}-{}",
        short_hash(&format!("{study_namespace}/{hospital}"), 6)
    )
}

pub fn service(study: &str) -> String {
    format!("{study}-aggregator")
}

/// The study's CA (certificate and key), in the operator's namespace only.
pub fn ca_secret(study_namespace: &str, study: &str) -> String {
    format!(
        "ca-{study}-{}",
        short_hash(&format!("{study_namespace}/{study}"), 8)
    )
}

/// Where earlier versions kept the study CA (in the study's namespace); removed when found.
pub fn legacy_ca_secret(study: &str) -> String {
    format!("{study}-ca")
}

pub fn aggregator_tls_secret(study: &str) -> String {
    format!("{study}-aggregator-tls")
}

/// The hospital's client certificate for a study, in the hospital's namespace.
pub fn hospital_tls_secret(study_namespace: &str, study: &str, hospital: &str) -> String {
    format!(
        "caduceus-{study}-{}-{hospital}-tls",
        short_hash(study_namespace, 6)
    )
}

/// The study's TFHE key, in the hospital's namespace (mounted only by its trainer pods).
pub fn hospital_key_secret(study_namespace: &str, study: &str, hospital: &str) -> String {
    format!(
        "caduceus-{study}-{}-{hospital}-tfhe",
        short_hash(study_namespace, 6)
    )
}

/// The master copy of a study's TFHE key, in the operator's namespace.
pub fn master_key_secret(study_namespace: &str, study: &str) -> String {
    format!(
        "tfhe-{study}-{}",
        short_hash(&format!("{study_namespace}/{study}"), 8)
    )
}

/// The id of a site assignment: one hospital's part in one round of one study (by study UID,
/// attempt and round). The site agent recomputes it from the round it is sent and refuses a mismatch.
pub fn assignment_id(study_namespace: &str, round_name: &str, study_uid: &str, hospital_ref: &str) -> String {
    format!("{study_namespace}/{round_name}@{study_uid}|{hospital_ref}")
}

/// The sites CA Secret (operator namespace of a coordinator): signs the gateway's server
/// certificate and each enrolled site's client certificate.
pub const SITES_CA_SECRET: &str = "caduceus-sites-ca";
/// The gateway's own server certificate (operator namespace of a coordinator).
pub const GATEWAY_TLS_SECRET: &str = "caduceus-gateway-tls";
/// The prefix of join-token Secrets (`caduceus-join-<token id>`, coordinator).
pub const JOIN_TOKEN_PREFIX: &str = "caduceus-join-";
/// The prefix of enrolment records (`caduceus-site-<hospital>`, coordinator).
pub const ENROLMENT_PREFIX: &str = "caduceus-site-";
/// The annotation that marks a coordinator's copy of a site's HospitalClient.
pub const ANNOTATION_MIRROR_OF: &str = "fl.caduceus.dev/mirror-of";
/// On a mirror: whether the site reports itself ready (`True`/`False`), and why.
pub const ANNOTATION_SITE_READY: &str = "fl.caduceus.dev/site-ready";
/// The label of a mirror: the site's hospital name.
pub const LABEL_SITE: &str = "fl.caduceus.dev/site";

/// The Secret (coordinator, operator namespace) of a study's sealed TFHE key blobs, one per site,
/// and the key's fingerprint (the coordinator cannot open them), by study id.
pub fn sealed_key_secret(study_id: &str) -> String {
    label_join("sealed", &format!("{}-{}", short_hash(study_id, 8), study_id))
}

/// The Service DNS name trainers dial and the aggregator's certificate names.
pub fn service_dns(study: &str, namespace: &str) -> String {
    format!("{}.{namespace}.svc", service(study))
}

/// Labels shared by every object of a study.
pub fn study_labels(namespace: &str, study: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.into(), MANAGED_BY.into()),
        (LABEL_COMPONENT.into(), component.into()),
        (LABEL_STUDY.into(), study.into()),
        (LABEL_STUDY_NAMESPACE.into(), namespace.into()),
    ])
}

/// Labels of a round's objects.
pub fn round_labels(
    namespace: &str,
    study: &str,
    component: &str,
    round: u32,
    attempt: u32,
) -> BTreeMap<String, String> {
    let mut l = study_labels(namespace, study, component);
    l.insert(LABEL_ROUND.into(), round.to_string());
    l.insert(LABEL_ATTEMPT.into(), attempt.to_string());
    l
}

/// A label selector string for `labels`.
pub fn selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_dns_labels_and_stable() {
        let long = "a".repeat(60);
        let id = study_id(&long, "study");
        assert!(id.len() <= 63, "{id}");
        assert_eq!(id, study_id(&long, "study"));
        assert_ne!(id, study_id(&long, "studz"));
        assert!(caduceus_pki::validate_study_id(&id).is_ok());
        assert!(hospital_id("north", "st-mary").starts_with("north-st-mary-"));
        assert!(caduceus_pki::validate_hospital_name(&hospital_id(&long, &long)).is_ok());
        assert!(caduceus_pki::validate_hospital_name(&hospital_id("north", "st-mary")).is_ok());
    }

    #[test]
    fn hospital_ids_do_not_collide() {
        // The plain `ns-name` join maps these two hospitals to one id.
        assert_ne!(hospital_id("north", "st-mary"), hospital_id("north-st", "mary"));
        let long = "a".repeat(63);
        assert_ne!(hospital_id(&long, "x"), hospital_id(&long, "y"));
        assert_eq!(hospital_id(&long, &long).len(), 63);
    }

    #[test]
    fn names_fit_kubernetes_limits() {
        let study = "s".repeat(40);
        let r = round_name(&study, 100_000, 100);
        assert!(aggregator_job(&r).len() <= 63);
        assert!(trainer_job("ns", &r, "h").len() <= 63);
        assert!(hospital_tls_secret("ns", &study, &"h".repeat(63)).len() <= 253);
        assert_eq!(round_name("x", 3, 0), "x-r3");
        assert_eq!(round_name("x", 3, 2), "x-r3-a2");
    }
}
