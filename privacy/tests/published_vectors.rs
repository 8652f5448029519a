//! Published test vectors, each with its source and tolerance.
use caduceus_privacy::accountant::{Conversion, Estimate, PldAccountant, PldConfig, RdpAccountant};
use caduceus_privacy::inverse::noise_multiplier_for_epsilon;
use caduceus_privacy::{AccountantKind, SubsampledGaussian};

fn mech(sigma: f64, q: f64, steps: u64) -> SubsampledGaussian {
    SubsampledGaussian::new(sigma, q, steps).unwrap()
}

/// TF Privacy's orders in `compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy`.
fn tf_privacy_orders() -> Vec<f64> {
    [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5]
        .into_iter()
        .chain((5..64).map(f64::from))
        .chain([128.0, 256.0, 512.0])
        .collect()
}

/// Lower bound used as a sanity check in TF Privacy's `compute_dp_sgd_privacy_test.py`: treat the
/// schedule as one Gaussian mechanism with μ = q·√T/σ (the CLT limit of Bu, Dong, Long and Su,
/// whose error is one-sided) and return its exact δ at ε (Balle and Wang 2018, Thm 8).
fn clt_lower_bound_delta(sigma: f64, q: f64, steps: u64, eps: f64) -> f64 {
    let s = sigma * (steps as f64).sqrt() / q;
    let erfc = libm::erfc;
    0.5 * erfc((eps * s - 0.5 / s) / std::f64::consts::SQRT_2)
        - eps.exp() * 0.5 * erfc((eps * s + 0.5 / s) / std::f64::consts::SQRT_2)
}

/// Opacus `opacus/tests/accountants_test.py::test_rdp_accountant`: σ = 1.5, q = 0.04,
/// steps = int(90 / 0.04) = 2250, δ = 1e-5 → ε = 7.32911117143 (assertAlmostEqual: 7 places).
#[test]
fn opacus_rdp_accountant() {
    let eps = RdpAccountant::default()
        .epsilon(&[mech(1.5, 0.04, 2250)], 1e-5)
        .unwrap();
    assert!((eps - 7.329_111_171_43).abs() < 1e-7, "{eps}");
}

/// Opacus `accountants_test.py::test_prv_accountant`: σ = 1.5, q = 0.04,
/// steps = int(90 // 0.04) = 2249, δ = 1e-5 → 6.777395712150674. Opacus' PRV accountant returns
/// the *upper* end of an estimate with `eps_error = 0.01` (opacus/accountants/prv.py), so the true
/// ε lies in [6.7774 − 0.02, 6.7774]: our pessimistic PLD must land there, below RDP's 7.33.
#[test]
fn opacus_prv_accountant() {
    let eps = PldAccountant::default()
        .epsilon(&[mech(1.5, 0.04, 2249)], 1e-5)
        .unwrap();
    assert!(eps <= 6.777_395_712_150_674, "{eps}");
    assert!(eps >= 6.777_395_712_150_674 - 0.02, "{eps}");
}

/// Opacus `accountants_test.py::test_get_noise_multiplier_{rdp,prv}_{epochs,steps}`: ε = 8,
/// δ = 1e-5, q = 0.04, for 90 epochs (2250 steps) and for 2000 steps:
/// RDP σ = 1.416 and 1.3562, PRV σ = 1.34765625 and 1.2915 (assertAlmostEqual: 4 places).
/// Opacus' bisection stops once target − ε(σ) ≤ 0.01 and returns that σ, so its σ is at or above
/// the exact root with ε(σ) ∈ [7.99, 8]; ours stops at a 1e-4 relative bracket, so it is at most
/// Opacus' σ and within 1% of it.
#[test]
fn opacus_get_noise_multiplier() {
    for (steps, opacus_rdp, opacus_prv) in [(2250u64, 1.416, 1.347_656_25), (2000, 1.3562, 1.2915)] {
        let rdp = RdpAccountant::default();
        let at_opacus = rdp.epsilon(&[mech(opacus_rdp, 0.04, steps)], 1e-5).unwrap();
        assert!((7.99..=8.0).contains(&at_opacus), "{at_opacus}");
        let ours = noise_multiplier_for_epsilon(AccountantKind::Rdp, 8.0, 1e-5, 0.04, steps).unwrap();
        assert!(ours.epsilon <= 8.0);
        assert!(ours.noise_multiplier <= opacus_rdp + 5e-5, "{ours:?}");
        assert!(ours.noise_multiplier >= opacus_rdp * 0.99, "{ours:?}");

        // PRV and PLD are both tight accountants: the PRV σ meets ε = 8 under our PLD, barely.
        let pld = PldAccountant::default();
        let at_prv = pld.epsilon(&[mech(opacus_prv, 0.04, steps)], 1e-5).unwrap();
        assert!((7.95..=8.0).contains(&at_prv), "{at_prv}");
        let ours = noise_multiplier_for_epsilon(AccountantKind::Pld, 8.0, 1e-5, 0.04, steps).unwrap();
        assert!(ours.epsilon <= 8.0);
        assert!(ours.noise_multiplier <= opacus_prv + 5e-5, "{ours:?}");
        assert!(ours.noise_multiplier >= opacus_prv * 0.99, "{ours:?}");
    }
}

/// TF Privacy `tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py`, Test0 and
/// Test1 (assertAlmostEqual: 7 places, and the optimal order):
/// - n = 60000, batch 150 (q = 0.0025), σ = 1.3, 15 epochs (6000 steps), δ = 1e-5
///   → ε = 0.7242234026109595 at order 19;
/// - n = 100000, batch 100 (q = 0.001), σ = 1.0, 30 epochs (30000 steps), δ = 1e-7
///   → ε = 1.4154988495444842 at order 13.
#[test]
fn tf_privacy_compute_dp_sgd_privacy() {
    let acc = RdpAccountant::new(tf_privacy_orders(), Conversion::Tight).unwrap();
    for (sigma, q, steps, delta, expected, order) in [
        (1.3, 150.0 / 60000.0, 6000, 1e-5, 0.724_223_402_610_959_5, 19.0),
        (1.0, 100.0 / 100000.0, 30000, 1e-7, 1.415_498_849_544_484_2, 13.0),
    ] {
        let r = acc.epsilon_and_order(&[mech(sigma, q, steps)], delta).unwrap();
        assert!((r.epsilon - expected).abs() < 1e-7, "{r:?} vs {expected}");
        assert_eq!(r.order, order);
        // Opacus' default orders contain the same optimum.
        let d = RdpAccountant::default()
            .epsilon(&[mech(sigma, q, steps)], delta)
            .unwrap();
        assert!((d - expected).abs() < 1e-7, "{d}");
        // The test's own sanity check: the CLT-based lower bound at our ε stays below δ, for the
        // RDP and for the (smaller) PLD ε.
        assert!(clt_lower_bound_delta(sigma, q, steps, r.epsilon) <= delta);
        let pld = PldAccountant::default()
            .epsilon(&[mech(sigma, q, steps)], delta)
            .unwrap();
        assert!(pld < r.epsilon, "PLD {pld} not below RDP {}", r.epsilon);
        assert!(
            clt_lower_bound_delta(sigma, q, steps, pld) <= delta,
            "PLD {pld} below the CLT bound"
        );
    }
}

/// Abadi et al. 2016, "Deep Learning with Differential Privacy" (arXiv:1607.00133), §3.1: σ = 4,
/// q = 0.01, T = 10000, δ = 1e-5 gives ε ≈ 1.26 with the moments accountant (integer moments
/// λ ≤ 32, i.e. orders 2..=33, and the classic tail bound). Stated to 2 decimals: tolerance 0.005.
#[test]
fn abadi_moments_accountant() {
    let orders: Vec<f64> = (2..=33).map(f64::from).collect();
    let acc = RdpAccountant::new(orders, Conversion::Classic).unwrap();
    let eps = acc.epsilon(&[mech(4.0, 0.01, 10_000)], 1e-5).unwrap();
    assert!((eps - 1.26).abs() < 0.005, "{eps}");
    // The tighter conversion and the PLD accountant improve on it.
    let tight = RdpAccountant::default()
        .epsilon(&[mech(4.0, 0.01, 10_000)], 1e-5)
        .unwrap();
    let pld = PldAccountant::default()
        .epsilon(&[mech(4.0, 0.01, 10_000)], 1e-5)
        .unwrap();
    assert!(pld < tight && tight < eps, "{pld} {tight} {eps}");
}

/// Google dp_accounting `pld/pld_privacy_accountant_test.py::test_poisson_subsampled_gaussian`
/// (and `test_self_composed_subsampled_gaussian`): q = 0.2, σ = 0.5, 3 steps →
/// δ(ε = 1) = 0.15594 and ε(δ = 0.15594) = 1, both to within 1e-3.
#[test]
fn dp_accounting_subsampled_gaussian() {
    let pl = PldAccountant::default().compose(&[mech(0.5, 0.2, 3)]).unwrap();
    assert!((pl.delta(1.0) - 0.15594).abs() < 1e-3, "{}", pl.delta(1.0));
    assert!(
        (pl.epsilon(0.15594) - 1.0).abs() < 1e-3,
        "{}",
        pl.epsilon(0.15594)
    );
    // Split into 1 + 2 steps, as the test composes it: same answer.
    let split = PldAccountant::default()
        .compose(&[mech(0.5, 0.2, 1), mech(0.5, 0.2, 2)])
        .unwrap();
    assert!((split.delta(1.0) - pl.delta(1.0)).abs() < 1e-9);
}

/// The PLD upper bound is close to an independent lower bound (optimistic rounding, which can
/// only under-estimate) on short schedules, where rounding down costs at most T·h in ε.
#[test]
fn pld_is_sandwiched_by_a_lower_bound() {
    let cfg = PldConfig::default();
    for (sigma, q, steps) in [(1.0, 0.01, 100u64), (0.8, 0.05, 50), (2.0, 0.1, 20)] {
        let m = [mech(sigma, q, steps)];
        let upper = PldAccountant::new(cfg).unwrap().epsilon(&m, 1e-5).unwrap();
        let lower = PldAccountant::new(cfg)
            .unwrap()
            .with_estimate(Estimate::Optimistic)
            .epsilon(&m, 1e-5)
            .unwrap();
        assert!(lower <= upper, "{lower} > {upper}");
        assert!(
            upper - lower <= steps as f64 * cfg.discretization + 1e-6,
            "σ={sigma} q={q} T={steps}: gap {}",
            upper - lower
        );
    }
}
