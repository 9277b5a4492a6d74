//! `kestrel perplexity [MODEL] --file TEXT`: perplexity with llama.cpp's
//! protocol (see kestrel_engine::perplexity), to compare with
//! `llama-perplexity -f TEXT -c N` on the same model.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kestrel_backend::Backend;

use crate::device::{dispatch, BackendTask, Device};
use crate::{loading, model_path};

#[derive(Args, Clone, Debug)]
pub struct PerplexityArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// The text to score.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Tokens per chunk (llama-perplexity's -c).
    #[arg(long = "ctx", short = 'c', default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many chunks (default: all).
    #[arg(long)]
    pub chunks: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn main(args: PerplexityArgs) -> Result<()> {
    let path = model_path::resolve(args.model.clone())?;
    dispatch(args.device, PplTask { args, path })
}

struct PplTask {
    args: PerplexityArgs,
    path: PathBuf,
}

impl BackendTask for PplTask {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<()> {
        let a = &self.args;
        let text =
            std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
        let (model, tok) = loading::load(&self.path, backend)?;
        // As llama-perplexity: control-token text in the file stays text.
        let mut ids = tok.encode_text(&text, tok.add_bos_default())?;
        if let Some(n) = a.chunks {
            ids.truncate(n.saturating_mul(a.ctx));
        }
        let bos = tok.bos_id().unwrap_or(ids[0]);
        eprintln!("{} tokens, {} chunks of {}", ids.len(), ids.len() / a.ctx, a.ctx);
        let t0 = Instant::now();
        let r = kestrel_engine::perplexity(&model, &ids, a.ctx, bos, |done, total| {
            eprint!("\r[{done}/{total}]");
        })?;
        eprintln!();
        let secs = t0.elapsed().as_secs_f64();
        let running: Vec<String> = r
            .per_chunk
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[{}]{p:.4}", i + 1))
            .collect();
        eprintln!("{}", running.join(","));
        if a.json {
            let j = serde_json::json!({"result": r, "seconds": secs, "ctx": a.ctx, "file": a.file.display().to_string()});
            println!("{}", serde_json::to_string_pretty(&j)?);
        } else {
            println!(
                "PPL = {:.4} (mean NLL {:.5}, {} tokens scored in {} chunks of {}, {:.1} s)",
                r.ppl, r.mean_nll, r.scored, r.chunks, a.ctx, secs
            );
        }
        Ok(())
    }
}
