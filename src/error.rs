//! One error type for the library. Every variant carries the file (and tensor, or line) it is about, so
//! that a user who feeds nibble a broken model folder learns which file to look at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cause is part of the message and not a `source`, so that a chain printed whole (`{:#}`)
    /// says it once.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: tensor `{tensor}`: {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error(
        "unsupported architecture `{0}`: nibble supports the model_types {families}",
        families = crate::config::supported_model_types()
    )]
    UnsupportedArchitecture(String),
    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    /// The loss stopped being finite: resuming would repeat it bit for bit, so the advice differs.
    #[error("{0}")]
    Diverged(String),
    /// The user asked the run to stop (Ctrl-C, SIGTERM); the message says where its work was saved.
    #[error("{0}")]
    Interrupted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}
