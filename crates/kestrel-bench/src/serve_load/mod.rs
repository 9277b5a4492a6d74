//! `bench-serve`: a load generator for any OpenAI-compatible server
//! (kestrel serve, llama-server, vLLM).
//!
//! Requests stream over SSE with `stream_options.include_usage`; per request
//! it measures TTFT (send to first generated text), the gaps between text
//! chunks (ITL), TPOT ((e2e - ttft) / (output tokens - 1)), end-to-end time
//! and the server-reported token counts. Load is a closed loop of N workers
//! (`Level::Concurrency`) or open-loop Poisson arrivals (`Level::Rate`).
//! With a candidate server both run in alternating shuffled order per round
//! and are compared as candidate / baseline ratios, optionally against
//! thresholds.
//!
//! [`run`] measures, [`Report::of`] summarises; [`self_test`] measures the
//! client's own token intake on one core.

pub mod chunk;
pub mod client;
pub mod config;
pub mod error;
pub mod prompts;
pub mod report;
pub mod run;
pub mod runner;
pub mod selftest;
pub mod sse;
pub mod summary;

pub use client::RequestRecord;
pub use config::{
    parse_asserts, parse_concurrency, parse_rates, Endpoint, Level, LoadConfig, Op, RatioMetric, Target,
    Threshold,
};
pub use error::Error;
pub use report::Report;
pub use run::{run, Outcome, Role};
pub use selftest::{self_test, SelfTestConfig, SelfTestResult};
pub use sse::SseParser;
pub use summary::LevelSummary;
