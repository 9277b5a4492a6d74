//! Comparing two capsules: join on (test, metric), verdicts by direction and
//! threshold, rows only one side has.

use kestrel_bench::report::compare::{compare, csv, judge, markdown, Verdict};
use kestrel_bench::report::Capsule;
use kestrel_bench::{Better, Row};
use serde_json::json;

fn capsule(name: &str, rows: Vec<Row>) -> Capsule {
    Capsule::from_json(
        name,
        &json!({"git_commit": "0123456789abcdef", "result": {"kind": "bench-serve", "rows": rows}}),
    )
    .expect("synthetic capsule parses")
}

fn one(test: &str, metric: &str, unit: &str, better: Better, v: f64) -> Row {
    Row::new(test, metric, unit, better, vec![v])
}

#[test]
fn verdicts_follow_direction_and_threshold() {
    let base = capsule(
        "base.json",
        vec![
            one("c=8", "output_tok_s", "tok/s", Better::Higher, 1000.0),
            one("c=8", "ttft_ms", "ms", Better::Lower, 50.0),
            one("c=8", "tpot_ms", "ms", Better::Lower, 10.0),
            one("c=8", "requests", "count", Better::Neither, 100.0),
            one("c=1", "output_tok_s", "tok/s", Better::Higher, 200.0),
        ],
    );
    let cand = capsule(
        "cand.json",
        vec![
            // +10% throughput: better.
            one("c=8", "output_tok_s", "tok/s", Better::Higher, 1100.0),
            // +10% latency: worse.
            one("c=8", "ttft_ms", "ms", Better::Lower, 55.0),
            // +1.5%: neutral.
            one("c=8", "tpot_ms", "ms", Better::Lower, 10.15),
            one("c=8", "requests", "count", Better::Neither, 120.0),
            one("c=64", "output_tok_s", "tok/s", Better::Higher, 5000.0),
        ],
    );
    let c = compare(&base, &cand, 2.0);
    let verdict = |m: &str| {
        c.rows
            .iter()
            .find(|r| r.test == "c=8" && r.metric == m)
            .map(|r| r.verdict)
            .expect("row joined")
    };
    assert_eq!(verdict("output_tok_s"), Verdict::Better);
    assert_eq!(verdict("ttft_ms"), Verdict::Worse);
    assert_eq!(verdict("tpot_ms"), Verdict::Neutral);
    assert_eq!(verdict("requests"), Verdict::Changed);
    let tput = &c.rows[0];
    assert!((tput.ratio.expect("ratio") - 1.1).abs() < 1e-12);
    assert!((tput.change_pct.expect("change") - 10.0).abs() < 1e-9);
    assert_eq!(
        (c.tally.better, c.tally.worse, c.tally.neutral, c.tally.changed),
        (1, 1, 1, 1)
    );

    assert_eq!(c.only_in_baseline.len(), 1);
    assert_eq!(c.only_in_baseline[0].test, "c=1");
    assert_eq!(c.only_in_candidate.len(), 1);
    assert_eq!(c.only_in_candidate[0].test, "c=64");

    let md = markdown(&c);
    assert!(
        md.contains("| c=8 | output_tok_s | 1000.0 | 1100.0 | tok/s | 1.100 | +10.0% | **better** |"),
        "{md}"
    );
    assert!(
        md.contains("| c=8 | ttft_ms | 50.00 | 55.00 | ms | 1.100 | +10.0% | **worse** |"),
        "{md}"
    );
    assert!(
        md.contains("| c=8 | tpot_ms | 10.00 | 10.15 | ms | 1.015 | +1.5% | neutral |"),
        "{md}"
    );
    assert!(
        md.contains("Only in the baseline:\n\n- c=1 / output_tok_s\n"),
        "{md}"
    );
    assert!(
        md.contains("Only in the candidate:\n\n- c=64 / output_tok_s\n"),
        "{md}"
    );
    assert!(md.contains("1 better, 1 worse, 1 neutral, 1 changed."), "{md}");

    let table = csv(&c);
    assert!(table.contains("c=8,ttft_ms,ms,50,55,1.1,"), "{table}");
    assert!(table.contains("c=1,output_tok_s,,,,,,only-baseline\n"), "{table}");
    assert!(
        table.contains("c=64,output_tok_s,,,,,,only-candidate\n"),
        "{table}"
    );

    let doc = serde_json::to_value(&c).expect("comparison serialises");
    assert_eq!(doc["rows"][1]["verdict"], "worse");
    assert_eq!(doc["only_in_candidate"][0]["test"], "c=64");
    assert_eq!(doc["baseline"]["capsule"], "base.json");
}

#[test]
fn judge_edges() {
    // Lower latency by 10%: better; lower throughput by 10%: worse.
    assert_eq!(judge(Better::Lower, 100.0, 90.0, 2.0).2, Verdict::Better);
    assert_eq!(judge(Better::Higher, 100.0, 90.0, 2.0).2, Verdict::Worse);
    // -1.5% is neutral too; +2.5% is not.
    assert_eq!(judge(Better::Higher, 100.0, 98.5, 2.0).2, Verdict::Neutral);
    assert_eq!(judge(Better::Higher, 100.0, 102.5, 2.0).2, Verdict::Better);
    // From zero: no ratio, but the direction still decides.
    assert_eq!(
        judge(Better::Higher, 0.0, 5.0, 2.0),
        (None, None, Verdict::Better)
    );
    assert_eq!(
        judge(Better::Higher, 0.0, 0.0, 2.0),
        (None, None, Verdict::Neutral)
    );
    // A larger threshold turns a 10% change neutral.
    assert_eq!(judge(Better::Higher, 100.0, 110.0, 15.0).2, Verdict::Neutral);
}

#[test]
fn repeated_rows_pair_in_order_and_units_must_agree() {
    let base = capsule(
        "a.json",
        vec![
            one("p", "ms", "ms", Better::Lower, 10.0),
            one("p", "ms", "ms", Better::Lower, 20.0),
            one("q", "bw", "GB/s", Better::Higher, 100.0),
        ],
    );
    let cand = capsule(
        "b.json",
        vec![
            one("p", "ms", "ms", Better::Lower, 10.0),
            one("p", "ms", "ms", Better::Lower, 30.0),
            one("q", "bw", "MB/s", Better::Higher, 100000.0),
        ],
    );
    let c = compare(&base, &cand, 2.0);
    assert_eq!(c.rows.len(), 3);
    assert_eq!(c.rows[0].verdict, Verdict::Neutral);
    assert_eq!(c.rows[1].verdict, Verdict::Worse);
    assert_eq!(c.rows[1].baseline, 20.0);
    assert_eq!(c.rows[2].verdict, Verdict::Incomparable);
    assert_eq!(c.rows[2].unit, "GB/s vs MB/s");
    assert!(c.only_in_baseline.is_empty() && c.only_in_candidate.is_empty());
}
