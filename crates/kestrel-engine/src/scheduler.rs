//! The step scheduler (vLLM v1 style).
//!
//! Every sequence only tracks how many of its tokens (prompt, then generated
//! ones) have their KV computed. Each step gives each chosen sequence the
//! next `n` of its uncomputed tokens; a prefill in chunks, a prefix-cache hit
//! (computed count starts past the hit) and a decode (one token) are the same
//! thing with different `n`, so none needs a special case.
//!
//! A step has a token budget (`max_num_batched_tokens`) and a sequence cap
//! (`max_num_seqs`). It is filled in this order:
//!
//! 1. running sequences that decode (one token each), oldest first, so a
//!    long prompt never stalls the streams already running;
//! 2. running sequences still in their prefill, a chunk each, oldest first;
//! 3. waiting sequences, first come first served: admission stops at the
//!    first one that does not fit, so nobody is overtaken.
//!
//! When a running sequence needs a KV block and none is free, the newest
//! running sequence is preempted: its blocks are freed (its full blocks stay
//! in the prefix cache, so the recompute is often cheap) and it goes back to
//! the waiting queue in arrival order. If that newest one was already given
//! tokens in this step they are taken back; if the sequence needing the
//! block is itself the newest, it is the one preempted. No new sequence is
//! admitted in a step that preempted.
//!
//! # Prompt log-probabilities
//!
//! A sequence added with [`Scheduler::add_with_prompt_logprobs`] also wants
//! the logits of its prompt positions (each scores the next prompt token).
//! Those positions must run through the model, so such a sequence takes from
//! the prefix cache only tokens before the first position still wanted; and
//! because every such row is a vocabulary of logits brought to the host, a
//! step carries at most `max_prompt_logprob_rows` of them: a chunk that would
//! need more is cut short (admission still stops at the first sequence that
//! gets nothing, so nobody is overtaken). A position's row is planned once:
//! after a preemption, the recompute skips the rows already delivered.

use std::collections::{HashMap, VecDeque};

use kestrel_backend::BatchLayout;

use crate::block_manager::{BlockError, BlockManager, SeqId};

/// Step limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one step.
    pub max_num_batched_tokens: usize,
    /// Most prompt log-probability rows in one step: each is a vocabulary
    /// of logits brought to the host, so this bounds the step's memory.
    pub max_prompt_logprob_rows: usize,
    /// Long prefills beside running decodes: while a step carries decodes,
    /// prefilling sequences that compute more than `threshold` tokens (the
    /// prefix cache's share excluded) get at most `chunk` tokens of that
    /// step between them, so a long prompt slows the running streams by a
    /// bounded amount (a 2,048-token chunk beside 32 streams made their
    /// time per token 13x; 64-token chunks 1.73x: H100, default model).
    /// Shorter prompts are admitted as before. `chunk == 0` turns it off.
    pub long_prefill: LongPrefill,
}

/// See [`SchedulerConfig::long_prefill`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPrefill {
    /// Sequences that compute more than this many tokens (the prefix
    /// cache's share excluded) are long.
    pub threshold: usize,
    /// Tokens of long prefills per step while the step carries decodes.
    pub chunk: usize,
}

impl Default for LongPrefill {
    /// Prompts over 256 tokens, 64 tokens per step beside decodes.
    fn default() -> Self {
        LongPrefill {
            threshold: 256,
            chunk: 64,
        }
    }
}

/// Default of [`SchedulerConfig::max_prompt_logprob_rows`]: 256 rows of
/// Gemma 3's 262,144 logits are 256 MiB of f32.
pub const DEFAULT_MAX_PROMPT_LOGPROB_ROWS: usize = 256;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_prompt_logprob_rows: DEFAULT_MAX_PROMPT_LOGPROB_ROWS,
            long_prefill: LongPrefill::default(),
        }
    }
}

/// What the scheduler knows of one sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqState {
    pub id: SeqId,
    /// The prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose KV is in the pool.
    pub num_computed: usize,
    /// Prompt tokens found in the prefix cache when first admitted.
    pub cached_prompt_tokens: Option<usize>,
    /// Times this sequence was preempted.
    pub preemptions: u32,
    /// `Some(p)`: the logits of prompt positions `p..prompt_len - 1` are
    /// still wanted (position `i` scores prompt token `i + 1`), so tokens
    /// from `p` on must be computed, not taken from the prefix cache.
    /// `None` once every one was planned, or when never asked for.
    pub prompt_logprobs_from: Option<usize>,
}

impl SeqState {
    pub fn prompt(&self) -> &[u32] {
        &self.tokens[..self.prompt_len]
    }
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}

/// One sequence's share of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Tokens computed for it in this step.
    pub num_tokens: usize,
    /// The step completes its known tokens, so a new token is sampled from
    /// its logits row.
    pub sample: bool,
    /// Prompt log-probability rows this chunk carries.
    pub prompt_rows: usize,
}

/// Prompt log-probability rows of one sequence in a step: logit row
/// `first_row + k` (an index into [`StepPlan::logit_rows`]) holds the
/// logits at prompt position `first_pos + k`, which score prompt token
/// `first_pos + k + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptRows {
    pub id: SeqId,
    pub first_pos: usize,
    pub first_row: usize,
    pub count: usize,
}

/// A step's work, ready for `Model::forward`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub layout: BatchLayout,
    /// Rows of `layout` whose logits are needed: first one per sampling
    /// sequence (in the order those sequences appear in `scheduled`), then
    /// the prompt log-probability rows described by `prompt_rows`.
    pub logit_rows: Vec<u32>,
    pub scheduled: Vec<Scheduled>,
    /// Where the prompt log-probability rows are, per sequence.
    pub prompt_rows: Vec<PromptRows>,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
    /// Ids of the sequences that sample, in logit-row order.
    pub fn samplers(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.scheduled.iter().filter(|s| s.sample).map(|s| s.id)
    }
    /// Number of sampling rows (the first rows of `logit_rows`).
    pub fn num_samplers(&self) -> usize {
        self.scheduled.iter().filter(|s| s.sample).count()
    }
}

/// What is left of a step's limits while it is being planned.
struct Budget {
    tokens: usize,
    prompt_rows: usize,
}

impl SeqState {
    /// Prompt log-probability rows a chunk of `n` tokens from `from` needs.
    fn prompt_rows_needed(&self, from: usize, n: usize) -> usize {
        let Some(p) = self.prompt_logprobs_from else {
            return 0;
        };
        let end = (from + n).min(self.prompt_len.saturating_sub(1));
        end.saturating_sub(from.max(p))
    }

    /// The longest chunk of at most `n` tokens from `from` whose rows fit in
    /// `rows` (possibly 0).
    fn chunk_within_rows(&self, from: usize, n: usize, rows: usize) -> usize {
        if self.prompt_rows_needed(from, n) <= rows {
            return n;
        }
        // Tokens before the first wanted row cost no row.
        let first = self.prompt_logprobs_from.map_or(from, |p| p.max(from));
        (first + rows - from).min(n)
    }

    /// Leading tokens the prefix cache may supply: all but those whose
    /// prompt log-probability rows are still wanted.
    fn cacheable(&self) -> &[u32] {
        match self.prompt_logprobs_from {
            Some(p) => &self.tokens[..(p + 1).min(self.tokens.len())],
            None => &self.tokens,
        }
    }
}

/// Why the scheduler refused a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("request {id} is already queued or running")]
    Duplicate { id: SeqId },
    #[error("request {id} has an empty prompt, expected at least one token")]
    EmptyPrompt { id: SeqId },
    #[error("request {id} is not known to the scheduler")]
    Unknown { id: SeqId },
    #[error(transparent)]
    Blocks(#[from] BlockError),
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, SeqState>,
    /// Waiting sequences in arrival (id) order.
    waiting: VecDeque<SeqId>,
    /// Running sequences in arrival (id) order: the last is the newest.
    running: Vec<SeqId>,
}

impl Scheduler {
    /// A scheduler over `blocks`. Limits below 1 are raised to 1.
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Scheduler {
        Scheduler {
            cfg: SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs.max(1),
                max_num_batched_tokens: cfg.max_num_batched_tokens.max(1),
                max_prompt_logprob_rows: cfg.max_prompt_logprob_rows.max(1),
                long_prefill: cfg.long_prefill,
            },
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    /// Drops the prefix cache (see `BlockManager::clear_cache`).
    pub fn clear_prefix_cache(&mut self) -> usize {
        self.blocks.clear_cache()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn running(&self) -> &[SeqId] {
        &self.running
    }
    pub fn waiting(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }
    pub fn seq(&self, id: SeqId) -> Option<&SeqState> {
        self.seqs.get(&id)
    }

    /// Queues a new sequence. Ids must grow with arrival: they define the
    /// first-come-first-served order and which sequence is the newest.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) -> Result<(), SchedulerError> {
        self.add_seq(id, prompt, false)
    }

    /// Like [`add`](Self::add), and the step plans also carry the logits of
    /// every prompt position but the last (see [`StepPlan::prompt_rows`]).
    pub fn add_with_prompt_logprobs(&mut self, id: SeqId, prompt: Vec<u32>) -> Result<(), SchedulerError> {
        self.add_seq(id, prompt, true)
    }

    fn add_seq(&mut self, id: SeqId, prompt: Vec<u32>, prompt_logprobs: bool) -> Result<(), SchedulerError> {
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::Duplicate { id });
        }
        if prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt { id });
        }
        let prompt_len = prompt.len();
        self.seqs.insert(
            id,
            SeqState {
                id,
                prompt_len,
                tokens: prompt,
                num_computed: 0,
                cached_prompt_tokens: None,
                preemptions: 0,
                // A one-token prompt has no position that scores a prompt token.
                prompt_logprobs_from: (prompt_logprobs && prompt_len > 1).then_some(0),
            },
        );
        self.enqueue_waiting(id);
        Ok(())
    }

    fn enqueue_waiting(&mut self, id: SeqId) {
        let at = self.waiting.partition_point(|&w| w < id);
        self.waiting.insert(at, id);
    }

    /// Plans the next step (empty when there is nothing to do or nothing fits).
    pub fn schedule(&mut self) -> StepPlan {
        let mut budget = Budget {
            tokens: self.cfg.max_num_batched_tokens,
            prompt_rows: self.cfg.max_prompt_logprob_rows,
        };
        let mut scheduled: Vec<Scheduled> = Vec::new();
        let mut preempted = Vec::new();

        // Decodes first, then prefill chunks of running sequences. The list
        // is copied because preemption shrinks `running` as we go.
        let order: Vec<SeqId> = self.running.clone();
        // Tokens long prefills may still take in this step (see
        // `LongPrefill`): bounded once the step carries a decode.
        let mut long_left = usize::MAX;
        for decode_pass in [true, false] {
            if !decode_pass && !scheduled.is_empty() && self.cfg.long_prefill.chunk > 0 {
                long_left = self.cfg.long_prefill.chunk;
            }
            for &id in &order {
                if budget.tokens == 0 {
                    break;
                }
                let Some(s) = self.seqs.get(&id) else { continue };
                if !self.running.contains(&id) {
                    continue; // preempted earlier in this step
                }
                let remaining = s.tokens.len() - s.num_computed;
                if remaining == 0 || (remaining == 1) != decode_pass {
                    continue;
                }
                let to_compute = s.tokens.len() - s.cached_prompt_tokens.unwrap_or(0);
                let limit = self.long_limit(to_compute, long_left);
                let n = s.chunk_within_rows(
                    s.num_computed,
                    remaining.min(budget.tokens).min(limit),
                    budget.prompt_rows,
                );
                if n == 0 {
                    continue; // its rows (or long-prefill tokens) wait for the next step
                }
                let rows = s.prompt_rows_needed(s.num_computed, n);
                let slots = s.num_computed + n;
                if self.make_room(id, slots, &mut scheduled, &mut budget, &mut preempted) {
                    scheduled.push(Scheduled {
                        id,
                        num_tokens: n,
                        sample: n == remaining,
                        prompt_rows: rows,
                    });
                    budget.tokens -= n;
                    budget.prompt_rows -= rows;
                    if limit < usize::MAX {
                        long_left -= n;
                    }
                }
            }
        }

        // Admit waiting sequences in arrival order.
        if preempted.is_empty() {
            // Only worth computing when someone waits.
            let mut pending = if self.waiting.is_empty() {
                Default::default()
            } else {
                self.pending_block_hashes()
            };
            while budget.tokens > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else { break };
                let Some(s) = self.seqs.get(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                let cached = self.blocks.cached_prefix(s.cacheable());
                // Its next block is being computed for a running sequence:
                // wait a step and take it from the cache instead of
                // computing the same prefix twice (requests arriving
                // together with one system prompt compute it once).
                if self
                    .block_hash_at(s.cacheable(), cached / self.blocks.block_size())
                    .is_some_and(|h| pending.contains(&h))
                {
                    break;
                }
                let remaining = s.tokens.len() - cached;
                let limit = self.long_limit(remaining, long_left);
                let n = s.chunk_within_rows(
                    cached,
                    remaining.min(budget.tokens).min(limit),
                    budget.prompt_rows,
                );
                if n == 0 {
                    break; // no row (or long-prefill token) left for it: wait rather than be overtaken
                }
                let rows = s.prompt_rows_needed(cached, n);
                let Ok(cached) = self.blocks.allocate(id, s.cacheable(), cached + n) else {
                    break; // not enough blocks: wait rather than be overtaken
                };
                self.waiting.pop_front();
                let Some(s) = self.seqs.get_mut(&id) else { continue };
                s.num_computed = cached;
                s.cached_prompt_tokens.get_or_insert(cached.min(s.prompt_len));
                let at = self.running.partition_point(|&r| r < id);
                self.running.insert(at, id);
                pending.extend(self.uncomputed_block_hashes(id));
                scheduled.push(Scheduled {
                    id,
                    num_tokens: n,
                    sample: n == remaining,
                    prompt_rows: rows,
                });
                budget.tokens -= n;
                budget.prompt_rows -= rows;
                if limit < usize::MAX {
                    long_left -= n;
                }
            }
        }

        let (layout, logit_rows, prompt_rows) = self.build_layout(&scheduled);
        StepPlan {
            layout,
            logit_rows,
            scheduled,
            prompt_rows,
            preempted,
        }
    }

    /// Most tokens a sequence that computes `to_compute` tokens in all (the
    /// prefix cache's share excluded) may prefill in this step: `long_left`
    /// when that is more than `LongPrefill::threshold`, else no limit.
    fn long_limit(&self, to_compute: usize, long_left: usize) -> usize {
        if to_compute > self.cfg.long_prefill.threshold {
            long_left
        } else {
            usize::MAX
        }
    }

    /// Chain hash of full block `index` of `tokens` (None when `tokens` has
    /// no such full block or prefix caching is off).
    fn block_hash_at(&self, tokens: &[u32], index: usize) -> Option<u64> {
        if !self.blocks.prefix_caching() {
            return None;
        }
        self.blocks.block_hashes(tokens).nth(index)
    }

    /// Hashes of the full cacheable prompt blocks of running sequence `id`
    /// that are not computed yet (they enter the cache once computed).
    /// Only sequences still prefilling have any: a decoding sequence's
    /// prompt is computed, and its generated blocks are not worth waiting for.
    fn uncomputed_block_hashes(&self, id: SeqId) -> Vec<u64> {
        let Some(s) = self.seqs.get(&id) else {
            return Vec::new();
        };
        let bs = self.blocks.block_size();
        let tokens = &s.cacheable()[..s.cacheable().len().min(s.prompt_len)];
        let first_open = s.num_computed / bs;
        if !self.blocks.prefix_caching() || (first_open + 1) * bs > tokens.len() {
            return Vec::new();
        }
        // Blocks from the one holding the first uncomputed token on.
        self.blocks.block_hashes(tokens).skip(first_open).collect()
    }

    /// Hashes of blocks that running sequences are still computing.
    fn pending_block_hashes(&self) -> std::collections::HashSet<u64> {
        self.running
            .iter()
            .flat_map(|&id| self.uncomputed_block_hashes(id))
            .collect()
    }

    /// Grows `id`'s blocks to `slots`, preempting the newest running
    /// sequences as needed. False when `id` itself had to be preempted.
    fn make_room(
        &mut self,
        id: SeqId,
        slots: usize,
        scheduled: &mut Vec<Scheduled>,
        budget: &mut Budget,
        preempted: &mut Vec<SeqId>,
    ) -> bool {
        loop {
            match self.blocks.append_slots(id, slots) {
                Ok(()) => return true,
                Err(BlockError::OutOfBlocks { .. }) => {}
                // The sequence has no table: a bookkeeping slip; drop it from
                // this step rather than corrupt anything.
                Err(_) => return false,
            }
            let Some(&victim) = self.running.last() else {
                return false;
            };
            if let Some(i) = scheduled.iter().position(|s| s.id == victim) {
                budget.tokens += scheduled[i].num_tokens;
                budget.prompt_rows += scheduled[i].prompt_rows;
                scheduled.remove(i);
            }
            self.preempt(victim);
            preempted.push(victim);
            if victim == id {
                return false;
            }
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        // Free can only fail for a sequence without blocks: nothing to undo.
        let _ = self.blocks.free(id);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.num_computed = 0;
            s.preemptions += 1;
        }
        self.enqueue_waiting(id);
    }

    fn build_layout(&self, scheduled: &[Scheduled]) -> (BatchLayout, Vec<u32>, Vec<PromptRows>) {
        let bs = self.blocks.block_size();
        let mut layout = BatchLayout {
            block_size: bs as u32,
            ..BatchLayout::default()
        };
        let mut logit_rows = Vec::new();
        // (sequence, first position, first row of the layout, count); turned
        // into indices of `logit_rows` once the sampling rows are all in.
        let mut wanted: Vec<(SeqId, usize, u32, usize)> = Vec::new();
        for sch in scheduled {
            let (Some(s), Some(table)) = (self.seqs.get(&sch.id), self.blocks.block_table(sch.id)) else {
                continue;
            };
            let from = s.num_computed;
            let to = from + sch.num_tokens;
            let start = layout.push_tokens(s.tokens[from..to].iter().copied(), from, table, false);
            if sch.sample {
                logit_rows.push(start + sch.num_tokens as u32 - 1);
            }
            if sch.prompt_rows > 0 {
                let first = s.prompt_logprobs_from.map_or(from, |p| p.max(from));
                wanted.push((sch.id, first, start + (first - from) as u32, sch.prompt_rows));
            }
        }
        let mut prompt_rows = Vec::with_capacity(wanted.len());
        for (id, first_pos, row, count) in wanted {
            prompt_rows.push(PromptRows {
                id,
                first_pos,
                first_row: logit_rows.len(),
                count,
            });
            logit_rows.extend(row..row + count as u32);
        }
        (layout, logit_rows, prompt_rows)
    }

    /// Records that `plan` ran: its tokens' KV is in the pool, and full
    /// blocks join the prefix cache.
    pub fn complete_step(&mut self, plan: &StepPlan) -> Result<(), SchedulerError> {
        for sch in &plan.scheduled {
            let Some(s) = self.seqs.get_mut(&sch.id) else {
                continue;
            };
            s.num_computed = (s.num_computed + sch.num_tokens).min(s.tokens.len());
            if let Some(p) = s.prompt_logprobs_from {
                // Rows up to the computed count were planned in this step.
                let next = p.max(s.num_computed);
                s.prompt_logprobs_from = (next + 1 < s.prompt_len).then_some(next);
            }
            self.blocks.commit(sch.id, &s.tokens[..s.num_computed])?;
        }
        Ok(())
    }

    /// Plans the step after the one in flight, before its sampled tokens
    /// are known: every sequence of `ids` (which must be exactly the running
    /// sequences, in order, all fully computed) decodes the token being
    /// sampled now, held as `placeholder` until [`set_last_token`]
    /// (Self::set_last_token) replaces it. This is the plan `schedule`
    /// would make once the tokens are appended. `Ok(None)`, with nothing
    /// changed, where that is not certain: a sequence waits to be admitted,
    /// the token budget is short, or the pool lacks a block (preemption).
    /// `Err` only if the block manager refuses a block counted free just
    /// before (an internal inconsistency): no placeholder is pushed then,
    /// and blocks already taken stay with their sequences until they end.
    pub fn schedule_lookahead(
        &mut self,
        ids: &[SeqId],
        placeholder: u32,
    ) -> Result<Option<StepPlan>, SchedulerError> {
        if !self.waiting.is_empty() || self.running != ids || ids.len() > self.cfg.max_num_batched_tokens {
            return Ok(None);
        }
        let bs = self.blocks.block_size();
        let mut need = 0;
        for id in ids {
            let (Some(s), Some(table)) = (self.seqs.get(id), self.blocks.block_table(*id)) else {
                return Ok(None);
            };
            if s.num_computed != s.tokens.len() || s.prompt_logprobs_from.is_some() {
                return Ok(None);
            }
            need += (s.tokens.len() + 1).div_ceil(bs).saturating_sub(table.len());
        }
        if need > self.blocks.num_free_blocks() {
            return Ok(None);
        }
        // Blocks first (the only step that can fail), then the placeholders.
        for &id in ids {
            let slots = self.seqs.get(&id).map_or(0, |s| s.tokens.len() + 1);
            self.blocks.append_slots(id, slots)?;
        }
        let mut scheduled = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.tokens.push(placeholder);
            }
            scheduled.push(Scheduled {
                id,
                num_tokens: 1,
                sample: true,
                prompt_rows: 0,
            });
        }
        let (layout, logit_rows, prompt_rows) = self.build_layout(&scheduled);
        Ok(Some(StepPlan {
            layout,
            logit_rows,
            scheduled,
            prompt_rows,
            preempted: Vec::new(),
        }))
    }

    /// Plans a speculative decode step: every running sequence (`drafts`
    /// lists each once, in `running` order, with its drafted tokens,
    /// possibly none) computes its last token and its drafts, one row each
    /// at consecutive positions. Each row is its own single-token entry of
    /// the layout (context up to and including its position, the sequence's
    /// block table), so a row sees the keys of the rows before it, and the
    /// step runs on the decode kernels; every row has a logits row. The
    /// plan's `scheduled` holds one entry per sequence whose `num_tokens`
    /// counts its rows. `Ok(None)`, with nothing changed, where the step is
    /// not a pure decode step (a sequence waits or still prefills), the
    /// token budget is short or the pool lacks the blocks; `Err` only on an
    /// internal inconsistency of the block manager.
    ///
    /// The KV of rejected drafts stays in slots past the sequence's
    /// computed length, which later steps overwrite before any read; call
    /// [`complete_draft`](Self::complete_draft) with what was kept.
    pub fn schedule_draft(
        &mut self,
        drafts: &[(SeqId, Vec<u32>)],
    ) -> Result<Option<StepPlan>, SchedulerError> {
        let rows: usize = drafts.iter().map(|(_, d)| d.len() + 1).sum();
        if !self.waiting.is_empty()
            || self.running.len() != drafts.len()
            || self.running.iter().zip(drafts).any(|(r, (id, _))| r != id)
            || rows > self.cfg.max_num_batched_tokens
        {
            return Ok(None);
        }
        let bs = self.blocks.block_size();
        let mut need = 0;
        for (id, draft) in drafts {
            let (Some(s), Some(table)) = (self.seqs.get(id), self.blocks.block_table(*id)) else {
                return Ok(None);
            };
            if s.num_computed + 1 != s.tokens.len() || s.prompt_logprobs_from.is_some() {
                return Ok(None);
            }
            need += (s.tokens.len() + draft.len())
                .div_ceil(bs)
                .saturating_sub(table.len());
        }
        if need > self.blocks.num_free_blocks() {
            return Ok(None);
        }
        for (id, draft) in drafts {
            let slots = self.seqs.get(id).map_or(0, |s| s.tokens.len() + draft.len());
            self.blocks.append_slots(*id, slots)?;
        }
        let mut layout = BatchLayout {
            block_size: bs as u32,
            ..BatchLayout::default()
        };
        let mut scheduled = Vec::with_capacity(drafts.len());
        for (id, draft) in drafts {
            let (Some(s), Some(table)) = (self.seqs.get(id), self.blocks.block_table(*id)) else {
                continue;
            };
            let p = s.num_computed;
            let inputs = std::iter::once(s.tokens[p]).chain(draft.iter().copied());
            layout.push_tokens(inputs, p, table, true);
            scheduled.push(Scheduled {
                id: *id,
                num_tokens: draft.len() + 1,
                sample: true,
                prompt_rows: 0,
            });
        }
        let logit_rows = (0..layout.tokens.len() as u32).collect();
        Ok(Some(StepPlan {
            layout,
            logit_rows,
            scheduled,
            prompt_rows: Vec::new(),
            preempted: Vec::new(),
        }))
    }

    /// Records a speculative step's outcome for one sequence: its leading
    /// `computed` tokens have their KV in the pool (the input token and the
    /// kept drafts, which the caller has appended by now).
    pub fn complete_draft(&mut self, id: SeqId, computed: usize) -> Result<(), SchedulerError> {
        let s = self.seqs.get_mut(&id).ok_or(SchedulerError::Unknown { id })?;
        s.num_computed = computed.min(s.tokens.len());
        self.blocks.commit(id, &s.tokens[..s.num_computed])?;
        Ok(())
    }

    /// Replaces a sequence's last token (the placeholder of
    /// `schedule_lookahead`) with the sampled one.
    pub fn set_last_token(&mut self, id: SeqId, token: u32) -> Result<(), SchedulerError> {
        let s = self.seqs.get_mut(&id).ok_or(SchedulerError::Unknown { id })?;
        match s.tokens.last_mut() {
            Some(t) => *t = token,
            None => s.tokens.push(token),
        }
        Ok(())
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) -> Result<(), SchedulerError> {
        let s = self.seqs.get_mut(&id).ok_or(SchedulerError::Unknown { id })?;
        s.tokens.push(token);
        Ok(())
    }

    /// Removes a sequence (finished or aborted) wherever it is and frees its
    /// blocks; returns its final state.
    pub fn finish(&mut self, id: SeqId) -> Option<SeqState> {
        let s = self.seqs.remove(&id)?;
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        // Waiting sequences hold no blocks, so an error here is expected.
        let _ = self.blocks.free(id);
        Some(s)
    }
}
