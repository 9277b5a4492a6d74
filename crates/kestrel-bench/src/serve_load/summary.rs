//! Per-level results: latency distributions over every successful request
//! and throughput over the level's wall time.

use serde::Serialize;

use super::client::RequestRecord;
use super::runner::LevelRun;
use crate::capsule::Stats;

/// How many distinct error messages a summary keeps as examples.
const ERROR_EXAMPLES: usize = 3;

/// One level against one server, pooled over its rounds.
#[derive(Clone, Debug, Serialize)]
pub struct LevelSummary {
    pub requests: usize,
    pub succeeded: usize,
    pub errors: usize,
    /// A few distinct error messages.
    pub error_examples: Vec<String>,
    /// Wall time summed over rounds.
    pub duration_s: f64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Output tokens of successful requests per second.
    pub output_throughput: f64,
    /// Prompt plus output tokens of successful requests per second.
    pub total_throughput: f64,
    pub output_tokens: u64,
    /// As the server reported them (`usage.prompt_tokens`).
    pub prompt_tokens: u64,
    pub ttft_ms: Stats,
    pub tpot_ms: Stats,
    pub itl_ms: Stats,
    pub e2e_ms: Stats,
}

/// Raw per-request samples of successful requests (what the stats summarise).
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub ttft_ms: Vec<f64>,
    pub tpot_ms: Vec<f64>,
    pub itl_ms: Vec<f64>,
    pub e2e_ms: Vec<f64>,
    pub output_tokens: Vec<f64>,
    pub prompt_tokens: Vec<f64>,
}

impl Samples {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a RequestRecord>) -> Samples {
        let mut s = Samples::default();
        for r in records.into_iter().filter(|r| r.ok()) {
            s.ttft_ms.extend(r.ttft_ms);
            s.tpot_ms.extend(r.tpot_ms());
            s.itl_ms.extend_from_slice(&r.itl_ms);
            s.e2e_ms.push(r.e2e_ms);
            s.output_tokens.push(r.output_tokens as f64);
            s.prompt_tokens.extend(r.prompt_tokens.map(|p| p as f64));
        }
        s
    }
}

/// Throughputs of one round (for per-round rows).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundRates {
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_throughput: f64,
    pub errors: usize,
}

fn per_s(x: f64, secs: f64) -> f64 {
    if secs > 0.0 {
        x / secs
    } else {
        0.0
    }
}

fn token_totals(records: &[RequestRecord]) -> (usize, u64, u64) {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let out = ok.iter().map(|r| r.output_tokens).sum();
    let prompt = ok.iter().filter_map(|r| r.prompt_tokens).sum();
    (ok.len(), out, prompt)
}

impl RoundRates {
    pub fn of(run: &LevelRun) -> RoundRates {
        let (ok, out, prompt) = token_totals(&run.records);
        RoundRates {
            request_throughput: per_s(ok as f64, run.duration_s),
            output_throughput: per_s(out as f64, run.duration_s),
            total_throughput: per_s((out + prompt) as f64, run.duration_s),
            errors: run.records.len() - ok,
        }
    }
}

impl LevelSummary {
    /// Pools the rounds: latencies over all their requests, throughput as
    /// total tokens over total wall time.
    pub fn of(runs: &[&LevelRun]) -> LevelSummary {
        let records: Vec<RequestRecord> = runs.iter().flat_map(|r| r.records.iter().cloned()).collect();
        let duration_s: f64 = runs.iter().map(|r| r.duration_s).sum();
        let (ok, out, prompt) = token_totals(&records);
        let mut error_examples: Vec<String> = Vec::new();
        for e in records.iter().filter_map(|r| r.error.as_ref()) {
            if error_examples.len() < ERROR_EXAMPLES && !error_examples.contains(e) {
                error_examples.push(e.clone());
            }
        }
        let s = Samples::of(&records);
        LevelSummary {
            requests: records.len(),
            succeeded: ok,
            errors: records.len() - ok,
            error_examples,
            duration_s,
            request_throughput: per_s(ok as f64, duration_s),
            output_throughput: per_s(out as f64, duration_s),
            total_throughput: per_s((out + prompt) as f64, duration_s),
            output_tokens: out,
            prompt_tokens: prompt,
            ttft_ms: Stats::of(&s.ttft_ms),
            tpot_ms: Stats::of(&s.tpot_ms),
            itl_ms: Stats::of(&s.itl_ms),
            e2e_ms: Stats::of(&s.e2e_ms),
        }
    }
}
