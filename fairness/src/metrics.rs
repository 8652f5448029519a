//! Group fairness metrics from confusion counts, following fairlearn's definitions:
//!
//! - demographic parity difference = max − min selection rate across groups; ratio = min / max;
//! - equalized odds difference = max(TPR difference, FPR difference), each difference being max − min
//!   across groups (fairlearn's default `agg="worst_case"`); equalized odds ratio = min(TPR ratio, FPR ratio);
//! - worst-group accuracy = the lowest accuracy of any group.
//!
//! Where this library deliberately differs from fairlearn:
//! - groups with fewer than `min_group_size` examples (default [`DEFAULT_MIN_GROUP_SIZE`]) are listed
//!   as "insufficient data" and left out of every gap, ratio and worst-group figure, instead of showing up
//!   as extremes;
//! - a group without positive labels has no TPR (without negatives, no FPR); fairlearn turns such an
//!   undefined rate into 0, here it is left out of that rate's difference. If only one of TPR/FPR has a
//!   difference, equalized odds uses that one;
//! - a ratio whose largest rate is 0 (so every rate is 0) is 1: the groups are treated identically;
//! - a gap needs at least two groups with enough data; otherwise it is `None` (JSON `null`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::counts::{ConfusionCounts, GroupCounts};

/// Groups with fewer examples than this are reported as having too little data. 30 is the usual
/// rule-of-thumb sample size for a rate to be more than noise: with 30 examples, one misclassified example
/// moves a rate by 3.3 points.
pub const DEFAULT_MIN_GROUP_SIZE: u64 = 30;

/// Metrics of one group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupMetrics {
    pub count: u64,
    pub accuracy: Option<f64>,
    pub tpr: Option<f64>,
    pub fpr: Option<f64>,
    pub selection_rate: Option<f64>,
    /// True when the group is smaller than the minimum size and so left out of the gaps.
    pub insufficient_data: bool,
}

impl GroupMetrics {
    pub fn from_counts(c: &ConfusionCounts, min_group_size: u64) -> Self {
        GroupMetrics {
            count: c.total(),
            accuracy: c.accuracy(),
            tpr: c.tpr(),
            fpr: c.fpr(),
            selection_rate: c.selection_rate(),
            insufficient_data: c.total() < min_group_size.max(1),
        }
    }
}

/// Fairness metrics across the groups of one attribute (or one intersection of attributes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttributeMetrics {
    pub demographic_parity_difference: Option<f64>,
    pub demographic_parity_ratio: Option<f64>,
    pub equalized_odds_difference: Option<f64>,
    pub equalized_odds_ratio: Option<f64>,
    pub worst_group_accuracy: Option<f64>,
    pub worst_group: Option<String>,
    /// Groups with fewer examples than this were left out of the figures above.
    pub min_group_size: u64,
    /// Names of the groups that were left out.
    pub insufficient_data: Vec<String>,
    pub groups: BTreeMap<String, GroupMetrics>,
}

/// Largest minus smallest, and smallest over largest, of some rates (`None` if fewer than two).
fn spread(rates: &[f64]) -> Option<(f64, f64)> {
    if rates.len() < 2 {
        return None;
    }
    let max = rates.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio = if max > 0.0 { min / max } else { 1.0 };
    Some((max - min, ratio))
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl AttributeMetrics {
    /// Metrics across `groups` (group value → counts).
    pub fn from_groups(groups: &BTreeMap<String, ConfusionCounts>, min_group_size: u64) -> Self {
        let metrics: BTreeMap<String, GroupMetrics> = groups
            .iter()
            .map(|(k, c)| (k.clone(), GroupMetrics::from_counts(c, min_group_size)))
            .collect();
        let sufficient: Vec<(&String, &GroupMetrics)> =
            metrics.iter().filter(|(_, m)| !m.insufficient_data).collect();
        let collect = |f: fn(&GroupMetrics) -> Option<f64>| -> Vec<f64> {
            sufficient.iter().filter_map(|(_, m)| f(m)).collect()
        };
        let dp = spread(&collect(|m| m.selection_rate));
        let tpr = spread(&collect(|m| m.tpr));
        let fpr = spread(&collect(|m| m.fpr));
        let mut worst: Option<(&String, f64)> = None;
        for (name, m) in &sufficient {
            if let Some(acc) = m.accuracy
                && worst.is_none_or(|(_, w)| acc < w)
            {
                worst = Some((name, acc));
            }
        }
        AttributeMetrics {
            demographic_parity_difference: dp.map(|d| d.0),
            demographic_parity_ratio: dp.map(|d| d.1),
            equalized_odds_difference: max_opt(tpr.map(|d| d.0), fpr.map(|d| d.0)),
            equalized_odds_ratio: min_opt(tpr.map(|d| d.1), fpr.map(|d| d.1)),
            worst_group_accuracy: worst.map(|w| w.1),
            worst_group: worst.map(|w| w.0.clone()),
            min_group_size,
            insufficient_data: metrics
                .iter()
                .filter(|(_, m)| m.insufficient_data)
                .map(|(k, _)| k.clone())
                .collect(),
            groups: metrics,
        }
    }

    /// The value of one fairness metric (a difference: 0 is fair).
    pub fn metric(&self, metric: FairnessMetric) -> Option<f64> {
        match metric {
            FairnessMetric::DemographicParity => self.demographic_parity_difference,
            FairnessMetric::EqualizedOdds => self.equalized_odds_difference,
        }
    }
}

/// Which gap FairFed (and thresholds) look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FairnessMetric {
    /// Demographic parity difference.
    DemographicParity,
    /// Equalized odds difference.
    EqualizedOdds,
}

/// All metrics of one model on one dataset: overall, and per attribute and intersection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FairnessMetrics {
    pub overall: GroupMetrics,
    /// Keyed like [`GroupCounts::attributes`]; intersections have keys such as `gender&race`.
    pub attributes: BTreeMap<String, AttributeMetrics>,
}

impl FairnessMetrics {
    pub fn from_counts(counts: &GroupCounts, min_group_size: u64) -> Self {
        FairnessMetrics {
            overall: GroupMetrics::from_counts(&counts.overall, 0),
            attributes: counts
                .attributes
                .iter()
                .map(|(k, g)| (k.clone(), AttributeMetrics::from_groups(g, min_group_size)))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cc(tp: u64, fp: u64, tn: u64, fn_: u64) -> ConfusionCounts {
        ConfusionCounts { tp, fp, tn, fn_ }
    }

    fn groups(items: &[(&str, ConfusionCounts)]) -> BTreeMap<String, ConfusionCounts> {
        items.iter().map(|(k, c)| (k.to_string(), *c)).collect()
    }

    fn close(a: Option<f64>, b: f64) {
        let a = a.expect("value is defined");
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn perfectly_fair() {
        // Both groups: 40 examples, 20 positive, TPR 0.8, FPR 0.1, selection rate (16+2)/40.
        let g = groups(&[("a", cc(16, 2, 18, 4)), ("b", cc(16, 2, 18, 4))]);
        let m = AttributeMetrics::from_groups(&g, 30);
        close(m.demographic_parity_difference, 0.0);
        close(m.demographic_parity_ratio, 1.0);
        close(m.equalized_odds_difference, 0.0);
        close(m.equalized_odds_ratio, 1.0);
        close(m.worst_group_accuracy, 34.0 / 40.0);
        close(m.groups["a"].tpr, 0.8);
        close(m.groups["a"].fpr, 0.1);
        close(m.groups["a"].selection_rate, 0.45);
        assert!(m.insufficient_data.is_empty());
    }

    #[test]
    fn maximally_unfair() {
        // Group a always predicted 1, group b always 0, whatever the label.
        let g = groups(&[("a", cc(20, 20, 0, 0)), ("b", cc(0, 0, 20, 20))]);
        let m = AttributeMetrics::from_groups(&g, 30);
        close(m.demographic_parity_difference, 1.0);
        close(m.demographic_parity_ratio, 0.0);
        close(m.equalized_odds_difference, 1.0);
        close(m.equalized_odds_ratio, 0.0);
        close(m.worst_group_accuracy, 0.5);
    }

    #[test]
    fn hand_computed_three_groups() {
        // a: TPR 30/40=.75, FPR 6/60=.1, sel 36/100=.36, acc (30+54)/100=.84
        // b: TPR 20/25=.8, FPR 10/25=.4, sel 30/50=.6, acc (20+15)/50=.7
        // c: TPR 9/18=.5, FPR 3/30=.1, sel 12/48=.25, acc (9+27)/48=.75
        let g = groups(&[
            ("a", cc(30, 6, 54, 10)),
            ("b", cc(20, 10, 15, 5)),
            ("c", cc(9, 3, 27, 9)),
        ]);
        let m = AttributeMetrics::from_groups(&g, 30);
        close(m.demographic_parity_difference, 0.6 - 0.25);
        close(m.demographic_parity_ratio, 0.25 / 0.6);
        // TPR diff .8-.5=.3, FPR diff .4-.1=.3 (max .3); TPR ratio .5/.8=.625, FPR ratio .1/.4=.25
        close(m.equalized_odds_difference, 0.3);
        close(m.equalized_odds_ratio, 0.25);
        close(m.worst_group_accuracy, 0.7);
        assert_eq!(m.worst_group.as_deref(), Some("b"));
    }

    #[test]
    fn too_small_group_is_reported_not_used() {
        // Group c has 5 examples, all wrong: it would dominate every gap if it counted.
        let g = groups(&[
            ("a", cc(16, 2, 18, 4)),
            ("b", cc(15, 3, 17, 5)),
            ("c", cc(0, 3, 0, 2)),
        ]);
        let m = AttributeMetrics::from_groups(&g, 30);
        assert_eq!(m.insufficient_data, vec!["c".to_string()]);
        assert!(m.groups["c"].insufficient_data);
        assert_eq!(m.groups["c"].count, 5);
        close(m.demographic_parity_difference, 0.0);
        // TPR .8 vs .75, FPR .1 vs .15.
        close(m.equalized_odds_difference, 0.05);
    }

    #[test]
    fn configurable_minimum() {
        let g = groups(&[("a", cc(16, 2, 18, 4)), ("c", cc(0, 3, 0, 2))]);
        let strict = AttributeMetrics::from_groups(&g, 30);
        assert_eq!(strict.demographic_parity_difference, None);
        assert_eq!(strict.equalized_odds_difference, None);
        close(strict.worst_group_accuracy, 34.0 / 40.0);
        let lax = AttributeMetrics::from_groups(&g, 1);
        close(lax.demographic_parity_difference, 0.6 - 0.45);
        close(lax.worst_group_accuracy, 0.0);
        assert_eq!(lax.worst_group.as_deref(), Some("c"));
    }

    #[test]
    fn undefined_rates_are_left_out() {
        // Group b has no positive label: no TPR. EOD comes from FPR alone.
        let g = groups(&[("a", cc(10, 5, 15, 10)), ("b", cc(0, 10, 30, 0))]);
        let m = AttributeMetrics::from_groups(&g, 30);
        assert_eq!(m.groups["b"].tpr, None);
        close(m.equalized_odds_difference, 0.0);
        let g = groups(&[("a", cc(10, 5, 15, 10)), ("b", cc(0, 20, 20, 0))]);
        let m = AttributeMetrics::from_groups(&g, 30);
        close(m.equalized_odds_difference, 0.5 - 0.25);
        close(m.equalized_odds_ratio, 0.5);
    }

    #[test]
    fn all_zero_rates_have_ratio_one() {
        let g = groups(&[("a", cc(0, 0, 40, 0)), ("b", cc(0, 0, 30, 0))]);
        let m = AttributeMetrics::from_groups(&g, 30);
        close(m.demographic_parity_ratio, 1.0);
        close(m.equalized_odds_ratio, 1.0);
        close(m.equalized_odds_difference, 0.0);
    }

    #[test]
    fn intersectional_groups() {
        // 2 genders x 2 races; every combination with its own accuracy.
        let mut counts = GroupCounts::new();
        let cells = [
            ("0", "0", 50, 45), // (gender, race, n, correct)
            ("0", "1", 40, 30),
            ("1", "0", 60, 54),
            ("1", "1", 35, 21),
        ];
        for (g, r, n, correct) in cells {
            for i in 0..n {
                let label = i % 2 == 0;
                let pred = if i < correct { label } else { !label };
                counts.record(&[("race", r), ("gender", g)], label, pred).unwrap();
            }
        }
        let m = FairnessMetrics::from_counts(&counts, 30);
        let inter = &m.attributes["gender&race"];
        assert_eq!(inter.groups.len(), 4);
        assert_eq!(inter.groups["1&1"].count, 35);
        close(inter.groups["1&1"].accuracy, 21.0 / 35.0);
        close(inter.worst_group_accuracy, 21.0 / 35.0);
        assert_eq!(inter.worst_group.as_deref(), Some("1&1"));
        // race 1 pools (0,1) and (1,1): 51 correct of 75.
        close(m.attributes["race"].groups["1"].accuracy, 51.0 / 75.0);
        close(m.attributes["gender"].groups["0"].accuracy, 75.0 / 90.0);
        close(m.overall.accuracy, 150.0 / 185.0);
        assert_eq!(m.overall.count, 185);
        // Intersection gaps are at least as large as the single-attribute ones here.
        assert!(inter.worst_group_accuracy.unwrap() <= m.attributes["race"].worst_group_accuracy.unwrap());
    }
}
