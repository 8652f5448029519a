//! Confusion counts: what a hospital sends after evaluating the global model on its local data, and what
//! the aggregator sums. No per-example prediction leaves a hospital, only these four numbers per group.
//!
//! The task is binary (UTKFace gender: label 1 = female is the "positive" class). For a multi-class task,
//! count one-vs-rest: pick the class of interest `c`, and record `label == c` / `prediction == c` (see
//! [`one_vs_rest`]); keep one [`GroupCounts`] per class of interest if several matter. Accuracy computed
//! from one-vs-rest counts is the binary "is it class c" accuracy, not the multi-class accuracy, which the
//! caller reports separately.

use std::collections::BTreeMap;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};

use crate::FairnessError;

/// Joins attribute names (and, in the same order, group values) into an intersectional key:
/// attribute `gender&race`, group `1&2`. Attribute names and group values must not contain it.
pub const INTERSECTION_SEP: char = '&';

/// The four cells of a binary confusion matrix for one group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConfusionCounts {
    /// label 1, predicted 1
    pub tp: u64,
    /// label 0, predicted 1
    pub fp: u64,
    /// label 0, predicted 0
    pub tn: u64,
    /// label 1, predicted 0 (`fn` in JSON)
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl ConfusionCounts {
    /// Counts one example.
    pub fn record(&mut self, label: bool, prediction: bool) {
        match (label, prediction) {
            (true, true) => self.tp += 1,
            (false, true) => self.fp += 1,
            (false, false) => self.tn += 1,
            (true, false) => self.fn_ += 1,
        }
    }

    /// Counts of a whole slice of (label, prediction) pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut c = Self::default();
        for (l, p) in pairs {
            c.record(l, p);
        }
        c
    }

    /// Adds another group's counts into this one (summing across hospitals).
    pub fn merge(&mut self, other: &Self) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.tn += other.tn;
        self.fn_ += other.fn_;
    }

    /// The four cells, mutably (tp, fp, tn, fn), e.g. to add noise to each.
    pub fn cells_mut(&mut self) -> [&mut u64; 4] {
        [&mut self.tp, &mut self.fp, &mut self.tn, &mut self.fn_]
    }

    /// Number of examples.
    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// Examples whose label is 1.
    pub fn positives(&self) -> u64 {
        self.tp + self.fn_
    }

    /// Examples whose label is 0.
    pub fn negatives(&self) -> u64 {
        self.fp + self.tn
    }

    /// (tp + tn) / total; `None` for an empty group.
    pub fn accuracy(&self) -> Option<f64> {
        ratio(self.tp + self.tn, self.total())
    }

    /// True-positive rate tp / (tp + fn); `None` when the group has no positive label.
    pub fn tpr(&self) -> Option<f64> {
        ratio(self.tp, self.positives())
    }

    /// False-positive rate fp / (fp + tn); `None` when the group has no negative label.
    pub fn fpr(&self) -> Option<f64> {
        ratio(self.fp, self.negatives())
    }

    /// Selection rate (tp + fp) / total: how often the model predicts 1; `None` for an empty group.
    pub fn selection_rate(&self) -> Option<f64> {
        ratio(self.tp + self.fp, self.total())
    }
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

impl AddAssign<&ConfusionCounts> for ConfusionCounts {
    fn add_assign(&mut self, rhs: &ConfusionCounts) {
        self.merge(rhs);
    }
}

impl AddAssign for ConfusionCounts {
    fn add_assign(&mut self, rhs: ConfusionCounts) {
        self.merge(&rhs);
    }
}

impl Add for ConfusionCounts {
    type Output = ConfusionCounts;
    fn add(mut self, rhs: ConfusionCounts) -> ConfusionCounts {
        self.merge(&rhs);
        self
    }
}

impl std::iter::Sum for ConfusionCounts {
    fn sum<I: Iterator<Item = ConfusionCounts>>(iter: I) -> Self {
        iter.fold(Self::default(), Add::add)
    }
}

/// Maps a multi-class (label, prediction) to the binary pair for one class of interest (one-vs-rest).
pub fn one_vs_rest(label: u32, prediction: u32, positive_class: u32) -> (bool, bool) {
    (label == positive_class, prediction == positive_class)
}

/// Per-group confusion counts of one model on one dataset, for every sensitive attribute and for the
/// intersection of all of them. This is the message a trainer sends and the aggregator sums.
///
/// JSON shape:
/// `{"overall": {"tp":…,"fp":…,"tn":…,"fn":…}, "attributes": {"race": {"0": {…}, "2": {…}},
///   "gender": {…}, "gender&race": {"1&2": {…}}}}`
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCounts {
    /// All examples, whatever their group.
    #[serde(default)]
    pub overall: ConfusionCounts,
    /// attribute (or intersectional key such as `gender&race`) → group value → counts.
    #[serde(default)]
    pub attributes: BTreeMap<String, BTreeMap<String, ConfusionCounts>>,
}

impl GroupCounts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one example. `groups` holds the example's value for each sensitive attribute, e.g.
    /// `[("gender", "1"), ("race", "2")]`. The example is counted under each attribute and, when there are
    /// two or more attributes, under their intersection, whose key lists the attributes sorted by name so
    /// that every hospital produces the same key whatever order it passes them in.
    pub fn record(
        &mut self,
        groups: &[(&str, &str)],
        label: bool,
        prediction: bool,
    ) -> Result<(), FairnessError> {
        for (i, (attr, value)) in groups.iter().enumerate() {
            validate_name("attribute name", attr)?;
            validate_name("group value", value)?;
            if groups[..i].iter().any(|(a, _)| a == attr) {
                return Err(FairnessError::InvalidName {
                    what: "attribute name",
                    name: attr.to_string(),
                    reason: "given twice for one example".into(),
                });
            }
        }
        self.overall.record(label, prediction);
        for (attr, value) in groups {
            self.entry(attr, value).record(label, prediction);
        }
        if groups.len() >= 2 {
            let (attr, value) = intersection_key(groups);
            self.entry(&attr, &value).record(label, prediction);
        }
        Ok(())
    }

    /// Zero counts for every group of fixed attribute domains: each `(attribute, groups)` of
    /// `domains` gets every one of its groups, and with two or more attributes their intersection
    /// (key as in [`GroupCounts::record`]) gets every combination of their groups. Released
    /// counts built on it list the same groups whatever the data, so the set of groups reported
    /// says nothing about which groups a dataset holds. Add a dataset's counts with
    /// [`GroupCounts::merge`] and check [`GroupCounts::groups_within`] that none fell outside.
    pub fn zeros(domains: &[(&str, &[&str])]) -> Result<Self, FairnessError> {
        let mut out = GroupCounts::new();
        for (i, (attr, groups)) in domains.iter().enumerate() {
            validate_name("attribute name", attr)?;
            if domains[..i].iter().any(|(a, _)| a == attr) {
                return Err(FairnessError::InvalidName {
                    what: "attribute name",
                    name: attr.to_string(),
                    reason: "given twice in the domains".into(),
                });
            }
            for g in *groups {
                validate_name("group value", g)?;
                out.entry(attr, g);
            }
        }
        if domains.len() >= 2 {
            // Every combination: an odometer over the domains.
            let mut idx = vec![0usize; domains.len()];
            if domains.iter().all(|(_, g)| !g.is_empty()) {
                loop {
                    let pick: Vec<(&str, &str)> =
                        domains.iter().zip(&idx).map(|((a, g), &i)| (*a, g[i])).collect();
                    let (attr, value) = intersection_key(&pick);
                    out.entry(&attr, &value);
                    let mut k = 0;
                    loop {
                        idx[k] += 1;
                        if idx[k] < domains[k].1.len() {
                            break;
                        }
                        idx[k] = 0;
                        k += 1;
                        if k == domains.len() {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether every attribute and group of `self` also appears in `domain` (e.g. one built by
    /// [`GroupCounts::zeros`]).
    pub fn groups_within(&self, domain: &GroupCounts) -> bool {
        self.attributes.iter().all(|(attr, groups)| {
            domain
                .attributes
                .get(attr)
                .is_some_and(|d| groups.keys().all(|g| d.contains_key(g)))
        })
    }

    /// Every confusion cell, the overall ones first, then by attribute and group in key order.
    pub fn cells_mut(&mut self) -> impl Iterator<Item = &mut u64> {
        std::iter::once(&mut self.overall)
            .chain(self.attributes.values_mut().flat_map(|g| g.values_mut()))
            .flat_map(|c| c.cells_mut())
    }

    fn entry(&mut self, attr: &str, value: &str) -> &mut ConfusionCounts {
        self.attributes
            .entry(attr.to_string())
            .or_default()
            .entry(value.to_string())
            .or_default()
    }

    /// Adds another hospital's counts into these.
    pub fn merge(&mut self, other: &GroupCounts) {
        self.overall.merge(&other.overall);
        for (attr, groups) in &other.attributes {
            let mine = self.attributes.entry(attr.clone()).or_default();
            for (value, counts) in groups {
                mine.entry(value.clone()).or_default().merge(counts);
            }
        }
    }

    /// The groups of one attribute (or intersectional key).
    pub fn attribute(&self, name: &str) -> Option<&BTreeMap<String, ConfusionCounts>> {
        self.attributes.get(name)
    }

    /// Attribute keys that are intersections (contain [`INTERSECTION_SEP`]).
    pub fn is_intersection(key: &str) -> bool {
        key.contains(INTERSECTION_SEP)
    }
}

impl AddAssign<&GroupCounts> for GroupCounts {
    fn add_assign(&mut self, rhs: &GroupCounts) {
        self.merge(rhs);
    }
}

impl std::iter::Sum for GroupCounts {
    fn sum<I: Iterator<Item = GroupCounts>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut acc, g| {
            acc.merge(&g);
            acc
        })
    }
}

impl<'a> std::iter::Sum<&'a GroupCounts> for GroupCounts {
    fn sum<I: Iterator<Item = &'a GroupCounts>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut acc, g| {
            acc.merge(g);
            acc
        })
    }
}

/// The intersectional (attribute, group) key of one example: attributes sorted by name, joined with
/// [`INTERSECTION_SEP`], and their values in the same order.
pub fn intersection_key(groups: &[(&str, &str)]) -> (String, String) {
    let mut sorted: Vec<&(&str, &str)> = groups.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let sep = INTERSECTION_SEP.to_string();
    let attr = sorted.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(&sep);
    let value = sorted.iter().map(|(_, v)| *v).collect::<Vec<_>>().join(&sep);
    (attr, value)
}

pub(crate) fn validate_name(what: &'static str, name: &str) -> Result<(), FairnessError> {
    if name.is_empty() {
        return Err(FairnessError::InvalidName {
            what,
            name: name.into(),
            reason: "is empty".into(),
        });
    }
    if name.contains(INTERSECTION_SEP) {
        return Err(FairnessError::InvalidName {
            what,
            name: name.into(),
            reason: format!("contains '{INTERSECTION_SEP}', which joins intersectional keys"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_rates() {
        let c = ConfusionCounts::from_pairs([(true, true), (true, false), (false, true), (false, false)]);
        assert_eq!(
            c,
            ConfusionCounts {
                tp: 1,
                fp: 1,
                tn: 1,
                fn_: 1
            }
        );
        assert_eq!(c.accuracy(), Some(0.5));
        assert_eq!(c.tpr(), Some(0.5));
        assert_eq!(c.fpr(), Some(0.5));
        assert_eq!(c.selection_rate(), Some(0.5));
        let empty = ConfusionCounts::default();
        assert_eq!(empty.accuracy(), None);
        let only_pos = ConfusionCounts::from_pairs([(true, true)]);
        assert_eq!(only_pos.fpr(), None);
        assert_eq!(only_pos.tpr(), Some(1.0));
    }

    #[test]
    fn json_uses_fn_key() {
        let c = ConfusionCounts {
            tp: 1,
            fp: 2,
            tn: 3,
            fn_: 4,
        };
        let j = serde_json::to_value(c).unwrap();
        assert_eq!(j, serde_json::json!({"tp":1,"fp":2,"tn":3,"fn":4}));
        let back: ConfusionCounts = serde_json::from_value(j).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn intersection_is_order_independent() {
        let mut a = GroupCounts::new();
        a.record(&[("race", "2"), ("gender", "1")], true, true).unwrap();
        let mut b = GroupCounts::new();
        b.record(&[("gender", "1"), ("race", "2")], true, true).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.attribute("gender&race").unwrap()["1&2"].tp, 1);
        assert_eq!(a.overall.total(), 1);
    }

    #[test]
    fn zeros_cover_every_group_and_combination() {
        let race: &[&str] = &["0", "1", "2"];
        let gender: &[&str] = &["0", "1"];
        let mut z = GroupCounts::zeros(&[("race", race), ("gender", gender)]).unwrap();
        assert_eq!(z.attribute("race").unwrap().len(), 3);
        assert_eq!(z.attribute("gender").unwrap().len(), 2);
        let inter = z.attribute("gender&race").unwrap();
        assert_eq!(inter.len(), 6);
        assert!(inter.contains_key("1&2") && inter.contains_key("0&0"));
        assert_eq!(z.overall.total(), 0);
        assert_eq!(z.cells_mut().count(), 4 * (1 + 3 + 2 + 6));
        let mut data = GroupCounts::new();
        data.record(&[("race", "2"), ("gender", "1")], true, false)
            .unwrap();
        assert!(data.groups_within(&z));
        z.merge(&data);
        assert_eq!(z.attribute("gender&race").unwrap()["1&2"].fn_, 1);
        assert_eq!(
            z.attribute("race").unwrap()["0"].total(),
            0,
            "absent groups stay, as zeros"
        );
        let mut other = GroupCounts::new();
        other
            .record(&[("race", "7"), ("gender", "1")], true, false)
            .unwrap();
        assert!(!other.groups_within(&z));
        assert!(GroupCounts::zeros(&[("race", race), ("race", race)]).is_err());
        let one = GroupCounts::zeros(&[("race", race)]).unwrap();
        assert_eq!(one.attributes.len(), 1, "no intersection of a single attribute");
    }

    #[test]
    fn bad_names_are_rejected() {
        let mut g = GroupCounts::new();
        let e = g.record(&[("race", "a&b")], true, true).unwrap_err();
        assert!(e.to_string().contains("a&b"), "{e}");
        assert!(g.record(&[("", "1")], true, true).is_err());
        assert!(g.record(&[("race", "1"), ("race", "2")], true, true).is_err());
        assert_eq!(g, GroupCounts::new(), "a rejected example is not counted");
    }
}
