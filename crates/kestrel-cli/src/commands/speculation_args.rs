//! `--spec-tokens` and friends: n-gram speculative decoding of greedy
//! requests, shared by the commands that generate (serve, run, chat) and by
//! bench's engine rows.

use anyhow::{bail, Result};
use clap::Args;
use kestrel_engine::NgramSpeculation;

/// Drafted tokens per step where a generating command (serve, run, chat) is
/// not told otherwise. Speculation yields exactly the tokens of plain greedy
/// decoding and a speculative step costs about what a plain one does (H100:
/// 0.56 against 0.54 ms), so they speculate by default. H100, `bench-serve
/// --concurrency 1` greedy on `benchmarks/prompts/natural.jsonl`: ~5,200
/// output tok/s against ~1,800 plain (75% of drafts accepted); the 2-core
/// CPU: 92 against 59. Pausing a sequence's drafts after failures (1, 2,
/// 4 .. 16 tokens) was measured and dropped: ~4,900 tok/s, since drafts
/// right after a failure often stand, and a failed step costs only ~4%.
pub const DEFAULT_SPEC_TOKENS: usize = 4;

/// How drafts are made: what every speculating command takes.
#[derive(Args, Clone, Copy, Debug)]
pub struct DraftArgs {
    /// Greedy requests draft up to this many tokens per step from earlier
    /// occurrences of their last tokens and check them in one step; the
    /// output is what plain greedy decoding gives (0: off; default: 4 for
    /// serve, run and chat, 0 for bench).
    #[arg(long)]
    pub spec_tokens: Option<usize>,
    /// Shortest suffix (in tokens) that may propose a draft.
    #[arg(long, default_value_t = NgramSpeculation::default().min_ngram)]
    pub spec_ngram_min: usize,
    /// Longest suffix tried first.
    #[arg(long, default_value_t = NgramSpeculation::default().max_ngram)]
    pub spec_ngram_max: usize,
}

impl DraftArgs {
    /// The settings, with `default_tokens` drafts per step unless
    /// `--spec-tokens` was given (0: off), for at most `max_seqs` running
    /// sequences.
    pub fn get(&self, default_tokens: usize, max_seqs: usize) -> Result<Option<NgramSpeculation>> {
        let tokens = self.spec_tokens.unwrap_or(default_tokens);
        if tokens == 0 {
            return Ok(None);
        }
        let s = NgramSpeculation {
            tokens,
            min_ngram: self.spec_ngram_min,
            max_ngram: self.spec_ngram_max,
            max_seqs,
        };
        if let Err(e) = s.validate() {
            bail!("--spec-*: {e}");
        }
        Ok(Some(s))
    }
}

/// The draft settings plus the engine's cap on speculating sequences
/// (serve, bench).
#[derive(Args, Clone, Copy, Debug)]
pub struct SpeculationArgs {
    #[command(flatten)]
    pub draft: DraftArgs,
    /// Speculate only while at most this many sequences run (larger batches
    /// already keep the device busy).
    #[arg(long, default_value_t = NgramSpeculation::default().max_seqs)]
    pub spec_max_seqs: usize,
}

impl SpeculationArgs {
    /// The settings, with `default_tokens` drafts per step unless
    /// `--spec-tokens` was given (0: off).
    pub fn get(&self, default_tokens: usize) -> Result<Option<NgramSpeculation>> {
        self.draft.get(default_tokens, self.spec_max_seqs)
    }
}
