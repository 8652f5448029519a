//! Federated evaluation: a model's predictions on local data, reduced to the aggregate counts that may
//! leave the hospital.
use caduceus_dataset::{Attribute, ImageSet, Labels};
use caduceus_fairness::GroupCounts;
use caduceus_models::Model;
use caduceus_proto::Evaluation;

/// The group value of an example for a sensitive attribute, as used in group counts: the class code for
/// gender and race (`"0"`, `"1"`, … as in the dataset's labels) and the bucket label for age groups
/// (`"20-29"`).
pub fn group_value(attribute: Attribute, labels: &Labels) -> String {
    match attribute {
        Attribute::Gender => labels.gender.code().to_string(),
        Attribute::Race => labels.race.code().to_string(),
        Attribute::AgeGroup => labels.age_group().label().to_string(),
    }
}

/// Evaluates `model` on `set` and reduces the result to counts: examples, correct predictions, summed
/// loss, and binary confusion counts (class `positive_class` against the rest) overall, per group of
/// each sensitive attribute and for their intersection.
pub fn evaluate_counts(
    model: &Model,
    set: &ImageSet,
    sensitive: &[Attribute],
    positive_class: u32,
    batch_size: usize,
) -> anyhow::Result<Evaluation> {
    let e = caduceus_models::evaluate(model, set, batch_size)?;
    counts_from_predictions(set, &e.predictions, e.loss as f64, sensitive, positive_class)
}

/// [`evaluate_counts`] from predictions already made (`mean_loss` is the mean cross-entropy).
pub fn counts_from_predictions(
    set: &ImageSet,
    predictions: &[u32],
    mean_loss: f64,
    sensitive: &[Attribute],
    positive_class: u32,
) -> anyhow::Result<Evaluation> {
    anyhow::ensure!(
        predictions.len() == set.len(),
        "{} predictions for {} examples",
        predictions.len(),
        set.len()
    );
    let mut counts = GroupCounts::new();
    let mut correct = 0u64;
    for ((&p, &y), attrs) in predictions.iter().zip(&set.labels).zip(&set.attributes) {
        if p == y {
            correct += 1;
        }
        let values: Vec<(&str, String)> = sensitive
            .iter()
            .map(|a| (a.name(), group_value(*a, attrs)))
            .collect();
        let groups: Vec<(&str, &str)> = values.iter().map(|(a, v)| (*a, v.as_str())).collect();
        counts.record(&groups, y == positive_class, p == positive_class)?;
    }
    let n = set.len() as u64;
    Ok(Evaluation {
        examples: n,
        correct,
        loss_sum: if n == 0 { 0.0 } else { mean_loss * n as f64 },
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_dataset::{Gender, Race};

    fn set() -> ImageSet {
        let attrs = vec![
            Labels {
                age: 25,
                gender: Gender::ALL[0],
                race: Race::ALL[0],
            },
            Labels {
                age: 35,
                gender: Gender::ALL[1],
                race: Race::ALL[1],
            },
            Labels {
                age: 45,
                gender: Gender::ALL[1],
                race: Race::ALL[0],
            },
        ];
        let n = attrs.len();
        ImageSet::new(
            Attribute::Gender,
            2,
            2,
            vec![0.0; n * 3 * 4],
            attrs,
            (0..n).map(|i| format!("f{i}")).collect(),
        )
        .unwrap()
    }

    #[test]
    fn counts_by_group() {
        let s = set();
        // labels: 0, 1, 1; predictions: 0, 1, 0
        let e = counts_from_predictions(&s, &[0, 1, 0], 0.5, &[Attribute::Race], 1).unwrap();
        assert_eq!((e.examples, e.correct), (3, 2));
        assert!((e.loss_sum - 1.5).abs() < 1e-12);
        let c = &e.counts.overall;
        assert_eq!((c.tp, c.fp, c.tn, c.fn_), (1, 0, 1, 1));
        let race = e.counts.attribute("race").unwrap();
        assert_eq!(race["0"].total(), 2);
        assert_eq!(race["0"].fn_, 1);
        assert_eq!(race["1"].tp, 1);
        assert!(counts_from_predictions(&s, &[0], 0.5, &[], 1).is_err());
    }
}
