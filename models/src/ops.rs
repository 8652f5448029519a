//! The non-convolution layers of the models as fused CPU kernels (candle custom ops with their
//! backward): ReLU, a residual add with its ReLU, 2×2 max-pooling and GroupNorm (with an
//! optional fused ReLU).
//!
//! candle composes these from generic element-wise ops, each a single-threaded pass that
//! allocates its result, and its backward materialises every intermediate gradient (GroupNorm
//! alone is about ten nodes; the max-pool backward upsamples and compares). Each op here is one
//! parallel pass forward and one backward (`docs/benchmarks.md`, "Profile of a training step").
//! Tested against candle's compositions.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{contiguous, lane_sum, with_f32};
use crate::error::Result;

/// Elements per rayon task in the element-wise passes.
const CHUNK: usize = 1 << 14;

/// `max(x, 0)`; the backward passes the gradient where the output is positive.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Relu)?)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, "relu input")?;
        // SAFETY: the chunks of `y` and `x` pair up one to one, and every element is written.
        let y = unsafe {
            crate::cpu::uninit_vec(x.len(), |y| {
                y.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .for_each(|(y, x)| {
                        for (y, &x) in y.iter_mut().zip(x) {
                            y.write(x.max(0.0));
                        }
                    })
            })
        };
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        Ok(Some(masked_grad(res, grad)?))
    }
}

/// 2×2 max-pooling with stride 2 of `(N, C, H, W)` (odd trailing rows and columns dropped, as
/// candle's `max_pool2d(2)`). The backward routes each gradient to the first maximum of its
/// window (as PyTorch does).
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(MaxPool)?)
}

struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = l.dims() else {
            candle_core::bail!("max-pool expects a 4-d input, got {:?}", l.dims())
        };
        let x = contiguous(s, l, "max-pool input")?;
        let (ho, wo) = (h / 2, w / 2);
        let mut y = vec![0f32; n * c * ho * wo];
        if ho * wo > 0 {
            y.par_chunks_mut(ho * wo).enumerate().for_each(|(plane, out)| {
                let src = &x[plane * h * w..(plane + 1) * h * w];
                for oy in 0..ho {
                    let (r0, r1) = (&src[2 * oy * w..], &src[(2 * oy + 1) * w..]);
                    for ox in 0..wo {
                        let i = 2 * ox;
                        out[oy * wo + ox] = r0[i].max(r0[i + 1]).max(r1[i].max(r1[i + 1]));
                    }
                }
            });
        }
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let (_, _, h, w) = arg.dims4()?;
        let (ho, wo) = (h / 2, w / 2);
        let dx = with_f32(arg, |x| {
            with_f32(res, |y| {
                with_f32(grad, |g| {
                    let mut dx = vec![0f32; x.len()];
                    if ho * wo == 0 {
                        return Ok(dx);
                    }
                    dx.par_chunks_mut(h * w).enumerate().for_each(|(plane, d)| {
                        let src = &x[plane * h * w..(plane + 1) * h * w];
                        let (ys, gs) = (&y[plane * ho * wo..], &g[plane * ho * wo..]);
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let (m, gv) = (ys[oy * wo + ox], gs[oy * wo + ox]);
                                let at = [
                                    2 * oy * w + 2 * ox,
                                    2 * oy * w + 2 * ox + 1,
                                    (2 * oy + 1) * w + 2 * ox,
                                    (2 * oy + 1) * w + 2 * ox + 1,
                                ];
                                let i = at.into_iter().find(|&i| src[i] == m).unwrap_or(at[0]);
                                d[i] = gv;
                            }
                        }
                    });
                    Ok(dx)
                })
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.dims(), arg.device())?))
    }
}

/// `max(a + b, 0)` for two tensors of one shape (a residual connection and its ReLU), one op.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(crate::error::ModelError::Config(format!(
            "add-relu: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (
            contiguous(s1, l1, "add-relu input")?,
            contiguous(s2, l2, "add-relu input")?,
        );
        let mut y = Vec::with_capacity(a.len());
        a.par_iter()
            .zip(b.par_iter())
            .with_min_len(CHUNK)
            .map(|(&a, &b)| (a + b).max(0.0))
            .collect_into_vec(&mut y);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = masked_grad(res, grad)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// The gradient where the ReLU output `y` is positive, else 0.
fn masked_grad(y: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    let dx = with_f32(y, |y| {
        with_f32(grad, |g| {
            let mut dx = Vec::with_capacity(y.len());
            y.par_iter()
                .zip(g.par_iter())
                .with_min_len(CHUNK)
                .map(|(&y, &g)| if y > 0.0 { g } else { 0.0 })
                .collect_into_vec(&mut dx);
            Ok(dx)
        })
    })?;
    Tensor::from_vec(dx, y.dims(), y.device())
}

/// GroupNorm of `x (N, C, H, W)` with `groups` groups: each (example, group) normalised to
/// zero mean and unit variance (biased, plus `eps`), then scaled by `gamma (C)` and shifted by
/// `beta (C)`; with `relu`, followed by a ReLU in the same op. Statistics are summed in f64
/// blocks (see `lane_sum`).
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if groups == 0 || !c.is_multiple_of(groups) || gamma.dims() != [c] || beta.dims() != [c] {
        return Err(crate::error::ModelError::Config(format!(
            "group norm: {c} channels, {groups} groups, scale {:?} and shift {:?} do not fit",
            gamma.dims(),
            beta.dims()
        )));
    }
    let op = GroupNorm { groups, eps, relu };
    Ok(x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?)
}

/// `x̂ = (x − mean) / √(var + eps)` per (example, group), without the affine map and without
/// autograd: what DP-SGD records for the per-example gradients of the scale.
pub(crate) fn group_normalize(x: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let op = GroupNorm {
        groups,
        eps,
        relu: false,
    };
    let per_group = c / groups * h * w;
    let mut out = vec![0f32; n * c * h * w];
    with_f32(x, |xs| {
        out.par_chunks_mut(per_group.max(1))
            .zip(xs.par_chunks(per_group.max(1)))
            .for_each(|(o, x)| {
                let (mean, rstd) = op.stats(x);
                let (m, r) = (mean as f32, rstd as f32);
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = (v - m) * r;
                }
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, (n, c, h, w), x.device())?)
}

struct GroupNorm {
    groups: usize,
    eps: f64,
    relu: bool,
}

impl GroupNorm {
    /// Mean and 1/√(var + eps) of one group (two passes: the variance of centred values).
    fn stats(&self, x: &[f32]) -> (f64, f64) {
        let len = x.len().max(1) as f64;
        let mean = lane_sum(x, x, |a, _| a) / len;
        let m = mean as f32;
        let var = lane_sum(x, x, |a, _| (a - m) * (a - m)) / len;
        (mean, 1.0 / (var + self.eps).sqrt())
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[n, c, h, w] = xl.dims() else {
            candle_core::bail!("group norm expects a 4-d input, got {:?}", xl.dims())
        };
        let x = contiguous(xs, xl, "group norm input")?;
        let (gamma, beta) = (
            contiguous(gs, gl, "group norm scale")?,
            contiguous(bs, bl, "group norm shift")?,
        );
        let (cg, hw) = (c / self.groups, h * w);
        if cg * hw == 0 {
            return Ok((CpuStorage::F32(Vec::new()), xl.shape().clone()));
        }
        // SAFETY: one chunk per (example, group), each written whole below.
        let y = unsafe {
            crate::cpu::uninit_vec(n * c * hw, |y| {
                y.par_chunks_mut(cg * hw).enumerate().for_each(|(ng, out)| {
                    let src = &x[ng * cg * hw..(ng + 1) * cg * hw];
                    let (mean, rstd) = self.stats(src);
                    let c0 = (ng % self.groups) * cg;
                    for (j, (o, s)) in out.chunks_mut(hw).zip(src.chunks(hw)).enumerate() {
                        // Centre first: folding the mean into the shift would cancel
                        // catastrophically when the variance is small against the mean.
                        let (m, a, b) = (
                            mean as f32,
                            (rstd * f64::from(gamma[c0 + j])) as f32,
                            beta[c0 + j],
                        );
                        if self.relu {
                            for (o, &v) in o.iter_mut().zip(s) {
                                o.write(((v - m) * a + b).max(0.0));
                            }
                        } else {
                            for (o, &v) in o.iter_mut().zip(s) {
                                o.write((v - m) * a + b);
                            }
                        }
                    }
                })
            })
        };
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let (cg, hw) = (c / self.groups, h * w);
        let need_dx = x.track_op();
        let need_affine = gamma.track_op() || beta.track_op();
        if (!need_dx && !need_affine) || cg * hw == 0 {
            return Ok((None, None, None));
        }
        // Through the fused ReLU first: the gradient of the affine output.
        let grad = if self.relu {
            masked_grad(res, grad)?
        } else {
            grad.clone()
        };
        let mut dx = vec![0f32; if need_dx { n * c * hw } else { 0 }];
        // Per (example, channel): Σ ∂y·x̂ and Σ ∂y, reduced over examples afterwards.
        let mut sums = vec![[0f64; 2]; n * c];
        with_f32(x, |xs| {
            with_f32(gamma, |gm| {
                with_f32(&grad, |gd| {
                    let work = |ng: usize, dxg: Option<&mut [f32]>, sums: &mut [[f64; 2]]| {
                        let src = &xs[ng * cg * hw..(ng + 1) * cg * hw];
                        let gsrc = &gd[ng * cg * hw..(ng + 1) * cg * hw];
                        let (mean, rstd) = self.stats(src);
                        let m = mean as f32;
                        let c0 = (ng % self.groups) * cg;
                        // Σ ∂x̂ and Σ ∂x̂·x̂ over the group, with ∂x̂ = ∂y·γ.
                        let (mut s1, mut s2) = (0f64, 0f64);
                        for (j, (s, g)) in src.chunks(hw).zip(gsrc.chunks(hw)).enumerate() {
                            let sg = lane_sum(g, g, |g, _| g);
                            let sgx = lane_sum(s, g, |v, g| (v - m) * g) * rstd;
                            sums[j] = [sgx, sg];
                            s1 += sg * f64::from(gm[c0 + j]);
                            s2 += sgx * f64::from(gm[c0 + j]);
                        }
                        if let Some(dxg) = dxg {
                            // ∂x = rstd·(γ·∂y − mean(∂x̂) − x̂·mean(∂x̂·x̂)), as a·∂y + b·(x − m) + c.
                            let len = (cg * hw) as f64;
                            let (m1, m2) = (s1 / len, s2 / len);
                            let b = (-rstd * rstd * m2) as f32;
                            let cst = (-rstd * m1) as f32;
                            for (j, ((d, s), g)) in dxg
                                .chunks_mut(hw)
                                .zip(src.chunks(hw))
                                .zip(gsrc.chunks(hw))
                                .enumerate()
                            {
                                let a = (rstd * f64::from(gm[c0 + j])) as f32;
                                for ((d, &v), &gv) in d.iter_mut().zip(s).zip(g) {
                                    *d = a * gv + b * (v - m) + cst;
                                }
                            }
                        }
                    };
                    if need_dx {
                        dx.par_chunks_mut(cg * hw)
                            .zip(sums.par_chunks_mut(cg))
                            .enumerate()
                            .for_each(|(ng, (d, s))| work(ng, Some(d), s));
                    } else {
                        sums.par_chunks_mut(cg)
                            .enumerate()
                            .for_each(|(ng, s)| work(ng, None, s));
                    }
                    Ok(())
                })
            })
        })?;
        let dev = x.device();
        let dx = if need_dx {
            Some(Tensor::from_vec(dx, x.dims(), dev)?)
        } else {
            None
        };
        if !need_affine {
            return Ok((dx, None, None));
        }
        let mut dgamma = vec![0f64; c];
        let mut dbeta = vec![0f64; c];
        for row in sums.chunks(c) {
            for (j, [sgx, sg]) in row.iter().enumerate() {
                dgamma[j] += sgx;
                dbeta[j] += sg;
            }
        }
        let f32s = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        Ok((
            dx,
            Some(Tensor::from_vec(f32s(dgamma), c, dev)?),
            Some(Tensor::from_vec(f32s(dbeta), c, dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;

    use crate::cpu::testing::max_rel_diff;

    /// Checks `ours` against `theirs` forward and through backward with a random cotangent, for
    /// every variable in `vars`.
    fn check(ours: &Tensor, theirs: &Tensor, vars: &[&Var], what: &str) {
        assert_eq!(ours.dims(), theirs.dims(), "{what}");
        assert!(max_rel_diff(ours, theirs) < 1e-5, "{what} forward");
        let r = Tensor::randn(0f32, 1.0, ours.dims(), &Device::Cpu).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in vars {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(
                max_rel_diff(a, b) < 1e-4,
                "{what} gradient: {}",
                max_rel_diff(a, b)
            );
        }
    }

    fn var(shape: &[usize]) -> Var {
        Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn relu_matches_candle() {
        for shape in [[3, 5, 7, 9], [1, 1, 1, 1], [4, 8, 33, 17]] {
            let x = var(&shape);
            check(
                &relu(x.as_tensor()).unwrap(),
                &x.as_tensor().relu().unwrap(),
                &[&x],
                "relu",
            );
        }
    }

    #[test]
    fn add_relu_matches_candle() {
        let (a, b) = (var(&[3, 4, 9, 7]), var(&[3, 4, 9, 7]));
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        check(
            &add_relu(a.as_tensor(), b.as_tensor()).unwrap(),
            &theirs,
            &[&a, &b],
            "add-relu",
        );
        assert!(add_relu(a.as_tensor(), &a.as_tensor().narrow(3, 0, 6).unwrap()).is_err());
    }

    #[test]
    fn max_pool_matches_candle_on_even_and_odd_sizes() {
        for shape in [[2, 3, 8, 8], [1, 4, 7, 9], [3, 2, 64, 64], [1, 1, 3, 5]] {
            let x = var(&shape);
            // The reference is a max over each window as a reduction, whose backward routes
            // the gradient to the maximum. candle's own `max_pool2d` backward is not usable: it
            // scales the gradient by the share of window entries equal to the maximum (¼) where
            // it should divide by their count, and it upsamples to odd sizes inexactly.
            let [n, c, h, w] = shape;
            let (ho, wo) = (h / 2, w / 2);
            let even = x
                .as_tensor()
                .narrow(2, 0, 2 * ho)
                .unwrap()
                .narrow(3, 0, 2 * wo)
                .unwrap();
            let theirs = even
                .reshape((n, c, ho, 2, wo, 2))
                .unwrap()
                .permute((0, 1, 2, 4, 3, 5))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((n, c, ho, wo, 4))
                .unwrap()
                .max(D::Minus1)
                .unwrap();
            check(&max_pool2x2(x.as_tensor()).unwrap(), &theirs, &[&x], "max-pool");
        }
    }

    #[test]
    fn max_pool_sends_a_tied_gradient_to_one_input() {
        let x =
            Var::from_tensor(&Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        let g = max_pool2x2(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let dx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(dx, [1.0, 0.0, 0.0, 0.0]);
    }

    /// GroupNorm as `arch.rs` composed it from candle ops before this kernel.
    fn candle_group_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, groups: usize) -> Tensor {
        let (n, c, h, w) = x.dims4().unwrap();
        let g = x.reshape((n, groups, (c / groups) * h * w)).unwrap();
        let mean = g.mean_keepdim(D::Minus1).unwrap();
        let centered = g.broadcast_sub(&mean).unwrap();
        let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = centered
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .reshape((n, c, h, w))
            .unwrap();
        normed
            .broadcast_mul(&gamma.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    #[test]
    fn group_norm_matches_candle() {
        for (n, c, h, w, groups) in [
            (2, 8, 5, 7, 4),
            (3, 16, 16, 16, 8),
            (1, 6, 3, 3, 3),
            (4, 5, 9, 2, 1),
            // Groups of six values on a 1×3 map. (Groups of one or two values are degenerate:
            // x̂ is constant (0 or ±1), the true input gradient is ~0 and both implementations
            // return f32 rounding noise of the cancelling terms, up to 10⁻⁴.)
            (2, 8, 1, 3, 4),
        ] {
            let (x, gamma, beta) = (var(&[n, c, h, w]), var(&[c]), var(&[c]));
            // Shift and scale the input so that the mean and variance matter.
            let xs = ((x.as_tensor() * 3.0).unwrap() + 5.0).unwrap();
            for relu in [false, true] {
                let ours = group_norm(&xs, gamma.as_tensor(), beta.as_tensor(), groups, 1e-5, relu).unwrap();
                let mut theirs = candle_group_norm(&xs, gamma.as_tensor(), beta.as_tensor(), groups);
                if relu {
                    theirs = theirs.relu().unwrap();
                }
                let what = format!("group norm {:?} relu {relu}", (n, c, h, w, groups));
                check(&ours, &theirs, &[&x, &gamma, &beta], &what);
            }
            let normed = group_normalize(&xs, groups, 1e-5).unwrap();
            let ones = Tensor::ones(c, candle_core::DType::F32, &Device::Cpu).unwrap();
            let zeros = Tensor::zeros(c, candle_core::DType::F32, &Device::Cpu).unwrap();
            let want = candle_group_norm(&xs, &ones, &zeros, groups);
            assert!(max_rel_diff(&normed, &want) < 1e-5);
        }
    }
}
