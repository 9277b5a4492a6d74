//! `kestrel run`: generate from a prompt, streaming the text to stdout.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Args;
use kestrel_backend::Backend;
use kestrel_engine::Session;
use kestrel_tokenizer::ChatMessage;

use super::sampling_args::SamplingArgs;
use super::speculation_args::{DraftArgs, DEFAULT_SPEC_TOKENS};
use crate::device::{dispatch_with, BackendTask, Device, Kernels};
use crate::{loading, memory, model_path};

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// The prompt; `-` reads it from stdin.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Do not add the BOS token (raw prompts only).
    #[arg(long)]
    pub no_bos: bool,
    /// Context size in tokens (default: prompt + max tokens, capped at the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// CUDA kernel set: fused (fast) or reference (plain kernels, for comparison).
    #[arg(long, value_enum, default_value = "fused")]
    pub kernels: Kernels,
    /// Print the statistics as JSON on stderr as well.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub draft: DraftArgs,
}

pub fn main(mut args: RunArgs) -> Result<()> {
    if args.prompt == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        args.prompt = s;
    }
    // Out-of-range settings are named before the model loads.
    args.draft.get(DEFAULT_SPEC_TOKENS, 1)?;
    let path = model_path::resolve(args.model.clone())?;
    dispatch_with(args.device, args.kernels, RunTask { args, path })
}

struct RunTask {
    args: RunArgs,
    path: PathBuf,
}

impl BackendTask for RunTask {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<()> {
        let a = &self.args;
        let (model, tok) = loading::load(&self.path, backend)?;
        let ids = if a.chat {
            let mut msgs = Vec::new();
            if let Some(sys) = &a.system {
                msgs.push(ChatMessage {
                    role: "system".into(),
                    content: sys.clone(),
                });
            }
            msgs.push(ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            });
            let text = tok.apply_chat_template(&msgs, true)?;
            tok.encode_chat_prompt(&text)?
        } else {
            tok.encode(&a.prompt, !a.no_bos && tok.add_bos_default())?
        };
        if ids.is_empty() {
            bail!("the prompt encodes to no tokens");
        }
        let params = a.sampling.params();
        let ctx = a.ctx.unwrap_or(ids.len() + params.max_tokens + 1);
        let mut session = Session::new(&model, ctx)?;
        session.speculation = a.draft.get(DEFAULT_SPEC_TOKENS, 1)?;
        let mut out = std::io::stdout().lock();
        let gen = session.generate(&tok, &ids, &params, |t| {
            // A closed stdout (e.g. `| head`) must not abort generation with a panic.
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        let speculation = if gen.draft_tokens > 0 {
            format!(
                " | speculation: {} of {} drafted tokens accepted",
                gen.accepted_tokens, gen.draft_tokens
            )
        } else {
            String::new()
        };
        eprintln!(
            "prefill: {} tokens in {:.1} ms ({:.1} tok/s) | decode: {} tokens in {:.1} ms ({:.1} tok/s) | finish: {:?}{speculation}",
            gen.prompt_tokens,
            gen.prefill_secs * 1e3,
            gen.prefill_tok_s(),
            gen.tokens.len(),
            gen.decode_secs * 1e3,
            gen.decode_tok_s(),
            gen.finish
        );
        // Host peak, and on a GPU the device in use and this process's
        // buffers by class.
        let mem = memory::report(model.backend.as_ref(), &self.path);
        if mem.device_buffers.is_some() {
            eprintln!("{}", memory::describe(&mem));
        }
        if a.json {
            let j = serde_json::json!({
                "prompt_tokens": gen.prompt_tokens,
                "generated_tokens": gen.tokens.len(),
                "prefill_secs": gen.prefill_secs,
                "decode_secs": gen.decode_secs,
                "prefill_tok_s": gen.prefill_tok_s(),
                "decode_tok_s": gen.decode_tok_s(),
                "finish_reason": gen.finish,
                "draft_tokens": gen.draft_tokens,
                "accepted_tokens": gen.accepted_tokens,
                "tokens": gen.tokens,
                "memory": mem,
            });
            eprintln!("{j}");
        }
        Ok(())
    }
}
