//! The site's identity: Secret `caduceus-site-identity` of the operator's namespace, holding the
//! client certificate and key the gateway knows this site by, the sites CA, the gateway's address,
//! the coordinator's name of this hospital, and the X25519 key study keys are sealed to. Made once,
//! by enrolling with the join Secret (`token`, `gateway-address`, `ca.crt`, from
//! `caduceus-operator join-token create` on the coordinator).

use std::collections::BTreeMap;
use std::time::Duration;

use caduceus_proto::v1::EnrolRequest;
use caduceus_proto::v1::site_gateway_client::SiteGatewayClient;
use caduceus_secagg::seal::SealKeyPair;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::build;
use crate::context::{Error, Result};
use crate::names;

pub const IDENTITY_SECRET: &str = "caduceus-site-identity";

/// What the identity Secret holds.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    /// `host:port` of the gateway.
    pub gateway_address: String,
    /// The coordinator's name of this hospital.
    pub hospital: String,
    pub seal: SealKeyPair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("gateway_address", &self.gateway_address)
            .field("hospital", &self.hospital)
            .finish_non_exhaustive()
    }
}

fn field(s: &Secret, key: &str) -> Result<String> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .map(|v| v.trim_end_matches('\n').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Error::Other(format!("Secret {} has no {key}", s.name_any())))
}

fn raw<'a>(s: &'a Secret, key: &str) -> Result<&'a [u8]> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .ok_or_else(|| Error::Other(format!("Secret {} has no {key}", s.name_any())))
}

fn parse(s: &Secret) -> Result<Identity> {
    let seal = SealKeyPair::from_bytes(raw(s, "seal.key")?)
        .map_err(|e| Error::Key(format!("Secret {}: seal.key: {e}", s.name_any())))?;
    Ok(Identity {
        cert_pem: field(s, "tls.crt")?,
        key_pem: field(s, "tls.key")?,
        ca_pem: field(s, "ca.crt")?,
        gateway_address: field(s, "gateway-address")?,
        hospital: field(s, "hospital")?,
        seal,
    })
}

/// `host:port` without a scheme or path.
pub fn authority(address: &str) -> &str {
    let a = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    a.split('/').next().unwrap_or(a)
}

/// The host part of a gateway address (`host:port`, `[v6]:port`, or a bare host): the name the
/// gateway's certificate must carry.
pub fn host_of(address: &str) -> String {
    let a = authority(address);
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => a.to_string(),
    }
}

/// A TLS channel to the gateway that verifies it with `ca_pem`; with a client identity when given.
pub async fn channel(address: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> anyhow::Result<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host_of(address));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    let ep = Endpoint::from_shared(format!("https://{}", authority(address)))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    Ok(ep.connect().await?)
}

/// The identity: read, or made by enrolling with the join Secret `join_secret` (operator namespace).
pub async fn ensure(
    client: &Client,
    operator_ns: &str,
    join_secret: &str,
    common_name: &str,
) -> anyhow::Result<Identity> {
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    if let Some(s) = api.get_opt(IDENTITY_SECRET).await? {
        let id = parse(&s)?;
        tracing::info!(
            hospital = id.hospital,
            gateway = id.gateway_address,
            "site identity loaded"
        );
        return Ok(id);
    }
    let join = api.get_opt(join_secret).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "this site is not enrolled (no Secret {operator_ns}/{IDENTITY_SECRET}) and has no join Secret {operator_ns}/{join_secret}: run `caduceus-operator join-token create` on the coordinator and apply its Secret here"
        )
    })?;
    let token = field(&join, "token")?;
    let address = field(&join, "gateway-address")?;
    let join_ca = field(&join, "ca.crt")?;
    let (key_pem, csr_pem) = caduceus_pki::site_key_and_csr(common_name)?;
    tracing::info!(gateway = address, "enrolling with the coordinator's gateway");
    let mut gw = SiteGatewayClient::new(channel(&address, &join_ca, None).await?);
    let resp = gw
        .enrol(EnrolRequest { token, csr_pem })
        .await
        .map_err(|s| {
            anyhow::anyhow!(
                "the gateway refused the enrolment: {:?}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    if resp.hospital.is_empty() || resp.cert_pem.is_empty() {
        anyhow::bail!("the gateway's enrolment answer has no hospital or certificate");
    }
    let ca_pem = if resp.ca_pem.is_empty() {
        join_ca
    } else {
        resp.ca_pem
    };
    let seal = SealKeyPair::generate().map_err(|e| Error::Key(e.to_string()))?;
    let seal_bytes = seal.to_bytes();
    let labels = BTreeMap::from([
        (names::LABEL_MANAGED_BY.to_string(), names::MANAGED_BY.to_string()),
        (names::LABEL_COMPONENT.to_string(), "site-identity".to_string()),
    ]);
    let s = build::secret(
        IDENTITY_SECRET,
        operator_ns,
        labels,
        None,
        &[
            ("tls.crt", resp.cert_pem.as_bytes()),
            ("tls.key", key_pem.as_bytes()),
            ("ca.crt", ca_pem.as_bytes()),
            ("gateway-address", address.as_bytes()),
            ("hospital", resp.hospital.as_bytes()),
            ("seal.key", seal_bytes.as_slice()),
        ],
    );
    let pp = PostParams {
        field_manager: Some(crate::FIELD_MANAGER.into()),
        ..Default::default()
    };
    let stored = match api.create(&pp, &s).await {
        Ok(s) => s,
        // Another replica enrolled first (the token is one-use, so ours could not have succeeded
        // too; keep the stored one).
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(IDENTITY_SECRET).await?,
        Err(e) => return Err(e.into()),
    };
    let id = parse(&stored)?;
    tracing::info!(
        hospital = id.hospital,
        gateway = id.gateway_address,
        "enrolled: site identity stored"
    );
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_name_is_the_host_of_its_address() {
        assert_eq!(host_of("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(host_of("gateway.example.org:7443"), "gateway.example.org");
        assert_eq!(
            host_of("https://gateway.example.org:7443/"),
            "gateway.example.org"
        );
        assert_eq!(host_of("gateway"), "gateway");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(authority("https://g:1/x"), "g:1");
        assert_eq!(authority("g:1"), "g:1");
    }
}
