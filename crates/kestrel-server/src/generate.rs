//! Running a request on the engine: admission, one engine request per
//! choice, then either collecting every choice (a plain response) or
//! turning the events into SSE chunks as they come (a stream).
//!
//! Cancellation is by ownership: the receivers live in the handler's future
//! or in the response stream, so when a client disconnects and hyper drops
//! them, the engine sees the receivers gone and frees the KV blocks at its
//! next step; the admission slots go back at the same moment.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::sse::Event as SseEvent;
use futures_util::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use kestrel_engine::{
    Event, EventReceiver, FinishReason, PromptLogprob, RequestOptions, SamplingParams, Usage,
};
use serde_json::{json, Value};

use crate::admission::Admission;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::params::for_choice;
use crate::render::{self, EchoedPrompt, Endpoint, Header, TokenOut};
use crate::AppState;

/// One choice's engine request.
pub struct Seq {
    /// The choice's `index` in the response (`prompt_index * n + j`).
    pub index: usize,
    pub prompt_index: usize,
    pub rx: EventReceiver,
}

/// A request started on the engine.
pub struct Launch {
    pub seqs: Vec<Seq>,
    pub prompt_lens: Vec<usize>,
    pub admission: Admission,
    pub started: Instant,
    /// Only the prompt is wanted (completions' `echo` with `max_tokens: 0`):
    /// the one token each engine request must generate is dropped.
    pub score_only: bool,
}

/// Admits the request (503 when the bounded queue is full) and starts `n`
/// engine requests per prompt, each with `opts`. If one fails, those
/// already started are dropped, which aborts them.
pub fn launch(
    state: &AppState,
    prompts: Vec<(Vec<u32>, SamplingParams)>,
    n: usize,
    opts: RequestOptions,
    started: Instant,
) -> Result<Launch, ApiError> {
    let slots = prompts.len().saturating_mul(n);
    let capacity = state.capacity();
    let admission = Admission::try_acquire(&state.in_flight, slots, capacity).ok_or_else(|| {
        ApiError::overloaded(format!(
            "the server is at capacity ({capacity} sequences running or queued; this request needs \
             {slots}); retry later"
        ))
    })?;
    let mut seqs = Vec::with_capacity(slots);
    let mut prompt_lens = Vec::with_capacity(prompts.len());
    for (p, (prompt, params)) in prompts.into_iter().enumerate() {
        prompt_lens.push(prompt.len());
        for j in 0..n {
            let (_, rx) = state
                .engine
                .add_request_with(prompt.clone(), for_choice(&params, j), opts)?;
            seqs.push(Seq {
                index: p * n + j,
                prompt_index: p,
                rx,
            });
        }
    }
    let prompt_tokens: usize = prompt_lens.iter().sum();
    state
        .metrics
        .prompt_tokens
        .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    Ok(Launch {
        seqs,
        prompt_lens,
        admission,
        started,
        score_only: false,
    })
}

/// Latency bookkeeping of one sequence.
#[derive(Default)]
struct Timing {
    first_token: Option<Duration>,
    tokens: usize,
}

impl Timing {
    fn token(&mut self, metrics: &Metrics, started: Instant) {
        if self.first_token.is_none() {
            self.first_token = Some(started.elapsed());
        }
        self.tokens += 1;
        metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(&self, metrics: &Metrics, started: Instant) {
        metrics.record_sequence(self.first_token, started.elapsed(), self.tokens);
    }
}

/// Appends the prompt scores of one `PromptLogprobs` event (scores of
/// prompt indices `first..`) to `scores`, which holds those of indices
/// `1..=scores.len()`: the engine sends each index once, in order.
fn add_prompt_scores(scores: &mut Vec<PromptLogprob>, first: usize, entries: Vec<PromptLogprob>) {
    if first == scores.len() + 1 {
        scores.extend(entries);
    } else {
        tracing::error!(
            "prompt scores from index {first} arrived after {} of them; dropped",
            scores.len()
        );
    }
}

/// Everything one choice produced.
pub struct ChoiceResult {
    pub index: usize,
    pub prompt_index: usize,
    pub text: String,
    /// Scores of prompt tokens 1.. (when asked for).
    pub prompt_scores: Vec<PromptLogprob>,
    pub tokens: Vec<TokenOut>,
    pub finish: Option<FinishReason>,
    pub usage: Usage,
    pub error: Option<String>,
}

async fn collect_one(seq: Seq, metrics: &Metrics, started: Instant, score_only: bool) -> ChoiceResult {
    let mut r = ChoiceResult {
        index: seq.index,
        prompt_index: seq.prompt_index,
        text: String::new(),
        prompt_scores: Vec::new(),
        tokens: Vec::new(),
        finish: None,
        usage: Usage::default(),
        error: None,
    };
    let mut timing = Timing::default();
    while let Some(ev) = seq.rx.next().await {
        match ev {
            Event::PromptLogprobs { first, entries } => {
                add_prompt_scores(&mut r.prompt_scores, first, entries)
            }
            Event::Token { .. } if score_only => {}
            Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            } => {
                timing.token(metrics, started);
                r.text.push_str(&text);
                r.tokens.push(TokenOut {
                    id,
                    logprob,
                    top: top_logprobs,
                });
            }
            Event::Finished { reason, usage } => {
                timing.finish(metrics, started);
                // Scoring a prompt ends where the completion would start.
                r.finish = Some(match reason {
                    FinishReason::Stop if score_only => FinishReason::Length,
                    other => other,
                });
                r.usage = usage;
            }
            Event::Error { message } => r.error = Some(message),
        }
    }
    r
}

/// Waits for every choice; results in `index` order. A failed choice, or
/// one the engine dropped (shutdown), fails the whole request.
pub async fn collect(state: &AppState, launch: Launch) -> Result<(Vec<ChoiceResult>, Vec<usize>), ApiError> {
    let Launch {
        seqs,
        prompt_lens,
        admission,
        started,
        score_only,
    } = launch;
    let metrics = &state.metrics;
    let mut results = futures_util::future::join_all(
        seqs.into_iter()
            .map(|s| collect_one(s, metrics, started, score_only)),
    )
    .await;
    drop(admission);
    results.sort_by_key(|r| r.index);
    for r in &results {
        if let Some(e) = &r.error {
            return Err(ApiError::internal(format!("generation failed: {e}")));
        }
        match r.finish {
            None | Some(FinishReason::Abort) => {
                return Err(ApiError::overloaded(
                    "the request was aborted by the engine (the server is shutting down)",
                ))
            }
            Some(_) => {}
        }
    }
    Ok((results, prompt_lens))
}

/// A prompt echoed by a completion (`echo`): its text and its tokens.
#[derive(Clone, Debug)]
pub struct Echo {
    pub text: String,
    pub ids: Vec<u32>,
}

/// How a stream's chunks look.
pub struct StreamSpec {
    pub endpoint: Endpoint,
    pub header: Header,
    pub include_usage: bool,
    pub logprobs: bool,
    /// Completions with `echo`: each prompt, sent first (with its scores
    /// when `logprobs` is set, so then only once they have arrived).
    pub echo: Vec<Echo>,
}

struct Track {
    index: usize,
    prompt_index: usize,
    timing: Timing,
    finished: bool,
    usage: Usage,
    /// Characters sent so far (completion logprobs' `text_offset`).
    offset: usize,
    /// Scores of prompt tokens 1.. received so far.
    prompt_scores: Vec<PromptLogprob>,
    /// The echo waits for the prompt's scores.
    echo_pending: bool,
}

struct StreamState {
    state: Arc<AppState>,
    spec: StreamSpec,
    merged: SelectAll<BoxStream<'static, (usize, Event)>>,
    tracks: Vec<Track>,
    prompt_lens: Vec<usize>,
    pending: VecDeque<SseEvent>,
    done: bool,
    started: Instant,
    score_only: bool,
    /// Held for the stream's life: dropping the stream gives the slots back.
    _admission: Admission,
}

fn events(rx: EventReceiver, track: usize) -> BoxStream<'static, (usize, Event)> {
    stream::unfold(rx, move |rx| async move {
        let ev = rx.next().await?;
        Some(((track, ev), rx))
    })
    .boxed()
}

impl StreamState {
    fn push(&mut self, value: Value) {
        self.pending
            .push_back(SseEvent::default().data(value.to_string()));
    }

    fn chunk(&mut self, choice: Value) {
        let object = match self.spec.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        let mut v = self.spec.header.object(object, vec![choice]);
        if self.spec.include_usage {
            v["usage"] = Value::Null;
        }
        self.push(v);
    }

    /// The first chunks: the assistant role (chat) or the echoed prompt.
    fn opening(&mut self) {
        for t in 0..self.tracks.len() {
            let (index, prompt_index) = (self.tracks[t].index, self.tracks[t].prompt_index);
            match self.spec.endpoint {
                Endpoint::Chat => self.chunk(json!({
                    "index": index,
                    "delta": { "role": "assistant", "content": "" },
                    "logprobs": null,
                    "finish_reason": null,
                })),
                Endpoint::Completion => {
                    if prompt_index >= self.spec.echo.len() {
                        continue;
                    }
                    if self.spec.logprobs {
                        self.tracks[t].echo_pending = true;
                    } else {
                        self.send_echo(t);
                    }
                }
            }
        }
    }

    /// The chunk of a completion's echoed prompt, with its scores when
    /// logprobs are asked for.
    fn send_echo(&mut self, t: usize) {
        self.tracks[t].echo_pending = false;
        let track = &self.tracks[t];
        let Some(echo) = self.spec.echo.get(track.prompt_index) else {
            return;
        };
        let logprobs = if self.spec.logprobs {
            let prompt = EchoedPrompt {
                text: &echo.text,
                ids: &echo.ids,
                scores: &track.prompt_scores,
            };
            render::completion_logprobs(&self.state.tokenizer, Some(prompt), &[], track.offset)
        } else {
            Value::Null
        };
        let choice = json!({
            "index": track.index,
            "text": echo.text,
            "logprobs": logprobs,
            "finish_reason": null,
        });
        self.tracks[t].offset += echo.text.chars().count();
        self.chunk(choice);
    }

    fn text_chunk(&mut self, t: usize, text: String, token: Option<TokenOut>, finish: Option<FinishReason>) {
        let track = &self.tracks[t];
        let index = track.index;
        let tok = &self.state.tokenizer;
        let logprobs = match (&token, self.spec.endpoint) {
            (Some(tk), Endpoint::Chat) => render::chat_logprobs(tok, std::slice::from_ref(tk)),
            (Some(tk), Endpoint::Completion) => {
                render::completion_logprobs(tok, None, std::slice::from_ref(tk), track.offset)
            }
            (None, _) => Value::Null,
        };
        let finish = finish.map(render::finish_reason);
        self.tracks[t].offset += text.chars().count();
        let choice = match self.spec.endpoint {
            Endpoint::Chat => {
                let delta = if text.is_empty() && finish.is_some() {
                    json!({})
                } else {
                    json!({ "content": text })
                };
                json!({ "index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish })
            }
            Endpoint::Completion => {
                json!({ "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish })
            }
        };
        self.chunk(choice);
    }

    fn on_event(&mut self, t: usize, ev: Event) {
        if self.tracks[t].echo_pending && !matches!(ev, Event::PromptLogprobs { .. }) {
            // The prompt's scores are all in once anything else arrives.
            self.send_echo(t);
        }
        match ev {
            Event::PromptLogprobs { first, entries } => {
                add_prompt_scores(&mut self.tracks[t].prompt_scores, first, entries);
            }
            Event::Token { .. } if self.score_only => {}
            Event::Token {
                id,
                text,
                logprob,
                top_logprobs,
            } => {
                self.tracks[t].timing.token(&self.state.metrics, self.started);
                // Tokens whose text is held back (a partial character or stop
                // string) send nothing unless their logprobs are wanted.
                if self.spec.logprobs {
                    let token = TokenOut {
                        id,
                        logprob,
                        top: top_logprobs,
                    };
                    self.text_chunk(t, text, Some(token), None);
                } else if !text.is_empty() {
                    self.text_chunk(t, text, None, None);
                }
            }
            // Aborted by the engine (shutting down): `closing` reports it.
            Event::Finished {
                reason: FinishReason::Abort,
                ..
            } => {}
            Event::Finished { reason, usage } => {
                self.tracks[t].timing.finish(&self.state.metrics, self.started);
                self.tracks[t].finished = true;
                self.tracks[t].usage = usage;
                // Scoring a prompt ends where the completion would start.
                let reason = if self.score_only {
                    FinishReason::Length
                } else {
                    reason
                };
                self.text_chunk(t, String::new(), None, Some(reason));
            }
            Event::Error { message } => {
                self.tracks[t].finished = true;
                self.push(ApiError::internal(format!("generation failed: {message}")).body());
            }
        }
    }

    /// After the last event: an error for choices the engine dropped, the
    /// usage chunk when asked for, and `[DONE]`.
    fn closing(&mut self) {
        if self.tracks.iter().any(|t| !t.finished) {
            self.push(
                ApiError::overloaded("the request was aborted by the engine (the server is shutting down)")
                    .body(),
            );
        }
        if self.spec.include_usage {
            let per_choice: Vec<(usize, Usage, usize)> = self
                .tracks
                .iter()
                .map(|t| (t.prompt_index, t.usage, t.timing.tokens))
                .collect();
            let totals = render::totals(&self.prompt_lens, &per_choice);
            let object = match self.spec.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completion => "text_completion",
            };
            let mut v = self.spec.header.object(object, Vec::new());
            v["usage"] = render::usage(totals);
            self.push(v);
        }
        self.pending.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }
}

/// The SSE stream of a launched request.
pub fn sse_stream(
    state: Arc<AppState>,
    launch: Launch,
    spec: StreamSpec,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let Launch {
        seqs,
        prompt_lens,
        admission,
        started,
        score_only,
    } = launch;
    let mut tracks = Vec::with_capacity(seqs.len());
    let mut sources = Vec::with_capacity(seqs.len());
    for seq in seqs {
        sources.push(events(seq.rx, tracks.len()));
        tracks.push(Track {
            index: seq.index,
            prompt_index: seq.prompt_index,
            timing: Timing::default(),
            finished: false,
            usage: Usage::default(),
            offset: 0,
            prompt_scores: Vec::new(),
            echo_pending: false,
        });
    }
    let mut st = StreamState {
        state,
        spec,
        merged: stream::select_all(sources),
        tracks,
        prompt_lens,
        pending: VecDeque::new(),
        done: false,
        started,
        score_only,
        _admission: admission,
    };
    st.opening();
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok(e), st));
            }
            if st.done {
                return None;
            }
            match st.merged.next().await {
                Some((t, ev)) => st.on_event(t, ev),
                None => st.closing(),
            }
        }
    })
}
