//! `--long-prefill-threshold` / `--long-prefill-chunk`, shared by the
//! commands that run the engine (serve, bench).

use clap::Args;
use kestrel_engine::LongPrefill;

/// How long prompts share steps with running decodes.
#[derive(Args, Clone, Copy, Debug)]
pub struct LongPrefillArgs {
    /// Prompts of more than this many tokens are prefilled beside running
    /// decodes in chunks of --long-prefill-chunk tokens per step.
    #[arg(long, default_value_t = LongPrefill::default().threshold)]
    pub long_prefill_threshold: usize,
    /// Tokens per step of long prefills while other sequences decode, which
    /// bounds how much a long prompt slows them (0: only
    /// --max-num-batched-tokens bounds it).
    #[arg(long, default_value_t = LongPrefill::default().chunk)]
    pub long_prefill_chunk: usize,
}

impl LongPrefillArgs {
    pub fn get(&self) -> LongPrefill {
        LongPrefill {
            threshold: self.long_prefill_threshold,
            chunk: self.long_prefill_chunk,
        }
    }
}
