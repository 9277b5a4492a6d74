//! `kestrel microbench` end to end: every op's fused implementation agrees
//! with its reference on the CPU, the JSON and the capsule carry a row per
//! op, and bad names are clear errors.

mod common;

use common::text;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

const ALL_OPS: &str = "rms_norm,add_rms_norm,residual_norm,geglu,swiglu,rope,qk_norm_rope,\
qk_norm_rope_store,gemv,qkv,gated_ffn,matmul_residual_norm,gated_ffn_residual_norm,attention,\
argmax,softmax,top_k";

/// `kestrel microbench ARGS...`.
fn kestrel(args: &[&str]) -> Output {
    let mut all = vec!["microbench"];
    all.extend_from_slice(args);
    common::kestrel(&all)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kestrel-microbench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Short runs: two timed samples of one run each, a small peak probe, and
/// weights rotated over a few copies (2 MiB of them) so that rotation runs too.
const QUICK: [&str; 10] = [
    "--iters",
    "2",
    "--warmup",
    "0",
    "--min-sample-us",
    "0",
    "--peak-mib",
    "8",
    "--cold-mib",
    "2",
];

/// Runs microbench on the CPU with `args` and returns its JSON (stdout)
/// after checking that it succeeded.
fn run_json(args: &[&str], capsule: &Path) -> Value {
    let mut all = vec![
        "--device",
        "cpu",
        "--json",
        "--out",
        capsule.to_str().expect("utf-8 path"),
    ];
    all.extend_from_slice(&QUICK);
    all.extend_from_slice(args);
    let out = kestrel(&all);
    let err = text(&out.stderr);
    assert!(out.status.success(), "microbench failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    serde_json::from_str(&text(&out.stdout)).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {err}"))
}

fn cases(v: &Value) -> &Vec<Value> {
    v["cases"].as_array().expect("cases array")
}

#[test]
fn every_op_agrees_with_its_reference_on_the_cpu() {
    let capsule = scratch("all-ops.json");
    let v = run_json(
        &[
            "--ops",
            ALL_OPS,
            "--types",
            "q8_0,q4_k,f16,model",
            "--shapes",
            "attn_out,ffn_up",
            "--rows",
            "1,8",
            "--ctx",
            "64,300",
        ],
        &capsule,
    );
    assert_eq!(v["kind"], "microbench");
    assert_eq!(v["device"], "cpu");
    assert!(
        v["peak"]["gb_s"].as_f64().unwrap_or(0.0) > 0.0,
        "no peak: {}",
        v["peak"]
    );
    let ops: Vec<&str> = ALL_OPS.split(',').collect();
    for op in &ops {
        let a = &v["agreement"][op];
        assert_eq!(a["ok"], true, "{op}: {a}");
        assert!(
            a["cases"].as_u64().unwrap_or(0) >= 2,
            "{op}: rows 1 and 8 measured: {a}"
        );
    }
    let mut skipped = 0;
    for c in cases(&v) {
        match c["status"].as_str() {
            Some("ok") => {
                let agr = &c["agreement"];
                assert_eq!(agr["ok"], true, "{}: {agr}", c["test"]);
                assert!(agr["compared"].as_u64().unwrap_or(0) > 0, "{}", c["test"]);
                for imp in ["reference", "fused"] {
                    assert!(
                        c[imp]["median_us"].as_f64().unwrap_or(0.0) > 0.0,
                        "{} {imp}",
                        c["test"]
                    );
                }
            }
            Some("skipped") => {
                // Only K-quants of 640-wide rows cannot run.
                assert!(c["reason"].as_str().unwrap_or("").contains("Q4_K"), "{c}");
                skipped += 1;
            }
            _ => panic!("case did not run: {c}"),
        }
    }
    // q4_k: gemv ffn_up, qkv, gated_ffn x2 activations, gated_ffn_residual_norm; x2 rows.
    assert_eq!(skipped, 10);
    // The rows: a gb_s row with a positive median for every op.
    let rows = v["rows"].as_array().expect("rows");
    for op in &ops {
        let prefix = format!("{op}/");
        let ok = rows.iter().any(|r| {
            r["test"].as_str().is_some_and(|t| t.starts_with(&prefix))
                && r["metric"] == "gb_s"
                && r["stats"]["median"].as_f64().unwrap_or(0.0) > 0.0
                && !r["raw"].as_array().is_none_or(Vec::is_empty)
        });
        assert!(ok, "no gb_s row for {op}");
    }
    // Every measured case has a time row per implementation.
    let timed = rows.iter().filter(|r| r["metric"] == "time_us").count();
    let measured = cases(&v).iter().filter(|c| c["status"] == "ok").count();
    assert_eq!(timed, 2 * measured);
    // The capsule wraps the same result with provenance.
    let cap: Value = serde_json::from_str(&std::fs::read_to_string(&capsule).expect("capsule written"))
        .expect("capsule is JSON");
    assert_eq!(cap["result"]["kind"], "microbench");
    assert_eq!(cap["result"]["rows"], v["rows"]);
    assert!(cap["model"].is_null());
}

#[test]
fn gemv_of_every_weight_type_agrees() {
    let capsule = scratch("gemv.json");
    let types = "f32,f16,bf16,q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k,q8_k";
    let v = run_json(
        &[
            "--ops", "gemv", "--types", types, "--shapes", "attn_out", "--rows", "1,8",
        ],
        &capsule,
    );
    let cs = cases(&v);
    assert_eq!(cs.len(), 14 * 2);
    for c in cs {
        assert_eq!(c["status"], "ok", "{c}");
        assert_eq!(c["agreement"]["ok"], true, "{c}");
        // Bytes: the weights as stored plus activations in and out.
        let t = c["type"].as_str().expect("type");
        let rows = c["rows"].as_f64().expect("rows");
        let fused_gb_s = c["fused"]["gb_s"].as_f64().expect("gb_s");
        assert!(fused_gb_s > 0.0, "{c}");
        let bytes = c["bytes"].as_f64().expect("bytes");
        let weights = bytes - 4.0 * rows * (640.0 + 1024.0);
        let per_weight = weights / (640.0 * 1024.0);
        let want = match t {
            "f32" => 4.0,
            "f16" | "bf16" => 2.0,
            "q8_0" => 34.0 / 32.0,
            "q4_0" => 18.0 / 32.0,
            "q4_k" => 144.0 / 256.0,
            "q6_k" => 210.0 / 256.0,
            _ => per_weight,
        };
        assert!(
            (per_weight - want).abs() < 1e-9,
            "{t}: {per_weight} bytes per weight"
        );
    }
}

#[test]
fn bad_names_and_values_are_clear_errors() {
    let cases: [(&[&str], &[&str]); 5] = [
        (&["--ops", "rms_norm,softmaxx"], &["--ops", "'softmaxx'", "top_k"]),
        (&["--types", "q4_k,q9_0"], &["--types", "'q9_0'", "q6_k", "model"]),
        (&["--shapes", "lm"], &["--shapes", "'lm'", "lm_head"]),
        (&["--iters", "0"], &["--iters"]),
        (&["--rows", "0"], &["--rows"]),
    ];
    for (args, needles) in cases {
        let mut all = vec!["--device", "cpu"];
        all.extend_from_slice(args);
        let out = kestrel(&all);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
        }
        // Rejected before any measuring.
        assert!(!err.contains("peak bandwidth"), "{err}");
    }
}

#[test]
fn cuda_runs_where_there_is_a_gpu_and_says_why_not_elsewhere() {
    let capsule = scratch("cuda.json");
    let mut args = vec![
        "--device",
        "cuda",
        "--ops",
        "rms_norm,gemv",
        "--types",
        "q8_0",
        "--shapes",
        "ffn_up",
    ];
    args.extend_from_slice(&["--rows", "1", "--json", "--out", capsule.to_str().expect("utf-8")]);
    args.extend_from_slice(&QUICK);
    let out = kestrel(&args);
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if Path::new("/dev/nvidia0").exists() {
        assert!(out.status.success(), "{err}");
        let v: Value = serde_json::from_str(&text(&out.stdout)).expect("JSON");
        assert_eq!(v["device"], "cuda:0");
        assert_eq!(v["agreement"]["gemv"]["ok"], true, "{}", v["agreement"]);
    } else {
        assert!(!out.status.success());
        assert!(err.contains("--device cuda:0: no usable GPU"), "{err}");
        assert!(!capsule.exists(), "a capsule without results was written");
    }
}
