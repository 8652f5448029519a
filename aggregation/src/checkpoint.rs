//! The model store: one safetensors checkpoint per round, written atomically, plus a manifest.
//!
//! Layout of a store directory:
//! - `round-000003.safetensors`: the global model that round 3 starts from (round 0 = the initial model;
//!   round R = the final model of an R-round study). Its tensors carry the model's own names and shapes,
//!   so the file loads as an ordinary model; SCAFFOLD's server control variate is the extra 1-D tensor
//!   [`CONTROL_TENSOR`]. The safetensors metadata key `caduceus` holds [`CheckpointMeta`] as JSON,
//!   including SHA-256 digests of the parameters, which are checked on load.
//! - `latest.json`: the [`Manifest`] naming the newest checkpoint (for readers such as the operator).
//!
//! Every file is written to a temporary name in the same directory, fsynced, renamed over the target, and
//! the directory is fsynced, so a crash leaves either the old file or the new one, never a torn one.
//! Resuming takes the newest checkpoint that verifies; a corrupt newest file is reported and skipped, and
//! older checkpoints are never deleted because of it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::Strategy;

/// Name of the SCAFFOLD server control variate tensor inside a checkpoint.
pub const CONTROL_TENSOR: &str = "caduceus.scaffold.server_control";
/// safetensors metadata key holding [`CheckpointMeta`].
pub const META_KEY: &str = "caduceus";
/// Manifest file name.
pub const MANIFEST: &str = "latest.json";
/// Current checkpoint format version.
pub const FORMAT_VERSION: u32 = 1;

/// Errors of the model store.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(
        "{path}: parameter digest mismatch (file says {expected}, data hashes to {actual}); the file is corrupt"
    )]
    Digest {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("tensor specs cover {spec} parameters but {got} were given")]
    SpecMismatch { spec: usize, got: usize },
    #[error("no checkpoint for round {0}")]
    NotFound(u32),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Name and shape of one model tensor; the flat parameter vector concatenates tensors in this order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Round metadata stored with each checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub study_id: String,
    /// The round this model is the starting point of (0 = initial model, `total_rounds` = final model).
    pub round: u32,
    pub total_rounds: u32,
    pub arch: String,
    pub strategy: Strategy,
    pub tensors: Vec<TensorMeta>,
    /// Hex SHA-256 of the little-endian parameter bytes in `tensors` order (filled in by [`ModelStore::save`]).
    #[serde(default)]
    pub params_sha256: String,
    #[serde(default)]
    pub control_sha256: Option<String>,
    pub created_unix_ms: u64,
    /// What the aggregator wants to carry across restarts (the closed round's record, FairFed weights…).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// A global model with its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub params: Vec<f32>,
    pub control: Option<Vec<f32>>,
}

/// `latest.json`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub study_id: String,
    pub round: u32,
    pub total_rounds: u32,
    pub file: String,
    pub params_sha256: String,
    pub updated_unix_ms: u64,
}

/// The result of [`ModelStore::load_latest`]: the checkpoint resumed from, and newer files that failed
/// to verify (left in place for inspection).
#[derive(Debug)]
pub struct Resumed {
    pub checkpoint: Checkpoint,
    pub path: PathBuf,
    pub skipped: Vec<CheckpointError>,
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Little-endian bytes of `values`.
fn le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` to `path` atomically: temporary file in the same directory, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    write_atomic_inner(path, bytes, None)
}

/// `crash_after`: for tests, stop after writing that many bytes, as a crash would (no rename).
fn write_atomic_inner(path: &Path, bytes: &[u8], crash_after: Option<usize>) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        if let Some(n) = crash_after {
            f.write_all(&bytes[..n.min(bytes.len())]).map_err(io(&tmp))?;
            return Err(CheckpointError::Io {
                path: tmp,
                source: std::io::Error::other("simulated crash during write"),
            });
        }
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// A directory of checkpoints for one study.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
}

impl ModelStore {
    /// Opens (creating if needed) a store directory, and removes temporary files that a crashed writer
    /// left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CheckpointError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        for entry in fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self { dir })
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of round `round`'s checkpoint.
    pub fn path_for(&self, round: u32) -> PathBuf {
        self.dir.join(format!("round-{round:06}.safetensors"))
    }

    /// Serialises a checkpoint (fills in the digests) to safetensors bytes.
    fn encode(ckpt: &Checkpoint) -> Result<(Vec<u8>, CheckpointMeta), CheckpointError> {
        let spec: usize = ckpt.meta.tensors.iter().map(TensorMeta::numel).sum();
        if spec != ckpt.params.len() {
            return Err(CheckpointError::SpecMismatch {
                spec,
                got: ckpt.params.len(),
            });
        }
        if let Some(c) = &ckpt.control
            && c.len() != spec
        {
            return Err(CheckpointError::SpecMismatch { spec, got: c.len() });
        }
        let pbytes = le_bytes(&ckpt.params);
        let cbytes = ckpt.control.as_deref().map(le_bytes);
        let mut meta = ckpt.meta.clone();
        meta.format_version = FORMAT_VERSION;
        meta.params_sha256 = sha256_hex(&pbytes);
        meta.control_sha256 = cbytes.as_deref().map(sha256_hex);
        let fmt = |reason: String| CheckpointError::Format {
            path: PathBuf::from("<memory>"),
            reason,
        };
        let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
        let mut off = 0usize;
        for t in &meta.tensors {
            let n = t.numel() * 4;
            let v = TensorView::new(Dtype::F32, t.shape.clone(), &pbytes[off..off + n])
                .map_err(|e| fmt(e.to_string()))?;
            views.push((t.name.clone(), v));
            off += n;
        }
        if let Some(cb) = &cbytes {
            let v =
                TensorView::new(Dtype::F32, vec![ckpt.params.len()], cb).map_err(|e| fmt(e.to_string()))?;
            views.push((CONTROL_TENSOR.to_string(), v));
        }
        let mut info = HashMap::new();
        info.insert(
            META_KEY.to_string(),
            serde_json::to_string(&meta).map_err(|e| fmt(e.to_string()))?,
        );
        info.insert("format".to_string(), "pt".to_string());
        let bytes = safetensors::serialize(views, Some(info)).map_err(|e| fmt(e.to_string()))?;
        Ok((bytes, meta))
    }

    /// Writes the checkpoint for `ckpt.meta.round` atomically, then the manifest. Returns the path.
    pub fn save(&self, ckpt: &Checkpoint) -> Result<PathBuf, CheckpointError> {
        self.save_inner(ckpt, None)
    }

    fn save_inner(&self, ckpt: &Checkpoint, crash_after: Option<usize>) -> Result<PathBuf, CheckpointError> {
        let (bytes, meta) = Self::encode(ckpt)?;
        let path = self.path_for(meta.round);
        write_atomic_inner(&path, &bytes, crash_after)?;
        let manifest = Manifest {
            study_id: meta.study_id.clone(),
            round: meta.round,
            total_rounds: meta.total_rounds,
            file: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            params_sha256: meta.params_sha256.clone(),
            updated_unix_ms: now_unix_ms(),
        };
        let mj = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Format {
            path: self.dir.join(MANIFEST),
            reason: e.to_string(),
        })?;
        write_atomic(&self.dir.join(MANIFEST), &mj)?;
        Ok(path)
    }

    /// Writes any JSON document atomically into the store (for example a closed round's record).
    pub fn write_json(&self, name: &str, value: &impl serde::Serialize) -> Result<PathBuf, CheckpointError> {
        let path = self.dir.join(name);
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| CheckpointError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes)?;
        Ok(path)
    }

    /// Reads and verifies one checkpoint file.
    pub fn load_file(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = fs::read(path).map_err(io(path))?;
        let fmt = |reason: String| CheckpointError::Format {
            path: path.to_path_buf(),
            reason,
        };
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| fmt(e.to_string()))?;
        let (_, md) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| fmt(e.to_string()))?;
        let meta_json = md
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| fmt(format!("no \"{META_KEY}\" metadata")))?;
        let meta: CheckpointMeta =
            serde_json::from_str(meta_json).map_err(|e| fmt(format!("bad metadata: {e}")))?;
        let n: usize = meta.tensors.iter().map(TensorMeta::numel).sum();
        let mut pbytes = Vec::with_capacity(n * 4);
        for t in &meta.tensors {
            let v = st
                .tensor(&t.name)
                .map_err(|e| fmt(format!("tensor {}: {e}", t.name)))?;
            if v.dtype() != Dtype::F32 || v.shape() != t.shape.as_slice() {
                return Err(fmt(format!(
                    "tensor {} is {:?}{:?}, metadata says F32{:?}",
                    t.name,
                    v.dtype(),
                    v.shape(),
                    t.shape
                )));
            }
            pbytes.extend_from_slice(v.data());
        }
        let actual = sha256_hex(&pbytes);
        if actual != meta.params_sha256 {
            return Err(CheckpointError::Digest {
                path: path.to_path_buf(),
                expected: meta.params_sha256.clone(),
                actual,
            });
        }
        let params = from_le(&pbytes);
        let control = match &meta.control_sha256 {
            None => None,
            Some(expected) => {
                let v = st
                    .tensor(CONTROL_TENSOR)
                    .map_err(|e| fmt(format!("tensor {CONTROL_TENSOR}: {e}")))?;
                let actual = sha256_hex(v.data());
                if &actual != expected || v.data().len() != n * 4 {
                    return Err(CheckpointError::Digest {
                        path: path.to_path_buf(),
                        expected: expected.clone(),
                        actual,
                    });
                }
                Some(from_le(v.data()))
            }
        };
        Ok(Checkpoint {
            meta,
            params,
            control,
        })
    }

    /// Loads and verifies round `round`'s checkpoint.
    pub fn load_round(&self, round: u32) -> Result<Checkpoint, CheckpointError> {
        let path = self.path_for(round);
        if !path.exists() {
            return Err(CheckpointError::NotFound(round));
        }
        Self::load_file(&path)
    }

    /// Rounds that have a checkpoint file (verified or not), ascending.
    pub fn rounds(&self) -> Result<Vec<u32>, CheckpointError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(r) = name
                .strip_prefix("round-")
                .and_then(|s| s.strip_suffix(".safetensors"))
                .and_then(|s| s.parse::<u32>().ok())
            {
                out.push(r);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The manifest, if one has been written.
    pub fn manifest(&self) -> Result<Option<Manifest>, CheckpointError> {
        let path = self.dir.join(MANIFEST);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| CheckpointError::Format {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CheckpointError::Io { path, source: e }),
        }
    }

    /// The newest checkpoint that verifies, or `None` for an empty store. Newer files that fail to verify
    /// are listed in [`Resumed::skipped`] and left on disk.
    pub fn load_latest(&self) -> Result<Option<Resumed>, CheckpointError> {
        let mut skipped = Vec::new();
        for round in self.rounds()?.into_iter().rev() {
            let path = self.path_for(round);
            match Self::load_file(&path) {
                Ok(checkpoint) => {
                    // Repair the manifest when it lags (crash between checkpoint and manifest) or points
                    // at a file that did not verify.
                    let stale = self.manifest().ok().flatten().is_none_or(|m| m.round != round);
                    if stale {
                        let manifest = Manifest {
                            study_id: checkpoint.meta.study_id.clone(),
                            round,
                            total_rounds: checkpoint.meta.total_rounds,
                            file: path
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                            params_sha256: checkpoint.meta.params_sha256.clone(),
                            updated_unix_ms: now_unix_ms(),
                        };
                        self.write_json(MANIFEST, &manifest)?;
                    }
                    return Ok(Some(Resumed {
                        checkpoint,
                        path,
                        skipped,
                    }));
                }
                Err(e) => skipped.push(e),
            }
        }
        if skipped.is_empty() {
            Ok(None)
        } else {
            // Every checkpoint is corrupt: refuse to start from scratch silently.
            Err(skipped.remove(0))
        }
    }
}

fn from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ckpt(round: u32, seed: f32, control: bool) -> Checkpoint {
        let params: Vec<f32> = (0..10).map(|i| seed + i as f32).collect();
        Checkpoint {
            meta: CheckpointMeta {
                format_version: FORMAT_VERSION,
                study_id: "s1".into(),
                round,
                total_rounds: 5,
                arch: "tiny".into(),
                strategy: Strategy::FedAvg,
                tensors: vec![
                    TensorMeta {
                        name: "w".into(),
                        shape: vec![2, 3],
                    },
                    TensorMeta {
                        name: "b".into(),
                        shape: vec![4],
                    },
                ],
                params_sha256: String::new(),
                control_sha256: None,
                created_unix_ms: 1,
                extra: serde_json::json!({"participants": ["a", "b"]}),
            },
            control: control.then(|| params.iter().map(|v| -v).collect()),
            params,
        }
    }

    #[test]
    fn save_and_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        assert!(store.load_latest().unwrap().is_none());
        let c = ckpt(0, 1.5, true);
        store.save(&c).unwrap();
        let back = store.load_round(0).unwrap();
        assert_eq!(back.params, c.params);
        assert_eq!(back.control, c.control);
        assert_eq!(back.meta.extra, c.meta.extra);
        assert_eq!(back.meta.params_sha256.len(), 64);
        let m = store.manifest().unwrap().unwrap();
        assert_eq!((m.round, m.file.as_str()), (0, "round-000000.safetensors"));
        // The file is an ordinary safetensors model: tensors under their own names and shapes.
        let bytes = fs::read(store.path_for(0)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("w").unwrap().shape(), &[2, 3]);
    }

    #[test]
    fn crash_mid_write_keeps_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        store.save(&ckpt(0, 0.0, false)).unwrap();
        store.save(&ckpt(1, 1.0, false)).unwrap();
        // The writer dies half-way through round 2's checkpoint.
        let err = store.save_inner(&ckpt(2, 2.0, false), Some(100)).unwrap_err();
        assert!(err.to_string().contains("simulated crash"), "{err}");
        assert!(!store.path_for(2).exists(), "no torn round-2 file");
        let r = store.load_latest().unwrap().unwrap();
        assert_eq!(r.checkpoint.meta.round, 1);
        assert_eq!(r.checkpoint.params, ckpt(1, 1.0, false).params);
        assert!(r.skipped.is_empty());
        assert_eq!(store.manifest().unwrap().unwrap().round, 1);
        // Reopening (a restarted aggregator) removes the stray temporary file.
        let strays = || {
            fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .contains(".tmp-")
                })
                .count()
        };
        assert_eq!(strays(), 1);
        let store = ModelStore::open(dir.path()).unwrap();
        assert_eq!(strays(), 0);
        store.save(&ckpt(2, 2.0, false)).unwrap();
        assert_eq!(store.load_latest().unwrap().unwrap().checkpoint.meta.round, 2);
    }

    #[test]
    fn corrupt_newest_falls_back_without_deleting() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        store.save(&ckpt(0, 0.0, true)).unwrap();
        store.save(&ckpt(1, 1.0, true)).unwrap();
        // Flip a byte in the last parameter of round 1 (the data section ends the file).
        let p1 = store.path_for(1);
        let mut bytes = fs::read(&p1).unwrap();
        let n = bytes.len();
        bytes[n - 1] ^= 0x40;
        fs::write(&p1, &bytes).unwrap();
        let r = store.load_latest().unwrap().unwrap();
        assert_eq!(r.checkpoint.meta.round, 0);
        assert_eq!(r.skipped.len(), 1);
        assert!(
            matches!(r.skipped[0], CheckpointError::Digest { .. }),
            "{}",
            r.skipped[0]
        );
        assert!(p1.exists(), "the corrupt file is kept for inspection");
        assert_eq!(store.manifest().unwrap().unwrap().round, 0);
        // A truncated file is a format error, also skipped.
        fs::write(&p1, &bytes[..20]).unwrap();
        let r = store.load_latest().unwrap().unwrap();
        assert_eq!(r.checkpoint.meta.round, 0);
        assert!(matches!(r.skipped[0], CheckpointError::Format { .. }));
    }

    #[test]
    fn manifest_lagging_behind_checkpoint_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        store.save(&ckpt(0, 0.0, false)).unwrap();
        // Crash after the checkpoint's rename but before the manifest: write the file only.
        let (bytes, _) = ModelStore::encode(&ckpt(1, 1.0, false)).unwrap();
        write_atomic(&store.path_for(1), &bytes).unwrap();
        assert_eq!(store.manifest().unwrap().unwrap().round, 0);
        let r = store.load_latest().unwrap().unwrap();
        assert_eq!(r.checkpoint.meta.round, 1);
        assert_eq!(store.manifest().unwrap().unwrap().round, 1);
    }

    #[test]
    fn all_corrupt_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        store.save(&ckpt(0, 0.0, false)).unwrap();
        fs::write(store.path_for(0), b"garbage").unwrap();
        assert!(store.load_latest().is_err());
    }

    #[test]
    fn spec_mismatch_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ModelStore::open(dir.path()).unwrap();
        let mut c = ckpt(0, 0.0, false);
        c.params.pop();
        assert!(matches!(
            store.save(&c).unwrap_err(),
            CheckpointError::SpecMismatch { spec: 10, got: 9 }
        ));
    }
}
