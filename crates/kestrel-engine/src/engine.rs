//! The engine: many requests over one model and one paged KV pool.
//!
//! Each `step` asks the scheduler for a batch, runs `Model::forward` on it
//! once, samples a token for every sequence whose known tokens are now all
//! computed, and turns tokens into events (text deltas through each
//! request's detokenizer and stop matcher). `Engine::spawn` moves the engine
//! onto its own thread and returns a cloneable [`EngineHandle`] that any
//! thread (or async task) can use; requests are validated on the caller's
//! side so errors come back at once.
//!
//! A request may also ask for the log-probabilities of its prompt tokens
//! ([`RequestOptions::prompt_logprobs`]): the scheduler then plans the
//! logits rows of its prompt positions beside the sampling rows, and each
//! step turns them into `PromptLogprobs` events before any sampling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kestrel_backend::{Backend, DeviceSample, KvDType};
use kestrel_model::Model;
use kestrel_tokenizer::Tokenizer;

use crate::block_manager::{BlockManager, CacheStats};
use crate::error::EngineError;
use crate::events::{
    channel, Event, EventReceiver, EventSender, FinishReason, PromptLogprob, RequestId, Usage,
};
use crate::output::SeqOutput;
use crate::sampling::{score_token, Sampled, SamplingError, SamplingParams, MAX_LOGPROBS};
use crate::scheduler::{
    LongPrefill, PromptRows, Scheduler, SchedulerConfig, StepPlan, DEFAULT_MAX_PROMPT_LOGPROB_ROWS,
};
use crate::speculative::{confirmed, NgramSpeculation};

/// Engine sizing. The CLI computes `num_kv_blocks` from `--num-kv-blocks` or
/// from free device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Blocks in the paged KV pool.
    pub num_kv_blocks: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step.
    pub max_num_batched_tokens: usize,
    /// Tokens per step of long prefills beside running decodes.
    pub long_prefill: LongPrefill,
    pub enable_prefix_caching: bool,
    pub kv_dtype: KvDType,
    /// `Some`: greedy requests decode with n-gram speculation (see
    /// [`crate::speculative`]) while few sequences run.
    pub speculation: Option<NgramSpeculation>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            num_kv_blocks: 1024,
            block_size: 16,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            long_prefill: LongPrefill::default(),
            enable_prefix_caching: true,
            kv_dtype: KvDType::F32,
            speculation: None,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |field, value: usize, expected| Err(EngineError::config(field, value, expected));
        if self.num_kv_blocks == 0 || self.num_kv_blocks >= u32::MAX as usize / self.block_size.max(1) {
            return bad(
                "num_kv_blocks",
                self.num_kv_blocks,
                "at least 1 (and slots addressable by u32)",
            );
        }
        if !(1..=1024).contains(&self.block_size) {
            return bad(
                "block_size",
                self.block_size,
                "an integer in [1, 1024] (16 is usual)",
            );
        }
        if self.max_num_seqs == 0 {
            return bad("max_num_seqs", self.max_num_seqs, "at least 1");
        }
        if self.max_num_batched_tokens == 0 {
            return bad(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                "at least 1",
            );
        }
        if let Some(s) = &self.speculation {
            s.validate()?;
        }
        Ok(())
    }
}

/// What a request asks for beyond sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// `Some(n)`: score every prompt token after the first (its
    /// log-probability given the tokens before it, with the `n` most likely
    /// alternatives, `n <= 20`), sent as `PromptLogprobs` events before the
    /// first token. Those positions are computed even when the prefix cache
    /// holds them, so the request reports no cached tokens.
    pub prompt_logprobs: Option<usize>,
}

/// A snapshot of the engine's state and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Blocks findable by prefix hash (in use or free).
    pub kv_blocks_cached: usize,
    pub prefix_cache: CacheStats,
    pub steps: u64,
    /// Tokens run through the model (prompt chunks and decodes).
    pub tokens_computed: u64,
    pub tokens_generated: u64,
    pub preemptions: u64,
    /// Steps launched before the previous step's tokens were read (their
    /// input tokens fed from its argmax on the device).
    pub overlapped_steps: u64,
    /// Speculative steps (some sequence checked drafted tokens).
    pub speculative_steps: u64,
    /// Tokens drafted by n-gram lookup and checked by the model.
    pub draft_tokens: u64,
    /// Drafted tokens the model confirmed (each saved a step).
    pub accepted_tokens: u64,
}

/// Checks a request against what the engine can serve; shared by the
/// engine and its handles so a bad request fails on the caller's side.
#[derive(Clone, Copy, Debug)]
struct Limits {
    vocab_size: usize,
    /// Longest sequence (prompt + output): the model's context, or the
    /// whole pool when that is smaller (a sequence must fit alone).
    max_model_len: usize,
}

impl Limits {
    fn check(
        &self,
        prompt: &[u32],
        params: &SamplingParams,
        opts: &RequestOptions,
    ) -> Result<(), EngineError> {
        params.validate()?;
        if let Some(n) = opts.prompt_logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return Err(SamplingError::OutOfRange {
                name: "prompt_logprobs",
                value: n.to_string(),
                expected: "an integer in [0, 20]",
            }
            .into());
        }
        if prompt.is_empty() {
            return Err(EngineError::Request("the prompt is empty (no tokens)".into()));
        }
        if let Some((i, &t)) = prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size)
        {
            return Err(EngineError::Request(format!(
                "prompt token {i} is id {t}, outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        if prompt.len() >= self.max_model_len {
            return Err(EngineError::Request(format!(
                "the prompt has {} tokens but at most {} fit (model context or KV pool, \
                 leaving room for one generated token); shorten the prompt or enlarge the pool",
                prompt.len(),
                self.max_model_len - 1
            )));
        }
        Ok(())
    }
}

/// What one `step` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepReport {
    pub num_seqs: usize,
    pub num_tokens: usize,
    pub num_sampled: usize,
    pub num_finished: usize,
    pub num_preempted: usize,
    /// Drafted tokens the step checked (rows beyond one per sequence).
    pub num_drafted: usize,
    /// Where the step's wall time went.
    pub times: StepTimes,
}

/// Wall time of a step's phases, so that benchmarks can say how much of a
/// step is host work the device waits for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepTimes {
    /// Scheduling: admission, block allocation, the batch layout.
    pub schedule: Duration,
    /// The forward call: all the work on the CPU backend; on CUDA the
    /// metadata upload and the launches (the device runs asynchronously).
    pub forward: Duration,
    /// Choosing the tokens: on CUDA mostly waiting for the device.
    pub pick: Duration,
    /// Bookkeeping and streaming of the chosen tokens (detokenizer, stops).
    pub emit: Duration,
}

pub struct Engine<B: Backend> {
    model: Arc<Model<B>>,
    tok: Arc<Tokenizer>,
    config: EngineConfig,
    kv: B::KvPool,
    sched: Scheduler,
    outputs: HashMap<RequestId, SeqOutput>,
    limits: Limits,
    next_id: Arc<AtomicU64>,
    stats: EngineStats,
    /// Tokens chosen but not yet streamed (see [`Pending`]).
    pending: Vec<Pending>,
    /// Requests whose deferred streaming failed; failed after the step.
    pending_failures: Vec<(RequestId, String)>,
    /// `Some`: defer streaming (or not) regardless of backend and batch.
    defer_override: Option<bool>,
    /// Whether greedy steps overlap (see [`InFlight`]).
    overlap: bool,
    /// The greedy step on the device whose tokens are not read yet.
    inflight: Option<InFlight>,
}

/// A greedy step launched with its argmax queued but not read back. The
/// next `step` launches the step after it first (its input tokens fed from
/// this argmax on the device, when the plan is certain without them: see
/// `Scheduler::schedule_lookahead`), then reads these tokens and streams
/// them while the device computes. The host's scheduling, launch and
/// streaming then hide behind device work instead of adding to every step.
struct InFlight {
    /// Sampling sequences in row order.
    ids: Vec<RequestId>,
    ticket: u64,
}

/// Token id held by a looked-ahead step until the sampled one is known.
const PLACEHOLDER_TOKEN: u32 = 0;

/// Steps with at least this many sampling sequences stream their tokens
/// during the next step's device work (on backends that run asynchronously).
/// Decoding and sending a token costs ~1 us of host time, 66 us of a 1.33 ms
/// step at 64 sequences on the H200 host, while the device sat idle; below
/// this the saving is smaller than the step of latency it adds to a token.
const DEFER_MIN_SEQS: usize = 8;

/// A token whose scheduling consequences are applied (appended; the request
/// finished if a count or stop id ends it) but whose text is not yet
/// decoded and sent. Only requests without stop strings are deferred: for
/// them the text cannot change whether they go on.
struct Pending {
    id: RequestId,
    sampled: Sampled,
    /// Count-based finish already applied to the scheduler, with the usage
    /// and the output that left `outputs` with it.
    finished: Option<(FinishReason, Usage, SeqOutput)>,
}

impl<B: Backend> Engine<B> {
    /// Allocates the KV pool on the model's backend.
    pub fn new(
        model: Arc<Model<B>>,
        tokenizer: Arc<Tokenizer>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        config.validate()?;
        let spec = model.kv_spec(config.num_kv_blocks, config.block_size, config.kv_dtype);
        let kv = model
            .backend
            .alloc_kv(&spec)
            .map_err(|e| EngineError::Model(e.into()))?;
        let blocks = BlockManager::new(
            config.num_kv_blocks,
            config.block_size,
            config.enable_prefix_caching,
        );
        let sched = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
                max_prompt_logprob_rows: DEFAULT_MAX_PROMPT_LOGPROB_ROWS,
                long_prefill: config.long_prefill,
            },
            blocks,
        );
        let limits = Limits {
            vocab_size: model.config.vocab_size,
            max_model_len: model
                .config
                .context_len
                .min(config.num_kv_blocks * config.block_size),
        };
        // Overlapped greedy steps where the device runs on its own (tuning
        // knob `KESTREL_OVERLAP=0` turns them off, for A/B runs).
        let overlap = model.backend.runs_async()
            && model.backend.supports_argmax_feed()
            && std::env::var("KESTREL_OVERLAP").map_or(true, |v| v.trim() != "0");
        Ok(Engine {
            model,
            tok: tokenizer,
            config,
            kv,
            sched,
            outputs: HashMap::new(),
            limits,
            next_id: Arc::new(AtomicU64::new(1)),
            stats: EngineStats::default(),
            pending: Vec::new(),
            pending_failures: Vec::new(),
            defer_override: None,
            overlap,
            inflight: None,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Longest sequence (prompt + output) the engine serves.
    pub fn max_model_len(&self) -> usize {
        self.limits.max_model_len
    }

    /// Queues a request; its events arrive on the returned receiver.
    pub fn add_request(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(RequestId, EventReceiver), EngineError> {
        self.add_request_with(prompt, params, RequestOptions::default())
    }

    /// [`add_request`](Self::add_request) with options.
    pub fn add_request_with(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
        opts: RequestOptions,
    ) -> Result<(RequestId, EventReceiver), EngineError> {
        self.limits.check(&prompt, &params, &opts)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        self.enqueue(id, prompt, params, opts, tx)?;
        Ok((id, rx))
    }

    fn enqueue(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        opts: RequestOptions,
        sink: EventSender,
    ) -> Result<(), EngineError> {
        if opts.prompt_logprobs.is_some() {
            self.sched.add_with_prompt_logprobs(id, prompt)?;
        } else {
            self.sched.add(id, prompt)?;
        }
        let mut out = SeqOutput::new(&self.tok, params, sink);
        out.prompt_logprobs = opts.prompt_logprobs;
        self.outputs.insert(id, out);
        Ok(())
    }

    /// Stops a request at once, frees its blocks and ends its stream with
    /// `Finished { Abort }`. False when the request is unknown (or done).
    pub fn abort(&mut self, id: RequestId) -> bool {
        // Tokens still to be streamed precede the request's end.
        self.deliver_pending();
        let Some(out) = self.outputs.remove(&id) else {
            return false;
        };
        let usage = self.sched.finish(id).map(|s| usage_of(&s)).unwrap_or_default();
        out.finish(FinishReason::Abort, usage);
        true
    }

    /// Forces deferred streaming on or off (`None`: automatic, on where the
    /// backend runs asynchronously and a step samples at least
    /// `DEFER_MIN_SEQS` sequences). For tests, which run on the CPU.
    pub fn set_deferred_streaming(&mut self, on: Option<bool>) {
        self.defer_override = on;
    }

    /// Turns overlapped greedy steps on or off (default: on where the
    /// backend runs asynchronously and can feed argmax ids back). For tests,
    /// which run on the CPU, and A/B runs. Takes effect from the next step
    /// launched.
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap = on && self.model.backend.supports_argmax_feed();
    }

    /// Whether any request is queued or running, or tokens wait to be
    /// streamed.
    pub fn has_work(&self) -> bool {
        self.sched.has_work() || !self.pending.is_empty() || self.inflight.is_some()
    }

    pub fn stats(&self) -> EngineStats {
        let b = self.sched.blocks();
        EngineStats {
            running: self.sched.num_running(),
            waiting: self.sched.num_waiting(),
            kv_blocks_used: b.num_used_blocks(),
            kv_blocks_total: b.num_blocks(),
            kv_blocks_cached: b.num_cached_blocks(),
            prefix_cache: b.stats(),
            ..self.stats
        }
    }

    /// The block manager (for inspection: tests, metrics).
    pub fn block_manager(&self) -> &BlockManager {
        self.sched.blocks()
    }

    /// Drops every prefix-cache entry; returns how many were dropped.
    pub fn clear_prefix_cache(&mut self) -> usize {
        self.sched.clear_prefix_cache()
    }

    /// Drops requests whose receiver is gone: nobody would read their output.
    fn reap_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .outputs
            .iter()
            .filter(|(_, o)| o.sink.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.outputs.remove(&id);
            self.sched.finish(id);
        }
    }

    /// Ends a request with an error event.
    fn fail(&mut self, id: RequestId, message: &str) {
        self.deliver_pending();
        self.sched.finish(id);
        if let Some(out) = self.outputs.remove(&id) {
            out.sink.send(Event::Error {
                message: message.to_string(),
            });
        }
    }

    /// Runs one scheduling step. A model error fails the requests of this
    /// step (each gets an `Error` event) and is returned; the engine stays
    /// usable for the others.
    pub fn step(&mut self) -> Result<StepReport, EngineError> {
        let t0 = Instant::now();
        self.reap_disconnected();
        if let Some(prev) = self.inflight.take() {
            return self.step_overlapped(prev, t0);
        }
        if let Some(report) = self.step_speculative(t0)? {
            return Ok(report);
        }
        let plan = self.sched.schedule();
        let mut report = StepReport {
            num_seqs: plan.scheduled.len(),
            num_tokens: plan.layout.num_tokens(),
            num_preempted: plan.preempted.len(),
            ..StepReport::default()
        };
        report.times.schedule = t0.elapsed();
        self.stats.preemptions += plan.preempted.len() as u64;
        if plan.is_empty() {
            self.deliver_pending();
            return Ok(report);
        }
        let ids: Vec<RequestId> = plan.samplers().collect();
        let picked = self.run_model(&plan, &ids, &mut report.times);
        let t_emit = Instant::now();
        let picked = match picked {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("the model failed on this step: {e}");
                for s in &plan.scheduled {
                    self.fail(s.id, &msg);
                }
                return Err(e);
            }
        };
        self.sched.complete_step(&plan)?;
        self.stats.steps += 1;
        self.stats.tokens_computed += report.num_tokens as u64;

        let defer = self.defer_streaming(ids.len());
        match picked {
            Picked::Queued(ticket) => self.inflight = Some(InFlight { ids, ticket }),
            Picked::Tokens(tokens) => self.emit_greedy(tokens, &ids, defer, false, &mut report)?,
            Picked::Logits(mut logits) => {
                let vocab = self.model.config.vocab_size;
                let (sampling, prompt) = logits.split_at_mut(ids.len() * vocab);
                // Prompt scores first: they precede the request's first token.
                self.send_prompt_logprobs(&plan.prompt_rows, plan.num_samplers(), prompt);
                if ids.len() == 1 {
                    report.num_sampled += 1;
                    if self.sample_one(ids[0], sampling)? {
                        report.num_finished += 1;
                    }
                } else {
                    // Each row's sampler is independent and a row costs a
                    // pass over the whole vocabulary (262k logits for
                    // Gemma): draw them on all cores, then emit in order.
                    for (id, sampled) in self.sample_rows(&ids, sampling, vocab) {
                        report.num_sampled += 1;
                        let ended = match sampled {
                            Some(Ok(s)) => self.emit(id, s, defer, false)?,
                            Some(Err(e)) => {
                                self.fail(id, &e.to_string());
                                true
                            }
                            None => false,
                        };
                        if ended {
                            report.num_finished += 1;
                        }
                    }
                }
            }
        }
        self.finish_step(report, t_emit)
    }

    /// The speculation settings when this step may speculate: speculation
    /// is on, nobody waits, at most `max_seqs` sequences run and every one
    /// is plain greedy (a draft is checked against the argmax).
    fn speculating(&self) -> Option<NgramSpeculation> {
        let spec = self.config.speculation?;
        let running = self.sched.running();
        let eligible = !running.is_empty()
            && running.len() <= spec.max_seqs
            && self.sched.num_waiting() == 0
            && running
                .iter()
                .all(|id| self.outputs.get(id).is_some_and(|o| o.params.is_plain_greedy()));
        eligible.then_some(spec)
    }

    /// A speculative decode step (see [`crate::speculative`]) when the
    /// running sequences qualify and one of them has a draft; `None`, with
    /// nothing changed, otherwise. Its tokens are read at once: the next
    /// step's drafts depend on them.
    fn step_speculative(&mut self, t0: Instant) -> Result<Option<StepReport>, EngineError> {
        let Some(spec) = self.speculating() else {
            return Ok(None);
        };
        let mut drafts = Vec::with_capacity(self.sched.num_running());
        for &id in self.sched.running() {
            let (Some(o), Some(s)) = (self.outputs.get(&id), self.sched.seq(id)) else {
                return Ok(None);
            };
            // Rows past the request's last token or past the context would
            // be computed for nothing.
            let limit = o
                .params
                .max_tokens
                .saturating_sub(s.generated().len() + 1)
                .min(self.limits.max_model_len.saturating_sub(s.tokens.len()));
            drafts.push((id, spec.propose(&s.tokens, limit)));
        }
        if drafts.iter().all(|(_, d)| d.is_empty()) {
            return Ok(None);
        }
        let plan = match self.sched.schedule_draft(&drafts) {
            Ok(Some(plan)) => plan,
            Ok(None) => return Ok(None),
            Err(e) => {
                let msg = format!("the scheduler failed on this step: {e}");
                for (id, _) in &drafts {
                    self.fail(*id, &msg);
                }
                return Err(e.into());
            }
        };
        let rows = plan.layout.num_tokens();
        let mut report = StepReport {
            num_seqs: plan.scheduled.len(),
            num_tokens: rows,
            num_drafted: rows - plan.scheduled.len(),
            ..StepReport::default()
        };
        report.times.schedule = t0.elapsed();
        let t1 = Instant::now();
        let model = self.model.clone();
        let picked = match model.forward_greedy(&plan.layout, &mut self.kv, &plan.logit_rows) {
            Ok(act) => {
                report.times.forward = t1.elapsed();
                self.deliver_pending();
                let t2 = Instant::now();
                let ids = model.backend.argmax_rows(&act);
                report.times.pick = t2.elapsed();
                ids.map_err(|e| EngineError::Model(e.into()))
            }
            Err(e) => Err(e.into()),
        };
        let tokens = match picked {
            Ok(t) if t.len() == rows => t,
            got => {
                let e = match got {
                    Err(e) => e,
                    Ok(t) => {
                        EngineError::Request(format!("the model returned {} ids for {rows} rows", t.len()))
                    }
                };
                let msg = format!("the model failed on this step: {e}");
                for (id, _) in &drafts {
                    self.fail(*id, &msg);
                }
                return Err(e);
            }
        };
        let t_emit = Instant::now();
        self.stats.steps += 1;
        self.stats.speculative_steps += 1;
        self.stats.tokens_computed += rows as u64;
        let mut first = 0;
        for (sch, (id, draft)) in plan.scheduled.iter().zip(&drafts) {
            let picks = &tokens[first..first + sch.num_tokens];
            first += sch.num_tokens;
            let Some(computed) = self.sched.seq(*id).map(|s| s.num_computed) else {
                continue;
            };
            let kept = confirmed(draft, picks);
            self.stats.draft_tokens += draft.len() as u64;
            self.stats.accepted_tokens += kept as u64;
            let mut ended = false;
            for &token in &picks[..=kept] {
                report.num_sampled += 1;
                if self.emit(*id, Sampled::token_only(token), false, false)? {
                    report.num_finished += 1;
                    ended = true;
                    break;
                }
            }
            if !ended && self.sched.seq(*id).is_some() {
                // The input token and the kept drafts have their KV now.
                self.sched.complete_draft(*id, computed + 1 + kept)?;
            }
        }
        self.finish_step(report, t_emit).map(Some)
    }

    /// The step after an overlapped one (`prev` still on the device):
    /// launches the next greedy step first where its plan is certain
    /// without `prev`'s tokens, then reads those tokens and streams them
    /// while the device works.
    fn step_overlapped(&mut self, prev: InFlight, t0: Instant) -> Result<StepReport, EngineError> {
        let mut report = StepReport::default();
        // Where this step may speculate, its drafts need prev's tokens.
        let planned = if self.overlap && self.lookahead_allowed(&prev.ids) && self.speculating().is_none() {
            self.sched.schedule_lookahead(&prev.ids, PLACEHOLDER_TOKEN)
        } else {
            Ok(None)
        };
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("the scheduler failed on this step: {e}");
                for &id in &prev.ids {
                    self.fail(id, &msg);
                }
                return Err(e.into());
            }
        };
        report.times.schedule = t0.elapsed();
        let mut next = None;
        if let Some(plan) = plan {
            report.num_seqs = plan.scheduled.len();
            report.num_tokens = plan.layout.num_tokens();
            let t1 = Instant::now();
            let launched = self.launch_fed(&plan);
            report.times.forward = t1.elapsed();
            match launched {
                Ok(ticket) => next = Some((plan, ticket)),
                Err(e) => {
                    let msg = format!("the model failed on this step: {e}");
                    for &id in &prev.ids {
                        self.fail(id, &msg);
                    }
                    return Err(e);
                }
            }
        }
        let t2 = Instant::now();
        let tokens = self.model.backend.take_argmax(prev.ticket);
        report.times.pick = t2.elapsed();
        let t_emit = Instant::now();
        let tokens = match tokens {
            Ok(t) if t.len() == prev.ids.len() => t,
            got => {
                let e = match got {
                    Err(e) => EngineError::Model(e.into()),
                    Ok(t) => EngineError::Request(format!(
                        "the model returned {} ids for {} sampling rows",
                        t.len(),
                        prev.ids.len()
                    )),
                };
                let msg = format!("the model failed on this step: {e}");
                for &id in &prev.ids {
                    self.fail(id, &msg);
                }
                return Err(e);
            }
        };
        // Tokens deferred by an earlier step precede these.
        self.deliver_pending();
        let replace = next.is_some();
        // With no step launched nothing overlaps this streaming: defer as
        // after any step.
        let defer = !replace && self.defer_streaming(prev.ids.len());
        self.emit_greedy(tokens, &prev.ids, defer, replace, &mut report)?;
        if let Some((plan, ticket)) = next {
            // Its placeholders are the real tokens now: record its KV.
            self.sched.complete_step(&plan)?;
            self.stats.steps += 1;
            self.stats.overlapped_steps += 1;
            self.stats.tokens_computed += plan.layout.num_tokens() as u64;
            self.inflight = Some(InFlight {
                ids: plan.samplers().collect(),
                ticket,
            });
        }
        self.finish_step(report, t_emit)
    }

    /// Whether a request's token can be left on the device for the next
    /// step: plain greedy (the argmax), or a draw whose decision needs
    /// nothing from the host but its random number (no penalty, no
    /// logprobs) and that the backend queues (`Backend::queues_sample`).
    fn queueable(&self, o: &SeqOutput) -> bool {
        let vocab = self.model.config.vocab_size;
        o.params.is_plain_greedy()
            || (o.params.logprobs.is_none()
                && o.sampler
                    .device_shape(vocab)
                    .is_some_and(|d| self.model.backend.queues_sample(&d, vocab)))
    }

    /// Whether the step after the one in flight may be planned before its
    /// tokens are known: every request's token stays on the device
    /// (`queueable`) and none can end by count with this token. An end by
    /// EOS or a stop string only wastes its row of the next step.
    fn lookahead_allowed(&self, ids: &[RequestId]) -> bool {
        ids.iter()
            .all(|id| match (self.outputs.get(id), self.sched.seq(*id)) {
                (Some(o), Some(s)) => {
                    self.queueable(o)
                        && s.generated().len() + 1 < o.params.max_tokens
                        && s.tokens.len() + 1 < self.limits.max_model_len
                }
                _ => false,
            })
    }

    /// Launches a looked-ahead step whose input tokens come from the queued
    /// ids on the device (argmax or draws); returns its own ticket.
    fn launch_fed(&mut self, plan: &StepPlan) -> Result<u64, EngineError> {
        let model = self.model.clone();
        let rows = plan.layout.num_tokens();
        let ids: Vec<RequestId> = plan.samplers().collect();
        let greedy = ids
            .iter()
            .all(|id| self.outputs.get(id).is_none_or(|o| o.params.is_plain_greedy()));
        let act = model.forward_fed(&plan.layout, &mut self.kv, &plan.logit_rows, rows, greedy)?;
        let be = model.backend.as_ref();
        let queued = if greedy {
            be.queue_argmax(&act)
        } else {
            be.queue_sample(&act, &self.device_rows(&ids))
        };
        queued.map_err(|e| EngineError::Model(e.into()))
    }

    /// This step's device decision of each request of `ids` (its draw made
    /// now, in step order); a request that is gone takes the argmax (its
    /// token is dropped when emitted).
    fn device_rows(&mut self, ids: &[RequestId]) -> Vec<DeviceSample> {
        let vocab = self.model.config.vocab_size;
        ids.iter()
            .map(|id| match (self.outputs.get_mut(id), self.sched.seq(*id)) {
                (Some(o), Some(seq)) => o.sampler.device_request(seq.prompt(), seq.generated(), vocab),
                _ => DeviceSample::argmax(),
            })
            .collect()
    }

    /// Whether a step of `samplers` sequences streams its tokens during
    /// the next step's device work.
    fn defer_streaming(&self, samplers: usize) -> bool {
        self.defer_override
            .unwrap_or(self.model.backend.runs_async() && samplers >= DEFER_MIN_SEQS)
    }

    /// Emits argmax tokens, one per sampling sequence of `ids`.
    fn emit_greedy(
        &mut self,
        tokens: Vec<u32>,
        ids: &[RequestId],
        defer: bool,
        replace: bool,
        report: &mut StepReport,
    ) -> Result<(), EngineError> {
        for (token, &id) in tokens.into_iter().zip(ids) {
            report.num_sampled += 1;
            if self.emit(id, Sampled::token_only(token), defer, replace)? {
                report.num_finished += 1;
            }
        }
        Ok(())
    }

    /// Fails what failed while streaming and streams now when nothing
    /// follows to overlap with.
    fn finish_step(&mut self, mut report: StepReport, t_emit: Instant) -> Result<StepReport, EngineError> {
        for (id, message) in std::mem::take(&mut self.pending_failures) {
            self.fail(id, &message);
        }
        if !self.sched.has_work() && self.inflight.is_none() {
            self.deliver_pending();
        }
        report.times.emit = t_emit.elapsed();
        Ok(report)
    }

    /// Scores the prompt tokens of the step's prompt rows (`logits` holds
    /// the rows after the `samplers` sampling rows) and sends them.
    fn send_prompt_logprobs(&mut self, rows: &[PromptRows], samplers: usize, logits: &mut [f32]) {
        let vocab = self.model.config.vocab_size;
        for r in rows {
            let (Some(out), Some(seq)) = (self.outputs.get(&r.id), self.sched.seq(r.id)) else {
                continue;
            };
            let top_n = out.prompt_logprobs.unwrap_or(0);
            // Prompt rows follow the sampling rows; run_model checked the count.
            let start = r.first_row.saturating_sub(samplers) * vocab;
            let Some(block) = logits.get_mut(start..start + r.count * vocab) else {
                continue;
            };
            let mut entries = Vec::with_capacity(r.count);
            for (k, row) in block.chunks_exact_mut(vocab).enumerate() {
                let Some(&token) = seq.prompt().get(r.first_pos + k + 1) else {
                    break;
                };
                // Rows are never empty (vocab > 0), so scoring cannot fail.
                let Ok((logprob, top_logprobs)) = score_token(row, token, top_n) else {
                    break;
                };
                entries.push(PromptLogprob {
                    token,
                    logprob,
                    top_logprobs,
                });
            }
            out.sink.send(Event::PromptLogprobs {
                first: r.first_pos + 1,
                entries,
            });
        }
    }

    /// Runs the step's forward pass. When every sampling sequence is plain
    /// greedy and no prompt is scored, only the argmax ids leave the device;
    /// otherwise the logits rows come to the host.
    fn run_model(
        &mut self,
        plan: &StepPlan,
        ids: &[RequestId],
        times: &mut StepTimes,
    ) -> Result<Picked, EngineError> {
        let t0 = Instant::now();
        // A handle of our own: the logits borrow it while `self` streams.
        let model = self.model.clone();
        let all_greedy = plan.prompt_rows.is_empty()
            && ids
                .iter()
                .all(|id| self.outputs.get(id).is_none_or(|o| o.params.is_plain_greedy()));
        // Only argmax ids leave a greedy step: the LM head may fold it in.
        let act = if all_greedy {
            model.forward_greedy(&plan.layout, &mut self.kv, &plan.logit_rows)?
        } else {
            model.forward(&plan.layout, &mut self.kv, &plan.logit_rows)?
        };
        times.forward = t0.elapsed();
        let t1 = Instant::now();
        // The device works on this step: stream the previous step's tokens.
        self.deliver_pending();
        let be = self.model.backend.as_ref();
        // Sampled rows whose decision needs nothing but the token (no
        // logprobs) are decided where the logits are, when the backend can.
        let on_device = !all_greedy
            && plan.prompt_rows.is_empty()
            && be.device_sampling(self.model.config.vocab_size)
            && ids
                .iter()
                .all(|id| self.outputs.get(id).is_none_or(|o| o.params.logprobs.is_none()));
        // A step that may speculate next reads its tokens now (its drafts
        // need them).
        let picked = if all_greedy && self.overlap && self.speculating().is_none() {
            Picked::Queued(be.queue_argmax(&act).map_err(|e| EngineError::Model(e.into()))?)
        } else if all_greedy {
            Picked::Tokens(be.argmax_rows(&act).map_err(|e| EngineError::Model(e.into()))?)
        } else if on_device {
            let vocab = self.model.config.vocab_size;
            let rows = self.device_rows(ids);
            let be = self.model.backend.as_ref();
            // Draws the device can queue let the next step start before
            // this one's tokens reach the host, as greedy steps do.
            if self.overlap && rows.iter().all(|r| be.queues_sample(r, vocab)) {
                Picked::Queued(
                    be.queue_sample(&act, &rows)
                        .map_err(|e| EngineError::Model(e.into()))?,
                )
            } else {
                Picked::Tokens(
                    be.sample_rows(&act, &rows)
                        .map_err(|e| EngineError::Model(e.into()))?,
                )
            }
        } else {
            Picked::Logits(be.read_act(&act).map_err(|e| EngineError::Model(e.into()))?)
        };
        times.pick = t1.elapsed();
        let rows = plan.logit_rows.len();
        let (got, want) = match &picked {
            Picked::Tokens(t) => (t.len(), rows),
            Picked::Queued(_) => (rows, rows),
            Picked::Logits(l) => (l.len(), rows * self.model.config.vocab_size),
        };
        if got != want || rows != ids.len() + plan.prompt_rows.iter().map(|r| r.count).sum::<usize>() {
            return Err(EngineError::Request(format!(
                "the model returned {got} values for {rows} logits rows ({} sampling), expected {want}",
                ids.len()
            )));
        }
        Ok(picked)
    }

    /// Samples the rows of `ids` (one logits row each, used as scratch) in
    /// parallel; `None` for a request that is gone.
    fn sample_rows(
        &mut self,
        ids: &[RequestId],
        rows: &mut [f32],
        vocab: usize,
    ) -> Vec<(RequestId, Option<Result<Sampled, crate::sampling::SamplingError>>)> {
        use rayon::prelude::*;
        let sched = &self.sched;
        let mut samplers: HashMap<RequestId, &mut crate::sampling::Sampler> = self
            .outputs
            .iter_mut()
            .map(|(&id, o)| (id, &mut o.sampler))
            .collect();
        let jobs: Vec<_> = rows
            .chunks_exact_mut(vocab)
            .zip(ids)
            .map(|(row, &id)| (id, row, samplers.remove(&id)))
            .collect();
        jobs.into_par_iter()
            .map(|(id, row, sampler)| {
                let r = match (sampler, sched.seq(id)) {
                    (Some(s), Some(seq)) => Some(s.sample(row, seq.prompt(), seq.generated())),
                    _ => None,
                };
                (id, r)
            })
            .collect()
    }

    /// Samples one sequence's next token from its logits row (used as
    /// scratch), then records and streams it; true when the request ended.
    fn sample_one(&mut self, id: RequestId, row: &mut [f32]) -> Result<bool, EngineError> {
        let (Some(out), Some(seq)) = (self.outputs.get_mut(&id), self.sched.seq(id)) else {
            return Ok(false);
        };
        match out.sampler.sample(row, seq.prompt(), seq.generated()) {
            Ok(sampled) => self.emit(id, sampled, false, false),
            Err(e) => {
                self.fail(id, &e.to_string());
                Ok(true)
            }
        }
    }

    /// Appends a chosen token to its sequence, streams it and applies the
    /// stop conditions; true when the request ended. With `defer`, a
    /// request without stop strings gets its token streamed by the next
    /// [`deliver_pending`](Self::deliver_pending) instead. With `replace`,
    /// the token replaces the sequence's placeholder (overlapped steps).
    fn emit(
        &mut self,
        id: RequestId,
        sampled: Sampled,
        defer: bool,
        replace: bool,
    ) -> Result<bool, EngineError> {
        if self.sched.seq(id).is_none() || !self.outputs.contains_key(&id) {
            return Ok(false);
        }
        if replace {
            // Its placeholder is in the step now on the device.
            self.sched.set_last_token(id, sampled.token)?;
        } else {
            self.sched.append_token(id, sampled.token)?;
        }
        self.stats.tokens_generated += 1;
        let (Some(out), Some(seq)) = (self.outputs.get_mut(&id), self.sched.seq(id)) else {
            return Ok(false);
        };
        let generated = seq.generated().len();
        let full = seq.tokens.len() >= self.limits.max_model_len;
        if defer {
            if let Some(ends) = out.finish_without_text(sampled.token, generated, full) {
                let finished = match ends {
                    Some(reason) => {
                        let usage = self.sched.finish(id).map(|s| usage_of(&s)).unwrap_or_default();
                        self.outputs.remove(&id).map(|out| (reason, usage, out))
                    }
                    None => None,
                };
                self.pending.push(Pending {
                    id,
                    sampled,
                    finished,
                });
                return Ok(ends.is_some());
            }
        }
        let finish = match out.accept(&self.tok, sampled, generated, full) {
            Ok(f) => f,
            Err(e) => {
                self.fail(id, &e.to_string());
                return Ok(true);
            }
        };
        if let Some(reason) = finish {
            let usage = self.sched.finish(id).map(|s| usage_of(&s)).unwrap_or_default();
            if let Some(out) = self.outputs.remove(&id) {
                out.finish(reason, usage);
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Streams the deferred tokens (in the order chosen) and the ends of
    /// the requests they finished. A request still running whose token
    /// cannot be decoded is failed after the step (its scheduler state may
    /// be in the step in flight).
    fn deliver_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            match p.finished {
                Some((reason, usage, mut out)) => match out.deliver(&self.tok, p.sampled, Some(reason)) {
                    // Without stop strings the text keeps the count-based reason.
                    Ok(_) => out.finish(reason, usage),
                    Err(e) => {
                        out.sink.send(Event::Error {
                            message: e.to_string(),
                        });
                    }
                },
                None => {
                    let Some(out) = self.outputs.get_mut(&p.id) else {
                        continue; // aborted meanwhile
                    };
                    if let Err(e) = out.deliver(&self.tok, p.sampled, None) {
                        self.pending_failures.push((p.id, e.to_string()));
                    }
                }
            }
        }
    }

    /// Aborts every request (shutdown).
    pub fn abort_all(&mut self) {
        let ids: Vec<RequestId> = self.outputs.keys().copied().collect();
        for id in ids {
            self.abort(id);
        }
    }
}

/// What a step's forward pass hands to sampling.
enum Picked {
    /// Argmax ids, one per sampling sequence.
    Tokens(Vec<u32>),
    /// Argmax ids queued on the device (overlapped steps).
    Queued(u64),
    /// Logits rows `[samplers, vocab]` on the host.
    Logits(Vec<f32>),
}

fn usage_of(s: &crate::scheduler::SeqState) -> Usage {
    Usage {
        prompt_tokens: s.prompt_len,
        completion_tokens: s.tokens.len() - s.prompt_len,
        cached_tokens: s.cached_prompt_tokens.unwrap_or(0),
    }
}

enum Command {
    Add {
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
        opts: RequestOptions,
        sink: EventSender,
    },
    Abort(RequestId),
    ClearCache(mpsc::Sender<usize>),
    Shutdown,
}

struct HandleShared {
    /// Set by `shutdown`: new requests are refused from then on, even in
    /// the moment before the engine thread has stopped.
    stopping: std::sync::atomic::AtomicBool,
    limits: Limits,
    next_id: Arc<AtomicU64>,
    stats: Mutex<EngineStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A cloneable handle to an engine running on its own thread. Its methods
/// never wait for the engine's step. The thread ends after `shutdown`, or
/// once every handle is dropped and the remaining requests are done.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<HandleShared>,
}

impl<B: Backend + 'static> Engine<B> {
    /// Moves the engine onto its own thread.
    pub fn spawn(self) -> Result<EngineHandle, EngineError> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(HandleShared {
            stopping: std::sync::atomic::AtomicBool::new(false),
            limits: self.limits,
            next_id: self.next_id.clone(),
            stats: Mutex::new(self.stats()),
            thread: Mutex::new(None),
        });
        let loop_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kestrel-engine".into())
            .spawn(move || run_loop(self, rx, &loop_shared))
            .map_err(|e| EngineError::Request(format!("could not start the engine thread: {e}")))?;
        *shared.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(EngineHandle { tx, shared })
    }
}

fn run_loop<B: Backend>(mut engine: Engine<B>, rx: mpsc::Receiver<Command>, shared: &HandleShared) {
    let mut handles_gone = false;
    loop {
        // Idle: sleep until a command arrives.
        if !engine.has_work() {
            if handles_gone {
                break;
            }
            match rx.recv() {
                Ok(cmd) => {
                    if !apply(&mut engine, cmd) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let mut stop = false;
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !apply(&mut engine, cmd) {
                        stop = true;
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    handles_gone = true;
                    break;
                }
            }
        }
        if stop {
            engine.abort_all();
            break;
        }
        if engine.has_work() {
            if let Err(e) = engine.step() {
                tracing::error!("engine step failed: {e}");
            }
        }
        *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats();
    }
    *shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats();
}

/// Applies one command; false on shutdown.
fn apply<B: Backend>(engine: &mut Engine<B>, cmd: Command) -> bool {
    match cmd {
        Command::Add {
            id,
            prompt,
            params,
            opts,
            sink,
        } => {
            if let Err(e) = engine.enqueue(id, prompt, params, opts, sink) {
                tracing::error!("request {id} rejected by the engine: {e}");
            }
        }
        Command::Abort(id) => {
            engine.abort(id);
        }
        Command::ClearCache(reply) => {
            let _ = reply.send(engine.clear_prefix_cache());
        }
        Command::Shutdown => return false,
    }
    true
}

impl EngineHandle {
    /// Queues a request; its events arrive on the returned receiver.
    /// Validation errors come back here, at once.
    pub fn add_request(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(RequestId, EventReceiver), EngineError> {
        self.add_request_with(prompt, params, RequestOptions::default())
    }

    /// [`add_request`](Self::add_request) with options.
    pub fn add_request_with(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        opts: RequestOptions,
    ) -> Result<(RequestId, EventReceiver), EngineError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(EngineError::Stopped);
        }
        self.shared.limits.check(&prompt, &params, &opts)?;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (sink, rx) = channel();
        self.tx
            .send(Command::Add {
                id,
                prompt,
                params,
                opts,
                sink,
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok((id, rx))
    }

    /// Stops a request at once (its stream ends with `Finished { Abort }`).
    /// Dropping the request's receiver has the same effect, silently.
    pub fn abort(&self, id: RequestId) -> Result<(), EngineError> {
        self.tx.send(Command::Abort(id)).map_err(|_| EngineError::Stopped)
    }

    /// Drops the prefix cache between two steps and returns how many
    /// entries were dropped (waits for the engine thread to answer).
    pub fn clear_prefix_cache(&self) -> Result<usize, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.tx
            .send(Command::ClearCache(tx))
            .map_err(|_| EngineError::Stopped)?;
        rx.recv().map_err(|_| EngineError::Stopped)
    }

    /// State as of the end of the engine's latest step.
    pub fn stats(&self) -> EngineStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Longest sequence (prompt + output) the engine serves.
    pub fn max_model_len(&self) -> usize {
        self.shared.limits.max_model_len
    }

    /// Aborts everything and waits for the engine thread to end.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = self.tx.send(Command::Shutdown);
        let thread = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the engine thread panicked");
            }
        }
    }
}
