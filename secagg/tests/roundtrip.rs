//! Encrypt → weighted add → decrypt equals the exact integer weighted sum.
#![cfg(feature = "crypto")]

use caduceus_secagg::{AcceptPolicy, Aggregator, Decryptor, Encryptor, SecAggParams, StudyKey, SumBounds};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const STUDY: &str = "utk-fairness";

/// Encrypts `values[i]` for hospital i with `weights[i]`, aggregates, decrypts; returns sums.
fn run(params: &SecAggParams, key: &StudyKey, values: &[Vec<i64>], weights: &[u32]) -> Vec<i64> {
    let round = 4;
    let mut agg = Aggregator::new(params, STUDY, round).unwrap();
    for (i, (v, &w)) in values.iter().zip(weights).enumerate() {
        let enc = Encryptor::new(key, params, &format!("hospital-{i:03}")).unwrap();
        for chunk in enc.encrypt_quantised(round, v).unwrap() {
            assert!(chunk.len() <= caduceus_secagg::params::MAX_MESSAGE_BYTES);
            agg.add_chunk(&chunk, w).unwrap();
        }
    }
    let aggregate = agg.finish().unwrap();
    let dec = Decryptor::new(key, params).unwrap();
    let out = dec
        .decrypt_aggregate(round, &aggregate, &AcceptPolicy::new(1))
        .unwrap();
    assert_eq!(
        out.total_weight,
        weights.iter().map(|&w| u64::from(w)).sum::<u64>()
    );
    out.sums
}

fn expected(values: &[Vec<i64>], weights: &[u32]) -> Vec<i64> {
    (0..values[0].len())
        .map(|j| {
            let s: i128 = values
                .iter()
                .zip(weights)
                .map(|(v, &w)| i128::from(v[j]) * i128::from(w))
                .sum();
            i64::try_from(s).unwrap()
        })
        .collect()
}

#[test]
fn random_vectors_sum_exactly_across_chunks() {
    // One ciphertext per chunk so a 5000-value vector spans 3 chunks, the last one partial.
    let params = SecAggParams::with_polys_per_chunk(0.1, SumBounds::default(), 1).unwrap();
    let key = StudyKey::generate(STUDY).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let m = params.max_abs_quantised();
    let values: Vec<Vec<i64>> = (0..3)
        .map(|_| (0..5000).map(|_| rng.random_range(-m..=m)).collect())
        .collect();
    let weights = [700, 200, 124];
    assert_eq!(run(&params, &key, &values, &weights), expected(&values, &weights));
}

#[test]
fn max_hospitals_max_weights_and_quantiser_boundaries() {
    // K = 16 hospitals, each at the maximum weight W = 64, total K·W = T = 1024.
    let bounds = SumBounds {
        max_hospitals: 16,
        max_weight: 64,
        max_total_weight: 1024,
    };
    let params = SecAggParams::with_polys_per_chunk(1.0, bounds, 2).unwrap();
    let key = StudyKey::generate(STUDY).unwrap();
    let m = params.max_abs_quantised();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let n = 2 * 2048 + 17;
    let values: Vec<Vec<i64>> = (0..16)
        .map(|h| {
            (0..n)
                .map(|j| match j % 5 {
                    0 => m,  // all at +M: sum = T·M, the largest
                    1 => -m, // all at −M
                    2 => {
                        if h % 2 == 0 {
                            m
                        } else {
                            -m
                        }
                    }
                    3 => rng.random_range(-m..=m),
                    _ => 0,
                })
                .collect()
        })
        .collect();
    let weights = [64u32; 16];
    let got = run(&params, &key, &values, &weights);
    assert_eq!(got, expected(&values, &weights));
    assert_eq!(got[0], 1024 * m);
    assert_eq!(got[1], -1024 * m);
    assert!(got[0] <= params.max_abs_sum());
}

#[test]
fn float_updates_at_the_clip_bound_average_exactly() {
    let params = SecAggParams::new(0.5, SumBounds::default()).unwrap();
    let key = StudyKey::generate(STUDY).unwrap();
    let round = 0;
    let updates = [
        vec![0.5f32, -0.5, 7.0, -7.0, 0.125, 0.0],
        vec![0.5f32, -0.5, 0.5, -0.5, -0.125, 1e-9],
    ];
    let weights = [1000u32, 24];
    let mut agg = Aggregator::new(&params, STUDY, round).unwrap();
    for (i, u) in updates.iter().enumerate() {
        let enc = Encryptor::new(&key, &params, &format!("h{i}")).unwrap();
        for c in enc.encrypt_update(round, u).unwrap() {
            agg.add_chunk(&c, weights[i]).unwrap();
        }
    }
    let chunks = agg.finish().unwrap();
    let dec = Decryptor::new(&key, &params).unwrap();
    let mean = dec
        .decrypt_aggregate(round, &chunks, &AcceptPolicy::new(2))
        .unwrap()
        .mean(&params);
    let bound = params.quantisation_error_bound() + 1e-7;
    let clipped_mean = |j: usize| {
        let c = |x: f32| f64::from(x.clamp(-0.5, 0.5));
        (1000.0 * c(updates[0][j]) + 24.0 * c(updates[1][j])) / 1024.0
    };
    for (j, &x) in mean.iter().enumerate() {
        let err = (f64::from(x) - clipped_mean(j)).abs();
        assert!(
            err <= bound,
            "coordinate {j}: {x} vs {} (err {err})",
            clipped_mean(j)
        );
    }
    assert_eq!(mean[0], 0.5);
    assert_eq!(mean[1], -0.5);
}

#[test]
fn many_hospitals_at_the_default_bounds() {
    // Default bounds: K = 64 hospitals, total weight T = 1024 (16 each).
    let params = SecAggParams::new(1.0, SumBounds::default()).unwrap();
    let key = StudyKey::generate(STUDY).unwrap();
    let m = params.max_abs_quantised();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let values: Vec<Vec<i64>> = (0..64)
        .map(|h| {
            (0..300)
                .map(|j| {
                    if j < 2 {
                        if h % 3 == 0 { -m } else { m }
                    } else {
                        rng.random_range(-m..=m)
                    }
                })
                .collect()
        })
        .collect();
    let weights = [16u32; 64];
    assert_eq!(run(&params, &key, &values, &weights), expected(&values, &weights));
}

#[test]
fn seeds_and_ciphertexts_are_fresh_each_time() {
    let params = SecAggParams::new(1.0, SumBounds::default()).unwrap();
    let key = StudyKey::generate(STUDY).unwrap();
    let enc = Encryptor::new(&key, &params, "h").unwrap();
    let a = enc.encrypt_quantised(1, &[5; 100]).unwrap().remove(0);
    let b = enc.encrypt_quantised(1, &[5; 100]).unwrap().remove(0);
    assert_eq!(a.len(), b.len());
    assert_ne!(a, b);
    // Wire size: 6 bytes per value (2048 per ciphertext) plus a small header.
    assert!(a.len() < 2048 * 6 + 200, "{}", a.len());
}
