//! GEMM throughput at the convolution shapes of the small CNN, through the `gemm` crate that
//! candle and the fused convolution use: each example's product on one thread with the batch
//! spread over the cores (what `conv` does), and one product split by gemm over the threads.
//! The dev profile's debug assertions in gemm cost 3× here (issue 9's profile); the workspace
//! turns them off for gemm and candle.
//!
//! ```text
//! cargo run -p caduceus-models --example gemm_shapes
//! ```
use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let threads = rayon::current_num_threads();
    // (m, k, n) = (O, C·k·k, Ho·Wo): Y = W · cols per example, then two larger square products.
    let shapes = [
        (32, 27, 4096),
        (64, 288, 1024),
        (128, 576, 256),
        (16, 144, 4096),
        (512, 512, 512),
    ];
    for (m, k, n) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let reps = 64;
        let mut c = vec![0f32; m * n * threads];
        let t = Instant::now();
        c.par_chunks_mut(m * n).for_each(|c| {
            for _ in 0..reps / threads {
                product(m, n, k, c, &a, &b, gemm::Parallelism::None);
            }
        });
        let per_example = 2.0 * (m * k * n * (reps / threads) * threads) as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..reps {
            product(
                m,
                n,
                k,
                &mut c[..m * n],
                &a,
                &b,
                gemm::Parallelism::Rayon(threads),
            );
        }
        let split = 2.0 * (m * k * n * reps) as f64 / t.elapsed().as_secs_f64();
        println!(
            "m {m:4} k {k:4} n {n:5}: one product per thread {:6.1} GFLOP/s, one product over {threads} threads {:6.1} GFLOP/s",
            per_example / 1e9,
            split / 1e9
        );
    }
}

fn product(m: usize, n: usize, k: usize, c: &mut [f32], a: &[f32], b: &[f32], par: gemm::Parallelism) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    // SAFETY: the assert keeps every index inside the three row-major slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
