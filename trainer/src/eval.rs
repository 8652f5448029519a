//! Federated evaluation: a model's predictions on local data, reduced to the aggregate counts that may
//! leave the hospital, and (under DP) their noisy release ([`release_counts`]).
use caduceus_dataset::{AgeGroup, Attribute, Gender, ImageSet, Labels, Race};
use caduceus_fairness::GroupCounts;
use caduceus_models::Model;
use caduceus_privacy::evaluation::CountNoise;
use caduceus_proto::{Evaluation, EvaluationPrivacy};

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

/// Every group value of `attribute` ([`group_value`]'s fixed domain), whether a dataset holds it or
/// not.
pub fn group_domain(attribute: Attribute) -> Vec<String> {
    match attribute {
        Attribute::Gender => Gender::ALL.iter().map(|g| g.code().to_string()).collect(),
        Attribute::Race => Race::ALL.iter().map(|r| r.code().to_string()).collect(),
        Attribute::AgeGroup => AgeGroup::LABELS.iter().map(|l| l.to_string()).collect(),
    }
}

/// Number of count tables an evaluation release holds, each of which one validation example
/// changes in exactly one cell by 1: the overall confusion counts, one table per sensitive
/// attribute, their intersection (two or more attributes), and for a task of more than two classes
/// the number of correct predictions (for a binary task it is overall tp + tn, not released on its
/// own). The release's L2 sensitivity is √tables.
pub fn released_tables(sensitive: &[Attribute], task: Attribute) -> u32 {
    let attributes = sensitive.len() as u32;
    1 + attributes + u32::from(attributes >= 2) + u32::from(task.num_classes() > 2)
}

/// The evaluation counts as a trainer releases them under DP: a Gaussian mechanism on the count
/// tables of [`released_tables`] (see `caduceus_privacy::evaluation` and docs/privacy.md).
///
/// - Every group of each sensitive attribute's fixed domain ([`group_domain`]) and every
///   combination in their intersection is released, zeros included, so the set of groups reported
///   says nothing about the data.
/// - Every confusion count gets independent discrete Gaussian noise from `noise` and is clamped
///   at 0.
/// - `examples` is the total of the noised overall counts and, for a binary task, `correct` is
///   their tp + tn (post-processing); for a multi-class task `correct` is noised on its own and
///   capped at `examples`.
/// - The loss is not released (`loss_sum` 0): per-example cross-entropy is unbounded.
pub fn release_counts(
    exact: &Evaluation,
    sensitive: &[Attribute],
    task: Attribute,
    noise: &mut CountNoise,
) -> anyhow::Result<Evaluation> {
    let tables = released_tables(sensitive, task);
    anyhow::ensure!(
        noise.tables() == tables,
        "the count noise is for {} tables, the release has {tables}",
        noise.tables()
    );
    let domains: Vec<(&str, Vec<String>)> = sensitive.iter().map(|a| (a.name(), group_domain(*a))).collect();
    let values: Vec<Vec<&str>> = domains
        .iter()
        .map(|(_, g)| g.iter().map(String::as_str).collect())
        .collect();
    let refs: Vec<(&str, &[&str])> = domains
        .iter()
        .zip(&values)
        .map(|((a, _), v)| (*a, v.as_slice()))
        .collect();
    let mut counts = GroupCounts::zeros(&refs)?;
    anyhow::ensure!(
        exact.counts.groups_within(&counts),
        "the evaluation holds a group outside its attribute's domain; refusing to release it"
    );
    counts.merge(&exact.counts);
    for c in counts.cells_mut() {
        *c = noise.release(*c);
    }
    let examples = counts.overall.total();
    let correct = if task.num_classes() == 2 {
        counts.overall.tp + counts.overall.tn
    } else {
        noise.release(exact.correct).min(examples)
    };
    Ok(Evaluation {
        examples,
        correct,
        loss_sum: 0.0,
        loss_examples: 0,
        counts,
        privacy: Some(EvaluationPrivacy {
            noise_multiplier: noise.noise_multiplier(),
            noise_std: noise.noise_std(),
            sensitivity: noise.sensitivity(),
        }),
    })
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
        loss_examples: n,
        counts,
        privacy: None,
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

    fn seeded(z: f64, tables: u32, seed: u64) -> CountNoise {
        CountNoise::with_seed(z, tables, seed).unwrap()
    }

    #[test]
    fn tables_count_what_one_example_touches() {
        use Attribute::*;
        assert_eq!(released_tables(&[], Gender), 1);
        assert_eq!(released_tables(&[Race], Gender), 2);
        assert_eq!(released_tables(&[Race, AgeGroup], Gender), 4, "the demo");
        assert_eq!(
            released_tables(&[Gender, AgeGroup], Race),
            5,
            "multi-class: correct too"
        );
        // One example really touches one cell of each table, and no other count: the L2
        // distance between neighbouring exact releases is √tables.
        let s = set();
        let sens = [Race, AgeGroup];
        let e = counts_from_predictions(&s, &[0, 1, 0], 0.5, &sens, 1).unwrap();
        let sub = ImageSet::new(
            Attribute::Gender,
            2,
            2,
            vec![0.0; 2 * 3 * 4],
            s.attributes[..2].to_vec(),
            vec!["f0".into(), "f1".into()],
        )
        .unwrap();
        let f = counts_from_predictions(&sub, &[0, 1], 0.5, &sens, 1).unwrap();
        let cells = |e: &Evaluation| {
            let mut all = GroupCounts::zeros(&[
                ("race", &["0", "1", "2", "3", "4"][..]),
                ("age-group", &caduceus_dataset::AgeGroup::LABELS[..]),
            ])
            .unwrap();
            all.merge(&e.counts);
            all.cells_mut().map(|v| *v as i64).collect::<Vec<_>>()
        };
        let (a, b) = (cells(&e), cells(&f));
        let dist2: i64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert_eq!(dist2, i64::from(released_tables(&sens, Gender)));
    }

    #[test]
    fn released_counts_are_noised_and_list_every_group() {
        let s = set();
        let sens = [Attribute::Race, Attribute::AgeGroup];
        let exact = counts_from_predictions(&s, &[0, 1, 0], 0.5, &sens, 1).unwrap();
        let tables = released_tables(&sens, Attribute::Gender);
        let (z, runs) = (2.0, 400);
        let sd = z * f64::from(tables).sqrt();
        let mut differ = 0;
        let mut race0_tn = Vec::new();
        let mut absent_tp = Vec::new();
        for seed in 0..runs {
            let mut noise = seeded(z, tables, seed);
            let r = release_counts(&exact, &sens, Attribute::Gender, &mut noise).unwrap();
            // Every group of the fixed domains, zeros included, in every release.
            assert_eq!(r.counts.attribute("race").unwrap().len(), 5);
            assert_eq!(r.counts.attribute("age-group").unwrap().len(), 9);
            assert_eq!(r.counts.attribute("age-group&race").unwrap().len(), 45);
            assert_eq!(r.examples, r.counts.overall.total());
            assert_eq!(r.correct, r.counts.overall.tp + r.counts.overall.tn);
            assert_eq!((r.loss_sum, r.mean_loss()), (0.0, None));
            let p = r.privacy.unwrap();
            assert_eq!((p.noise_multiplier, p.noise_std, p.sensitivity), (z, sd, 2.0));
            if r.counts != exact.counts {
                differ += 1;
            }
            race0_tn.push(r.counts.attribute("race").unwrap()["0"].tn as f64);
            absent_tp.push(r.counts.attribute("race").unwrap()["4"].tp as f64);
            // It goes on the wire and is accepted as a DP release.
            let back =
                caduceus_proto::evaluation_from_proto(&caduceus_proto::evaluation_to_proto(&r)).unwrap();
            assert_eq!(back.privacy, r.privacy);
        }
        assert_eq!(differ, runs, "every release differs from the exact counts");
        // Race 0 has one true negative: its release is max(0, 1 + N_ℤ(0, (zΔ)²)). Compare the
        // mean and spread over the seeds with those of the clamped normal.
        let mean = race0_tn.iter().sum::<f64>() / runs as f64;
        let var = race0_tn.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (runs - 1) as f64;
        let (m_ref, sd_ref) = clamped_moments(1.0, sd);
        assert!(
            (mean - m_ref).abs() < 4.0 * sd_ref / (runs as f64).sqrt(),
            "{mean} vs {m_ref}"
        );
        assert!(
            (var.sqrt() / sd_ref - 1.0).abs() < 0.15,
            "{} vs {sd_ref}",
            var.sqrt()
        );
        // An absent group (race 4) is reported, with noise: positive in about half the releases.
        let positive = absent_tp.iter().filter(|&&c| c > 0.0).count() as f64 / runs as f64;
        assert!((0.35..0.6).contains(&positive), "{positive}");
    }

    /// Mean and standard deviation of max(0, c + N(0, sd²)).
    fn clamped_moments(c: f64, sd: f64) -> (f64, f64) {
        let (mut m1, mut m2, mut w) = (0.0, 0.0, 0.0);
        let step = sd / 200.0;
        let mut x = -8.0 * sd;
        while x <= 8.0 * sd {
            let p = (-x * x / (2.0 * sd * sd)).exp();
            let v = (c + x).max(0.0);
            m1 += p * v;
            m2 += p * v * v;
            w += p;
            x += step;
        }
        let (m1, m2) = (m1 / w, m2 / w);
        (m1, (m2 - m1 * m1).sqrt())
    }

    #[test]
    fn a_group_outside_the_domain_is_never_released() {
        let mut e = Evaluation::default();
        e.counts.record(&[("race", "9")], true, true).unwrap();
        let mut noise = seeded(2.0, 2, 1);
        let err = release_counts(&e, &[Attribute::Race], Attribute::Gender, &mut noise).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        // Noise made for another number of tables is refused too.
        let mut noise = seeded(2.0, 4, 1);
        assert!(
            release_counts(
                &Evaluation::default(),
                &[Attribute::Race],
                Attribute::Gender,
                &mut noise
            )
            .is_err()
        );
    }
}
