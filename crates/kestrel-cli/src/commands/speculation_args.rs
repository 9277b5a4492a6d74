//! `--spec-tokens` and friends: n-gram speculative decoding, shared by the
//! commands that run the engine (serve, bench).

use anyhow::{bail, Result};
use clap::Args;
use kestrel_engine::NgramSpeculation;

/// Prompt-lookup speculation for greedy requests (off unless --spec-tokens
/// is given).
#[derive(Args, Clone, Copy, Debug)]
pub struct SpeculationArgs {
    /// Greedy requests draft up to this many tokens per step from earlier
    /// occurrences of their last tokens and check them in one step; the
    /// output is what plain greedy decoding gives (0: off).
    #[arg(long, default_value_t = 0)]
    pub spec_tokens: usize,
    /// Shortest suffix (in tokens) that may propose a draft.
    #[arg(long, default_value_t = NgramSpeculation::default().min_ngram)]
    pub spec_ngram_min: usize,
    /// Longest suffix tried first.
    #[arg(long, default_value_t = NgramSpeculation::default().max_ngram)]
    pub spec_ngram_max: usize,
    /// Speculate only while at most this many sequences run (larger batches
    /// already keep the device busy).
    #[arg(long, default_value_t = NgramSpeculation::default().max_seqs)]
    pub spec_max_seqs: usize,
}

impl SpeculationArgs {
    pub fn get(&self) -> Result<Option<NgramSpeculation>> {
        if self.spec_tokens == 0 {
            return Ok(None);
        }
        let s = NgramSpeculation {
            tokens: self.spec_tokens,
            min_ngram: self.spec_ngram_min,
            max_ngram: self.spec_ngram_max,
            max_seqs: self.spec_max_seqs,
        };
        if let Err(e) = s.validate() {
            bail!("--spec-*: {e}");
        }
        Ok(Some(s))
    }
}
