//! What can go wrong while reading capsules and writing reports; every
//! variant names the file (or flag) and what was expected of it. Underlying
//! I/O and JSON errors are kept as `source` (printed by `{:#}` chains), not
//! repeated in the message.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("reading capsule {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a JSON capsule")]
    NotJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("capsule {capsule}: `{field}` is missing or is not {expected}")]
    Field {
        capsule: String,
        field: String,
        expected: &'static str,
    },
    #[error(
        "capsule {capsule}: result.rows[{index}] is not a row \
         (test, metric, unit, better, stats, raw, params)"
    )]
    BadRow {
        capsule: String,
        index: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("--compare needs exactly two capsules (baseline then candidate), got {got}")]
    CompareCount { got: usize },
    #[error("--threshold must be a finite percentage >= 0, got {got}")]
    Threshold { got: f64 },
    #[error("writing plot {path}")]
    WritePlot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
