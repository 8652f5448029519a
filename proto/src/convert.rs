//! Conversions between the wire messages and the fairness crate's confusion counts, and validation of
//! what a hospital reports.
use std::collections::BTreeMap;

use caduceus_fairness::{ConfusionCounts, GroupCounts};

use crate::{Confusion, EvaluationCounts, GroupConfusion};

/// A hospital's evaluation of a global model in library types.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub examples: u64,
    pub correct: u64,
    pub loss_sum: f64,
    pub counts: GroupCounts,
}

impl Evaluation {
    /// Accuracy, `None` without examples.
    pub fn accuracy(&self) -> Option<f64> {
        (self.examples > 0).then(|| self.correct as f64 / self.examples as f64)
    }

    /// Mean loss, `None` without examples.
    pub fn mean_loss(&self) -> Option<f64> {
        (self.examples > 0).then(|| self.loss_sum / self.examples as f64)
    }

    /// Adds another hospital's evaluation.
    pub fn merge(&mut self, other: &Evaluation) {
        self.examples += other.examples;
        self.correct += other.correct;
        self.loss_sum += other.loss_sum;
        self.counts.merge(&other.counts);
    }
}

fn confusion_to_proto(c: &ConfusionCounts) -> Confusion {
    Confusion {
        true_positives: c.tp,
        false_positives: c.fp,
        true_negatives: c.tn,
        false_negatives: c.fn_,
    }
}

fn confusion_from_proto(c: &Confusion) -> ConfusionCounts {
    ConfusionCounts {
        tp: c.true_positives,
        fp: c.false_positives,
        tn: c.true_negatives,
        fn_: c.false_negatives,
    }
}

/// Wire form of an evaluation.
pub fn evaluation_to_proto(e: &Evaluation) -> EvaluationCounts {
    let mut groups = Vec::new();
    for (attribute, gs) in &e.counts.attributes {
        for (group, c) in gs {
            groups.push(GroupConfusion {
                attribute: attribute.clone(),
                group: group.clone(),
                counts: Some(confusion_to_proto(c)),
            });
        }
    }
    EvaluationCounts {
        examples: e.examples,
        correct: e.correct,
        loss_sum: e.loss_sum,
        overall: Some(confusion_to_proto(&e.counts.overall)),
        groups,
    }
}

/// Checks and converts what a hospital sent. Refuses inconsistent counts with a message naming the
/// field: more correct than examples, a non-finite or negative loss, confusion totals that do not match
/// the example count, or a group repeated.
pub fn evaluation_from_proto(p: &EvaluationCounts) -> Result<Evaluation, String> {
    if p.correct > p.examples {
        return Err(format!(
            "evaluation.correct ({}) exceeds evaluation.examples ({})",
            p.correct, p.examples
        ));
    }
    if !(p.loss_sum.is_finite() && p.loss_sum >= 0.0) {
        return Err(format!(
            "evaluation.loss_sum is {}; it must be finite and ≥ 0",
            p.loss_sum
        ));
    }
    let overall = p.overall.as_ref().map(confusion_from_proto).unwrap_or_default();
    if p.overall.is_some() && overall.total() != p.examples {
        return Err(format!(
            "evaluation.overall counts {} examples but evaluation.examples is {}",
            overall.total(),
            p.examples
        ));
    }
    let mut attributes: BTreeMap<String, BTreeMap<String, ConfusionCounts>> = BTreeMap::new();
    for g in &p.groups {
        if g.attribute.is_empty() || g.group.is_empty() {
            return Err("evaluation.groups has an entry with an empty attribute or group".into());
        }
        let c = g.counts.as_ref().map(confusion_from_proto).unwrap_or_default();
        let slot = attributes.entry(g.attribute.clone()).or_default();
        if slot.insert(g.group.clone(), c).is_some() {
            return Err(format!(
                "evaluation.groups lists {}={} twice",
                g.attribute, g.group
            ));
        }
    }
    for (attr, gs) in &attributes {
        let total: u64 = gs.values().map(ConfusionCounts::total).sum();
        if total > p.examples {
            return Err(format!(
                "evaluation.groups for {attr} count {total} examples, more than evaluation.examples ({})",
                p.examples
            ));
        }
    }
    Ok(Evaluation {
        examples: p.examples,
        correct: p.correct,
        loss_sum: p.loss_sum,
        counts: GroupCounts { overall, attributes },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_checks() {
        let mut counts = GroupCounts::new();
        counts
            .record(&[("race", "0"), ("gender", "1")], true, true)
            .unwrap();
        counts
            .record(&[("race", "2"), ("gender", "0")], false, true)
            .unwrap();
        let e = Evaluation {
            examples: 2,
            correct: 1,
            loss_sum: 1.25,
            counts,
        };
        let p = evaluation_to_proto(&e);
        assert_eq!(evaluation_from_proto(&p).unwrap(), e);

        let mut bad = p.clone();
        bad.correct = 3;
        assert!(evaluation_from_proto(&bad).unwrap_err().contains("correct"));
        let mut bad = p.clone();
        bad.loss_sum = f64::NAN;
        assert!(evaluation_from_proto(&bad).unwrap_err().contains("loss_sum"));
        let mut bad = p.clone();
        bad.examples = 5;
        bad.correct = 1;
        assert!(evaluation_from_proto(&bad).unwrap_err().contains("overall"));
        let mut bad = p.clone();
        bad.groups.push(bad.groups[0].clone());
        assert!(evaluation_from_proto(&bad).unwrap_err().contains("twice"));
    }

    #[test]
    fn merge_sums() {
        let mut a = Evaluation {
            examples: 10,
            correct: 7,
            loss_sum: 5.0,
            ..Default::default()
        };
        a.merge(&Evaluation {
            examples: 30,
            correct: 13,
            loss_sum: 15.0,
            ..Default::default()
        });
        assert_eq!(a.accuracy(), Some(0.5));
        assert_eq!(a.mean_loss(), Some(0.5));
    }
}
