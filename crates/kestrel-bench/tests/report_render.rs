//! Rendering capsules: a synthetic capsule with `result.rows` and an old
//! `kestrel bench` capsule from benchmarks/ (converted to rows).

use kestrel_bench::report::{render, Capsule, ReportError};
use kestrel_bench::{Better, Row};
use serde_json::{json, Value};

const OLD_BENCH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../benchmarks/2026-11-22-bench-cpu-2core.json"
);

fn serve_capsule() -> Value {
    let ttft: Vec<f64> = (0..40).map(|i| 10.0 + i as f64).collect();
    let rows = vec![
        Row::new(
            "c=64",
            "output_tok_s",
            "tok/s",
            Better::Higher,
            vec![1200.0, 1250.0, 1300.0],
        )
        .with_param("concurrency", 64.0),
        Row::new("c=64", "ttft_ms", "ms", Better::Lower, ttft).with_param("concurrency", 64.0),
    ];
    json!({
        "capsule_version": 1,
        "kestrel_version": "0.1.0",
        "git_commit": "abcdef0123456789",
        "unix_time": 1795315800u64,
        "command": ["/usr/bin/kestrel", "bench-serve", "--url", "http://x:8000", "--prompt", "hello world"],
        "hardware": {"cpu": "Xeon", "logical_cores": 16,
                     "gpus": ["NVIDIA H200, 143771 MiB, 580.159.04, 9.0", "NVIDIA H200, 143771 MiB, 580.159.04, 9.0"]},
        "model": null,
        "result": {"kind": "bench-serve", "device": "remote", "model": "gemma-3-270m", "rows": rows}
    })
}

#[test]
fn new_style_capsule_renders_every_row_with_provenance() {
    let c = Capsule::from_json("serve.json", &serve_capsule()).expect("synthetic capsule parses");
    assert_eq!(c.kind, "bench-serve");
    assert_eq!(c.hardware, "2x NVIDIA H200, 143771 MiB");
    assert_eq!(c.model, "gemma-3-270m");
    assert_eq!(c.commit, "abcdef0123");
    assert_eq!(
        c.command,
        "kestrel bench-serve --url http://x:8000 --prompt 'hello world'"
    );
    let md = render::markdown(std::slice::from_ref(&c));
    assert!(md.starts_with("## bench-serve\n"), "{md}");
    // 40 samples: p95 is meaningful, p99 (needs 100) is not and has no column.
    assert!(
        md.contains("| test | metric | params | median | p95 | min .. max | n | unit |"),
        "{md}"
    );
    assert!(
        md.contains("| c=64 | output_tok_s | concurrency=64 | 1250.0 | - | 1200.0 .. 1300.0 | 3 | tok/s |"),
        "{md}"
    );
    // Samples 10..49: median 29.5, p95 at rank 37.05 -> 47.05.
    assert!(
        md.contains("| c=64 | ttft_ms | concurrency=64 | 29.50 | 47.05 | 10.00 .. 49.00 | 40 | ms |"),
        "{md}"
    );
    assert!(
        md.contains("| remote | 2x NVIDIA H200, 143771 MiB | gemma-3-270m | abcdef0123 |"),
        "{md}"
    );

    let csv = render::csv(std::slice::from_ref(&c));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("capsule,kind,test,metric,unit,better,n,mean,median,"));
    assert!(
        lines[1].starts_with("serve.json,bench-serve,c=64,output_tok_s,tok/s,higher,3,1250,1250,"),
        "{csv}"
    );
    // The device summary holds a comma: the field is quoted.
    assert!(lines[1].contains(",\"2x NVIDIA H200, 143771 MiB\","), "{csv}");

    let doc = render::json(&[c]);
    let rows = doc["rows"].as_array().expect("rows array");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["metric"], "ttft_ms");
    assert_eq!(rows[1]["stats"]["median"], 29.5);
    assert_eq!(rows[1]["params"]["concurrency"], 64.0);
    assert_eq!(rows[1]["better"], "lower");
}

#[test]
fn tuning_variables_precede_the_command() {
    let mut v = serve_capsule();
    v["env"] = json!({"KESTREL_ATTN_MIN_SPLITS": "8", "KESTREL_L2": "1"});
    let c = Capsule::from_json("serve.json", &v).expect("capsule with env parses");
    assert_eq!(
        c.command,
        "KESTREL_ATTN_MIN_SPLITS=8 KESTREL_L2=1 kestrel bench-serve --url http://x:8000 --prompt 'hello world'"
    );
    // Values are quoted like arguments, so the line can still be pasted back.
    v["env"] = json!({"KESTREL_KERNEL_CACHE": "/tmp/k cache"});
    let c = Capsule::from_json("serve.json", &v).expect("capsule with env parses");
    assert!(
        c.command
            .starts_with("KESTREL_KERNEL_CACHE='/tmp/k cache' kestrel bench-serve"),
        "{}",
        c.command
    );
}

#[test]
fn old_bench_capsule_from_benchmarks_renders_as_before() {
    let c = Capsule::read(std::path::Path::new(OLD_BENCH)).expect("benchmarks/ capsule reads");
    assert_eq!(c.kind, "bench");
    assert_eq!(c.rows.len(), 2);
    assert_eq!(c.rows[0].metric, "prefill_tok_s");
    assert_eq!(c.rows[1].metric, "decode_tok_s");
    assert_eq!(c.rows[1].raw.len(), 3);
    assert_eq!(c.rows[1].stats.median, 62.629890631707);
    let md = render::markdown(&[c]);
    assert!(md.contains("## bench\n"), "{md}");
    // Three runs: no percentile columns.
    assert!(!md.contains("p95"), "{md}");
    assert!(
        md.contains(
            "| pp512 | prefill_tok_s | 269.1 | 258.9 .. 289.9 | 3 | tok/s | cpu (avx512-vnni, 2 threads) \
             | AMD EPYC (2 threads) | gemma-3-270m-q4_k_m.gguf | d20fd52d29 |"
        ),
        "{md}"
    );
    assert!(
        md.contains("| tg128 | decode_tok_s | 62.63 | 60.22 .. 63.25 | 3 |"),
        "{md}"
    );
    assert!(
        md.contains("`kestrel bench --device cpu --runs 3 --out benchmarks/2026-11-22-bench-cpu-2core.json`"),
        "{md}"
    );
}

#[test]
fn capsules_are_grouped_by_kind_in_order_of_first_appearance() {
    let old = Capsule::read(std::path::Path::new(OLD_BENCH)).expect("benchmarks/ capsule reads");
    let serve = Capsule::from_json("serve.json", &serve_capsule()).expect("parses");
    let md = render::markdown(&[old.clone(), serve, old]);
    let bench_at = md.find("## bench\n").expect("bench section");
    let serve_at = md.find("## bench-serve\n").expect("bench-serve section");
    assert!(bench_at < serve_at);
    assert_eq!(md.matches("## ").count(), 2, "{md}");
    // Both bench capsules' rows sit in the first section.
    assert_eq!(md[..serve_at].matches("| pp512 |").count(), 2, "{md}");
}

#[test]
fn malformed_capsules_name_the_file_and_field() {
    let no_result = Capsule::from_json("a.json", &json!({"git_commit": null})).unwrap_err();
    assert!(matches!(&no_result, ReportError::Field { field, .. } if field == "result"));
    assert!(no_result.to_string().contains("a.json"), "{no_result}");

    let no_rows = Capsule::from_json("b.json", &json!({"result": {"kind": "validate"}})).unwrap_err();
    assert!(no_rows.to_string().contains("b.json: `result.rows`"), "{no_rows}");

    let bad_row = json!({"result": {"kind": "microbench", "rows": [{"test": "x", "metric": "gb_s"}]}});
    let err = Capsule::from_json("c.json", &bad_row).unwrap_err();
    assert!(matches!(err, ReportError::BadRow { index: 0, .. }), "{err}");
    assert!(err.to_string().contains("c.json: result.rows[0]"), "{err}");

    let bad_test = json!({"result": {"tests": [{"test": "tg1", "tok_s": ["fast"]}]}});
    let err = Capsule::from_json("d.json", &bad_test).unwrap_err();
    assert!(err.to_string().contains("result.tests[0].tok_s"), "{err}");

    let missing = Capsule::read(std::path::Path::new("/nonexistent/e.json")).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/e.json"), "{missing}");
}

#[test]
fn old_bench_test_without_summary_is_summarised_from_its_samples() {
    let c = json!({"result": {"device": "cpu", "tests": [{"test": "tg16", "tok_s": [3.0, 1.0, 2.0]}]}});
    let cap = Capsule::from_json("f.json", &c).expect("parses");
    assert_eq!(cap.kind, "bench");
    assert_eq!(cap.rows[0].stats.median, 2.0);
    assert_eq!(cap.rows[0].stats.n, 3);
    assert_eq!(cap.commit, "?");
    assert_eq!(cap.model, "-");
}
