//! Per-example gradient taps: the hook the layers call in a tapped forward pass (defined here,
//! next to the layers; implemented by whoever needs per-example gradients, i.e. `dpsgd`).
//!
//! In a tapped pass (`Mode::Dp`) weights are detached, and every parameterised layer hands its
//! hook, once per layer and batch, its output, what it recorded about its input ([`LayerInput`])
//! and its weight and bias; it continues with the tensor the hook returns. With the output's
//! gradient from one backward pass, the input is what the per-example parameter gradients are
//! formed from. The layers know nothing of what the hook does with them.
use candle_core::{Tensor, Var};

use crate::error::Result;

/// What a parameterised layer's tapped forward recorded about its input.
pub(crate) enum LayerInput {
    /// `x (B, D_in)`.
    Linear { x: Tensor },
    /// The per-example im2col matrices `(B, C·k·k, Ho·Wo)`.
    Conv { cols: Tensor },
    /// `x (B, C, H, W)` and the kernel geometry.
    Depthwise {
        x: Tensor,
        k: usize,
        stride: usize,
        padding: usize,
    },
    /// `x̂ (B, C, H, W)`, the normalised input before the affine map.
    GroupNorm { normed: Tensor },
}

/// The hook of a tapped forward pass.
pub(crate) trait Tap {
    /// Called by a parameterised layer (weight `w`, bias `b`) with its output `y` and its recorded
    /// input; returns the output the forward pass continues with (`y`, or a pass-through of it
    /// whose backward the hook observes). Called once per layer per forward pass, in forward order.
    fn tap(&mut self, y: Tensor, input: LayerInput, w: &Var, b: &Var) -> Result<Tensor>;
}
