//! Fixed-point quantisation of `f32` update values.
//!
//! A value `x` is clipped to `[-B, B]` and mapped to `q = round(x · S)` with `S = M / B`, so
//! `|q| <= M`. For clipped values the reconstruction error is `|x - q/S| <= 1/(2S)`; a weighted
//! mean `Σ w_i q_i / (S Σ w_i)` of such values therefore differs from the weighted mean of the
//! clipped inputs by at most `1/(2S)` per coordinate (plus the final rounding to `f32`). Values
//! outside `[-B, B]` additionally lose `|x| - B` to clipping.

use crate::error::Error;
use crate::params::SecAggParams;

/// Quantises one value (clip, scale, round half away from zero). `x` must be finite.
#[inline]
fn quantise_one(x: f32, clip: f32, scale: f64, max: i64) -> i64 {
    let c = x.clamp(-clip, clip);
    let q = (f64::from(c) * scale).round() as i64;
    q.clamp(-max, max)
}

/// Clips and quantises `values` under `params`. Rejects NaN and infinities.
pub fn quantise(params: &SecAggParams, values: &[f32]) -> Result<Vec<i64>, Error> {
    let (clip, scale, max) = (params.clip(), params.scale(), params.max_abs_quantised());
    values
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            if value.is_finite() {
                Ok(quantise_one(value, clip, scale, max))
            } else {
                Err(Error::NonFinite { index, value })
            }
        })
        .collect()
}

/// Turns a decrypted weighted sum of quantised values into the weighted mean
/// `sum / (S · total_weight)`.
pub fn dequantise_mean(params: &SecAggParams, sums: &[i64], total_weight: u64) -> Vec<f32> {
    let denom = params.scale() * total_weight as f64;
    sums.iter().map(|&s| (s as f64 / denom) as f32).collect()
}

/// Turns a decrypted weighted sum of quantised values into the weighted sum `sum / S`.
pub fn dequantise_sum(params: &SecAggParams, sums: &[i64]) -> Vec<f32> {
    let s = params.scale();
    sums.iter().map(|&v| (v as f64 / s) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SumBounds;

    fn params(clip: f32) -> SecAggParams {
        SecAggParams::new(clip, SumBounds::default()).unwrap()
    }

    #[test]
    fn boundaries_map_to_plus_minus_m() {
        let p = params(0.25);
        let m = p.max_abs_quantised();
        let q = quantise(&p, &[0.25, -0.25, 1e9, -1e9, 0.0, f32::MIN_POSITIVE]).unwrap();
        assert_eq!(q, vec![m, -m, m, -m, 0, 0]);
    }

    #[test]
    fn error_is_within_half_a_step() {
        let p = params(3.0);
        let bound = p.quantisation_error_bound();
        let xs: Vec<f32> = (0..10_000).map(|i| (i as f32 * 0.000_6) - 3.0).collect();
        let q = quantise(&p, &xs).unwrap();
        for (x, q) in xs.iter().zip(&q) {
            let err = (f64::from(*x) - *q as f64 / p.scale()).abs();
            assert!(err <= bound * (1.0 + 1e-9), "x={x} err={err} bound={bound}");
        }
    }

    #[test]
    fn non_finite_values_are_rejected_with_their_index() {
        let p = params(1.0);
        match quantise(&p, &[0.0, 1.0, f32::NAN]) {
            Err(Error::NonFinite { index: 2, .. }) => {}
            other => panic!("expected NonFinite at 2, got {other:?}"),
        }
        assert!(matches!(
            quantise(&p, &[f32::INFINITY]),
            Err(Error::NonFinite { index: 0, .. })
        ));
    }

    #[test]
    fn mean_round_trips() {
        let p = params(1.0);
        let q = quantise(&p, &[0.5, -0.5]).unwrap();
        // Weighted sum with weights 3 and 1, total 4: (3·0.5 − 0.5)/4 = 0.25.
        let sum = 3 * q[0] + q[1];
        let mean = dequantise_mean(&p, &[sum], 4);
        assert!((mean[0] - 0.25).abs() as f64 <= p.quantisation_error_bound() + 1e-7);
        let s = dequantise_sum(&p, &[sum]);
        assert!((s[0] - 1.0).abs() < 1e-6);
    }
}
