//! Trust between the coordinator and its sites: the sites CA (Secret `caduceus-sites-ca` in the
//! operator's namespace), the gateway's server certificate, one-time join tokens
//! (`caduceus-join-<id>`: the SHA-256 of the secret, the hospital, the expiry) and enrolment records
//! (`caduceus-site-<hospital>`: the SHA-256 of the certificate the site enrolled with).

use std::collections::BTreeMap;
use std::net::IpAddr;

use caduceus_pki::StudyCa;
use caduceus_pki::join::{self, JoinToken};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use crate::build;
use crate::context::{Error, Result};
use crate::names;

/// The sites CA's "study id" (its OU).
pub const SITES_CA_ID: &str = "caduceus-sites";
/// How long a site's client certificate lives.
pub const SITE_CERT_LIFETIME: time::Duration = time::Duration::days(365);
/// Key of the enrolment record: SHA-256 (hex) of the site certificate's DER.
const CERT_SHA256: &str = "cert-sha256";

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGED_BY.to_string()),
        (names::LABEL_COMPONENT.to_string(), component.to_string()),
    ])
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn now_unix() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

/// The SHA-256 (hex) of a certificate's DER.
pub fn cert_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The sites CA, created once (create-if-absent).
pub async fn ensure_sites_ca(client: &Client, operator_ns: &str) -> Result<StudyCa> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let s = match api.get_opt(names::SITES_CA_SECRET).await? {
        Some(s) => s,
        None => {
            let ca = StudyCa::generate(SITES_CA_ID, time::Duration::days(3650))?;
            let want = build::secret(
                names::SITES_CA_SECRET,
                operator_ns,
                labels("sites-ca"),
                None,
                &[
                    ("ca.crt", ca.cert_pem().as_bytes()),
                    ("ca.key", ca.key_pem().as_bytes()),
                ],
            );
            match api.create(&Default::default(), &want).await {
                Ok(s) => s,
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(names::SITES_CA_SECRET).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let (Some(cert), Some(key)) = (text(&s, "ca.crt"), text(&s, "ca.key")) else {
        return Err(Error::Other(format!(
            "Secret {operator_ns}/{} lacks ca.crt or ca.key",
            names::SITES_CA_SECRET
        )));
    };
    Ok(StudyCa::from_pem(SITES_CA_ID, &cert, &key)?)
}

/// The gateway's server certificate for `server_names` (DNS names and IP addresses), issued by the
/// sites CA at start-up (in memory only; the CA is what sites pin).
pub fn gateway_certificate(ca: &StudyCa, server_names: &[String]) -> Result<caduceus_pki::CertifiedPem> {
    let (ips, dns): (Vec<&String>, Vec<&String>) =
        server_names.iter().partition(|n| n.parse::<IpAddr>().is_ok());
    let ips: Vec<IpAddr> = ips.iter().filter_map(|n| n.parse().ok()).collect();
    let dns: Vec<String> = dns.into_iter().cloned().collect();
    Ok(ca.issue_server(&dns, &ips, time::Duration::days(30))?)
}

/// A new join token for `hospital`, valid `ttl_secs`; returns the token and the Secret manifest
/// (YAML) to apply in the site's operator namespace.
pub async fn create_join_token(
    client: &Client,
    operator_ns: &str,
    hospital: &str,
    ttl_secs: i64,
    gateway_address: &str,
) -> Result<(JoinToken, String)> {
    caduceus_pki::validate_hospital_name(hospital)?;
    let ca = ensure_sites_ca(client, operator_ns).await?;
    let token = JoinToken::generate()?;
    let expires = (now_unix() + ttl_secs).to_string();
    let hash = join::secret_hash(&token.secret);
    let want = build::secret(
        &format!("{}{}", names::JOIN_TOKEN_PREFIX, token.id),
        operator_ns,
        labels("join-token"),
        None,
        &[
            ("token-hash", hash.as_bytes()),
            ("hospital", hospital.as_bytes()),
            ("expires", expires.as_bytes()),
        ],
    );
    Api::<Secret>::namespaced(client.clone(), operator_ns)
        .create(&Default::default(), &want)
        .await?;
    let manifest = site_join_secret(&token, gateway_address, ca.cert_pem());
    Ok((token, manifest))
}

/// The Secret a site applies in its operator namespace to join (YAML).
pub fn site_join_secret(token: &JoinToken, gateway_address: &str, ca_pem: &str) -> String {
    let ca: String = ca_pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: caduceus-join\ntype: Opaque\nstringData:\n  token: {token}\n  gateway-address: {gateway_address}\n  ca.crt: |\n{ca}"
    )
}

/// Why an enrolment was refused (sent to the site as the gRPC status message).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("malformed join token: {0}")]
    Malformed(String),
    #[error("unknown or already used join token {0}")]
    Unknown(String),
    #[error("join token {0} expired")]
    Expired(String),
    #[error("join token {0} does not match")]
    Mismatch(String),
    #[error("the certificate request cannot be signed: {0}")]
    Csr(String),
    #[error("{0}")]
    Api(#[from] Error),
}

/// Trades a join token and a CSR for the site's certificate: checks the token (constant time, not
/// expired), deletes it (one use, guarded by its UID so two sites never both succeed), records the
/// enrolment, and returns `(hospital, certificate PEM, CA PEM)`.
pub async fn enrol(
    client: &Client,
    operator_ns: &str,
    token: &str,
    csr_pem: &str,
) -> Result<(String, String, String), Refusal> {
    let token = JoinToken::parse(token).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let name = format!("{}{}", names::JOIN_TOKEN_PREFIX, token.id);
    let s = api
        .get_opt(&name)
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Refusal::Unknown(token.id.clone()))?;
    let hash = text(&s, "token-hash").unwrap_or_default();
    if !join::verify_secret(&token.secret, &hash) {
        return Err(Refusal::Mismatch(token.id.clone()));
    }
    let expires: i64 = text(&s, "expires").and_then(|e| e.parse().ok()).unwrap_or(0);
    if expires < now_unix() {
        return Err(Refusal::Expired(token.id.clone()));
    }
    let hospital = text(&s, "hospital").unwrap_or_default();
    let ca = ensure_sites_ca(client, operator_ns).await?;
    let cert = ca
        .sign_csr(csr_pem, &hospital, SITE_CERT_LIFETIME)
        .map_err(|e| Refusal::Csr(e.to_string()))?;
    // One use: only the request that deletes this very Secret enrols.
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: s.uid(),
            resource_version: s.resource_version(),
        }),
        ..Default::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {
            return Err(Refusal::Unknown(token.id.clone()));
        }
        Err(e) => return Err(Error::from(e).into()),
    }
    let der = caduceus_pki::first_cert_der(&cert).map_err(Error::from)?;
    let record = build::secret(
        &enrolment_record(&hospital),
        operator_ns,
        labels("site-enrolment"),
        None,
        &[
            ("hospital", hospital.as_bytes()),
            (CERT_SHA256, cert_sha256(&der).as_bytes()),
        ],
    );
    crate::secrets::apply_secret(&api, &record).await?;
    tracing::info!(hospital, token = token.id, "site enrolled");
    Ok((hospital, cert, ca.cert_pem().to_string()))
}

/// The name of a hospital's enrolment record.
pub fn enrolment_record(hospital: &str) -> String {
    format!("{}{hospital}", names::ENROLMENT_PREFIX)
}

/// Whether `hospital` is enrolled with the certificate of SHA-256 `cert_sha256`.
pub async fn is_enrolled(
    client: &Client,
    operator_ns: &str,
    hospital: &str,
    cert_sha256: &str,
) -> Result<bool> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    Ok(api
        .get_opt(&enrolment_record(hospital))
        .await?
        .and_then(|s| text(&s, CERT_SHA256))
        .is_some_and(|h| h == cert_sha256))
}

/// Removes a hospital: deletes its enrolment record (its certificate is refused from now on and
/// its stream is cut at the gateway's next check) and its mirror.
pub async fn remove_site(client: &Client, operator_ns: &str, sites_ns: &str, hospital: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    match api
        .delete(&enrolment_record(hospital), &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    super::mirror::delete(client, sites_ns, hospital).await
}
