//! `kestrel bench`: llama-bench-style prefill (pp) and decode (tg) speed of a
//! model, N runs after a warmup, written as a JSON capsule.
//!
//! pp<N>: one prefill of N tokens into an empty cache. tg<N>: N single-token
//! decode steps from an empty cache (as llama-bench measures them), greedy.
//! TTFT of pp<N> is its prefill time; TPOT of tg<N> its mean step time.
//!
//! With `--batch`, `--shared-prefix` or `--interference` it measures the
//! engine instead (see `bench_engine`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_model::Model;
use serde_json::json;

use crate::device::{dispatch_with, BackendTask, Device, Kernels, KvArg};
use crate::{loading, model_path};
use kestrel_bench::{capsule, Better, Row};

use super::bench_engine;
use crate::memory;

#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// Prompt lengths of the prefill tests, comma-separated (0 skips).
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub pp: Vec<usize>,
    /// Generated tokens of the decode tests, comma-separated (0 skips).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub tg: Vec<usize>,
    /// Timed runs of each test (after one warmup run).
    #[arg(long, short = 'r', default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// CUDA kernel set: fused (fast) or reference (plain kernels, for comparison).
    #[arg(long, value_enum, default_value = "fused")]
    pub kernels: Kernels,
    /// KV cache element type (auto: f16 on a GPU, as llama.cpp; f32 on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub kv: KvArg,
    /// Engine benchmark: decode throughput with this many sequences at once
    /// (comma-separated list, e.g. 1,8,32,64,128,256).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Engine benchmark: requests sharing a prefix of this many tokens, with
    /// the prefix cache on and off.
    #[arg(long)]
    pub shared_prefix: Option<usize>,
    /// Requests of the shared-prefix benchmark.
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Engine benchmark: TPOT of `--streams` running sequences before and
    /// while a prompt of this many tokens is prefilled beside them.
    #[arg(long)]
    pub interference: Option<usize>,
    /// Running sequences of the interference benchmark.
    #[arg(long, default_value_t = 32)]
    pub streams: usize,
    /// Prompt tokens of each sequence in the engine benchmarks.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Generated tokens of each sequence in the batch benchmark.
    #[arg(long, default_value_t = 128)]
    pub gen_len: usize,
    /// Token budget of one engine step (chunked prefill) in the engine benchmarks.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    #[command(flatten)]
    pub long_prefill: super::long_prefill_args::LongPrefillArgs,
    #[command(flatten)]
    pub speculation: super::speculation_args::SpeculationArgs,
    /// Write the capsule here (default: benchmarks/<date>-bench-<device>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: BenchArgs) -> Result<()> {
    // Settings are checked before the model loads.
    args.speculation.get(0)?;
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

fn run_pp<B: Backend>(model: &Model<B>, n: usize, kvt: KvDType) -> Result<f64> {
    let bs = 16;
    let blocks = n.div_ceil(bs) + 1;
    let mut kv = model.backend.alloc_kv(&model.kv_spec(blocks, bs, kvt))?;
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

fn run_tg<B: Backend>(model: &Model<B>, n: usize, first: u32, kvt: KvDType) -> Result<f64> {
    let bs = 16;
    let blocks = n.div_ceil(bs) + 1;
    let mut kv = model.backend.alloc_kv(&model.kv_spec(blocks, bs, kvt))?;
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
        let (model, tok) = loading::load(&self.path, backend.clone())?;
        let kvt = a.kv.dtype(backend.as_ref());
        let mut rows = Vec::new();
        let mut tests = Vec::new();
        let engine_mode = !a.batch.is_empty() || a.shared_prefix.is_some() || a.interference.is_some();
        let mut engine = serde_json::Map::new();
        if engine_mode {
            let (model, tok) = (Arc::new(model), Arc::new(tok));
            let o = bench_engine::EngineBenchOpts {
                kv: kvt,
                block_size: 16,
                max_num_batched_tokens: a.max_num_batched_tokens,
                long_prefill: a.long_prefill.get(),
                prompt_len: a.prompt_len,
                gen_len: a.gen_len,
                speculation: a.speculation.get(0)?,
            };
            if !a.batch.is_empty() {
                let v = bench_engine::batch_curve(&model, &tok, &o, &a.batch, a.runs, &mut rows)?;
                engine.insert("batch".into(), v);
            }
            if let Some(len) = a.shared_prefix {
                let v = bench_engine::shared_prefix(&model, &tok, &o, len, a.requests, &mut rows)?;
                engine.insert("shared_prefix".into(), v);
            }
            if let Some(len) = a.interference {
                let v = bench_engine::interference(&model, &tok, &o, a.streams, len, &mut rows)?;
                engine.insert("interference".into(), v);
            }
        } else {
            let bos = tok.bos_id().unwrap_or(0);
            let tests_to_run: Vec<(String, usize, bool)> =
                a.pp.iter()
                    .map(|&n| (format!("pp{n}"), n, true))
                    .chain(a.tg.iter().map(|&n| (format!("tg{n}"), n, false)))
                    .filter(|t| t.1 > 0)
                    .collect();
            let runs = a.runs.max(1);
            let bar = indicatif::ProgressBar::new((tests_to_run.len() * (runs + 1)) as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix:>7} [{bar:30}] {pos}/{len} runs")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            for (name, n, is_pp) in tests_to_run {
                bar.set_prefix(name.clone());
                let once = |m: &Model<B>| {
                    if is_pp {
                        run_pp(m, n, kvt)
                    } else {
                        run_tg(m, n, bos, kvt)
                    }
                };
                once(&model).with_context(|| format!("warmup of {name}"))?;
                bar.inc(1);
                let mut secs = Vec::new();
                for _ in 0..runs {
                    secs.push(once(&model)?);
                    bar.inc(1);
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
                let (metric, lat, lat_raw) = if is_pp {
                    (
                        "prefill_tok_s",
                        "ttft_ms",
                        secs.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                    )
                } else {
                    (
                        "decode_tok_s",
                        "tpot_ms",
                        secs.iter().map(|s| s * 1e3 / n as f64).collect(),
                    )
                };
                rows.push(Row::new(&name, metric, "tok/s", Better::Higher, tps.clone()));
                rows.push(Row::new(&name, lat, "ms", Better::Lower, lat_raw));
                tests.push(json!({"test": name, "tokens": n, "seconds": secs, "tok_s": tps, "summary": st}));
            }
            bar.finish_and_clear();
        }
        let mem = memory::report(backend.as_ref(), &self.path);
        eprintln!("{}", memory::describe(&mem));
        rows.push(Row::new(
            "memory",
            "peak_host_mib",
            "MiB",
            Better::Lower,
            vec![mem.peak_host_mib],
        ));
        if let Some(d) = mem.device_used_mib {
            rows.push(Row::new(
                "memory",
                "device_used_mib",
                "MiB",
                Better::Lower,
                vec![d],
            ));
        }
        let result = json!({
            "kind": "bench",
            "device": device,
            "kv": format!("{kvt:?}").to_lowercase(),
            "tests": tests,
            "engine": engine,
            "memory": mem,
            "rows": rows,
        });
        let cap = capsule::write(&result, Some(&self.path), a.out.as_deref(), "bench")?;
        eprintln!("capsule: {}", cap.display());
        if a.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        Ok(())
    }
}
