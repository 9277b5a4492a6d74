//! `kestrel bench-detok` end to end: the streaming decoder agrees with a full
//! decode on every sequence, and the timings are real positive numbers.

mod common;

use common::{kestrel, text};

use std::path::PathBuf;

use serde_json::Value;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-bench-detok-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_json(args: &[&str]) -> Value {
    let out = kestrel(args);
    let err = text(&out.stderr);
    assert!(out.status.success(), "bench-detok failed: {err}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)))
}

fn positive(v: &Value) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "not a positive number: {v}");
    x
}

#[test]
fn default_model_streams_exactly_and_faster_than_naive() {
    let model = kestrel_formats::default_model_path();
    assert!(
        model.exists(),
        "default model missing at {}: run scripts/fetch-model.sh",
        model.display()
    );
    let dir = scratch("default");
    let cap = dir.join("capsule.json");
    let j = run_json(&[
        "bench-detok",
        model.to_str().unwrap(),
        "--random",
        "4",
        "--runs",
        "3",
        "--json",
        "--out",
        cap.to_str().unwrap(),
    ]);
    assert_eq!(j["kind"], "bench-detok");
    assert_eq!(j["stream_mismatches"], 0, "{j}");
    assert_eq!(j["naive_mismatches"], 0, "{j}");
    // Gemma's vocabulary has all 256 byte-fallback tokens, and the random
    // sequences use them (split characters and invalid bytes).
    assert_eq!(j["byte_fallback_tokens"], 256);
    let seqs = j["sequences"].as_array().unwrap();
    assert_eq!(seqs.len(), 5);
    assert!(seqs[0]["tokens"].as_u64().unwrap() > 100, "{}", seqs[0]);
    for s in &seqs[1..] {
        assert_eq!(s["tokens"], 256);
        assert!(s["byte_tokens"].as_u64().unwrap() > 50, "{s}");
    }
    for s in seqs {
        assert_eq!(s["stream_matches"], true, "{s}");
        positive(&s["stream_ns_per_token"]);
        positive(&s["naive_ns_per_token"]);
    }
    positive(&j["create_us"]);
    for g in j["summary"].as_array().unwrap() {
        let (stream, naive) = (
            positive(&g["stream_ns_per_token"]),
            positive(&g["naive_ns_per_token"]),
        );
        // Re-decoding the whole prefix per token is linear in the position;
        // over hundreds of tokens it cannot beat one piece per token.
        assert!(naive > stream, "{g}");
        assert!((positive(&g["speedup"]) - naive / stream).abs() < 1e-6 * naive / stream);
    }
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&cap).unwrap()).unwrap();
    assert_eq!(c["result"]["kind"], "bench-detok");
    let rows = c["result"]["rows"].as_array().unwrap();
    for (test, metric) in [
        ("text", "stream_ns_per_token"),
        ("text", "naive_ns_per_token"),
        ("random", "speedup"),
        ("decoder", "create_us"),
    ] {
        let r = rows
            .iter()
            .find(|r| r["test"] == test && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no row {test}/{metric}"));
        positive(&r["stats"]["median"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_byte_level_vocabulary_and_a_text_file_work_too() {
    // The fixtures' byte-level BPE has no byte-fallback tokens: random
    // sequences are plain ids, and the text comes from --file.
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama/model-f32.gguf");
    let dir = scratch("fixture");
    let file = dir.join("text.txt");
    std::fs::write(&file, "Café 🦅 naïve — 漢字 and plain ASCII.\n".repeat(8)).unwrap();
    let j = run_json(&[
        "bench-detok",
        model.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--random",
        "2",
        "--random-len",
        "64",
        "--runs",
        "1",
        "--json",
        "--out",
        dir.join("c.json").to_str().unwrap(),
    ]);
    assert_eq!(j["stream_mismatches"], 0, "{j}");
    assert_eq!(j["byte_fallback_tokens"], 0);
    let seqs = j["sequences"].as_array().unwrap();
    assert!(seqs[0]["name"].as_str().unwrap().ends_with("text.txt"));
    assert_eq!(seqs[1]["tokens"], 64);
    let _ = std::fs::remove_dir_all(&dir);
}
