//! Local training (the client side of FedAvg, FedProx and SCAFFOLD) and evaluation.
use std::time::Instant;

use caduceus_dataset::ImageSet;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arch::{Arch, Mode};
use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::spend::DpSpend;

/// The optimiser of local training. A fresh optimiser state is used for every call to
/// [`train_local`] (every round), as is usual in federated learning.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Optimizer {
    /// SGD with heavy-ball momentum (PyTorch's formulation) and L2 weight decay added to the
    /// gradient.
    Sgd {
        lr: f32,
        momentum: f32,
        weight_decay: f32,
    },
    /// AdamW (decoupled weight decay), as in PyTorch.
    AdamW {
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
}

impl Optimizer {
    /// AdamW with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn adamw(lr: f32) -> Self {
        Optimizer::AdamW {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }

    /// SGD with the given momentum and no weight decay.
    pub fn sgd(lr: f32, momentum: f32) -> Self {
        Optimizer::Sgd {
            lr,
            momentum,
            weight_decay: 0.0,
        }
    }

    pub fn lr(&self) -> f32 {
        match *self {
            Optimizer::Sgd { lr, .. } | Optimizer::AdamW { lr, .. } => lr,
        }
    }
}

impl Default for Optimizer {
    /// AdamW, lr 1e-3: the setup of issue 9.
    fn default() -> Self {
        Optimizer::adamw(1e-3)
    }
}

/// Settings of one call to [`train_local`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the local data. With `max_steps` set as well, training stops at whichever
    /// comes first; `epochs: 0` with `max_steps` trains for exactly that many steps.
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub batch_size: usize,
    pub optimizer: Optimizer,
    /// Seeds the shuffling and the augmentation.
    pub seed: u64,
    /// Random horizontal flips.
    pub augment: bool,
}

impl Default for TrainConfig {
    /// One epoch, batch 64, AdamW lr 1e-3, flips on.
    fn default() -> Self {
        TrainConfig {
            epochs: 1,
            max_steps: None,
            batch_size: 64,
            optimizer: Optimizer::default(),
            seed: 0,
            augment: true,
        }
    }
}

/// What the client does on top of plain local training. `w_global` is always the model's
/// parameters at the start of [`train_local`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClientStrategy<'a> {
    /// Plain local SGD (FedAvg's client).
    FedAvg,
    /// FedProx: adds the proximal term mu/2·‖w − w_global‖² to the loss, i.e. mu·(w − w_global)
    /// to every gradient.
    FedProx { mu: f32 },
    /// SCAFFOLD (Karimireddy et al. 2020, option II): every gradient is corrected by
    /// `− c_i + c`, and the outcome carries `c_i⁺ = c_i − c + (w_global − w_local)/(K·lr)`
    /// with K the local steps taken and lr the optimiser's learning rate. The formula assumes
    /// plain SGD (momentum 0); with another optimiser it is only an approximation.
    Scaffold {
        /// The server's control variate c (all zeros in the first round).
        global_control: &'a [f32],
        /// This client's control variate c_i (all zeros in the first round).
        local_control: &'a [f32],
    },
}

/// SCAFFOLD's client output.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlUpdate {
    /// The new client control variate c_i⁺ (kept by the client for the next round).
    pub local_control: Vec<f32>,
    /// c_i⁺ − c_i, sent to the server.
    pub delta: Vec<f32>,
}

/// The result of [`train_local`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// Optimiser steps taken (K).
    pub steps: usize,
    /// Distinct local training examples: the weight of this update in FedAvg.
    pub num_examples: usize,
    /// Examples processed, counting repeats over epochs (sum of batch sizes).
    pub examples_seen: usize,
    /// Mean training loss over all steps, weighted by batch size (without the proximal term).
    pub mean_loss: f32,
    /// Mean training loss of the last epoch (or of all steps if less than one epoch ran).
    pub last_epoch_loss: f32,
    /// The new local parameters (also loaded into the model), in [`Model::flatten`] order.
    pub params: Vec<f32>,
    /// SCAFFOLD only.
    pub control: Option<ControlUpdate>,
    /// Wall time of training.
    pub seconds: f64,
    /// DP-SGD only ([`crate::train_local_dp`]): what the run spent.
    pub privacy: Option<DpSpend>,
}

impl TrainOutcome {
    /// Training throughput: examples processed per second (forward, backward and optimiser).
    pub fn images_per_second(&self) -> f64 {
        self.examples_seen as f64 / self.seconds.max(1e-9)
    }
}

pub(crate) fn check_data(model: &Model, data: &ImageSet) -> Result<()> {
    if data.is_empty() {
        return Err(ModelError::Config("the dataset is empty".into()));
    }
    if data.num_classes() != model.num_classes() {
        return Err(ModelError::Config(format!(
            "task '{}' has {} classes but the model has {}",
            data.task,
            data.num_classes(),
            model.num_classes()
        )));
    }
    if model.arch() == Arch::SmallCnn && (data.height, data.width) != (64, 64) {
        return Err(ModelError::Config(format!(
            "small-cnn needs 64×64 images, got {}×{}",
            data.height, data.width
        )));
    }
    Ok(())
}

pub(crate) fn batch_tensors(data: &ImageSet, images: &[f32], labels: &[u32]) -> Result<(Tensor, Tensor)> {
    let n = labels.len();
    let x = Tensor::from_slice(images, (n, 3, data.height, data.width), &Device::Cpu)?;
    let y = Tensor::from_slice(labels, n, &Device::Cpu)?;
    Ok((x, y))
}

/// Trains `model` on `data` in place and returns what the client sends (see [`TrainOutcome`]).
///
/// Each epoch visits the examples in a fresh seeded order in batches of `batch_size` (the last
/// batch may be smaller). The loss is the mean cross-entropy of the batch. A non-finite loss stops
/// training with [`ModelError::Diverged`].
pub fn train_local(
    model: &mut Model,
    data: &ImageSet,
    cfg: &TrainConfig,
    strategy: ClientStrategy<'_>,
) -> Result<TrainOutcome> {
    check_data(model, data)?;
    crate::alloc::keep_freed_memory();
    if cfg.batch_size == 0 {
        return Err(ModelError::Config("batch size must be positive".into()));
    }
    if cfg.epochs == 0 && cfg.max_steps.is_none() {
        return Err(ModelError::Config("give epochs or max steps".into()));
    }
    let start = Instant::now();
    let p = model.param_count();
    let w_global = model.flatten()?;
    if let ClientStrategy::Scaffold {
        global_control,
        local_control,
    } = strategy
        && (global_control.len() != p || local_control.len() != p)
    {
        return Err(ModelError::Config(format!(
            "SCAFFOLD control variates have {} and {} values, the model {p}",
            global_control.len(),
            local_control.len()
        )));
    }
    // c − c_i, added to every gradient.
    let correction: Option<Vec<f32>> = match strategy {
        ClientStrategy::Scaffold {
            global_control,
            local_control,
        } => Some(
            global_control
                .iter()
                .zip(local_control)
                .map(|(c, ci)| c - ci)
                .collect(),
        ),
        _ => None,
    };
    let mut w = w_global.clone();
    let mut grad = vec![0f32; p];
    let mut opt = OptState::new(cfg.optimizer, p);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = (0..data.len()).collect();
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let (mut steps, mut seen, mut loss_sum) = (0usize, 0usize, 0f64);
    let (mut epoch_loss, mut epoch_seen) = (0f64, 0usize);
    let mut epoch = 0;
    'training: while cfg.epochs == 0 || epoch < cfg.epochs {
        order.shuffle(&mut rng);
        epoch_loss = 0.0;
        epoch_seen = 0;
        for batch in order.chunks(cfg.batch_size) {
            if cfg.max_steps.is_some_and(|m| steps >= m) {
                break 'training;
            }
            let flip: Option<&mut dyn rand::RngCore> = if cfg.augment { Some(&mut rng) } else { None };
            data.fill_batch(batch, flip, &mut images, &mut labels);
            let (x, y) = batch_tensors(data, &images, &labels)?;
            let logits = model.forward(&x, Mode::Train)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let loss_value = loss.to_scalar::<f32>()?;
            if !loss_value.is_finite() {
                return Err(ModelError::Diverged {
                    step: steps,
                    loss: loss_value,
                });
            }
            let grads = loss.backward()?;
            let mut offset = 0;
            for (spec, var) in model.param_specs().iter().zip(model.vars()) {
                let n = spec.numel();
                let dst = &mut grad[offset..offset + n];
                match grads.get(var.as_tensor()) {
                    Some(g) => dst.copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?),
                    None => dst.fill(0.0),
                }
                offset += n;
            }
            match strategy {
                ClientStrategy::FedAvg => {}
                ClientStrategy::FedProx { mu } => {
                    for ((g, wi), wg) in grad.iter_mut().zip(&w).zip(&w_global) {
                        *g += mu * (wi - wg);
                    }
                }
                ClientStrategy::Scaffold { .. } => {
                    let corr = correction.as_deref().expect("set for SCAFFOLD");
                    for (g, c) in grad.iter_mut().zip(corr) {
                        *g += c;
                    }
                }
            }
            opt.step(&mut w, &grad);
            write_params(model, &w)?;
            steps += 1;
            seen += batch.len();
            loss_sum += loss_value as f64 * batch.len() as f64;
            epoch_loss += loss_value as f64 * batch.len() as f64;
            epoch_seen += batch.len();
        }
        epoch += 1;
    }
    let control = match strategy {
        ClientStrategy::Scaffold {
            global_control,
            local_control,
        } => Some(scaffold_control(
            local_control,
            global_control,
            &w_global,
            &w,
            steps,
            cfg.optimizer.lr(),
        )),
        _ => None,
    };
    let mean = |sum: f64, n: usize| if n == 0 { f32::NAN } else { (sum / n as f64) as f32 };
    Ok(TrainOutcome {
        steps,
        num_examples: data.len(),
        examples_seen: seen,
        mean_loss: mean(loss_sum, seen),
        last_epoch_loss: if epoch_seen > 0 {
            mean(epoch_loss, epoch_seen)
        } else {
            mean(loss_sum, seen)
        },
        params: w,
        control,
        seconds: start.elapsed().as_secs_f64(),
        privacy: None,
    })
}

/// SCAFFOLD's `c − c_i` (checked against the parameter count), `None` for other strategies.
pub(crate) fn strategy_correction(strategy: ClientStrategy<'_>, p: usize) -> Result<Option<Vec<f32>>> {
    match strategy {
        ClientStrategy::Scaffold {
            global_control,
            local_control,
        } => {
            if global_control.len() != p || local_control.len() != p {
                return Err(ModelError::Config(format!(
                    "SCAFFOLD control variates have {} and {} values, the model {p}",
                    global_control.len(),
                    local_control.len()
                )));
            }
            Ok(Some(
                global_control
                    .iter()
                    .zip(local_control)
                    .map(|(c, ci)| c - ci)
                    .collect(),
            ))
        }
        _ => Ok(None),
    }
}

/// Adds FedProx's proximal gradient or SCAFFOLD's correction to `grad`.
pub(crate) fn apply_strategy(
    strategy: ClientStrategy<'_>,
    correction: Option<&[f32]>,
    grad: &mut [f32],
    w: &[f32],
    w_global: &[f32],
) {
    match strategy {
        ClientStrategy::FedAvg => {}
        ClientStrategy::FedProx { mu } => {
            for ((g, wi), wg) in grad.iter_mut().zip(w).zip(w_global) {
                *g += mu * (wi - wg);
            }
        }
        ClientStrategy::Scaffold { .. } => {
            if let Some(corr) = correction {
                for (g, c) in grad.iter_mut().zip(corr) {
                    *g += c;
                }
            }
        }
    }
}

/// SCAFFOLD's control update after `steps` local steps, `None` for other strategies.
pub(crate) fn scaffold_outcome(
    strategy: ClientStrategy<'_>,
    w_global: &[f32],
    w: &[f32],
    steps: usize,
    lr: f32,
) -> Option<ControlUpdate> {
    match strategy {
        ClientStrategy::Scaffold {
            global_control,
            local_control,
        } => Some(scaffold_control(
            local_control,
            global_control,
            w_global,
            w,
            steps,
            lr,
        )),
        _ => None,
    }
}

/// SCAFFOLD option II: `c_i⁺ = c_i − c + (w_global − w_local)/(K·lr)`, and `c_i⁺ − c_i`.
/// With K = 0 (no step taken) the control variate is unchanged.
pub fn scaffold_control(
    local_control: &[f32],
    global_control: &[f32],
    w_global: &[f32],
    w_local: &[f32],
    steps: usize,
    lr: f32,
) -> ControlUpdate {
    let new: Vec<f32> = if steps == 0 {
        local_control.to_vec()
    } else {
        let scale = 1.0 / (steps as f32 * lr);
        local_control
            .iter()
            .zip(global_control)
            .zip(w_global.iter().zip(w_local))
            .map(|((ci, c), (wg, wl))| ci - c + (wg - wl) * scale)
            .collect()
    };
    let delta = new.iter().zip(local_control).map(|(a, b)| a - b).collect();
    ControlUpdate {
        local_control: new,
        delta,
    }
}

pub(crate) fn write_params(model: &Model, w: &[f32]) -> Result<()> {
    let mut offset = 0;
    for (spec, var) in model.param_specs().iter().zip(model.vars()) {
        let n = spec.numel();
        var.set(&Tensor::from_slice(
            &w[offset..offset + n],
            spec.shape.as_slice(),
            &Device::Cpu,
        )?)?;
        offset += n;
    }
    Ok(())
}

/// Optimiser state over the flat parameter vector.
pub(crate) struct OptState {
    opt: Optimizer,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl OptState {
    pub(crate) fn new(opt: Optimizer, p: usize) -> Self {
        let v = match opt {
            Optimizer::AdamW { .. } => vec![0.0; p],
            Optimizer::Sgd { .. } => Vec::new(),
        };
        OptState {
            opt,
            m: vec![0.0; p],
            v,
            t: 0,
        }
    }

    pub(crate) fn step(&mut self, w: &mut [f32], g: &[f32]) {
        self.t += 1;
        match self.opt {
            Optimizer::Sgd {
                lr,
                momentum,
                weight_decay,
            } => {
                for ((wi, gi), mi) in w.iter_mut().zip(g).zip(&mut self.m) {
                    let g = gi + weight_decay * *wi;
                    *mi = if self.t == 1 { g } else { momentum * *mi + g };
                    *wi -= lr * if momentum == 0.0 { g } else { *mi };
                }
            }
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let bc1 = 1.0 - beta1.powi(self.t);
                let bc2 = 1.0 - beta2.powi(self.t);
                let step = lr / bc1;
                let bc2_sqrt = bc2.sqrt();
                for (((wi, gi), mi), vi) in w.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
                    *wi *= 1.0 - lr * weight_decay;
                    *mi = beta1 * *mi + (1.0 - beta1) * gi;
                    *vi = beta2 * *vi + (1.0 - beta2) * gi * gi;
                    *wi -= step * *mi / (vi.sqrt() / bc2_sqrt + eps);
                }
            }
        }
    }
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub n: usize,
    /// Mean cross-entropy.
    pub loss: f32,
    pub accuracy: f32,
    /// Predicted class per example, in data order.
    pub predictions: Vec<u32>,
}

/// Evaluates `model` on `data` in batches, without recording gradients.
pub fn evaluate(model: &Model, data: &ImageSet, batch_size: usize) -> Result<Evaluation> {
    check_data(model, data)?;
    let batch_size = batch_size.max(1);
    let mut predictions = Vec::with_capacity(data.len());
    let mut loss_sum = 0f64;
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..data.len()).collect();
    for batch in all.chunks(batch_size) {
        data.fill_batch(batch, None, &mut images, &mut labels);
        let (x, y) = batch_tensors(data, &images, &labels)?;
        let logits = model.forward(&x, Mode::Eval)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        loss_sum += loss as f64 * batch.len() as f64;
        predictions.extend(logits.argmax(1)?.to_vec1::<u32>()?);
    }
    Ok(Evaluation {
        n: data.len(),
        loss: (loss_sum / data.len() as f64) as f32,
        accuracy: accuracy(&predictions, &data.labels),
        predictions,
    })
}

/// Predicted class per example.
pub fn predict(model: &Model, data: &ImageSet, batch_size: usize) -> Result<Vec<u32>> {
    Ok(evaluate(model, data, batch_size)?.predictions)
}

/// Fraction of `predictions` equal to `labels` (0 for empty input).
pub fn accuracy(predictions: &[u32], labels: &[u32]) -> f32 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = predictions.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f32 / labels.len() as f32
}
