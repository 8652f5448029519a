//! Property tests: monotonicity, PLD ≤ RDP, inverse round trips and the ledger's soundness.
use std::collections::BTreeMap;

use caduceus_privacy::accountant::{Estimate, PldAccountant, RdpAccountant, rdp};
use caduceus_privacy::inverse::{RELATIVE_TOLERANCE, noise_multiplier_for_epsilon};
use caduceus_privacy::ledger::{PrivacyBudget, PrivacyLedger, RoundKey};
use caduceus_privacy::{AccountantKind, SubsampledGaussian};
use proptest::prelude::*;

fn mech(sigma: f64, q: f64, steps: u64) -> SubsampledGaussian {
    SubsampledGaussian::new(sigma, q, steps).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// More steps or a larger sampling rate never lower ε (RDP: exact arithmetic on sums).
    #[test]
    fn rdp_is_monotone(sigma in 0.5f64..5.0, q in 1e-4f64..0.5, steps in 1u64..5000,
                       extra in 1u64..1000, factor in 1.0f64..2.0, delta_exp in 3i32..10) {
        let delta = 10f64.powi(-delta_exp);
        let acc = RdpAccountant::default();
        let base = acc.epsilon(&[mech(sigma, q, steps)], delta).unwrap();
        let more_steps = acc.epsilon(&[mech(sigma, q, steps + extra)], delta).unwrap();
        let q2 = (q * factor).min(1.0);
        let more_q = acc.epsilon(&[mech(sigma, q2, steps)], delta).unwrap();
        prop_assert!(more_steps >= base, "{more_steps} < {base}");
        prop_assert!(more_q >= base, "{more_q} < {base}");
    }

    /// Inverse round trip (RDP): ε(σ) ≤ target and σ is minimal to the stated tolerance.
    #[test]
    fn rdp_inverse_round_trips(target in 0.3f64..12.0, q in 1e-3f64..0.2, steps in 10u64..5000) {
        let r = noise_multiplier_for_epsilon(AccountantKind::Rdp, target, 1e-5, q, steps).unwrap();
        let acc = RdpAccountant::default();
        let at = acc.epsilon(&[mech(r.noise_multiplier, q, steps)], 1e-5).unwrap();
        prop_assert!(at <= target);
        prop_assert_eq!(at, r.epsilon);
        let below = r.noise_multiplier * (1.0 - 2.0 * RELATIVE_TOLERANCE);
        if below >= caduceus_privacy::inverse::MIN_NOISE_MULTIPLIER {
            let e = acc.epsilon(&[mech(below, q, steps)], 1e-5).unwrap();
            prop_assert!(e > target, "σ not minimal: ε({below}) = {e} ≤ {target}");
        }
    }
}

proptest! {
    // The PLD cases compose distributions of 10⁴–10⁵ bins: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// More steps or a larger q never lower the PLD ε (up to 1e-6 for the different truncation
    /// paths of T and T + ΔT steps).
    #[test]
    fn pld_is_monotone(sigma in 0.7f64..3.0, q in 1e-3f64..0.2, steps in 1u64..300,
                       extra in 1u64..300) {
        let acc = PldAccountant::default();
        let base = acc.epsilon(&[mech(sigma, q, steps)], 1e-5).unwrap();
        let more_steps = acc.epsilon(&[mech(sigma, q, steps + extra)], 1e-5).unwrap();
        let more_q = acc.epsilon(&[mech(sigma, (q * 1.25).min(1.0), steps)], 1e-5).unwrap();
        prop_assert!(more_steps >= base - 1e-6, "{more_steps} < {base}");
        prop_assert!(more_q >= base - 1e-6, "{more_q} < {base}");
    }

    /// On typical DP-SGD schedules (RDP ε between 0.5 and 20) the PLD ε is below the RDP ε and
    /// above the optimistic lower bound.
    #[test]
    fn pld_is_below_rdp(sigma in 0.7f64..3.0, q in 1e-3f64..0.1, steps in 10u64..2000) {
        let m = [mech(sigma, q, steps)];
        let r = RdpAccountant::default().epsilon(&m, 1e-5).unwrap();
        prop_assume!((0.5..20.0).contains(&r));
        let p = PldAccountant::default().epsilon(&m, 1e-5).unwrap();
        prop_assert!(p < r, "PLD {p} ≥ RDP {r}");
        let lower = PldAccountant::default().with_estimate(Estimate::Optimistic).epsilon(&m, 1e-5).unwrap();
        prop_assert!(lower <= p, "lower bound {lower} > {p}");
    }

    /// Inverse round trip (PLD). Each case runs ~8 PLD compositions.
    #[test]
    fn pld_inverse_round_trips(target in 0.5f64..10.0, q in 2e-3f64..0.1, steps in 10u64..300) {
        let r = noise_multiplier_for_epsilon(AccountantKind::Pld, target, 1e-5, q, steps).unwrap();
        let acc = PldAccountant::default();
        let at = acc.epsilon(&[mech(r.noise_multiplier, q, steps)], 1e-5).unwrap();
        prop_assert!(at <= target);
        let below = r.noise_multiplier * (1.0 - 2.0 * RELATIVE_TOLERANCE);
        let e = acc.epsilon(&[mech(below, q, steps)], 1e-5).unwrap();
        prop_assert!(e > target, "σ not minimal: ε({below}) = {e} ≤ {target}");
    }
}

/// One ledger operation in a random schedule.
#[derive(Debug, Clone)]
enum Op {
    Record(usize, u64, usize, u64),
    Reserve(usize, u64, usize, u64),
    Commit(usize, u64),
}

const MECHS: [(f64, f64); 3] = [(1.0, 0.01), (1.3, 0.02), (0.9, 0.005)];

fn op() -> impl Strategy<Value = Op> {
    let key = (0usize..3, 0u64..12);
    prop_oneof![
        (key.clone(), 0usize..3, 1u64..60).prop_map(|((s, r), m, t)| Op::Record(s, r, m, t)),
        (key.clone(), 0usize..3, 1u64..60).prop_map(|((s, r), m, t)| Op::Reserve(s, r, m, t)),
        key.prop_map(|(s, r)| Op::Commit(s, r)),
    ]
}

/// Applies the ops to a ledger and to an independent model of what must be counted: one entry per
/// key (first reservation or record wins, a record on a reserved key replaces it by what ran).
fn run(ops: &[Op]) -> (PrivacyLedger, Vec<SubsampledGaussian>) {
    let budget = PrivacyBudget::new(1e9, 1e-5, AccountantKind::Rdp).unwrap();
    let mut ledger = PrivacyLedger::new();
    // key → (committed?, mechanism)
    let mut model: BTreeMap<(usize, u64), (bool, SubsampledGaussian)> = BTreeMap::new();
    let key = |s: usize, r: u64| RoundKey::new(format!("study-{s}"), r);
    for op in ops {
        match *op {
            Op::Record(s, r, m, t) => {
                let mm = mech(MECHS[m].0, MECHS[m].1, t);
                ledger.record(key(s, r), &[mm]).unwrap();
                match model.get(&(s, r)) {
                    Some((true, _)) => {}
                    _ => {
                        model.insert((s, r), (true, mm));
                    }
                }
            }
            Op::Reserve(s, r, m, t) => {
                let mm = mech(MECHS[m].0, MECHS[m].1, t);
                let res = ledger.reserve(key(s, r), &[mm], &budget);
                match model.get(&(s, r)) {
                    None => {
                        res.unwrap();
                        model.insert((s, r), (false, mm));
                    }
                    Some((false, old)) if *old != mm => assert!(res.is_err()),
                    _ => {
                        res.unwrap();
                    }
                }
            }
            Op::Commit(s, r) => {
                let res = ledger.commit(&key(s, r), None);
                match model.get_mut(&(s, r)) {
                    None => assert!(res.is_err()),
                    Some(entry) => {
                        res.unwrap();
                        entry.0 = true;
                    }
                }
            }
        }
    }
    (ledger, model.values().map(|(_, m)| *m).collect())
}

/// RDP of a composition summed entry by entry, without any grouping: the ground truth.
fn rdp_truth(mechanisms: &[SubsampledGaussian], delta: f64) -> f64 {
    let orders = rdp::default_orders();
    let mut total = vec![0.0; orders.len()];
    for m in mechanisms {
        for (t, &a) in total.iter_mut().zip(&orders) {
            *t += m.steps as f64 * rdp::rdp_one_step(m.sample_rate, m.noise_multiplier, a);
        }
    }
    rdp::rdp_to_epsilon(&orders, &total, delta, rdp::Conversion::Tight).epsilon
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the order of records, retries and reservations, the ledger's ε is never below the
    /// composition of the mechanisms it must count (RDP; equal up to float summation order).
    #[test]
    fn ledger_never_undercounts_rdp(ops in prop::collection::vec(op(), 1..40)) {
        let (ledger, truth) = run(&ops);
        let got = ledger.epsilon(1e-5, AccountantKind::Rdp).unwrap();
        let want = if truth.is_empty() { 0.0 } else { rdp_truth(&truth, 1e-5) };
        prop_assert!(got >= want * (1.0 - 1e-12), "ledger {got} < truth {want}");
        prop_assert!(got <= want * (1.0 + 1e-9) + 1e-12, "ledger {got} ≫ truth {want}");
        // The ledger survives a JSON round trip unchanged.
        let back: PrivacyLedger = serde_json::from_str(&serde_json::to_string(&ledger).unwrap()).unwrap();
        prop_assert_eq!(back, ledger);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Same under PLD: the ledger's (pessimistic) ε is at least a lower bound on the true ε of
    /// the mechanisms it must count.
    #[test]
    fn ledger_never_undercounts_pld(ops in prop::collection::vec(op(), 1..12)) {
        let (ledger, truth) = run(&ops);
        let got = ledger.epsilon(1e-5, AccountantKind::Pld).unwrap();
        let lower = if truth.is_empty() {
            0.0
        } else {
            PldAccountant::default().with_estimate(Estimate::Optimistic).epsilon(&truth, 1e-5).unwrap()
        };
        prop_assert!(got >= lower, "ledger {got} < lower bound {lower}");
    }
}
