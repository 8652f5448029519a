//! Throughput of the exact discrete-Gaussian noise: `cargo run --release --example noise_bench -- DIM`.
use caduceus_privacy::noise::GaussianNoise;
use std::time::Instant;

fn main() {
    let dim: usize = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("DIM"));
    let mut noise = GaussianNoise::new(1.0, 1.0, dim).expect("valid parameters");
    let sum = vec![0.25f32; dim];
    let t = Instant::now();
    let out = noise.add_noise_f32(&sum).expect("dimension matches");
    let el = t.elapsed();
    println!(
        "dim {dim}: {:.1} ms ({:.0} ns/coordinate), noise std {:.6}, checksum {:.3}",
        el.as_secs_f64() * 1e3,
        el.as_secs_f64() * 1e9 / dim as f64,
        noise.noise_std(),
        out.iter().map(|&x| f64::from(x)).sum::<f64>()
    );
}
