//! Tiny random-weight llama, qwen2, qwen3 and gemma3 models against golden
//! logits from Hugging Face transformers (tests/fixtures/, made by
//! scripts/make_fixtures.py), through the safetensors and the GGUF path.
//!
//! Tolerances: the goldens were computed in float32 from the stored
//! (rounded) weights. kestrel quantizes activations to 8 bits only for
//! quantized weights, so float files must agree to 1e-3 absolute; Q8_0 files
//! (quantized weights and activations, as llama.cpp does) within 0.5 max /
//! 0.1 mean of the float model's logits, with the same argmax wherever the
//! golden top-1/top-2 gap exceeds 0.5.

mod common;

use std::path::{Path, PathBuf};

use kestrel_backend::cpu::CpuBackend;
use kestrel_backend::{Backend, BatchLayout, KvDType};
use serde_json::Value;

struct Golden {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn fixture_dir(arch: &str) -> PathBuf {
    common::repo_root().join("tests/fixtures").join(arch)
}

fn golden(arch: &str, file: &str) -> Golden {
    let p = fixture_dir(arch).join(file);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    Golden {
        tokens: serde_json::from_value(v["tokens"].clone()).unwrap(),
        logits: serde_json::from_value(v["logits"].clone()).unwrap(),
        greedy: serde_json::from_value(v["greedy"].clone()).unwrap(),
    }
}

/// Logits of every position of `tokens`, computed as one prefill in two
/// chunks (so the second chunk attends over cached K/V).
fn all_logits(path: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let model = common::load(path, CpuBackend::new());
    let bs = 4usize; // small blocks: many block boundaries inside the prompt
    let blocks = tokens.len().div_ceil(bs) + 1;
    // Blocks out of order: correctness must not depend on a contiguous table.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut kv = model
        .backend
        .alloc_kv(&model.kv_spec(blocks, bs, KvDType::F32))
        .unwrap();
    let split = tokens.len() / 2 + 1;
    let mut out = Vec::new();
    for (start, chunk) in [(0, &tokens[..split]), (split, &tokens[split..])] {
        let layout = BatchLayout::single(chunk, start as u32, &table, bs as u32);
        let rows: Vec<u32> = (0..chunk.len() as u32).collect();
        let logits = model.forward(&layout, &mut kv, &rows).unwrap();
        let flat = model.backend.read_act(&logits).unwrap();
        let vocab = model.config.vocab_size;
        out.extend(flat.chunks(vocab).map(<[f32]>::to_vec));
    }
    out
}

fn max_and_mean_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    let mut sum = 0f64;
    let mut n = 0usize;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            let d = (p - q).abs();
            assert!(d.is_finite(), "non-finite logit");
            max = max.max(d);
            sum += d as f64;
            n += 1;
        }
    }
    (max, (sum / n as f64) as f32)
}

fn check_exact(arch: &str, file: &str) {
    let g = golden(arch, "golden.json");
    let path = fixture_dir(arch).join(file);
    let got = all_logits(&path, &g.tokens);
    let (max, mean) = max_and_mean_diff(&got, &g.logits);
    println!("{arch}/{file}: max |diff| {max:.2e}, mean {mean:.2e}");
    assert!(max <= 1e-3, "{arch}/{file}: max abs logit diff {max} > 1e-3");
    // Greedy generation through the decode path.
    let model = common::load(&path, CpuBackend::new());
    let (gen, _) = common::greedy(&model, &g.tokens, g.greedy.len());
    assert_eq!(gen, g.greedy, "{arch}/{file}: greedy continuation differs");
}

fn check_q8(arch: &str) {
    let g = golden(arch, "golden.json");
    let got = all_logits(&fixture_dir(arch).join("model-q8_0.gguf"), &g.tokens);
    let (max, mean) = max_and_mean_diff(&got, &g.logits);
    println!("{arch}/model-q8_0.gguf: max |diff| {max:.3}, mean {mean:.4}");
    assert!(max <= 0.5 && mean <= 0.1, "{arch} q8_0: max {max} mean {mean}");
    for (pos, (x, y)) in got.iter().zip(&g.logits).enumerate() {
        let mut sorted = y.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 0.5 {
            assert_eq!(
                kestrel_backend::layout::argmax(x),
                kestrel_backend::layout::argmax(y),
                "{arch} q8_0: argmax differs at position {pos}"
            );
        }
    }
}

#[test]
fn llama_safetensors_f32() {
    check_exact("llama", "hf");
}
#[test]
fn llama_gguf_f32() {
    check_exact("llama", "model-f32.gguf");
}
#[test]
fn llama_gguf_q8_0() {
    check_q8("llama");
}
#[test]
fn qwen2_safetensors_bf16() {
    check_exact("qwen2", "hf");
}
#[test]
fn qwen2_gguf_bf16() {
    check_exact("qwen2", "model-bf16.gguf");
}
#[test]
fn qwen2_gguf_q8_0() {
    check_q8("qwen2");
}
#[test]
fn qwen3_safetensors_f16() {
    check_exact("qwen3", "hf");
}
#[test]
fn qwen3_gguf_f16() {
    check_exact("qwen3", "model-f16.gguf");
}
#[test]
fn gemma3_safetensors_f32() {
    check_exact("gemma3", "hf");
}
#[test]
fn gemma3_gguf_f32() {
    check_exact("gemma3", "model-f32.gguf");
}

/// Steps of ever new sizes (as a server's changing batch sizes and prompt
/// chunks produce) keep the model's per-size step buffers bounded, and the
/// results of a size seen again are unchanged after its buffers were dropped.
#[test]
fn step_buffers_stay_bounded_across_many_sizes() {
    let model = common::load(&fixture_dir("llama").join("model-f32.gguf"), CpuBackend::new());
    let bs = 16usize;
    let blocks = 200 / bs + 2;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut kv = model
        .backend
        .alloc_kv(&model.kv_spec(blocks, bs, KvDType::F32))
        .unwrap();
    let run = |n: usize, kv: &mut _| {
        let toks: Vec<u32> = (0..n as u32).map(|i| 5 + i % 50).collect();
        let layout = BatchLayout::single(&toks, 0, &table, bs as u32);
        let rows: Vec<u32> = (0..n as u32).collect();
        let logits = model.forward(&layout, kv, &rows).unwrap();
        model.backend.read_act(&logits).unwrap()
    };
    let first = run(3, &mut kv);
    for n in 1..=120 {
        run(n, &mut kv);
        // (Logit buffers are capped by bytes, 1 GiB, which this tiny
        // vocabulary never reaches: only the scratch cap bites here.)
        let (scratch, _) = model.step_buffer_counts();
        assert!(scratch <= 48, "{scratch} scratch sets after size {n}");
    }
    assert_eq!(run(3, &mut kv), first, "size 3 after its buffers were recycled");
}
