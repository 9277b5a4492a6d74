//! The common shape of a measured result, shared by every tool's capsule
//! (`result.rows`), so that `report` can render, compare and plot capsules of
//! any tool without knowing each tool's own layout.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::capsule::Stats;

/// Which direction of a metric is an improvement (for comparisons).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
    /// Informational (e.g. a count): never called a gain or a loss.
    Neither,
}

/// One metric of one test, with every raw sample and its summary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// What was run: "tg128", "c=64", "rms_norm/cuda/fused", ...
    pub test: String,
    /// What was measured: "decode_tok_s", "ttft_ms", "gb_s", ...
    pub metric: String,
    /// Unit of `raw` and `stats`: "tok/s", "ms", "GB/s", ...
    pub unit: String,
    pub better: Better,
    /// Summary of `raw`.
    pub stats: Stats,
    /// Every sample, in the order measured.
    pub raw: Vec<f64>,
    /// Numeric axes of the test for plots and joins (e.g. `concurrency: 64`,
    /// `input_len: 128`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, f64>,
}

impl Row {
    /// A row summarising `raw`.
    pub fn new(test: &str, metric: &str, unit: &str, better: Better, raw: Vec<f64>) -> Row {
        Row {
            test: test.to_string(),
            metric: metric.to_string(),
            unit: unit.to_string(),
            better,
            stats: Stats::of(&raw),
            raw,
            params: BTreeMap::new(),
        }
    }

    /// The same row with a numeric axis attached.
    pub fn with_param(mut self, name: &str, value: f64) -> Row {
        self.params.insert(name.to_string(), value);
        self
    }
}
