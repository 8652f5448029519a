//! Summing per-hospital confusion counts gives exactly the metrics of the pooled predictions, checked
//! against a direct computation from the raw predictions.
use std::collections::BTreeMap;

use caduceus_fairness::{FairnessMetrics, GroupCounts};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Row {
    race: u8,
    gender: u8,
    label: bool,
    pred: bool,
    hospital: u8,
}

fn row() -> impl Strategy<Value = Row> {
    (0u8..4, 0u8..2, any::<bool>(), any::<bool>(), 0u8..4).prop_map(
        |(race, gender, label, pred, hospital)| Row {
            race,
            gender,
            label,
            pred,
            hospital,
        },
    )
}

/// How a row is assigned to a group.
type GroupOf = Box<dyn Fn(&Row) -> String>;

fn rate(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Reference: DPD, EOD and worst-group accuracy straight from the rows of each group.
fn direct(rows: &[&Row], key: impl Fn(&Row) -> String, min: u64) -> (Option<f64>, Option<f64>, Option<f64>) {
    let mut groups: BTreeMap<String, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        groups.entry(key(r)).or_default().push(r);
    }
    let big: Vec<&Vec<&Row>> = groups.values().filter(|g| g.len() as u64 >= min.max(1)).collect();
    let spread = |v: Vec<f64>| {
        (v.len() >= 2)
            .then(|| v.iter().cloned().fold(f64::MIN, f64::max) - v.iter().cloned().fold(f64::MAX, f64::min))
    };
    let sel: Vec<f64> = big
        .iter()
        .filter_map(|g| rate(g.iter().filter(|r| r.pred).count(), g.len()))
        .collect();
    let tpr: Vec<f64> = big
        .iter()
        .filter_map(|g| {
            rate(
                g.iter().filter(|r| r.pred && r.label).count(),
                g.iter().filter(|r| r.label).count(),
            )
        })
        .collect();
    let fpr: Vec<f64> = big
        .iter()
        .filter_map(|g| {
            rate(
                g.iter().filter(|r| r.pred && !r.label).count(),
                g.iter().filter(|r| !r.label).count(),
            )
        })
        .collect();
    let eod = match (spread(tpr), spread(fpr)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, None) => a,
        (None, b) => b,
    };
    let worst = big
        .iter()
        .filter_map(|g| rate(g.iter().filter(|r| r.pred == r.label).count(), g.len()))
        .reduce(f64::min);
    (spread(sel), eod, worst)
}

fn same(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-12,
        (None, None) => true,
        _ => false,
    }
}

proptest! {
    #[test]
    fn summed_hospital_counts_equal_pooled_metrics(
        rows in proptest::collection::vec(row(), 0..400),
        min in 0u64..25,
    ) {
        let mut per_hospital = vec![GroupCounts::new(); 4];
        let mut pooled = GroupCounts::new();
        for r in &rows {
            let (race, gender) = (r.race.to_string(), r.gender.to_string());
            let groups = [("race", race.as_str()), ("gender", gender.as_str())];
            per_hospital[r.hospital as usize].record(&groups, r.label, r.pred).unwrap();
            pooled.record(&groups, r.label, r.pred).unwrap();
        }
        let mut summed = GroupCounts::new();
        for h in &per_hospital {
            summed += h;
        }
        prop_assert_eq!(&summed, &pooled);
        let also: GroupCounts = per_hospital.iter().sum();
        prop_assert_eq!(&also, &pooled);

        let m = FairnessMetrics::from_counts(&summed, min);
        let all: Vec<&Row> = rows.iter().collect();
        let cases: [(&str, GroupOf); 3] = [
            ("race", Box::new(|r: &Row| r.race.to_string())),
            ("gender", Box::new(|r: &Row| r.gender.to_string())),
            ("gender&race", Box::new(|r: &Row| format!("{}&{}", r.gender, r.race))),
        ];
        for (attr, key) in cases {
            let (dpd, eod, worst) = direct(&all, key, min);
            let got = m.attributes.get(attr);
            prop_assert!(same(got.and_then(|a| a.demographic_parity_difference), dpd), "{attr} DPD");
            prop_assert!(same(got.and_then(|a| a.equalized_odds_difference), eod), "{attr} EOD");
            prop_assert!(same(got.and_then(|a| a.worst_group_accuracy), worst), "{attr} worst");
        }
        let acc = rate(rows.iter().filter(|r| r.pred == r.label).count(), rows.len());
        prop_assert!(same(m.overall.accuracy, acc));
    }
}
