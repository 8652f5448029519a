//! DP-SGD (Abadi et al. 2016) for every architecture of this crate: per-example gradient clipping
//! to L2 norm C, Gaussian noise of standard deviation σ·C on the sum of the clipped gradients,
//! Poisson sampling with rate q, normalisation by the expected batch size q·N (as Opacus does).
//!
//! # Per-example gradients without per-example backward passes
//! One forward pass in [`Mode::Dp`](crate::Mode::Dp) hands DP-SGD's tap hook (the layers' `Tap`
//! trait, `tap.rs`), for every parameterised layer, its input (for a convolution: the im2col
//! matrix `cols` the forward builds anyway; for GroupNorm: the normalised activations x̂) and its
//! output, which the hook *taps*: a pass-through op whose backward keeps the gradient of the
//! output. Weights are detached in this mode, so the single backward pass of `Σᵢ lossᵢ`
//! computes only activation gradients; the per-example parameter gradients are then formed from
//! (input, output gradient) pairs, as Opacus does for linear and conv layers:
//! - linear `y = x·Wᵀ + b`: `∂W_i = g_i·x_iᵀ` is never materialised: `‖∂W_i‖² = ‖g_i‖²·‖x_i‖²`
//!   (the "ghost norm" of Goodfellow 2015 / Li et al. 2022), and the clipped sum is one GEMM
//!   `(c ⊙ g)ᵀ·x` in f64;
//! - convolution `Y = W·cols`: `∂W_i = G_i·cols_iᵀ` by one batched GEMM (B, O, C·k·k); bias: the
//!   spatial sum of `G_i`;
//! - depthwise convolution: the per-(example, channel) kernel sums of the backward kernel, not
//!   reduced over examples (`depthwise.rs`);
//! - GroupNorm affine: `∂γ_i = Σ_hw x̂·g`, `∂β_i = Σ_hw g`.
//!
//! The per-example norm is the root of the sum of these squared norms over all parameters, the
//! clip factor is `cᵢ = min(1, C/‖gᵢ‖)` (C·(1 − 10⁻⁶) when clipping, the margin `noise.rs` asks for), and the clipped sum
//! `Σᵢ cᵢ·gᵢ` is accumulated in f64 from the per-example f32 values, so its floating-point error
//! is ~10⁻¹⁵ relative, far below the noise lattice step (see `docs/privacy.md`). Because this is
//! "book-keeping" (Bu et al. 2023) rather than Opacus' second backward, a DP step costs one
//! forward, one activation-only backward and the per-example GEMMs.
//!
//! # Noise
//! [`caduceus_privacy::noise::GaussianNoise`]: the clipped sum is rounded to a lattice and
//! exact discrete Gaussian noise is added from a ChaCha20 stream seeded by the operating system
//! (no floating-point sampling, see the privacy crate). Poisson sampling also draws from an
//! OS-seeded ChaCha20 stream, never from the training seed.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use caduceus_dataset::ImageSet;
use caduceus_privacy::noise::GaussianNoise;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, TensorId, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::{ChaCha8Rng, ChaCha20Rng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::model::Model;
pub use crate::spend::{ClipStats, DpSpend};
use crate::tap::{LayerInput, Tap};
use crate::train::{
    ClientStrategy, OptState, TrainConfig, TrainOutcome, batch_tensors, check_data, write_params,
};

/// DP-SGD settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// σ: the noise standard deviation is σ·C.
    pub noise_multiplier: f64,
    /// C: every example's gradient is clipped to this L2 norm.
    pub clip_norm: f64,
    /// q: each example is in each step's batch independently with this probability.
    pub sample_rate: f64,
}

impl DpConfig {
    /// Checks the values, naming the one that is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, v: f64, need: &str| Err(ModelError::Config(format!("DP-SGD {what} {v}: {need}")));
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return bad(
                "noise multiplier",
                self.noise_multiplier,
                "must be a positive number",
            );
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return bad("clip norm", self.clip_norm, "must be a positive number");
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= 1.0) {
            return bad("sample rate", self.sample_rate, "must be in (0, 1]");
        }
        Ok(())
    }
}

enum GradSlot {
    /// The output did not depend on anything tracked (first layer): it became a variable.
    Var(Var),
    /// Filled by the tap's backward.
    Cell(Arc<Mutex<Option<Tensor>>>),
}

struct Record {
    input: LayerInput,
    out: GradSlot,
    out_shape: Vec<usize>,
    weight: TensorId,
    bias: TensorId,
}

/// DP-SGD's [`Tap`]: records every parameterised layer of one tapped forward pass and taps its
/// output.
#[derive(Default)]
struct Tape {
    records: Vec<Record>,
}

/// Pass-through op that keeps the gradient of its output.
struct TapOp {
    cell: Arc<Mutex<Option<Tensor>>>,
}

impl CustomOp1 for TapOp {
    fn name(&self) -> &'static str {
        "dp-tap"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("dp-tap expects a contiguous input")
        };
        let data = storage.as_slice::<f32>()?;
        Ok((CpuStorage::F32(data[a..b].to_vec()), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        *self.cell.lock().expect("tap lock") = Some(grad.detach());
        Ok(Some(grad.clone()))
    }
}

impl Tap for Tape {
    /// Records a parameterised layer (weight `w`, bias `b`) whose output is `y` and returns the
    /// tapped output.
    fn tap(&mut self, y: Tensor, input: LayerInput, w: &Var, b: &Var) -> Result<Tensor> {
        let y = y.contiguous()?;
        let (out, slot) = if y.track_op() {
            let cell = Arc::new(Mutex::new(None));
            (y.apply_op1(TapOp { cell: cell.clone() })?, GradSlot::Cell(cell))
        } else {
            let v = Var::from_tensor(&y)?;
            (v.as_tensor().clone(), GradSlot::Var(v))
        };
        self.records.push(Record {
            input,
            out: slot,
            out_shape: y.dims().to_vec(),
            weight: w.as_tensor().id(),
            bias: b.as_tensor().id(),
        });
        Ok(out)
    }
}

/// Per-example gradient of one parameter.
enum PerExample {
    /// `(B, numel)` row-major, one row per example.
    Dense(Vec<f32>),
    /// `g_i·x_iᵀ` for `g (B, D_out)`, `x (B, D_in)`: a linear layer's weight.
    Outer { g: Tensor, x: Tensor },
}

impl PerExample {
    /// Squared L2 norm of each example's gradient, in f64.
    fn sq_norms(&self, batch: usize) -> Result<Vec<f64>> {
        match self {
            PerExample::Dense(v) => {
                let m = v.len() / batch;
                Ok(v.par_chunks(m.max(1))
                    .map(|row| row.iter().map(|&a| f64::from(a) * f64::from(a)).sum())
                    .collect())
            }
            PerExample::Outer { g, x } => {
                let rows = |t: &Tensor| -> Result<Vec<f64>> {
                    let d = t.dim(1)?;
                    let v = t.flatten_all()?.to_vec1::<f32>()?;
                    Ok(v.chunks(d.max(1))
                        .map(|r| r.iter().map(|&a| f64::from(a) * f64::from(a)).sum())
                        .collect())
                };
                Ok(rows(g)?.into_iter().zip(rows(x)?).map(|(a, b)| a * b).collect())
            }
        }
    }

    /// `Σᵢ cᵢ·gradᵢ` in f64, written into `dst`.
    fn clipped_sum(&self, factors: &[f64], dst: &mut [f64]) -> Result<()> {
        match self {
            PerExample::Dense(v) => {
                let m = dst.len();
                dst.par_iter_mut().enumerate().for_each(|(j, d)| {
                    *d = factors
                        .iter()
                        .enumerate()
                        .map(|(i, &c)| c * f64::from(v[i * m + j]))
                        .sum();
                });
            }
            PerExample::Outer { g, x } => {
                let b = factors.len();
                let c = Tensor::from_slice(factors, (b, 1), g.device())?;
                let gc = g.to_dtype(DType::F64)?.broadcast_mul(&c)?;
                let w = gc.t()?.matmul(&x.to_dtype(DType::F64)?)?; // (D_out, D_in)
                dst.copy_from_slice(&w.flatten_all()?.to_vec1::<f64>()?);
            }
        }
        Ok(())
    }
}

fn dense(t: &Tensor) -> Result<PerExample> {
    Ok(PerExample::Dense(t.flatten_all()?.to_vec1::<f32>()?))
}

/// The per-example gradients of a recorded layer's weight and bias from its output gradient.
fn layer_grads(input: &LayerInput, g: &Tensor) -> Result<(PerExample, PerExample)> {
    let g = g.contiguous()?;
    match input {
        LayerInput::Linear { x } => Ok((
            PerExample::Outer {
                g: g.clone(),
                x: x.clone(),
            },
            dense(&g)?,
        )),
        LayerInput::Conv { cols } => {
            let (b, o, ho, wo) = g.dims4()?;
            let g3 = g.reshape((b, o, ho * wo))?;
            // ∂W_i = G_i · cols_iᵀ: (B, O, P) × (B, P, C·k·k), the transpose a strided view.
            let dw = g3.matmul(&cols.transpose(1, 2)?)?; // (B, O, C·k·k)
            Ok((dense(&dw)?, dense(&g3.sum(2)?)?))
        }
        LayerInput::Depthwise {
            x,
            k,
            stride,
            padding,
        } => {
            let dw = crate::depthwise::per_example_kernel_grads(x, &g, *k, *stride, *padding)?;
            Ok((dense(&dw)?, dense(&g.sum((2, 3))?)?))
        }
        LayerInput::GroupNorm { normed } => {
            let dgamma = (normed * &g)?.sum((2, 3))?;
            Ok((dense(&dgamma)?, dense(&g.sum((2, 3))?)?))
        }
    }
}

/// The result of [`clipped_gradient_sum`].
#[derive(Debug, Clone)]
pub struct ClippedBatch {
    /// `Σᵢ cᵢ·gᵢ` in [`Model::flatten`] order (gradient of the summed, not averaged, loss).
    pub sum: Vec<f64>,
    /// ‖gᵢ‖ of each example before clipping.
    pub norms: Vec<f64>,
    /// The clip factors cᵢ = min(1, C/‖gᵢ‖) (with C·(1 − 10⁻⁶) in place of C when clipping).
    pub factors: Vec<f64>,
    /// Each example's cross-entropy.
    pub losses: Vec<f32>,
}

/// Relative safety margin of the clip factor against f64 rounding in the norms.
const CLIP_MARGIN: f64 = 1e-6;

/// Per-example gradients of the cross-entropy of `model` on `(x, y)`, each clipped to L2 norm
/// `clip_norm`, and their sum: one forward and one (activation-only) backward pass.
pub fn clipped_gradient_sum(model: &Model, x: &Tensor, y: &Tensor, clip_norm: f64) -> Result<ClippedBatch> {
    if !(clip_norm.is_finite() && clip_norm > 0.0) {
        return Err(ModelError::Config(format!(
            "clip norm {clip_norm} must be positive"
        )));
    }
    let batch = x.dim(0)?;
    let p = model.param_count();
    if batch == 0 {
        return Ok(ClippedBatch {
            sum: vec![0.0; p],
            norms: Vec::new(),
            factors: Vec::new(),
            losses: Vec::new(),
        });
    }
    let mut tape = Tape::default();
    let logits = model.forward_tapped(x, &mut tape)?;
    let records = tape.records;
    let log_p = candle_nn::ops::log_softmax(&logits, 1)?;
    let losses = log_p.gather(&y.reshape((batch, 1))?, 1)?.neg()?.reshape(batch)?;
    let loss_values = losses.to_vec1::<f32>()?;
    if let Some(l) = loss_values.iter().find(|l| !l.is_finite()) {
        return Err(ModelError::Diverged { step: 0, loss: *l });
    }
    let grads = losses.sum_all()?.backward()?;

    // Parameter → (offset, numel) in the flat order.
    let mut place: HashMap<TensorId, (usize, usize)> = HashMap::new();
    let mut offset = 0;
    for (spec, var) in model.param_specs().iter().zip(model.vars()) {
        place.insert(var.as_tensor().id(), (offset, spec.numel()));
        offset += spec.numel();
    }
    let mut per_param: Vec<(TensorId, PerExample)> = Vec::with_capacity(2 * records.len());
    for r in &records {
        let g = match &r.out {
            GradSlot::Var(v) => grads.get(v.as_tensor()).cloned(),
            GradSlot::Cell(c) => c.lock().expect("tap lock").take(),
        };
        // A layer whose output does not reach the loss has zero gradient.
        let g = match g {
            Some(g) => g,
            None => Tensor::zeros(r.out_shape.as_slice(), DType::F32, x.device())?,
        };
        let (w, b) = layer_grads(&r.input, &g)?;
        per_param.push((r.weight, w));
        per_param.push((r.bias, b));
    }
    drop(grads);
    if per_param.len() != place.len() {
        return Err(ModelError::Config(format!(
            "DP-SGD recorded {} parameter tensors, the model has {}",
            per_param.len(),
            place.len()
        )));
    }
    let mut sq = vec![0f64; batch];
    for (_, pe) in &per_param {
        for (s, v) in sq.iter_mut().zip(pe.sq_norms(batch)?) {
            *s += v;
        }
    }
    let norms: Vec<f64> = sq.iter().map(|s| s.sqrt()).collect();
    let limit = clip_norm * (1.0 - CLIP_MARGIN);
    let factors: Vec<f64> = norms
        .iter()
        .map(|&n| if n > limit { limit / n } else { 1.0 })
        .collect();
    let mut sum = vec![0f64; p];
    let mut seen = vec![false; model.vars().len()];
    let index: HashMap<TensorId, usize> = model
        .vars()
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_tensor().id(), i))
        .collect();
    for (id, pe) in &per_param {
        let (Some(&(off, n)), Some(&i)) = (place.get(id), index.get(id)) else {
            return Err(ModelError::Config(
                "DP-SGD recorded a tensor that is not a parameter".into(),
            ));
        };
        if std::mem::replace(&mut seen[i], true) {
            return Err(ModelError::Config(format!(
                "parameter {} is used by more than one layer; DP-SGD's per-example norms need one use",
                model.param_specs()[i].name
            )));
        }
        if let PerExample::Dense(v) = pe
            && v.len() != n * batch
        {
            return Err(ModelError::Config(format!(
                "DP-SGD: per-example gradient of {} has {} values, expected {}",
                model.param_specs()[i].name,
                v.len(),
                n * batch
            )));
        }
        pe.clipped_sum(&factors, &mut sum[off..off + n])?;
    }
    Ok(ClippedBatch {
        sum,
        norms,
        factors,
        losses: loss_values,
    })
}

/// One private gradient: [`clipped_gradient_sum`] of the batch, plus `noise`, divided by the
/// expected batch size q·N. An empty batch gives pure noise (it must still be released).
pub fn private_gradient(
    model: &Model,
    x: &Tensor,
    y: &Tensor,
    clip_norm: f64,
    noise: &mut GaussianNoise,
    expected_batch: f64,
) -> Result<(Vec<f32>, ClippedBatch)> {
    let batch = clipped_gradient_sum(model, x, y, clip_norm)?;
    let noisy = noise
        .add_noise(&batch.sum)
        .map_err(|e| ModelError::Config(format!("DP noise: {e}")))?;
    let grad = noisy.iter().map(|v| (v / expected_batch) as f32).collect();
    Ok((grad, batch))
}

/// Steps of a DP-SGD run: `max_steps` if given alone; else `epochs` expected passes,
/// ⌈epochs/q⌉ steps, capped by `max_steps`.
pub fn dp_steps(cfg: &TrainConfig, sample_rate: f64) -> usize {
    let by_epochs = (cfg.epochs as f64 / sample_rate).ceil() as usize;
    match (cfg.epochs, cfg.max_steps) {
        (0, Some(m)) => m,
        (_, Some(m)) => by_epochs.min(m),
        (_, None) => by_epochs,
    }
}

/// [`crate::train_local`] with DP-SGD: each step samples every example independently with
/// probability q (Poisson; the batch size varies), clips each example's gradient to C, adds
/// Gaussian noise σ·C to the sum and divides by q·N. The batch is processed in physical chunks of
/// `cfg.batch_size` examples. FedProx's and SCAFFOLD's corrections and the optimiser are applied
/// to the private gradient (post-processing). The outcome's `privacy` says what was spent.
///
/// `num_examples` (N, the FedAvg weight and the normaliser q·N) is treated as public, as in Opacus.
pub fn train_local_dp(
    model: &mut Model,
    data: &ImageSet,
    cfg: &TrainConfig,
    strategy: ClientStrategy<'_>,
    dp: &DpConfig,
) -> Result<TrainOutcome> {
    check_data(model, data)?;
    crate::alloc::keep_freed_memory();
    dp.validate()?;
    if cfg.batch_size == 0 {
        return Err(ModelError::Config("batch size must be positive".into()));
    }
    if cfg.epochs == 0 && cfg.max_steps.is_none() {
        return Err(ModelError::Config("give epochs or max steps".into()));
    }
    let start = Instant::now();
    let p = model.param_count();
    let w_global = model.flatten()?;
    let correction = crate::train::strategy_correction(strategy, p)?;
    let mut noise = GaussianNoise::new(dp.clip_norm, dp.noise_multiplier, p)
        .map_err(|e| ModelError::Config(format!("DP noise: {e}")))?;
    let mut sampler = ChaCha20Rng::try_from_os_rng()
        .map_err(|e| ModelError::Config(format!("no OS randomness for Poisson sampling: {e}")))?;
    // Flips only: data-independent, may be seeded.
    let mut flip_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let n = data.len();
    let expected_batch = dp.sample_rate * n as f64;
    let total_steps = dp_steps(cfg, dp.sample_rate);
    let mut w = w_global.clone();
    let mut opt = OptState::new(cfg.optimizer, p);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let (mut seen, mut loss_sum) = (0usize, 0f64);
    let mut sampled = Vec::new();
    let (mut all_norms, mut clipped) = (Vec::new(), 0usize);
    for step in 0..total_steps {
        sampled.clear();
        sampled.extend((0..n).filter(|_| sampler.random_bool(dp.sample_rate)));
        let mut sum = vec![0f64; p];
        for chunk in sampled.chunks(cfg.batch_size) {
            let flip: Option<&mut dyn rand::RngCore> = if cfg.augment { Some(&mut flip_rng) } else { None };
            data.fill_batch(chunk, flip, &mut images, &mut labels);
            let (x, y) = batch_tensors(data, &images, &labels)?;
            let part = clipped_gradient_sum(model, &x, &y, dp.clip_norm).map_err(|e| match e {
                ModelError::Diverged { loss, .. } => ModelError::Diverged { step, loss },
                e => e,
            })?;
            for (s, v) in sum.iter_mut().zip(&part.sum) {
                *s += v;
            }
            loss_sum += part.losses.iter().map(|&l| f64::from(l)).sum::<f64>();
            clipped += part.factors.iter().filter(|&&f| f < 1.0).count();
            all_norms.extend_from_slice(&part.norms);
        }
        seen += sampled.len();
        let noisy = noise
            .add_noise(&sum)
            .map_err(|e| ModelError::Config(format!("DP noise: {e}")))?;
        let mut grad: Vec<f32> = noisy.iter().map(|v| (v / expected_batch) as f32).collect();
        crate::train::apply_strategy(strategy, correction.as_deref(), &mut grad, &w, &w_global);
        opt.step(&mut w, &grad);
        write_params(model, &w)?;
    }
    let control = crate::train::scaffold_outcome(strategy, &w_global, &w, total_steps, cfg.optimizer.lr());
    let mean_loss = if seen == 0 {
        f32::NAN
    } else {
        (loss_sum / seen as f64) as f32
    };
    Ok(TrainOutcome {
        steps: total_steps,
        num_examples: n,
        examples_seen: seen,
        mean_loss,
        last_epoch_loss: mean_loss,
        params: w,
        control,
        seconds: start.elapsed().as_secs_f64(),
        privacy: Some(DpSpend {
            noise_multiplier: dp.noise_multiplier,
            sample_rate: dp.sample_rate,
            steps: total_steps,
            clip_norm: dp.clip_norm,
            noise_std: noise.noise_std(),
            mean_batch: if total_steps == 0 {
                0.0
            } else {
                seen as f64 / total_steps as f64
            },
            clipping: ClipStats::from_norms(&mut all_norms, clipped),
        }),
    })
}
