//! `caduceus fairness` on small CSVs written here.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn caduceus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caduceus"))
        .args(args)
        .output()
        .expect("run caduceus")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn close(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!((got - want).abs() < 1e-9, "{got} != {want}");
}

/// sex f: 4 rows (y,p) = (1,1) (1,1) (0,0) (0,1) → TPR 1, FPR .5, selection .75, accuracy .75
/// sex m: 4 rows (1,0) (1,1) (0,0) (0,0)        → TPR .5, FPR 0, selection .25, accuracy .75
/// DPD = .5, DPR = 1/3, EOD = max(.5, .5) = .5, EOR = min(.5/1, 0/.5) = 0.
const TWO_GROUPS: &str = "id,y,p,sex,site\n\
1,1,1,f,a\n2,1,1,f,b\n3,0,0,f,a\n4,0,1,f,b\n\
5,1,0,m,a\n6,1,1,m,b\n7,0,0,m,a\n8,0,0,m,b\n";

#[test]
fn json_metrics_match_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "p.csv", TWO_GROUPS);
    let j = json_of(&caduceus(&[
        "fairness",
        "--predictions",
        &f,
        "--label",
        "y",
        "--prediction",
        "p",
        "--sensitive",
        "sex",
        "--json",
        "--min-group-size",
        "1",
    ]));
    let sex = &j["sex"];
    close(&sex["demographic_parity_difference"], 0.5);
    close(&sex["demographic_parity_ratio"], 1.0 / 3.0);
    close(&sex["equalized_odds_difference"], 0.5);
    close(&sex["equalized_odds_ratio"], 0.0);
    let f_group = &sex["groups"]["f"];
    assert_eq!(f_group["count"], 4);
    close(&f_group["accuracy"], 0.75);
    close(&f_group["tpr"], 1.0);
    close(&f_group["fpr"], 0.5);
    close(&f_group["selection_rate"], 0.75);
    close(&sex["groups"]["m"]["tpr"], 0.5);
    close(&sex["groups"]["m"]["fpr"], 0.0);
    assert_eq!(j.as_object().unwrap().len(), 1, "one column, no intersection");
}

#[test]
fn several_columns_add_the_intersection() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "p.csv", TWO_GROUPS);
    let j = json_of(&caduceus(&[
        "fairness",
        "--predictions",
        &f,
        "--label",
        "y",
        "--prediction",
        "p",
        "--sensitive",
        "sex,site",
        "--json",
        "--min-group-size",
        "1",
    ]));
    for key in ["sex", "site", "sex&site"] {
        for metric in [
            "demographic_parity_difference",
            "demographic_parity_ratio",
            "equalized_odds_difference",
            "equalized_odds_ratio",
        ] {
            assert!(j[key].get(metric).is_some(), "{key}.{metric} missing in {j}");
        }
    }
    let inter = j["sex&site"]["groups"].as_object().unwrap();
    assert_eq!(inter.len(), 4);
    // f&b = rows 2 and 4: (1,1) and (0,1) → selection 1, accuracy .5
    close(&inter["f&b"]["selection_rate"], 1.0);
    close(&inter["f&b"]["accuracy"], 0.5);
    // m&a = rows 5 and 7: (1,0) and (0,0) → selection 0
    close(&inter["m&a"]["selection_rate"], 0.0);
    close(&j["sex&site"]["demographic_parity_difference"], 1.0);
    // site a: rows 1,3,5,7 → selection .25; site b: rows 2,4,6,8 → .75
    close(&j["site"]["demographic_parity_difference"], 0.5);
}

#[test]
fn small_groups_are_flagged_with_the_default_minimum() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "p.csv", TWO_GROUPS);
    let j = json_of(&caduceus(&[
        "fairness",
        "--predictions",
        &f,
        "--label",
        "y",
        "--prediction",
        "p",
        "--sensitive",
        "sex",
        "--json",
    ]));
    assert_eq!(j["sex"]["min_group_size"], 30);
    assert!(j["sex"]["demographic_parity_difference"].is_null());
    assert_eq!(j["sex"]["groups"]["f"]["insufficient_data"], true);
    assert_eq!(j["sex"]["insufficient_data"], serde_json::json!(["f", "m"]));
}

#[test]
fn human_output_is_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "p.csv", TWO_GROUPS);
    let out = caduceus(&[
        "fairness",
        "--predictions",
        &f,
        "--label",
        "y",
        "--prediction",
        "p",
        "--sensitive",
        "sex,site",
        "--min-group-size",
        "3",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("8 rows"), "{text}");
    assert!(text.contains("group"), "{text}");
    assert!(text.contains("selection"), "{text}");
    assert!(text.contains("sex & site (intersection)"), "{text}");
    assert!(text.contains("demographic parity difference 0.500"), "{text}");
    assert!(
        text.contains("(too few)"),
        "intersection cells have 2 rows < 3: {text}"
    );
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = caduceus(args);
    assert!(!out.status.success(), "should fail: {args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    for n in needles {
        assert!(err.contains(n), "stderr {err:?} lacks {n:?}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.csv", TWO_GROUPS);
    let base = |f: &str, sens: &str| -> Vec<String> {
        [
            "fairness",
            "--predictions",
            f,
            "--label",
            "y",
            "--prediction",
            "p",
            "--sensitive",
            sens,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |args: Vec<String>, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&a, needles)
    };
    run(
        base(&good, "race"),
        &["column `race` not found", "id, y, p, sex, site"],
    );
    let mut a = base(&good, "sex");
    a[4] = "label".into();
    run(a, &["column `label` not found"]);
    let bad = write(dir.path(), "bad.csv", "y,p,sex\n1,1,f\n2,0,m\n");
    run(base(&bad, "sex"), &["column `y`", "line 3", "\"2\"", "binary"]);
    let badp = write(dir.path(), "badp.csv", "y,p,sex\n1,0.7,f\n");
    run(base(&badp, "sex"), &["column `p`", "\"0.7\""]);
    let empty = write(dir.path(), "empty.csv", "");
    run(base(&empty, "sex"), &["empty.csv", "empty"]);
    let header = write(dir.path(), "header.csv", "y,p,sex\n");
    run(base(&header, "sex"), &["no data rows"]);
    let missing = dir.path().join("nope.csv");
    run(base(missing.to_str().unwrap(), "sex"), &["nope.csv"]);
}
