//! A built network with its parameters: flat vectors and safetensors in and out.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::arch::{Arch, Builder, Layers, Mode, ParamSpec, Pass};
use crate::error::{ModelError, Result};
use crate::tap::Tap;

/// Safetensors metadata key for the architecture name.
pub const META_ARCH: &str = "caduceus.arch";
/// Safetensors metadata key for the number of classes.
pub const META_CLASSES: &str = "caduceus.num_classes";
/// Safetensors metadata key for the format version.
pub const META_FORMAT: &str = "caduceus.format";
const FORMAT: &str = "caduceus-model/1";

/// A network of one [`Arch`], ready to train or evaluate on CPU.
///
/// **Parameter order.** [`Model::param_specs`] lists the parameter tensors in the order the
/// layers are built, which is the forward order (e.g. for `small-cnn`: `conv1.weight`,
/// `conv1.bias`, `conv2.weight`, … `fc2.bias`). [`Model::flatten`] concatenates them in that order,
/// each in row-major (C) order; [`Model::load_flat`] reads the same layout. The order is part of
/// the format: two models of the same arch and class count always agree on it.
pub struct Model {
    arch: Arch,
    num_classes: usize,
    specs: Vec<ParamSpec>,
    vars: Vec<Var>,
    net: Layers,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.arch)
            .field("num_classes", &self.num_classes)
            .field("params", &self.param_count())
            .finish()
    }
}

impl Model {
    /// Builds `arch` for `num_classes` outputs, with weights initialised from `seed`
    /// (the same seed gives the same weights).
    pub fn build(arch: Arch, num_classes: usize, seed: u64) -> Result<Self> {
        if num_classes < 2 {
            return Err(ModelError::Config(format!(
                "a classifier needs at least 2 classes, got {num_classes}"
            )));
        }
        let mut b = Builder::new(seed);
        let net = Layers::build(arch, num_classes, &mut b)?;
        let (specs, vars) = b.params.into_iter().unzip();
        Ok(Model {
            arch,
            num_classes,
            specs,
            vars,
            net,
        })
    }

    /// Builds `arch` and loads `flat` (see [`Model::flatten`]) into it.
    pub fn from_flat(arch: Arch, num_classes: usize, flat: &[f32]) -> Result<Self> {
        let mut m = Model::build(arch, num_classes, 0)?;
        m.load_flat(flat)?;
        Ok(m)
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Names and shapes of the parameter tensors, in the documented order.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The parameter variables, in the documented order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Total number of scalar parameters (the length of [`Model::flatten`]).
    pub fn param_count(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// All parameters as one vector, in the documented order.
    pub fn flatten(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.param_count());
        for v in &self.vars {
            out.extend(v.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Replaces all parameters with `flat` (the layout of [`Model::flatten`]). Refuses a vector of
    /// the wrong length or one holding NaN or infinity.
    pub fn load_flat(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.param_count() {
            return Err(self.mismatch(format!(
                "expected {} values, got {}",
                self.param_count(),
                flat.len()
            )));
        }
        if let Some(i) = flat.iter().position(|x| !x.is_finite()) {
            return Err(self.mismatch(format!("value {i} is {}", flat[i])));
        }
        let mut offset = 0;
        for (spec, var) in self.specs.iter().zip(&self.vars) {
            let n = spec.numel();
            var.set(&Tensor::from_slice(
                &flat[offset..offset + n],
                spec.shape.as_slice(),
                &Device::Cpu,
            )?)?;
            offset += n;
        }
        Ok(())
    }

    /// Logits `(batch, classes)` for a batch `(batch, 3, 64, 64)`. [`Mode::Dp`] is refused here:
    /// a tapped pass needs a hook (DP-SGD's functions run it).
    pub fn forward(&self, images: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Train => self.net.forward(images, &mut Pass::Train),
            Mode::Eval => self.net.forward(images, &mut Pass::Eval),
            Mode::Dp => Err(ModelError::Config(
                "a Mode::Dp forward pass outside DP-SGD's tape (use dpsgd functions)".into(),
            )),
        }
    }

    /// Logits of a tapped forward pass ([`Mode::Dp`]): every parameterised layer reports to
    /// `tap`, once, in forward order.
    pub(crate) fn forward_tapped(&self, images: &Tensor, tap: &mut dyn Tap) -> Result<Tensor> {
        self.net.forward(images, &mut Pass::Tapped(tap))
    }

    /// Serialises the parameters as safetensors (f32, names from [`Model::param_specs`]) with the
    /// architecture and class count in the metadata.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let data: Vec<Vec<u8>> = self
            .vars
            .iter()
            .map(|v| {
                let values = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                Ok(values.iter().flat_map(|x| x.to_le_bytes()).collect())
            })
            .collect::<Result<_>>()?;
        let views = self
            .specs
            .iter()
            .zip(&data)
            .map(|(spec, bytes)| {
                let view = TensorView::new(Dtype::F32, spec.shape.clone(), bytes).map_err(|e| {
                    ModelError::Safetensors {
                        context: spec.name.clone(),
                        message: e.to_string(),
                    }
                })?;
                Ok((spec.name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([
            (META_FORMAT.to_string(), FORMAT.to_string()),
            (META_ARCH.to_string(), self.arch.name().to_string()),
            (META_CLASSES.to_string(), self.num_classes.to_string()),
        ]);
        safetensors::serialize(views, Some(meta)).map_err(|e| ModelError::Safetensors {
            context: "serialise".into(),
            message: e.to_string(),
        })
    }

    /// Builds the model that safetensors bytes describe (arch and classes from the metadata) and
    /// loads its parameters. `context` names the source in errors (e.g. the file path).
    pub fn from_safetensors(bytes: &[u8], context: &str) -> Result<Self> {
        let (st, meta) = parse(bytes, context)?;
        let meta = meta.unwrap_or_default();
        let get = |key: &str| {
            meta.get(key).ok_or_else(|| ModelError::Safetensors {
                context: context.into(),
                message: format!("metadata lacks '{key}': not written by caduceus"),
            })
        };
        let arch: Arch = get(META_ARCH)?
            .parse()
            .map_err(|message| ModelError::Safetensors {
                context: context.into(),
                message,
            })?;
        let classes: usize = get(META_CLASSES)?.parse().map_err(|_| ModelError::Safetensors {
            context: context.into(),
            message: format!("'{META_CLASSES}' is not a number"),
        })?;
        let mut model = Model::build(arch, classes, 0)?;
        model.load_tensors(&st, context)?;
        Ok(model)
    }

    /// Loads parameters from safetensors bytes into this model. Every tensor of the model must be
    /// present with the right shape (f32); the metadata's arch, if any, must match.
    pub fn load_safetensors_bytes(&mut self, bytes: &[u8], context: &str) -> Result<()> {
        let (st, meta) = parse(bytes, context)?;
        if let Some(arch) = meta.as_ref().and_then(|m| m.get(META_ARCH))
            && arch != self.arch.name()
        {
            return Err(self.mismatch(format!("{context} holds a '{arch}' model")));
        }
        self.load_tensors(&st, context)
    }

    fn load_tensors(&mut self, st: &SafeTensors<'_>, context: &str) -> Result<()> {
        let mut flat = Vec::with_capacity(self.param_count());
        for spec in &self.specs {
            let view = st
                .tensor(&spec.name)
                .map_err(|_| self.mismatch(format!("{context} lacks tensor '{}'", spec.name)))?;
            if view.dtype() != Dtype::F32 {
                return Err(self.mismatch(format!(
                    "{context}: '{}' is {:?}, expected F32",
                    spec.name,
                    view.dtype()
                )));
            }
            if view.shape() != spec.shape.as_slice() {
                return Err(self.mismatch(format!(
                    "{context}: '{}' has shape {:?}, expected {:?}",
                    spec.name,
                    view.shape(),
                    spec.shape
                )));
            }
            flat.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        let names: Vec<String> = st.names().into_iter().map(String::from).collect();
        if let Some(extra) = names.iter().find(|n| !self.specs.iter().any(|s| &s.name == *n)) {
            return Err(self.mismatch(format!("{context} has unexpected tensor '{extra}'")));
        }
        self.load_flat(&flat)
    }

    /// Writes the parameters to a safetensors file, atomically (temporary file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors()?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::write(&tmp, &bytes).map_err(|source| ModelError::Io {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Reads a safetensors file written by [`Model::save`], building the arch it names.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Model::from_safetensors(&bytes, &path.display().to_string())
    }

    fn mismatch(&self, message: String) -> ModelError {
        ModelError::Mismatch {
            arch: format!("{} ({} classes)", self.arch, self.num_classes),
            message,
        }
    }
}

/// The tensors and the free-form metadata of safetensors bytes.
fn parse<'a>(bytes: &'a [u8], context: &str) -> Result<(SafeTensors<'a>, Option<HashMap<String, String>>)> {
    let err = |e: safetensors::SafeTensorError| ModelError::Safetensors {
        context: context.into(),
        message: e.to_string(),
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(err)?;
    let st = SafeTensors::deserialize(bytes).map_err(err)?;
    Ok((st, meta.metadata().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_load_round_trip_and_order() {
        let a = Model::build(Arch::SmallCnn, 2, 1).unwrap();
        let names: Vec<&str> = a.param_specs().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv1.weight",
                "conv1.bias",
                "conv2.weight",
                "conv2.bias",
                "conv3.weight",
                "conv3.bias",
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias"
            ]
        );
        assert_eq!(a.param_count(), 896 + 18_496 + 73_856 + 1_048_704 + 258);
        let flat = a.flatten().unwrap();
        assert_eq!(flat.len(), a.param_count());
        let mut b = Model::build(Arch::SmallCnn, 2, 2).unwrap();
        assert_ne!(b.flatten().unwrap(), flat);
        b.load_flat(&flat).unwrap();
        assert_eq!(b.flatten().unwrap(), flat);
        // Same seed, same weights.
        assert_eq!(
            Model::build(Arch::SmallCnn, 2, 1).unwrap().flatten().unwrap(),
            flat
        );
        assert!(b.load_flat(&flat[1..]).is_err());
        let mut nan = flat.clone();
        nan[7] = f32::NAN;
        assert!(b.load_flat(&nan).unwrap_err().to_string().contains("value 7"));
    }

    #[test]
    fn safetensors_round_trip_and_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        for arch in Arch::ALL {
            let m = Model::build(arch, 5, 3).unwrap();
            let path = dir.path().join(format!("{arch}.safetensors"));
            m.save(&path).unwrap();
            let back = Model::load(&path).unwrap();
            assert_eq!(back.arch(), arch);
            assert_eq!(back.num_classes(), 5);
            assert_eq!(back.flatten().unwrap(), m.flatten().unwrap());
        }
        let bytes = Model::build(Arch::ResNet8, 2, 0)
            .unwrap()
            .to_safetensors()
            .unwrap();
        let mut small = Model::build(Arch::SmallCnn, 2, 0).unwrap();
        let err = small
            .load_safetensors_bytes(&bytes, "x.safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.contains("resnet8"), "{err}");
        let five = Model::build(Arch::ResNet8, 5, 0)
            .unwrap()
            .to_safetensors()
            .unwrap();
        let mut two = Model::build(Arch::ResNet8, 2, 0).unwrap();
        let err = two.load_safetensors_bytes(&five, "y").unwrap_err().to_string();
        assert!(err.contains("fc.weight") && err.contains("shape"), "{err}");
        assert!(
            Model::from_safetensors(b"garbage", "z")
                .unwrap_err()
                .to_string()
                .starts_with("z:")
        );
    }

    #[test]
    fn forward_shapes() {
        let x = Tensor::zeros((2, 3, 64, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        for arch in Arch::ALL {
            let m = Model::build(arch, 3, 0).unwrap();
            let y = m.forward(&x, Mode::Eval).unwrap();
            assert_eq!(y.dims(), &[2, 3], "{arch}");
        }
    }

    /// A hook that records which layer reported what and passes the output through unchanged.
    #[derive(Default)]
    struct Recorder {
        params: Vec<candle_core::TensorId>,
        inputs: Vec<&'static str>,
    }

    impl Tap for Recorder {
        fn tap(&mut self, y: Tensor, input: crate::tap::LayerInput, w: &Var, b: &Var) -> Result<Tensor> {
            use crate::tap::LayerInput;
            self.inputs.push(match input {
                LayerInput::Linear { .. } => "linear",
                LayerInput::Conv { .. } => "conv",
                LayerInput::Depthwise { .. } => "depthwise",
                LayerInput::GroupNorm { .. } => "group-norm",
            });
            self.params.extend([w.as_tensor().id(), b.as_tensor().id()]);
            Ok(y)
        }
    }

    #[test]
    fn a_tapped_pass_reports_every_parameter_once_in_order_and_computes_the_same_logits() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(
            (0..3 * 3 * 64 * 64)
                .map(|i: u32| (u8::try_from(i * 37 % 101).map(f32::from).unwrap() - 50.0) / 25.0)
                .collect(),
            (3, 3, 64, 64),
            &dev,
        )
        .unwrap();
        for arch in Arch::ALL {
            let m = Model::build(arch, 2, 4).unwrap();
            let mut rec = Recorder::default();
            let tapped = m.forward_tapped(&x, &mut rec).unwrap();
            let ids: Vec<_> = m.vars().iter().map(|v| v.as_tensor().id()).collect();
            assert_eq!(
                rec.params, ids,
                "{arch}: every parameter once, in the documented order"
            );
            match arch {
                Arch::SmallCnn => assert_eq!(rec.inputs, ["conv", "conv", "conv", "linear", "linear"]),
                Arch::ResNet8 => assert_eq!(rec.inputs.iter().filter(|&&k| k == "conv").count(), 9),
                Arch::MobileNet => assert_eq!(rec.inputs.iter().filter(|&&k| k == "depthwise").count(), 5),
            }
            // The same function as an evaluation pass, bit for bit (the GroupNorm + ReLU fusion
            // of the untapped pass rounds the same way as the separate ReLU of the tapped one).
            let eval = m.forward(&x, Mode::Eval).unwrap();
            assert_eq!(
                tapped.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                eval.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{arch}"
            );
            // Weights are detached: nothing of the graph reaches a parameter.
            assert!(
                !tapped.track_op(),
                "{arch}: a tapped pass must not track the weights"
            );
        }
        // Without a hook, Mode::Dp is refused.
        let m = Model::build(Arch::ResNet8, 2, 0).unwrap();
        let err = m.forward(&x, Mode::Dp).unwrap_err().to_string();
        assert!(err.contains("Mode::Dp"), "{err}");
    }
}
