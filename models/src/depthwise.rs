//! Depthwise convolution (one k×k filter per channel, `groups == channels`) as a candle custom op.
//!
//! candle runs a grouped convolution as one convolution per group and concatenates the results,
//! which for a depthwise layer of 256 channels means 256 tiny convolutions forward and backward.
//! This op computes the same thing directly, parallel over (example, channel) planes, with a
//! hand-written backward pass (tested against candle's grouped convolution).
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// `x (N, C, H, W)` convolved with `w (C, 1, k, k)`, stride and zero padding as given.
pub fn depthwise_conv(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    Ok(x.apply_op2(&w, Depthwise { stride, padding })?)
}

/// Per-example kernel gradients of [`depthwise_conv`] for DP-SGD: `x (N, C, H, W)` and the
/// gradient of the output `g (N, C, Ho, Wo)` give `(N, C, k, k)`, where entry `n` is the kernel
/// gradient of example `n` alone (the same sums as the backward pass, not reduced over `n`).
pub(crate) fn per_example_kernel_grads(
    x: &Tensor,
    g: &Tensor,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = Depthwise { stride, padding };
    let (n, c, _, _) = x.dims4()?;
    let d = op.dims(x.dims(), &[c, 1, k, k])?;
    if g.dims() != [d.n, d.c, d.ho, d.wo] {
        return Err(crate::error::ModelError::Config(format!(
            "depthwise per-example gradients: output gradient {:?} does not fit input {:?}",
            g.dims(),
            x.dims()
        )));
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let gs = g.flatten_all()?.to_vec1::<f32>()?;
    let (plane_in, plane_out, kk) = (d.h * d.w, d.ho * d.wo, k * k);
    let mut out = vec![0f32; n * c * kk];
    out.par_chunks_mut(kk).enumerate().for_each(|(nc, gw)| {
        let src = &xs[nc * plane_in..(nc + 1) * plane_in];
        let gp = &gs[nc * plane_out..(nc + 1) * plane_out];
        for oy in 0..d.ho {
            for ky in 0..k {
                let Some(iy) = op.src(oy, ky, d.h) else { continue };
                for kx in 0..k {
                    let mut acc = 0f32;
                    for ox in 0..d.wo {
                        if let Some(ix) = op.src(ox, kx, d.w) {
                            acc += gp[oy * d.wo + ox] * src[iy * d.w + ix];
                        }
                    }
                    gw[ky * k + kx] += acc;
                }
            }
        }
    });
    Ok(Tensor::from_vec(out, (n, c, k, k), x.device())?)
}

#[derive(Clone, Copy)]
struct Depthwise {
    stride: usize,
    padding: usize,
}

struct Dims {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    ho: usize,
    wo: usize,
}

impl Depthwise {
    fn dims(&self, x: &[usize], w: &[usize]) -> candle_core::Result<Dims> {
        let (&[n, c, h, wd], &[wc, one, k, k2]) = (x, w) else {
            candle_core::bail!("depthwise conv expects 4-d input and kernel, got {x:?} and {w:?}")
        };
        if wc != c || one != 1 || k != k2 || h + 2 * self.padding < k || wd + 2 * self.padding < k {
            candle_core::bail!("depthwise conv: input {x:?} does not fit kernel {w:?}")
        }
        Ok(Dims {
            n,
            c,
            h,
            w: wd,
            k,
            ho: (h + 2 * self.padding - k) / self.stride + 1,
            wo: (wd + 2 * self.padding - k) / self.stride + 1,
        })
    }

    /// Input coordinate of output `o` and kernel tap `t`, if inside the image.
    #[inline]
    fn src(&self, o: usize, t: usize, len: usize) -> Option<usize> {
        (o * self.stride + t)
            .checked_sub(self.padding)
            .filter(|&i| i < len)
    }
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.dims(), l2.dims())?;
        let x = crate::cpu::contiguous(s1, l1, "depthwise conv input")?;
        let w = crate::cpu::contiguous(s2, l2, "depthwise conv weight")?;
        let plane_in = d.h * d.w;
        let plane_out = d.ho * d.wo;
        let mut out = vec![0f32; d.n * d.c * plane_out];
        out.par_chunks_mut(plane_out).enumerate().for_each(|(nc, dst)| {
            let c = nc % d.c;
            let src = &x[nc * plane_in..(nc + 1) * plane_in];
            let ker = &w[c * d.k * d.k..(c + 1) * d.k * d.k];
            for oy in 0..d.ho {
                for ky in 0..d.k {
                    let Some(iy) = self.src(oy, ky, d.h) else { continue };
                    let row = &src[iy * d.w..(iy + 1) * d.w];
                    let out_row = &mut dst[oy * d.wo..(oy + 1) * d.wo];
                    for kx in 0..d.k {
                        let kv = ker[ky * d.k + kx];
                        for (ox, o) in out_row.iter_mut().enumerate() {
                            if let Some(ix) = self.src(ox, kx, d.w) {
                                *o += kv * row[ix];
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((d.n, d.c, d.ho, d.wo))))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(arg1.dims(), arg2.dims())?;
        let x = arg1.flatten_all()?.to_vec1::<f32>()?;
        let w = arg2.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let plane_in = d.h * d.w;
        let plane_out = d.ho * d.wo;
        let kk = d.k * d.k;
        // Input gradient and per-plane kernel gradient, one plane at a time.
        let mut gx = vec![0f32; d.n * d.c * plane_in];
        let mut gw_planes = vec![0f32; d.n * d.c * kk];
        gx.par_chunks_mut(plane_in)
            .zip(gw_planes.par_chunks_mut(kk))
            .enumerate()
            .for_each(|(nc, (gx_plane, gw_plane))| {
                let c = nc % d.c;
                let src = &x[nc * plane_in..(nc + 1) * plane_in];
                let gp = &g[nc * plane_out..(nc + 1) * plane_out];
                let ker = &w[c * kk..(c + 1) * kk];
                for oy in 0..d.ho {
                    for ky in 0..d.k {
                        let Some(iy) = self.src(oy, ky, d.h) else { continue };
                        for kx in 0..d.k {
                            let kv = ker[ky * d.k + kx];
                            let mut acc = 0f32;
                            for ox in 0..d.wo {
                                if let Some(ix) = self.src(ox, kx, d.w) {
                                    let go = gp[oy * d.wo + ox];
                                    gx_plane[iy * d.w + ix] += go * kv;
                                    acc += go * src[iy * d.w + ix];
                                }
                            }
                            gw_plane[ky * d.k + kx] += acc;
                        }
                    }
                }
            });
        let mut gw = vec![0f32; d.c * kk];
        for (nc, plane) in gw_planes.chunks(kk).enumerate() {
            let c = nc % d.c;
            for (a, b) in gw[c * kk..(c + 1) * kk].iter_mut().zip(plane) {
                *a += b;
            }
        }
        let dev = arg1.device();
        Ok((
            Some(Tensor::from_vec(gx, arg1.shape(), dev)?),
            Some(Tensor::from_vec(gw, arg2.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn matches_candle_grouped_conv_forward_and_backward() {
        let dev = Device::Cpu;
        for (n, c, h, w, k, stride, pad) in [
            (2, 3, 7, 5, 3, 1, 1),
            (1, 4, 8, 8, 3, 2, 1),
            (3, 2, 6, 9, 1, 1, 0),
            (1, 2, 5, 5, 3, 2, 0),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap()).unwrap();
            let ker = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap()).unwrap();
            let ours = depthwise_conv(x.as_tensor(), ker.as_tensor(), stride, pad).unwrap();
            let theirs = x.as_tensor().conv2d(ker.as_tensor(), pad, stride, 1, c).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "forward differs by {diff}");
            // Weight the outputs so that the gradients are not all ones.
            let r = Tensor::randn(0f32, 1.0, ours.dims(), &dev).unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &ker] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                let diff = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    diff < 1e-4,
                    "gradient differs by {diff} for {:?}",
                    (n, c, h, w, k, stride, pad)
                );
            }
        }
    }
}
