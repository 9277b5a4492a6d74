//! Errors of the load generator: each names the option, file or endpoint it
//! concerns and what was expected.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{option} {url:?}: {reason}")]
    BadUrl {
        option: &'static str,
        url: String,
        reason: String,
    },
    #[error("{option} {text:?}: {reason}")]
    BadOption {
        option: &'static str,
        text: String,
        reason: String,
    },
    #[error("reading --prompts {path}: {source}")]
    PromptsIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--prompts {path} line {line}: expected a JSON object with a string field \"prompt\" ({reason})"
    )]
    PromptsLine {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("--prompts {path}: the file holds no prompts")]
    PromptsEmpty { path: PathBuf },
    #[error("GET {url}: {reason} (pass --model to skip the lookup)")]
    Models { url: String, reason: String },
    #[error("starting the client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the load task failed: {0}")]
    Task(String),
    #[error("{}", .0.join("; "))]
    AssertMissed(Vec<String>),
}

pub type Result<T> = std::result::Result<T, Error>;
