//! Face dataset import, splitting and loading for Caduceus.
//!
//! The flow, as `caduceus data` runs it and as the trainer uses it:
//!
//! 1. [`import`] reads a directory of UTKFace-style files named
//!    `AGE_GENDER_RACE_DATETIME.jpg.chip.jpg`, reports (and skips) names that do not parse, and
//!    hashes every file so that byte-identical duplicates are known ([`ImportReport`]).
//! 2. A [`Manifest`] (`manifest.json` + `labels.csv`) stores the records and their image root.
//! 3. [`split()`] cuts records into a global test set and K hospital shards with train/val parts,
//!    IID or Dirichlet-skewed over an [`Attribute`]; duplicate groups never straddle parts.
//!    [`Split::write`] / [`SplitDir::read`] / [`ShardManifests::read`] put it on disk and back.
//! 4. [`ImageSet::load`] decodes a manifest's JPEGs (in parallel) into one `f32` NCHW buffer,
//!    normalised with [`Normalization::UTKFACE`], with labels for a task ([`Attribute::Gender`],
//!    [`Attribute::Race`] or [`Attribute::AgeGroup`]) and every example's sensitive attributes.
//!    [`ImageSet::fill_batch`] copies a batch out, optionally with random horizontal flips.
//!
//! Age groups are `0-2, 3-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60-69, 70+` ([`AgeGroup`]).
//!
//! The data directory is never hard-coded: [`data_dir`] reads `CADUCEUS_DATA_DIR`.
mod error;
mod import;
mod labels;
mod loader;
mod manifest;
mod split;

pub use error::{DatasetError, Result};
pub use import::{DuplicateGroup, ImportReport, Skipped, duplicate_groups, import};
pub use labels::{AgeGroup, Attribute, Gender, Labels, MAX_AGE, Race, Record, parse_file_name};
pub use loader::{CHANNELS, ImageSet, LoaderConfig, Normalization};
pub use manifest::{LABELS_FILE, MANIFEST_FILE, MANIFEST_FORMAT, Manifest, read_labels_csv};
pub use split::{
    HospitalShard, SPLIT_FILE, SchemeKind, ShardManifests, Split, SplitConfig, SplitDir, SplitScheme,
    class_counts, hospital_dir_name, split,
};

/// Name of the environment variable that points at the shared data directory (the one holding
/// `utkface-64/`).
pub const DATA_DIR_ENV: &str = "CADUCEUS_DATA_DIR";

/// The data directory from `CADUCEUS_DATA_DIR`, if set and non-empty.
pub fn data_dir() -> Option<std::path::PathBuf> {
    std::env::var_os(DATA_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
}
