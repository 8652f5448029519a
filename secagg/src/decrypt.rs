//! Hospital side: verify, decrypt and decode an aggregate (needs the study key).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use tfhe::core_crypto::commons::generators::MaskRandomGenerator;
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, DefaultRandomGenerator, GlweCiphertextList, GlweSize, PolynomialSize,
    SeededGlweCiphertextList, decompress_seeded_glwe_ciphertext_list_with_pre_seeded_generator,
};

use rayon::prelude::*;
use tfhe_ntt::native_binary64::Plan32;

use crate::error::Error;
use crate::key::StudyKey;
use crate::params::{DROPPED_BITS, GLWE_DIMENSION, POLYNOMIAL_SIZE, SecAggParams};
use crate::quant::dequantise_mean;
use crate::wire::{AggregateChunk, decode_aggregate_chunk, read48};

/// What a hospital requires of an aggregate before it decrypts it. A malicious aggregator
/// could otherwise ask hospitals to decrypt a single hospital's update (one contributor) or a
/// re-weighted combination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptPolicy {
    /// Fewest distinct contributors accepted. Use at least 2 in deployments.
    pub min_contributors: usize,
    /// If set, the contributors and weights must be exactly these (the public weight schedule).
    pub expected_weights: Option<BTreeMap<String, u32>>,
    /// If set, this hospital (usually the decrypting one) must be among the contributors.
    pub must_include: Option<String>,
}

impl AcceptPolicy {
    /// Requires at least `min_contributors` contributors, nothing else.
    pub fn new(min_contributors: usize) -> Self {
        AcceptPolicy {
            min_contributors,
            expected_weights: None,
            must_include: None,
        }
    }

    /// Also requires exactly these contributors and weights.
    pub fn with_expected_weights(mut self, weights: BTreeMap<String, u32>) -> Self {
        self.expected_weights = Some(weights);
        self
    }

    /// Also requires `hospital_id` among the contributors.
    pub fn must_include(mut self, hospital_id: &str) -> Self {
        self.must_include = Some(hospital_id.to_owned());
        self
    }
}

/// A decrypted aggregate: exact integer weighted sums of the quantised values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecryptedAggregate {
    /// `Σ w_i q_i` per coordinate, exact.
    pub sums: Vec<i64>,
    /// Contributors and their weights, sorted by hospital id.
    pub contributors: Vec<(String, u32)>,
    /// `Σ w_i`.
    pub total_weight: u64,
}

impl DecryptedAggregate {
    /// The weighted mean of the (clipped) updates: `Σ w_i q_i / (S Σ w_i)`. Within
    /// [`SecAggParams::quantisation_error_bound`] of the plaintext weighted mean of the clipped
    /// values.
    pub fn mean(&self, params: &SecAggParams) -> Vec<f32> {
        dequantise_mean(params, &self.sums, self.total_weight)
    }
}

/// Decrypts aggregates for one study. Holds (a shared handle to) the study key.
#[derive(Clone, Debug)]
pub struct Decryptor {
    key: StudyKey,
    params: SecAggParams,
}

impl Decryptor {
    /// A decryptor for the key's study.
    pub fn new(key: &StudyKey, params: &SecAggParams) -> Result<Self, Error> {
        Ok(Decryptor {
            key: key.clone(),
            params: params.clone(),
        })
    }

    /// Verifies all aggregate chunks of `round` (binding, key, tags, completeness, bounds,
    /// `policy`) and decrypts them into exact integer sums.
    pub fn decrypt_aggregate<B: AsRef<[u8]>>(
        &self,
        round: u64,
        chunks: &[B],
        policy: &AcceptPolicy,
    ) -> Result<DecryptedAggregate, Error> {
        let decoded = chunks
            .iter()
            .map(|c| decode_aggregate_chunk(&self.params, c.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let first = decoded
            .first()
            .ok_or_else(|| Error::Incomplete("no aggregate chunk given".into()))?;
        let (count, total_values) = (first.header.chunk_count, first.header.total_values);
        let contributors: Vec<(String, u32)> = first
            .contributors
            .iter()
            .map(|(c, w)| (c.hospital_id.clone(), *w))
            .collect();
        let mut by_index: BTreeMap<u32, &AggregateChunk<'_>> = BTreeMap::new();
        for chunk in &decoded {
            let h = &chunk.header;
            h.check_binding(self.key.study_id(), round, Some(self.key.fingerprint()))?;
            if (h.chunk_count, h.total_values) != (count, total_values) {
                return Err(Error::InconsistentLayout(format!(
                    "chunk {} says {} chunks / {} values, chunk {} says {count} / {total_values}",
                    h.chunk_index, h.chunk_count, h.total_values, first.header.chunk_index
                )));
            }
            let same = chunk.contributors.len() == contributors.len()
                && chunk
                    .contributors
                    .iter()
                    .zip(&contributors)
                    .all(|((c, w), (id, w2))| &c.hospital_id == id && w == w2);
            if !same {
                return Err(Error::InconsistentLayout(format!(
                    "chunk {} lists other contributors or weights than chunk {}",
                    h.chunk_index, first.header.chunk_index
                )));
            }
            for (c, _) in &chunk.contributors {
                if !self.key.verify_tag(&h.tag_input(&c.hospital_id, &c.seed), &c.tag) {
                    return Err(Error::BadTag {
                        hospital: c.hospital_id.clone(),
                        chunk: h.chunk_index,
                    });
                }
            }
            if by_index.insert(h.chunk_index, chunk).is_some() {
                return Err(Error::InconsistentLayout(format!(
                    "chunk {} given twice",
                    h.chunk_index
                )));
            }
        }
        if by_index.len() != count as usize {
            // Indices are < count (checked by the decoder) and distinct, so one is missing.
            let missing = (0..count).find(|i| !by_index.contains_key(i)).unwrap_or(count);
            return Err(Error::Incomplete(format!(
                "aggregate chunk {missing} of {count} is missing"
            )));
        }
        self.check_bounds_and_policy(&contributors, policy)?;

        // Chunks decrypt independently, in parallel on rayon's pool.
        let chunks: Vec<&AggregateChunk<'_>> = by_index.into_values().collect();
        let parts: Vec<Vec<i64>> = chunks.par_iter().map(|c| self.decrypt_chunk(c)).collect();
        let mut sums = parts.concat();
        sums.truncate(total_values as usize);
        let total_weight = contributors.iter().map(|(_, w)| u64::from(*w)).sum();
        Ok(DecryptedAggregate {
            sums,
            contributors,
            total_weight,
        })
    }

    fn check_bounds_and_policy(
        &self,
        contributors: &[(String, u32)],
        policy: &AcceptPolicy,
    ) -> Result<(), Error> {
        // The noise bound (exact decoding) only holds inside the parameter bounds.
        let b = self.params.bounds();
        if contributors.len() as u32 > b.max_hospitals {
            return Err(Error::TooManyHospitals { max: b.max_hospitals });
        }
        let mut total = 0u64;
        for (id, w) in contributors {
            if *w == 0 || *w > b.max_weight {
                return Err(Error::BadWeight {
                    hospital: id.clone(),
                    reason: format!("weight {w} outside 1..={}", b.max_weight),
                });
            }
            total += u64::from(*w);
        }
        if total > self.params.effective_total_weight() {
            return Err(Error::BadWeight {
                hospital: "(all)".into(),
                reason: format!(
                    "total weight {total} above the bound {}",
                    self.params.effective_total_weight()
                ),
            });
        }
        if contributors.len() < policy.min_contributors {
            return Err(Error::PolicyViolation(format!(
                "{} contributors, at least {} required",
                contributors.len(),
                policy.min_contributors
            )));
        }
        if let Some(expected) = &policy.expected_weights {
            let got: BTreeMap<String, u32> = contributors.iter().cloned().collect();
            if &got != expected {
                return Err(Error::PolicyViolation(format!(
                    "contributors/weights {got:?} differ from the expected {expected:?}"
                )));
            }
        }
        if let Some(me) = &policy.must_include
            && !contributors.iter().any(|(id, _)| id == me)
        {
            return Err(Error::PolicyViolation(format!(
                "hospital {me:?} is not among the contributors"
            )));
        }
        Ok(())
    }

    /// Re-expands and weights every contributor's mask, rebuilds each GLWE ciphertext
    /// `(Σ w_i a_i, Σ w_i b_i)` and decrypts and decodes it.
    fn decrypt_chunk(&self, chunk: &AggregateChunk<'_>) -> Vec<i64> {
        const N: usize = POLYNOMIAL_SIZE;
        let modulus = CiphertextModulus::<u64>::new_native();
        let glwe_size = GlweSize(GLWE_DIMENSION + 1);
        let polys = chunk.body.len() / (N * 6);
        let mut generators: Vec<(MaskRandomGenerator<DefaultRandomGenerator>, u64)> = chunk
            .contributors
            .iter()
            .map(|(c, w)| {
                let seed = CompressionSeed::from(Seed(u128::from_le_bytes(c.seed)));
                (MaskRandomGenerator::new(seed), u64::from(*w))
            })
            .collect();
        let zero_body = vec![0u64; N];
        let seeded_zero = SeededGlweCiphertextList::from_container(
            &zero_body[..],
            glwe_size,
            PolynomialSize(N),
            CompressionSeed::from(Seed(0)),
            modulus,
        );
        let mut scratch = vec![0u64; (GLWE_DIMENSION + 1) * N];
        let mut mask = vec![0u64; N];
        let mut product = vec![0u64; N];
        let plan = ntt_plan();
        let key = self.key.bits();
        let delta = self.params.delta_log2();
        let half = 1u64 << (delta - 1);
        let mut out = Vec::with_capacity(polys * N);
        for p in 0..polys {
            mask.fill(0);
            for (generator, w) in &mut generators {
                let mut out_list = GlweCiphertextList::from_container(
                    &mut scratch[..],
                    glwe_size,
                    PolynomialSize(N),
                    modulus,
                );
                decompress_seeded_glwe_ciphertext_list_with_pre_seeded_generator(
                    &mut out_list,
                    &seeded_zero,
                    generator,
                );
                for (a, m) in mask.iter_mut().zip(&scratch[..N]) {
                    *a = a.wrapping_add(w.wrapping_mul(*m));
                }
            }
            // GLWE decryption (k = 1): phase = b − a·s mod (X^N + 1, 2^64). The product of a
            // 64-bit polynomial by the binary key is exact through tfhe-ntt's three-prime NTT.
            plan.negacyclic_polymul(&mut product, &mask, key);
            out.extend(product.iter().enumerate().map(|(j, &as_j)| {
                let b = read48(chunk.body, p * N + j) << DROPPED_BITS;
                decode(b.wrapping_sub(as_j), half, delta)
            }));
        }
        out
    }
}

// Decryption below multiplies a single mask polynomial by the key.
const _: () = assert!(GLWE_DIMENSION == 1, "decrypt_chunk assumes GLWE dimension 1");

/// The NTT plan for products by the binary key (built once).
pub(crate) fn ntt_plan() -> &'static Plan32 {
    static PLAN: OnceLock<Plan32> = OnceLock::new();
    PLAN.get_or_init(|| Plan32::try_new(POLYNOMIAL_SIZE).expect("tfhe-ntt supports size 2048"))
}

/// Rounds a phase to the nearest multiple of Δ = 2^delta and returns the signed multiple.
#[inline]
pub(crate) fn decode(phase: u64, half: u64, delta: u32) -> i64 {
    let m = phase.wrapping_add(half) >> delta;
    ((m << delta) as i64) >> delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::SumBounds;

    #[test]
    fn ntt_product_matches_tfhe_decryption() {
        use tfhe::core_crypto::prelude::{GlweCiphertext, PlaintextList, decrypt_glwe_ciphertext};
        let key = StudyKey::generate("ntt").unwrap();
        // A deterministic pseudo-random ciphertext (mask and body), decrypted both ways.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ct: Vec<u64> = (0..2 * POLYNOMIAL_SIZE).map(|_| next()).collect();
        let mut expected = vec![0u64; POLYNOMIAL_SIZE];
        decrypt_glwe_ciphertext(
            &key.glwe_key(),
            &GlweCiphertext::from_container(
                &ct[..],
                PolynomialSize(POLYNOMIAL_SIZE),
                CiphertextModulus::new_native(),
            ),
            &mut PlaintextList::from_container(&mut expected[..]),
        );
        let mut product = vec![0u64; POLYNOMIAL_SIZE];
        ntt_plan().negacyclic_polymul(&mut product, &ct[..POLYNOMIAL_SIZE], key.bits());
        let got: Vec<u64> = ct[POLYNOMIAL_SIZE..]
            .iter()
            .zip(&product)
            .map(|(b, p)| b.wrapping_sub(*p))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn decode_is_exact_up_to_the_noise_bound() {
        let p = SecAggParams::new(1.0, SumBounds::default()).unwrap();
        let (delta, half) = (p.delta_log2(), 1u64 << (p.delta_log2() - 1));
        let e = p.noise_bound() as i64;
        let s = p.max_abs_sum();
        for m in [0, 1, -1, s, -s, s - 1, -s + 1, 12345, -98765] {
            for noise in [0, e, -e, e / 2, -e / 2] {
                let phase = ((m as u64) << delta).wrapping_add(noise as u64);
                assert_eq!(decode(phase, half, delta), m, "m={m} noise={noise}");
            }
        }
        // Just past Δ/2 the decoding is off by one: the bound is what makes it exact.
        let phase = ((5i64 as u64) << delta).wrapping_add(half);
        assert_eq!(decode(phase, half, delta), 6);
    }
}
