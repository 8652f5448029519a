//! Conversions between the wire messages and the fairness crate's confusion counts, and validation of
//! what a hospital reports.
use std::collections::BTreeMap;

use caduceus_fairness::{ConfusionCounts, GroupCounts};

use crate::{Confusion, EvaluationCounts, EvaluationPrivacy, GroupConfusion};

/// Largest value of any count in [`EvaluationCounts`] (2³²): far above any validation set, and small
/// enough that sums over the four cells of a group and over many hospitals cannot overflow a u64.
pub const MAX_EVALUATION_COUNT: u64 = 1 << 32;

/// A hospital's evaluation of a global model in library types.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub examples: u64,
    pub correct: u64,
    /// Sum of the loss over `loss_examples` examples.
    pub loss_sum: f64,
    /// Examples whose loss is in `loss_sum`: `examples` for exact counts, 0 for counts released
    /// under DP (the loss is not released).
    pub loss_examples: u64,
    pub counts: GroupCounts,
    /// How one hospital's counts were noised (DP), `None` for exact counts. [`Evaluation::merge`]
    /// leaves it as it is: a sum of releases is no release of its own.
    pub privacy: Option<EvaluationPrivacy>,
}

impl Evaluation {
    /// Accuracy, `None` without examples.
    pub fn accuracy(&self) -> Option<f64> {
        (self.examples > 0).then(|| self.correct as f64 / self.examples as f64)
    }

    /// Mean loss over the examples whose loss was released, `None` without any.
    pub fn mean_loss(&self) -> Option<f64> {
        (self.loss_examples > 0).then(|| self.loss_sum / self.loss_examples as f64)
    }

    /// Adds another hospital's evaluation.
    pub fn merge(&mut self, other: &Evaluation) {
        self.examples += other.examples;
        self.correct += other.correct;
        self.loss_sum += other.loss_sum;
        self.loss_examples += other.loss_examples;
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
        privacy: e.privacy,
    }
}

fn check_count(field: &str, value: u64) -> Result<(), String> {
    if value > MAX_EVALUATION_COUNT {
        return Err(format!(
            "{field} is {value}, above the maximum of {MAX_EVALUATION_COUNT}"
        ));
    }
    Ok(())
}

fn check_confusion(field: &str, c: &Confusion) -> Result<(), String> {
    check_count(&format!("{field}.true_positives"), c.true_positives)?;
    check_count(&format!("{field}.false_positives"), c.false_positives)?;
    check_count(&format!("{field}.true_negatives"), c.true_negatives)?;
    check_count(&format!("{field}.false_negatives"), c.false_negatives)
}

/// Checks and converts what a hospital sent. Refuses with a message naming the field: a count above
/// [`MAX_EVALUATION_COUNT`], more correct than examples, a non-finite or negative loss, confusion
/// totals that do not match the example count, or a group repeated; for counts released under DP
/// (`privacy` set), a bad noise description or a loss that is not 0. Noised group tables need not
/// add up to the example count.
pub fn evaluation_from_proto(p: &EvaluationCounts) -> Result<Evaluation, String> {
    check_count("evaluation.examples", p.examples)?;
    check_count("evaluation.correct", p.correct)?;
    if let Some(o) = &p.overall {
        check_confusion("evaluation.overall", o)?;
    }
    for g in &p.groups {
        if let Some(c) = &g.counts {
            check_confusion(&format!("evaluation.groups[{}={}]", g.attribute, g.group), c)?;
        }
    }
    if let Some(dp) = &p.privacy {
        if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
            return Err(format!(
                "evaluation.privacy.noise_multiplier is {}; it must be a positive number",
                dp.noise_multiplier
            ));
        }
        for (name, v) in [("noise_std", dp.noise_std), ("sensitivity", dp.sensitivity)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!(
                    "evaluation.privacy.{name} is {v}; it must be a positive number"
                ));
            }
        }
        if p.loss_sum != 0.0 {
            return Err(format!(
                "evaluation.loss_sum is {} but evaluation.privacy is set: under DP the loss is not released (send 0)",
                p.loss_sum
            ));
        }
    }
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
    for (attr, gs) in attributes.iter().filter(|_| p.privacy.is_none()) {
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
        loss_examples: if p.privacy.is_some() { 0 } else { p.examples },
        counts: GroupCounts { overall, attributes },
        privacy: p.privacy,
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
            loss_examples: 2,
            counts,
            privacy: None,
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
        // Counts from the network are bounded, so no sum of them can overflow.
        let mut bad = p.clone();
        bad.examples = u64::MAX;
        assert!(
            evaluation_from_proto(&bad)
                .unwrap_err()
                .contains("evaluation.examples")
        );
        let mut bad = p.clone();
        bad.groups[0].counts.as_mut().unwrap().true_negatives = u64::MAX;
        let e = evaluation_from_proto(&bad).unwrap_err();
        assert!(e.contains("true_negatives") && e.contains("maximum"), "{e}");
        let mut bad = p.clone();
        bad.overall.as_mut().unwrap().false_positives = u64::MAX - 1;
        assert!(
            evaluation_from_proto(&bad)
                .unwrap_err()
                .contains("evaluation.overall")
        );
    }

    #[test]
    fn noised_counts_are_accepted_without_the_consistency_checks() {
        let mut counts = GroupCounts::new();
        counts.record(&[("race", "0")], true, true).unwrap();
        counts.record(&[("race", "1")], false, false).unwrap();
        let privacy = EvaluationPrivacy {
            noise_multiplier: 10.0,
            noise_std: 20.0,
            sensitivity: 2.0,
        };
        let mut p = evaluation_to_proto(&Evaluation {
            examples: 2,
            correct: 2,
            counts,
            privacy: Some(privacy),
            ..Default::default()
        });
        // Noise: the race groups now count more examples than `examples`.
        p.groups[0].counts.as_mut().unwrap().true_positives = 40;
        let e = evaluation_from_proto(&p).unwrap();
        assert_eq!(e.privacy, Some(privacy));
        assert_eq!(e.mean_loss(), None, "the loss is not released under DP");
        assert_eq!(e.accuracy(), Some(1.0));
        let mut bad = p.clone();
        bad.loss_sum = 3.0;
        assert!(evaluation_from_proto(&bad).unwrap_err().contains("loss_sum"));
        let mut bad = p.clone();
        bad.privacy.as_mut().unwrap().noise_multiplier = 0.0;
        assert!(
            evaluation_from_proto(&bad)
                .unwrap_err()
                .contains("privacy.noise_multiplier")
        );
        // The same excess without privacy is refused.
        p.privacy = None;
        assert!(evaluation_from_proto(&p).unwrap_err().contains("groups for race"));
    }

    #[test]
    fn merge_sums() {
        let mut a = Evaluation {
            examples: 10,
            correct: 7,
            loss_sum: 5.0,
            loss_examples: 10,
            ..Default::default()
        };
        a.merge(&Evaluation {
            examples: 30,
            correct: 13,
            loss_sum: 15.0,
            loss_examples: 30,
            ..Default::default()
        });
        assert_eq!(a.accuracy(), Some(0.5));
        assert_eq!(a.mean_loss(), Some(0.5));
        // A noised evaluation adds examples but no loss: the mean loss stays that of the others.
        a.merge(&Evaluation {
            examples: 60,
            correct: 30,
            ..Default::default()
        });
        assert_eq!(a.accuracy(), Some(0.5));
        assert_eq!(a.mean_loss(), Some(0.5));
    }
}
