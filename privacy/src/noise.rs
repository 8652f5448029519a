//! Gaussian noise for DP-SGD without floating-point leaks.
//!
//! Textbook samplers (Box–Muller, ziggurat, `ln` of a uniform float for Laplace) produce floating
//! point values whose *set of reachable values* depends on the input they are added to. Mironov
//! (CCS 2012) used this to distinguish neighbouring inputs of the Laplace mechanism from single
//! outputs, and Jin et al. ("Are We There Yet? Timing and Floating-Point Attacks on Differential
//! Privacy Systems", IEEE S&P 2022) did the same for Gaussian samplers used in DP libraries.
//!
//! Here nothing data-dependent is ever computed in floating point after the noise is drawn:
//! 1. the clipped gradient sum is rounded to a lattice γ·ℤᵈ (γ = C/K, K a power of two);
//! 2. each coordinate gets independent noise from the **discrete Gaussian** N_ℤ(0, s²), sampled
//!    exactly with integer arithmetic (Canonne, Kamath and Steinke, "The Discrete Gaussian for
//!    Differential Privacy", NeurIPS 2020, Algorithms 1–3) from a ChaCha20 stream seeded by the OS;
//! 3. the noisy integer vector is the mechanism's output; multiplying it by γ to get floats is
//!    post-processing.
//!
//! Rounding to the lattice can move each coordinate by up to half a step, so the L2 sensitivity in
//! lattice units is bounded by Δ = K + 2√d (K from clipping, √d from rounding, another √d of slack
//! for the float division). The variance is s² = ⌈(σ·Δ)²⌉, so the noise is σ times the sensitivity
//! as requested and the accountant can use σ itself ([`GaussianNoise::accounting_noise_multiplier`]
//! returns √s²/Δ ≥ σ). The price is noise larger than σ·C by the factor (1 + 2√d/K), reported by
//! [`GaussianNoise::noise_std`]; K is chosen as large as the integer arithmetic allows (s ≤ 2²⁴),
//! which keeps the factor below 1.001 for models up to ~10⁸ parameters at σ ≤ 2.
//!
//! The discrete Gaussian at this scale has the same privacy as the continuous one up to an additive
//! term proportional to τ = 10·Σₖ e^{−2π²s²·k/(k+1)} (Canonne et al. 2020; Kairouz, Liu and
//! Steinke, ICML 2021, Prop. 14), which for s ≥ 2¹⁰ is below 10^(−10⁶): the continuous-Gaussian
//! accountants in this crate apply unchanged.
use rand::{CryptoRng, Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{PrivacyError, check};

/// Largest noise standard deviation in lattice units, so every intermediate fits in a u128.
const MAX_SCALE: f64 = (1u64 << 24) as f64;
/// |Y| beyond this is rejected outright: its acceptance probability is below e^{-2^30}.
const MAX_ABS_SAMPLE: u128 = 1 << 40;

/// A ChaCha20 stream seeded by the operating system, the noise samplers' default randomness.
pub(crate) fn os_rng() -> Result<ChaCha20Rng, PrivacyError> {
    ChaCha20Rng::try_from_os_rng().map_err(|e| PrivacyError::Randomness(e.to_string()))
}

/// The noise multiplier of a sampler over `DiscreteGaussian` must lie in (0, 2^20].
pub(crate) fn check_noise_multiplier(noise_multiplier: f64) -> Result<(), PrivacyError> {
    check(
        "noise_multiplier",
        noise_multiplier,
        "in (0, 2^20]",
        noise_multiplier > 0.0 && noise_multiplier <= (1u64 << 20) as f64,
    )
}

/// `Debug` of a noise source: its parameters and its sampler's variance, never the state of its
/// random stream.
pub(crate) fn debug_noise(
    f: &mut std::fmt::Formatter<'_>,
    name: &str,
    params: &[(&str, &dyn std::fmt::Debug)],
    sampler: &DiscreteGaussian,
) -> std::fmt::Result {
    let mut d = f.debug_struct(name);
    for (field, value) in params {
        d.field(field, value);
    }
    d.field("variance", &sampler.variance()).finish_non_exhaustive()
}

/// Exact sampler of the discrete Gaussian N_ℤ(0, s²) with integer variance s² (Canonne, Kamath
/// and Steinke 2020, Algorithm 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscreteGaussian {
    variance: u128,
    /// t = ⌊s⌋ + 1, the discrete Laplace scale of the proposal.
    t: u128,
}

impl DiscreteGaussian {
    /// A sampler with variance parameter `variance` (s², in lattice units²), 1 ≤ s² ≤ 2⁴⁸.
    pub fn new(variance: u64) -> Result<Self, PrivacyError> {
        check(
            "variance",
            variance as f64,
            "in [1, 2^48]",
            (1..=1u64 << 48).contains(&variance),
        )?;
        let variance = variance as u128;
        Ok(Self {
            variance,
            t: isqrt(variance) + 1,
        })
    }

    /// The variance parameter s².
    pub fn variance(&self) -> u64 {
        self.variance as u64
    }

    /// One sample.
    pub fn sample<R: RngCore + CryptoRng>(&self, rng: &mut R) -> i64 {
        loop {
            let y = discrete_laplace(rng, self.t);
            let abs = y.unsigned_abs() as u128;
            if abs > MAX_ABS_SAMPLE {
                continue;
            }
            // Accept with probability exp(−(|y| − s²/t)² / (2s²)) = exp(−(|y|·t − s²)² / (2s²t²)).
            let diff = (abs * self.t).abs_diff(self.variance);
            let num = diff * diff;
            let den = 2 * self.variance * self.t * self.t;
            if bernoulli_exp_neg(rng, num, den) {
                return y;
            }
        }
    }
}

/// Adds lattice-exact Gaussian noise to clipped gradient sums (see the module docs).
pub struct GaussianNoise {
    clip_norm: f64,
    noise_multiplier: f64,
    dim: usize,
    /// Lattice units per clip norm (K).
    units_per_clip: f64,
    /// L2 sensitivity in lattice units (Δ = K + 2√d).
    sensitivity: f64,
    sampler: DiscreteGaussian,
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for GaussianNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_noise(
            f,
            "GaussianNoise",
            &[
                ("clip_norm", &self.clip_norm),
                ("noise_multiplier", &self.noise_multiplier),
                ("dim", &self.dim),
                ("units_per_clip", &self.units_per_clip),
            ],
            &self.sampler,
        )
    }
}

impl GaussianNoise {
    /// Noise for sums of `dim`-dimensional gradients clipped to L2 norm `clip_norm`, with noise
    /// multiplier `noise_multiplier`, from a ChaCha20 stream seeded by the operating system.
    pub fn new(clip_norm: f64, noise_multiplier: f64, dim: usize) -> Result<Self, PrivacyError> {
        Self::with_rng(clip_norm, noise_multiplier, dim, os_rng()?)
    }

    /// Same, with a caller-provided ChaCha20 stream (fixed seeds are for tests only).
    pub fn with_rng(
        clip_norm: f64,
        noise_multiplier: f64,
        dim: usize,
        rng: ChaCha20Rng,
    ) -> Result<Self, PrivacyError> {
        check("clip_norm", clip_norm, "> 0", clip_norm > 0.0)?;
        check_noise_multiplier(noise_multiplier)?;
        check("dim", dim as f64, ">= 1", dim >= 1)?;
        let slack = 2.0 * (dim as f64).sqrt();
        // Largest power of two K with σ·(K + 2√d) ≤ 2^24.
        let room = MAX_SCALE / noise_multiplier - slack;
        if room < 1.0 {
            return Err(PrivacyError::InvalidParameter {
                name: "dim",
                value: dim as f64,
                requirement: "small enough that the lattice noise fits 2^24 units at this noise multiplier",
            });
        }
        let units_per_clip = 2f64.powi(room.log2().floor() as i32);
        let sensitivity = units_per_clip + slack;
        let variance = (noise_multiplier * sensitivity).powi(2).ceil() as u64;
        Ok(Self {
            clip_norm,
            noise_multiplier,
            dim,
            units_per_clip,
            sensitivity,
            sampler: DiscreteGaussian::new(variance)?,
            rng,
        })
    }

    /// The lattice step γ = C/K in gradient units.
    pub fn grid(&self) -> f64 {
        self.clip_norm / self.units_per_clip
    }

    /// Standard deviation of the added noise in gradient units (≥ σ·C, see the module docs).
    pub fn noise_std(&self) -> f64 {
        (self.sampler.variance() as f64).sqrt() * self.grid()
    }

    /// The noise multiplier the accountant may use: √s²/Δ, never below the requested σ.
    pub fn accounting_noise_multiplier(&self) -> f64 {
        (self.sampler.variance() as f64).sqrt() / self.sensitivity
    }

    /// Gradient dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Returns γ·(round(sum/γ) + z), z ∼ N_ℤ(0, s²)ᵈ. `clipped_sum` is the sum over the batch of
    /// per-example gradients each clipped to `clip_norm`, accumulated in f64.
    pub fn add_noise(&mut self, clipped_sum: &[f64]) -> Result<Vec<f64>, PrivacyError> {
        let lattice = self.lattice_point(clipped_sum.iter().copied(), clipped_sum.len())?;
        let grid = self.grid();
        Ok(lattice.into_iter().map(|z| z as f64 * grid).collect())
    }

    /// [`Self::add_noise`] for an f32 sum (converted exactly to f64 first).
    pub fn add_noise_f32(&mut self, clipped_sum: &[f32]) -> Result<Vec<f32>, PrivacyError> {
        let lattice = self.lattice_point(clipped_sum.iter().map(|&x| f64::from(x)), clipped_sum.len())?;
        let grid = self.grid();
        Ok(lattice.into_iter().map(|z| (z as f64 * grid) as f32).collect())
    }

    /// The mechanism's exact output: the noisy lattice point in units of γ.
    pub fn lattice_point(
        &mut self,
        clipped_sum: impl Iterator<Item = f64>,
        len: usize,
    ) -> Result<Vec<i64>, PrivacyError> {
        if len != self.dim {
            return Err(PrivacyError::InvalidParameter {
                name: "gradient length",
                value: len as f64,
                requirement: "equal to the dimension given at construction",
            });
        }
        let scale = self.units_per_clip / self.clip_norm;
        let mut out = Vec::with_capacity(len);
        for x in clipped_sum {
            let u = (x * scale).round();
            // |u| < 2^52 keeps the rounding exact and leaves room for the noise in an i64.
            check(
                "gradient sum",
                x,
                "finite and below 2^52 lattice units",
                u.abs() < 2f64.powi(52),
            )?;
            out.push(u as i64);
        }
        self.add_lattice_noise(&mut out);
        Ok(out)
    }

    /// Adds N_ℤ(0, s²) to every entry, on all available cores for large vectors: each chunk gets
    /// its own ChaCha20 stream seeded from this one.
    fn add_lattice_noise(&mut self, values: &mut [i64]) {
        const PARALLEL_CHUNK: usize = 1 << 15;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if threads == 1 || values.len() < 2 * PARALLEL_CHUNK {
            values
                .iter_mut()
                .for_each(|v| *v += self.sampler.sample(&mut self.rng));
            return;
        }
        let chunk = values.len().div_ceil(threads).max(PARALLEL_CHUNK);
        let sampler = self.sampler;
        let streams: Vec<ChaCha20Rng> = values
            .chunks(chunk)
            .map(|_| ChaCha20Rng::from_rng(&mut self.rng))
            .collect();
        std::thread::scope(|scope| {
            for (part, mut rng) in values.chunks_mut(chunk).zip(streams) {
                scope.spawn(move || {
                    part.iter_mut().for_each(|v| *v += sampler.sample(&mut rng));
                });
            }
        });
    }
}

/// ⌊√n⌋ for u128.
fn isqrt(n: u128) -> u128 {
    let mut x = (n as f64).sqrt() as u128;
    while x * x > n {
        x -= 1;
    }
    while (x + 1) * (x + 1) <= n {
        x += 1;
    }
    x
}

/// Uniform integer in [0, n) for 1 ≤ n ≤ 2³² (Lemire's multiply-shift with rejection, no bias).
fn uniform_below_u32<R: RngCore>(rng: &mut R, n: u64) -> u64 {
    debug_assert!((1..=1 << 32).contains(&n));
    let threshold = (1u64 << 32) % n;
    loop {
        let m = u64::from(rng.next_u32()) * n;
        if (m & 0xffff_ffff) >= threshold {
            return m >> 32;
        }
    }
}

/// Bernoulli(num/den) for 0 ≤ num ≤ den, den ≥ 1, exactly.
///
/// Draws U uniform on [0, 2^bits) 32 bits at a time from the top, rejecting U ≥ den, and stops as
/// soon as the prefix decides U < num: one 32-bit draw almost always suffices.
fn bernoulli_ratio<R: RngCore>(rng: &mut R, num: u128, den: u128) -> bool {
    use std::cmp::Ordering::{Equal, Greater, Less};
    if num == 0 {
        return false;
    }
    if num >= den {
        return true;
    }
    let (a, b) = (num, den - 1); // result: U < a; valid: U ≤ b
    let bits = 128 - b.leading_zeros();
    let chunks = bits.div_ceil(32);
    'draw: loop {
        let (mut vs_a, mut vs_b) = (Equal, Equal);
        for c in (0..chunks).rev() {
            let shift = 32 * c;
            let width = if c == chunks - 1 { bits - shift } else { 32 };
            let mask = (1u128 << width) - 1;
            let u = u128::from(rng.next_u32()) & mask;
            if vs_a == Equal {
                vs_a = u.cmp(&((a >> shift) & mask));
            }
            if vs_b == Equal {
                vs_b = u.cmp(&((b >> shift) & mask));
            }
            if vs_b == Greater {
                continue 'draw; // U > den − 1: reject
            }
            if vs_a == Less {
                return true;
            }
            if vs_a == Greater && vs_b == Less {
                return false;
            }
        }
        // U is fully drawn, valid, and U ≥ num.
        return false;
    }
}

/// Bernoulli(exp(−num/den)) with integer arithmetic only (CKS 2020, Algorithm 1).
fn bernoulli_exp_neg<R: RngCore>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut num = num;
    // exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋)).
    while num >= den {
        if !bernoulli_exp_minus_one(rng) {
            return false;
        }
        num -= den;
    }
    bernoulli_exp_neg_le1(rng, num, den)
}

/// ⌊e⁻¹·2¹²⁸⌋ (computed with mpmath at 80 digits).
const EXP_MINUS_ONE_128: u128 = 0x5e2d_58d8_b3bc_df1a_bade_c782_9054_f90d;

/// Bernoulli(e⁻¹): compares a uniform 128-bit fraction with e⁻¹'s binary expansion, 32 bits at a
/// time (one draw almost always). Only on a full 128-bit tie (probability 2⁻¹²⁸) does it fall back
/// to [`bernoulli_exp_neg_le1`], which is then off by at most that probability.
fn bernoulli_exp_minus_one<R: RngCore>(rng: &mut R) -> bool {
    for c in (0..4).rev() {
        let u = rng.next_u32();
        let e = (EXP_MINUS_ONE_128 >> (32 * c)) as u32;
        if u != e {
            return u < e;
        }
    }
    bernoulli_exp_neg_le1(rng, 1, 1)
}

/// Bernoulli(exp(−γ)) for γ = num/den ∈ [0, 1]: the least k with Aₖ = 0, Aₖ ∼ Bernoulli(γ/k),
/// is odd with probability exp(−γ).
fn bernoulli_exp_neg_le1<R: RngCore>(rng: &mut R, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    loop {
        match den.checked_mul(k) {
            Some(dk) if bernoulli_ratio(rng, num, dk) => k += 1,
            // γ/k below 2^-128 (or denominators past u128): Aₖ = 0 up to that probability.
            _ => return k % 2 == 1,
        }
    }
}

/// Discrete Laplace with scale t ≤ 2³²: P(y) ∝ exp(−|y|/t) (CKS 2020, Algorithm 2 with s = 1).
fn discrete_laplace<R: RngCore>(rng: &mut R, t: u128) -> i64 {
    loop {
        let u = u128::from(uniform_below_u32(rng, t as u64));
        if !bernoulli_exp_neg(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp_minus_one(rng) {
            v += 1;
        }
        let x = u + t * v;
        let negative = rng.random::<bool>();
        if negative && x == 0 {
            continue;
        }
        let x = x.min(i64::MAX as u128) as i64;
        return if negative { -x } else { x };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn debug_shows_the_parameters_and_the_variance_but_not_the_random_stream() {
        let g = GaussianNoise::with_rng(1.0, 1.0, 4, rng(1)).unwrap();
        assert_eq!(
            format!("{g:?}"),
            format!(
                "GaussianNoise {{ clip_norm: 1.0, noise_multiplier: 1.0, dim: 4, units_per_clip: {:?}, \
                 variance: {}, .. }}",
                g.units_per_clip,
                g.sampler.variance()
            )
        );
    }

    #[test]
    fn bernoulli_exp_has_the_right_mean() {
        let mut r = rng(1);
        for (num, den) in [(1u128, 2u128), (3, 1), (7, 10), (1, 1), (5, 3)] {
            let p = (-(num as f64) / den as f64).exp();
            let n = 200_000;
            let hits = (0..n).filter(|_| bernoulli_exp_neg(&mut r, num, den)).count();
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                ((hits as f64 / n as f64) - p).abs() < 5.0 * sd,
                "{num}/{den}: {hits}"
            );
        }
    }

    #[test]
    fn small_discrete_gaussian_matches_its_pmf() {
        // s² = 4: compare frequencies with the exact pmf ∝ exp(−y²/8) (chi-square over |y| ≤ 6).
        let g = DiscreteGaussian::new(4).unwrap();
        let mut r = rng(2);
        let n = 200_000;
        let mut counts = [0usize; 13];
        for _ in 0..n {
            let y = g.sample(&mut r);
            if y.abs() <= 6 {
                counts[(y + 6) as usize] += 1;
            }
        }
        let weights: Vec<f64> = (-60..=60).map(|y: i32| (-(y * y) as f64 / 8.0).exp()).collect();
        let z: f64 = weights.iter().sum();
        let mut chi2 = 0.0;
        for (i, &c) in counts.iter().enumerate() {
            let y = i as i32 - 6;
            let expect = n as f64 * (-(y * y) as f64 / 8.0).exp() / z;
            chi2 += (c as f64 - expect).powi(2) / expect;
        }
        // 13 cells: the 99.9% quantile of chi-square(12) is 32.9.
        assert!(chi2 < 32.9, "chi2 = {chi2}, counts {counts:?}");
    }

    #[test]
    fn noise_scale_matches_sigma_times_clip() {
        let (clip, sigma, dim) = (0.5, 1.3, 80_000);
        let mut noise = GaussianNoise::with_rng(clip, sigma, dim, rng(3)).unwrap();
        assert!(noise.accounting_noise_multiplier() >= sigma);
        let ratio = noise.noise_std() / (sigma * clip);
        assert!((1.0..1.001).contains(&ratio), "{ratio}");
        let sum: Vec<f64> = (0..dim).map(|i| (i as f64 * 0.001).sin()).collect();
        let out = noise.add_noise(&sum).unwrap();
        let z: Vec<f64> = out.iter().zip(&sum).map(|(o, s)| o - s).collect();
        let mean = z.iter().sum::<f64>() / dim as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (dim - 1) as f64;
        let sd = var.sqrt();
        // Sample sd of n normals has relative sd ≈ 1/√(2n) = 0.5%; allow 4 of those.
        assert!(
            (sd / noise.noise_std() - 1.0).abs() < 0.02,
            "sd {sd} vs {}",
            noise.noise_std()
        );
        assert!(
            mean.abs() < 4.0 * noise.noise_std() / (dim as f64).sqrt(),
            "mean {mean}"
        );
        // Kurtosis of a Gaussian is 3.
        let kurt = z.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / dim as f64 / var.powi(2);
        assert!((kurt - 3.0).abs() < 0.2, "kurtosis {kurt}");
    }

    #[test]
    fn outputs_lie_on_the_lattice() {
        let mut noise = GaussianNoise::with_rng(1.0, 1.0, 8, rng(4)).unwrap();
        let out = noise
            .add_noise(&[0.1, -0.2, 0.3, 0.0, 1.0, 2.0, -3.0, 0.5])
            .unwrap();
        let g = noise.grid();
        for o in out {
            assert_eq!((o / g).fract(), 0.0);
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut noise = GaussianNoise::with_rng(1.0, 1.0, 2, rng(5)).unwrap();
        assert!(noise.add_noise(&[1.0]).is_err());
        assert!(noise.add_noise(&[f64::NAN, 0.0]).is_err());
        assert!(noise.add_noise(&[f64::INFINITY, 0.0]).is_err());
        assert!(GaussianNoise::new(0.0, 1.0, 2).is_err());
        assert!(GaussianNoise::new(1.0, -1.0, 2).is_err());
        assert!(GaussianNoise::new(1.0, 1.0, 0).is_err());
    }

    #[test]
    fn isqrt_is_exact() {
        for n in [
            0u128,
            1,
            2,
            3,
            4,
            15,
            16,
            17,
            (1 << 48) - 1,
            1 << 48,
            u64::MAX as u128,
        ] {
            let r = isqrt(n);
            assert!(r * r <= n && (r + 1) * (r + 1) > n, "{n}");
        }
    }
}
