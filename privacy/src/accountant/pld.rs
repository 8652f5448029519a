//! Privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! **Neighbouring relation: add/remove one record.** For one step with noise multiplier σ and
//! sampling rate q, the pair of output distributions that dominates every pair of neighbours is
//! (Zhu, Dong and Wang, "Optimal accounting of differential privacy via characteristic function",
//! AISTATS 2022; Koskela, Jälkö and Honkela, AISTATS 2020):
//! - *remove* (x ∈ D, D' = D∖{x}): P = (1−q)·N(0,σ²) + q·N(1,σ²), Q = N(0,σ²);
//! - *add*: P = N(0,σ²), Q = (1−q)·N(0,σ²) + q·N(1,σ²).
//!
//! Each direction is composed on its own and δ(ε) is the larger of the two, as Google's
//! `dp_accounting.pld` does. The PLD of a pair is the law of L = ln(P(X)/Q(X)) for X ∼ P, and
//! δ(ε) = E[(1 − e^{ε−L})₊] (plus the mass at L = +∞).
//!
//! **Pessimistic discretisation ("connect the dots").** Losses are put on a grid of step h. The
//! mass of each grid interval is split between its two end points so that, under Q, both the mass
//! and the mean of e^L are preserved (Doroshenko, Ghazi, Kamath, Kumar and Manurangsi, "Connect the
//! Dots: Tighter Discrete Approximations of Privacy Loss Distributions", PETS 2022). As a function
//! of t = e^ε the hockey-stick divergence is convex, and this split replaces it by its chord
//! interpolation between grid points: equal at grid points, above it in between. The lowest grid
//! point collects all mass below it (losses rounded up), mass beyond the highest grid point that the
//! split cannot place goes to L = +∞. The discrete pair therefore dominates the true pair, and so do
//! compositions of dominating pairs; every truncation during composition moves mass up (to the
//! lowest kept bin or to +∞). The reported ε is an upper bound on the true ε, up to floating-point
//! round-off (see `docs/privacy.md`). An *optimistic* variant (round losses down, drop tails) gives a
//! lower bound and is used in tests to show the bound is tight.
//!
//! Composition is by linear convolution (real FFT) and binary exponentiation: T steps cost
//! ~log₂T convolutions.
use crate::accountant::convolve::convolve;
use crate::error::{PrivacyError, check, check_delta};
use crate::math::{log_add, norm_prob, norm_sf};
use crate::mechanism::{SubsampledGaussian, group_identical, validate_all};

/// Relative size of FFT round-off: a double-precision FFT convolution has absolute error of order
/// 1e-18 to 1e-16 of its largest output (measured against direct sums), so end bins below this
/// fraction of the largest bin are numerical noise.
const NOISE_FLOOR: f64 = 1e-16;

/// Discretisation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PldConfig {
    /// Grid step h of the privacy loss (dp_accounting's `value_discretization_interval`).
    pub discretization: f64,
    /// Probability mass that may be moved to the tails (pessimistically) at each truncation.
    pub tail_mass: f64,
    /// Largest number of bins kept; beyond it the grid is coarsened (h doubled, rounding up).
    pub max_bins: usize,
}

impl Default for PldConfig {
    fn default() -> Self {
        Self {
            discretization: 1e-4,
            tail_mass: 1e-15,
            max_bins: 1 << 21,
        }
    }
}

/// Which way the discretisation rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Estimate {
    /// Upper bound on ε (the default and the only one the ledger uses).
    Pessimistic,
    /// Lower bound on ε, for validation.
    Optimistic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Remove,
    Add,
}

/// A discrete PLD of one direction: P-mass `probs[i]` at loss `(offset + i)·h`, plus mass at +∞.
#[derive(Debug, Clone)]
struct Pmf {
    /// log₂ of the coarsening factor: h = base_h · 2^level.
    level: u32,
    h: f64,
    offset: i64,
    probs: Vec<f64>,
    inf_mass: f64,
}

/// The PLD accountant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PldAccountant {
    config: PldConfig,
    estimate: Estimate,
}

impl Default for PldAccountant {
    fn default() -> Self {
        Self {
            config: PldConfig::default(),
            estimate: Estimate::Pessimistic,
        }
    }
}

/// A composed PLD (both directions), from which ε(δ) and δ(ε) are read.
#[derive(Debug, Clone)]
pub struct PrivacyLoss {
    remove: Pmf,
    add: Pmf,
    estimate: Estimate,
}

impl PldAccountant {
    /// A pessimistic accountant with custom discretisation.
    pub fn new(config: PldConfig) -> Result<Self, PrivacyError> {
        check(
            "discretization",
            config.discretization,
            "in (0, 1]",
            config.discretization > 0.0 && config.discretization <= 1.0,
        )?;
        check(
            "tail_mass",
            config.tail_mass,
            "in [0, 1e-6]",
            (0.0..=1e-6).contains(&config.tail_mass),
        )?;
        check(
            "max_bins",
            config.max_bins as f64,
            ">= 1024",
            config.max_bins >= 1024,
        )?;
        Ok(Self {
            config,
            estimate: Estimate::Pessimistic,
        })
    }

    /// Same settings, rounding the other way (`Optimistic` gives a lower bound).
    pub fn with_estimate(mut self, estimate: Estimate) -> Self {
        self.estimate = estimate;
        self
    }

    /// The discretisation settings.
    pub fn config(&self) -> PldConfig {
        self.config
    }

    /// Composes the mechanisms (identical ones are merged first).
    pub fn compose(&self, mechanisms: &[SubsampledGaussian]) -> Result<PrivacyLoss, PrivacyError> {
        validate_all(mechanisms)?;
        let groups = group_identical(mechanisms);
        let mut out: Option<(Pmf, Pmf)> = None;
        for m in &groups {
            let (r, a) = (
                self.self_composed(m, Direction::Remove),
                self.self_composed(m, Direction::Add),
            );
            out = Some(match out {
                None => (r, a),
                Some((r0, a0)) => (self.convolve(r0, r), self.convolve(a0, a)),
            });
        }
        let (remove, add) = out.unwrap_or_else(|| (Pmf::identity(self.config), Pmf::identity(self.config)));
        Ok(PrivacyLoss {
            remove,
            add,
            estimate: self.estimate,
        })
    }

    /// ε at `delta` for the composition.
    pub fn epsilon(&self, mechanisms: &[SubsampledGaussian], delta: f64) -> Result<f64, PrivacyError> {
        check_delta(delta)?;
        Ok(self.compose(mechanisms)?.epsilon(delta))
    }

    /// δ at `epsilon` for the composition.
    pub fn delta(&self, mechanisms: &[SubsampledGaussian], epsilon: f64) -> Result<f64, PrivacyError> {
        check("epsilon", epsilon, ">= 0", epsilon >= 0.0)?;
        Ok(self.compose(mechanisms)?.delta(epsilon))
    }

    fn self_composed(&self, m: &SubsampledGaussian, dir: Direction) -> Pmf {
        let base = self.single_step(m.noise_multiplier, m.sample_rate, dir);
        let mut t = m.steps;
        let mut base = base;
        let mut result: Option<Pmf> = None;
        loop {
            if t & 1 == 1 {
                result = Some(match result {
                    None => base.clone(),
                    Some(r) => self.convolve(r, base.clone()),
                });
            }
            t >>= 1;
            if t == 0 {
                break;
            }
            base = self.convolve(base.clone(), base);
        }
        result.expect("steps >= 1")
    }

    /// Composition of two PMFs on a common grid, then pessimistic (or optimistic) truncation.
    fn convolve(&self, mut a: Pmf, mut b: Pmf) -> Pmf {
        let level = a.level.max(b.level);
        a.coarsen_to(level, self.estimate);
        b.coarsen_to(level, self.estimate);
        let probs = if a.probs.len() == b.probs.len() && a.probs == b.probs {
            convolve(&a.probs, &a.probs)
        } else {
            convolve(&a.probs, &b.probs)
        };
        let mut out = Pmf {
            level,
            h: a.h,
            offset: a.offset + b.offset,
            probs,
            inf_mass: 1.0 - (1.0 - a.inf_mass) * (1.0 - b.inf_mass),
        };
        out.truncate(self.config.tail_mass, self.estimate);
        while out.probs.len() > self.config.max_bins {
            let l = out.level + 1;
            out.coarsen_to(l, self.estimate);
        }
        out
    }

    /// The discretised PLD of one step in one direction.
    fn single_step(&self, sigma: f64, q: f64, dir: Direction) -> Pmf {
        let h = self.config.discretization;
        let pess = self.estimate == Estimate::Pessimistic;
        let ln_1mq = (-q).ln_1p(); // −∞ when q = 1
        let ln_q = q.ln();
        let two_s2 = 2.0 * sigma * sigma;
        // Remove-direction loss as a function of the output x (increasing in x).
        let loss_remove = |x: f64| log_add(ln_1mq, ln_q + (2.0 * x - 1.0) / two_s2);
        // Its inverse, for ℓ > ln(1−q).
        let x_of_remove_loss = |l: f64| {
            if l <= ln_1mq {
                f64::NEG_INFINITY
            } else if l == f64::INFINITY {
                f64::INFINITY
            } else {
                // ln(e^ℓ − (1−q)) − ln q
                let v = l + (-(ln_1mq - l).exp()).ln_1p() - ln_q;
                sigma * sigma * v + 0.5
            }
        };
        // P- and Q-mass of the output interval (xa, xb].
        let base = |xa: f64, xb: f64| norm_prob(xa / sigma, xb / sigma);
        let mix = |xa: f64, xb: f64| {
            (1.0 - q) * norm_prob(xa / sigma, xb / sigma)
                + q * norm_prob((xa - 1.0) / sigma, (xb - 1.0) / sigma)
        };
        // Masses (P, Q) of the loss interval (la, lb].
        let masses = |la: f64, lb: f64| -> (f64, f64) {
            match dir {
                Direction::Remove => {
                    let (xa, xb) = (x_of_remove_loss(la), x_of_remove_loss(lb));
                    (mix(xa, xb), base(xa, xb))
                }
                Direction::Add => {
                    let (xa, xb) = (x_of_remove_loss(-lb), x_of_remove_loss(-la));
                    (base(xa, xb), mix(xa, xb))
                }
            }
        };
        // Loss range holding all but `tail` of P's mass on each side.
        let z = normal_quantile_upper(self.config.tail_mass.max(1e-300) / 2.0).max(1.0);
        let (l_min, l_max) = match dir {
            Direction::Remove => (loss_remove(-sigma * z), loss_remove(1.0 + sigma * z)),
            Direction::Add => (-loss_remove(sigma * z), -loss_remove(-sigma * z)),
        };
        let mut level = 0;
        let mut hh = h;
        while (l_max - l_min) / hh > (self.config.max_bins / 2) as f64 {
            level += 1;
            hh *= 2.0;
        }
        let k_lo = (l_min / hh).floor() as i64;
        let k_hi = ((l_max / hh).ceil() as i64).max(k_lo + 1);
        let n = (k_hi - k_lo + 1) as usize;
        let mut probs = vec![0.0; n];
        let mut inf_mass = 0.0;
        let loss_at = |k: i64| k as f64 * hh;
        // Lower tail: losses ≤ ℓ_{k_lo}. Pessimistic: rounded up to ℓ_{k_lo}; optimistic: dropped.
        let (p_low, _) = masses(f64::NEG_INFINITY, loss_at(k_lo));
        if pess {
            probs[0] += p_low;
        }
        // Interior intervals (ℓ_{k−1}, ℓ_k].
        let shrink = -(-hh).exp_m1(); // 1 − e^{−h}
        for k in (k_lo + 1)..=k_hi {
            let (la, lb) = (loss_at(k - 1), loss_at(k));
            let (p, qm) = masses(la, lb);
            if p == 0.0 {
                continue;
            }
            let i = (k - k_lo) as usize;
            if pess {
                // P-mass sent to the right end so that Q-mass and E_Q[e^L] are preserved:
                // (P − e^{ℓa}·Q)/(1 − e^{−h}).
                let eq = if qm > 0.0 { (qm.ln() + la).exp() } else { 0.0 };
                let right = if eq.is_finite() {
                    ((p - eq) / shrink).clamp(0.0, p)
                } else {
                    p
                };
                probs[i] += right;
                probs[i - 1] += p - right;
            } else {
                probs[i - 1] += p;
            }
        }
        // Upper tail: losses > ℓ_{k_hi}.
        let l_top = loss_at(k_hi);
        let (p_up, q_up) = masses(l_top, f64::INFINITY);
        if pess {
            let eq = if q_up > 0.0 {
                (q_up.ln() + l_top).exp()
            } else {
                0.0
            };
            let at_top = eq.min(p_up);
            probs[n - 1] += at_top;
            inf_mass += p_up - at_top;
        } else {
            probs[n - 1] += p_up;
        }
        let mut pmf = Pmf {
            level,
            h: hh,
            offset: k_lo,
            probs,
            inf_mass,
        };
        pmf.trim_zeros();
        pmf
    }
}

impl PrivacyLoss {
    /// Smallest ε with δ(ε) ≤ `delta` (∞ if the mass at infinite loss exceeds δ).
    pub fn epsilon(&self, delta: f64) -> f64 {
        self.remove.epsilon(delta).max(self.add.epsilon(delta))
    }

    /// δ(ε) = max over the two directions of the hockey-stick divergence.
    pub fn delta(&self, epsilon: f64) -> f64 {
        self.remove.delta(epsilon).max(self.add.delta(epsilon))
    }

    /// Whether this is an upper (pessimistic) or lower (optimistic) bound.
    pub fn estimate(&self) -> Estimate {
        self.estimate
    }

    /// Probability mass placed at infinite loss (remove, add): a floor under δ, made of the
    /// discretisation's and the truncations' pessimistic moves.
    pub fn infinity_mass(&self) -> (f64, f64) {
        (self.remove.inf_mass, self.add.inf_mass)
    }

    /// Number of bins held (both directions), a measure of the work done.
    pub fn bins(&self) -> usize {
        self.remove.probs.len() + self.add.probs.len()
    }
}

impl Pmf {
    fn identity(config: PldConfig) -> Self {
        Self {
            level: 0,
            h: config.discretization,
            offset: 0,
            probs: vec![1.0],
            inf_mass: 0.0,
        }
    }

    fn loss(&self, i: usize) -> f64 {
        (self.offset + i as i64) as f64 * self.h
    }

    fn trim_zeros(&mut self) {
        let first = self.probs.iter().position(|&p| p > 0.0);
        match first {
            None => {
                self.probs = vec![0.0];
            }
            Some(f) => {
                let last = self.probs.iter().rposition(|&p| p > 0.0).unwrap_or(f);
                self.probs.truncate(last + 1);
                self.probs.drain(..f);
                self.offset += f as i64;
            }
        }
    }

    /// Moves up to `tail` mass from each end: pessimistically the top goes to +∞ and the bottom is
    /// added to the lowest kept bin; optimistically the top is added to the highest kept bin and
    /// the bottom dropped.
    ///
    /// Bins at either end below the FFT noise floor (`NOISE_FLOOR` × the largest bin) carry no
    /// information; they are moved the same way, whatever their total.
    fn truncate(&mut self, tail: f64, estimate: Estimate) {
        self.trim_zeros();
        let n = self.probs.len();
        let floor = NOISE_FLOOR * self.probs.iter().copied().fold(0.0, f64::max);
        let mut hi = n;
        let mut top = 0.0;
        while hi > 1 && self.probs[hi - 1] <= floor {
            top += self.probs[hi - 1];
            hi -= 1;
        }
        let mut budget = 0.0;
        while hi > 1 && budget + self.probs[hi - 1] <= tail {
            budget += self.probs[hi - 1];
            hi -= 1;
        }
        top += budget;
        let mut lo = 0;
        let mut bottom = 0.0;
        while lo + 1 < hi && self.probs[lo] <= floor {
            bottom += self.probs[lo];
            lo += 1;
        }
        let mut budget = 0.0;
        while lo + 1 < hi && budget + self.probs[lo] <= tail {
            budget += self.probs[lo];
            lo += 1;
        }
        bottom += budget;
        self.probs.truncate(hi);
        self.probs.drain(..lo);
        self.offset += lo as i64;
        match estimate {
            Estimate::Pessimistic => {
                self.inf_mass += top;
                self.probs[0] += bottom;
            }
            Estimate::Optimistic => {
                let last = self.probs.len() - 1;
                self.probs[last] += top;
            }
        }
    }

    /// Re-bins onto the grid h·2^(level − self.level), rounding losses up (pessimistic) or down.
    fn coarsen_to(&mut self, level: u32, estimate: Estimate) {
        while self.level < level {
            let mut out: Vec<f64> = Vec::with_capacity(self.probs.len() / 2 + 2);
            let new_index = |k: i64| match estimate {
                Estimate::Pessimistic => k.div_euclid(2) + k.rem_euclid(2),
                Estimate::Optimistic => k.div_euclid(2),
            };
            let new_offset = new_index(self.offset);
            for (i, &p) in self.probs.iter().enumerate() {
                let j = (new_index(self.offset + i as i64) - new_offset) as usize;
                if j >= out.len() {
                    out.resize(j + 1, 0.0);
                }
                out[j] += p;
            }
            self.probs = out;
            self.offset = new_offset;
            self.level += 1;
            self.h *= 2.0;
        }
    }

    /// δ(ε) = mass(+∞) + Σ_{ℓᵢ > ε} pᵢ (1 − e^{ε − ℓᵢ}).
    fn delta(&self, epsilon: f64) -> f64 {
        let mut d = self.inf_mass;
        for (i, &p) in self.probs.iter().enumerate() {
            let l = self.loss(i);
            if l > epsilon {
                d += p * -(epsilon - l).exp_m1();
            }
        }
        d.min(1.0)
    }

    /// Smallest ε ≥ 0 with δ(ε) ≤ `delta`, exact for this discrete distribution.
    fn epsilon(&self, delta: f64) -> f64 {
        if self.inf_mass > delta {
            return f64::INFINITY;
        }
        let decay = (-self.h).exp();
        // At ε = ℓ_k: a = mass(+∞) + Σ_{i>k} pᵢ and s = Σ_{i>k} pᵢ e^{ℓ_k − ℓᵢ}, so δ(ℓ_k) = a − s.
        let mut a = self.inf_mass;
        let mut s = 0.0;
        for k in (0..self.probs.len()).rev() {
            if a - s > delta {
                // δ(ε) = a − e^{ε − ℓ_k}·s on [ℓ_k, ℓ_{k+1}).
                return (self.loss(k) + ((a - delta) / s).ln()).max(0.0);
            }
            a += self.probs[k];
            s = (s + self.probs[k]) * decay;
        }
        // Below the lowest atom: δ(ε) = a − e^{ε − ℓ_{−1}}·s.
        if a - s > delta && s > 0.0 {
            let l_below = self.loss(0) - self.h;
            (l_below + ((a - delta) / s).ln()).max(0.0)
        } else {
            0.0
        }
    }
}

/// z with Φᶜ(z) = p, by bisection (p in (0, 0.5]).
fn normal_quantile_upper(p: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if norm_sf(mid) > p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mech(sigma: f64, q: f64, steps: u64) -> SubsampledGaussian {
        SubsampledGaussian::new(sigma, q, steps).unwrap()
    }

    /// Exact δ(ε) of the Gaussian mechanism with sensitivity 1 and std σ (Balle and Wang 2018,
    /// Thm 8): Φ(−εσ + 1/(2σ)) − e^ε Φ(−εσ − 1/(2σ)).
    fn gaussian_delta(sigma: f64, eps: f64) -> f64 {
        norm_sf(eps * sigma - 0.5 / sigma) - eps.exp() * norm_sf(eps * sigma + 0.5 / sigma)
    }

    #[test]
    fn single_step_masses_sum_to_one() {
        let acc = PldAccountant::default();
        for &(s, q) in &[(1.0, 0.01), (0.5, 0.2), (2.0, 1.0), (0.8, 1e-4)] {
            for dir in [Direction::Remove, Direction::Add] {
                let p = acc.single_step(s, q, dir);
                let total: f64 = p.probs.iter().sum::<f64>() + p.inf_mass;
                assert!((total - 1.0).abs() < 1e-12, "σ={s} q={q} {dir:?}: {total}");
            }
        }
    }

    #[test]
    fn discretised_gaussian_dominates_and_is_tight() {
        // q = 1: the composition of T Gaussians with σ is one Gaussian with σ/√T, known exactly.
        let acc = PldAccountant::default();
        for &(sigma, t) in &[(1.0, 1u64), (2.0, 10), (5.0, 100)] {
            let pl = acc.compose(&[mech(sigma, 1.0, t)]).unwrap();
            let eff = sigma / (t as f64).sqrt();
            for eps in [0.0, 0.3, 1.0, 2.5] {
                let exact = gaussian_delta(eff, eps);
                let got = pl.delta(eps);
                assert!(
                    got >= exact * (1.0 - 1e-9) - 1e-15,
                    "σ={sigma} T={t} ε={eps}: {got} < {exact}"
                );
                assert!(
                    got <= exact * 1.01 + 1e-12,
                    "σ={sigma} T={t} ε={eps}: {got} ≫ {exact}"
                );
            }
        }
    }

    #[test]
    fn epsilon_inverts_delta() {
        let pl = PldAccountant::default().compose(&[mech(1.0, 0.01, 300)]).unwrap();
        let eps = pl.epsilon(1e-5);
        assert!((pl.delta(eps) / 1e-5 - 1.0).abs() < 1e-9, "{}", pl.delta(eps));
        assert!(pl.delta(eps * 0.99) > 1e-5);
    }

    #[test]
    fn coarsening_is_pessimistic() {
        let acc = PldAccountant::default();
        let mut p = acc.single_step(1.0, 0.05, Direction::Remove);
        let before = p.epsilon(1e-3);
        p.coarsen_to(3, Estimate::Pessimistic);
        let after = p.epsilon(1e-3);
        assert!(after >= before, "{after} < {before}");
        assert!(after - before <= 8.0 * 1e-4 + 1e-12);
    }
}
