//! 2-D convolution as im2col + one GEMM, forward and backward.
//!
//! candle 0.11's CPU backward of `conv2d` computes the input gradient with `conv_transpose2d`, a
//! direct loop that dominates training time (issue 9). Here the convolution is written as
//! `W (O × C·k·k) · cols (C·k·k × N·Ho·Wo)`, where `cols` is the im2col unfolding of the whole
//! batch, built by a custom op whose backward is the matching col2im (a scatter-add). candle's
//! autograd then does the rest with two more GEMMs: `∂W = ∂Y · colsᵀ` and
//! `∂cols = Wᵀ · ∂Y`. All three GEMMs run in candle's multi-threaded `gemm`.
//! Tested against candle's `conv2d` on random shapes with odd sizes, strides and paddings.
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Which kernels compute the standard (non-depthwise) convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvImpl {
    /// im2col + GEMM forward and backward (this module). The default.
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

/// `x (N, C, H, W)` convolved with `w (O, C, kh, kw)` (no groups, no dilation), with zero
/// padding and stride as given: `(N, O, Ho, Wo)`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    Ok(conv2d_with_cols(x, w, stride, padding)?.0)
}

/// [`conv2d`], also returning the im2col matrix `cols (C·kh·kw, N·Ho·Wo)` (DP-SGD computes
/// per-example weight gradients from it, see `dpsgd`).
pub(crate) fn conv2d_with_cols(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<(Tensor, Tensor)> {
    let (n, _, h, wd) = x.dims4()?;
    let (o, c, kh, kw) = w.dims4()?;
    let op = Im2Col {
        kh,
        kw,
        stride,
        padding,
    };
    let (ho, wo) = op.out_hw(h, wd)?;
    let cols = x.contiguous()?.apply_op1(op)?;
    let y = w.reshape((o, c * kh * kw))?.matmul(&cols)?; // (O, N·Ho·Wo)
    Ok((y.reshape((o, n, ho, wo))?.transpose(0, 1)?, cols))
}

/// Unfolds `(N, C, H, W)` into `(C·kh·kw, N·Ho·Wo)`: row `(c, ky, kx)`, column `(n, oy, ox)`.
#[derive(Clone, Copy, Debug)]
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
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

    /// Range of output columns `ox` whose input column `ox·s − p + kx` lies in `0..w`, as
    /// `(first, end)`.
    fn valid(&self, k: usize, len: usize, out_len: usize) -> (usize, usize) {
        let s = self.stride;
        let first = self.padding.saturating_sub(k).div_ceil(s);
        // ox·s + k − p < len  ⇔  ox·s < len + p − k
        let end = (len + self.padding).saturating_sub(k).div_ceil(s).min(out_len);
        (first.min(end), end)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = layout.dims() else {
            candle_core::bail!("im2col expects a 4-d input, got {:?}", layout.dims())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col expects a contiguous input")
        };
        let x = &storage.as_slice::<f32>()?[start..end];
        let (ho, wo) = self.out_hw(h, w)?;
        let (kh, kw, s, p) = (self.kh, self.kw, self.stride, self.padding);
        let row_len = n * ho * wo;
        let mut cols = vec![0f32; c * kh * kw * row_len];
        cols.par_chunks_mut(row_len).enumerate().for_each(|(row, dst)| {
            let (ch, ky, kx) = (row / (kh * kw), row / kw % kh, row % kw);
            let (ox0, ox1) = self.valid(kx, w, wo);
            for b in 0..n {
                let plane = &x[(b * c + ch) * h * w..(b * c + ch + 1) * h * w];
                for oy in 0..ho {
                    let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                        continue;
                    };
                    let src = &plane[iy * w..(iy + 1) * w];
                    let out = &mut dst[(b * ho + oy) * wo..(b * ho + oy + 1) * wo];
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
        });
        Ok((CpuStorage::F32(cols), Shape::from((c * kh * kw, row_len))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let (ho, wo) = self.out_hw(h, w)?;
        let (kh, kw, s, p) = (self.kh, self.kw, self.stride, self.padding);
        let g = grad.contiguous()?;
        let (g_storage, g_layout) = g.storage_and_layout();
        let candle_core::Storage::Cpu(g_cpu) = &*g_storage else {
            candle_core::bail!("im2col backward runs on the CPU only")
        };
        let Some((start, end)) = g_layout.contiguous_offsets() else {
            candle_core::bail!("im2col backward expects a contiguous gradient")
        };
        let gc = &g_cpu.as_slice::<f32>()?[start..end];
        let row_len = n * ho * wo;
        // col2im: each (n, c) input plane sums the columns that read it.
        let mut gx = vec![0f32; n * c * h * w];
        gx.par_chunks_mut(h * w).enumerate().for_each(|(nc, plane)| {
            let (b, ch) = (nc / c, nc % c);
            for ky in 0..kh {
                for kx in 0..kw {
                    let row = &gc[((ch * kh + ky) * kw + kx) * row_len..][..row_len];
                    let (ox0, ox1) = self.valid(kx, w, wo);
                    for oy in 0..ho {
                        let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                            continue;
                        };
                        let src = &row[(b * ho + oy) * wo..(b * ho + oy + 1) * wo];
                        let dst = &mut plane[iy * w..(iy + 1) * w];
                        for ox in ox0..ox1 {
                            dst[ox * s + kx - p] += src[ox];
                        }
                    }
                }
            }
        });
        drop(g_storage);
        Ok(Some(Tensor::from_vec(gx, (n, c, h, w), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        let dev = Device::Cpu;
        // (n, c, h, w, o, k, stride, padding): odd sizes, strides 1-3, paddings 0-2, 1×1 kernels.
        let shapes = [
            (2, 3, 7, 5, 4, 3, 1, 1),
            (1, 4, 8, 8, 6, 3, 2, 1),
            (3, 2, 9, 6, 5, 1, 1, 0),
            (2, 5, 11, 13, 3, 3, 2, 0),
            (1, 3, 10, 7, 2, 5, 3, 2),
            (2, 16, 16, 16, 8, 1, 2, 0),
            (4, 3, 64, 64, 8, 3, 1, 1),
        ];
        for (n, c, h, w, o, k, stride, pad) in shapes {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap()).unwrap();
            let ker = Var::from_tensor(&Tensor::randn(0f32, 1.0, (o, c, k, k), &dev).unwrap()).unwrap();
            let ours = conv2d(x.as_tensor(), ker.as_tensor(), stride, pad).unwrap();
            let theirs = x.as_tensor().conv2d(ker.as_tensor(), pad, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let shape = (n, c, h, w, o, k, stride, pad);
            assert!(max_diff(&ours, &theirs) < 1e-4, "forward {shape:?}");
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &ker] {
                let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .max(1.0);
                assert!(
                    max_diff(a, b) / scale < 1e-4,
                    "gradient {shape:?}: {}",
                    max_diff(a, b)
                );
            }
        }
    }
}
