//! 2-D convolution with bias as one fused candle op: per-example im2col + GEMM, forward and
//! backward.
//!
//! candle 0.11's CPU `conv2d` unfolds the whole batch, and its backward computes the input
//! gradient with `conv_transpose2d`, a direct loop that dominated training time (issue 9,
//! `docs/benchmarks.md`, "Profile of a training step"). Here each example `n` is one GEMM:
//! `Y_n (O × Ho·Wo) = W (O × C·k·k) · cols_n (C·k·k × Ho·Wo) + b`, where `cols_n` is the im2col
//! unfolding of that example alone (small enough to stay in cache) and the bias initialises the
//! output. The examples are spread over the rayon pool, each GEMM single-threaded. The backward
//! pass, per example again: `∂W += ∂Y_n · cols_nᵀ`, `∂b += Σ ∂Y_n`, `∂cols_n = Wᵀ · ∂Y_n` then
//! col2im (a scatter-add) into `∂X_n`, with per-thread `∂W` accumulators summed at the end. It
//! skips the input gradient when the input is not tracked (the first layer) and the weight
//! gradients when the weights are not (DP-SGD's activation-only backward). A 1×1 convolution with
//! stride 1 reads `X_n` as its own `cols_n`. The GEMM is the `gemm` crate that candle itself uses.
//!
//! DP-SGD's per-example weight gradients are the same products, not summed over examples:
//! `∂W_n = ∂Y_n · cols_nᵀ`, from [`im2col`]'s `(N, C·k·k, Ho·Wo)` (see `dpsgd`).
//! Tested against candle's `conv2d` on random shapes with odd sizes, strides and paddings.
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Which kernels compute the standard (non-depthwise) convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvImpl {
    /// The fused per-example im2col + GEMM op of this module. The default.
    Im2col,
    /// candle's own `conv2d` (its backward uses `conv_transpose2d`). For comparison.
    Candle,
}

static USE_CANDLE: AtomicBool = AtomicBool::new(false);

/// Chooses the convolution kernels for the whole process (benchmarks compare the two).
pub fn set_conv_impl(imp: ConvImpl) {
    USE_CANDLE.store(imp == ConvImpl::Candle, Ordering::Relaxed);
}

/// The convolution kernels in use.
pub fn conv_impl() -> ConvImpl {
    if USE_CANDLE.load(Ordering::Relaxed) {
        ConvImpl::Candle
    } else {
        ConvImpl::Im2col
    }
}

/// `x (N, C, H, W)` convolved with `w (O, C, kh, kw)` plus the bias `b (O)` (no groups, no
/// dilation), with zero padding and stride as given: `(N, O, Ho, Wo)`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (o, cw, kh, kw) = w.dims4()?;
    if cw != c || b.dims() != [o] {
        return Err(crate::error::ModelError::Config(format!(
            "conv2d: input {:?}, weight {:?} and bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.dims()
        )));
    }
    let op = Conv {
        kh,
        kw,
        stride,
        padding,
    };
    op.out_hw(x.dim(2)?, x.dim(3)?)?;
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?)
}

/// The im2col unfolding of every example, `(N, C·kh·kw, Ho·Wo)` (no autograd): DP-SGD's
/// per-example weight gradients are `∂Y_n · cols_nᵀ`.
pub(crate) fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let op = Conv {
        kh,
        kw,
        stride,
        padding,
    };
    let (ho, wo) = op.out_hw(h, w)?;
    let (ckk, p) = (c * kh * kw, ho * wo);
    let mut cols = vec![0f32; n * ckk * p];
    crate::cpu::with_f32(x, |xs| {
        cols.par_chunks_mut(ckk * p)
            .enumerate()
            .for_each(|(i, dst)| op.unfold(&xs[i * c * h * w..(i + 1) * c * h * w], c, h, w, 0..ho, dst));
        Ok(())
    })?;
    Ok(Tensor::from_vec(cols, (n, ckk, p), x.device())?)
}

/// Groups of examples whose weight gradients are summed separately in the backward pass.
const GROUPS: usize = 8;

/// Target size in values (256 KB of f32) of the im2col block of the blocked loops.
const BLOCK_VALUES: usize = 64 * 1024;

/// Kernel geometry of one convolution.
#[derive(Clone, Copy, Debug)]
struct Conv {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn out_hw(&self, h: usize, w: usize) -> candle_core::Result<(usize, usize)> {
        if h + 2 * self.padding < self.kh || w + 2 * self.padding < self.kw || self.stride == 0 {
            candle_core::bail!(
                "conv2d: a {h}x{w} input is smaller than the {}x{} kernel",
                self.kh,
                self.kw
            )
        }
        Ok((
            (h + 2 * self.padding - self.kh) / self.stride + 1,
            (w + 2 * self.padding - self.kw) / self.stride + 1,
        ))
    }

    /// A 1×1 kernel with stride 1 and no padding: the input is its own im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// Range of output columns `ox` whose input column `ox·s − p + kx` lies in `0..w`, as
    /// `(first, end)`.
    fn valid(&self, k: usize, len: usize, out_len: usize) -> (usize, usize) {
        let s = self.stride;
        let first = self.padding.saturating_sub(k).div_ceil(s);
        // ox·s + k − p < len  ⇔  ox·s < len + p − k
        let end = (len + self.padding).saturating_sub(k).div_ceil(s).min(out_len);
        (first.min(end), end)
    }

    /// For stride 1 with the width kept (`Wo == W`, "same" padding): the column shift `kx − p`
    /// of kernel column `kx`, under which a block of output rows reads one contiguous run of
    /// the input plane. `None` otherwise (the row-by-row path).
    fn row_shift(&self, kx: usize, w: usize, wo: usize) -> Option<isize> {
        let shift = kx as isize - self.padding as isize;
        (self.stride == 1 && wo == w && shift.unsigned_abs() < wo).then_some(shift)
    }

    /// The rows `r` of block `oys` (as offsets into it) whose input row `oy + ky − p` exists.
    fn valid_rows(&self, ky: usize, h: usize, oys: &Range<usize>) -> (usize, usize) {
        let first = self.padding.saturating_sub(ky).max(oys.start);
        let end = (h + self.padding).saturating_sub(ky).min(oys.end);
        if first < end {
            (first - oys.start, end - oys.start)
        } else {
            (0, 0)
        }
    }

    /// Output rows per block of the blocked loops: a block's `cols` (C·kh·kw × rows·Wo) stays
    /// near 256 KB, so that it is still in cache when the GEMM packs it, but has at least 256
    /// columns for the GEMM's sake.
    fn block_rows(&self, c: usize, ho: usize, wo: usize) -> usize {
        let ckk = c * self.kh * self.kw;
        let rows = (BLOCK_VALUES / (ckk * wo).max(1)).max(256usize.div_ceil(wo.max(1)));
        rows.clamp(1, ho.max(1))
    }

    /// Unfolds output rows `oys` of one example `x (C, H, W)` into `cols (C·kh·kw, |oys|·Wo)`:
    /// row `(c, ky, kx)`, column `(oy, ox)`. Every entry is written (zero where the kernel
    /// reads padding).
    fn unfold(&self, x: &[f32], c: usize, h: usize, w: usize, oys: Range<usize>, cols: &mut [f32]) {
        let (_, wo) = self.out_hw(h, w).expect("checked by the caller");
        let (kh, kw, s, p) = (self.kh, self.kw, self.stride, self.padding);
        let row_len = oys.len() * wo;
        for (row, dst) in cols.chunks_mut(row_len).enumerate().take(c * kh * kw) {
            let (ch, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let (ox0, ox1) = self.valid(kx, w, wo);
            let plane = &x[ch * h * w..(ch + 1) * h * w];
            if let Some(shift) = self.row_shift(kx, w, wo) {
                // Stride 1, width kept: the block's valid rows are one contiguous run of the
                // input plane, shifted by kx − p; then the columns that wrapped around from the
                // neighbouring input row are zeroed (they read padding).
                let (r0, r1) = self.valid_rows(ky, h, &oys);
                dst[..r0 * wo].fill(0.0);
                dst[r1 * wo..].fill(0.0);
                if r1 > r0 {
                    let start = ((oys.start + r0 + ky - p) * w) as isize + shift;
                    let out = &mut dst[r0 * wo..r1 * wo];
                    let (j0, j1) = clip_run(start, out.len(), plane.len());
                    out[..j0].fill(0.0);
                    out[j1..].fill(0.0);
                    let from = (start + j0 as isize) as usize;
                    out[j0..j1].copy_from_slice(&plane[from..from + (j1 - j0)]);
                    zero_wrapped(out, wo, shift);
                }
                continue;
            }
            for (r, oy) in oys.clone().enumerate() {
                let out = &mut dst[r * wo..(r + 1) * wo];
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    out.fill(0.0);
                    continue;
                };
                let src = &plane[iy * w..(iy + 1) * w];
                out[..ox0].fill(0.0);
                out[ox1..].fill(0.0);
                if s == 1 {
                    let i0 = ox0 + kx - p;
                    out[ox0..ox1].copy_from_slice(&src[i0..i0 + (ox1 - ox0)]);
                } else {
                    for (ox, o) in out.iter_mut().enumerate().take(ox1).skip(ox0) {
                        *o = src[ox * s + kx - p];
                    }
                }
            }
        }
    }

    /// col2im of output rows `oys`: adds each entry of `cols (C·kh·kw, |oys|·Wo)` to the input
    /// position it was read from, into `dx (C, H, W)` (which the caller zeroes).
    /// `cols` is scratch: the entries that correspond to padding may be zeroed.
    fn fold(&self, cols: &mut [f32], c: usize, h: usize, w: usize, oys: Range<usize>, dx: &mut [f32]) {
        let (_, wo) = self.out_hw(h, w).expect("checked by the caller");
        let (kh, kw, s, p) = (self.kh, self.kw, self.stride, self.padding);
        let row_len = oys.len() * wo;
        for (row, src_row) in cols.chunks_mut(row_len).enumerate().take(c * kh * kw) {
            let (ch, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let (ox0, ox1) = self.valid(kx, w, wo);
            let plane = &mut dx[ch * h * w..(ch + 1) * h * w];
            if let Some(shift) = self.row_shift(kx, w, wo) {
                // As in `unfold`: one contiguous run, after zeroing the wrapped columns.
                let (r0, r1) = self.valid_rows(ky, h, &oys);
                if r1 > r0 {
                    let src = &mut src_row[r0 * wo..r1 * wo];
                    zero_wrapped(src, wo, shift);
                    let start = ((oys.start + r0 + ky - p) * w) as isize + shift;
                    let (j0, j1) = clip_run(start, src.len(), plane.len());
                    let to = (start + j0 as isize) as usize;
                    for (d, v) in plane[to..to + (j1 - j0)].iter_mut().zip(&src[j0..j1]) {
                        *d += v;
                    }
                }
                continue;
            }
            for (r, oy) in oys.clone().enumerate() {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                    continue;
                };
                let src = &src_row[r * wo..(r + 1) * wo];
                let dst = &mut plane[iy * w..(iy + 1) * w];
                if s == 1 {
                    let i0 = ox0 + kx - p;
                    for (d, v) in dst[i0..i0 + (ox1 - ox0)].iter_mut().zip(&src[ox0..ox1]) {
                        *d += v;
                    }
                } else {
                    for ox in ox0..ox1 {
                        dst[ox * s + kx - p] += src[ox];
                    }
                }
            }
        }
    }
}

/// The part `j0..j1` of a run `start + 0..len` that lies inside `0..plane_len`.
fn clip_run(start: isize, len: usize, plane_len: usize) -> (usize, usize) {
    let j0 = (-start).clamp(0, len as isize) as usize;
    let j1 = (plane_len as isize - start).clamp(j0 as isize, len as isize) as usize;
    (j0, j1)
}

/// Zeroes, in each row of `wo` values, the columns that a shift of `shift` reads from outside
/// the row (the padding).
fn zero_wrapped(rows: &mut [f32], wo: usize, shift: isize) {
    let n = shift.unsigned_abs();
    if n == 0 {
        return;
    }
    for row in rows.chunks_mut(wo) {
        if shift < 0 {
            row[..n].fill(0.0);
        } else {
            row[wo - n..].fill(0.0);
        }
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::cpu::{Mat, gemm, with_scratch};
        let &[n, c, h, w] = xl.dims() else {
            candle_core::bail!("conv2d expects a 4-d input, got {:?}", xl.dims())
        };
        let o = wl.dims()[0];
        use crate::cpu::contiguous;
        let (x, wt, bias) = (
            contiguous(xs, xl, "conv2d input")?,
            contiguous(ws, wl, "conv2d weight")?,
            contiguous(bs, bl, "conv2d bias")?,
        );
        let (ho, wo) = self.out_hw(h, w)?;
        let (ckk, p) = (c * self.kh * self.kw, ho * wo);
        // The bias initialises the output (every element), then each example's GEMM adds W·cols.
        // SAFETY: the rows of length `p` cover all n·o·p elements and each is filled.
        let mut y = unsafe {
            crate::cpu::uninit_vec(n * o * p, |y| {
                y.par_chunks_mut(p).enumerate().for_each(|(r, row)| {
                    let b = bias[r % o];
                    row.iter_mut().for_each(|v| {
                        v.write(b);
                    });
                })
            })
        };
        let rows = self.block_rows(c, ho, wo);
        let scratch = if self.is_pointwise() { 0 } else { ckk * rows * wo };
        y.par_chunks_mut(o * p).enumerate().for_each(|(i, yn)| {
            let xn = &x[i * c * h * w..(i + 1) * c * h * w];
            if self.is_pointwise() {
                gemm(o, p, ckk, yn, p, true, Mat::rows(wt, ckk), Mat::rows(xn, p));
                return;
            }
            with_scratch(scratch, 0, |cols, _| {
                for oy0 in (0..ho).step_by(rows) {
                    let oys = oy0..(oy0 + rows).min(ho);
                    let len = oys.len() * wo;
                    self.unfold(xn, c, h, w, oys, &mut cols[..ckk * len]);
                    let dst = &mut yn[oy0 * wo..];
                    gemm(
                        o,
                        len,
                        ckk,
                        dst,
                        p,
                        true,
                        Mat::rows(wt, ckk),
                        Mat::rows(&cols[..ckk * len], len),
                    );
                }
            })
        });
        Ok((CpuStorage::F32(y), Shape::from((n, o, ho, wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::cpu::{Mat, gemm, with_f32};
        let (n, c, h, wd) = x.dims4()?;
        let o = w.dim(0)?;
        let (ho, wo) = self.out_hw(h, wd)?;
        let (ckk, p, chw) = (c * self.kh * self.kw, ho * wo, c * h * wd);
        let (need_dx, need_dw) = (x.track_op(), w.track_op() || b.track_op());
        if !need_dx && !need_dw {
            return Ok((None, None, None));
        }
        let mut dx = vec![0f32; if need_dx { n * chw } else { 0 }];
        let (dw, db) = with_f32(x, |xs| {
            with_f32(w, |ws| {
                with_f32(grad, |gs| {
                    // One example: adds its ∂W and ∂b to (dw, db), writes its ∂X into dxn, in
                    // blocks of output rows (see `block_rows`).
                    let rows = self.block_rows(c, ho, wo);
                    let step = |dw: &mut [f32],
                                db: &mut [f64],
                                cols: &mut [f32],
                                dcols: &mut [f32],
                                i: usize,
                                mut dxn: Option<&mut [f32]>| {
                        let gn = &gs[i * o * p..(i + 1) * o * p];
                        let xn = &xs[i * chw..(i + 1) * chw];
                        if need_dw {
                            for (d, row) in db.iter_mut().zip(gn.chunks(p)) {
                                *d += crate::cpu::lane_sum(row, row, |v, _| v);
                            }
                        }
                        if self.is_pointwise() {
                            if need_dw {
                                gemm(o, ckk, p, dw, ckk, true, Mat::rows(gn, p), Mat::transposed(xn, p));
                            }
                            if let Some(dxn) = dxn {
                                gemm(
                                    ckk,
                                    p,
                                    o,
                                    dxn,
                                    p,
                                    false,
                                    Mat::transposed(ws, ckk),
                                    Mat::rows(gn, p),
                                );
                            }
                            return;
                        }
                        for oy0 in (0..ho).step_by(rows) {
                            let oys = oy0..(oy0 + rows).min(ho);
                            let len = oys.len() * wo;
                            // ∂Y_n restricted to these output rows: (O × len), row stride P.
                            let g_block = Mat {
                                data: &gn[oy0 * wo..],
                                rs: p,
                                cs: 1,
                            };
                            if need_dw {
                                let cols = &mut cols[..ckk * len];
                                self.unfold(xn, c, h, wd, oys.clone(), cols);
                                gemm(o, ckk, len, dw, ckk, true, g_block, Mat::transposed(cols, len));
                            }
                            if let Some(dxn) = dxn.as_deref_mut() {
                                let dcols = &mut dcols[..ckk * len];
                                gemm(ckk, len, o, dcols, len, false, Mat::transposed(ws, ckk), g_block);
                                self.fold(dcols, c, h, wd, oys, dxn);
                            }
                        }
                    };
                    // A fixed partition of the batch into contiguous groups, each summed in
                    // order and the groups reduced in order: the gradient does not depend on
                    // how rayon schedules the work (the same seed trains the same model).
                    // One (∂W, ∂b) accumulator per group; cols/∂cols scratch per thread.
                    let per_group = n.div_ceil(GROUPS).max(1);
                    let scratch = if self.is_pointwise() { 0 } else { ckk * rows * wo };
                    let run_group = |g: usize, mut dxg: Option<&mut [f32]>| {
                        let mut dw = vec![0f32; if need_dw { o * ckk } else { 0 }];
                        let mut db = vec![0f64; if need_dw { o } else { 0 }];
                        crate::cpu::with_scratch(scratch, scratch, |cols, dcols| {
                            for i in g * per_group..((g + 1) * per_group).min(n) {
                                let dxn = dxg
                                    .as_deref_mut()
                                    .map(|d| &mut d[(i - g * per_group) * chw..][..chw]);
                                step(&mut dw, &mut db, cols, dcols, i, dxn);
                            }
                        });
                        (dw, db)
                    };
                    let partials: Vec<(Vec<f32>, Vec<f64>)> = if need_dx {
                        dx.par_chunks_mut(per_group * chw)
                            .enumerate()
                            .map(|(g, dxg)| run_group(g, Some(dxg)))
                            .collect()
                    } else {
                        (0..n.div_ceil(per_group))
                            .into_par_iter()
                            .map(|g| run_group(g, None))
                            .collect()
                    };
                    let mut dw = vec![0f32; if need_dw { o * ckk } else { 0 }];
                    let mut db = vec![0f64; if need_dw { o } else { 0 }];
                    for (pw, pb) in partials {
                        dw.iter_mut().zip(pw).for_each(|(a, v)| *a += v);
                        db.iter_mut().zip(pb).for_each(|(a, v)| *a += v);
                    }
                    Ok((dw, db))
                })
            })
        })?;
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, (n, c, h, wd), dev)?)
        } else {
            None
        };
        if !need_dw {
            return Ok((dx, None, None));
        }
        let db: Vec<f32> = db.into_iter().map(|v| v as f32).collect();
        Ok((
            dx,
            Some(Tensor::from_vec(dw, w.dims(), dev)?),
            Some(Tensor::from_vec(db, o, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    use crate::cpu::testing::{max_diff, max_rel_diff};

    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let dev = Device::Cpu;
        // (n, c, h, w, o, k, stride, padding): odd sizes, strides 1-3, paddings 0-2, 1×1 kernels
        // with and without stride (the pointwise shortcut), batch 1 and batches not divisible by
        // the thread count, one or several row blocks.
        let shapes = [
            (2, 3, 7, 5, 4, 3, 1, 1),
            (1, 4, 8, 8, 6, 3, 2, 1),
            (3, 2, 9, 6, 5, 1, 1, 0),
            (2, 5, 11, 13, 3, 3, 2, 0),
            (1, 3, 10, 7, 2, 5, 3, 2),
            (2, 16, 16, 16, 8, 1, 2, 0),
            (5, 7, 6, 9, 3, 1, 1, 0),
            (4, 3, 64, 64, 8, 3, 1, 1),
            // "Same" padding with stride 1 (the contiguous-run path of unfold/fold): 5×5 kernels
            // (shifts up to ±2), and a one-column image where the shift is as wide as the row.
            (2, 3, 6, 4, 3, 5, 1, 2),
            (2, 2, 5, 1, 3, 3, 1, 1),
            // Several blocks of output rows, the last one partial (see `block_rows`).
            (2, 32, 32, 32, 4, 3, 1, 1),
            (1, 64, 40, 40, 4, 3, 2, 1),
        ];
        for (n, c, h, w, o, k, stride, pad) in shapes {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap()).unwrap();
            let ker = Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, k, k), &dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, &dev).unwrap()).unwrap();
            let ours = conv2d(x.as_tensor(), ker.as_tensor(), bias.as_tensor(), stride, pad).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(ker.as_tensor(), pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.as_tensor().reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let shape = (n, c, h, w, o, k, stride, pad);
            assert!(max_rel_diff(&ours, &theirs) < 1e-5, "forward {shape:?}");
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &ker, &bias] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(
                    max_rel_diff(a, b) < 1e-4,
                    "gradient {shape:?}: {}",
                    max_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn skips_the_gradients_nobody_asked_for() {
        let dev = Device::Cpu;
        // An untracked input (the first layer): weight and bias gradients only.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 6), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let y = conv2d(&x, w.as_tensor(), b.as_tensor(), 1, 1).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert_eq!(g.get(w.as_tensor()).unwrap().dims(), &[4, 3, 3, 3]);
        // Detached weights (DP-SGD's activation-only pass): the input gradient only, and it
        // equals the one computed with tracked weights.
        let xv = Var::from_tensor(&x).unwrap();
        let y = conv2d(
            xv.as_tensor(),
            &w.as_tensor().detach(),
            &b.as_tensor().detach(),
            1,
            1,
        )
        .unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let y2 = conv2d(xv.as_tensor(), w.as_tensor(), b.as_tensor(), 1, 1).unwrap();
        let g2 = y2.sum_all().unwrap().backward().unwrap();
        assert!(g.get(w.as_tensor()).is_none());
        assert!(max_diff(g.get(xv.as_tensor()).unwrap(), g2.get(xv.as_tensor()).unwrap()) < 1e-6);
    }

    #[test]
    fn im2col_times_weights_is_the_convolution() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 2, 7, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 2, 3, 3), &dev).unwrap();
        let cols = im2col(&x, 3, 3, 2, 1).unwrap(); // (3, 18, Ho·Wo)
        let y = w
            .reshape((1, 4, 18))
            .unwrap()
            .broadcast_matmul(&cols)
            .unwrap()
            .reshape((3, 4, 4, 3))
            .unwrap();
        let want = x.conv2d(&w, 1, 2, 1, 1).unwrap();
        assert!(max_diff(&y, &want) < 1e-4);
    }
}
