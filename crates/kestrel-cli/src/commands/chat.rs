//! `kestrel chat`: an interactive conversation. One session is kept for the
//! whole conversation, so each turn computes only the tokens the KV cache
//! does not hold yet.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use kestrel_backend::Backend;
use kestrel_engine::Session;
use kestrel_tokenizer::ChatMessage;

use super::sampling_args::SamplingArgs;
use super::speculation_args::{DraftArgs, DEFAULT_SPEC_TOKENS};
use crate::device::{dispatch, BackendTask, Device};
use crate::{loading, model_path};

#[derive(Args, Clone, Debug)]
pub struct ChatArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// System message.
    #[arg(long)]
    pub system: Option<String>,
    /// Context size in tokens for the whole conversation.
    #[arg(long, default_value_t = 8192)]
    pub ctx: usize,
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Print speed after every answer.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub draft: DraftArgs,
}

pub fn main(args: ChatArgs) -> Result<()> {
    // Out-of-range settings are named before the model loads.
    args.draft.get(DEFAULT_SPEC_TOKENS, 1)?;
    let path = model_path::resolve(args.model.clone())?;
    dispatch(args.device, ChatTask { args, path })
}

struct ChatTask {
    args: ChatArgs,
    path: PathBuf,
}

impl BackendTask for ChatTask {
    type Output = ();
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<()> {
        let a = &self.args;
        let (model, tok) = loading::load(&self.path, backend)?;
        let mut session = Session::new(&model, a.ctx)?;
        session.speculation = a.draft.get(DEFAULT_SPEC_TOKENS, 1)?;
        let params = a.sampling.params();
        let mut history: Vec<ChatMessage> = Vec::new();
        if let Some(sys) = &a.system {
            history.push(ChatMessage {
                role: "system".into(),
                content: sys.clone(),
            });
        }
        eprintln!("chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits");
        let stdin = std::io::stdin();
        let mut stdout = std::io::stdout();
        let mut line = String::new();
        loop {
            eprint!("> ");
            line.clear();
            if stdin.lock().read_line(&mut line)? == 0 {
                break;
            }
            let msg = line.trim_end_matches(['\n', '\r']);
            match msg.trim() {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    history.retain(|m| m.role == "system");
                    eprintln!("(conversation cleared)");
                    continue;
                }
                _ => {}
            }
            history.push(ChatMessage {
                role: "user".into(),
                content: msg.to_string(),
            });
            let text = tok.apply_chat_template(&history, true)?;
            let ids = tok.encode_chat_prompt(&text)?;
            let gen = match session.generate(&tok, &ids, &params, |t| {
                let _ = stdout.write_all(t.as_bytes());
                let _ = stdout.flush();
            }) {
                Ok(g) => g,
                Err(e) => {
                    // A turn that cannot run (e.g. the context is full) is
                    // reported; the conversation so far is kept.
                    history.pop();
                    eprintln!("error: {e}");
                    continue;
                }
            };
            println!();
            history.push(ChatMessage {
                role: "assistant".into(),
                content: gen.text.trim().to_string(),
            });
            if a.verbose {
                eprintln!(
                    "[{} prompt tokens ({} cached), {:.1} tok/s prefill, {} tokens at {:.1} tok/s]",
                    gen.prompt_tokens,
                    gen.cached_tokens,
                    gen.prefill_tok_s(),
                    gen.tokens.len(),
                    gen.decode_tok_s()
                );
            }
        }
        Ok(())
    }
}
