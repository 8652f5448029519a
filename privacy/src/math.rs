//! Numerics shared by the accountants: log-space sums, log-erfc and Gaussian tail probabilities.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// ln(eˣ + eʸ) without overflow.
pub(crate) fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// A signed number kept as (sign, ln|value|), for alternating series in log space.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignedLog {
    pub negative: bool,
    pub ln_abs: f64,
}

impl SignedLog {
    pub const ZERO: Self = Self {
        negative: false,
        ln_abs: f64::NEG_INFINITY,
    };

    /// self + (sign · e^ln_abs).
    pub fn add(self, negative: bool, ln_abs: f64) -> Self {
        if ln_abs == f64::NEG_INFINITY {
            return self;
        }
        if self.ln_abs == f64::NEG_INFINITY {
            return Self { negative, ln_abs };
        }
        if self.negative == negative {
            return Self {
                negative,
                ln_abs: log_add(self.ln_abs, ln_abs),
            };
        }
        // Opposite signs: the larger magnitude wins.
        let (big, small, big_neg) = if self.ln_abs >= ln_abs {
            (self.ln_abs, ln_abs, self.negative)
        } else {
            (ln_abs, self.ln_abs, negative)
        };
        if big == small {
            return Self::ZERO;
        }
        Self {
            negative: big_neg,
            ln_abs: big + (-(small - big).exp()).ln_1p(),
        }
    }
}

/// ln Γ(x) for x > 0 (libm's lgamma, ~1 ulp).
pub(crate) fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// ln |C(α, i)| for real α ≥ 0 and integer i ≥ 0, with its sign.
pub(crate) fn ln_binom_signed(alpha: f64, i: u64) -> (bool, f64) {
    let i_f = i as f64;
    if alpha.fract() == 0.0 && i_f > alpha {
        return (false, f64::NEG_INFINITY);
    }
    let (lg_rest, _) = libm::lgamma_r(alpha - i_f + 1.0);
    let ln_abs = ln_gamma(alpha + 1.0) - ln_gamma(i_f + 1.0) - lg_rest;
    // C(α, i) = α(α−1)…(α−i+1)/i!: one negative factor for each j < i with j > α.
    let negative_factors = if i_f > alpha { i - alpha.ceil() as u64 } else { 0 };
    (negative_factors % 2 == 1, ln_abs)
}

/// ln erfc(x), accurate also where erfc(x) underflows.
pub(crate) fn ln_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // Asymptotic series erfc(x) = e^{-x²}/(x√π) · Σ (−1)ⁿ (2n−1)!! / (2x²)ⁿ; at x ≥ 25 eight terms
    // leave a relative error below 1e-17.
    let z = 1.0 / (2.0 * x * x);
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..8 {
        term *= -((2 * n - 1) as f64) * z;
        sum += term;
    }
    -x * x - x.ln() - 0.5 * PI.ln() + sum.ln()
}

/// Φᶜ(z) = P(N(0,1) > z).
pub(crate) fn norm_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z * FRAC_1_SQRT_2)
}

/// P(a < N(0,1) ≤ b) for a ≤ b, computed on the side of zero that avoids cancellation.
pub(crate) fn norm_prob(a: f64, b: f64) -> f64 {
    if a >= b {
        return 0.0;
    }
    let p = if a >= 0.0 {
        norm_sf(a) - norm_sf(b)
    } else if b <= 0.0 {
        norm_sf(-b) - norm_sf(-a)
    } else {
        1.0 - norm_sf(b) - norm_sf(-a)
    };
    p.max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_add_matches_direct() {
        assert!((log_add(1.0f64.ln(), 2.0f64.ln()) - 3.0f64.ln()).abs() < 1e-15);
        assert_eq!(log_add(f64::NEG_INFINITY, 0.5), 0.5);
    }

    #[test]
    fn signed_log_subtracts() {
        let s = SignedLog::ZERO.add(false, 5.0f64.ln()).add(true, 3.0f64.ln());
        assert!(!s.negative && (s.ln_abs.exp() - 2.0).abs() < 1e-14);
        let s = s.add(true, 4.0f64.ln());
        assert!(s.negative && (s.ln_abs.exp() - 2.0).abs() < 1e-14);
    }

    #[test]
    fn binomials_of_real_order() {
        let (neg, l) = ln_binom_signed(5.0, 2);
        assert!(!neg && (l.exp() - 10.0).abs() < 1e-12);
        // C(2.5, 3) = 2.5·1.5·0.5/6 = 0.3125; C(2.5, 4) = 0.3125·(−0.5)/4 = −0.0390625.
        let (neg, l) = ln_binom_signed(2.5, 3);
        assert!(!neg && (l.exp() - 0.3125).abs() < 1e-14);
        let (neg, l) = ln_binom_signed(2.5, 4);
        assert!(neg && (l.exp() - 0.0390625).abs() < 1e-14);
        let (neg, l) = ln_binom_signed(2.5, 5);
        assert!(!neg && (l.exp() - 0.0390625 * 1.5 / 5.0).abs() < 1e-14);
    }

    #[test]
    fn ln_erfc_is_continuous_at_switch() {
        let below = libm::erfc(24.999_999).ln();
        let above = ln_erfc(25.000_001);
        assert!((below - above).abs() < 1e-3, "{below} {above}");
        // ln erfc(30) and ln erfc(25.5) from mpmath at 30 digits (erfc(30) underflows a double).
        assert!((ln_erfc(30.0) - (-903.974_117_110_643_9)).abs() < 1e-12);
        assert!((ln_erfc(25.5) - (-654.061_810_857_538)).abs() < 1e-12);
    }

    #[test]
    fn norm_prob_is_accurate_in_tails() {
        let p = norm_prob(8.0, 8.001);
        let expect = norm_sf(8.0) - norm_sf(8.001);
        assert!((p - expect).abs() <= 1e-30 && p > 0.0);
        assert!((norm_prob(-1.0, 1.0) - 0.682_689_492_137_085_9).abs() < 1e-15);
        assert_eq!(norm_prob(1.0, 1.0), 0.0);
    }
}
