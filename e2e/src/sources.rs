//! Reading the objects a Pod refers to (Secrets, ConfigMaps, ServiceAccount tokens), cached per Pod
//! start attempt so that one container start reads each object once.

use std::collections::HashMap;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};

/// Why a container's configuration (env, volumes) could not be built. The kubelet reports these as
/// `CreateContainerConfigError` and retries, because the object may be created a moment later.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{kind} {namespace}/{name} not found")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("key {key:?} not found in {kind} {namespace}/{name}")]
    MissingKey {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("key {key:?} of {kind} {name} is not valid UTF-8 and cannot be an env value")]
    NotUtf8 {
        kind: &'static str,
        name: String,
        key: String,
    },
    #[error("{0} is not supported by localnode")]
    Unsupported(String),
    #[error("invalid {what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("reading {kind} {name}: {source}")]
    Api {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ConfigError {
    /// Errors that a later retry may fix (an object not created yet, an API hiccup).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConfigError::NotFound { .. } | ConfigError::MissingKey { .. } | ConfigError::Api { .. }
        )
    }
}

/// A per-Pod reader of referenced objects.
pub struct Sources {
    client: Client,
    namespace: String,
    secrets: HashMap<String, Option<Secret>>,
    config_maps: HashMap<String, Option<ConfigMap>>,
}

impl Sources {
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            secrets: HashMap::new(),
            config_maps: HashMap::new(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub async fn secret(&mut self, name: &str) -> Result<Option<&Secret>, ConfigError> {
        if !self.secrets.contains_key(name) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            let s = api.get_opt(name).await.map_err(|source| ConfigError::Api {
                kind: "Secret",
                name: name.to_string(),
                source,
            })?;
            self.secrets.insert(name.to_string(), s);
        }
        Ok(self.secrets[name].as_ref())
    }

    pub async fn config_map(&mut self, name: &str) -> Result<Option<&ConfigMap>, ConfigError> {
        if !self.config_maps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
            let c = api.get_opt(name).await.map_err(|source| ConfigError::Api {
                kind: "ConfigMap",
                name: name.to_string(),
                source,
            })?;
            self.config_maps.insert(name.to_string(), c);
        }
        Ok(self.config_maps[name].as_ref())
    }

    /// A Secret's data as (key, bytes), or `None` if it is missing and `optional`.
    pub async fn secret_data(
        &mut self,
        name: &str,
        optional: bool,
    ) -> Result<Option<Vec<(String, Vec<u8>)>>, ConfigError> {
        let ns = self.namespace.clone();
        match self.secret(name).await? {
            Some(s) => {
                let mut out: Vec<(String, Vec<u8>)> = s
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect();
                for (k, v) in s.string_data.iter().flatten() {
                    out.push((k.clone(), v.clone().into_bytes()));
                }
                Ok(Some(out))
            }
            None if optional => Ok(None),
            None => Err(ConfigError::NotFound {
                kind: "Secret",
                namespace: ns,
                name: name.to_string(),
            }),
        }
    }

    /// A ConfigMap's data (text and binary) as (key, bytes), or `None` if missing and `optional`.
    pub async fn config_map_data(
        &mut self,
        name: &str,
        optional: bool,
    ) -> Result<Option<Vec<(String, Vec<u8>)>>, ConfigError> {
        let ns = self.namespace.clone();
        match self.config_map(name).await? {
            Some(c) => {
                let mut out: Vec<(String, Vec<u8>)> = c
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.iter().flatten() {
                    out.push((k.clone(), v.0.clone()));
                }
                Ok(Some(out))
            }
            None if optional => Ok(None),
            None => Err(ConfigError::NotFound {
                kind: "ConfigMap",
                namespace: ns,
                name: name.to_string(),
            }),
        }
    }

    /// Requests a ServiceAccount token bound to the Pod (what the kubelet does for projected
    /// `serviceAccountToken` volume sources).
    pub async fn service_account_token(
        &self,
        pod: &Pod,
        audience: Option<&str>,
        expiration_seconds: Option<i64>,
    ) -> Result<String, ConfigError> {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_string());
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let req = TokenRequest {
            metadata: ObjectMeta::default(),
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                expiration_seconds: Some(expiration_seconds.unwrap_or(3607).max(600)),
                bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            status: None,
        };
        let resp: TokenRequest = api
            .create_subresource("token", &sa, &PostParams::default(), &req)
            .await
            .map_err(|source| ConfigError::Api {
                kind: "ServiceAccount token for",
                name: sa.clone(),
                source,
            })?;
        resp.status.map(|s| s.token).ok_or_else(|| ConfigError::Invalid {
            what: format!("token request for ServiceAccount {sa}"),
            detail: "the response has no status".into(),
        })
    }
}
