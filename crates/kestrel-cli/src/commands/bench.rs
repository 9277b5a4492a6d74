//! `kestrel bench`: llama-bench-style prefill (pp) and decode (tg) speed of a
//! model, N runs after a warmup, written as a JSON capsule.
//!
//! pp<N>: one prefill of N tokens into an empty cache. tg<N>: N single-token
//! decode steps from an empty cache (as llama-bench measures them), greedy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_model::Model;
use serde_json::json;

use crate::device::{dispatch_with, BackendTask, Device, Kernels};
use crate::{loading, model_path};
use kestrel_bench::capsule;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// Prompt length of the prefill test (0 skips it).
    #[arg(long, default_value_t = 512)]
    pub pp: usize,
    /// Number of generated tokens of the decode test (0 skips it).
    #[arg(long, default_value_t = 128)]
    pub tg: usize,
    /// Timed runs of each test (after one warmup run).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// CUDA kernel set: fused (fast) or reference (plain kernels, for comparison).
    #[arg(long, value_enum, default_value = "fused")]
    pub kernels: Kernels,
    /// Write the capsule here (default: benchmarks/<date>-bench-<device>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: BenchArgs) -> Result<()> {
    let path = model_path::resolve(args.model.clone())?;
    dispatch_with(args.device, args.kernels, BenchTask { args, path })
}

struct BenchTask {
    args: BenchArgs,
    path: PathBuf,
}

/// Deterministic pseudo-random prompt tokens (no RNG state to carry).
fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i as u64 * 2_654_435_761 + 12345) % (vocab as u64 - 1000) + 1000) as u32)
        .collect()
}

fn run_pp<B: Backend>(model: &Model<B>, n: usize) -> Result<f64> {
    let bs = 16;
    let blocks = n.div_ceil(bs) + 1;
    let mut kv = model.backend.alloc_kv(&model.kv_spec(blocks, bs, KvDType::F32))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let toks = prompt_tokens(n, model.config.vocab_size);
    let t0 = Instant::now();
    for (i, chunk) in toks.chunks(512).enumerate() {
        let layout = BatchLayout::single(chunk, (i * 512) as u32, &table, bs as u32);
        let logits = model.forward(&layout, &mut kv, &[(chunk.len() - 1) as u32])?;
        model.backend.argmax_rows(&logits)?;
    }
    model.backend.synchronize()?;
    Ok(t0.elapsed().as_secs_f64())
}

fn run_tg<B: Backend>(model: &Model<B>, n: usize, first: u32) -> Result<f64> {
    let bs = 16;
    let blocks = n.div_ceil(bs) + 1;
    let mut kv = model.backend.alloc_kv(&model.kv_spec(blocks, bs, KvDType::F32))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut tok = first;
    let t0 = Instant::now();
    for pos in 0..n {
        let layout = BatchLayout::single(&[tok], pos as u32, &table, bs as u32);
        let logits = model.forward(&layout, &mut kv, &[0])?;
        tok = model.backend.argmax_rows(&logits)?[0];
    }
    Ok(t0.elapsed().as_secs_f64())
}

impl BackendTask for BenchTask {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<()> {
        let a = &self.args;
        let device = backend.describe();
        let (model, tok) = loading::load(&self.path, backend)?;
        let mut tests = Vec::new();
        for (name, n, is_pp) in [
            (format!("pp{}", a.pp), a.pp, true),
            (format!("tg{}", a.tg), a.tg, false),
        ] {
            if n == 0 {
                continue;
            }
            let bos = tok.bos_id().unwrap_or(0);
            let once = |m: &Model<B>| if is_pp { run_pp(m, n) } else { run_tg(m, n, bos) };
            once(&model).with_context(|| format!("warmup of {name}"))?;
            let mut secs = Vec::new();
            for _ in 0..a.runs.max(1) {
                secs.push(once(&model)?);
            }
            let tps: Vec<f64> = secs.iter().map(|s| n as f64 / s).collect();
            let st = capsule::Stats::of(&tps);
            eprintln!(
                "{name:>7}: {:>9.1} tok/s (median of {}; min {:.1}, max {:.1})",
                st.median,
                tps.len(),
                st.min,
                st.max
            );
            tests.push(json!({"test": name, "tokens": n, "seconds": secs, "tok_s": tps, "summary": st}));
        }
        let result = json!({"kind": "bench", "device": device, "tests": tests});
        let cap = capsule::write(&result, Some(&self.path), a.out.as_deref(), "bench")?;
        eprintln!("capsule: {}", cap.display());
        if a.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Ok(())
    }
}
