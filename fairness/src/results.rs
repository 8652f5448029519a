//! The results directory of a study, shared by `caduceus simulate` (which writes it) and
//! `caduceus report` (which reads it). Two JSON files:
//!
//! - `DIR/config.json`: the exact configuration of the study, any JSON object. One optional key is read
//!   by the report: `group_labels`, a map attribute → group value → human name, e.g.
//!   `{"race": {"0": "White", …}, "gender": {"0": "Male", "1": "Female"}}` (see [`utkface_group_labels`]).
//! - `DIR/rounds.json`: a JSON array of [`RoundResult`], one per finished round, in round order.
//!
//! Other files in the directory (the final model, logs) are ignored here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::counts::GroupCounts;

pub const CONFIG_FILE: &str = "config.json";
pub const ROUNDS_FILE: &str = "rounds.json";

/// Attribute → group value → human-readable name.
pub type GroupLabels = BTreeMap<String, BTreeMap<String, String>>;

/// One finished round of a study, as evaluated by the hospitals on their local validation data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundResult {
    /// Round number (0 may be the initial model, evaluated before any training).
    #[serde(alias = "index")]
    pub round: u32,
    /// Aggregation strategy of this round: "fedavg", "fedprox", "scaffold", "fairfed", …
    #[serde(default)]
    pub strategy: String,
    /// Hospitals whose update was aggregated this round.
    #[serde(default)]
    pub participants: Vec<String>,
    /// Accuracy of the global model; when absent, the report uses `counts.overall`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean loss of the global model, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Accuracy on the held-out global test set, when the runner measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_accuracy: Option<f64>,
    /// Per-group confusion counts summed over the hospitals.
    #[serde(default)]
    pub counts: GroupCounts,
    /// Cumulative ε spent per hospital after this round (differential privacy), when DP is on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epsilon: BTreeMap<String, f64>,
    /// δ of the (ε, δ) guarantee, when DP is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// Aggregation weight of each hospital this round (FedAvg example shares, FairFed weights), summing
    /// to 1.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, f64>,
    /// Any other per-round field the runner records; kept, not interpreted.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A whole study's results.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StudyResults {
    pub config: Value,
    pub rounds: Vec<RoundResult>,
}

/// Why a results directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    #[error("results directory {0} does not exist or is not a directory")]
    NoDirectory(PathBuf),
    #[error("missing results file {0}")]
    Missing(PathBuf),
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl StudyResults {
    /// Reads `DIR/config.json` and `DIR/rounds.json`.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, ResultsError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(ResultsError::NoDirectory(dir.to_path_buf()));
        }
        let config_path = dir.join(CONFIG_FILE);
        let config: Value = read_json(&config_path)?;
        if !config.is_object() {
            return Err(ResultsError::Invalid {
                path: config_path,
                reason: "expected a JSON object".into(),
            });
        }
        let rounds_path = dir.join(ROUNDS_FILE);
        let rounds: Vec<RoundResult> = read_json(&rounds_path)?;
        for pair in rounds.windows(2) {
            if pair[1].round <= pair[0].round {
                return Err(ResultsError::Invalid {
                    path: rounds_path,
                    reason: format!(
                        "rounds must be in increasing order, but round {} follows round {}",
                        pair[1].round, pair[0].round
                    ),
                });
            }
        }
        let results = StudyResults { config, rounds };
        results.group_labels().map_err(|reason| ResultsError::Invalid {
            path: config_path,
            reason,
        })?;
        Ok(results)
    }

    /// Writes both files, each atomically (temporary file, then rename), creating `dir` if needed.
    pub fn write(&self, dir: impl AsRef<Path>) -> Result<(), ResultsError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| ResultsError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        write_json_atomic(&dir.join(CONFIG_FILE), &self.config)?;
        write_rounds(dir, &self.rounds)
    }

    /// The `group_labels` of the configuration, or an empty map when there are none.
    pub fn group_labels(&self) -> Result<GroupLabels, String> {
        match self.config.get("group_labels") {
            None | Some(Value::Null) => Ok(GroupLabels::new()),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| format!("`group_labels` must map attribute -> group value -> name: {e}")),
        }
    }
}

/// Rewrites `DIR/rounds.json` atomically; a runner calls it after each round.
pub fn write_rounds(dir: impl AsRef<Path>, rounds: &[RoundResult]) -> Result<(), ResultsError> {
    write_json_atomic(&dir.as_ref().join(ROUNDS_FILE), &rounds)
}

/// Human names for UTKFace's label codes (from the dataset's README), keyed like [`GroupLabels`].
pub fn utkface_group_labels() -> GroupLabels {
    let mk = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let mut labels = GroupLabels::new();
    labels.insert("gender".into(), mk(&[("0", "Male"), ("1", "Female")]));
    labels.insert(
        "race".into(),
        mk(&[
            ("0", "White"),
            ("1", "Black"),
            ("2", "Asian"),
            ("3", "Indian"),
            ("4", "Others"),
        ]),
    );
    labels
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ResultsError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ResultsError::Missing(path.to_path_buf()));
        }
        Err(source) => {
            return Err(ResultsError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|source| ResultsError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), ResultsError> {
    let io = |source| ResultsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|source| ResultsError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    bytes.push(b'\n');
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StudyResults {
        let mut counts = GroupCounts::new();
        counts
            .record(&[("gender", "1"), ("race", "0")], true, true)
            .unwrap();
        let mut config = serde_json::json!({"rounds": 2, "strategy": "fedavg"});
        config["group_labels"] = serde_json::to_value(utkface_group_labels()).unwrap();
        StudyResults {
            config,
            rounds: vec![
                RoundResult {
                    round: 1,
                    strategy: "fedavg".into(),
                    participants: vec!["h0".into(), "h1".into()],
                    accuracy: Some(0.7),
                    loss: Some(0.6),
                    counts: counts.clone(),
                    epsilon: [("h0".to_string(), 0.5)].into(),
                    ..Default::default()
                },
                RoundResult {
                    round: 2,
                    strategy: "fedavg".into(),
                    counts,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn write_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let r = sample();
        r.write(dir.path()).unwrap();
        let back = StudyResults::load(dir.path()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.group_labels().unwrap()["race"]["2"], "Asian");
        assert!(!dir.path().join(".rounds.json.tmp").exists());
    }

    #[test]
    fn unknown_round_fields_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), "{}").unwrap();
        std::fs::write(
            dir.path().join(ROUNDS_FILE),
            r#"[{"index": 3, "duration_s": 1.5}]"#,
        )
        .unwrap();
        let r = StudyResults::load(dir.path()).unwrap();
        assert_eq!(r.rounds[0].round, 3);
        assert_eq!(r.rounds[0].extra["duration_s"], serde_json::json!(1.5));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = StudyResults::load(dir.path().join("nope")).unwrap_err();
        assert!(matches!(e, ResultsError::NoDirectory(_)), "{e}");
        let e = StudyResults::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        std::fs::write(dir.path().join(CONFIG_FILE), "{}").unwrap();
        let e = StudyResults::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("rounds.json"), "{e}");
        std::fs::write(dir.path().join(ROUNDS_FILE), "[{\"round\": ").unwrap();
        let e = StudyResults::load(dir.path()).unwrap_err();
        assert!(
            matches!(e, ResultsError::Corrupt { .. }) && e.to_string().contains("rounds.json"),
            "{e}"
        );
        std::fs::write(dir.path().join(ROUNDS_FILE), r#"[{"round":2},{"round":1}]"#).unwrap();
        let e = StudyResults::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("increasing"), "{e}");
        std::fs::write(dir.path().join(ROUNDS_FILE), "[]").unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"group_labels": [1]}"#).unwrap();
        let e = StudyResults::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("group_labels"), "{e}");
    }
}
