//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_model::Model;
use serde_json::Value;

/// The default model (`kestrel_formats::default_model_path`, the path
/// `scripts/fetch-model.sh` writes). Missing is a failure, not a skip: CI
/// fetches it first.
pub fn default_model() -> PathBuf {
    let p = kestrel_formats::default_model_path();
    assert!(
        p.exists(),
        "default model missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn shared_dir() -> PathBuf {
    repo_root().join("../shared")
}

/// Greedy continuation of `prompt` for `n` tokens, one sequence, KV in
/// blocks of 16; also returns the logits of the first prediction.
pub fn greedy<B: Backend>(model: &Model<B>, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let kv_dtype = match std::env::var("KESTREL_TEST_KV").as_deref() {
        Ok("f16") => KvDType::F16,
        Ok("bf16") => KvDType::Bf16,
        _ => KvDType::F32,
    };
    let (out, first, _) = greedy_steps(model, prompt, n, kv_dtype, false);
    (out, first)
}

/// `greedy` with the KV element type given; with `keep_steps`, also the
/// logits of every decode step after the first prediction.
pub fn greedy_steps<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    n: usize,
    kv_dtype: KvDType,
    keep_steps: bool,
) -> (Vec<u32>, Vec<f32>, Vec<Vec<f32>>) {
    let bs = 16usize;
    let blocks = (prompt.len() + n + bs).div_ceil(bs);
    // A scrambled block table: correctness must not depend on blocks being in order.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut kv = model
        .backend
        .alloc_kv(&model.kv_spec(blocks, bs, kv_dtype))
        .unwrap();
    let layout = BatchLayout::single(prompt, 0, &table, bs as u32);
    let logits = model
        .forward(&layout, &mut kv, &[(prompt.len() - 1) as u32])
        .unwrap();
    let first = model.backend.read_act(&logits).unwrap();
    let mut out = vec![model.backend.argmax_rows(&logits).unwrap()[0]];
    drop(logits); // the model reuses its logits buffer
    let mut steps = Vec::new();
    while out.len() < n {
        let pos = (prompt.len() + out.len() - 1) as u32;
        let layout = BatchLayout::single(&[*out.last().unwrap()], pos, &table, bs as u32);
        let logits = model.forward(&layout, &mut kv, &[0]).unwrap();
        if keep_steps {
            steps.push(model.backend.read_act(&logits).unwrap());
        }
        out.push(model.backend.argmax_rows(&logits).unwrap()[0]);
    }
    (out, first, steps)
}

pub fn load<B: Backend>(path: &std::path::Path, be: B) -> Model<B> {
    Model::load(path, Arc::new(be)).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

const NEAR_TIE: f64 = 0.05;
/// Reference margins below this are inside llama.cpp's own numerical spread
/// (docs/REFERENCE-NUMERICS.md); see reference_gemma3.rs.
pub const ROBUST: f64 = 0.15;

/// Compare `model` with llama.cpp's greedy.json (free-running and
/// teacher-forced; see reference_gemma3.rs for the rule). Prints one line per
/// prompt and returns the violations.
pub fn check_against_reference<B: Backend>(model: &Model<B>, path: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let refs: Value = serde_json::from_str(&text).unwrap();
    let vocab = model.config.vocab_size;
    let mut failures = Vec::new();
    let (mut free_matched, mut forced_agree, mut total) = (0, 0, 0);
    for case in refs.as_array().unwrap() {
        let name = format!("{:?}", case["prompt"].as_str().unwrap());
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let margins: Vec<f64> = case["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["margin"].as_f64().unwrap())
            .collect();

        // Free-running.
        let (got, _) = greedy(model, &prompt, want.len());
        let matched = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let required = margins.iter().take(16).position(|&m| m < NEAR_TIE).unwrap_or(16);
        let all_robust = margins.iter().take(16).all(|&m| m >= ROBUST);
        if all_robust && matched < 16 {
            failures.push(format!(
                "{name}: free-running matched {matched} < 16 with robust margins"
            ));
        }

        // Teacher-forced: one prefill of prompt + reference tokens.
        let seq: Vec<u32> = prompt.iter().chain(&want[..want.len() - 1]).copied().collect();
        let blocks = seq.len().div_ceil(16) + 1;
        let table: Vec<u32> = (0..blocks as u32).collect();
        let mut kv = model
            .backend
            .alloc_kv(&model.kv_spec(blocks, 16, KvDType::F32))
            .unwrap();
        let rows: Vec<u32> = (prompt.len() as u32 - 1..seq.len() as u32).collect();
        let logits = model
            .forward(&BatchLayout::single(&seq, 0, &table, 16), &mut kv, &rows)
            .unwrap();
        let flat = model.backend.read_act(&logits).unwrap();
        let mut agree = 0;
        let mut flips = Vec::new();
        for (i, row) in flat.chunks(vocab).enumerate() {
            let top = kestrel_backend::layout::argmax(row) as u32;
            if top == want[i] {
                agree += 1;
            } else {
                flips.push(format!("step {i} (ref margin {:.3})", margins[i]));
                if margins[i] >= ROBUST {
                    failures.push(format!(
                        "{name}: step {i} picks {top}, llama.cpp {} with margin {:.3}",
                        want[i], margins[i]
                    ));
                }
            }
        }
        println!(
            "{name:<55} free-running {matched:>2}/32 (README rule {required}{}) | teacher-forced {agree}/32 {}",
            if all_robust { ", asserted" } else { "" },
            if flips.is_empty() { String::new() } else { format!("differs at {}", flips.join(", ")) }
        );
        free_matched += matched;
        forced_agree += agree;
        total += want.len();
    }
    println!("free-running matched {free_matched}/{total}; teacher-forced agreement {forced_agree}/{total}");
    failures
}
