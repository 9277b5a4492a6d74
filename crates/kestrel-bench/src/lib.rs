//! Measurement shared by kestrel's tools: summary statistics, repro capsules
//! (machine, command, model, raw numbers), and the pieces `bench-serve`,
//! `validate`, `microbench` and `report` build on.

pub mod capsule;
pub mod report;
pub mod rows;
pub mod serve_load;

pub use capsule::Stats;
pub use rows::{Better, Row};
