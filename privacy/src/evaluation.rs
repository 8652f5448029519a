//! Differential privacy of the evaluation counts a trainer releases every round.
//!
//! Each round a trainer evaluates the model it received on its hospital's validation split and sends
//! aggregate counts (examples, correct predictions, binary confusion counts overall, per group of
//! every sensitive attribute and for their intersection). Under DP those counts are a release of the
//! hospital's data like the DP-SGD update, so they go through a Gaussian mechanism and the ledger
//! counts them (see `docs/privacy.md`, "Evaluation counts under DP").
//!
//! **Sensitivity.** The trainer releases *count tables*: the overall confusion counts, one table per
//! sensitive attribute holding every group of that attribute's fixed domain (zeros included), the
//! intersection of the attributes (every combination of their domains), and for a multi-class task
//! the number of correct predictions. Adding or removing one validation example changes exactly one
//! cell of every table by exactly 1, so the L2 sensitivity of the whole release is
//! Δ = √tables ([`count_sensitivity`]). Everything else the protocol carries is post-processing of
//! these tables (examples = the overall total, correct = tp + tn for a binary task) or is not
//! released (the validation loss, which is unbounded).
//!
//! **Noise.** Every count gets independent discrete Gaussian noise N_ℤ(0, s²) with
//! s² = ⌈(z·Δ)²⌉ ([`CountNoise`], the exact integer sampler of [`crate::noise`]), then is clamped
//! at 0 (post-processing). So the release is a Gaussian mechanism with noise multiplier ≥ z on a
//! unit-sensitivity query: [`evaluation_mechanism`] is `SubsampledGaussian { noise_multiplier: z,
//! sample_rate: 1.0, steps: releases }`, which both accountants compose with DP-SGD.
//!
//! **How many releases.** A trainer evaluates the model it fetches at the start of every round it
//! takes part in, training rounds and the final evaluation-only round alike, and sends one set of
//! counts per round: [`evaluation_releases`]. Re-sending the same update after an aggregator restart
//! re-sends the same noisy bytes and is no new release.
//!
//! ```
//! use caduceus_privacy::AccountantKind;
//! use caduceus_privacy::evaluation::{evaluation_mechanism, evaluation_releases};
//!
//! // An operator trainer Job (CADUCEUS_ROUNDS="r-(r+1)", the aggregator runs the final evaluation):
//! // one training round and the final evaluation-only round, so two releases.
//! let releases = evaluation_releases(1, true);
//! assert_eq!(releases, 2);
//! let m = evaluation_mechanism(10.0, releases)?;
//! let eps = AccountantKind::Pld.epsilon(&[m], 1e-5)?;
//! assert!(eps > 0.45 && eps < 0.55, "{eps}");
//! # Ok::<(), caduceus_privacy::PrivacyError>(())
//! ```
use rand_chacha::ChaCha20Rng;

use crate::error::{PrivacyError, check};
use crate::mechanism::SubsampledGaussian;
use crate::noise::{DiscreteGaussian, check_noise_multiplier, debug_noise, os_rng};

/// Default evaluation noise multiplier z of `caduceus simulate` (the trainer has no default: under
/// DP it refuses to start without one). Chosen in `docs/privacy.md`, "Evaluation counts under DP":
/// at δ = 1e-5 one release costs ε = 0.34 on its own (PLD), and the six releases of the 5-round demo
/// study raise the DP-SGD noise that `--dp-target-epsilon 8` needs by about 1%.
pub const DEFAULT_NOISE_MULTIPLIER: f64 = 10.0;

/// Smallest variance s² of the count noise, in counts². Below it the discrete Gaussian's privacy
/// starts to differ measurably from the continuous one the accountants assume; at s² ≥ 16 the
/// difference term τ ≤ 10·d·e^{−16π²} < 10⁻⁶⁴·d for d released counts.
pub const MIN_COUNT_VARIANCE: u64 = 16;

/// Number of evaluation releases of one trainer process that takes part in `rounds` training rounds
/// and, with `final_evaluation`, in the evaluation-only round that follows the last of them.
///
/// The trainer evaluates the received model once per round it takes part in (before training, and
/// in the evaluation-only round instead of training), so this is `rounds + final_evaluation`:
///
/// - `--rounds a-b` takes part in rounds `a..=b`: `b − a + 1` releases. When `b` is the study's
///   evaluation-only round (`b` = the aggregator's `--rounds`), that is
///   `evaluation_releases(b − a, true)`, otherwise `evaluation_releases(b − a + 1, false)`;
/// - an operator trainer Job runs with `CADUCEUS_ROUNDS="r-(r+1)"` against an aggregator Job with
///   `CADUCEUS_ROUNDS=r+1` and `CADUCEUS_FINAL_EVALUATION=true`: training round `r`, then the final
///   evaluation of the model it produced, so `evaluation_releases(1, true)` = 2;
/// - `--rounds follow` from round 0 of an R-round study with its final evaluation:
///   `evaluation_releases(R, true)` = R + 1.
///
/// It is an upper bound: a round that closes without the hospital releases nothing from it.
pub fn evaluation_releases(rounds: u32, final_evaluation: bool) -> u64 {
    u64::from(rounds) + u64::from(final_evaluation)
}

/// The mechanism `releases` evaluation releases at noise multiplier `noise_multiplier` (z) amount
/// to, for the accountants and the ledger: `SubsampledGaussian { noise_multiplier: z, sample_rate:
/// 1.0, steps: releases }` (no subsampling: every validation example is in every release).
///
/// Errors name `noise_multiplier` (must be > 0 and finite) or `releases` (must be ≥ 1).
pub fn evaluation_mechanism(
    noise_multiplier: f64,
    releases: u64,
) -> Result<SubsampledGaussian, PrivacyError> {
    check(
        "noise_multiplier",
        noise_multiplier,
        "> 0",
        noise_multiplier > 0.0,
    )?;
    check("releases", releases as f64, ">= 1", releases >= 1)?;
    SubsampledGaussian::new(noise_multiplier, 1.0, releases)
}

/// L2 sensitivity of a release of `tables` count tables, each of which one example changes in
/// exactly one cell by 1: √tables.
pub fn count_sensitivity(tables: u32) -> f64 {
    f64::from(tables).sqrt()
}

/// Discrete Gaussian noise for the counts of one evaluation release (see the module docs): each
/// count gets N_ℤ(0, s²) with s² = max(⌈(z·√tables)²⌉, [`MIN_COUNT_VARIANCE`]) and is clamped at 0.
pub struct CountNoise {
    noise_multiplier: f64,
    tables: u32,
    sampler: DiscreteGaussian,
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for CountNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        debug_noise(
            f,
            "CountNoise",
            &[
                ("noise_multiplier", &self.noise_multiplier),
                ("tables", &self.tables),
            ],
            &self.sampler,
        )
    }
}

impl CountNoise {
    /// Noise at multiplier `noise_multiplier` (z) for a release of `tables` count tables, from a
    /// ChaCha20 stream seeded by the operating system.
    pub fn new(noise_multiplier: f64, tables: u32) -> Result<Self, PrivacyError> {
        Self::with_rng(noise_multiplier, tables, os_rng()?)
    }

    /// Same, with a caller-provided ChaCha20 stream (fixed seeds are for tests only).
    pub fn with_rng(noise_multiplier: f64, tables: u32, rng: ChaCha20Rng) -> Result<Self, PrivacyError> {
        check_noise_multiplier(noise_multiplier)?;
        check(
            "tables",
            f64::from(tables),
            "in [1, 2^20]",
            (1..=1 << 20).contains(&tables),
        )?;
        let variance = (noise_multiplier * noise_multiplier * f64::from(tables))
            .ceil()
            .max(MIN_COUNT_VARIANCE as f64);
        let sampler = DiscreteGaussian::new(variance as u64)?;
        Ok(Self {
            noise_multiplier,
            tables,
            sampler,
            rng,
        })
    }

    /// Same, from a ChaCha20 stream with a fixed seed: reproducible noise, for tests only.
    pub fn with_seed(noise_multiplier: f64, tables: u32, seed: u64) -> Result<Self, PrivacyError> {
        use rand::SeedableRng;
        Self::with_rng(noise_multiplier, tables, ChaCha20Rng::seed_from_u64(seed))
    }

    /// z, the noise multiplier asked for.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// Number of count tables of the release.
    pub fn tables(&self) -> u32 {
        self.tables
    }

    /// Δ = √tables.
    pub fn sensitivity(&self) -> f64 {
        count_sensitivity(self.tables)
    }

    /// The variance parameter s² of the discrete Gaussian, in counts².
    pub fn variance(&self) -> u64 {
        self.sampler.variance()
    }

    /// Standard deviation of the noise added to every count, s (≥ z·Δ), before clamping at 0.
    pub fn noise_std(&self) -> f64 {
        (self.sampler.variance() as f64).sqrt()
    }

    /// The noise multiplier the accountant may use: s/Δ, never below z.
    pub fn accounting_noise_multiplier(&self) -> f64 {
        self.noise_std() / self.sensitivity()
    }

    /// One released count: `count` plus N_ℤ(0, s²), clamped at 0.
    pub fn release(&mut self, count: u64) -> u64 {
        let noisy = i128::from(count) + i128::from(self.sampler.sample(&mut self.rng));
        noisy.clamp(0, i128::from(u64::MAX)) as u64
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;
    use crate::accountant::AccountantKind;
    use crate::ledger::{PrivacyBudget, PrivacyLedger, RoundKey};
    use crate::math::norm_sf;

    /// Exact δ(ε) of the Gaussian mechanism with noise multiplier `sigma` on a unit-sensitivity
    /// query (Balle and Wang 2018, Thm 8).
    fn gaussian_delta(sigma: f64, eps: f64) -> f64 {
        norm_sf(eps * sigma - 0.5 / sigma) - eps.exp() * norm_sf(eps * sigma + 0.5 / sigma)
    }

    #[test]
    fn debug_shows_the_parameters_and_the_variance_but_not_the_random_stream() {
        let c = CountNoise::with_seed(10.0, 4, 1).unwrap();
        assert_eq!(
            format!("{c:?}"),
            "CountNoise { noise_multiplier: 10.0, tables: 4, variance: 400, .. }"
        );
    }

    #[test]
    fn releases_count_every_round_taken_part_in() {
        assert_eq!(evaluation_releases(1, true), 2, "an operator trainer Job");
        assert_eq!(evaluation_releases(5, true), 6, "follow through a 5-round study");
        assert_eq!(
            evaluation_releases(3, false),
            3,
            "a hospital that leaves after 3 rounds"
        );
        assert_eq!(evaluation_releases(0, true), 1, "the final evaluation alone");
        assert_eq!(evaluation_releases(0, false), 0);
    }

    #[test]
    fn mechanism_is_an_unsampled_gaussian_and_names_bad_values() {
        let m = evaluation_mechanism(7.5, 3).unwrap();
        assert_eq!(m, SubsampledGaussian::new(7.5, 1.0, 3).unwrap());
        for (z, n, name) in [
            (0.0, 1, "noise_multiplier"),
            (f64::NAN, 1, "noise_multiplier"),
            (-1.0, 1, "noise_multiplier"),
            (1.0, 0, "releases"),
        ] {
            let e = evaluation_mechanism(z, n).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    /// q = 1 in both accountants: T releases at z are one Gaussian at z/√T, known in closed form.
    #[test]
    fn accountants_price_q_equal_one_as_the_exact_gaussian_mechanism() {
        for &(z, t) in &[(10.0, 1u64), (10.0, 6), (5.0, 2), (20.0, 100)] {
            let m = evaluation_mechanism(z, t).unwrap();
            let eff = z / (t as f64).sqrt();
            for acc in [AccountantKind::Pld, AccountantKind::Rdp] {
                let eps = acc.epsilon(&[m], 1e-5).unwrap();
                // ε is an upper bound: δ(ε) of the exact mechanism is at most 1e-5 there.
                assert!(
                    gaussian_delta(eff, eps) <= 1e-5 * (1.0 + 1e-6),
                    "{acc} z={z} T={t}: ε={eps} is below the exact ε"
                );
                if acc == AccountantKind::Pld {
                    // And tight: 2% less ε would not hold.
                    assert!(
                        gaussian_delta(eff, eps * 0.98) > 1e-5,
                        "z={z} T={t}: ε={eps} is loose"
                    );
                }
            }
        }
    }

    #[test]
    fn the_ledger_counts_evaluation_releases_beside_dp_sgd() {
        let sgd = SubsampledGaussian::new(1.0, 0.01, 100).unwrap();
        let eval = evaluation_mechanism(10.0, 1).unwrap();
        let budget = PrivacyBudget::new(100.0, 1e-5, AccountantKind::Pld).unwrap();
        let mut ledger = PrivacyLedger::new();
        for r in 0..3 {
            let key = RoundKey::new("s", r);
            ledger.reserve(key.clone(), &[sgd, eval], &budget).unwrap();
            ledger.commit(&key, Some(&[sgd, eval])).unwrap();
        }
        let with = ledger.epsilon(1e-5, AccountantKind::Pld).unwrap();
        let sgd_only = AccountantKind::Pld.epsilon(&[sgd.with_steps(300)], 1e-5).unwrap();
        let expected = AccountantKind::Pld
            .epsilon(&[sgd.with_steps(300), eval.with_steps(3)], 1e-5)
            .unwrap();
        assert!((with - expected).abs() < 1e-9, "{with} vs {expected}");
        assert!(with > sgd_only + 0.01, "{with} vs {sgd_only}");
    }

    #[test]
    fn count_noise_has_the_right_spread_and_clamps_at_zero() {
        let (z, tables) = (3.0, 4);
        let mut noise = CountNoise::with_rng(z, tables, ChaCha20Rng::seed_from_u64(9)).unwrap();
        assert_eq!(noise.variance(), 36);
        assert_eq!(noise.noise_std(), 6.0);
        assert!(noise.accounting_noise_multiplier() >= z);
        let n = 40_000;
        let xs: Vec<f64> = (0..n).map(|_| noise.release(1_000) as f64 - 1_000.0).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        assert!(mean.abs() < 4.0 * 6.0 / (n as f64).sqrt(), "mean {mean}");
        assert!((sd / 6.0 - 1.0).abs() < 0.03, "sd {sd}");
        // A zero count comes out ≥ 0, positive about half of the time.
        let zeros: Vec<u64> = (0..n).map(|_| noise.release(0)).collect();
        let positive = zeros.iter().filter(|&&c| c > 0).count() as f64 / n as f64;
        assert!((0.44..0.50).contains(&positive), "{positive}");
    }

    #[test]
    fn small_noise_multipliers_get_the_minimum_variance() {
        let noise = CountNoise::with_rng(0.5, 4, ChaCha20Rng::seed_from_u64(1)).unwrap();
        assert_eq!(noise.variance(), MIN_COUNT_VARIANCE);
        assert!(noise.accounting_noise_multiplier() >= 0.5);
        assert!(CountNoise::new(0.0, 4).is_err());
        assert!(CountNoise::new(1.0, 0).is_err());
    }
}
