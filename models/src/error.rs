//! The crate's error type ([`ModelError`]) and [`Result`] alias.
use std::path::PathBuf;

/// Errors of this crate; each says what is wrong with which input.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {message}")]
    Safetensors { context: String, message: String },
    #[error("parameters do not match {arch}: {message}")]
    Mismatch { arch: String, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: usize, loss: f32 },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
