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
/// Oracle margins below this are near-ties for a float backend compared
/// with the f32 oracle (its f16 GEMM operands round at 2^-11, about a tenth
/// of what 8-bit activations do).
pub const EXACT_TIE: f64 = 0.05;

/// The reference README's free-running rule: match up to the first
/// near-tie (llama.cpp margin below `NEAR_TIE`) within the first 16 tokens.
pub fn readme_required(margins: &[f64]) -> usize {
    margins.iter().take(16).position(|&m| m < NEAR_TIE).unwrap_or(16)
}

/// One reference case of greedy.json.
pub struct RefCase {
    pub name: String,
    pub prompt: Vec<u32>,
    pub want: Vec<u32>,
    pub margins: Vec<f64>,
}

pub fn reference_cases(path: &std::path::Path) -> Vec<RefCase> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let refs: Value = serde_json::from_str(&text).unwrap();
    refs.as_array()
        .unwrap()
        .iter()
        .map(|case| RefCase {
            name: format!("{:?}", case["prompt"].as_str().unwrap()),
            prompt: serde_json::from_value(case["prompt_ids"].clone()).unwrap(),
            want: serde_json::from_value(case["tokens"].clone()).unwrap(),
            margins: case["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["margin"].as_f64().unwrap())
                .collect(),
        })
        .collect()
}

/// Teacher-forced logits: one prefill of the prompt and the reference's
/// own tokens; row i is the prediction of `want[i]`.
pub fn teacher_forced<B: Backend>(model: &Model<B>, prompt: &[u32], want: &[u32]) -> Vec<Vec<f32>> {
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
    flat.chunks(model.config.vocab_size)
        .map(<[f32]>::to_vec)
        .collect()
}

/// A row's top token and its lead over the runner-up.
pub fn top_and_margin(row: &[f32]) -> (u32, f64) {
    let top = kestrel_backend::layout::argmax(row);
    let second = row
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != top)
        .map(|(_, &v)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    (top as u32, (row[top] - second) as f64)
}

/// Relative L2 distance of `a` from `b`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Compare `model` with llama.cpp's greedy.json (free-running and
/// teacher-forced; see reference_gemma3.rs for the rule). Prints one line per
/// prompt and returns the violations.
///
/// `exact`: per case, the teacher-forced (top, margin) of the f32 oracle
/// (`CpuBackend::with_f32_weights`), for backends that keep activations in
/// floating point (CUDA). A robust step where the oracle itself picks
/// another token than llama.cpp is decided by llama.cpp's 8-bit activation
/// rounding, not by the weights; there the model must follow the oracle
/// instead (where the oracle's own margin is at least `EXACT_TIE`).
pub fn check_against_reference<B: Backend>(
    model: &Model<B>,
    path: &std::path::Path,
    exact: Option<&[Vec<(u32, f64)>]>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let (mut free_matched, mut forced_agree, mut total) = (0, 0, 0);
    for (c, case) in reference_cases(path).iter().enumerate() {
        let RefCase {
            name,
            prompt,
            want,
            margins,
        } = case;

        // Free-running.
        let (got, _) = greedy(model, prompt, want.len());
        let matched = got.iter().zip(want).take_while(|(a, b)| a == b).count();
        let required = readme_required(margins);
        let all_robust = margins.iter().take(16).all(|&m| m >= ROBUST);
        if all_robust && matched < 16 {
            failures.push(format!(
                "{name}: free-running matched {matched} < 16 with robust margins"
            ));
        }

        let mut agree = 0;
        let mut flips = Vec::new();
        for (i, row) in teacher_forced(model, prompt, want).iter().enumerate() {
            let (top, _) = top_and_margin(row);
            if top == want[i] {
                agree += 1;
                continue;
            }
            flips.push(format!("step {i} (ref margin {:.3})", margins[i]));
            if margins[i] < ROBUST {
                continue;
            }
            match exact.map(|e| e[c][i]) {
                Some((oracle, m)) if oracle != want[i] => {
                    if top != oracle && m >= EXACT_TIE {
                        failures.push(format!(
                            "{name}: step {i} picks {top}; llama.cpp {} (margin {:.3}) and the f32 oracle {oracle} (margin {m:.3}) disagree, and it follows neither",
                            want[i], margins[i]
                        ));
                    } else {
                        flips.push(format!(
                            "(f32 arithmetic also picks {oracle} there, margin {m:.3})"
                        ));
                    }
                }
                _ => failures.push(format!(
                    "{name}: step {i} picks {top}, llama.cpp {} with margin {:.3}",
                    want[i], margins[i]
                )),
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
