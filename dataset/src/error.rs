use std::path::PathBuf;

/// Everything that can go wrong in this crate. Each variant names the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: line {line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: u64,
        message: String,
    },
    #[error("{}: invalid manifest: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{}: cannot decode image: {message}", path.display())]
    Image { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DatasetError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = DatasetError> = std::result::Result<T, E>;
