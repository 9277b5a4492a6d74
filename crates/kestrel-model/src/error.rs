//! Errors of model loading and the forward pass.

use kestrel_backend::BackendError;
use kestrel_formats::FormatError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(
        "{file}: unknown architecture '{arch}' (supported: {})",
        crate::config::SUPPORTED_ARCHS
    )]
    UnknownArch { file: String, arch: String },
    #[error("{file}: {what}")]
    Unsupported { file: String, what: String },
    #[error("{file}: bad model configuration: {problem}")]
    Config { file: String, problem: String },
    #[error("{file}: missing tensor '{name}'")]
    MissingTensor { file: String, name: String },
    #[error("{file}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        file: String,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{0}")]
    Request(String),
}
