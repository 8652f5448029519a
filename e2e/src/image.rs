//! Image → local binary mapping.
//!
//! localnode has no container runtime and pulls nothing. An image name is mapped to a binary on the
//! host, in this order:
//! 1. an explicit `--image-map NAME=PATH` whose NAME equals the image without its tag or digest, or
//!    equals its last path component (so `ghcr.io/x/trainer:1` matches `trainer=...`);
//! 2. the rule: an image whose last path component is `caduceus` or starts with `caduceus-` (any tag)
//!    maps to the binary of that name in the bin dir (`$CADUCEUS_BIN_DIR`, by default the directory
//!    that holds the localnode binary, which is where cargo puts every workspace binary).
//!
//! Anything else is unmapped, and the Pod fails with reason `ErrImageNeverPull`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error(
        "image {image:?} is not mapped to a local binary (localnode runs no container runtime; map it with --image-map NAME=PATH, or name it caduceus[-<bin>][:tag] to use {bin_dir}/caduceus[-<bin>])"
    )]
    Unmapped { image: String, bin_dir: String },
    #[error("image {image:?} maps to {path}, which is not an executable file")]
    Missing { image: String, path: String },
    #[error("bad --image-map {0:?}: expected NAME=PATH")]
    BadFlag(String),
}

/// Splits `registry/repo/name:tag@sha256:...` into (repository without tag/digest, last component).
pub fn image_repository(image: &str) -> (&str, &str) {
    let no_digest = image.split('@').next().unwrap_or(image);
    // A `:` after the last `/` starts the tag; one before it belongs to a registry port.
    let last_slash = no_digest.rfind('/').map(|i| i + 1).unwrap_or(0);
    let repo = match no_digest[last_slash..].find(':') {
        Some(colon) => &no_digest[..last_slash + colon],
        None => no_digest,
    };
    let last = &repo[repo.rfind('/').map(|i| i + 1).unwrap_or(0)..];
    (repo, last)
}

/// The image map: explicit entries plus the `caduceus-*` rule.
#[derive(Debug, Clone)]
pub struct ImageMap {
    explicit: BTreeMap<String, PathBuf>,
    bin_dir: PathBuf,
}

impl ImageMap {
    pub fn new(bin_dir: PathBuf) -> Self {
        Self {
            explicit: BTreeMap::new(),
            bin_dir,
        }
    }

    /// Adds one `NAME=PATH` flag value.
    pub fn add_flag(&mut self, flag: &str) -> Result<(), ImageError> {
        let (name, path) = flag
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or_else(|| ImageError::BadFlag(flag.to_string()))?;
        self.explicit
            .insert(image_repository(name).0.to_string(), PathBuf::from(path));
        Ok(())
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Resolves an image to a path without touching the file system.
    pub fn lookup(&self, image: &str) -> Result<PathBuf, ImageError> {
        let (repo, last) = image_repository(image);
        if let Some(p) = self.explicit.get(repo).or_else(|| self.explicit.get(last)) {
            return Ok(p.clone());
        }
        if last == "caduceus" || (last.starts_with("caduceus-") && last.len() > "caduceus-".len()) {
            return Ok(self.bin_dir.join(last));
        }
        Err(ImageError::Unmapped {
            image: image.to_string(),
            bin_dir: self.bin_dir.display().to_string(),
        })
    }

    /// Resolves an image and checks that the binary exists and is executable.
    pub fn resolve(&self, image: &str) -> Result<PathBuf, ImageError> {
        let path = self.lookup(image)?;
        if is_executable(&path) {
            Ok(path)
        } else {
            Err(ImageError::Missing {
                image: image.to_string(),
                path: path.display().to_string(),
            })
        }
    }
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_repositories() {
        assert_eq!(image_repository("caduceus"), ("caduceus", "caduceus"));
        assert_eq!(
            image_repository("caduceus-trainer:0.1"),
            ("caduceus-trainer", "caduceus-trainer")
        );
        assert_eq!(
            image_repository("ghcr.io:5000/org/caduceus-aggregator:v1@sha256:ab"),
            ("ghcr.io:5000/org/caduceus-aggregator", "caduceus-aggregator")
        );
        assert_eq!(image_repository("localhost:5000/x"), ("localhost:5000/x", "x"));
    }

    #[test]
    fn rule_and_explicit_entries() {
        let mut m = ImageMap::new("/bins".into());
        assert_eq!(m.lookup("caduceus:dev").unwrap(), PathBuf::from("/bins/caduceus"));
        assert_eq!(
            m.lookup("example.org/caduceus-trainer:0.1").unwrap(),
            PathBuf::from("/bins/caduceus-trainer")
        );
        assert!(matches!(m.lookup("caduceus-"), Err(ImageError::Unmapped { .. })));
        assert!(matches!(
            m.lookup("busybox:1.36"),
            Err(ImageError::Unmapped { .. })
        ));
        assert!(matches!(m.lookup("caduceusx"), Err(ImageError::Unmapped { .. })));

        m.add_flag("localnode=/opt/localnode").unwrap();
        m.add_flag("docker.io/library/busybox:1.36=/bin/busybox").unwrap();
        m.add_flag("caduceus-trainer=/other/trainer").unwrap();
        assert_eq!(
            m.lookup("localnode:dev").unwrap(),
            PathBuf::from("/opt/localnode")
        );
        assert_eq!(
            m.lookup("reg/x/localnode").unwrap(),
            PathBuf::from("/opt/localnode")
        );
        assert_eq!(
            m.lookup("docker.io/library/busybox:latest").unwrap(),
            PathBuf::from("/bin/busybox")
        );
        assert_eq!(
            m.lookup("caduceus-trainer:1").unwrap(),
            PathBuf::from("/other/trainer"),
            "explicit entries win over the rule"
        );
        assert_eq!(m.add_flag("nopath"), Err(ImageError::BadFlag("nopath".into())));
        assert_eq!(m.add_flag("=x"), Err(ImageError::BadFlag("=x".into())));
    }

    #[test]
    fn unmapped_message_is_clear() {
        let m = ImageMap::new("/bins".into());
        let msg = m.lookup("nginx").unwrap_err().to_string();
        assert!(msg.contains("\"nginx\" is not mapped"), "{msg}");
        assert!(msg.contains("--image-map"), "{msg}");
    }

    #[test]
    fn resolve_checks_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = ImageMap::new(dir.path().into());
        assert!(matches!(m.resolve("caduceus"), Err(ImageError::Missing { .. })));
        let bin = dir.path().join("caduceus");
        std::fs::write(&bin, b"#!/bin/true\n").unwrap();
        assert!(matches!(m.resolve("caduceus"), Err(ImageError::Missing { .. })));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(m.resolve("caduceus:x").unwrap(), bin);
    }
}
