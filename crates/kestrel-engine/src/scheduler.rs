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

use std::collections::{HashMap, VecDeque};

use kestrel_backend::{BatchLayout, SeqLayout};

use crate::block_manager::{BlockError, BlockManager, SeqId};

/// Step limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one step.
    pub max_num_batched_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
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
}

/// A step's work, ready for `Model::forward`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub layout: BatchLayout,
    /// Rows of `layout` whose logits are needed, one per sampling sequence
    /// (in the order those sequences appear in `scheduled`).
    pub logit_rows: Vec<u32>,
    pub scheduled: Vec<Scheduled>,
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
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::Duplicate { id });
        }
        if prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt { id });
        }
        self.seqs.insert(
            id,
            SeqState {
                id,
                prompt_len: prompt.len(),
                tokens: prompt,
                num_computed: 0,
                cached_prompt_tokens: None,
                preemptions: 0,
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
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled: Vec<Scheduled> = Vec::new();
        let mut preempted = Vec::new();

        // Decodes first, then prefill chunks of running sequences. The list
        // is copied because preemption shrinks `running` as we go.
        let order: Vec<SeqId> = self.running.clone();
        for decode_pass in [true, false] {
            for &id in &order {
                if budget == 0 {
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
                let n = remaining.min(budget);
                let slots = s.num_computed + n;
                if self.make_room(id, slots, &mut scheduled, &mut budget, &mut preempted) {
                    scheduled.push(Scheduled {
                        id,
                        num_tokens: n,
                        sample: n == remaining,
                    });
                    budget -= n;
                }
            }
        }

        // Admit waiting sequences in arrival order.
        if preempted.is_empty() {
            while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
                let Some(&id) = self.waiting.front() else { break };
                let Some(s) = self.seqs.get(&id) else {
                    self.waiting.pop_front();
                    continue;
                };
                let cached = self.blocks.cached_prefix(&s.tokens);
                let n = (s.tokens.len() - cached).min(budget);
                let Ok(cached) = self.blocks.allocate(id, &s.tokens, cached + n) else {
                    break; // not enough blocks: wait rather than be overtaken
                };
                self.waiting.pop_front();
                let Some(s) = self.seqs.get_mut(&id) else { continue };
                s.num_computed = cached;
                s.cached_prompt_tokens.get_or_insert(cached.min(s.prompt_len));
                let remaining = s.tokens.len() - cached;
                let n = remaining.min(budget);
                let at = self.running.partition_point(|&r| r < id);
                self.running.insert(at, id);
                scheduled.push(Scheduled {
                    id,
                    num_tokens: n,
                    sample: n == remaining,
                });
                budget -= n;
            }
        }

        let (layout, logit_rows) = self.build_layout(&scheduled);
        StepPlan {
            layout,
            logit_rows,
            scheduled,
            preempted,
        }
    }

    /// Grows `id`'s blocks to `slots`, preempting the newest running
    /// sequences as needed. False when `id` itself had to be preempted.
    fn make_room(
        &mut self,
        id: SeqId,
        slots: usize,
        scheduled: &mut Vec<Scheduled>,
        budget: &mut usize,
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
                *budget += scheduled[i].num_tokens;
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

    fn build_layout(&self, scheduled: &[Scheduled]) -> (BatchLayout, Vec<u32>) {
        let bs = self.blocks.block_size();
        let mut layout = BatchLayout {
            block_size: bs as u32,
            ..BatchLayout::default()
        };
        let mut logit_rows = Vec::new();
        for sch in scheduled {
            let (Some(s), Some(table)) = (self.seqs.get(&sch.id), self.blocks.block_table(sch.id)) else {
                continue;
            };
            let start = layout.tokens.len() as u32;
            let from = s.num_computed;
            let to = from + sch.num_tokens;
            layout.tokens.extend_from_slice(&s.tokens[from..to]);
            for p in from..to {
                layout.positions.push(p as u32);
                layout
                    .slot_mapping
                    .push(table[p / bs] * bs as u32 + (p % bs) as u32);
            }
            layout.seqs.push(SeqLayout {
                block_table: table.to_vec(),
                context_len: to as u32,
                query_start: start,
                query_len: sch.num_tokens as u32,
            });
            if sch.sample {
                logit_rows.push(start + sch.num_tokens as u32 - 1);
            }
        }
        (layout, logit_rows)
    }

    /// Records that `plan` ran: its tokens' KV is in the pool, and full
    /// blocks join the prefix cache.
    pub fn complete_step(&mut self, plan: &StepPlan) -> Result<(), SchedulerError> {
        for sch in &plan.scheduled {
            let Some(s) = self.seqs.get_mut(&sch.id) else {
                continue;
            };
            s.num_computed = (s.num_computed + sch.num_tokens).min(s.tokens.len());
            self.blocks.commit(sch.id, &s.tokens[..s.num_computed])?;
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
