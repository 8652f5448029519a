//! Study-wide public parameters: the GLWE parameter set, the aggregation bounds and the
//! fixed-point encoding derived from them.
//!
//! # Parameter set
//!
//! GLWE dimension 1, polynomial size 2048, native modulus q = 2^64, binary secret key and
//! `TUniform(17)` encryption noise. These are the GLWE parameters of tfhe 1.8's published
//! `V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128` set (an alias of
//! `V1_4_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128`), which Zama documents as at least
//! 128-bit secure according to the lattice estimator.
//!
//! # Noise bound (exact decoding)
//!
//! `TUniform(17)` samples lie in `[-2^17, 2^17]` (hard bound). Only the top [`BODY_BITS`] bits
//! of each body coefficient travel: rounding away the low [`DROPPED_BITS`] bits adds an error in
//! `(-2^15, 2^15]`. So one ciphertext carries `|e| <= 2^17 + 2^15` and a weighted sum with
//! non-negative integer weights of total `Σw <= T` carries `|e| <= T * (2^17 + 2^15)`.
//! Decryption rounds the phase to the nearest multiple of `Δ = 2^delta_log2`; it is exact when
//! `|e| < Δ/2`. [`SecAggParams::new`] picks the smallest `Δ` with `T * (2^17 + 2^15) < Δ/2` and
//! then the largest quantised magnitude `M` with `T * M <= 2^(63 - delta_log2) - 1`, so the
//! weighted sum of quantised values fits the signed message space and never wraps. Both bounds
//! are deterministic: decoding cannot fail for inputs within the bounds, whatever the randomness.
//!
//! Every round encrypts fresh ciphertexts and hospitals decrypt the round's aggregate, so noise
//! never accumulates across rounds: the number of rounds is unbounded.

use sha2::{Digest, Sha256};

use crate::error::Error;

/// Re-exported here, where it was defined before it got its own module.
pub use crate::fingerprint::Fingerprint;

/// Polynomial size N of the GLWE ciphertexts (values per ciphertext).
pub const POLYNOMIAL_SIZE: usize = 2048;
/// GLWE dimension k (number of mask polynomials).
pub const GLWE_DIMENSION: usize = 1;
/// log2 of the `TUniform` noise bound: noise is uniform-ish in `[-2^17, 2^17]`.
pub const NOISE_BOUND_LOG2: u32 = 17;
/// log2 of the ciphertext modulus (native `u64`).
pub const MODULUS_LOG2: u32 = 64;
/// Bits of each body coefficient that are sent on the wire (6 bytes).
pub const BODY_BITS: u32 = 48;
/// Low bits of each body coefficient rounded away before sending.
pub const DROPPED_BITS: u32 = MODULUS_LOG2 - BODY_BITS;
/// Bytes of one body coefficient on the wire.
pub const BODY_BYTES_PER_VALUE: usize = (BODY_BITS / 8) as usize;
/// Upper bound on the size of one encoded message (hospital chunk or aggregate chunk).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Default number of GLWE ciphertexts per chunk: 256 × 2048 values × 6 bytes = 3 MiB of body.
pub const DEFAULT_POLYS_PER_CHUNK: u32 = 256;
/// Largest number of ciphertexts per chunk that keeps every message under
/// [`MAX_MESSAGE_BYTES`] (leaving 64 KiB for headers and the contributor list).
pub const MAX_POLYS_PER_CHUNK: u32 =
    ((MAX_MESSAGE_BYTES - (64 << 10)) / (POLYNOMIAL_SIZE * BODY_BYTES_PER_VALUE)) as u32;
/// Longest update vector accepted (2^32 values): bounds what a forged header can make a
/// decoder allocate.
pub const MAX_TOTAL_VALUES: u64 = 1 << 32;
/// Hard cap on the number of hospitals, so the contributor list of an aggregate chunk stays
/// well inside the 64 KiB reserved for headers.
pub const MAX_HOSPITALS_LIMIT: u32 = 256;

/// Worst-case noise of one ciphertext after body truncation: `2^17 + 2^15`.
pub const PER_CIPHERTEXT_NOISE_BOUND: u64 = (1 << NOISE_BOUND_LOG2) + (1 << (DROPPED_BITS - 1));

/// Limits that every round's weighted sum must respect; they size the encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumBounds {
    /// Maximum number of hospitals whose ciphertexts are summed (K).
    pub max_hospitals: u32,
    /// Maximum integer weight of one hospital (W), at least 1.
    pub max_weight: u32,
    /// Maximum sum of the weights in one aggregate (T); the noise and headroom are sized for
    /// `min(T, K·W)`.
    pub max_total_weight: u32,
}

impl Default for SumBounds {
    /// 64 hospitals, weights normalised to integers summing to at most 1024 (10-bit resolution
    /// for FedAvg example counts or FairFed weights).
    fn default() -> Self {
        SumBounds {
            max_hospitals: 64,
            max_weight: 1024,
            max_total_weight: 1024,
        }
    }
}

/// The study-wide public parameters. All hospitals and the aggregator must use the same value;
/// its [`fingerprint`](Self::fingerprint) travels in every message.
#[derive(Clone, Debug, PartialEq)]
pub struct SecAggParams {
    clip: f32,
    bounds: SumBounds,
    polys_per_chunk: u32,
    effective_total_weight: u64,
    delta_log2: u32,
    max_abs_quantised: i64,
    scale: f64,
    fingerprint: Fingerprint,
}

impl SecAggParams {
    /// Derives the encoding for update values clipped to `[-clip, clip]` and the given bounds,
    /// with [`DEFAULT_POLYS_PER_CHUNK`] ciphertexts per chunk.
    pub fn new(clip: f32, bounds: SumBounds) -> Result<Self, Error> {
        Self::with_polys_per_chunk(clip, bounds, DEFAULT_POLYS_PER_CHUNK)
    }

    /// Like [`new`](Self::new) with an explicit chunk size (in ciphertexts of 2048 values).
    pub fn with_polys_per_chunk(clip: f32, bounds: SumBounds, polys_per_chunk: u32) -> Result<Self, Error> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::InvalidParams(format!(
                "clip bound must be finite and > 0, got {clip}"
            )));
        }
        if bounds.max_hospitals == 0 || bounds.max_hospitals > MAX_HOSPITALS_LIMIT {
            return Err(Error::InvalidParams(format!(
                "max_hospitals must be in 1..={MAX_HOSPITALS_LIMIT}, got {}",
                bounds.max_hospitals
            )));
        }
        if bounds.max_weight == 0 {
            return Err(Error::InvalidParams("max_weight must be >= 1".into()));
        }
        if bounds.max_total_weight < bounds.max_weight {
            return Err(Error::InvalidParams(format!(
                "max_total_weight ({}) must be >= max_weight ({})",
                bounds.max_total_weight, bounds.max_weight
            )));
        }
        if polys_per_chunk == 0 || polys_per_chunk > MAX_POLYS_PER_CHUNK {
            return Err(Error::InvalidParams(format!(
                "polys_per_chunk must be in 1..={MAX_POLYS_PER_CHUNK}, got {polys_per_chunk}"
            )));
        }
        let total = u64::from(bounds.max_total_weight)
            .min(u64::from(bounds.max_hospitals) * u64::from(bounds.max_weight));
        let noise = u128::from(total) * u128::from(PER_CIPHERTEXT_NOISE_BOUND);
        // Smallest delta_log2 with noise < 2^(delta_log2 - 1).
        let mut delta_log2 = 1u32;
        while (1u128 << (delta_log2 - 1)) <= noise {
            delta_log2 += 1;
        }
        if delta_log2 > 62 {
            return Err(Error::InvalidParams(format!(
                "total weight {total} leaves no room for messages (Δ would be 2^{delta_log2})"
            )));
        }
        let max_signed_sum: u64 = (1u64 << (63 - delta_log2)) - 1;
        let max_abs = max_signed_sum / total;
        if max_abs < 1 {
            return Err(Error::InvalidParams(format!(
                "total weight {total} leaves no room for messages: at most {max_signed_sum} \
                 representable, so no quantisation level fits"
            )));
        }
        let max_abs_quantised = max_abs as i64;
        let scale = max_abs_quantised as f64 / f64::from(clip);
        let mut params = SecAggParams {
            clip,
            bounds,
            polys_per_chunk,
            effective_total_weight: total,
            delta_log2,
            max_abs_quantised,
            scale,
            fingerprint: Fingerprint([0; 16]),
        };
        params.fingerprint = params.compute_fingerprint();
        Ok(params)
    }

    fn compute_fingerprint(&self) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(b"caduceus-secagg/params/v1");
        for v in [
            POLYNOMIAL_SIZE as u64,
            GLWE_DIMENSION as u64,
            u64::from(NOISE_BOUND_LOG2),
            u64::from(MODULUS_LOG2),
            u64::from(BODY_BITS),
            u64::from(self.clip.to_bits()),
            u64::from(self.bounds.max_hospitals),
            u64::from(self.bounds.max_weight),
            u64::from(self.bounds.max_total_weight),
            u64::from(self.polys_per_chunk),
            u64::from(self.delta_log2),
            self.max_abs_quantised as u64,
        ] {
            h.update(v.to_le_bytes());
        }
        let digest = h.finalize();
        let mut fp = [0u8; 16];
        fp.copy_from_slice(&digest[..16]);
        Fingerprint(fp)
    }

    /// Clip bound B: update values are clipped to `[-B, B]` before quantisation.
    pub fn clip(&self) -> f32 {
        self.clip
    }
    /// The aggregation bounds the encoding was sized for.
    pub fn bounds(&self) -> SumBounds {
        self.bounds
    }
    /// `min(T, K·W)`: the largest total weight of one aggregate.
    pub fn effective_total_weight(&self) -> u64 {
        self.effective_total_weight
    }
    /// log2 of the encoding scale Δ of a quantised integer in the torus.
    pub fn delta_log2(&self) -> u32 {
        self.delta_log2
    }
    /// Largest |quantised value| M; the scale S is `M / B`.
    pub fn max_abs_quantised(&self) -> i64 {
        self.max_abs_quantised
    }
    /// Quantisation scale S (quantised integer per unit of update value).
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// Worst-case |noise| of an aggregate at the bounds: `T · (2^17 + 2^15)`.
    pub fn noise_bound(&self) -> u64 {
        self.effective_total_weight * PER_CIPHERTEXT_NOISE_BOUND
    }
    /// Largest |weighted sum of quantised values| that decodes without wrapping:
    /// `2^(63 - delta_log2) - 1`.
    pub fn max_abs_sum(&self) -> i64 {
        ((1u64 << (63 - self.delta_log2)) - 1) as i64
    }
    /// Bits of signed precision available to each quantised value (`log2(2M + 1)`).
    pub fn bits_per_value(&self) -> f64 {
        (2.0 * self.max_abs_quantised as f64 + 1.0).log2()
    }
    /// Error bound that quantisation adds to each value of a weighted mean (for values inside
    /// `[-B, B]`): `1 / (2S) = B / (2M)`, before the final conversion to `f32`.
    pub fn quantisation_error_bound(&self) -> f64 {
        0.5 / self.scale
    }
    /// Ciphertexts (of 2048 values) per chunk.
    pub fn polys_per_chunk(&self) -> u32 {
        self.polys_per_chunk
    }
    /// Values per chunk: `polys_per_chunk · 2048`.
    pub fn values_per_chunk(&self) -> usize {
        self.polys_per_chunk as usize * POLYNOMIAL_SIZE
    }
    /// Fingerprint of every parameter above; carried in each message.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Number of chunks for a vector of `total_values` values.
    pub fn chunk_count(&self, total_values: u64) -> u64 {
        total_values.div_ceil(self.values_per_chunk() as u64)
    }

    /// Number of values in chunk `index` of a `total_values`-long vector (0 if out of range).
    pub fn values_in_chunk(&self, total_values: u64, index: u64) -> usize {
        let per = self.values_per_chunk() as u64;
        let start = index.saturating_mul(per);
        if start >= total_values {
            return 0;
        }
        (total_values - start).min(per) as usize
    }

    /// Number of ciphertexts in chunk `index`.
    pub fn polys_in_chunk(&self, total_values: u64, index: u64) -> usize {
        self.values_in_chunk(total_values, index)
            .div_ceil(POLYNOMIAL_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_bounds_give_24_bit_values() {
        let p = SecAggParams::new(1.0, SumBounds::default()).unwrap();
        assert_eq!(p.effective_total_weight(), 1024);
        // 1024 · (2^17 + 2^15) = 2^27 + 2^25 < 2^28 = Δ/2  →  Δ = 2^29.
        assert_eq!(p.delta_log2(), 29);
        assert_eq!(p.max_abs_quantised(), (1 << 24) - 1);
        assert!(u128::from(p.noise_bound()) < 1u128 << (p.delta_log2() - 1));
        assert!(
            i128::from(p.max_abs_quantised()) * i128::from(p.effective_total_weight() as i64)
                <= i128::from(p.max_abs_sum())
        );
    }

    #[test]
    fn delta_is_minimal_and_headroom_maximal() {
        for (k, w, t) in [
            (1, 1, 1),
            (10, 100, 1000),
            (64, 1024, 1024),
            (256, 65535, 1 << 20),
        ] {
            let b = SumBounds {
                max_hospitals: k,
                max_weight: w,
                max_total_weight: t,
            };
            let p = SecAggParams::new(0.5, b).unwrap();
            let noise = u128::from(p.noise_bound());
            assert!(noise < 1u128 << (p.delta_log2() - 1));
            assert!(noise >= 1u128 << (p.delta_log2() - 2), "Δ not minimal for {b:?}");
            let total = i128::from(p.effective_total_weight() as i64);
            let m = i128::from(p.max_abs_quantised());
            assert!(m * total <= i128::from(p.max_abs_sum()));
            assert!((m + 1) * total > i128::from(p.max_abs_sum()), "M not maximal");
        }
    }

    #[test]
    fn invalid_params_are_rejected() {
        let b = SumBounds::default();
        assert!(SecAggParams::new(0.0, b).is_err());
        assert!(SecAggParams::new(f32::NAN, b).is_err());
        assert!(
            SecAggParams::new(
                1.0,
                SumBounds {
                    max_hospitals: 0,
                    ..b
                }
            )
            .is_err()
        );
        assert!(
            SecAggParams::new(
                1.0,
                SumBounds {
                    max_total_weight: 10,
                    ..b
                }
            )
            .is_err()
        );
        assert!(SecAggParams::with_polys_per_chunk(1.0, b, MAX_POLYS_PER_CHUNK + 1).is_err());
        // A total weight so large that no message bit is left.
        let huge = SumBounds {
            max_hospitals: 256,
            max_weight: u32::MAX,
            max_total_weight: u32::MAX,
        };
        assert!(SecAggParams::new(1.0, huge).is_err());
    }

    #[test]
    fn fingerprint_changes_with_every_field() {
        let b = SumBounds::default();
        let base = SecAggParams::new(1.0, b).unwrap();
        let others = [
            SecAggParams::new(2.0, b).unwrap(),
            SecAggParams::new(
                1.0,
                SumBounds {
                    max_hospitals: 63,
                    ..b
                },
            )
            .unwrap(),
            SecAggParams::with_polys_per_chunk(1.0, b, 8).unwrap(),
        ];
        for o in others {
            assert_ne!(base.fingerprint(), o.fingerprint());
        }
        assert_eq!(
            base.fingerprint(),
            SecAggParams::new(1.0, b).unwrap().fingerprint()
        );
    }

    #[test]
    fn chunk_sizes_fit_the_message_limit() {
        let body = MAX_POLYS_PER_CHUNK as usize * POLYNOMIAL_SIZE * BODY_BYTES_PER_VALUE;
        assert!(body + (64 << 10) <= MAX_MESSAGE_BYTES);
        let p = SecAggParams::new(1.0, SumBounds::default()).unwrap();
        let total = 11_000_000u64;
        let n = p.chunk_count(total);
        let sum: usize = (0..n).map(|i| p.values_in_chunk(total, i)).sum();
        assert_eq!(sum as u64, total);
        assert_eq!(p.values_in_chunk(total, n), 0);
    }
}
