//! A single-sequence generation session: one KV pool, the tokens it holds,
//! prefill in chunks, then decode token by token with sampling, stop strings
//! and streaming text. Used by `kestrel run` and `kestrel chat` (a chat keeps
//! one session, so each turn only computes the tokens the cache lacks).
//! Greedy generations may speculate as the engine does (see
//! [`crate::speculative`]): a step checks the last token and drafted ones
//! together, with exactly the tokens of one-token steps.

use std::collections::VecDeque;
use std::time::Instant;

use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_model::Model;
use kestrel_tokenizer::{StreamDecoder, Tokenizer};

use crate::error::EngineError;
pub use crate::events::FinishReason;
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::speculative::{confirmed, NgramSpeculation};
use crate::stop::StopMatcher;

/// Tokens per KV block.
pub const BLOCK_SIZE: usize = 16;

/// Result of one `generate` call.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the cache (not recomputed).
    pub cached_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Tokens drafted by speculation, and how many of them the model
    /// confirmed (0 and 0 without speculation).
    pub draft_tokens: usize,
    pub accepted_tokens: usize,
}

impl Generation {
    /// Prefill speed over the tokens actually computed.
    pub fn prefill_tok_s(&self) -> f64 {
        let n = (self.prompt_tokens - self.cached_tokens) as f64;
        if self.prefill_secs > 0.0 {
            n / self.prefill_secs
        } else {
            0.0
        }
    }
    /// Decode speed: tokens after the first, over the time they took.
    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_secs > 0.0 && self.tokens.len() > 1 {
            (self.tokens.len() - 1) as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// What one step hands back: the device's argmax, or the logits row.
enum StepOut {
    Token(u32),
    Logits(Vec<f32>),
}

pub struct Session<'m, B: Backend> {
    model: &'m Model<B>,
    kv: B::KvPool,
    block_table: Vec<u32>,
    /// Tokens whose K/V are in the pool, in order.
    cached: Vec<u32>,
    capacity: usize,
    /// Largest number of tokens per prefill step (bounds activation memory).
    pub prefill_chunk: usize,
    /// N-gram speculation for plain greedy generations (`None`: one token
    /// per step).
    pub speculation: Option<NgramSpeculation>,
}

impl<'m, B: Backend> Session<'m, B> {
    /// A session able to hold `capacity` tokens (capped at the model's context).
    pub fn new(model: &'m Model<B>, capacity: usize) -> Result<Self, EngineError> {
        let capacity = capacity.min(model.config.context_len).max(1);
        let num_blocks = capacity.div_ceil(BLOCK_SIZE);
        let spec = model.kv_spec(num_blocks, BLOCK_SIZE, KvDType::F32);
        let kv = model
            .backend
            .alloc_kv(&spec)
            .map_err(|e| EngineError::Model(e.into()))?;
        Ok(Session {
            model,
            kv,
            block_table: (0..num_blocks as u32).collect(),
            cached: Vec::new(),
            capacity,
            prefill_chunk: 512,
            speculation: None,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Run `tokens` (positions continue after the cache). With `greedy`,
    /// return the argmax of the last token's logits, taken on the device;
    /// otherwise the logits themselves, on the host.
    fn step(&mut self, tokens: &[u32], greedy: bool) -> Result<StepOut, EngineError> {
        let start = self.cached.len() as u32;
        let layout = BatchLayout::single(tokens, start, &self.block_table, BLOCK_SIZE as u32);
        let last = (tokens.len() - 1) as u32;
        let logits = self.model.forward(&layout, &mut self.kv, &[last])?;
        self.cached.extend_from_slice(tokens);
        let be = &self.model.backend;
        let out = if greedy {
            be.argmax_rows(&logits).map(|ids| StepOut::Token(ids[0]))
        } else {
            be.read_act(&logits).map(StepOut::Logits)
        };
        out.map_err(|e| EngineError::Model(e.into()))
    }

    /// Runs `last` and `draft` as chained rows (each seeing the keys up to
    /// its own position) and returns every row's argmax: row `j`'s is the
    /// model's token after input `j`. The cache then holds all the inputs;
    /// the caller truncates it to the confirmed ones.
    fn step_draft(&mut self, last: u32, draft: &[u32]) -> Result<Vec<u32>, EngineError> {
        let start = self.cached.len() as u32;
        let mut input = Vec::with_capacity(draft.len() + 1);
        input.push(last);
        input.extend_from_slice(draft);
        let layout = BatchLayout::chained(&input, start, &self.block_table, BLOCK_SIZE as u32);
        let rows: Vec<u32> = (0..input.len() as u32).collect();
        let logits = self.model.forward(&layout, &mut self.kv, &rows)?;
        self.cached.extend_from_slice(&input);
        let ids = self
            .model
            .backend
            .argmax_rows(&logits)
            .map_err(|e| EngineError::Model(e.into()))?;
        if ids.len() != input.len() {
            return Err(EngineError::Request(format!(
                "the model returned {} ids for {} rows",
                ids.len(),
                input.len()
            )));
        }
        Ok(ids)
    }

    /// Generate a continuation of `prompt` (the whole sequence so far: any
    /// prefix already in the cache is reused). `on_text` receives text as it
    /// becomes final.
    pub fn generate(
        &mut self,
        tok: &Tokenizer,
        prompt: &[u32],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation, EngineError> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::Request("the prompt is empty (no tokens)".into()));
        }
        if prompt.len() >= self.capacity {
            return Err(EngineError::Request(format!(
                "the prompt has {} tokens but the context holds {} (model context {}); \
                 shorten the prompt or raise --ctx",
                prompt.len(),
                self.capacity,
                self.model.config.context_len
            )));
        }
        // Reuse the common prefix, but always recompute at least the last
        // prompt token so that its logits exist.
        let common = self.cached.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let reuse = common.min(prompt.len() - 1);
        self.cached.truncate(reuse);

        let t0 = Instant::now();
        let greedy = params.is_plain_greedy();
        let mut step_out = StepOut::Logits(Vec::new());
        for chunk in prompt[reuse..].chunks(self.prefill_chunk.max(1)) {
            step_out = self.step(chunk, greedy)?;
        }
        let prefill_secs = t0.elapsed().as_secs_f64();

        let mut sampler = Sampler::new(params);
        let mut decoder = StreamDecoder::continuation(tok);
        let mut stops = StopMatcher::new(&params.stop);
        let eos: Vec<u32> = if params.ignore_eos {
            Vec::new()
        } else {
            tok.eos_ids().to_vec()
        };
        // The sequence so far: the prompt, then the generated tokens (drafts
        // are looked up in all of it).
        let mut seq: Vec<u32> = prompt.to_vec();
        let mut text = String::new();
        let mut finish = FinishReason::Length;
        let mut first_token_at = None;
        let mut stopped_by_string = false;
        let spec = self.speculation.filter(|_| greedy);
        // Tokens a speculative step confirmed beyond the one in `step_out`,
        // handed out before the next step.
        let mut confirmed_ahead: VecDeque<u32> = VecDeque::new();
        let (mut draft_tokens, mut accepted_tokens) = (0, 0);
        loop {
            let s = match &mut step_out {
                StepOut::Token(id) => Sampled::token_only(*id),
                StepOut::Logits(logits) => sampler.sample(logits, prompt, &seq[prompt.len()..])?,
            };
            seq.push(s.token);
            let generated = seq.len() - prompt.len();
            if first_token_at.is_none() {
                first_token_at = Some(Instant::now());
            }
            if eos.contains(&s.token) || params.stop_token_ids.contains(&s.token) {
                finish = FinishReason::Stop;
                break;
            }
            let piece = decoder.push(s.token)?;
            let out = stops.push(&piece);
            text.push_str(&out.emit);
            on_text(&out.emit);
            if out.stopped.is_some() {
                finish = FinishReason::Stop;
                stopped_by_string = true;
                break;
            }
            if generated >= params.max_tokens || self.cached.len() + 1 >= self.capacity {
                break;
            }
            if let Some(next) = confirmed_ahead.pop_front() {
                step_out = StepOut::Token(next);
                continue;
            }
            let draft = match &spec {
                // Rows past the request's last token or past the context
                // would be computed for nothing.
                Some(sp) => sp.propose(
                    &seq,
                    (params.max_tokens - generated)
                        .saturating_sub(1)
                        .min(self.capacity.saturating_sub(self.cached.len() + 2)),
                ),
                None => Vec::new(),
            };
            if draft.is_empty() {
                step_out = self.step(&[s.token], greedy)?;
                continue;
            }
            let before = self.cached.len();
            let picks = self.step_draft(s.token, &draft)?;
            let kept = confirmed(&draft, &picks);
            draft_tokens += draft.len();
            accepted_tokens += kept;
            // The input token and the kept drafts have their K/V now; the
            // rejected drafts' slots lie past the cache and are written
            // again before any read.
            self.cached.truncate(before + 1 + kept);
            step_out = StepOut::Token(picks[0]);
            confirmed_ahead.extend(&picks[1..=kept]);
        }
        if !stopped_by_string {
            // Release text held back for a possible multi-byte character or
            // a partial stop-string match.
            let rest = stops.push(&decoder.flush());
            let mut tail = rest.emit;
            if rest.stopped.is_some() {
                finish = FinishReason::Stop;
            } else {
                tail.push_str(&stops.flush());
                // flush() can confirm a stop that was waiting on a longer,
                // earlier-starting candidate.
                if stops.stopped().is_some() {
                    finish = FinishReason::Stop;
                }
            }
            text.push_str(&tail);
            on_text(&tail);
        }
        // Decode time runs from the first sampled token, so it measures the
        // per-token steps only (prefill has its own figure).
        let decode_secs = first_token_at.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        Ok(Generation {
            tokens: seq.split_off(prompt.len()),
            text,
            finish,
            prompt_tokens: prompt.len(),
            cached_tokens: reuse,
            prefill_secs,
            decode_secs,
            draft_tokens,
            accepted_tokens,
        })
    }
}
