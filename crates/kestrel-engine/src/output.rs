//! Per-request output processing: sampling state, incremental
//! detokenization, stop conditions, and the event stream. One `SeqOutput`
//! per request; creating one allocates only small buffers (the detokenizer
//! state holds no borrow and no window of earlier tokens).

use kestrel_tokenizer::{StreamState, Tokenizer};

use crate::error::EngineError;
use crate::events::{Event, EventSender, FinishReason, Usage};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::stop::StopMatcher;

pub struct SeqOutput {
    pub params: SamplingParams,
    pub sampler: Sampler,
    detok: StreamState,
    stops: StopMatcher,
    /// Token ids that end the request (EOS unless ignored, plus stop ids).
    stop_ids: Vec<u32>,
    pub sink: EventSender,
    /// `Some(n)`: the prompt is scored, with `n` alternatives per token.
    pub prompt_logprobs: Option<usize>,
}

impl SeqOutput {
    pub fn new(tok: &Tokenizer, params: SamplingParams, sink: EventSender) -> SeqOutput {
        let mut stop_ids = params.stop_token_ids.clone();
        if !params.ignore_eos {
            stop_ids.extend_from_slice(tok.eos_ids());
        }
        SeqOutput {
            sampler: Sampler::new(&params),
            // Generated text continues the prompt: never drop a leading space.
            detok: StreamState::continuation(),
            stops: StopMatcher::new(&params.stop),
            stop_ids,
            params,
            sink,
            prompt_logprobs: None,
        }
    }

    /// Handles one sampled token (already appended to the sequence, which
    /// now holds `generated` tokens and `total` tokens in all): sends its
    /// event and says whether the request is done. `context_full`: no room
    /// for another token.
    pub fn accept(
        &mut self,
        tok: &Tokenizer,
        sampled: Sampled,
        generated: usize,
        context_full: bool,
    ) -> Result<Option<FinishReason>, EngineError> {
        let ends = self.finish_by_count(sampled.token, generated, context_full);
        self.deliver(tok, sampled, ends)
    }

    /// The finish that needs no text: a stop token id, `max_tokens` or a
    /// full context.
    fn finish_by_count(&self, token: u32, generated: usize, context_full: bool) -> Option<FinishReason> {
        if self.stop_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= self.params.max_tokens || context_full {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// Whether the request ends after this token, when that can be known
    /// without its text (no stop strings): `Some(finish)`. The engine then
    /// streams the token later with [`deliver`](Self::deliver), off the
    /// step's critical path.
    pub fn finish_without_text(
        &self,
        token: u32,
        generated: usize,
        context_full: bool,
    ) -> Option<Option<FinishReason>> {
        (!self.stops.has_patterns()).then(|| self.finish_by_count(token, generated, context_full))
    }

    /// Decodes and streams a token whose count-based finish (`ends`, from
    /// [`finish_without_text`](Self::finish_without_text)) is known; returns
    /// the request's finish, which a stop string may add.
    pub fn deliver(
        &mut self,
        tok: &Tokenizer,
        sampled: Sampled,
        ends: Option<FinishReason>,
    ) -> Result<Option<FinishReason>, EngineError> {
        let mut finish = None;
        let mut text = String::new();
        if self.stop_ids.contains(&sampled.token) {
            // The stop token itself is not text.
            finish = Some(FinishReason::Stop);
        } else {
            let piece = self.detok.push(tok, sampled.token)?;
            let out = self.stops.push(&piece);
            text = out.emit;
            if out.stopped.is_some() {
                finish = Some(FinishReason::Stop);
            }
        }
        if finish.is_none() {
            finish = ends;
        }
        if finish.is_some() && self.stops.stopped().is_none() {
            // Release what was held back for an unfinished character or a
            // partial stop match; a stop may still be found in it.
            let rest = self.stops.push(&self.detok.flush());
            text.push_str(&rest.emit);
            if rest.stopped.is_some() {
                finish = Some(FinishReason::Stop);
            } else {
                text.push_str(&self.stops.flush());
                if self.stops.stopped().is_some() {
                    finish = Some(FinishReason::Stop);
                }
            }
        }
        self.sink.send(Event::Token {
            id: sampled.token,
            text,
            logprob: sampled.logprob,
            top_logprobs: sampled.top,
        });
        Ok(finish)
    }

    pub fn finish(&self, reason: FinishReason, usage: Usage) {
        self.sink.send(Event::Finished { reason, usage });
    }
}
