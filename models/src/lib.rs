//! candle models and local training for Caduceus (CPU).
//!
//! - [`Arch`]: the architectures by name — `small-cnn`, `resnet8`, `mobilenet` (see each
//!   variant for the layers). Normalisation is GroupNorm, not BatchNorm: BatchNorm's running
//!   statistics are buffers, not trained parameters; they do not average meaningfully across
//!   hospitals with different populations (FedAvg of means and variances of skewed shards), they
//!   leak per-hospital statistics outside DP-SGD's clipping, and per-example gradients (DP-SGD)
//!   are ill-defined with batch statistics. GroupNorm has none of these problems, and every
//!   parameter the aggregator sees is a trained weight.
//! - [`Model`]: build from (arch, classes, seed); [`Model::flatten`] / [`Model::load_flat`] in a
//!   fixed, documented parameter order; safetensors out and in with the arch in the metadata,
//!   refusing tensors that do not match.
//! - [`train_local`] with [`TrainConfig`] (epochs and/or max steps, batch, [`Optimizer`]: AdamW
//!   by default, or SGD with momentum) and a [`ClientStrategy`]: FedAvg, FedProx (mu) or SCAFFOLD
//!   (control variates). Returns a [`TrainOutcome`].
//! - [`train_local_dp`] with a [`DpConfig`]: the same with DP-SGD (per-example clipping without
//!   per-example backward passes, Poisson sampling, exact discrete Gaussian noise); see [`dpsgd`].
//! - [`evaluate`] / [`predict`] / [`accuracy`]: batched, no gradient graph.
//!
//! Input: the `f32` NCHW batches of [`caduceus_dataset::ImageSet`] (3×64×64 for UTKFace).
//! The training hot path runs in fused CPU kernels (issue 9; `docs/benchmarks.md`, "Training
//! speed"): convolution + bias as one op, per-example im2col + GEMM in cache-sized blocks with a
//! col2im backward ([`conv2d`], instead of candle's `conv2d`, whose backward uses a slow direct
//! `conv_transpose2d`; [`set_conv_impl`] switches back for comparison, `--conv candle` in the
//! throughput example); ReLU, max-pool, GroupNorm (+ReLU) and the residual add+ReLU in [`ops`];
//! depthwise convolutions in their own kernel. All are tested against candle's reference ops,
//! gradients included. Training keeps freed memory in the heap ([`keep_freed_memory`]).
//!
//! Threads: the kernels and candle's use rayon's global pool (all cores, or `RAYON_NUM_THREADS`).
mod alloc;
mod arch;
mod conv;
mod cpu;
mod depthwise;
pub mod dpsgd;
mod error;
mod model;
pub mod ops;
mod spend;
mod tap;
mod train;

pub use alloc::keep_freed_memory;
pub use arch::{Arch, Mode, ParamSpec};
pub use conv::{ConvImpl, conv_impl, conv2d, set_conv_impl};
pub use depthwise::depthwise_conv;
pub use dpsgd::{DpConfig, train_local_dp};
pub use error::{ModelError, Result};
pub use model::{META_ARCH, META_CLASSES, META_FORMAT, Model};
pub use spend::{ClipStats, DpSpend};
pub use train::{
    ClientStrategy, ControlUpdate, Evaluation, Optimizer, TrainConfig, TrainOutcome, accuracy, evaluate,
    predict, scaffold_control, train_local,
};
