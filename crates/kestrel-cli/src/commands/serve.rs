//! `kestrel serve`: the OpenAI-compatible HTTP server (kestrel-server) over
//! the batching engine.
//!
//! SIGINT or SIGTERM stops it gracefully: no new connection is accepted and
//! the requests in flight finish; a second signal, or `--shutdown-grace`
//! seconds, aborts those still running, and the server exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kestrel_backend::{Backend, KvDType};
use kestrel_engine::{Engine, EngineConfig};
use kestrel_model::Model;
use kestrel_server::{AppState, ServerOptions, DEFAULT_MAX_BODY_BYTES};

use super::speculation_args::DEFAULT_SPEC_TOKENS;
use crate::device::{dispatch_with, BackendTask, Device, Kernels, KvArg};
use crate::{loading, memory, model_path};

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer <KEY>` on the API routes.
    #[arg(long)]
    pub api_key: Option<String>,
    /// Name clients use as `model` (default: the model file's stem).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most sequences the engine runs at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one engine step.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    #[command(flatten)]
    pub long_prefill: super::long_prefill_args::LongPrefillArgs,
    #[command(flatten)]
    pub speculation: super::speculation_args::SpeculationArgs,
    /// Blocks of 16 tokens in the paged KV pool (default: sized from free
    /// device memory on a GPU, see --gpu-memory-utilization; 1024 on the CPU).
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Fraction of the GPU's memory kestrel may use in all; the KV pool gets
    /// what the weights and a 4 GiB working reserve leave of it.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// KV cache element type (auto: f16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub kv: KvArg,
    /// Sequences admitted beyond --max-num-seqs (queued); more get 503.
    #[arg(long, default_value_t = 1024)]
    pub max_waiting: usize,
    /// Largest request body in bytes (more gets 413).
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Seconds the requests in flight get to finish after SIGINT/SIGTERM
    /// before they are aborted (a second signal aborts them at once).
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// CUDA kernel set: fused (fast) or reference (plain kernels, for comparison).
    #[arg(long, value_enum, default_value = "fused")]
    pub kernels: Kernels,
}

pub fn main(args: ServeArgs) -> Result<()> {
    // Settings are checked before the model loads.
    args.speculation.get(DEFAULT_SPEC_TOKENS)?;
    if !(args.shutdown_grace.is_finite() && args.shutdown_grace >= 0.0) {
        anyhow::bail!(
            "--shutdown-grace is {}, expected a number of seconds >= 0",
            args.shutdown_grace
        );
    }
    let path = model_path::resolve(args.model.clone())?;
    dispatch_with(args.device, args.kernels, ServeTask { args, path })
}

struct ServeTask {
    args: ServeArgs,
    path: PathBuf,
}

impl BackendTask for ServeTask {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<()> {
        let a = &self.args;
        let device = backend.describe();
        let kv_dtype = a.kv.dtype(backend.as_ref());
        let (model, tok) = loading::load(&self.path, backend.clone())?;
        let num_kv_blocks = match a.num_kv_blocks {
            Some(n) => n,
            None => pool_blocks(&model, backend.as_ref(), kv_dtype, a)?,
        };
        let config = EngineConfig {
            kv_dtype,
            num_kv_blocks,
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            long_prefill: a.long_prefill.get(),
            speculation: a.speculation.get(DEFAULT_SPEC_TOKENS)?,
            ..EngineConfig::default()
        };
        let identity = serde_json::json!({
            "name": "kestrel",
            "version": env!("CARGO_PKG_VERSION"),
            "commit": kestrel_bench::capsule::git_commit(),
            "model": self.path.display().to_string(),
            "model_bytes": std::fs::metadata(&self.path).map(|m| m.len()).ok(),
            "device": device,
            "kv_dtype": format!("{kv_dtype:?}"),
            "num_kv_blocks": num_kv_blocks,
            "max_num_seqs": a.max_num_seqs,
            "max_num_batched_tokens": a.max_num_batched_tokens,
            "speculation": config.speculation,
        });
        let speculation = match config.speculation {
            Some(s) => format!(
                "n-gram, up to {} drafts (greedy requests, at most {} running)",
                s.tokens, s.max_seqs
            ),
            None => "off".into(),
        };
        let tok = Arc::new(tok);
        let backend = model.backend.clone();
        let engine = Engine::new(Arc::new(model), tok.clone(), config)?.spawn()?;
        // What the device holds once the KV pool is allocated (GPU only).
        let mem = memory::report(backend.as_ref(), &self.path);
        if mem.device_buffers.is_some() {
            eprintln!("kestrel serve: {}", memory::describe(&mem));
        }
        let name = a.served_model_name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let options = ServerOptions {
            model_name: name.clone(),
            api_key: a.api_key.clone(),
            max_running: a.max_num_seqs,
            max_waiting: a.max_waiting,
            max_body_bytes: a.max_body_bytes,
            identity,
        };
        let max_len = engine.max_model_len();
        let state = AppState::new(engine.clone(), tok, options);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("kestrel-http")
            .build()
            .context("starting the async runtime")?;
        let served = runtime.block_on(async {
            let addr = format!("{}:{}", a.host, a.port);
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let local = listener.local_addr()?;
            eprintln!(
                "kestrel serve: listening on http://{local} | model {name} ({}, context {max_len} tokens) | device {device} | speculation {speculation}{}",
                self.path.display(),
                if a.api_key.is_some() { " | API key required" } else { "" }
            );
            let grace = Duration::from_secs_f64(a.shutdown_grace);
            let stop = async move {
                kestrel_server::shutdown_signal().await;
                eprintln!(
                    "kestrel serve: shutting down (requests in flight get {:.0} s; signal again to abort them)",
                    grace.as_secs_f64()
                );
            };
            // Polled only after `stop`, so it waits for a second signal.
            let force = async move {
                tokio::select! {
                    _ = kestrel_server::shutdown_signal() => {},
                    _ = tokio::time::sleep(grace) => {},
                }
            };
            kestrel_server::serve_with_shutdown(listener, state, stop, force)
                .await
                .context("serving HTTP")
        });
        engine.shutdown();
        eprintln!("kestrel serve: stopped");
        served
    }
}

/// Working memory kept out of the KV pool: activations, logits, graphs, cuBLAS.
const RESERVE_BYTES: u64 = 4 << 30;
/// Tokens per KV block (the engine's default).
const BLOCK_TOKENS: usize = 16;

/// KV blocks that fit in `--gpu-memory-utilization` of the device after what
/// is in use now (weights, their f16 mirrors, the CUDA context) and a working
/// reserve; at most enough for every sequence to fill the context. 1024 on a
/// backend without device memory (the CPU).
fn pool_blocks<B: Backend>(model: &Model<B>, be: &B, kv: KvDType, a: &ServeArgs) -> Result<usize> {
    if !(a.gpu_memory_utilization > 0.0 && a.gpu_memory_utilization <= 1.0) {
        bail!(
            "--gpu-memory-utilization {}: expected a fraction in (0, 1]",
            a.gpu_memory_utilization
        );
    }
    let Some((free, total)) = be.device_memory() else {
        return Ok(1024);
    };
    let per_block = model.kv_spec(1, BLOCK_TOKENS, kv).bytes() as u64;
    let allowed = (total as f64 * a.gpu_memory_utilization) as u64;
    let used = total.saturating_sub(free);
    let budget = allowed.saturating_sub(used).saturating_sub(RESERVE_BYTES);
    let most = a.max_num_seqs * model.config.context_len.div_ceil(BLOCK_TOKENS);
    let blocks = ((budget / per_block.max(1)) as usize).min(most);
    if blocks == 0 {
        bail!(
            "no room for a KV pool: {:.1} GiB in use of {:.1} GiB, --gpu-memory-utilization {} (raise it or pass --num-kv-blocks)",
            used as f64 / (1u64 << 30) as f64,
            total as f64 / (1u64 << 30) as f64,
            a.gpu_memory_utilization
        );
    }
    eprintln!(
        "KV pool: {blocks} blocks of {BLOCK_TOKENS} tokens ({} tokens, {:.1} GiB, {kv:?}) from --gpu-memory-utilization {}",
        blocks * BLOCK_TOKENS,
        (blocks as u64 * per_block) as f64 / (1u64 << 30) as f64,
        a.gpu_memory_utilization
    );
    Ok(blocks)
}
