//! Measures the packed additive HE codec per `--values` parameters (default 1M) and
//! `--hospitals` hospitals (default 10):
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release -p caduceus-secagg --example he_bench -- \
//!     [--values N] [--hospitals K] [--reps R]
//! ```
//!
//! Encryption and decryption parallelise over chunks (rayon); the aggregator and the plaintext
//! baseline are single-threaded.
//!
//! Reports encryption time per hospital, aggregation time (bodies only, the shipped design, and
//! the alternative that expands every mask at the aggregator), decryption time, bytes on the
//! wire per parameter against float32, and a plaintext f32 weighted sum of the same data.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use caduceus_secagg::params::{DROPPED_BITS, GLWE_DIMENSION, POLYNOMIAL_SIZE};
use caduceus_secagg::wire::decode_hospital_chunk;
use caduceus_secagg::{
    AcceptPolicy, Aggregator, Decryptor, Encryptor, SecAggParams, StudyKey, SumBounds, integer_weights,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    CiphertextModulus, DefaultRandomGenerator, GlweCiphertextList, GlweSize, PolynomialSize,
    SeededGlweCiphertextList, decompress_seeded_glwe_ciphertext_list,
};

struct Args {
    values: usize,
    hospitals: usize,
    reps: usize,
    clip: f32,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        values: 1_000_000,
        hospitals: 10,
        reps: 3,
        clip: 0.05,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--values" => a.values = val()?.parse()?,
            "--hospitals" => a.hospitals = val()?.parse()?,
            "--reps" => a.reps = val()?.parse()?,
            "--clip" => a.clip = val()?.parse()?,
            "-h" | "--help" => {
                println!("he_bench [--values N] [--hospitals K] [--reps R] [--clip B]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(
        a.values > 0 && a.hospitals > 0 && a.reps > 0,
        "arguments must be > 0"
    );
    Ok(a)
}

/// CPU time consumed by this process (all threads), from `CLOCK_PROCESS_CPUTIME_ID`.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Wall-clock and process CPU time of one measured section.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Cost {
    cpu: Duration,
    wall: Duration,
}

struct Timer(Instant, Duration);

impl Timer {
    fn start() -> Self {
        Timer(Instant::now(), process_cpu_time())
    }
    fn stop(self) -> Cost {
        Cost {
            cpu: process_cpu_time() - self.1,
            wall: self.0.elapsed(),
        }
    }
}

/// Median by CPU time.
fn median(mut v: Vec<Cost>) -> Cost {
    v.sort();
    v[v.len() / 2]
}

fn ms(c: Cost) -> String {
    format!(
        "{:.1} ms CPU ({:.1} ms wall)",
        c.cpu.as_secs_f64() * 1e3,
        c.wall.as_secs_f64() * 1e3
    )
}

/// The alternative design: the aggregator expands every contributor's mask and sums full GLWE
/// ciphertexts (mask and body), so it must send 8 bytes of mask per value back.
fn aggregate_expanding_masks(
    params: &SecAggParams,
    messages: &[Vec<Vec<u8>>],
    weights: &[u32],
) -> Result<Vec<Vec<u64>>> {
    let n = POLYNOMIAL_SIZE;
    let glwe_size = GlweSize(GLWE_DIMENSION + 1);
    let modulus = CiphertextModulus::<u64>::new_native();
    let mut sums: Vec<Vec<u64>> = Vec::new();
    for (hospital, w) in messages.iter().zip(weights) {
        let w = u64::from(*w);
        for (c, bytes) in hospital.iter().enumerate() {
            let chunk = decode_hospital_chunk(params, bytes)?;
            let bodies: Vec<u64> = chunk
                .body
                .chunks_exact(6)
                .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], 0, 0]) << DROPPED_BITS)
                .collect();
            let seed = CompressionSeed::from(Seed(u128::from_le_bytes(chunk.contribution.seed)));
            let seeded = SeededGlweCiphertextList::from_container(
                &bodies[..],
                glwe_size,
                PolynomialSize(n),
                seed,
                modulus,
            );
            let mut full = GlweCiphertextList::new(
                0u64,
                glwe_size,
                PolynomialSize(n),
                seeded.glwe_ciphertext_count(),
                modulus,
            );
            decompress_seeded_glwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(&mut full, &seeded);
            if sums.len() <= c {
                sums.push(vec![0; full.as_ref().len()]);
            }
            for (s, x) in sums[c].iter_mut().zip(full.as_ref()) {
                *s = s.wrapping_add(w.wrapping_mul(*x));
            }
        }
    }
    Ok(sums)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let params = SecAggParams::new(args.clip, SumBounds::default())?;
    let study = "bench-study";
    let round = 1;
    let key = StudyKey::generate(study)?;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let updates: Vec<Vec<f32>> = (0..args.hospitals)
        .map(|_| {
            (0..args.values)
                .map(|_| rng.random_range(-1.2f32..1.2) * args.clip)
                .collect()
        })
        .collect();
    let examples: Vec<f64> = (0..args.hospitals)
        .map(|_| f64::from(rng.random_range(500u32..5000)))
        .collect();
    let weights = integer_weights(&examples, params.bounds().max_total_weight)?;
    let total_weight: u32 = weights.iter().sum();

    println!(
        "secure aggregation benchmark: {} parameters, {} hospitals, clip ±{}, {} reps, \
         {} rayon threads (set RAYON_NUM_THREADS=1 for single-thread figures)",
        args.values,
        args.hospitals,
        args.clip,
        args.reps,
        rayon::current_num_threads()
    );
    println!(
        "params: N=2048, k=1, TUniform(17), q=2^64, Δ=2^{}, M={} ({:.1} bits/value), \
         quantisation error bound {:.3e}, fingerprint {}",
        params.delta_log2(),
        params.max_abs_quantised(),
        params.bits_per_value(),
        params.quantisation_error_bound(),
        params.fingerprint()
    );

    // Plaintext baseline: f32 weighted mean of the same (clipped) data.
    let mut plain_times = Vec::new();
    let mut plain = vec![0f32; args.values];
    for _ in 0..args.reps {
        let t = Timer::start();
        plain.iter_mut().for_each(|x| *x = 0.0);
        for (u, &w) in updates.iter().zip(&weights) {
            let w = w as f32;
            for (p, &x) in plain.iter_mut().zip(u) {
                *p += w * x.clamp(-args.clip, args.clip);
            }
        }
        let inv = 1.0 / total_weight as f32;
        plain.iter_mut().for_each(|p| *p *= inv);
        plain_times.push(t.stop());
        std::hint::black_box(&plain);
    }

    // Encryption, per hospital (quantise + encrypt + encode).
    let mut enc_times = Vec::new();
    let mut messages = Vec::new();
    for (i, u) in updates.iter().enumerate() {
        let enc = Encryptor::new(&key, &params, &format!("hospital-{i:02}"))?;
        let t = Timer::start();
        let chunks = enc.encrypt_update(round, u)?;
        enc_times.push(t.stop());
        messages.push(chunks);
    }
    let up_bytes: usize = messages[0].iter().map(Vec::len).sum();
    let max_msg = messages.iter().flatten().map(Vec::len).max().unwrap_or(0);

    // Aggregation, shipped design: sum bodies only.
    let mut agg_times = Vec::new();
    let mut aggregate = Vec::new();
    for _ in 0..args.reps {
        let t = Timer::start();
        let mut agg = Aggregator::new(&params, study, round)?;
        for (m, &w) in messages.iter().zip(&weights) {
            for c in m {
                agg.add_chunk(c, w)?;
            }
        }
        aggregate = agg.finish()?;
        agg_times.push(t.stop());
    }
    let down_bytes: usize = aggregate.iter().map(Vec::len).sum();

    // Aggregation, alternative: expand every mask at the aggregator.
    let mut alt_times = Vec::new();
    for _ in 0..args.reps {
        let t = Timer::start();
        let sums = aggregate_expanding_masks(&params, &messages, &weights)?;
        alt_times.push(t.stop());
        std::hint::black_box(&sums);
    }
    // Its answer carries the full mask (8 B) and the body (6 B) per value.
    let alt_down_per_value = 8.0 + 6.0;

    // Decryption (verify tags, expand K masks, decrypt, decode, dequantise).
    let dec = Decryptor::new(&key, &params)?;
    let policy = AcceptPolicy::new(args.hospitals.min(2));
    let mut dec_times = Vec::new();
    let mut mean = Vec::new();
    for _ in 0..args.reps {
        let t = Timer::start();
        let out = dec.decrypt_aggregate(round, &aggregate, &policy)?;
        mean = out.mean(&params);
        dec_times.push(t.stop());
    }
    // Decryption of a one-contributor aggregate: one mask expansion plus the polynomial
    // products, which is what a hospital pays when the aggregator expands the masks.
    let mut single = Aggregator::new(&params, study, round)?;
    for c in &messages[0] {
        single.add_chunk(c, weights[0])?;
    }
    let single = single.finish()?;
    let mut single_times = Vec::new();
    for _ in 0..args.reps {
        let t = Timer::start();
        std::hint::black_box(dec.decrypt_aggregate(round, &single, &AcceptPolicy::new(1))?);
        single_times.push(t.stop());
    }

    // Correctness against the plaintext mean.
    let max_err = mean
        .iter()
        .zip(&plain)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    let tolerance = params.quantisation_error_bound() + 2.0 * f64::from(args.clip) * 1e-6;
    ensure!(
        max_err <= tolerance,
        "decrypted mean differs from the plaintext mean by {max_err:e} > {tolerance:e}"
    );

    let n = args.values as f64;
    let k = enc_times.len() as u32;
    let enc_mean = Cost {
        cpu: enc_times.iter().map(|c| c.cpu).sum::<Duration>() / k,
        wall: enc_times.iter().map(|c| c.wall).sum::<Duration>() / k,
    };
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| encryption per hospital (mean of {}, min / max) | {} ({} / {}) |",
        enc_times.len(),
        ms(enc_mean),
        ms(*enc_times.iter().min().unwrap()),
        ms(*enc_times.iter().max().unwrap())
    );
    println!(
        "| aggregation, bodies only (shipped), {} hospitals | {} |",
        args.hospitals,
        ms(median(agg_times))
    );
    println!(
        "| aggregation, expanding every mask (alternative) | {} |",
        ms(median(alt_times))
    );
    println!(
        "| plaintext f32 weighted mean of the same data | {} |",
        ms(median(plain_times))
    );
    println!(
        "| decryption of the {}-hospital aggregate (shipped) | {} |",
        args.hospitals,
        ms(median(dec_times))
    );
    println!(
        "| decryption of a 1-contributor aggregate (≈ hospital cost of the alternative) | {} |",
        ms(median(single_times))
    );
    println!(
        "| upload bytes per parameter (hospital → aggregator) | {:.3} B = {:.2}× float32 |",
        up_bytes as f64 / n,
        up_bytes as f64 / n / 4.0
    );
    println!(
        "| download bytes per parameter (aggregate → hospital), shipped | {:.3} B = {:.2}× float32 |",
        down_bytes as f64 / n,
        down_bytes as f64 / n / 4.0
    );
    println!(
        "| download bytes per parameter, alternative (mask + body) | {:.3} B = {:.2}× float32 |",
        alt_down_per_value,
        alt_down_per_value / 4.0
    );
    println!(
        "| chunks per update / largest message | {} / {} bytes |",
        messages[0].len(),
        max_msg
    );
    println!(
        "| max abs error of decrypted mean vs plaintext mean | {:.3e} (bound {:.3e}) |",
        max_err,
        params.quantisation_error_bound()
    );
    Ok(())
}
