//! The coordinator's copy of a site's `HospitalClient`: `<sites namespace>/<hospital>`, annotated
//! `fl.caduceus.dev/mirror-of: site`, its spec copied from the site's `SiteHello` (the site remains
//! the authority: it checks every assignment against its own object and ledger). Its readiness is
//! the annotation `fl.caduceus.dev/site-ready` (`True`, `NotReady`, `Disconnected`), which the
//! hospital controller turns into the `Ready` condition.

use std::collections::BTreeMap;

use caduceus_crds::{HospitalClient, HospitalClientSpec};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::json;

use crate::context::{Error, Result};
use crate::names;

/// The field manager of the gateway's writes to mirrors.
pub const FIELD_MANAGER: &str = "caduceus-gateway";

/// Readiness values of the `site-ready` annotation.
pub const READY: &str = "True";
pub const NOT_READY: &str = "NotReady";
pub const DISCONNECTED: &str = "Disconnected";

/// Whether a HospitalClient is a coordinator's mirror of a site.
pub fn is_mirror(h: &HospitalClient) -> bool {
    h.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_MIRROR_OF))
        .is_some_and(|v| v == "site")
}

/// `Ready` of a mirror from its annotation (pure).
pub fn readiness(h: &HospitalClient) -> (&'static str, &'static str, String) {
    use caduceus_crds::conditions::status as cstatus;
    match h
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(names::ANNOTATION_SITE_READY))
        .map(String::as_str)
    {
        Some(READY) => (
            cstatus::TRUE,
            "SiteReady",
            "the site is connected and reports its data ready".into(),
        ),
        Some(NOT_READY) => (
            cstatus::FALSE,
            "SiteNotReady",
            "the site is connected but reports itself not ready".into(),
        ),
        Some(DISCONNECTED) => (
            cstatus::FALSE,
            "SiteDisconnected",
            "the site's stream to the gateway is closed".into(),
        ),
        _ => (
            cstatus::FALSE,
            "SiteNotConnected",
            "the site has not connected yet".into(),
        ),
    }
}

/// Creates or updates the mirror of `hospital` from its `SiteHello`.
///
/// # Errors
/// A spec that does not parse as a `HospitalClientSpec` (named in the message), or an API error.
pub async fn upsert(
    client: &Client,
    sites_ns: &str,
    hospital: &str,
    spec_json: &str,
    site_labels: &BTreeMap<String, String>,
    ready: bool,
) -> Result<()> {
    let spec: HospitalClientSpec = serde_json::from_str(spec_json).map_err(|e| {
        Error::Other(format!(
            "the HospitalClient spec that site {hospital} sent does not parse: {e}"
        ))
    })?;
    let mut labels: BTreeMap<String, String> = site_labels
        .iter()
        .filter(|(k, _)| !k.starts_with("fl.caduceus.dev/") && !k.starts_with("app.kubernetes.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(names::LABEL_SITE.into(), hospital.into());
    let patch = json!({
        "apiVersion": HospitalClient::api_version(&()),
        "kind": HospitalClient::kind(&()),
        "metadata": {
            "name": hospital,
            "namespace": sites_ns,
            "labels": labels,
            "annotations": {
                names::ANNOTATION_MIRROR_OF: "site",
                names::ANNOTATION_SITE_READY: if ready { READY } else { NOT_READY },
            },
        },
        "spec": spec,
    });
    Api::<HospitalClient>::namespaced(client.clone(), sites_ns)
        .patch(
            hospital,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

/// Marks a mirror's site as disconnected (no-op when the mirror is gone).
pub async fn mark_disconnected(client: &Client, sites_ns: &str, hospital: &str) -> Result<()> {
    let patch = json!({"metadata": {"annotations": {names::ANNOTATION_SITE_READY: DISCONNECTED}}});
    match Api::<HospitalClient>::namespaced(client.clone(), sites_ns)
        .patch(hospital, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a mirror. Its ledger is only a planning copy, so the finalizer is told to forget it.
pub async fn delete(client: &Client, sites_ns: &str, hospital: &str) -> Result<()> {
    let api = Api::<HospitalClient>::namespaced(client.clone(), sites_ns);
    let forget = json!({"metadata": {"annotations": {names::ANNOTATION_FORGET_LEDGER: "true"}}});
    match api
        .patch(hospital, &PatchParams::default(), &Patch::Merge(&forget))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    match api.delete(hospital, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
