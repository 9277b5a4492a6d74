//! Errors of generation.

use kestrel_model::ModelError;
use kestrel_tokenizer::TokenizerError;
use thiserror::Error;

use crate::sampling::SamplingError;
use crate::scheduler::SchedulerError;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// Something wrong with what the caller asked for.
    #[error("{0}")]
    Request(String),
    /// Engine bookkeeping refused an operation (a bug, not a user error).
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// An engine setting is out of range.
    #[error("engine setting `{field}` is {value}, expected {expected}")]
    Config {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    /// The engine thread has ended (shut down, or every handle dropped).
    #[error("the engine has stopped and accepts no more requests")]
    Stopped,
}

impl EngineError {
    /// A `Config` error for `field`, which is `value` but should be `expected`.
    pub(crate) fn config(field: &'static str, value: impl ToString, expected: &'static str) -> Self {
        EngineError::Config {
            field,
            value: value.to_string(),
            expected,
        }
    }
}
