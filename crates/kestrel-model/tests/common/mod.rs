//! Helpers shared by the model's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_model::Model;

/// The default model: `$KESTREL_MODEL` or the cache path that
/// `scripts/fetch-model.sh` writes. Missing is a failure, not a skip: CI
/// fetches it first.
pub fn default_model() -> PathBuf {
    let p = std::env::var_os("KESTREL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            home.join(".cache/kestrel/models/gemma-3-270m-q4_k_m.gguf")
        });
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
    let bs = 16usize;
    let blocks = (prompt.len() + n + bs).div_ceil(bs);
    // A scrambled block table: correctness must not depend on blocks being in order.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let kv_dtype = match std::env::var("KESTREL_TEST_KV").as_deref() {
        Ok("f16") => KvDType::F16,
        Ok("bf16") => KvDType::Bf16,
        _ => KvDType::F32,
    };
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
    while out.len() < n {
        let pos = (prompt.len() + out.len() - 1) as u32;
        let layout = BatchLayout::single(&[*out.last().unwrap()], pos, &table, bs as u32);
        let logits = model.forward(&layout, &mut kv, &[0]).unwrap();
        out.push(model.backend.argmax_rows(&logits).unwrap()[0]);
    }
    (out, first)
}

pub fn load<B: Backend>(path: &std::path::Path, be: B) -> Model<B> {
    Model::load(path, Arc::new(be)).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}
