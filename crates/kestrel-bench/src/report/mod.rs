//! `kestrel report`: every capsule kind rendered as one table (Markdown, CSV,
//! JSON), two capsules compared row by row, and SVG charts of concurrency
//! sweeps and latency distributions.

pub mod compare;
pub mod error;
pub mod load;
pub mod plot;
pub mod render;
pub mod svg;

pub use compare::{compare, Comparison, Verdict, DEFAULT_THRESHOLD_PCT};
pub use error::ReportError;
pub use load::Capsule;
pub use render::ReportRow;
