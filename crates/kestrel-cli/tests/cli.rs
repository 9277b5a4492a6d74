//! The `kestrel` binary end to end: what users type, what they see.
//! Bad input must give a clear error naming the file and the problem, a
//! non-zero exit, and never a panic.

mod common;

use common::{kestrel, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kestrel_formats::GgufWriter;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn default_model() -> PathBuf {
    let p = kestrel_formats::default_model_path();
    assert!(
        p.exists(),
        "default model missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

fn reference(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/gemma3-270m")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// A failed command: non-zero exit, no panic, and stderr mentions every needle.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

#[test]
fn run_prints_only_the_greedy_text_on_stdout() {
    // "The quick brown fox": kestrel matches all 32 of llama.cpp's greedy tokens.
    let refs = reference("greedy.json");
    let case = refs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "The quick brown fox")
        .unwrap();
    let model = default_model();
    let out = kestrel(&[
        "run",
        model.to_str().unwrap(),
        "--prompt",
        "The quick brown fox",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.trim_end_matches('\n'), case["text"].as_str().unwrap());
    let err = text(&out.stderr);
    assert!(
        err.contains("prefill:") && err.contains("decode:") && err.contains("tok/s"),
        "{err}"
    );
    // Greedy runs speculate by default (the text is llama.cpp's all the
    // same): "lazy dog" repeats, so drafts run.
    assert!(err.contains("drafted tokens accepted"), "{err}");
}

#[test]
fn stop_string_ends_the_text_before_it() {
    let out = kestrel(&[
        "run",
        "--prompt",
        "The capital of France is",
        "--temperature",
        "0",
        "--max-tokens",
        "32",
        "--stop",
        " France",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Greedy: " the capital of the country of France. ..." -> cut before " France".
    assert_eq!(
        text(&out.stdout).trim_end_matches('\n'),
        " the capital of the country of"
    );
    assert!(
        text(&out.stderr).contains("finish: Stop"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = [
        "run",
        "--prompt",
        "Once upon a time",
        "--temperature",
        "0.9",
        "--seed",
        "42",
        "--max-tokens",
        "16",
        "--device",
        "cpu",
    ];
    let a = kestrel(&args);
    let b = kestrel(&args);
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert_eq!(text(&a.stdout), text(&b.stdout));
    assert!(!text(&a.stdout).trim().is_empty());
}

#[test]
fn chat_flag_uses_the_built_in_gemma_template() {
    let out = kestrel(&[
        "run",
        "--chat",
        "--prompt",
        "Say hello.",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let stats: Value = serde_json::from_str(err.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap();
    // <bos><start_of_turn>user\nSay hello.<end_of_turn>\n<start_of_turn>model\n
    let prompt_tokens = stats["prompt_tokens"].as_u64().unwrap();
    assert!(
        (10..=14).contains(&prompt_tokens),
        "prompt tokens {prompt_tokens}"
    );
    // The memory report: the host peak holds at least the mapped weights'
    // touched pages; no device figures on the CPU.
    let mem = &stats["memory"];
    assert!(mem["peak_host_mib"].as_f64().unwrap() > 100.0, "{mem}");
    assert!(
        mem["device_buffers"].is_null() && mem["device_used_mib"].is_null(),
        "{mem}"
    );
}

#[test]
fn tokenize_matches_llama_cpp() {
    let refs = reference("tokenize.json");
    for case in refs.as_array().unwrap().iter().take(5) {
        let t = case["text"].as_str().unwrap();
        let out = kestrel(&["tokenize", t]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let ids: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        assert_eq!(ids, case["ids_with_bos"], "{t:?}");
        let out = kestrel(&["tokenize", "--no-bos", t]);
        let ids: Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
        assert_eq!(ids, case["ids"], "{t:?} --no-bos");
    }
}

#[test]
fn inspect_reports_the_default_model() {
    let out = kestrel(&["inspect", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(j["architecture"], "gemma3");
    assert_eq!(j["hyperparameters"]["layers"], 18);
    assert_eq!(j["hyperparameters"]["kv_heads"], 1);
    assert_eq!(j["hyperparameters"]["sliding_window_layers"], 15);
    assert_eq!(j["tensor_types"]["Q8_0"]["count"], 10);
    assert_eq!(j["tokenizer"]["vocab_size"], 262144);
    assert!(j["memory"]["weights_bytes"].as_u64().unwrap() > 240_000_000);
}

#[test]
fn inspect_and_run_tiny_safetensors_model() {
    let dir = fixtures().join("qwen3/hf");
    let out = kestrel(&["inspect", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("qwen3"));
    let out = kestrel(&[
        "run",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello",
        "--max-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let src = std::fs::read(fixtures().join("llama/model-f32.gguf")).unwrap();
    let p = tmp("truncated.gguf");
    std::fs::write(&p, &src[..src.len() / 2]).unwrap();
    let out = kestrel(&["inspect", p.to_str().unwrap()]);
    assert_clean_error(&out, &["truncated.gguf", "truncated"]);
    let out = kestrel(&["run", p.to_str().unwrap(), "--prompt", "x", "--device", "cpu"]);
    assert_clean_error(&out, &["truncated.gguf"]);
}

#[test]
fn not_a_gguf_is_a_clear_error() {
    let p = tmp("garbage.gguf");
    std::fs::write(&p, b"this is not a model file at all, just text").unwrap();
    let out = kestrel(&["inspect", p.to_str().unwrap()]);
    assert_clean_error(&out, &["garbage.gguf"]);
}

#[test]
fn unknown_architecture_is_named() {
    let p = tmp("mamba.gguf");
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "mamba");
    w.add_meta("mamba.block_count", 1u32);
    w.add_f32_tensor("token_embd.weight", &[4, 8], &[0.5f32; 32])
        .unwrap();
    w.write_to(&p).unwrap();
    let out = kestrel(&["inspect", p.to_str().unwrap()]);
    assert_clean_error(&out, &["mamba.gguf", "unknown architecture 'mamba'", "llama"]);
}

#[test]
fn missing_tokenizer_and_missing_config_are_named() {
    // An HF directory without tokenizer.json.
    let src = fixtures().join("llama/hf");
    let dir = tmp("no-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let out = kestrel(&["run", dir.to_str().unwrap(), "--prompt", "x", "--device", "cpu"]);
    assert_clean_error(&out, &["tokenizer.json"]);
    // A directory with no config.json.
    let empty = tmp("empty-dir");
    std::fs::create_dir_all(&empty).unwrap();
    let out = kestrel(&["inspect", empty.to_str().unwrap()]);
    assert_clean_error(&out, &["empty-dir", "config.json"]);
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let long = "word ".repeat(100);
    let out = kestrel(&["run", "--prompt", &long, "--ctx", "32", "--device", "cpu"]);
    assert_clean_error(&out, &["prompt has", "tokens", "context"]);
}

#[test]
fn missing_model_and_bad_device_are_clear() {
    let out = kestrel(&["run", "/nonexistent/model.gguf", "--prompt", "x"]);
    assert_clean_error(&out, &["/nonexistent/model.gguf"]);
    let out = kestrel(&["run", "--prompt", "x", "--device", "tpu"]);
    assert_clean_error(&out, &["tpu"]);
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args(["run", "--prompt", "x"])
        .env("KESTREL_MODEL", "/nonexistent/default.gguf")
        .output()
        .unwrap();
    assert_clean_error(&out, &["scripts/fetch-model.sh"]);
}

#[test]
fn explicit_cuda_without_gpu_is_an_error_not_a_panic() {
    if Path::new("/dev/nvidia0").exists() {
        eprintln!("SKIP: this machine has a GPU; the no-GPU error path cannot be shown here");
        return;
    }
    let out = kestrel(&["run", "--prompt", "x", "--device", "cuda", "--max-tokens", "1"]);
    assert_clean_error(&out, &["cuda", "no usable GPU"]);
    // auto falls back to the CPU and says why, in one line.
    let out = kestrel(&[
        "run",
        "--prompt",
        "Hi",
        "--device",
        "auto",
        "--max-tokens",
        "2",
        "--temperature",
        "0",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("device: cpu (no usable GPU:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn chat_keeps_history_and_reuses_the_cache() {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kestrel"))
        .args([
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "--device",
            "cpu",
            "--verbose",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Italy?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!text(&out.stdout).trim().is_empty());
    // Two answers; the second turn finds the first turn's tokens in the KV cache.
    let stats: Vec<&str> = err.lines().filter(|l| l.contains("prompt tokens (")).collect();
    assert_eq!(stats.len(), 2, "{err}");
    let cached: usize = stats[1]
        .split(" prompt tokens (")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(cached > 10, "second turn reused only {cached} tokens: {err}");
}

#[test]
fn perplexity_runs_and_reports_bad_files() {
    let file = tmp("ppl.txt");
    std::fs::write(&file, "The quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let dir = fixtures().join("gemma3/model-f32.gguf");
    let out = kestrel(&[
        "perplexity",
        dir.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "64",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let ppl = j["result"]["ppl"].as_f64().unwrap();
    // A random-weight model over a 480-token vocabulary: finite, above 1.
    assert!(ppl.is_finite() && ppl > 1.0, "ppl {ppl}");
    assert_eq!(j["result"]["scored"].as_u64().unwrap() % 31, 0);
    let out = kestrel(&["perplexity", "--file", "/nonexistent/text.txt", "--device", "cpu"]);
    assert_clean_error(&out, &["/nonexistent/text.txt"]);
}

/// The engine benchmarks end to end on the tiny gemma3 fixture (a
/// 480-token vocabulary: the benchmark prompts must stay inside it): the
/// batch curve, the shared prefix computed once, and the interference run
/// sampling the streams' token intervals while the long prompt is
/// prefilled (chunks that add up to the prompt, one interval each on the
/// CPU, a positive ratio).
#[test]
fn engine_benchmarks_run_on_a_small_vocabulary() {
    let model = fixtures().join("gemma3/model-f32.gguf");
    let capsule = tmp("engine-bench.json");
    let out = kestrel(&[
        "bench",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--batch",
        "1,4",
        "--shared-prefix",
        "64",
        "--requests",
        "4",
        "--interference",
        "100",
        "--streams",
        "3",
        "--max-num-batched-tokens",
        "32",
        "--runs",
        "1",
        "--out",
        capsule.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&capsule).unwrap()).unwrap();
    let e = &j["result"]["engine"];
    let batch = e["batch"].as_array().unwrap();
    assert_eq!(batch.len(), 2);
    for b in batch {
        assert!(b["decode_tok_s"][0].as_f64().unwrap() > 0.0, "{b}");
    }
    let sp = &e["shared_prefix"];
    let saved = sp["prefix_cache_on"]["prefix_cache"]["tokens_saved"]
        .as_u64()
        .unwrap();
    assert!(
        saved >= 3 * 48,
        "the 3 later requests reuse the prefix's full blocks: {sp}"
    );
    assert_eq!(
        sp["prefix_cache_off"]["prefix_cache"]["tokens_saved"].as_u64(),
        Some(0)
    );
    let on = sp["prefix_cache_on"]["tokens_computed"].as_u64().unwrap();
    let off = sp["prefix_cache_off"]["tokens_computed"].as_u64().unwrap();
    assert_eq!(off - on, saved, "{sp}");
    let it = &e["interference"];
    let chunks: Vec<u64> = it["prefill_chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    assert_eq!(chunks.iter().sum::<u64>(), 100, "chunks {chunks:?}");
    assert!(
        chunks.iter().all(|&c| c <= 32 - 3),
        "chunks {chunks:?} exceed the step budget"
    );
    assert_eq!(it["tpot_during_ms"].as_array().unwrap().len(), chunks.len());
    assert!(it["ratio"].as_f64().unwrap() > 0.0, "{it}");
}

#[test]
fn out_of_range_speculation_settings_are_named_before_loading() {
    // A model path that does not exist: the settings fail first.
    for (args, needles) in [
        (
            vec!["--spec-tokens", "17"],
            vec!["--spec-", "speculation.tokens", "17", "[1, 16]"],
        ),
        (
            vec!["--spec-tokens", "4", "--spec-ngram-min", "5"],
            vec!["speculation.min_ngram", "5"],
        ),
    ] {
        for cmd in ["serve", "bench", "run", "chat"] {
            let mut a = vec![cmd, "no-such-model.gguf"];
            if cmd == "run" {
                a.extend(["--prompt", "x"]);
            }
            a.extend(&args);
            let out = kestrel(&a);
            assert_clean_error(&out, &needles);
            assert!(
                !text(&out.stderr).contains("no-such-model"),
                "{cmd}: settings must be checked before the model: {}",
                text(&out.stderr)
            );
        }
    }
}
