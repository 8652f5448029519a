//! The manifest on disk: `manifest.json` (image root and counts) beside `labels.csv` (one row per
//! image).
//!
//! ```text
//! manifest.json  {"format": "caduceus-manifest/1", "image_root": "/data/utkface-64",
//!                 "labels": "labels.csv", "records": 23703}
//! labels.csv     file,age,age_group,gender,race,sha256
//!                100_0_0_20170112213500903.jpg.chip.jpg,100,70+,0,0,6f1e…
//! ```
//! `gender` and `race` keep the UTKFace codes (gender 0 = male, 1 = female; race 0 = white,
//! 1 = black, 2 = asian, 3 = indian, 4 = other). `age_group` is derived from `age` and checked on
//! reading. A relative `image_root` is taken relative to the manifest's directory.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DatasetError, Result};
use crate::labels::{AgeGroup, Gender, Labels, MAX_AGE, Race, Record};

/// The `format` value this version writes and reads.
pub const MANIFEST_FORMAT: &str = "caduceus-manifest/1";
/// File name of the JSON part of a manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the CSV part of a manifest.
pub const LABELS_FILE: &str = "labels.csv";
const HEADER: [&str; 6] = ["file", "age", "age_group", "gender", "race", "sha256"];

/// A list of images under one root directory, with their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Directory that record file names are relative to.
    pub image_root: PathBuf,
    pub records: Vec<Record>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestJson {
    format: String,
    image_root: PathBuf,
    labels: String,
    records: usize,
}

impl Manifest {
    pub fn new(image_root: impl Into<PathBuf>, records: Vec<Record>) -> Self {
        Manifest {
            image_root: image_root.into(),
            records,
        }
    }

    /// Writes `dir/manifest.json` and `dir/labels.csv`, creating `dir`. Files are written to a
    /// temporary name and renamed, so a reader never sees half a manifest.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
        let csv_path = dir.join(LABELS_FILE);
        let mut w = csv::Writer::from_writer(Vec::new());
        let csv_err = |e: csv::Error| DatasetError::Manifest {
            path: csv_path.clone(),
            message: e.to_string(),
        };
        w.write_record(HEADER).map_err(csv_err)?;
        for r in &self.records {
            let l = &r.labels;
            w.write_record([
                r.file.as_str(),
                &l.age.to_string(),
                l.age_group().label(),
                &l.gender.code().to_string(),
                &l.race.code().to_string(),
                &r.sha256,
            ])
            .map_err(csv_err)?;
        }
        let csv_bytes = w.into_inner().map_err(|e| DatasetError::Manifest {
            path: csv_path.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&csv_path, &csv_bytes)?;
        let json = ManifestJson {
            format: MANIFEST_FORMAT.into(),
            image_root: self.image_root.clone(),
            labels: LABELS_FILE.into(),
            records: self.records.len(),
        };
        let mut bytes = serde_json::to_vec_pretty(&json).expect("manifest serialises");
        bytes.push(b'\n');
        write_atomic(&dir.join(MANIFEST_FILE), &bytes)
    }

    /// Reads a manifest from its directory or from its `manifest.json`. Errors name the file, and
    /// for the CSV the line, at fault.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let json_path = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let dir = json_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let text = std::fs::read_to_string(&json_path).map_err(|e| DatasetError::io(&json_path, e))?;
        let json: ManifestJson = serde_json::from_str(&text).map_err(|e| DatasetError::Manifest {
            path: json_path.clone(),
            message: e.to_string(),
        })?;
        if json.format != MANIFEST_FORMAT {
            return Err(DatasetError::Manifest {
                path: json_path,
                message: format!("format is '{}', expected '{MANIFEST_FORMAT}'", json.format),
            });
        }
        let csv_path = dir.join(&json.labels);
        let records = read_labels_csv(&csv_path)?;
        if records.len() != json.records {
            return Err(DatasetError::Manifest {
                path: json_path,
                message: format!(
                    "says {} records but {} holds {}",
                    json.records,
                    csv_path.display(),
                    records.len()
                ),
            });
        }
        let image_root = if json.image_root.is_absolute() {
            json.image_root
        } else {
            dir.join(json.image_root)
        };
        Ok(Manifest { image_root, records })
    }

    /// The path of one record's image.
    pub fn image_path(&self, record: &Record) -> PathBuf {
        self.image_root.join(&record.file)
    }
}

/// Reads a `labels.csv` (see the module docs); errors name the file and line.
pub fn read_labels_csv(path: &Path) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(bytes.as_slice());
    let line_err = |line: u64, message: String| DatasetError::Line {
        path: path.to_path_buf(),
        line,
        message,
    };
    let header = reader.headers().map_err(|e| line_err(1, e.to_string()))?;
    if header.iter().collect::<Vec<_>>() != HEADER {
        return Err(line_err(
            1,
            format!(
                "header is '{}', expected '{}'",
                header.iter().collect::<Vec<_>>().join(","),
                HEADER.join(",")
            ),
        ));
    }
    let mut records = Vec::new();
    for row in reader.records() {
        let row = row.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            line_err(line, e.to_string())
        })?;
        let line = row.position().map(|p| p.line()).unwrap_or(0);
        records.push(parse_row(&row).map_err(|m| line_err(line, m))?);
    }
    Ok(records)
}

fn parse_row(row: &csv::StringRecord) -> std::result::Result<Record, String> {
    if row.len() != HEADER.len() {
        return Err(format!("expected {} fields, found {}", HEADER.len(), row.len()));
    }
    let file = row[0].to_string();
    if file.is_empty() || file.contains('/') || file.contains('\\') || file == ".." {
        return Err(format!("file '{file}' must be a plain file name"));
    }
    let age: u16 = row[1]
        .parse()
        .ok()
        .filter(|a| *a <= MAX_AGE)
        .ok_or_else(|| format!("age '{}' is not an integer in 0..={MAX_AGE}", &row[1]))?;
    let group: AgeGroup = row[2].parse()?;
    if group != AgeGroup::of_age(age) {
        return Err(format!(
            "age group '{}' does not match age {age} (expected {})",
            &row[2],
            AgeGroup::of_age(age)
        ));
    }
    let gender = row[3]
        .parse::<u8>()
        .ok()
        .and_then(Gender::from_code)
        .ok_or_else(|| format!("gender '{}' is not 0 or 1", &row[3]))?;
    let race = row[4]
        .parse::<u8>()
        .ok()
        .and_then(Race::from_code)
        .ok_or_else(|| format!("race '{}' is not one of 0..=4", &row[4]))?;
    let sha256 = row[5].to_string();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("sha256 '{sha256}' is not 64 hex digits"));
    }
    Ok(Record {
        file,
        labels: Labels { age, gender, race },
        sha256,
    })
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| DatasetError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DatasetError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(file: &str, age: u16, gender: Gender, race: Race) -> Record {
        Record {
            file: file.into(),
            labels: Labels { age, gender, race },
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn round_trip_and_relative_root() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::new(
            "images",
            vec![
                record("1_0_0_1.jpg.chip.jpg", 1, Gender::Male, Race::White),
                record("a,b \"q\".jpg", 75, Gender::Female, Race::Other),
            ],
        );
        m.write(dir.path().join("m")).unwrap();
        let back = Manifest::read(dir.path().join("m")).unwrap();
        assert_eq!(back.records, m.records);
        assert_eq!(back.image_root, dir.path().join("m").join("images"));
        let again = Manifest::read(dir.path().join("m").join(MANIFEST_FILE)).unwrap();
        assert_eq!(again.records, m.records);
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::new("/x", vec![record("a.jpg", 30, Gender::Male, Race::Asian)]);
        m.write(dir.path()).unwrap();
        let csv = dir.path().join(LABELS_FILE);
        let hash = "ab".repeat(32);
        for (row, why) in [
            (format!("b.jpg,30,20-29,0,0,{hash}"), "does not match age 30"),
            (format!("b.jpg,30,30-39,7,0,{hash}"), "gender '7'"),
            (format!("b.jpg,x,30-39,0,0,{hash}"), "age 'x'"),
            ("b.jpg,30,30-39,0,0,zz".to_string(), "sha256"),
            ("b.jpg,30".to_string(), "line 3"),
            (format!("../etc/passwd,30,30-39,0,0,{hash}"), "plain file name"),
        ] {
            let text = format!("file,age,age_group,gender,race,sha256\na.jpg,30,30-39,0,2,{hash}\n{row}\n");
            std::fs::write(&csv, text).unwrap();
            let err = Manifest::read(dir.path()).unwrap_err().to_string();
            assert!(err.contains("labels.csv") && err.contains("line 3"), "{err}");
            assert!(err.contains(why), "{err}");
        }
        std::fs::write(dir.path().join(MANIFEST_FILE), "{not json").unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("manifest.json"), "{err}");
    }
}
