//! Rows, their statistics and report rows survive a trip through capsule JSON.

use kestrel_bench::report::{render, Capsule, ReportRow};
use kestrel_bench::{Better, Row, Stats};
use serde_json::json;

#[test]
fn row_and_stats_round_trip_through_json() {
    let row = Row::new("c=64", "itl_ms", "ms", Better::Lower, vec![1.25, 0.5, 3.0, 2.0])
        .with_param("concurrency", 64.0)
        .with_param("input_len", 128.0);
    let text = serde_json::to_string(&row).expect("row serialises");
    assert!(text.contains(r#""better":"lower""#), "{text}");
    let back: Row = serde_json::from_str(&text).expect("row parses back");
    assert_eq!(back, row);

    let stats = Stats::of(&[5.0, 1.0, 4.0]);
    let back: Stats = serde_json::from_str(&serde_json::to_string(&stats).expect("ser")).expect("de");
    assert_eq!(back, stats);

    // A row without params omits the field and reads back with none.
    let bare = Row::new("t", "m", "x", Better::Neither, vec![1.0]);
    let text = serde_json::to_string(&bare).expect("ser");
    assert!(!text.contains("params"), "{text}");
    assert_eq!(serde_json::from_str::<Row>(&text).expect("de"), bare);
}

#[test]
fn capsule_rows_and_report_rows_round_trip() {
    let rows = vec![
        Row::new(
            "rms_norm/cuda/fused",
            "gb_s",
            "GB/s",
            Better::Higher,
            vec![810.5, 799.0, 805.25],
        ),
        Row::new(
            "rms_norm/cuda/fused",
            "max_abs_err",
            "abs",
            Better::Lower,
            vec![1e-6],
        ),
    ];
    let capsule =
        json!({"git_commit": "feedface", "result": {"kind": "microbench", "device": "cuda", "rows": rows}});
    // Through text, as a capsule file would be.
    let text = serde_json::to_string_pretty(&capsule).expect("ser");
    let c = Capsule::from_json("m.json", &serde_json::from_str(&text).expect("de")).expect("capsule");
    assert_eq!(c.rows, rows);

    let doc = render::json(&[c]);
    let parsed: Vec<ReportRow> = serde_json::from_value(doc["rows"].clone()).expect("report rows parse back");
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0].stats, rows[0].stats);
    assert_eq!(parsed[0].kind, "microbench");
    assert_eq!(parsed[1].better, Better::Lower);
}
