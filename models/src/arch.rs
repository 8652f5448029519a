//! The architectures, their parameters (in a fixed order) and their forward passes.
use std::fmt;
use std::str::FromStr;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Uniform};

use crate::error::Result;
use crate::tap::{LayerInput, Tap};

/// A network architecture, selected by name in the study spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// `small-cnn`: conv3×3 3→32, 32→64, 64→128 (each + ReLU + 2×2 max-pool), then
    /// fc 8192→128 + ReLU, fc 128→classes. The model of issue 9. About 1.15M parameters.
    SmallCnn,
    /// `resnet8`: a CIFAR-style ResNet-8 for 64×64 input: conv3×3 3→16 + GN + ReLU, three basic
    /// blocks (16 ch at 64×64, 32 ch stride 2, 64 ch stride 2; 1×1 projection shortcuts where the
    /// shape changes), global average pool, fc 64→classes. About 78k parameters.
    ResNet8,
    /// `mobilenet`: a MobileNet-v1-style net of depthwise-separable blocks for 64×64 input:
    /// conv3×3 3→32 stride 2, then depthwise 3×3 + pointwise 1×1 blocks
    /// (32→64, 64→128 s2, 128→128, 128→256 s2, 256→256), each conv followed by GN + ReLU,
    /// global average pool, fc 256→classes.
    MobileNet,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::SmallCnn, Arch::ResNet8, Arch::MobileNet];

    /// The name used on the command line, in study specs and in safetensors metadata.
    pub fn name(self) -> &'static str {
        match self {
            Arch::SmallCnn => "small-cnn",
            Arch::ResNet8 => "resnet8",
            Arch::MobileNet => "mobilenet",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "small-cnn" | "smallcnn" | "cnn" => Ok(Arch::SmallCnn),
            "resnet8" | "resnet-8" => Ok(Arch::ResNet8),
            "mobilenet" | "mobilenet-v1" => Ok(Arch::MobileNet),
            _ => Err(format!(
                "unknown model '{s}' (expected small-cnn, resnet8 or mobilenet)"
            )),
        }
    }
}

/// Name and shape of one parameter tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Groups of GroupNorm: 8, or fewer when the channels do not divide.
const GN_GROUPS: usize = 8;
const GN_EPS: f64 = 1e-5;

/// Creates parameters in order, initialised like PyTorch's defaults: weights and biases of conv
/// and linear layers uniform in ±1/√fan_in, GroupNorm scale 1 and shift 0.
pub(crate) struct Builder {
    rng: ChaCha8Rng,
    pub(crate) params: Vec<(ParamSpec, Var)>,
}

impl Builder {
    pub(crate) fn new(seed: u64) -> Self {
        Builder {
            rng: ChaCha8Rng::seed_from_u64(seed),
            params: Vec::new(),
        }
    }

    fn param(&mut self, name: String, shape: Vec<usize>, init: Init) -> Result<Var> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Uniform(bound) => {
                let u = Uniform::new_inclusive(-bound, bound).expect("bound is positive");
                (0..n).map(|_| u.sample(&mut self.rng)).collect()
            }
            Init::Const(v) => vec![v; n],
        };
        let var = Var::from_vec(data, shape.as_slice(), &candle_core::Device::Cpu)?;
        self.params.push((ParamSpec { name, shape }, var.clone()));
        Ok(var)
    }

    fn conv(
        &mut self,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        groups: usize,
    ) -> Result<Conv> {
        let fan_in = (c_in / groups) * k * k;
        let bound = 1.0 / (fan_in as f32).sqrt();
        let w = self.param(
            format!("{name}.weight"),
            vec![c_out, c_in / groups, k, k],
            Init::Uniform(bound),
        )?;
        let b = self.param(format!("{name}.bias"), vec![c_out], Init::Uniform(bound))?;
        Ok(Conv {
            w,
            b,
            stride,
            padding: k / 2,
            groups,
        })
    }

    fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
        let bound = 1.0 / (d_in as f32).sqrt();
        let w = self.param(format!("{name}.weight"), vec![d_out, d_in], Init::Uniform(bound))?;
        let b = self.param(format!("{name}.bias"), vec![d_out], Init::Uniform(bound))?;
        Ok(Linear { w, b })
    }

    fn group_norm(&mut self, name: &str, c: usize) -> Result<GroupNorm> {
        let mut groups = GN_GROUPS.min(c);
        while !c.is_multiple_of(groups) {
            groups -= 1;
        }
        let gamma = self.param(format!("{name}.weight"), vec![c], Init::Const(1.0))?;
        let beta = self.param(format!("{name}.bias"), vec![c], Init::Const(0.0))?;
        Ok(GroupNorm { gamma, beta, groups })
    }
}

enum Init {
    Uniform(f32),
    Const(f32),
}

/// Whether a forward pass records the graph for backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Weights are tracked; call `backward` on the loss.
    Train,
    /// Weights are detached: no graph is kept (evaluation, prediction).
    Eval,
    /// Per-example gradient taps (the pass DP-SGD runs): weights are detached, and every
    /// parameterised layer reports its input and output to the pass's tap hook, so that one
    /// backward pass yields the per-example gradients of every layer. Only through the crate's
    /// tapped forward (`dpsgd`'s functions): `Model::forward` refuses it.
    Dp,
}

/// How one forward pass runs through the layers: [`Mode::Train`], [`Mode::Eval`], or a tapped
/// pass ([`Mode::Dp`]) with the hook its layers report to.
pub(crate) enum Pass<'a> {
    Train,
    Eval,
    Tapped(&'a mut dyn Tap),
}

fn weight(v: &Var, pass: &Pass<'_>) -> Tensor {
    match pass {
        Pass::Train => v.as_tensor().clone(),
        Pass::Eval | Pass::Tapped(_) => v.as_tensor().detach(),
    }
}

pub(crate) struct Conv {
    w: Var,
    b: Var,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv {
    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        if let Pass::Tapped(tap) = pass {
            return self.forward_tapped(x, &mut **tap);
        }
        let (w, b) = (weight(&self.w, pass), weight(&self.b, pass));
        let c = self.b.dim(0)?;
        if self.groups > 1 && self.groups == x.dim(1)? {
            let y = crate::depthwise::depthwise_conv(x, &w, self.stride, self.padding)?;
            Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
        } else if self.groups == 1 && crate::conv::conv_impl() == crate::conv::ConvImpl::Im2col {
            crate::conv::conv2d(x, &w, &b, self.stride, self.padding)
        } else {
            let y = x.conv2d(&w, self.padding, self.stride, 1, self.groups)?;
            Ok(y.broadcast_add(&b.reshape((1, c, 1, 1))?)?)
        }
    }

    /// The tapped forward: im2col (or the depthwise kernel) whatever `set_conv_impl` says, with
    /// the layer's input recorded and its output handed to `tap`.
    fn forward_tapped(&self, x: &Tensor, tap: &mut dyn Tap) -> Result<Tensor> {
        let w = self.w.as_tensor().detach();
        let c = self.b.dim(0)?;
        let b = self.b.as_tensor().detach();
        let k = w.dim(2)?;
        if self.groups > 1 && self.groups == x.dim(1)? {
            let y = crate::depthwise::depthwise_conv(x, &w, self.stride, self.padding)?
                .broadcast_add(&b.reshape((1, c, 1, 1))?)?;
            let input = LayerInput::Depthwise {
                x: x.detach(),
                k,
                stride: self.stride,
                padding: self.padding,
            };
            tap.tap(y, input, &self.w, &self.b)
        } else if self.groups == 1 {
            let y = crate::conv::conv2d(x, &w, &b, self.stride, self.padding)?;
            let cols = crate::conv::im2col(x, k, k, self.stride, self.padding)?;
            tap.tap(y, LayerInput::Conv { cols }, &self.w, &self.b)
        } else {
            Err(crate::error::ModelError::Config(format!(
                "DP-SGD does not support grouped convolutions with {} groups",
                self.groups
            )))
        }
    }
}

pub(crate) struct Linear {
    w: Var,
    b: Var,
}

impl Linear {
    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        let y = x.matmul(&weight(&self.w, pass).t()?)?;
        let y = y.broadcast_add(&weight(&self.b, pass))?;
        if let Pass::Tapped(tap) = pass {
            return tap.tap(y, LayerInput::Linear { x: x.detach() }, &self.w, &self.b);
        }
        Ok(y)
    }
}

/// GroupNorm: no running statistics, so nothing but trained parameters to average across
/// hospitals, and the same behaviour in training and evaluation.
pub(crate) struct GroupNorm {
    gamma: Var,
    beta: Var,
    groups: usize,
}

impl GroupNorm {
    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        self.forward_relu(x, pass, false)
    }

    /// GroupNorm, followed by a ReLU in the same kernel when `relu` (except in a tapped pass,
    /// whose tap must see the affine output: the ReLU is a separate op there).
    fn forward_relu(&self, x: &Tensor, pass: &mut Pass<'_>, relu: bool) -> Result<Tensor> {
        let (gamma, beta) = (weight(&self.gamma, pass), weight(&self.beta, pass));
        let fused = relu && !matches!(pass, Pass::Tapped(_));
        let y = crate::ops::group_norm(x, &gamma, &beta, self.groups, GN_EPS, fused)?;
        if let Pass::Tapped(tap) = pass {
            let input = LayerInput::GroupNorm {
                normed: crate::ops::group_normalize(x, self.groups, GN_EPS)?,
            };
            let y = tap.tap(y, input, &self.gamma, &self.beta)?;
            return if relu { crate::ops::relu(&y) } else { Ok(y) };
        }
        Ok(y)
    }
}

pub(crate) struct BasicBlock {
    conv1: Conv,
    gn1: GroupNorm,
    conv2: Conv,
    gn2: GroupNorm,
    shortcut: Option<(Conv, GroupNorm)>,
}

impl BasicBlock {
    fn new(b: &mut Builder, name: &str, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let conv1 = b.conv(&format!("{name}.conv1"), c_in, c_out, 3, stride, 1)?;
        let gn1 = b.group_norm(&format!("{name}.gn1"), c_out)?;
        let conv2 = b.conv(&format!("{name}.conv2"), c_out, c_out, 3, 1, 1)?;
        let gn2 = b.group_norm(&format!("{name}.gn2"), c_out)?;
        let shortcut = if stride != 1 || c_in != c_out {
            Some((
                b.conv(&format!("{name}.shortcut.conv"), c_in, c_out, 1, stride, 1)?,
                b.group_norm(&format!("{name}.shortcut.gn"), c_out)?,
            ))
        } else {
            None
        };
        Ok(BasicBlock {
            conv1,
            gn1,
            conv2,
            gn2,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        let y = self.gn1.forward_relu(&self.conv1.forward(x, pass)?, pass, true)?;
        let y = self.gn2.forward(&self.conv2.forward(&y, pass)?, pass)?;
        let skip = match &self.shortcut {
            Some((conv, gn)) => gn.forward(&conv.forward(x, pass)?, pass)?,
            None => x.clone(),
        };
        crate::ops::add_relu(&y, &skip)
    }
}

/// Conv + GroupNorm + ReLU.
pub(crate) struct ConvGn {
    conv: Conv,
    gn: GroupNorm,
}

impl ConvGn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &mut Builder,
        name: &str,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        groups: usize,
    ) -> Result<Self> {
        Ok(ConvGn {
            conv: b.conv(&format!("{name}.conv"), c_in, c_out, k, stride, groups)?,
            gn: b.group_norm(&format!("{name}.gn"), c_out)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        self.gn.forward_relu(&self.conv.forward(x, pass)?, pass, true)
    }
}

pub(crate) enum Layers {
    SmallCnn {
        convs: [Conv; 3],
        fc1: Linear,
        fc2: Linear,
    },
    ResNet {
        stem: ConvGn,
        blocks: Vec<BasicBlock>,
        fc: Linear,
    },
    MobileNet {
        stem: ConvGn,
        /// (depthwise, pointwise) pairs.
        blocks: Vec<(ConvGn, ConvGn)>,
        fc: Linear,
    },
}

impl Layers {
    /// Builds the net, registering its parameters in `b` in forward order.
    pub(crate) fn build(arch: Arch, num_classes: usize, b: &mut Builder) -> Result<Layers> {
        Ok(match arch {
            Arch::SmallCnn => Layers::SmallCnn {
                convs: [
                    b.conv("conv1", 3, 32, 3, 1, 1)?,
                    b.conv("conv2", 32, 64, 3, 1, 1)?,
                    b.conv("conv3", 64, 128, 3, 1, 1)?,
                ],
                fc1: b.linear("fc1", 128 * 8 * 8, 128)?,
                fc2: b.linear("fc2", 128, num_classes)?,
            },
            Arch::ResNet8 => Layers::ResNet {
                stem: ConvGn::new(b, "stem", 3, 16, 3, 1, 1)?,
                blocks: vec![
                    BasicBlock::new(b, "layer1", 16, 16, 1)?,
                    BasicBlock::new(b, "layer2", 16, 32, 2)?,
                    BasicBlock::new(b, "layer3", 32, 64, 2)?,
                ],
                fc: b.linear("fc", 64, num_classes)?,
            },
            Arch::MobileNet => {
                let stem = ConvGn::new(b, "stem", 3, 32, 3, 2, 1)?;
                let plan = [
                    (32, 64, 1),
                    (64, 128, 2),
                    (128, 128, 1),
                    (128, 256, 2),
                    (256, 256, 1),
                ];
                let mut blocks = Vec::new();
                for (i, (c_in, c_out, stride)) in plan.into_iter().enumerate() {
                    let dw = ConvGn::new(b, &format!("block{}.dw", i + 1), c_in, c_in, 3, stride, c_in)?;
                    let pw = ConvGn::new(b, &format!("block{}.pw", i + 1), c_in, c_out, 1, 1, 1)?;
                    blocks.push((dw, pw));
                }
                let fc = b.linear("fc", 256, num_classes)?;
                Layers::MobileNet { stem, blocks, fc }
            }
        })
    }

    /// Logits `(batch, classes)` for images `(batch, 3, 64, 64)`.
    pub(crate) fn forward(&self, x: &Tensor, pass: &mut Pass<'_>) -> Result<Tensor> {
        match self {
            Layers::SmallCnn { convs, fc1, fc2 } => {
                let mut y = x.clone();
                for conv in convs {
                    // ReLU after the pool: the same function as pool(ReLU(x)) (both are
                    // monotone), on a quarter of the values.
                    y = crate::ops::relu(&crate::ops::max_pool2x2(&conv.forward(&y, pass)?)?)?;
                }
                let y = crate::ops::relu(&fc1.forward(&y.flatten_from(1)?, pass)?)?;
                fc2.forward(&y, pass)
            }
            Layers::ResNet { stem, blocks, fc } => {
                let mut y = stem.forward(x, pass)?;
                for block in blocks {
                    y = block.forward(&y, pass)?;
                }
                fc.forward(&y.flatten_from(2)?.mean(2)?, pass)
            }
            Layers::MobileNet { stem, blocks, fc } => {
                let mut y = stem.forward(x, pass)?;
                for (dw, pw) in blocks {
                    y = pw.forward(&dw.forward(&y, pass)?, pass)?;
                }
                fc.forward(&y.flatten_from(2)?.mean(2)?, pass)
            }
        }
    }
}
