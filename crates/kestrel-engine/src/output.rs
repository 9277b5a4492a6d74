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
        if finish.is_none() && (generated >= self.params.max_tokens || context_full) {
            finish = Some(FinishReason::Length);
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
