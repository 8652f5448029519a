//! The importer: turns a directory of `AGE_GENDER_RACE_DATETIME.jpg.chip.jpg` files into records.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{DatasetError, Result};
use crate::labels::{Record, parse_file_name};

/// A file the importer skipped, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: String,
    pub reason: String,
}

/// Files whose bytes are identical (same SHA-256). The splitter keeps each group whole, so that one
/// photo never lands both in a training and in a test split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateGroup {
    pub sha256: String,
    /// File names, sorted.
    pub files: Vec<String>,
    /// Whether all copies carry the same labels in their names.
    pub labels_agree: bool,
}

/// What [`import`] found.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The directory that was read (as given).
    pub image_root: PathBuf,
    /// Every file whose name parsed, sorted by file name. Duplicates are all kept: they share
    /// their `sha256`, and the splitter keeps them together.
    pub records: Vec<Record>,
    /// Files that were skipped, sorted by name, each with its reason.
    pub skipped: Vec<Skipped>,
    /// Groups of two or more byte-identical files, sorted by hash.
    pub duplicates: Vec<DuplicateGroup>,
}

impl ImportReport {
    /// How many records are copies of another record (a group of n counts n − 1).
    pub fn redundant_copies(&self) -> usize {
        self.duplicates.iter().map(|g| g.files.len() - 1).sum()
    }
}

/// Reads every file directly inside `dir`, parses its name, and hashes its bytes.
///
/// Names that do not parse, hidden files and non-files are reported in [`ImportReport::skipped`]
/// and left out; nothing is decoded here (the loader decodes, and names the file it cannot read).
pub fn import(dir: impl AsRef<Path>) -> Result<ImportReport> {
    let dir = dir.as_ref();
    let entries = std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))?;
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DatasetError::io(dir, e))?;
        let name = match entry.file_name().into_string() {
            Ok(n) => n,
            Err(raw) => {
                skipped.push(Skipped {
                    file: raw.to_string_lossy().into_owned(),
                    reason: "file name is not valid UTF-8".into(),
                });
                continue;
            }
        };
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| DatasetError::io(&path, e))?;
        // Follow symlinks to files; skip directories and the like.
        let is_file = file_type.is_file() || (file_type.is_symlink() && path.is_file());
        if !is_file {
            skipped.push(Skipped {
                file: name,
                reason: "not a regular file".into(),
            });
            continue;
        }
        if name.starts_with('.') {
            skipped.push(Skipped {
                file: name,
                reason: "hidden file".into(),
            });
            continue;
        }
        match parse_file_name(&name) {
            Ok(labels) => {
                let bytes = std::fs::read(&path).map_err(|e| DatasetError::io(&path, e))?;
                let sha256 = hex::encode(Sha256::digest(&bytes));
                records.push(Record {
                    file: name,
                    labels,
                    sha256,
                });
            }
            Err(reason) => skipped.push(Skipped { file: name, reason }),
        }
    }
    records.sort_by(|a, b| a.file.cmp(&b.file));
    skipped.sort_by(|a, b| a.file.cmp(&b.file));
    let duplicates = duplicate_groups(&records);
    Ok(ImportReport {
        image_root: dir.to_path_buf(),
        records,
        skipped,
        duplicates,
    })
}

/// Groups of records with the same content hash (two or more members), sorted by hash.
pub fn duplicate_groups(records: &[Record]) -> Vec<DuplicateGroup> {
    let mut by_hash: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_hash.entry(&r.sha256).or_default().push(r);
    }
    by_hash
        .into_iter()
        .filter(|(_, v)| v.len() > 1)
        .map(|(hash, v)| {
            let mut files: Vec<String> = v.iter().map(|r| r.file.clone()).collect();
            files.sort();
            DuplicateGroup {
                sha256: hash.to_string(),
                labels_agree: v.iter().all(|r| r.labels == v[0].labels),
                files,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_reports_defects_and_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).unwrap();
        // The five defective names of the public UTKFace copies.
        for bad in [
            "39_1_20170116174525125.jpg.chip.jpg",
            "61_1_20170109142408075.jpg.chip.jpg",
            "61_1_20170109150557335.jpg.chip.jpg",
            "24_0_1_20170116220224657 .jpg.chip.jpg",
            "55_0_0_20170116232725357jpg.chip.jpg",
        ] {
            write(bad, b"whatever");
        }
        write("20_0_0_20170101000000001.jpg.chip.jpg", b"photo A");
        write("20_0_0_20170101000000002.jpg.chip.jpg", b"photo A"); // duplicate, same labels
        write("35_1_2_20170101000000003.jpg.chip.jpg", b"photo A"); // third copy, other labels
        write("40_1_3_20170101000000004.jpg.chip.jpg", b"photo B");
        write(".DS_Store", b"junk");
        std::fs::create_dir(dir.path().join("sub")).unwrap();

        let report = import(dir.path()).unwrap();
        assert_eq!(report.records.len(), 4);
        assert_eq!(report.skipped.len(), 7);
        let skipped: Vec<&str> = report.skipped.iter().map(|s| s.file.as_str()).collect();
        assert!(skipped.contains(&"24_0_1_20170116220224657 .jpg.chip.jpg"));
        assert!(skipped.contains(&".DS_Store"));
        assert!(skipped.contains(&"sub"));
        assert!(report.skipped.iter().all(|s| !s.reason.is_empty()));
        assert_eq!(report.duplicates.len(), 1);
        let group = &report.duplicates[0];
        assert_eq!(group.files.len(), 3);
        assert!(!group.labels_agree);
        assert_eq!(report.redundant_copies(), 2);
        // Sorted by name, so the order is stable.
        assert_eq!(report.records[0].file, "20_0_0_20170101000000001.jpg.chip.jpg");
    }

    #[test]
    fn missing_dir_names_the_dir() {
        let err = import("/nonexistent/caduceus-data").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/caduceus-data"));
    }
}
