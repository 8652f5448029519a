//! Hospital side: quantise, encrypt and encode an update (needs the study key).

use tfhe::core_crypto::commons::generators::MaskRandomGenerator;
use tfhe::core_crypto::commons::math::random::{
    CompressionSeed, Distribution, RandomGenerable, RandomGenerator, Seed,
};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, DefaultRandomGenerator, GlweCiphertextList, GlweSize, PolynomialSize,
    SeededGlweCiphertextList, TUniform, decompress_seeded_glwe_ciphertext_list_with_pre_seeded_generator,
};

use rayon::prelude::*;

use crate::decrypt::ntt_plan;
use crate::error::Error;
use crate::key::{StudyKey, os_random};
use crate::params::{
    DROPPED_BITS, GLWE_DIMENSION, MAX_TOTAL_VALUES, NOISE_BOUND_LOG2, POLYNOMIAL_SIZE, SecAggParams,
};
use crate::quant::quantise;
use crate::wire::{ChunkHeader, Contribution, encode_hospital_chunk, push48, validate_id};

/// Encrypts one hospital's updates. Holds (a shared handle to) the study key.
#[derive(Clone, Debug)]
pub struct Encryptor {
    key: StudyKey,
    params: SecAggParams,
    hospital_id: String,
}

impl Encryptor {
    /// An encryptor for `hospital_id` in the key's study.
    pub fn new(key: &StudyKey, params: &SecAggParams, hospital_id: &str) -> Result<Self, Error> {
        validate_id("hospital id", hospital_id)?;
        Ok(Encryptor {
            key: key.clone(),
            params: params.clone(),
            hospital_id: hospital_id.to_owned(),
        })
    }

    /// The hospital this encryptor speaks for.
    pub fn hospital_id(&self) -> &str {
        &self.hospital_id
    }

    /// Clips, quantises and encrypts `update` for `round`; returns the encoded chunks in order
    /// (each at most [`MAX_MESSAGE_BYTES`](crate::params::MAX_MESSAGE_BYTES)). Chunks are
    /// encrypted in parallel on rayon's pool.
    pub fn encrypt_update(&self, round: u64, update: &[f32]) -> Result<Vec<Vec<u8>>, Error> {
        let q = quantise(&self.params, update)?;
        self.encrypt_quantised(round, &q)
    }

    /// Encrypts already quantised values (each within `±M`) for `round`.
    pub fn encrypt_quantised(&self, round: u64, values: &[i64]) -> Result<Vec<Vec<u8>>, Error> {
        if values.is_empty() {
            return Err(Error::BadLength {
                len: 0,
                reason: "an update must have at least one value",
            });
        }
        let total = values.len() as u64;
        if total > MAX_TOTAL_VALUES {
            return Err(Error::BadLength {
                len: values.len(),
                reason: "longer than the 2^32 values the wire format accepts",
            });
        }
        values
            .par_chunks(self.params.values_per_chunk())
            .enumerate()
            .map(|(i, chunk)| self.encrypt_chunk(round, i as u32, total, chunk))
            .collect()
    }

    /// Encrypts chunk `chunk_index` of a `total_values`-long quantised vector. `values` must be
    /// exactly that chunk's slice. Useful to stream or parallelise large updates.
    pub fn encrypt_chunk(
        &self,
        round: u64,
        chunk_index: u32,
        total_values: u64,
        values: &[i64],
    ) -> Result<Vec<u8>, Error> {
        self.encrypt_chunk_with_noise(
            round,
            chunk_index,
            total_values,
            values,
            TUniform::<u64>::new(NOISE_BOUND_LOG2),
            None,
        )
    }

    /// Encryption core. `extra_noise` (tests only) is added to every body coefficient before
    /// truncation, to place the noise at the edge of the bound.
    ///
    /// This is tfhe's seeded GLWE encryption (`encrypt_seeded_glwe_ciphertext_list`) with the
    /// same building blocks — the mask stream of `MaskRandomGenerator` seeded with the compression
    /// seed, `TUniform` noise from tfhe's `RandomGenerator` seeded independently from the OS —
    /// except that the product `a·s` uses tfhe-ntt's exact NTT for binary right-hand sides
    /// instead of Karatsuba (about 5× faster). tfhe's own decompression and decryption read the
    /// result (`tests::fresh_ciphertexts_carry_tuniform_noise`).
    pub(crate) fn encrypt_chunk_with_noise<D: Distribution>(
        &self,
        round: u64,
        chunk_index: u32,
        total_values: u64,
        values: &[i64],
        noise: D,
        extra_noise: Option<i64>,
    ) -> Result<Vec<u8>, Error>
    where
        u64: RandomGenerable<D>,
    {
        const N: usize = POLYNOMIAL_SIZE;
        let params = &self.params;
        let expected = params.values_in_chunk(total_values, u64::from(chunk_index));
        if values.len() != expected || expected == 0 {
            return Err(Error::BadLength {
                len: values.len(),
                reason: "slice length does not match the chunk's position in the vector",
            });
        }
        let max = params.max_abs_quantised();
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| v.abs() > max) {
            return Err(Error::QuantisedOutOfRange { index, value, max });
        }
        let polys = expected.div_ceil(N);
        let delta = params.delta_log2();

        // Fresh 128-bit mask seed per chunk, from the OS RNG: never reused under this key. An
        // independent 128-bit seed, also from the OS RNG, drives the noise.
        let mut seed = [0u8; 16];
        os_random(&mut seed)?;
        let mut noise_seed = [0u8; 16];
        os_random(&mut noise_seed)?;
        let compression_seed = CompressionSeed::from(Seed(u128::from_le_bytes(seed)));
        let mut mask_generator = MaskRandomGenerator::<DefaultRandomGenerator>::new(compression_seed.clone());
        let mut noise_generator =
            RandomGenerator::<DefaultRandomGenerator>::new(Seed(u128::from_le_bytes(noise_seed)));

        let modulus = CiphertextModulus::<u64>::new_native();
        let glwe_size = GlweSize(GLWE_DIMENSION + 1);
        let zero_body = vec![0u64; N];
        let seeded_zero = SeededGlweCiphertextList::from_container(
            &zero_body[..],
            glwe_size,
            PolynomialSize(N),
            compression_seed,
            modulus,
        );
        let mut scratch = vec![0u64; (GLWE_DIMENSION + 1) * N];
        let mut body = vec![0u64; N];
        let plan = ntt_plan();
        let key = self.key.bits();
        let extra = extra_noise.unwrap_or(0) as u64;
        let half = 1u64 << (DROPPED_BITS - 1);
        let mut packed = Vec::with_capacity(polys * N * 6);
        for p in 0..polys {
            // a_p: the next mask of the seed's stream, exactly as tfhe generates it.
            let mut mask_list =
                GlweCiphertextList::from_container(&mut scratch[..], glwe_size, PolynomialSize(N), modulus);
            decompress_seeded_glwe_ciphertext_list_with_pre_seeded_generator(
                &mut mask_list,
                &seeded_zero,
                &mut mask_generator,
            );
            // b_p = a_p·s + Δ·m_p + e_p.
            plan.negacyclic_polymul(&mut body, &scratch[..N], key);
            let msgs = values.iter().skip(p * N).take(N).chain(std::iter::repeat(&0));
            for (b, &m) in body.iter_mut().zip(msgs) {
                *b = b.wrapping_add((m as u64).wrapping_shl(delta));
            }
            noise_generator
                .unsigned_integer_slice_wrapping_add_random_from_distribution_assign(&mut body, noise);
            for &b in &body {
                push48(
                    &mut packed,
                    b.wrapping_add(extra).wrapping_add(half) >> DROPPED_BITS,
                );
            }
        }

        let header = ChunkHeader {
            params: params.fingerprint(),
            key: self.key.fingerprint(),
            study_id: self.key.study_id().to_owned(),
            round,
            chunk_index,
            chunk_count: params.chunk_count(total_values) as u32,
            total_values,
        };
        let tag = self.key.tag(&header.tag_input(&self.hospital_id, &seed));
        Ok(encode_hospital_chunk(
            &header,
            &Contribution {
                hospital_id: self.hospital_id.clone(),
                seed,
                tag,
            },
            &packed,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{PER_CIPHERTEXT_NOISE_BOUND, SumBounds};
    use crate::{AcceptPolicy, Aggregator, Decryptor};

    const STUDY: &str = "noise-test";

    /// Four hospitals of weight 256 (total T = 1024) encrypt `value` everywhere with
    /// `TUniform(0)` noise (|e| <= 1) plus `extra` added to every body coefficient.
    fn sums_with_extra_noise(value: i64, extra: i64) -> (SecAggParams, Vec<i64>) {
        let bounds = SumBounds {
            max_hospitals: 4,
            max_weight: 256,
            max_total_weight: 1024,
        };
        let params = SecAggParams::with_polys_per_chunk(1.0, bounds, 2).unwrap();
        let key = StudyKey::generate(STUDY).unwrap();
        let n = 2 * POLYNOMIAL_SIZE;
        let mut agg = Aggregator::new(&params, STUDY, 1).unwrap();
        for h in 0..4 {
            let enc = Encryptor::new(&key, &params, &format!("h{h}")).unwrap();
            let msg = enc
                .encrypt_chunk_with_noise(
                    1,
                    0,
                    n as u64,
                    &vec![value; n],
                    TUniform::<u64>::new(0),
                    Some(extra),
                )
                .unwrap();
            agg.add_chunk(&msg, 256).unwrap();
        }
        let out = agg.finish().unwrap();
        let dec = Decryptor::new(&key, &params).unwrap();
        let sums = dec
            .decrypt_aggregate(1, &out, &AcceptPolicy::new(4))
            .unwrap()
            .sums;
        (params, sums)
    }

    #[test]
    fn decoding_is_exact_with_noise_at_the_bound() {
        // Per ciphertext |e| <= 1 + (2^17 - 1) = 2^17, the TUniform(17) bound, all of one sign,
        // at the largest message magnitude, at the largest total weight.
        let extra = (1 << NOISE_BOUND_LOG2) - 1;
        let probe = SecAggParams::with_polys_per_chunk(
            1.0,
            SumBounds {
                max_hospitals: 4,
                max_weight: 256,
                max_total_weight: 1024,
            },
            2,
        )
        .unwrap();
        let m = probe.max_abs_quantised();
        let (params, sums) = sums_with_extra_noise(m, extra);
        assert!(sums.iter().all(|&s| s == 1024 * m));
        assert_eq!(1024 * m, params.max_abs_quantised() * 1024);
        let (_, sums) = sums_with_extra_noise(-m, -extra);
        assert!(sums.iter().all(|&s| s == -1024 * m));
    }

    #[test]
    fn fresh_ciphertexts_carry_tuniform_noise() {
        use tfhe::core_crypto::prelude::{
            GlweCiphertextCount, PlaintextList, decompress_seeded_glwe_ciphertext_list,
            decrypt_glwe_ciphertext_list,
        };
        // Encrypt zeros, then decrypt with tfhe's own routines to see the raw noise.
        let params = SecAggParams::with_polys_per_chunk(1.0, SumBounds::default(), 2).unwrap();
        let key = StudyKey::generate(STUDY).unwrap();
        let n = 2 * POLYNOMIAL_SIZE;
        let msg = Encryptor::new(&key, &params, "h")
            .unwrap()
            .encrypt_quantised(1, &vec![0; n])
            .unwrap()
            .remove(0);
        let chunk = crate::wire::decode_hospital_chunk(&params, &msg).unwrap();
        let bodies: Vec<u64> = (0..n)
            .map(|i| crate::wire::read48(chunk.body, i) << DROPPED_BITS)
            .collect();
        let seeded = SeededGlweCiphertextList::from_container(
            &bodies[..],
            GlweSize(2),
            PolynomialSize(POLYNOMIAL_SIZE),
            CompressionSeed::from(Seed(u128::from_le_bytes(chunk.contribution.seed))),
            CiphertextModulus::new_native(),
        );
        let mut full = GlweCiphertextList::new(
            0u64,
            GlweSize(2),
            PolynomialSize(POLYNOMIAL_SIZE),
            GlweCiphertextCount(2),
            CiphertextModulus::new_native(),
        );
        decompress_seeded_glwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(&mut full, &seeded);
        let mut phases = vec![0u64; n];
        decrypt_glwe_ciphertext_list(
            &key.glwe_key(),
            &full,
            &mut PlaintextList::from_container(&mut phases[..]),
        );
        let noise: Vec<f64> = phases.iter().map(|&p| p as i64 as f64).collect();
        let bound = (PER_CIPHERTEXT_NOISE_BOUND) as f64;
        assert!(noise.iter().all(|e| e.abs() <= bound), "noise beyond 2^17 + 2^15");
        // TUniform(17) has variance ≈ 2^34/3; the body rounding adds ≈ 2^32/3.
        let expected_std = ((2f64.powi(34) + 2f64.powi(32)) / 3.0).sqrt();
        let mean = noise.iter().sum::<f64>() / n as f64;
        let std = (noise.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!(
            (std / expected_std - 1.0).abs() < 0.1,
            "std {std}, expected {expected_std}"
        );
        assert!(mean.abs() < 0.1 * expected_std, "mean {mean}");
    }

    #[test]
    fn noise_beyond_the_bound_breaks_decoding() {
        // Per-ciphertext noise of Δ/(2T) + 2^16 pushes the aggregate past Δ/2: every value is
        // decoded one step too high. The bound is what makes decoding exact.
        let probe = SecAggParams::new(1.0, SumBounds::default()).unwrap();
        let extra = (1i64 << (probe.delta_log2() - 1)) / 1024 + (1 << 16);
        let (_, sums) = sums_with_extra_noise(0, extra);
        assert!(sums.iter().all(|&s| s == 1), "{:?}", &sums[..4]);
    }
}
