//! What one container process starts with: program, arguments, environment, working directory, and
//! the rewriting of its mount paths.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

use super::state::PodRun;
use crate::env::container_env;
use crate::expand::expand_with;
use crate::image::is_executable;
use crate::rewrite::{PathMapping, PathRewriter};
use crate::sources::{ConfigError, Sources};
use crate::volumes::MaterialisedVolume;

/// The env var that marks every process localnode starts (with the Pod UID), so that stray processes
/// can be found after a crash.
pub const POD_UID_ENV: &str = "CADUCEUS_LOCALNODE_POD_UID";
/// The env var that names the localnode state dir a process belongs to.
pub const STATE_DIR_ENV: &str = "CADUCEUS_LOCALNODE_STATE_DIR";

const SA_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Writes a kubeconfig for the Pod's ServiceAccount token volume, if it has one, so that clients
/// that read `KUBECONFIG` (kube-rs, kubectl) act as the Pod's ServiceAccount.
pub(super) fn write_sa_kubeconfig(run: &PodRun, volumes: &[MaterialisedVolume]) -> Option<PathBuf> {
    let spec = run.pod.spec.as_ref()?;
    let vol_name = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .find(|m| m.mount_path.trim_end_matches('/') == SA_MOUNT)?
        .name
        .clone();
    let dir = &volumes.iter().find(|v| v.name == vol_name)?.host_path;
    let token = std::fs::read_to_string(dir.join("token")).ok()?;
    let ca = dir.join("ca.crt");
    let ns = run.pod.metadata.namespace.clone().unwrap_or_default();
    let cluster = if ca.is_file() {
        serde_json::json!({"server": run.node.api_url, "certificate-authority": ca})
    } else {
        serde_json::json!({"server": run.node.api_url, "insecure-skip-tls-verify": true})
    };
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localnode", "cluster": cluster}],
        "users": [{"name": "serviceaccount", "user": {"token": token.trim()}}],
        "contexts": [{"name": "pod", "context": {"cluster": "localnode", "user": "serviceaccount", "namespace": ns}}],
        "current-context": "pod",
    });
    let path = run.dir.join("volumes").join("serviceaccount.kubeconfig");
    std::fs::write(&path, serde_json::to_vec_pretty(&kc).ok()?).ok()?;
    Some(path)
}

/// Everything needed to start one container process.
#[derive(Debug)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    pub termination_log: PathBuf,
}

/// Resolves a command name the way localnode documents it: the image's own binary when the name
/// matches it, a binary of that name in the bin dir, an absolute host path, or a name on `PATH`.
#[must_use]
pub fn resolve_program(name: &str, image_binary: &Path, bin_dir: &Path, path_env: &str) -> Option<PathBuf> {
    let base = Path::new(name).file_name()?;
    if Some(base) == image_binary.file_name() {
        return Some(image_binary.to_path_buf());
    }
    let in_bin = bin_dir.join(base);
    if !name.contains('/') && is_executable(&in_bin) {
        return Some(in_bin);
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    path_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

/// Builds the mount rewriter of one container (its volume mounts and its termination message path).
pub fn container_rewriter(
    c: &Container,
    volumes: &[MaterialisedVolume],
    termination_log: &Path,
) -> Result<PathRewriter, ConfigError> {
    let mut maps = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let vol = volumes
            .iter()
            .find(|v| v.name == m.name)
            .ok_or_else(|| ConfigError::Invalid {
                what: format!("volumeMount {:?} of container {:?}", m.mount_path, c.name),
                detail: format!("no volume named {:?}", m.name),
            })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = vol.host_path.join(crate::volumes::safe_relative(sub)?);
                if !p.exists() {
                    std::fs::create_dir_all(&p).map_err(|source| ConfigError::Io {
                        path: p.display().to_string(),
                        source,
                    })?;
                }
                p
            }
            None => vol.host_path.clone(),
        };
        if m.sub_path_expr.is_some() {
            return Err(ConfigError::Unsupported(format!(
                "subPathExpr on volumeMount {:?}",
                m.mount_path
            )));
        }
        maps.push(PathMapping {
            container: m.mount_path.clone(),
            host,
        });
    }
    let tpath = c
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    maps.push(PathMapping {
        container: tpath,
        host: termination_log.to_path_buf(),
    });
    Ok(PathRewriter::new(maps))
}

pub(super) async fn prepare_launch(
    run: &PodRun,
    c: &Container,
    volumes: &[MaterialisedVolume],
    sa_kubeconfig: Option<&Path>,
    cdir: &Path,
) -> Result<Launch, ConfigError> {
    let node = &run.node;
    let image_binary = node
        .images
        .resolve(c.image.as_deref().unwrap_or(""))
        .map_err(|e| ConfigError::Invalid {
            what: format!("image of container {:?}", c.name),
            detail: e.to_string(),
        })?;
    let termination_log = cdir.join("termination-log");
    let rewriter = container_rewriter(c, volumes, &termination_log)?;
    let mut sources = Sources::new(
        node.client.clone(),
        run.pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let own = container_env(&run.pod, c, &mut sources, &node.facts()).await?;

    // Base environment first, then the container's own definitions override it.
    let mut env: Vec<(String, String)> = node.base_env.clone();
    let set = |env: &mut Vec<(String, String)>, k: &str, v: String| {
        env.retain(|(n, _)| n != k);
        env.push((k.to_string(), v));
    };
    set(
        &mut env,
        "HOSTNAME",
        run.pod.metadata.name.clone().unwrap_or_default(),
    );
    set(&mut env, "HOME", cdir.display().to_string());
    if let Some(kc) = sa_kubeconfig {
        set(&mut env, "KUBECONFIG", kc.display().to_string());
    }
    set(
        &mut env,
        POD_UID_ENV,
        run.pod.metadata.uid.clone().unwrap_or_default(),
    );
    set(&mut env, STATE_DIR_ENV, node.state_dir.display().to_string());
    for (k, v) in own {
        set(&mut env, &k, rewriter.rewrite(&v));
    }
    // Our markers cannot be overridden.
    set(
        &mut env,
        POD_UID_ENV,
        run.pod.metadata.uid.clone().unwrap_or_default(),
    );

    // Rewrite first, then expand: env values are rewritten already, and must not be rewritten twice
    // (a host path can itself contain a mount path, e.g. a mount at /tmp).
    let expand = |s: &String| expand_with(&rewriter.rewrite(s), &env);
    let command: Vec<String> = c.command.iter().flatten().map(expand).collect();
    let args: Vec<String> = c.args.iter().flatten().map(expand).collect();
    let path_env = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let (program, mut argv) = match command.split_first() {
        None => (image_binary, Vec::new()),
        Some((first, rest)) => {
            let p = resolve_program(first, &image_binary, node.images.bin_dir(), &path_env).ok_or_else(
                || ConfigError::Invalid {
                    what: format!("command of container {:?}", c.name),
                    detail: format!(
                        "{first:?} is neither the image's binary, nor in {}, nor an executable on the host",
                        node.images.bin_dir().display()
                    ),
                },
            )?;
            (p, rest.to_vec())
        }
    };
    argv.extend(args);
    let working_dir = match c.working_dir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => rewriter
            .map_path(w)
            .or_else(|| Path::new(w).is_dir().then(|| PathBuf::from(w)))
            .unwrap_or_else(|| cdir.to_path_buf()),
        None => cdir.to_path_buf(),
    };
    Ok(Launch {
        program,
        args: argv,
        env,
        working_dir,
        termination_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn program_resolution() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let mk = |p: &Path| {
            std::fs::write(p, b"#!/bin/sh\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        let image_bin = bin.join("caduceus-trainer");
        mk(&image_bin);
        mk(&bin.join("caduceus"));
        let other = tmp.path().join("tool");
        mk(&other);
        let path_env = format!("/nonexistent:{}", tmp.path().display());
        let r = |n: &str| resolve_program(n, &image_bin, &bin, &path_env);
        assert_eq!(r("caduceus-trainer"), Some(image_bin.clone()));
        assert_eq!(r("/usr/local/bin/caduceus-trainer"), Some(image_bin.clone()));
        assert_eq!(r("caduceus"), Some(bin.join("caduceus")));
        assert_eq!(r("tool"), Some(other.clone()));
        assert_eq!(r(other.to_str().unwrap()), Some(other.clone()));
        assert_eq!(r("nope"), None);
        assert_eq!(r("/nope/tool2"), None);
    }

    #[test]
    fn rewriter_covers_mounts_and_termination_log() {
        let c = Container {
            name: "c".into(),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "secret".into(),
                    mount_path: "/etc/secret".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "data".into(),
                    mount_path: "/data/in".into(),
                    sub_path: Some("part".into()),
                    ..Default::default()
                },
            ]),
            termination_message_path: Some("/tmp/msg".into()),
            ..Default::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let vols = vec![
            MaterialisedVolume {
                name: "secret".into(),
                host_path: tmp.path().join("s"),
            },
            MaterialisedVolume {
                name: "data".into(),
                host_path: tmp.path().join("d"),
            },
        ];
        let r = container_rewriter(&c, &vols, &tmp.path().join("tlog")).unwrap();
        let t = tmp.path().display();
        assert_eq!(r.rewrite("/etc/secret/token"), format!("{t}/s/token"));
        assert_eq!(r.rewrite("--in=/data/in/x"), format!("--in={t}/d/part/x"));
        assert_eq!(r.rewrite("/tmp/msg"), format!("{t}/tlog"));
        assert!(tmp.path().join("d/part").is_dir(), "subPath dirs are created");

        let bad = Container {
            name: "c".into(),
            volume_mounts: Some(vec![VolumeMount {
                name: "missing".into(),
                mount_path: "/x".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let err = container_rewriter(&bad, &vols, &tmp.path().join("t")).unwrap_err();
        assert!(err.to_string().contains("no volume named \"missing\""), "{err}");
    }
}
