//! Errors of the backends.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("tensor '{name}': {problem}")]
    Tensor { name: String, problem: String },
    #[error("unsupported on this backend: {0}")]
    Unsupported(String),
    #[error("device out of memory: {0}")]
    OutOfMemory(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("{0}")]
    Other(String),
}
