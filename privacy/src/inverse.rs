//! The inverse problem: the smallest noise multiplier (to a tolerance) whose ε meets a target.
//!
//! A bracketing search on σ (modified false position) keeps the invariant ε(σ_hi) ≤ target, where ε(σ_hi) has actually been computed
//! by the chosen accountant, so the returned σ always satisfies the target (it is at most a
//! relative `1e-4` above the exact root). ε is decreasing in σ for both accountants.
use crate::accountant::{AccountantKind, PldAccountant, RdpAccountant};
use crate::error::{PrivacyError, check, check_delta};
use crate::mechanism::SubsampledGaussian;

/// Relative width of the final bracket on σ.
pub const RELATIVE_TOLERANCE: f64 = 1e-4;
/// Largest noise multiplier searched.
pub const MAX_NOISE_MULTIPLIER: f64 = 1e4;
/// Smallest noise multiplier searched.
pub const MIN_NOISE_MULTIPLIER: f64 = 1e-2;

/// One planned phase of training with a yet unknown noise multiplier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedPhase {
    /// Sampling rate q in (0, 1].
    pub sample_rate: f64,
    /// Number of steps ≥ 1.
    pub steps: u64,
}

/// Result of the search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseMultiplier {
    /// σ with ε(σ) ≤ target.
    pub noise_multiplier: f64,
    /// ε(σ) as computed by the accountant (≤ target).
    pub epsilon: f64,
}

/// σ such that `steps` steps at rate `sample_rate` give ε ≤ `target_epsilon` at `delta`.
pub fn noise_multiplier_for_epsilon(
    accountant: AccountantKind,
    target_epsilon: f64,
    delta: f64,
    sample_rate: f64,
    steps: u64,
) -> Result<NoiseMultiplier, PrivacyError> {
    noise_multiplier_for_budget(
        accountant,
        target_epsilon,
        delta,
        &[],
        &[PlannedPhase { sample_rate, steps }],
    )
}

/// σ such that `prior` (already spent) composed with `planned` (all at the same unknown σ) gives
/// ε ≤ `target_epsilon` at `delta`.
pub fn noise_multiplier_for_budget(
    accountant: AccountantKind,
    target_epsilon: f64,
    delta: f64,
    prior: &[SubsampledGaussian],
    planned: &[PlannedPhase],
) -> Result<NoiseMultiplier, PrivacyError> {
    check("target_epsilon", target_epsilon, "> 0", target_epsilon > 0.0)?;
    check_delta(delta)?;
    if planned.is_empty() {
        return Err(PrivacyError::InvalidParameter {
            name: "planned",
            value: 0.0,
            requirement: "at least one phase",
        });
    }
    let schedule = |sigma: f64| -> Result<Vec<SubsampledGaussian>, PrivacyError> {
        let mut v = prior.to_vec();
        for p in planned {
            v.push(SubsampledGaussian::new(sigma, p.sample_rate, p.steps)?);
        }
        Ok(v)
    };
    // Validate the plan once (σ = 1 is valid) so errors name the real culprit.
    schedule(1.0)?;
    let rdp = RdpAccountant::default();
    let pld = PldAccountant::default();
    let eps_rdp = |sigma: f64| rdp.epsilon(&schedule(sigma)?, delta);
    let eps_pld = |sigma: f64| pld.epsilon(&schedule(sigma)?, delta);
    // Solve with RDP first (milliseconds). PLD's ε is almost always below RDP's, so the RDP
    // solution is a good upper end for PLD's search (verified, not assumed).
    let (lo, eps_lo, hi, eps_hi) = bracket(&eps_rdp, target_epsilon, delta, 1.0, 0.5)?;
    let rdp = refine(&eps_rdp, target_epsilon, (lo, eps_lo, hi, eps_hi))?;
    if accountant == AccountantKind::Rdp {
        return Ok(rdp);
    }
    let start = bracket(&eps_pld, target_epsilon, delta, rdp.noise_multiplier, 0.85)?;
    refine(&eps_pld, target_epsilon, start)
}

/// Shrinks a bracket (lo, ε(lo), hi, ε(hi)) with ε(lo) > target ≥ ε(hi) to the relative
/// tolerance by the Illinois method (modified false position): superlinear, and every probe
/// keeps at least half a tolerance from the ends so the bracket always shrinks.
fn refine(
    eps: &dyn Fn(f64) -> Result<f64, PrivacyError>,
    target_epsilon: f64,
    (mut lo, eps_lo, mut hi, mut eps_hi): (f64, f64, f64, f64),
) -> Result<NoiseMultiplier, PrivacyError> {
    let mut f_lo = eps_lo - target_epsilon;
    let mut f_hi = eps_hi - target_epsilon;
    let mut last_side = 0i8;
    while hi - lo > RELATIVE_TOLERANCE * hi {
        let margin = 0.5 * RELATIVE_TOLERANCE * hi;
        let guess = if f_lo.is_finite() && f_lo > f_hi {
            hi - f_hi * (hi - lo) / (f_hi - f_lo)
        } else {
            0.5 * (lo + hi)
        };
        let x = guess.clamp(lo + margin, hi - margin);
        let e = eps(x)?;
        if e <= target_epsilon {
            hi = x;
            eps_hi = e;
            f_hi = e - target_epsilon;
            if last_side == 1 {
                f_lo *= 0.5;
            }
            last_side = 1;
        } else {
            lo = x;
            f_lo = e - target_epsilon;
            if last_side == -1 {
                f_hi *= 0.5;
            }
            last_side = -1;
        }
    }
    Ok(NoiseMultiplier {
        noise_multiplier: hi,
        epsilon: eps_hi,
    })
}

/// Returns (lo, ε(lo), hi, ε(hi)) with ε(lo) > target ≥ ε(hi), or lo at the search floor with
/// ε(lo) = +∞ standing for "not evaluated".
fn bracket(
    eps: &dyn Fn(f64) -> Result<f64, PrivacyError>,
    target: f64,
    delta: f64,
    start: f64,
    shrink: f64,
) -> Result<(f64, f64, f64, f64), PrivacyError> {
    let mut hi = start;
    let mut e_hi = eps(hi)?;
    while e_hi > target {
        if hi >= MAX_NOISE_MULTIPLIER {
            return Err(PrivacyError::Unreachable {
                target_epsilon: target,
                delta,
                max_noise_multiplier: hi,
                epsilon_at_max: e_hi,
            });
        }
        hi = (hi / shrink).min(MAX_NOISE_MULTIPLIER);
        e_hi = eps(hi)?;
    }
    let (mut lo, mut e_lo) = (hi, e_hi);
    loop {
        let next = lo * shrink;
        if next < MIN_NOISE_MULTIPLIER {
            return Ok((MIN_NOISE_MULTIPLIER.min(lo), f64::INFINITY, lo, e_lo));
        }
        let e = eps(next)?;
        if e > target {
            return Ok((next, e, lo, e_lo));
        }
        (lo, e_lo) = (next, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_rdp() {
        let r = noise_multiplier_for_epsilon(AccountantKind::Rdp, 2.0, 1e-5, 0.01, 1000).unwrap();
        assert!(r.epsilon <= 2.0);
        let m = SubsampledGaussian::new(r.noise_multiplier * (1.0 - 2.0 * RELATIVE_TOLERANCE), 0.01, 1000)
            .unwrap();
        let just_below = RdpAccountant::default().epsilon(&[m], 1e-5).unwrap();
        assert!(
            just_below > 2.0,
            "σ is not minimal: ε({}) = {just_below}",
            m.noise_multiplier
        );
    }

    #[test]
    fn unreachable_target_is_an_error() {
        let prior = [SubsampledGaussian::new(0.5, 1.0, 100).unwrap()];
        let e = noise_multiplier_for_budget(
            AccountantKind::Rdp,
            1.0,
            1e-5,
            &prior,
            &[PlannedPhase {
                sample_rate: 0.01,
                steps: 10,
            }],
        )
        .unwrap_err();
        assert!(matches!(e, PrivacyError::Unreachable { .. }), "{e}");
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = noise_multiplier_for_epsilon(AccountantKind::Rdp, 0.0, 1e-5, 0.01, 10).unwrap_err();
        assert!(e.to_string().contains("target_epsilon"));
        let e = noise_multiplier_for_epsilon(AccountantKind::Rdp, 1.0, 1.0, 0.01, 10).unwrap_err();
        assert!(e.to_string().contains("delta"));
        let e = noise_multiplier_for_epsilon(AccountantKind::Rdp, 1.0, 1e-5, 1.01, 10).unwrap_err();
        assert!(e.to_string().contains("sample_rate"));
        let e = noise_multiplier_for_epsilon(AccountantKind::Rdp, 1.0, 1e-5, 0.1, 0).unwrap_err();
        assert!(e.to_string().contains("steps"));
    }
}
