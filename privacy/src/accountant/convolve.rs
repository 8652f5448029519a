//! Linear convolution of probability vectors: direct for short inputs, real FFT otherwise.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

/// Below this many multiply-adds the direct O(n·m) sum is cheaper than three FFTs.
const DIRECT_LIMIT: usize = 1 << 16;

type Plans = (Arc<dyn RealToComplex<f64>>, Arc<dyn ComplexToReal<f64>>);
type PlanCache = Mutex<(RealFftPlanner<f64>, HashMap<usize, Plans>)>;

/// FFT plans shared by every composition in the process: planning computes twiddle factors
/// (sin/cos), which costs as much as a transform, and the same sizes recur across compositions.
fn plans(len: usize) -> Plans {
    /// Bound on cached plans; the cache is cleared when it is exceeded.
    const MAX_PLANS: usize = 24;
    static CACHE: OnceLock<PlanCache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new((RealFftPlanner::new(), HashMap::new())));
    let mut guard = cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (planner, map) = &mut *guard;
    if let Some(p) = map.get(&len) {
        return p.clone();
    }
    if map.len() >= MAX_PLANS {
        map.clear();
        *planner = RealFftPlanner::new();
    }
    let p = (planner.plan_fft_forward(len), planner.plan_fft_inverse(len));
    map.insert(len, p.clone());
    p
}

/// c[k] = Σ_i a[i]·b[k−i], length a.len() + b.len() − 1. Negative round-off is clamped to 0
/// (it can only come from FFT error: every true entry is ≥ 0).
pub(crate) fn convolve(a: &[f64], b: &[f64]) -> Vec<f64> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let n = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 32 || a.len().saturating_mul(b.len()) <= DIRECT_LIMIT {
        let mut c = vec![0.0; n];
        for (i, &x) in a.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            for (cj, &y) in c[i..].iter_mut().zip(b) {
                *cj += x * y;
            }
        }
        return c;
    }
    let len = fft_size(n);
    let (fwd, inv) = plans(len);
    let mut scratch = vec![Complex::default(); fwd.get_scratch_len().max(inv.get_scratch_len())];
    let spectrum = |input: &[f64], scratch: &mut [Complex<f64>]| {
        let mut buf = vec![0.0; len];
        buf[..input.len()].copy_from_slice(input);
        let mut out = fwd.make_output_vec();
        fwd.process_with_scratch(&mut buf, &mut out, scratch)
            .expect("buffer lengths match the plan");
        out
    };
    let mut fa = spectrum(a, &mut scratch);
    let same = std::ptr::eq(a, b);
    if same {
        fa.iter_mut().for_each(|z| *z = *z * *z);
    } else {
        let fb = spectrum(b, &mut scratch);
        fa.iter_mut().zip(&fb).for_each(|(z, w)| *z *= *w);
    }
    // A real signal's spectrum has real DC and Nyquist bins; drop round-off there.
    fa[0].im = 0.0;
    if len.is_multiple_of(2) {
        let last = fa.len() - 1;
        fa[last].im = 0.0;
    }
    let mut out = vec![0.0; len];
    inv.process_with_scratch(&mut fa, &mut out, &mut scratch)
        .expect("buffer lengths match the plan");
    out.truncate(n);
    let scale = 1.0 / len as f64;
    out.iter_mut().for_each(|x| *x = (*x * scale).max(0.0));
    out
}

/// Smallest 2^k or 3·2^k ≥ n (at most 50% padding; few distinct sizes, so plans are reused).
fn fft_size(n: usize) -> usize {
    let p = n.next_power_of_two().max(2);
    let three = 3 * (p / 4);
    if three >= n && three.is_multiple_of(2) {
        three
    } else {
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct(a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; a.len() + b.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                c[i + j] += x * y;
            }
        }
        c
    }

    #[test]
    fn fft_matches_direct() {
        let a: Vec<f64> = (0..3000)
            .map(|i| ((i as f64) * 0.37).sin().abs() / 3000.0)
            .collect();
        let b: Vec<f64> = (0..1700)
            .map(|i| ((i as f64) * 0.11).cos().abs() / 1700.0)
            .collect();
        let fast = convolve(&a, &b);
        let slow = direct(&a, &b);
        assert_eq!(fast.len(), slow.len());
        let err = fast
            .iter()
            .zip(&slow)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-18, "max abs error {err}");
        let sq = convolve(&a, &a);
        let err = sq
            .iter()
            .zip(direct(&a, &a))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-18, "max abs error {err}");
    }

    #[test]
    fn fft_sizes_are_smooth_and_large_enough() {
        for n in [1, 2, 3, 7, 100, 1001, 65537, 1_000_001] {
            let s = fft_size(n);
            assert!(s >= n && s.is_multiple_of(2) && s <= 2 * n.max(2), "{n} → {s}");
            let m = if s.is_power_of_two() { s } else { s / 3 };
            assert!(m.is_power_of_two(), "{s}");
        }
        assert_eq!(fft_size(1000), 1024);
        assert_eq!(fft_size(700), 768);
    }
}
