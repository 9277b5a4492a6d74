//! bench-serve's per-level statistics against hand-computed values.

use kestrel_bench::serve_load::runner::LevelRun;
use kestrel_bench::serve_load::{LevelSummary, RequestRecord};
use kestrel_bench::Stats;

fn record(index: usize, ttft: f64, e2e: f64, tokens: u64, prompt: u64, itl: Vec<f64>) -> RequestRecord {
    RequestRecord {
        index,
        ttft_ms: Some(ttft),
        e2e_ms: e2e,
        itl_ms: itl,
        chunks: tokens as usize,
        output_tokens: tokens,
        prompt_tokens: Some(prompt),
        usage_reported: true,
        status: Some(200),
        ..RequestRecord::default()
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn percentiles_interpolate_between_ranks() {
    let v: Vec<f64> = (1..=100).map(f64::from).collect();
    let s = Stats::of(&v);
    assert!(close(s.median, 50.5));
    assert!(close(s.p95, 95.05));
    assert!(close(s.p99, 99.01));
    assert!(close(s.mean, 50.5));
}

#[test]
fn tpot_excludes_the_first_token_and_needs_two() {
    let r = record(0, 40.0, 190.0, 16, 10, Vec::new());
    assert!(close(r.tpot_ms().unwrap(), 10.0));
    assert_eq!(record(0, 40.0, 40.0, 1, 10, Vec::new()).tpot_ms(), None);
    let no_text = RequestRecord {
        ttft_ms: None,
        output_tokens: 5,
        ..RequestRecord::default()
    };
    assert_eq!(no_text.tpot_ms(), None);
}

#[test]
fn level_summary_pools_rounds_and_leaves_failures_out_of_latencies() {
    // Round 1: TTFT 10, 20, 30 ms; one failed request (its numbers must not count).
    let failed = RequestRecord {
        index: 3,
        ttft_ms: Some(1000.0),
        e2e_ms: 5000.0,
        output_tokens: 99,
        status: Some(500),
        error: Some("HTTP 500: boom".into()),
        ..RequestRecord::default()
    };
    let r1 = LevelRun {
        records: vec![
            record(0, 10.0, 110.0, 11, 5, vec![10.0; 10]),
            record(1, 20.0, 120.0, 11, 5, vec![10.0; 10]),
            record(2, 30.0, 230.0, 21, 5, vec![10.0; 20]),
            failed,
        ],
        duration_s: 1.0,
    };
    // Round 2: one request, TTFT 40 ms, ITL 20 ms.
    let r2 = LevelRun {
        records: vec![record(0, 40.0, 240.0, 11, 7, vec![20.0; 10])],
        duration_s: 3.0,
    };
    let s = LevelSummary::of(&[&r1, &r2]);
    assert_eq!((s.requests, s.succeeded, s.errors), (5, 4, 1));
    assert_eq!(s.error_examples, vec!["HTTP 500: boom".to_string()]);
    assert!(close(s.duration_s, 4.0));
    assert_eq!(s.output_tokens, 11 + 11 + 21 + 11);
    assert_eq!(s.prompt_tokens, 5 + 5 + 5 + 7);
    assert!(close(s.request_throughput, 4.0 / 4.0));
    assert!(close(s.output_throughput, 54.0 / 4.0));
    assert!(close(s.total_throughput, (54.0 + 22.0) / 4.0));
    // TTFT 10, 20, 30, 40: median 25, mean 25, p95 = 30 + 0.85 * 10.
    assert!(close(s.ttft_ms.median, 25.0));
    assert!(close(s.ttft_ms.p95, 38.5));
    assert_eq!(s.ttft_ms.n, 4);
    // TPOT: (110-10)/10 = 10, (120-20)/10 = 10, (230-30)/20 = 10, (240-40)/10 = 20.
    assert!(close(s.tpot_ms.median, 10.0));
    assert!(close(s.tpot_ms.mean, 12.5));
    // ITL pooled: 40 gaps of 10 ms and 10 of 20 ms.
    assert_eq!(s.itl_ms.n, 50);
    assert!(close(s.itl_ms.mean, (40.0 * 10.0 + 10.0 * 20.0) / 50.0));
    assert!(close(s.e2e_ms.max, 240.0));
}
