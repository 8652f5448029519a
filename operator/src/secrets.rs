//! The study's secrets: its certificate authority (one per study, in a Secret of the operator's own
//! namespace, so that nobody who can read Secrets or start pods in the study's namespace can mint a
//! hospital certificate; renewed when less than a third of its lifetime is left, with the previous
//! CA kept in the trust bundle until it expires), the aggregator's server certificate (for the Service's DNS name), one client
//! certificate per hospital (in the hospital's namespace), and the TFHE study key (a master copy in
//! the operator's namespace, a copy per hospital mounted only by its trainer pods). Certificates
//! are renewed when less than a third of their lifetime is left; a hospital that leaves a study loses
//! its certificate and key Secrets.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use caduceus_crds::FederatedStudy;
use caduceus_pki::{CertifiedPem, StudyCa};
use caduceus_secagg::StudyKey;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use crate::build;
use crate::context::{Error, Result};
use crate::names;

pub const CA_LIFETIME: time::Duration = time::Duration::days(365);
pub const LEAF_LIFETIME: time::Duration = time::Duration::days(30);

fn data<'a>(s: &'a Secret, key: &str) -> Option<&'a [u8]> {
    s.data.as_ref()?.get(key).map(|b| b.0.as_slice())
}

fn text(s: &Secret, key: &str) -> Option<String> {
    data(s, key).and_then(|b| String::from_utf8(b.to_vec()).ok())
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether a certificate must be (re)issued: missing, unreadable, signed by another CA, or with
/// less than a third of its lifetime left.
pub fn needs_renewal(cert_pem: Option<&str>, ca_pem: Option<&str>, current_ca: &str, now: i64) -> bool {
    let (Some(cert), Some(ca)) = (cert_pem, ca_pem) else {
        return true;
    };
    if ca != current_ca {
        return true;
    }
    match caduceus_pki::validity_window(cert) {
        Ok((from, to)) => now + (to - from) / 3 >= to,
        Err(_) => true,
    }
}

async fn create_or_get(api: &Api<Secret>, s: &Secret) -> Result<Secret> {
    match api
        .create(
            &PostParams {
                field_manager: Some(crate::FIELD_MANAGER.into()),
                ..Default::default()
            },
            s,
        )
        .await
    {
        Ok(s) => Ok(s),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(api.get(&s.name_any()).await?),
        Err(e) => Err(e.into()),
    }
}

/// Writes a Secret by server-side apply under the operator's field manager.
pub(crate) async fn apply_secret(api: &Api<Secret>, s: &Secret) -> Result<Secret> {
    apply(api, s).await
}

async fn apply(api: &Api<Secret>, s: &Secret) -> Result<Secret> {
    Ok(api
        .patch(
            &s.name_any(),
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(s),
        )
        .await?)
}

/// The study's CA and the trust bundle (current CA, then the previous one while it is valid).
pub struct StudyTrust {
    pub ca: StudyCa,
    pub bundle: String,
}

/// Whether a CA certificate must be replaced: unreadable, or less than a third of its lifetime left.
pub fn ca_needs_renewal(cert_pem: &str, now: i64) -> bool {
    match caduceus_pki::validity_window(cert_pem) {
        Ok((from, to)) => now + (to - from) / 3 >= to,
        Err(_) => true,
    }
}

/// The study's CA, in the operator's namespace: created once (create-if-absent, so two reconciles
/// never make two CAs) and renewed before it expires.
pub async fn ensure_ca(client: &Client, operator_ns: &str, study: &FederatedStudy) -> Result<StudyTrust> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let id = names::study_id(&ns, &name);
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let secret_name = names::ca_secret(&ns, &name);
    let new_secret = |ca: &StudyCa, previous: Option<&str>| {
        let mut data: Vec<(&str, &[u8])> = vec![
            ("ca.crt", ca.cert_pem().as_bytes()),
            ("ca.key", ca.key_pem().as_bytes()),
        ];
        if let Some(p) = previous {
            data.push(("previous.crt", p.as_bytes()));
        }
        build::secret(
            &secret_name,
            operator_ns,
            names::study_labels(&ns, &name, "ca"),
            None,
            &data,
        )
    };
    let existing = match api.get_opt(&secret_name).await? {
        Some(s) => s,
        None => {
            let ca = StudyCa::generate(&id, CA_LIFETIME)?;
            let s = create_or_get(&api, &new_secret(&ca, None)).await?;
            // Earlier versions kept the CA, key included, in the study's namespace: remove it.
            let legacy: Api<Secret> = Api::namespaced(client.clone(), &ns);
            match legacy
                .delete(&names::legacy_ca_secret(&name), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            s
        }
    };
    let (Some(mut cert), Some(mut key)) = (text(&existing, "ca.crt"), text(&existing, "ca.key")) else {
        return Err(Error::Other(format!(
            "Secret {operator_ns}/{secret_name} lacks ca.crt or ca.key"
        )));
    };
    let mut previous = text(&existing, "previous.crt");
    if ca_needs_renewal(&cert, now_unix()) {
        let ca = StudyCa::generate(&id, CA_LIFETIME)?;
        apply(&api, &new_secret(&ca, Some(&cert))).await?;
        previous = Some(cert);
        cert = ca.cert_pem().to_string();
        key = ca.key_pem().to_string();
    }
    let ca = StudyCa::from_pem(&id, &cert, &key)?;
    let mut bundle = cert.clone();
    if let Some(p) =
        previous.filter(|p| caduceus_pki::validity_window(p).is_ok_and(|(_, to)| to > now_unix()))
    {
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&p);
    }
    Ok(StudyTrust { ca, bundle })
}

/// The aggregator's server certificate; `true` when it was (re)issued.
pub async fn ensure_aggregator_tls(
    client: &Client,
    study: &FederatedStudy,
    trust: &StudyTrust,
) -> Result<bool> {
    let ca = &trust.ca;
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = names::aggregator_tls_secret(&name);
    let cur = api.get_opt(&secret_name).await?;
    if !needs_renewal(
        cur.as_ref().and_then(|s| text(s, "tls.crt")).as_deref(),
        cur.as_ref().and_then(|s| text(s, "ca.crt")).as_deref(),
        &trust.bundle,
        now_unix(),
    ) {
        return Ok(false);
    }
    let dns = names::service_dns(&name, &ns);
    let dns_names = vec![dns.clone(), format!("{dns}.cluster.local"), names::service(&name)];
    let CertifiedPem { cert_pem, key_pem } =
        ca.issue_server(&dns_names, &[IpAddr::V4(Ipv4Addr::LOCALHOST)], LEAF_LIFETIME)?;
    let s = build::secret(
        &secret_name,
        &ns,
        names::study_labels(&ns, &name, "aggregator"),
        Some(build::controller_ref(study)),
        &[
            ("tls.crt", cert_pem.as_bytes()),
            ("tls.key", key_pem.as_bytes()),
            ("ca.crt", trust.bundle.as_bytes()),
        ],
    );
    apply(&api, &s).await?;
    Ok(true)
}

fn hospital_labels(study: &FederatedStudy, hospital: &str, component: &str) -> BTreeMap<String, String> {
    let mut l = names::study_labels(
        &study.namespace().unwrap_or_default(),
        &study.name_any(),
        component,
    );
    l.insert(names::LABEL_HOSPITAL.into(), hospital.into());
    l
}

/// A hospital's client certificate for the study, in its namespace; `true` when (re)issued.
pub async fn ensure_hospital_tls(
    client: &Client,
    study: &FederatedStudy,
    trust: &StudyTrust,
    hospital_ns: &str,
    hospital: &str,
) -> Result<bool> {
    let ca = &trust.ca;
    let sns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let api: Api<Secret> = Api::namespaced(client.clone(), hospital_ns);
    let secret_name = names::hospital_tls_secret(&sns, &name, hospital);
    let cur = api.get_opt(&secret_name).await?;
    if !needs_renewal(
        cur.as_ref().and_then(|s| text(s, "tls.crt")).as_deref(),
        cur.as_ref().and_then(|s| text(s, "ca.crt")).as_deref(),
        &trust.bundle,
        now_unix(),
    ) {
        return Ok(false);
    }
    let id = names::hospital_id(hospital_ns, hospital);
    let CertifiedPem { cert_pem, key_pem } = ca.issue_hospital(&id, LEAF_LIFETIME)?;
    let s = build::secret(
        &secret_name,
        hospital_ns,
        hospital_labels(study, hospital, "client-certificate"),
        None,
        &[
            ("tls.crt", cert_pem.as_bytes()),
            ("tls.key", key_pem.as_bytes()),
            ("ca.crt", trust.bundle.as_bytes()),
        ],
    );
    apply(&api, &s).await?;
    Ok(true)
}

/// The study's TFHE key (created once, in the operator's namespace) and its public fingerprint.
pub async fn ensure_master_key(
    client: &Client,
    operator_ns: &str,
    study: &FederatedStudy,
) -> Result<(Vec<u8>, String)> {
    let sns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let api: Api<Secret> = Api::namespaced(client.clone(), operator_ns);
    let secret_name = names::master_key_secret(&sns, &name);
    let s = match api.get_opt(&secret_name).await? {
        Some(s) => s,
        None => {
            let key =
                StudyKey::generate(&names::study_id(&sns, &name)).map_err(|e| Error::Key(e.to_string()))?;
            let bytes = key.to_bytes();
            let s = build::secret(
                &secret_name,
                operator_ns,
                names::study_labels(&sns, &name, "study-key"),
                None,
                &[("study.key", bytes.as_slice())],
            );
            create_or_get(&api, &s).await?
        }
    };
    let bytes = data(&s, "study.key")
        .ok_or_else(|| Error::Key(format!("Secret {operator_ns}/{secret_name} has no study.key")))?
        .to_vec();
    let key = StudyKey::from_bytes(&bytes)
        .map_err(|e| Error::Key(format!("Secret {operator_ns}/{secret_name}: {e}")))?;
    Ok((bytes, key.fingerprint().to_string()))
}

/// The study key's copy in a hospital's namespace.
pub async fn ensure_hospital_key(
    client: &Client,
    study: &FederatedStudy,
    hospital_ns: &str,
    hospital: &str,
    key: &[u8],
) -> Result<()> {
    let sns = study.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), hospital_ns);
    let secret_name = names::hospital_key_secret(&sns, &study.name_any(), hospital);
    if let Some(s) = api.get_opt(&secret_name).await?
        && data(&s, "study.key") == Some(key)
    {
        return Ok(());
    }
    let s = build::secret(
        &secret_name,
        hospital_ns,
        hospital_labels(study, hospital, "study-key"),
        None,
        &[("study.key", key)],
    );
    apply(&api, &s).await?;
    Ok(())
}

/// Removes a hospital's certificate and key for the study (it left the study).
pub async fn revoke_hospital(
    client: &Client,
    study: &FederatedStudy,
    hospital_ns: &str,
    hospital: &str,
) -> Result<bool> {
    let sns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let api: Api<Secret> = Api::namespaced(client.clone(), hospital_ns);
    let mut removed = false;
    for n in [
        names::hospital_tls_secret(&sns, &name, hospital),
        names::hospital_key_secret(&sns, &name, hospital),
    ] {
        match api.delete(&n, &DeleteParams::default()).await {
            Ok(_) => removed = true,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(removed)
}

/// `namespace/hospital` of every hospital that holds Secrets of the study, looked for in `namespaces`
/// (`None`: cluster-wide).
pub async fn hospitals_with_secrets(
    client: &Client,
    study: &FederatedStudy,
    namespaces: Option<&std::collections::BTreeSet<String>>,
) -> Result<Vec<String>> {
    let sns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let lp = ListParams::default().labels(&format!(
        "{}={name},{}={sns},{}",
        names::LABEL_STUDY,
        names::LABEL_STUDY_NAMESPACE,
        names::LABEL_HOSPITAL
    ));
    let mut v: Vec<String> = Vec::new();
    let apis: Vec<Api<Secret>> = match namespaces {
        None => vec![Api::all(client.clone())],
        Some(ns) => ns.iter().map(|n| Api::namespaced(client.clone(), n)).collect(),
    };
    for api in apis {
        v.extend(api.list_metadata(&lp).await?.items.iter().filter_map(|s| {
            let h = s.metadata.labels.as_ref()?.get(names::LABEL_HOSPITAL)?;
            Some(names::hospital_ref(s.metadata.namespace.as_deref()?, h))
        }));
    }
    v.sort();
    v.dedup();
    Ok(v)
}

/// The trainer's ServiceAccount in a hospital namespace (server-side apply: idempotent).
pub async fn ensure_trainer_service_account(client: &Client, hospital_ns: &str) -> Result<()> {
    let sa = build::trainer_service_account(hospital_ns);
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), hospital_ns)
        .patch(
            names::TRAINER_SERVICE_ACCOUNT,
            &PatchParams::apply(crate::FIELD_MANAGER).force(),
            &Patch::Apply(&sa),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_renewed_before_it_expires() {
        let ca = StudyCa::generate("s", CA_LIFETIME).unwrap();
        let (from, to) = caduceus_pki::validity_window(ca.cert_pem()).unwrap();
        assert!(!ca_needs_renewal(ca.cert_pem(), from + 60));
        assert!(ca_needs_renewal(ca.cert_pem(), to - (to - from) / 4));
        assert!(ca_needs_renewal("garbage", from));
    }

    #[test]
    fn renewal_rules() {
        let ca = StudyCa::generate("s", CA_LIFETIME).unwrap();
        let leaf = ca.issue_hospital("h", LEAF_LIFETIME).unwrap();
        let (from, to) = caduceus_pki::validity_window(&leaf.cert_pem).unwrap();
        assert!(!needs_renewal(
            Some(&leaf.cert_pem),
            Some(ca.cert_pem()),
            ca.cert_pem(),
            from + 60
        ));
        assert!(needs_renewal(
            Some(&leaf.cert_pem),
            Some(ca.cert_pem()),
            ca.cert_pem(),
            to - (to - from) / 4
        ));
        let other = StudyCa::generate("s", CA_LIFETIME).unwrap();
        assert!(needs_renewal(
            Some(&leaf.cert_pem),
            Some(ca.cert_pem()),
            other.cert_pem(),
            from + 60
        ));
        assert!(needs_renewal(None, Some(ca.cert_pem()), ca.cert_pem(), from));
        assert!(needs_renewal(
            Some("garbage"),
            Some(ca.cert_pem()),
            ca.cert_pem(),
            from
        ));
    }
}
