//! FedAvg over K updates of D float32 parameters against a plain copy of the same bytes, in one run.
//!
//! `cargo run --release -p caduceus-aggregation --example fedavg_bench [-- --updates 10 --params 11000000 --reps 7]`
//!
//! Both sides read the same K·D·4 input bytes: FedAvg computes `x + Σ w_i Δ_i` into the global model with
//! the production kernel ([`aggregate`]); the baseline copies each update into a D-element buffer with
//! `copy_from_slice` (memcpy). Throughput is input bytes per second; the best of `reps` interleaved runs
//! is reported for each, and the ratio FedAvg / copy (goal ≥ 0.5).
use std::hint::black_box;
use std::time::Instant;

use caduceus_aggregation::{ClientUpdate, GlobalState, Strategy, aggregate};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} takes a number, got {v}"))
        })
        .unwrap_or(default)
}

fn main() {
    let k = arg("--updates", 10);
    let d = arg("--params", 11_000_000);
    let reps = arg("--reps", 7).max(1);
    let json = std::env::args().any(|a| a == "--json");

    let updates: Vec<Vec<f32>> = (0..k)
        .map(|i| {
            (0..d)
                .map(|j| ((j.wrapping_mul(2654435761) ^ i) % 1000) as f32 * 1e-6 - 5e-4)
                .collect()
        })
        .collect();
    let mut state = GlobalState {
        params: vec![0.0f32; d],
        control: None,
    };
    let mut copy_dst = vec![0.0f32; d];
    let names: Vec<String> = (0..k).map(|i| format!("h{i}")).collect();
    let cu: Vec<ClientUpdate<'_>> = updates
        .iter()
        .enumerate()
        .map(|(i, u)| ClientUpdate {
            hospital: &names[i],
            num_examples: 100 + i as u64 * 10,
            delta: u,
            control_delta: None,
        })
        .collect();

    let bytes = (k * d * 4) as f64;
    let mut best_avg = f64::INFINITY;
    let mut best_copy = f64::INFINITY;
    // One warm-up of each, then interleaved timed repetitions.
    for rep in 0..=reps {
        let t = Instant::now();
        aggregate(&Strategy::FedAvg, &mut state, &cu, k, None).expect("aggregate");
        black_box(&state.params);
        let ta = t.elapsed().as_secs_f64();

        let t = Instant::now();
        for u in &updates {
            copy_dst.copy_from_slice(black_box(u));
            black_box(&copy_dst);
        }
        let tc = t.elapsed().as_secs_f64();
        if rep > 0 {
            best_avg = best_avg.min(ta);
            best_copy = best_copy.min(tc);
        }
    }
    let gbs = |t: f64| bytes / t / 1e9;
    let ratio = best_copy / best_avg;
    if json {
        println!(
            "{{\"updates\":{k},\"params\":{d},\"fedavg_s\":{best_avg:.4},\"copy_s\":{best_copy:.4},\"fedavg_gbps\":{:.2},\"copy_gbps\":{:.2},\"ratio\":{ratio:.3}}}",
            gbs(best_avg),
            gbs(best_copy)
        );
    } else {
        println!(
            "FedAvg of {k} updates x {d} f32 ({:.0} MB in): best of {reps}: {:.1} ms = {:.2} GB/s",
            bytes / 1e6,
            best_avg * 1e3,
            gbs(best_avg)
        );
        println!(
            "memcpy of the same bytes:                 best of {reps}: {:.1} ms = {:.2} GB/s",
            best_copy * 1e3,
            gbs(best_copy)
        );
        println!("ratio FedAvg/copy throughput: {ratio:.2} (goal >= 0.5)");
    }
}
