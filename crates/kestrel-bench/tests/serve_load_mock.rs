//! bench-serve against in-process mock servers of known timing: measured
//! latencies, error counting, load shapes, and --compare with thresholds.

mod common;

use std::time::Duration;

use common::{config, start, MockSpec, MOCK_MODEL};
use kestrel_bench::serve_load::{self, parse_asserts, Level, Report, Role, Target};

fn within(name: &str, v: f64, lo: f64, hi: f64) {
    assert!(
        (lo..=hi).contains(&v),
        "{name} = {v:.3}, expected within [{lo}, {hi}]"
    );
}

#[test]
fn measured_latencies_match_the_mock_and_errors_are_counted() {
    let server = start(MockSpec {
        ttft: Duration::from_millis(40),
        itl: Duration::from_millis(10),
        tokens: 16,
        fail_every: 4,
        truncate_every: 5,
    });
    let cfg = config(&server.url, Level::Concurrency(4), 12);
    let outcome = serve_load::run(&cfg).expect("run");
    assert_eq!(outcome.targets[0].model, MOCK_MODEL, "model from GET /v1/models");
    // The mock has no /health: nothing names it, and the run goes on.
    assert!(outcome.targets[0].server.is_null());
    let report = Report::of(&outcome);
    eprintln!("{}", report.text());
    let s = &report.levels[0].summary;
    // Requests 4, 8, 12 get HTTP 500; 5 and 10 break off before [DONE].
    assert_eq!((s.requests, s.succeeded, s.errors), (12, 7, 5));
    let errors: Vec<&str> = outcome.runs[0]
        .run
        .records
        .iter()
        .filter_map(|r| r.error.as_deref())
        .collect();
    assert_eq!(
        errors.iter().filter(|e| e.starts_with("HTTP 500")).count(),
        3,
        "{errors:?}"
    );
    assert_eq!(
        errors
            .iter()
            .filter(|e| e.contains("without data: [DONE]"))
            .count(),
        2,
        "{errors:?}"
    );
    within("TTFT p50 ms", s.ttft_ms.median, 39.0, 70.0);
    within("ITL p50 ms", s.itl_ms.median, 8.0, 15.0);
    within("TPOT p50 ms", s.tpot_ms.median, 9.0, 14.0);
    within("E2E p50 ms", s.e2e_ms.median, 189.0, 260.0);
    assert_eq!(s.itl_ms.n, 7 * 15, "15 gaps per successful request");
    assert_eq!(s.output_tokens, 7 * 16, "completion_tokens from usage");
    assert_eq!(s.prompt_tokens, 7 * 7, "prompt_tokens from usage");
    // Four workers each streaming at most one token per 10 ms.
    within("output tok/s", s.output_throughput, 60.0, 400.0);
    assert!((s.output_throughput * s.duration_s - 112.0).abs() < 1e-6);

    // What was sent.
    let bodies = server.mock.bodies.lock().expect("bodies").clone();
    assert_eq!(bodies.len(), 12);
    for b in &bodies {
        assert_eq!(b["model"], MOCK_MODEL);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["max_tokens"], 16);
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["temperature"], 0.0, "greedy by default");
        assert_eq!(b["prompt"].as_str().map(|p| p.split(' ').count()), Some(12));
    }

    // The capsule result: rows per metric with raw samples and params.
    let result = report.result_json(&outcome);
    assert_eq!(result["kind"], "bench-serve");
    let rows = result["rows"].as_array().expect("rows");
    let ttft = rows.iter().find(|r| r["metric"] == "ttft_ms").expect("ttft row");
    assert_eq!(ttft["test"], "c=4");
    assert_eq!(ttft["raw"].as_array().map(Vec::len), Some(7));
    assert_eq!(ttft["params"]["concurrency"], 4.0);
    assert_eq!(ttft["params"]["input_len"], 12.0);
    assert_eq!(ttft["params"]["output_len"], 16.0);
    let error_row = rows.iter().find(|r| r["metric"] == "errors").expect("errors row");
    assert_eq!(error_row["raw"][0], 5.0);
    let requests = result["requests"].as_array().expect("requests");
    assert_eq!(requests.len(), 12);
    assert_eq!(requests.iter().filter(|r| r["error"].is_string()).count(), 5);
    assert!(report.text().contains("7 ok, 5 errors"), "{}", report.text());
}

#[test]
fn closed_loop_of_one_serialises_and_infinite_rate_sends_all_at_once() {
    let server = start(MockSpec {
        ttft: Duration::from_millis(20),
        itl: Duration::from_millis(5),
        tokens: 4,
        fail_every: 0,
        truncate_every: 0,
    });
    let one = serve_load::run(&config(&server.url, Level::Concurrency(1), 4)).expect("c=1");
    let recs = &one.runs[0].run.records;
    for w in recs.windows(2) {
        let prev_end = w[0].start_s + w[0].e2e_ms / 1e3;
        assert!(
            w[1].start_s >= prev_end - 1e-4,
            "request {} started at {:.4} s before request {} ended at {:.4} s",
            w[1].index,
            w[1].start_s,
            w[0].index,
            prev_end
        );
    }
    let burst = serve_load::run(&config(&server.url, Level::Rate(f64::INFINITY), 6)).expect("rate=inf");
    let recs = &burst.runs[0].run.records;
    assert_eq!(recs.len(), 6);
    let last_start = recs.iter().map(|r| r.start_s).fold(0.0, f64::max);
    let first_end = recs
        .iter()
        .map(|r| r.start_s + r.e2e_ms / 1e3)
        .fold(f64::MAX, f64::min);
    assert!(
        last_start < first_end,
        "all requests are in flight together ({last_start} vs {first_end})"
    );
    // Poisson arrivals at 50/s: spread out, about 20 ms apart on average.
    let poisson = serve_load::run(&config(&server.url, Level::Rate(50.0), 8)).expect("rate=50");
    let starts: Vec<f64> = poisson.runs[0].run.records.iter().map(|r| r.start_s).collect();
    assert!(
        starts.windows(2).all(|w| w[1] >= w[0]),
        "arrivals in order: {starts:?}"
    );
    within("last arrival s", starts[7], 0.02, 1.0);
}

#[test]
fn compare_assert_names_the_missed_threshold_and_passes_a_loose_one() {
    let fast = start(MockSpec {
        ttft: Duration::from_millis(10),
        itl: Duration::from_millis(5),
        tokens: 4,
        fail_every: 0,
        truncate_every: 0,
    });
    let slow = start(MockSpec {
        ttft: Duration::from_millis(60),
        itl: Duration::from_millis(5),
        tokens: 4,
        fail_every: 0,
        truncate_every: 0,
    });
    let mut cfg = config(&fast.url, Level::Concurrency(2), 4);
    cfg.output_len = 4;
    cfg.warmup = 1;
    cfg.rounds = 4;
    cfg.candidate = Some(Target {
        url: slow.url.clone(),
        model: None,
        api_key: None,
    });
    cfg.asserts = parse_asserts("ttft_p50_ratio<=1.2,throughput_ratio>=0.1").expect("thresholds");
    let mut outcome = serve_load::run(&cfg).expect("compare run");
    // Warmup plus 4 rounds of 4 on each server.
    assert_eq!(fast.mock.count.load(std::sync::atomic::Ordering::SeqCst), 17);
    assert_eq!(slow.mock.count.load(std::sync::atomic::Ordering::SeqCst), 17);
    // The order is shuffled per round: each server ran first at least once.
    for role in [Role::Baseline, Role::Candidate] {
        let ti = outcome
            .targets
            .iter()
            .position(|t| t.role == role)
            .expect("target");
        assert!(
            outcome.runs.iter().any(|m| m.target == ti && m.position == 0),
            "{role:?} never ran first"
        );
    }
    let report = Report::of(&outcome);
    eprintln!("{}", report.text());
    let c = &report.comparisons[0];
    let ttft = c
        .ratios
        .iter()
        .find(|r| r.metric.name() == "ttft_p50_ratio")
        .expect("ttft ratio");
    within("TTFT ratio", ttft.ratio.expect("ratio"), 2.5, 7.0);
    let err = report
        .assert_thresholds()
        .expect_err("the slow candidate misses ttft_p50_ratio<=1.2");
    let msg = err.to_string();
    assert!(msg.contains("ttft_p50_ratio<=1.2"), "{msg}");
    assert!(
        msg.contains(&format!("candidate {:.3} ms", ttft.candidate)),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("baseline {:.3} ms", ttft.baseline)),
        "{msg}"
    );
    assert!(
        !msg.contains("throughput_ratio"),
        "the throughput threshold held: {msg}"
    );
    let rows = report.rows(&outcome);
    assert!(rows
        .iter()
        .any(|r| r.test == "c=2" && r.metric == "ttft_p50_ratio"));
    assert!(rows
        .iter()
        .any(|r| r.test == "c=2 candidate" && r.metric == "ttft_ms"));

    outcome.config.asserts = parse_asserts("ttft_p50_ratio<=20,tpot_p50_ratio<=3").expect("thresholds");
    Report::of(&outcome)
        .assert_thresholds()
        .expect("loose thresholds hold");
}

#[test]
fn assert_without_compare_and_a_dead_server_are_clear_errors() {
    let mut cfg = config("http://127.0.0.1:9", Level::Concurrency(1), 1);
    cfg.asserts = parse_asserts("ttft_p50_ratio<=1.2").expect("thresholds");
    let e = serve_load::run(&cfg).expect_err("needs --compare").to_string();
    assert!(e.contains("--compare"), "{e}");
    cfg.asserts.clear();
    let e = serve_load::run(&cfg)
        .expect_err("nothing listens on port 9")
        .to_string();
    assert!(e.contains("/v1/models") && e.contains("--model"), "{e}");
    // With --model given, connection failures are counted, not fatal.
    cfg.baseline.model = Some("m".into());
    let o = serve_load::run(&cfg).expect("errors are counted");
    let s = &Report::of(&o).levels[0].summary;
    assert_eq!((s.requests, s.errors), (1, 1));
    assert!(
        s.error_examples[0].starts_with("connection"),
        "{:?}",
        s.error_examples
    );
}
