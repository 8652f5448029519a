//! A container's environment, built the way the kubelet builds it: `envFrom` sources first, then
//! `env` entries in order (each `value` expanded against what is defined so far), the later
//! definition of a name winning.

use k8s_openapi::api::core::v1::{Container, Pod};

use crate::expand::expand_with;
use crate::sources::{ConfigError, Sources};

/// What the kubelet would fill in for fieldRef paths that depend on the node.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub node_name: String,
    pub host_ip: String,
    pub pod_ip: String,
}

fn format_map(m: Option<&std::collections::BTreeMap<String, String>>) -> String {
    // The kubelet's downward API format: one `key="value"` line per entry, sorted by key.
    m.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn subscript<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')?;
    rest.strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .or_else(|| rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
}

/// Resolves a downward-API `fieldRef.fieldPath`.
pub fn field_ref(pod: &Pod, path: &str, node: &NodeFacts) -> Result<String, ConfigError> {
    let md = &pod.metadata;
    let spec = pod.spec.as_ref();
    let v = match path {
        "metadata.name" => md.name.clone().unwrap_or_default(),
        "metadata.namespace" => md.namespace.clone().unwrap_or_default(),
        "metadata.uid" => md.uid.clone().unwrap_or_default(),
        "metadata.labels" => format_map(md.labels.as_ref()),
        "metadata.annotations" => format_map(md.annotations.as_ref()),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| node.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => node.host_ip.clone(),
        "status.podIP" | "status.podIPs" => node.pod_ip.clone(),
        _ => {
            if let Some(k) = subscript(path, "metadata.labels") {
                md.labels
                    .as_ref()
                    .and_then(|l| l.get(k).cloned())
                    .unwrap_or_default()
            } else if let Some(k) = subscript(path, "metadata.annotations") {
                md.annotations
                    .as_ref()
                    .and_then(|l| l.get(k).cloned())
                    .unwrap_or_default()
            } else {
                return Err(ConfigError::Unsupported(format!("fieldRef.fieldPath {path:?}")));
            }
        }
    };
    Ok(v)
}

/// A valid environment variable name as the API server accepts it (C identifier-ish, plus `.` `-`).
pub fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn push(env: &mut Vec<(String, String)>, name: String, value: String) {
    env.retain(|(k, _)| *k != name);
    env.push((name, value));
}

fn utf8(kind: &'static str, name: &str, key: &str, v: Vec<u8>) -> Result<String, ConfigError> {
    String::from_utf8(v).map_err(|_| ConfigError::NotUtf8 {
        kind,
        name: name.to_string(),
        key: key.to_string(),
    })
}

/// The container's own environment (without localnode's base variables), in definition order.
pub async fn container_env(
    pod: &Pod,
    container: &Container,
    sources: &mut Sources,
    node: &NodeFacts,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let ns = sources.namespace().to_string();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.secret_ref {
            sources
                .secret_data(&r.name, r.optional.unwrap_or(false))
                .await?
                .map(|d| ("Secret", r.name.clone(), d))
        } else if let Some(r) = &from.config_map_ref {
            sources
                .config_map_data(&r.name, r.optional.unwrap_or(false))
                .await?
                .map(|d| ("ConfigMap", r.name.clone(), d))
        } else {
            None
        };
        if let Some((kind, name, data)) = data {
            for (k, v) in data {
                let key = format!("{prefix}{k}");
                // The kubelet skips keys that are not valid variable names.
                if is_env_name(&key) {
                    push(&mut env, key, utf8(kind, &name, &k, v)?);
                }
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                match sources.secret_data(&r.name, optional).await? {
                    None => continue,
                    Some(data) => match data.into_iter().find(|(k, _)| *k == r.key) {
                        Some((_, v)) => utf8("Secret", &r.name, &r.key, v)?,
                        None if optional => continue,
                        None => {
                            return Err(ConfigError::MissingKey {
                                kind: "Secret",
                                namespace: ns,
                                name: r.name.clone(),
                                key: r.key.clone(),
                            });
                        }
                    },
                }
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                match sources.config_map_data(&r.name, optional).await? {
                    None => continue,
                    Some(data) => match data.into_iter().find(|(k, _)| *k == r.key) {
                        Some((_, v)) => utf8("ConfigMap", &r.name, &r.key, v)?,
                        None if optional => continue,
                        None => {
                            return Err(ConfigError::MissingKey {
                                kind: "ConfigMap",
                                namespace: ns,
                                name: r.name.clone(),
                                key: r.key.clone(),
                            });
                        }
                    },
                }
            } else if let Some(f) = &from.field_ref {
                field_ref(pod, &f.field_path, node)?
            } else if from.resource_field_ref.is_some() {
                return Err(ConfigError::Unsupported(format!(
                    "env {:?}: valueFrom.resourceFieldRef",
                    var.name
                )));
            } else {
                return Err(ConfigError::Unsupported(format!(
                    "env {:?}: this valueFrom source",
                    var.name
                )));
            }
        } else {
            expand_with(var.value.as_deref().unwrap_or(""), &env)
        };
        push(&mut env, var.name.clone(), value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "x".to_string())].into()),
                annotations: Some(
                    [
                        ("b".to_string(), "2".to_string()),
                        ("a".to_string(), "say \"hi\"".to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                service_account_name: Some("sa".into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            node_name: "n1".into(),
            host_ip: "127.0.0.1".into(),
            pod_ip: "127.0.0.1".into(),
        }
    }

    #[test]
    fn field_refs() {
        let p = pod();
        let f = facts();
        let get = |path: &str| field_ref(&p, path, &f).unwrap();
        assert_eq!(get("metadata.name"), "p");
        assert_eq!(get("metadata.namespace"), "ns");
        assert_eq!(get("metadata.uid"), "u-1");
        assert_eq!(get("spec.nodeName"), "n1");
        assert_eq!(get("spec.serviceAccountName"), "sa");
        assert_eq!(get("status.podIP"), "127.0.0.1");
        assert_eq!(get("status.hostIP"), "127.0.0.1");
        assert_eq!(get("metadata.labels['app']"), "x");
        assert_eq!(get("metadata.labels['nope']"), "");
        assert_eq!(get("metadata.annotations"), "a=\"say \\\"hi\\\"\"\nb=\"2\"");
        assert!(matches!(
            field_ref(&p, "spec.containers", &f),
            Err(ConfigError::Unsupported(_))
        ));
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("A_B"));
        assert!(is_env_name("a.b-c"));
        assert!(!is_env_name("1A"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("A B"));
    }
}
