//! The study's finalizer: deletes what owner references cannot reach — trainer Jobs and Secrets
//! in the hospitals' namespaces, the study CA and the key's master copy in the operator's namespace.

use std::sync::Arc;

use caduceus_crds::FederatedStudy;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::runtime::controller::Action;

use crate::context::{Context, Result};
use crate::names;

/// Deletes every `K` that matches `lp` outside namespace `keep` (already gone counts as deleted).
async fn delete_outside<K>(
    client: &kube::Client,
    namespaces: Option<&std::collections::BTreeSet<String>>,
    keep: &str,
    lp: &ListParams,
    dp: &DeleteParams,
) -> Result<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let mut items = Vec::new();
    match namespaces {
        None => items.extend(Api::<K>::all(client.clone()).list_metadata(lp).await?.items),
        Some(all) => {
            for n in all {
                items.extend(
                    Api::<K>::namespaced(client.clone(), n)
                        .list_metadata(lp)
                        .await?
                        .items,
                );
            }
        }
    }
    for o in items {
        let ns = o.metadata.namespace.clone().unwrap_or_default();
        if ns == keep {
            continue;
        }
        match Api::<K>::namespaced(client.clone(), &ns)
            .delete(&o.name_any(), dp)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Deletes what the study owns outside its namespace (owner references cover the rest).
pub async fn cleanup(study: Arc<FederatedStudy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = study.namespace().unwrap_or_default();
    let name = study.name_any();
    let lp = ListParams::default().labels(&format!(
        "{}={name},{}={ns}",
        names::LABEL_STUDY,
        names::LABEL_STUDY_NAMESPACE
    ));
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..Default::default()
    };
    // Trainer Jobs live in the served namespaces; Secrets there and in the operator's own (CA, key).
    let served = ctx.settings.watch_namespaces.clone();
    delete_outside::<Job>(&ctx.client, served.as_ref(), &ns, &lp, &dp).await?;
    let with_own = ctx.namespaces();
    delete_outside::<Secret>(&ctx.client, with_own.as_ref(), &ns, &lp, &dp).await?;
    ctx.metrics.forget_study(&ns, &name);
    ctx.event(
        &*study,
        false,
        "CleanedUp",
        "Delete",
        "deleted the study's trainer Jobs, certificates, CA and keys in other namespaces".into(),
    )
    .await;
    Ok(Action::await_change())
}
