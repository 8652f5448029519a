//! Materialising a Pod's volumes on the host.
//!
//! Every volume becomes a host directory (or, for a `hostPath` of a file, a host file):
//! - `emptyDir`, `secret`, `configMap`, `downwardAPI`, `projected` (including the ServiceAccount
//!   token volume that admission injects): `<pod dir>/volumes/<volume name>/`, written once when the
//!   Pod starts (no live updates);
//! - `persistentVolumeClaim`: `<state dir>/pvcs/<namespace>/<claimName>/`, created if missing and
//!   kept after the Pod (so data survives like a PV does);
//! - `hostPath`: the path itself.
//!
//! Containers reach them through path rewriting (see [`crate::rewrite`]). `readOnly` cannot be
//! enforced: processes run with localnode's user (root in CI), and root ignores file permissions.
//! Secret, ConfigMap and downward-API files get their `defaultMode`/`mode` (0644 by default).

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{KeyToPath, Pod, Volume};

use crate::env::{NodeFacts, field_ref};
use crate::sources::{ConfigError, Sources};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ConfigError + '_ {
    move |source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks that a file path inside a volume is relative and does not climb out of it.
pub fn safe_relative(p: &str) -> Result<&Path, ConfigError> {
    let path = Path::new(p);
    let ok = !p.is_empty()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if ok {
        Ok(path)
    } else {
        Err(ConfigError::Invalid {
            what: format!("volume item path {p:?}"),
            detail: "must be relative and must not contain '..'".into(),
        })
    }
}

fn write_file(dir: &Path, rel: &str, data: &[u8], mode: i32) -> Result<(), ConfigError> {
    let path = dir.join(safe_relative(rel)?);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    // Replace a file left by an earlier attempt even if it was made read-only.
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, data).map_err(io(&path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode((mode & 0o777) as u32))
        .map_err(io(&path))?;
    Ok(())
}

/// Selects which keys to write: all of them, or the listed `items` (each must exist unless optional).
fn select_items(
    kind: &'static str,
    namespace: &str,
    name: &str,
    data: Vec<(String, Vec<u8>)>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: i32,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>, i32)>, ConfigError> {
    match items {
        None => Ok(data.into_iter().map(|(k, v)| (k, v, default_mode)).collect()),
        Some(items) => {
            let mut out = Vec::new();
            for item in items {
                match data.iter().find(|(k, _)| *k == item.key) {
                    Some((_, v)) => {
                        out.push((item.path.clone(), v.clone(), item.mode.unwrap_or(default_mode)))
                    }
                    None if optional => {}
                    None => {
                        return Err(ConfigError::MissingKey {
                            kind,
                            namespace: namespace.to_string(),
                            name: name.to_string(),
                            key: item.key.clone(),
                        });
                    }
                }
            }
            Ok(out)
        }
    }
}

/// The host location of each volume of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialisedVolume {
    pub name: String,
    pub host_path: PathBuf,
}

/// Where a PVC's data lives on the host.
pub fn pvc_dir(state_dir: &Path, namespace: &str, claim: &str) -> PathBuf {
    state_dir.join("pvcs").join(namespace).join(claim)
}

const DEFAULT_MODE: i32 = 0o644;

/// Writes every volume of `pod` and returns where each one lies.
pub async fn materialise(
    pod: &Pod,
    pod_dir: &Path,
    state_dir: &Path,
    sources: &mut Sources,
    node: &NodeFacts,
) -> Result<Vec<MaterialisedVolume>, ConfigError> {
    let ns = sources.namespace().to_string();
    let mut out = Vec::new();
    let volumes: &[Volume] = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or(&[]);
    for v in volumes {
        let own_dir = pod_dir.join("volumes").join(&v.name);
        let host_path = if v.empty_dir.is_some() {
            std::fs::create_dir_all(&own_dir).map_err(io(&own_dir))?;
            own_dir
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let optional = s.optional.unwrap_or(false);
            let mode = s.default_mode.unwrap_or(DEFAULT_MODE);
            let files = match sources.secret_data(&name, optional).await? {
                Some(data) => select_items("Secret", &ns, &name, data, s.items.as_ref(), mode, optional)?,
                None => Vec::new(),
            };
            write_dir(&own_dir, files)?;
            own_dir
        } else if let Some(c) = &v.config_map {
            let name = c.name.clone();
            let optional = c.optional.unwrap_or(false);
            let mode = c.default_mode.unwrap_or(DEFAULT_MODE);
            let files = match sources.config_map_data(&name, optional).await? {
                Some(data) => select_items("ConfigMap", &ns, &name, data, c.items.as_ref(), mode, optional)?,
                None => Vec::new(),
            };
            write_dir(&own_dir, files)?;
            own_dir
        } else if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(DEFAULT_MODE);
            let mut files = Vec::new();
            for item in d.items.iter().flatten() {
                files.push(downward_item(pod, item, mode, node)?);
            }
            write_dir(&own_dir, files)?;
            own_dir
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(DEFAULT_MODE);
            let mut files = Vec::new();
            for src in p.sources.iter().flatten() {
                if let Some(s) = &src.secret {
                    let optional = s.optional.unwrap_or(false);
                    if let Some(data) = sources.secret_data(&s.name, optional).await? {
                        files.extend(select_items(
                            "Secret",
                            &ns,
                            &s.name,
                            data,
                            s.items.as_ref(),
                            mode,
                            optional,
                        )?);
                    }
                } else if let Some(c) = &src.config_map {
                    let optional = c.optional.unwrap_or(false);
                    if let Some(data) = sources.config_map_data(&c.name, optional).await? {
                        files.extend(select_items(
                            "ConfigMap",
                            &ns,
                            &c.name,
                            data,
                            c.items.as_ref(),
                            mode,
                            optional,
                        )?);
                    }
                } else if let Some(d) = &src.downward_api {
                    for item in d.items.iter().flatten() {
                        files.push(downward_item(pod, item, mode, node)?);
                    }
                } else if let Some(t) = &src.service_account_token {
                    let token = sources
                        .service_account_token(pod, t.audience.as_deref(), t.expiration_seconds)
                        .await?;
                    files.push((t.path.clone(), token.into_bytes(), 0o600));
                } else {
                    return Err(ConfigError::Unsupported(format!(
                        "a projected source of volume {:?} (only secret, configMap, downwardAPI and serviceAccountToken are)",
                        v.name
                    )));
                }
            }
            write_dir(&own_dir, files)?;
            own_dir
        } else if let Some(c) = &v.persistent_volume_claim {
            let dir = pvc_dir(state_dir, &ns, &c.claim_name);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            dir
        } else if let Some(h) = &v.host_path {
            let path = PathBuf::from(&h.path);
            match h.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => std::fs::create_dir_all(&path).map_err(io(&path))?,
                "FileOrCreate" if !path.exists() => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(io(parent))?;
                    }
                    std::fs::write(&path, b"").map_err(io(&path))?;
                }
                "Directory" if !path.is_dir() => {
                    return Err(ConfigError::Invalid {
                        what: format!("hostPath volume {:?}", v.name),
                        detail: format!("{} is not a directory", h.path),
                    });
                }
                "File" if !path.is_file() => {
                    return Err(ConfigError::Invalid {
                        what: format!("hostPath volume {:?}", v.name),
                        detail: format!("{} is not a file", h.path),
                    });
                }
                _ => {}
            }
            path
        } else {
            return Err(ConfigError::Unsupported(format!(
                "the source of volume {:?} (localnode supports emptyDir, secret, configMap, downwardAPI, projected, persistentVolumeClaim and hostPath)",
                v.name
            )));
        };
        out.push(MaterialisedVolume {
            name: v.name.clone(),
            host_path,
        });
    }
    Ok(out)
}

fn downward_item(
    pod: &Pod,
    item: &k8s_openapi::api::core::v1::DownwardAPIVolumeFile,
    mode: i32,
    node: &NodeFacts,
) -> Result<(String, Vec<u8>, i32), ConfigError> {
    let value = match (&item.field_ref, &item.resource_field_ref) {
        (Some(f), _) => field_ref(pod, &f.field_path, node)?,
        (None, Some(_)) => {
            return Err(ConfigError::Unsupported(format!(
                "downwardAPI item {:?}: resourceFieldRef",
                item.path
            )));
        }
        (None, None) => String::new(),
    };
    Ok((item.path.clone(), value.into_bytes(), item.mode.unwrap_or(mode)))
}

fn write_dir(dir: &Path, files: Vec<(String, Vec<u8>, i32)>) -> Result<(), ConfigError> {
    if dir.exists() {
        // A retry rewrites the volume from scratch.
        make_writable(dir);
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (rel, data, mode) in files {
        write_file(dir, &rel, &data, mode)?;
    }
    Ok(())
}

/// Restores owner write permission below `dir`, so that a non-root localnode can delete it.
pub fn make_writable(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if let Ok(md) = std::fs::symlink_metadata(&p) {
                if md.is_dir() {
                    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755));
                    make_writable(&p);
                } else if md.is_file() {
                    let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_only() {
        assert!(safe_relative("a/b.txt").is_ok());
        assert!(safe_relative("./a").is_ok());
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative("").is_err());
    }

    #[test]
    fn item_selection() {
        let data = vec![("a".to_string(), b"1".to_vec()), ("b".to_string(), b"2".to_vec())];
        let all = select_items("Secret", "ns", "s", data.clone(), None, 0o600, false).unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|(_, _, m)| *m == 0o600));
        let items = vec![KeyToPath {
            key: "b".into(),
            path: "sub/bee".into(),
            mode: Some(0o400),
        }];
        let sel = select_items("Secret", "ns", "s", data.clone(), Some(&items), 0o644, false).unwrap();
        assert_eq!(sel, vec![("sub/bee".to_string(), b"2".to_vec(), 0o400)]);
        let missing = vec![KeyToPath {
            key: "zz".into(),
            path: "z".into(),
            mode: None,
        }];
        let err = select_items("Secret", "ns", "s", data.clone(), Some(&missing), 0o644, false).unwrap_err();
        assert!(err.to_string().contains("\"zz\""), "{err}");
        assert!(
            select_items("Secret", "ns", "s", data, Some(&missing), 0o644, true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn writes_files_with_modes_and_rewrites_on_retry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("v");
        write_dir(&dir, vec![("x/y".into(), b"hi".to_vec(), 0o400)]).unwrap();
        let f = dir.join("x/y");
        assert_eq!(std::fs::read(&f).unwrap(), b"hi");
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o400);
        write_dir(&dir, vec![("z".into(), b"2".to_vec(), 0o644)]).unwrap();
        assert!(!f.exists());
        assert_eq!(std::fs::read(dir.join("z")).unwrap(), b"2");
        assert!(write_dir(&dir, vec![("../esc".into(), b"".to_vec(), 0o644)]).is_err());
    }
}
