//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! RDP of one step at order α is ln(A_α)/(α − 1) with
//! A_α = E_{z∼N(0,σ²)}[((1 − q) + q·e^{(2z − 1)/(2σ²)})^α], computed as in Mironov, Talwar and
//! Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (2019, arXiv:1908.10530),
//! §3.3: a finite binomial sum for integer α and two convergent (alternating) series of erfc terms
//! for fractional α. This is the analysis behind Opacus' `accountants/analysis/rdp.py` and Google's
//! `dp_accounting.rdp`. RDP composes additively over steps and mechanisms.
//!
//! Conversion to (ε, δ):
//! - [`Conversion::Tight`] (default): ε = min_α RDP(α) + ln(1 − 1/α) − (ln δ + ln α)/(α − 1),
//!   Balle et al. 2020 ("Hypothesis testing interpretations and Rényi DP", Thm 21) and
//!   Canonne–Kamath–Steinke 2020 (Prop. 12); used by Opacus and dp_accounting.
//! - [`Conversion::Classic`]: ε = min_α RDP(α) − ln δ/(α − 1) (Mironov 2017, Prop. 3), the
//!   "moments accountant" bound of Abadi et al. 2016; looser, kept for comparison.
use crate::error::{PrivacyError, check_delta};
use crate::math::{SignedLog, ln_binom_signed, ln_erfc, log_add};
use crate::mechanism::{SubsampledGaussian, validate_all};

/// Opacus' default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63
/// (`RDPAccountant.DEFAULT_ALPHAS` in Opacus).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + x as f64 / 10.0)
        .chain((12..64).map(|a| a as f64))
        .collect()
}

/// How RDP is turned into (ε, δ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Conversion {
    /// Balle et al. 2020 / Canonne–Kamath–Steinke 2020.
    #[default]
    Tight,
    /// Mironov 2017, Prop. 3 (the moments accountant).
    Classic,
}

/// ε together with the order that achieved it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RdpEpsilon {
    /// The (ε, δ)-DP ε.
    pub epsilon: f64,
    /// The minimising order α.
    pub order: f64,
}

/// The RDP accountant: a set of orders and a conversion.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    conversion: Conversion,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self {
            orders: default_orders(),
            conversion: Conversion::Tight,
        }
    }
}

impl RdpAccountant {
    /// Custom orders (each > 1) and conversion.
    pub fn new(orders: Vec<f64>, conversion: Conversion) -> Result<Self, PrivacyError> {
        for &a in &orders {
            crate::error::check("order", a, "> 1", a > 1.0)?;
        }
        if orders.is_empty() {
            return Err(PrivacyError::InvalidParameter {
                name: "orders",
                value: 0.0,
                requirement: "a non-empty list",
            });
        }
        Ok(Self { orders, conversion })
    }

    /// Same orders, another conversion.
    pub fn with_conversion(mut self, conversion: Conversion) -> Self {
        self.conversion = conversion;
        self
    }

    /// The orders α.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Total RDP at each order of a composition of mechanisms.
    pub fn rdp(&self, mechanisms: &[SubsampledGaussian]) -> Result<Vec<f64>, PrivacyError> {
        validate_all(mechanisms)?;
        let mut total = vec![0.0; self.orders.len()];
        for m in mechanisms {
            for (t, &alpha) in total.iter_mut().zip(&self.orders) {
                *t += m.steps as f64 * rdp_one_step(m.sample_rate, m.noise_multiplier, alpha);
            }
        }
        Ok(total)
    }

    /// ε at `delta` for the composition, with the optimal order.
    pub fn epsilon_and_order(
        &self,
        mechanisms: &[SubsampledGaussian],
        delta: f64,
    ) -> Result<RdpEpsilon, PrivacyError> {
        check_delta(delta)?;
        let rdp = self.rdp(mechanisms)?;
        Ok(rdp_to_epsilon(&self.orders, &rdp, delta, self.conversion))
    }

    /// ε at `delta` for the composition.
    pub fn epsilon(&self, mechanisms: &[SubsampledGaussian], delta: f64) -> Result<f64, PrivacyError> {
        Ok(self.epsilon_and_order(mechanisms, delta)?.epsilon)
    }

    /// δ at `epsilon` (≥ 0) for the composition: min over α of the bound matching the conversion.
    pub fn delta(&self, mechanisms: &[SubsampledGaussian], epsilon: f64) -> Result<f64, PrivacyError> {
        crate::error::check("epsilon", epsilon, ">= 0", epsilon >= 0.0)?;
        let rdp = self.rdp(mechanisms)?;
        let mut best = f64::INFINITY;
        for (&a, &r) in self.orders.iter().zip(&rdp) {
            let ln_delta = match self.conversion {
                Conversion::Classic => (a - 1.0) * (r - epsilon),
                Conversion::Tight => (a - 1.0) * (r - epsilon + (-1.0 / a).ln_1p()) - a.ln(),
            };
            best = best.min(ln_delta);
        }
        Ok(best.exp().min(1.0))
    }
}

/// RDP of one step of the Poisson-subsampled Gaussian at order α (may be +∞).
pub fn rdp_one_step(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if q >= 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_integer(q, sigma, alpha as u64)
    } else {
        log_a_fractional(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// ln A_α for integer α: Σ_{i=0}^{α} C(α,i) qⁱ (1−q)^{α−i} e^{(i²−i)/(2σ²)}.
fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let (_, ln_c) = ln_binom_signed(alpha as f64, i);
        let i_f = i as f64;
        let s = ln_c + i_f * ln_q + (alpha as f64 - i_f) * ln_1mq + (i_f * i_f - i_f) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, s);
    }
    log_a
}

/// ln A_α for fractional α (Mironov et al. 2019, §3.3): the integral is split at
/// z₀ = σ² ln(1/q − 1) + 1/2 and each half expanded as a generalised binomial series.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    const MAX_TERMS: u64 = 10_000;
    let ln_q = q.ln();
    let ln_1mq = (-q).ln_1p();
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let s2 = std::f64::consts::SQRT_2 * sigma;
    let ln_half = 0.5f64.ln();
    let mut a0 = SignedLog::ZERO;
    let mut a1 = SignedLog::ZERO;
    let (mut last0, mut last1) = (f64::INFINITY, f64::INFINITY);
    for i in 0..MAX_TERMS {
        let (negative, ln_c) = ln_binom_signed(alpha, i);
        let i_f = i as f64;
        let j = alpha - i_f;
        let ln_t0 = ln_c + i_f * ln_q + j * ln_1mq;
        let ln_t1 = ln_c + j * ln_q + i_f * ln_1mq;
        let ln_e0 = ln_half + ln_erfc((i_f - z0) / s2);
        let ln_e1 = ln_half + ln_erfc((z0 - j) / s2);
        let ln_s0 = ln_t0 + (i_f * i_f - i_f) / (2.0 * sigma * sigma) + ln_e0;
        let ln_s1 = ln_t1 + (j * j - j) / (2.0 * sigma * sigma) + ln_e1;
        a0 = a0.add(negative, ln_s0);
        a1 = a1.add(negative, ln_s1);
        let total = SignedLog::ZERO
            .add(a0.negative, a0.ln_abs)
            .add(a1.negative, a1.ln_abs);
        // Stop once both series' terms decrease and are negligible (e^-36 ≈ 2e-16) relative to
        // the running total.
        if i > alpha as u64 && ln_s0 < last0 && ln_s1 < last1 && ln_s0.max(ln_s1) < total.ln_abs - 36.0 {
            return if total.negative {
                f64::INFINITY
            } else {
                total.ln_abs
            };
        }
        last0 = ln_s0;
        last1 = ln_s1;
    }
    // Did not converge: report no guarantee at this order (it is then never the minimiser).
    f64::INFINITY
}

/// Converts total RDP at `orders` to (ε, optimal order) at `delta`.
pub fn rdp_to_epsilon(orders: &[f64], rdp: &[f64], delta: f64, conversion: Conversion) -> RdpEpsilon {
    let mut best = RdpEpsilon {
        epsilon: f64::INFINITY,
        order: f64::NAN,
    };
    for (&a, &r) in orders.iter().zip(rdp) {
        if r.is_nan() || r == f64::INFINITY {
            continue;
        }
        let eps = match conversion {
            Conversion::Classic => r - delta.ln() / (a - 1.0),
            Conversion::Tight => {
                if delta * delta + (-r).exp_m1() > 0.0 {
                    // δ ≥ sqrt(1 − e^{−KL}) with KL ≤ RDP(α): (0, δ)-DP already holds.
                    0.0
                } else {
                    r + (-1.0 / a).ln_1p() - (delta.ln() + a.ln()) / (a - 1.0)
                }
            }
        };
        if eps < best.epsilon {
            best = RdpEpsilon {
                epsilon: eps,
                order: a,
            };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mech(sigma: f64, q: f64, steps: u64) -> SubsampledGaussian {
        SubsampledGaussian::new(sigma, q, steps).unwrap()
    }

    #[test]
    fn default_orders_match_opacus() {
        let o = default_orders();
        assert_eq!(o.len(), 99 + 52);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 12.0);
        assert_eq!(*o.last().unwrap(), 63.0);
    }

    #[test]
    fn full_batch_is_the_gaussian_rdp() {
        for &a in &[1.5, 2.0, 7.3, 32.0] {
            assert!((rdp_one_step(1.0, 2.0, a) - a / 8.0).abs() < 1e-15);
        }
    }

    #[test]
    fn integer_and_fractional_paths_agree_near_integers() {
        // RDP is continuous in α: the series at α = 3 ± 1e-7 must bracket the binomial sum at 3.
        let (q, s) = (0.05, 1.1);
        let at = rdp_one_step(q, s, 3.0);
        let lo = rdp_one_step(q, s, 3.0 - 1e-7);
        let hi = rdp_one_step(q, s, 3.0 + 1e-7);
        assert!(lo <= at + 1e-9 && at <= hi + 1e-9, "{lo} {at} {hi}");
        assert!((hi - lo).abs() < 1e-6);
    }

    #[test]
    fn rdp_is_increasing_in_order() {
        let acc = RdpAccountant::default();
        let r = acc.rdp(&[mech(1.0, 0.01, 1)]).unwrap();
        for w in r.windows(2) {
            assert!(w[1] >= w[0] * (1.0 - 1e-12), "{w:?}");
        }
    }

    #[test]
    fn delta_and_epsilon_are_consistent() {
        let acc = RdpAccountant::default();
        let m = [mech(1.1, 0.02, 500)];
        let eps = acc.epsilon(&m, 1e-5).unwrap();
        let delta = acc.delta(&m, eps).unwrap();
        assert!((delta / 1e-5 - 1.0).abs() < 1e-6, "{delta}");
    }
}
