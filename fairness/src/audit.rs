//! Fairness audit of any predictions file: a CSV with a header row, a 0/1 label column, a 0/1 prediction
//! column and one or more sensitive columns. Behind `caduceus fairness`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;

use serde_json::{Map, Value, json};

use crate::counts::{ConfusionCounts, INTERSECTION_SEP};
use crate::metrics::{AttributeMetrics, GroupMetrics};

/// What to audit.
#[derive(Clone, Debug)]
pub struct AuditSpec {
    pub label: String,
    pub prediction: String,
    pub sensitive: Vec<String>,
    pub min_group_size: u64,
}

/// Why a predictions file could not be audited.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the file is empty: it has no header row")]
    Empty,
    #[error("the file has a header row but no data rows")]
    NoRows,
    #[error("column `{column}` not found; the columns are: {available}")]
    MissingColumn { column: String, available: String },
    #[error("column `{0}` appears more than once in the header")]
    DuplicateHeader(String),
    #[error("no sensitive column given")]
    NoSensitive,
    #[error("sensitive column `{0}` is given twice")]
    DuplicateSensitive(String),
    #[error("`{0}` is used both as a sensitive column and as the label or prediction")]
    SensitiveIsTarget(String),
    #[error(
        "column `{column}`, line {line}: {value:?} is not a binary value (expected 0 or 1; the label and prediction must be binary)"
    )]
    NotBinary {
        column: String,
        line: u64,
        value: String,
    },
    #[error("malformed CSV: {0}")]
    Csv(#[from] csv::Error),
}

/// The audit of one file.
#[derive(Clone, Debug)]
pub struct Audit {
    pub rows: u64,
    pub overall: GroupMetrics,
    /// One entry per sensitive column in the order given, then the intersection of all of them (key:
    /// the column names joined with `&`, groups: the values joined with `&`) when there are several.
    pub attributes: Vec<(String, AttributeMetrics)>,
    pub min_group_size: u64,
}

fn parse_binary(column: &str, line: u64, value: &str) -> Result<bool, AuditError> {
    match value {
        "0" | "0.0" => Ok(false),
        "1" | "1.0" => Ok(true),
        _ => Err(AuditError::NotBinary {
            column: column.into(),
            line,
            value: value.into(),
        }),
    }
}

/// Name shown for an empty sensitive value.
pub const MISSING_VALUE: &str = "(missing)";

/// Reads the CSV and computes every metric.
pub fn audit_csv<R: Read>(reader: R, spec: &AuditSpec) -> Result<Audit, AuditError> {
    if spec.sensitive.is_empty() {
        return Err(AuditError::NoSensitive);
    }
    for (i, s) in spec.sensitive.iter().enumerate() {
        if spec.sensitive[..i].contains(s) {
            return Err(AuditError::DuplicateSensitive(s.clone()));
        }
        if *s == spec.label || *s == spec.prediction {
            return Err(AuditError::SensitiveIsTarget(s.clone()));
        }
    }
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(reader);
    let headers = rdr.headers()?.clone();
    if headers.is_empty() || (headers.len() == 1 && headers[0].is_empty()) {
        return Err(AuditError::Empty);
    }
    for (i, h) in headers.iter().enumerate() {
        if headers.iter().take(i).any(|x| x == h) {
            return Err(AuditError::DuplicateHeader(h.to_string()));
        }
    }
    let find = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| AuditError::MissingColumn {
                column: name.to_string(),
                available: headers.iter().collect::<Vec<_>>().join(", "),
            })
    };
    let label_idx = find(&spec.label)?;
    let pred_idx = find(&spec.prediction)?;
    let sens_idx: Vec<usize> = spec.sensitive.iter().map(|s| find(s)).collect::<Result<_, _>>()?;

    let mut overall = ConfusionCounts::default();
    let mut per_attr: Vec<BTreeMap<String, ConfusionCounts>> = vec![BTreeMap::new(); spec.sensitive.len()];
    let mut inter: BTreeMap<String, ConfusionCounts> = BTreeMap::new();
    let sep = INTERSECTION_SEP.to_string();
    let mut record = csv::StringRecord::new();
    while rdr.read_record(&mut record)? {
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        let label = parse_binary(&spec.label, line, &record[label_idx])?;
        let pred = parse_binary(&spec.prediction, line, &record[pred_idx])?;
        overall.record(label, pred);
        let values: Vec<&str> = sens_idx
            .iter()
            .map(|&i| match &record[i] {
                "" => MISSING_VALUE,
                v => v,
            })
            .collect();
        for (groups, v) in per_attr.iter_mut().zip(&values) {
            groups.entry(v.to_string()).or_default().record(label, pred);
        }
        if values.len() >= 2 {
            inter.entry(values.join(&sep)).or_default().record(label, pred);
        }
    }
    if overall.total() == 0 {
        return Err(AuditError::NoRows);
    }
    let mut attributes: Vec<(String, AttributeMetrics)> = spec
        .sensitive
        .iter()
        .zip(&per_attr)
        .map(|(s, g)| (s.clone(), AttributeMetrics::from_groups(g, spec.min_group_size)))
        .collect();
    if spec.sensitive.len() >= 2 {
        attributes.push((
            spec.sensitive.join(&sep),
            AttributeMetrics::from_groups(&inter, spec.min_group_size),
        ));
    }
    Ok(Audit {
        rows: overall.total(),
        overall: GroupMetrics::from_counts(&overall, 0),
        attributes,
        min_group_size: spec.min_group_size,
    })
}

impl Audit {
    /// `{"<column>": {"demographic_parity_difference": …, "demographic_parity_ratio": …,
    /// "equalized_odds_difference": …, "equalized_odds_ratio": …, "worst_group_accuracy": …,
    /// "worst_group": …, "min_group_size": …, "insufficient_data": [...],
    /// "groups": {"<value>": {"count", "accuracy", "tpr", "fpr", "selection_rate", "insufficient_data"}}},
    /// …, "<col1>&<col2>": {… the intersection …}}`. Undefined numbers are `null`.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        for (name, m) in &self.attributes {
            out.insert(
                name.clone(),
                serde_json::to_value(m).unwrap_or_else(|e| json!({ "error": e.to_string() })),
            );
        }
        Value::Object(out)
    }

    /// A plain-text table for people.
    pub fn to_table(&self, source: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Fairness audit of {source}: {} rows, overall accuracy {}",
            self.rows,
            fmt(self.overall.accuracy)
        );
        let _ = writeln!(
            s,
            "Groups with fewer than {} rows are marked \"too few\" and left out of the gaps.",
            self.min_group_size
        );
        for (name, m) in &self.attributes {
            let title = if name.contains(INTERSECTION_SEP) {
                format!("{} (intersection)", name.replace(INTERSECTION_SEP, " & "))
            } else {
                name.clone()
            };
            let _ = writeln!(s, "\n{title}");
            let width = m
                .groups
                .keys()
                .map(|k| k.chars().count())
                .max()
                .unwrap_or(5)
                .max(5);
            let _ = writeln!(
                s,
                "  {:<width$}  {:>7}  {:>8}  {:>6}  {:>6}  {:>9}",
                "group", "count", "accuracy", "TPR", "FPR", "selection"
            );
            for (g, gm) in &m.groups {
                let _ = writeln!(
                    s,
                    "  {:<width$}  {:>7}  {:>8}  {:>6}  {:>6}  {:>9}{}",
                    g,
                    gm.count,
                    fmt(gm.accuracy),
                    fmt(gm.tpr),
                    fmt(gm.fpr),
                    fmt(gm.selection_rate),
                    if gm.insufficient_data { "  (too few)" } else { "" }
                );
            }
            let _ = writeln!(
                s,
                "  demographic parity difference {}   ratio {}",
                fmt(m.demographic_parity_difference),
                fmt(m.demographic_parity_ratio)
            );
            let _ = writeln!(
                s,
                "  equalized odds difference     {}   ratio {}",
                fmt(m.equalized_odds_difference),
                fmt(m.equalized_odds_ratio)
            );
            let worst = match (&m.worst_group, m.worst_group_accuracy) {
                (Some(g), Some(a)) => format!("{a:.3} (group {g})"),
                _ => "n/a".into(),
            };
            let _ = writeln!(s, "  worst-group accuracy          {worst}");
        }
        s
    }
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(sensitive: &[&str], min: u64) -> AuditSpec {
        AuditSpec {
            label: "y".into(),
            prediction: "p".into(),
            sensitive: sensitive.iter().map(|s| s.to_string()).collect(),
            min_group_size: min,
        }
    }

    #[test]
    fn audits_a_small_file() {
        let csv = "y,p,sex,race\n1,1,f,a\n0,0,f,b\n1,0,m,a\n0,1,m,b\n1,1,m,a\n";
        let a = audit_csv(csv.as_bytes(), &spec(&["sex", "race"], 1)).unwrap();
        assert_eq!(a.rows, 5);
        let names: Vec<&str> = a.attributes.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sex", "race", "sex&race"]);
        let sex = &a.attributes[0].1;
        // f: (1,1),(0,0) → sel .5, acc 1; m: (1,0),(0,1),(1,1) → sel 2/3, acc 1/3
        assert!((sex.demographic_parity_difference.unwrap() - (2.0 / 3.0 - 0.5)).abs() < 1e-12);
        assert_eq!(sex.worst_group.as_deref(), Some("m"));
        let inter = &a.attributes[2].1;
        assert_eq!(inter.groups["m&a"].count, 2);
        let j = a.to_json();
        assert_eq!(j["sex&race"]["groups"]["f&b"]["count"], 1);
        assert!(j["sex"]["equalized_odds_ratio"].is_number());
        // race a has only positive labels, race b only negative: neither TPR nor FPR can be compared.
        assert!(j["race"]["equalized_odds_difference"].is_null());
        let t = a.to_table("x.csv");
        assert!(t.contains("sex & race (intersection)"), "{t}");
    }

    #[test]
    fn clear_errors() {
        let e = audit_csv("".as_bytes(), &spec(&["s"], 1)).unwrap_err();
        assert!(matches!(e, AuditError::Empty), "{e}");
        let e = audit_csv("y,p,s\n".as_bytes(), &spec(&["s"], 1)).unwrap_err();
        assert!(matches!(e, AuditError::NoRows), "{e}");
        let e = audit_csv("y,p,s\n1,1,a\n".as_bytes(), &spec(&["race"], 1)).unwrap_err();
        assert_eq!(e.to_string(), "column `race` not found; the columns are: y, p, s");
        let e = audit_csv("y,p,s\n1,1,a\n2,1,a\n".as_bytes(), &spec(&["s"], 1)).unwrap_err();
        assert!(e.to_string().contains("column `y`, line 3: \"2\""), "{e}");
        let e = audit_csv("y,p,s\n1,1,a\n1,a,b,c\n".as_bytes(), &spec(&["s"], 1)).unwrap_err();
        assert!(matches!(e, AuditError::Csv(_)), "{e}");
        assert!(matches!(
            audit_csv("y,p,s\n1,1,a\n".as_bytes(), &spec(&["y"], 1)),
            Err(AuditError::SensitiveIsTarget(_))
        ));
        assert!(matches!(
            audit_csv("y,p,s\n1,1,a\n".as_bytes(), &spec(&[], 1)),
            Err(AuditError::NoSensitive)
        ));
    }

    #[test]
    fn missing_sensitive_values_form_a_group() {
        let a = audit_csv("y,p,s\n1,1,\n0,0,a\n".as_bytes(), &spec(&["s"], 1)).unwrap();
        assert!(a.attributes[0].1.groups.contains_key(MISSING_VALUE));
    }
}
