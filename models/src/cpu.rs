//! Raw access to CPU tensors and the single-threaded GEMM, shared by the fused kernels
//! (`conv`, `ops`, `depthwise`).
use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Storage, Tensor};

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two scratch buffers of at least `a` and `b` values, kept per thread across
/// calls (no allocation and no zeroing per example: their contents are arbitrary, `f` must
/// write before it reads). `f` must not re-enter (it must not run rayon work that could call
/// `with_scratch` on this thread).
pub(crate) fn with_scratch<R>(a: usize, b: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let (x, y) = &mut *s;
        if x.len() < a {
            x.resize(a, 0.0);
        }
        if y.len() < b {
            y.resize(b, 0.0);
        }
        f(&mut x[..a], &mut y[..b])
    })
}

/// Σ f(aᵢ, bᵢ) with eight f32 lanes over blocks of 512, the blocks summed in f64: vectorised,
/// and accurate to ~10⁻⁷ relative for the sums the kernels need.
#[inline(always)]
pub(crate) fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut total = 0f64;
    for (a, b) in a.chunks(512).zip(b.chunks(512)) {
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (a, b) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += f(a[l], b[l]);
            }
        }
        let tail: f32 = ra.iter().zip(rb).map(|(&a, &b)| f(a, b)).sum();
        total += f64::from(acc.iter().sum::<f32>() + tail);
    }
    total
}

/// The f32 data of a custom op's contiguous input (`what` names it in the error).
pub(crate) fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous")
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Runs `f` on the contiguous f32 data of `t` (copied to a contiguous layout first if needed).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("the training kernels run on the CPU only")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// A vector of `len` values written by `init` without being zero-filled first (the outputs of
/// the kernels are written whole; zeroing them first was a measurable pass of its own).
///
/// # Safety
/// `init` must write every element of the slice it is given.
pub(crate) unsafe fn uninit_vec(len: usize, init: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    init(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the caller's `init` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// A row-major matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major matrix with `cols` columns.
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a contiguous row-major matrix with `cols` columns.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Mat {
            data,
            rs: 1,
            cs: cols,
        }
    }
    fn fits(&self, r: usize, c: usize) -> bool {
        r == 0 || c == 0 || (r - 1) * self.rs + (c - 1) * self.cs < self.data.len()
    }
}

/// `dst (m × n, row-major with row stride dst_rs ≥ n) = [dst +] lhs (m × k) · rhs (k × n)` on
/// the calling thread (the callers parallelise over examples). `accumulate` adds to `dst`
/// instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
) {
    assert!(dst_rs >= n, "gemm: destination rows overlap");
    assert!(
        m == 0 || n == 0 || dst.len() >= (m - 1) * dst_rs + n,
        "gemm: destination too small"
    );
    assert!(lhs.fits(m, k) && rhs.fits(k, n), "gemm: operand too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    // SAFETY: the asserts above keep every index the GEMM touches inside the three slices, and
    // `dst` is borrowed mutably, so it does not alias the operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Comparisons for the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::Tensor;

    /// max |a − b|.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all());
        d.and_then(|d| d.to_scalar::<f32>()).expect("same shapes")
    }

    /// max |a − b| / max(1, max |b|).
    pub(crate) fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>());
        max_diff(a, b) / scale.expect("a tensor").max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_a_naive_product_with_transposed_operands() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // (n × k)
        let mut c = vec![1f32; m * n];
        gemm(
            m,
            n,
            k,
            &mut c,
            n,
            true,
            Mat::rows(&a, k),
            Mat::transposed(&bt, k),
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5);
            }
        }
    }
}
