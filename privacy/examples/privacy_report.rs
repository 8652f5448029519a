//! Figures for docs/privacy.md: ε under PLD vs RDP for the demo schedule, rounds that fit in a
//! budget, and PLD timings.
//!
//! `cargo run --release -p caduceus-privacy --example privacy_report`
use std::time::Instant;

use caduceus_privacy::{AccountantKind, SubsampledGaussian};

const SIGMA: f64 = 1.0;
const Q: f64 = 0.01;
const STEPS_PER_ROUND: u64 = 100;
const DELTA: f64 = 1e-5;

fn eps(kind: AccountantKind, rounds: u64) -> f64 {
    let m = SubsampledGaussian::new(SIGMA, Q, STEPS_PER_ROUND * rounds).expect("valid");
    kind.epsilon(&[m], DELTA).expect("accountable")
}

/// Largest number of rounds with ε ≤ budget (ε is increasing in rounds).
fn max_rounds(kind: AccountantKind, budget: f64) -> u64 {
    let (mut lo, mut hi) = (0u64, 1u64);
    while eps(kind, hi) <= budget {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if eps(kind, mid) <= budget {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

fn main() {
    println!("schedule: sigma = {SIGMA}, q = {Q}, {STEPS_PER_ROUND} steps/round, delta = {DELTA:e}");
    println!("| rounds | steps | RDP epsilon | PLD epsilon | PLD / RDP |");
    println!("|---:|---:|---:|---:|---:|");
    for rounds in [1u64, 5, 10, 20, 50, 100, 200, 500] {
        let (r, p) = (eps(AccountantKind::Rdp, rounds), eps(AccountantKind::Pld, rounds));
        println!(
            "| {rounds} | {} | {r:.4} | {p:.4} | {:.3} |",
            rounds * STEPS_PER_ROUND,
            p / r
        );
    }
    for budget in [8.0, 3.0, 1.0] {
        let r = max_rounds(AccountantKind::Rdp, budget);
        let p = max_rounds(AccountantKind::Pld, budget);
        let gain = if r > 0 {
            format!(", {:+.1}%", 100.0 * (p as f64 / r as f64 - 1.0))
        } else {
            String::new()
        };
        println!(
            "budget epsilon = {budget}: RDP allows {r} rounds, PLD allows {p} rounds (+{} rounds{gain})",
            p - r
        );
    }
    println!("PLD timing (one composition, this machine):");
    for steps in [1_000u64, 10_000, 100_000] {
        let m = SubsampledGaussian::new(SIGMA, Q, steps).expect("valid");
        let t = Instant::now();
        let e = AccountantKind::Pld.epsilon(&[m], DELTA).expect("accountable");
        println!(
            "  T = {steps}: epsilon {e:.4} in {:.3} s",
            t.elapsed().as_secs_f64()
        );
    }
}
