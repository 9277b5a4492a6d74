//! Scheduler tests against a fake model: it writes each step's tokens into a
//! shadow KV pool at the layout's slots, and "predicts" the next token as a
//! hash of the context it reads back through the block table. Any stale,
//! missing or misplaced KV (bad block tables, a wrong prefix hit, a lost
//! preemption) changes the output, so comparing with a sequence run alone
//! checks the whole bookkeeping without a real model. Prompt positions
//! whose logits are wanted are "scored" the same way, from the context read
//! back at that position.

use std::collections::HashMap;

use kestrel_engine::block_manager::{BlockManager, SeqId};
use kestrel_engine::scheduler::{LongPrefill, Scheduler, SchedulerConfig, StepPlan};
use proptest::prelude::*;

const BS: usize = 4;

fn next_token(context: &[u32]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in context {
        h = (h ^ u64::from(t)).wrapping_mul(0x100_0000_01b3);
    }
    (h % 50) as u32 + 1
}

/// What a request generates when run alone.
fn solo(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut ctx = prompt.to_vec();
    for _ in 0..max_tokens {
        ctx.push(next_token(&ctx));
    }
    ctx[prompt.len()..].to_vec()
}

/// What scoring every prompt position of `prompt` gives: `(position,
/// score of the context through it)`.
fn solo_scores(prompt: &[u32]) -> Vec<(usize, u32)> {
    (0..prompt.len() - 1)
        .map(|p| (p, next_token(&prompt[..=p])))
        .collect()
}

struct Sim {
    s: Scheduler,
    kv: Vec<Option<u32>>,
    max_tokens: HashMap<SeqId, usize>,
    done: HashMap<SeqId, Vec<u32>>,
    /// Prompt positions scored so far, per sequence, in delivery order.
    scores: HashMap<SeqId, Vec<(usize, u32)>>,
    steps: Vec<StepPlan>,
}

impl Sim {
    fn new(num_blocks: usize, max_num_seqs: usize, budget: usize, caching: bool) -> Sim {
        Sim::with_rows(num_blocks, max_num_seqs, budget, caching, 1000)
    }

    fn with_rows(num_blocks: usize, max_num_seqs: usize, budget: usize, caching: bool, rows: usize) -> Sim {
        let cfg = SchedulerConfig {
            max_num_seqs,
            max_num_batched_tokens: budget,
            max_prompt_logprob_rows: rows,
            long_prefill: LongPrefill::default(),
        };
        Sim::with_config(num_blocks, cfg, caching)
    }

    fn with_config(num_blocks: usize, cfg: SchedulerConfig, caching: bool) -> Sim {
        Sim {
            s: Scheduler::new(cfg, BlockManager::new(num_blocks, BS, caching)),
            kv: vec![None; num_blocks * BS],
            max_tokens: HashMap::new(),
            done: HashMap::new(),
            scores: HashMap::new(),
            steps: Vec::new(),
        }
    }

    fn add(&mut self, id: SeqId, prompt: Vec<u32>, max_tokens: usize) {
        self.s.add(id, prompt).unwrap();
        self.max_tokens.insert(id, max_tokens);
    }

    fn add_scored(&mut self, id: SeqId, prompt: Vec<u32>, max_tokens: usize) {
        self.s.add_with_prompt_logprobs(id, prompt).unwrap();
        self.max_tokens.insert(id, max_tokens);
        self.scores.insert(id, Vec::new());
    }

    /// The token at `pos` of a scheduled sequence's context, read back
    /// through its block table.
    fn read(&self, block_table: &[u32], pos: usize) -> u32 {
        let slot = block_table[pos / BS] as usize * BS + pos % BS;
        self.kv[slot].unwrap_or(u32::MAX)
    }

    /// One step; returns the plan it ran.
    fn step(&mut self) -> StepPlan {
        let plan = self.s.schedule();
        let l = &plan.layout;
        assert_eq!(l.tokens.len(), l.positions.len());
        assert_eq!(l.tokens.len(), l.slot_mapping.len());
        for (i, &slot) in l.slot_mapping.iter().enumerate() {
            self.kv[slot as usize] = Some(l.tokens[i]);
        }
        let mut sampled = Vec::new();
        let mut row = 0;
        for (sch, sl) in plan.scheduled.iter().zip(&l.seqs) {
            assert_eq!(sl.query_len as usize, sch.num_tokens);
            if !sch.sample {
                continue;
            }
            assert_eq!(plan.logit_rows[row], sl.query_start + sl.query_len - 1);
            row += 1;
            let ctx: Vec<u32> = (0..sl.context_len as usize)
                .map(|p| self.read(&sl.block_table, p))
                .collect();
            sampled.push((sch.id, next_token(&ctx)));
        }
        assert_eq!(row, plan.num_samplers());
        for pr in &plan.prompt_rows {
            assert_eq!(
                pr.first_row, row,
                "prompt rows follow the sampling rows, in order"
            );
            let i = plan.scheduled.iter().position(|s| s.id == pr.id).unwrap();
            assert_eq!(plan.scheduled[i].prompt_rows, pr.count);
            let sl = &l.seqs[i];
            let from = l.positions[sl.query_start as usize] as usize;
            for k in 0..pr.count {
                let pos = pr.first_pos + k;
                // The row is that position's token in the layout.
                assert_eq!(plan.logit_rows[row + k], sl.query_start + (pos - from) as u32);
                let ctx: Vec<u32> = (0..=pos).map(|p| self.read(&sl.block_table, p)).collect();
                self.scores
                    .get_mut(&pr.id)
                    .expect("a scored sequence")
                    .push((pos, next_token(&ctx)));
            }
            row += pr.count;
        }
        assert_eq!(row, plan.logit_rows.len());
        let rows: usize = plan.prompt_rows.iter().map(|r| r.count).sum();
        assert!(rows <= self.s.config().max_prompt_logprob_rows);
        self.s.complete_step(&plan).unwrap();
        for (id, tok) in sampled {
            self.s.append_token(id, tok).unwrap();
            let st = self.s.seq(id).unwrap();
            if st.generated().len() >= self.max_tokens[&id] {
                let st = self.s.finish(id).unwrap();
                self.done.insert(id, st.generated().to_vec());
            }
        }
        self.s.blocks().check_invariants().unwrap();
        self.steps.push(plan.clone());
        plan
    }

    fn run_to_end(&mut self, max_steps: usize) {
        let mut n = 0;
        while self.s.has_work() {
            self.step();
            n += 1;
            assert!(n <= max_steps, "no progress after {max_steps} steps");
        }
        assert_eq!(self.s.blocks().num_used_blocks(), 0);
    }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 31 + salt * 7) % 97 + 3).collect()
}

#[test]
fn budget_and_seq_cap_are_respected() {
    let mut sim = Sim::new(200, 3, 10, true);
    for id in 0..6 {
        sim.add(id, prompt(7 + id as usize * 3, id as u32), 5);
    }
    sim.run_to_end(200);
    for p in &sim.steps {
        assert!(p.layout.tokens.len() <= 10);
        assert!(p.scheduled.len() <= 3);
    }
    for id in 0..6 {
        assert_eq!(sim.done[&id], solo(&prompt(7 + id as usize * 3, id as u32), 5));
    }
}

#[test]
fn long_prefill_is_chunked_beside_running_decodes() {
    let mut sim = Sim::new(200, 8, 8, true);
    sim.add(1, prompt(3, 1), 30);
    sim.add(2, prompt(3, 2), 30);
    sim.step(); // both prefills in one step
    sim.add(3, prompt(40, 3), 2);
    let mut prefill_steps = 0;
    while let Some(done) = sim.s.seq(3).map(|s| s.num_computed).filter(|&c| c < 40) {
        let p = sim.step();
        // Both decodes come first, every step; the prompt gets the rest.
        assert_eq!(p.scheduled[0].id, 1);
        assert_eq!(p.scheduled[1].id, 2);
        assert_eq!((p.scheduled[0].num_tokens, p.scheduled[1].num_tokens), (1, 1));
        assert!(p.scheduled[0].sample && p.scheduled[1].sample);
        assert_eq!(p.scheduled[2].id, 3);
        assert_eq!(p.scheduled[2].num_tokens, (40 - done).min(6));
        prefill_steps += 1;
    }
    assert_eq!(prefill_steps, 40 / 6 + 1);
    sim.run_to_end(100);
    assert_eq!(sim.done[&3], solo(&prompt(40, 3), 2));
    assert_eq!(sim.done[&1], solo(&prompt(3, 1), 30));
}

/// While a step carries decodes, prompts over the long-prefill threshold
/// share `chunk` tokens of it between them (however large the budget), and
/// a shorter prompt comes in whole (in its turn); a long prompt alone
/// takes the whole budget. Every request still generates what it would
/// alone.
#[test]
fn long_prompts_get_the_long_chunk_beside_decodes() {
    let cfg = |chunk| SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 200,
        max_prompt_logprob_rows: 1000,
        long_prefill: LongPrefill { threshold: 20, chunk },
    };
    let mut sim = Sim::with_config(200, cfg(6), false);
    sim.add(1, prompt(3, 1), 40);
    sim.add(2, prompt(3, 2), 40);
    sim.step();
    sim.add(3, prompt(50, 3), 2);
    sim.add(4, prompt(25, 4), 2);
    sim.add(5, prompt(12, 5), 2);
    let mut long_steps = 0;
    let prefilling = |sim: &Sim, id: u64| sim.s.seq(id).is_some_and(|s| s.num_computed < s.prompt_len);
    while prefilling(&sim, 3) || prefilling(&sim, 4) {
        let before = [
            prefilling(&sim, 3),
            prefilling(&sim, 4),
            sim.s.seq(5).is_none_or(|s| s.num_computed == 0),
        ];
        let p = sim.step();
        let decodes = p.scheduled.iter().filter(|s| s.id <= 2).count();
        assert_eq!(decodes, 2, "the streams decode every step: {:?}", p.scheduled);
        // Prefill chunks of the long prompts (not the decode of one done).
        let long: usize = p
            .scheduled
            .iter()
            .filter(|s| (s.id == 3 && before[0]) || (s.id == 4 && before[1]))
            .map(|s| s.num_tokens)
            .sum();
        assert!(
            long <= 6,
            "long prefills took {long} tokens of a step with decodes"
        );
        // First come, first served: it waits behind the long ones, then
        // comes in whole.
        if let Some(short) = p.scheduled.iter().find(|s| s.id == 5 && before[2]) {
            assert_eq!(short.num_tokens, 12, "the short prompt is admitted whole");
        }
        long_steps += 1;
    }
    assert_eq!(long_steps, (50 + 25usize).div_ceil(6));
    sim.run_to_end(200);
    for (id, len) in [(1, 3), (2, 3)] {
        assert_eq!(sim.done[&id], solo(&prompt(len, id as u32), 40));
    }
    for (id, len) in [(3, 50), (4, 25), (5, 12)] {
        assert_eq!(sim.done[&id], solo(&prompt(len, id as u32), 2));
    }
    // Alone, or with the limit off, a long prompt takes the whole budget.
    for chunk in [6, 0] {
        let mut sim = Sim::with_config(200, cfg(chunk), false);
        sim.add(1, prompt(3, 1), 4);
        sim.add(3, prompt(150, 3), 2);
        let p = sim.step();
        assert_eq!(p.layout.tokens.len(), 153, "chunk {chunk}: {:?}", p.scheduled);
    }
    let mut sim = Sim::with_config(200, cfg(0), false);
    sim.add(1, prompt(3, 1), 4);
    sim.step();
    sim.add(3, prompt(150, 3), 2);
    let p = sim.step();
    assert_eq!(
        p.layout.tokens.len(),
        151,
        "limit off: the whole prompt beside the decode"
    );
}

#[test]
fn newest_running_sequence_is_preempted_when_blocks_run_out() {
    // 6 blocks of 4: three sequences of 4-token prompts fit (one block each),
    // then decoding needs a second block each and the pool runs dry.
    let mut sim = Sim::new(6, 8, 64, false);
    for id in 1..=3 {
        sim.add(id, prompt(4, id as u32), 12);
    }
    let mut first_preempted = None;
    for _ in 0..40 {
        let p = sim.step();
        if let Some(&v) = p.preempted.first() {
            first_preempted.get_or_insert(v);
            // The victim is the newest of those that were running.
            assert!(!sim.s.running().iter().any(|&r| r > v));
            assert!(sim.s.waiting().any(|w| w == v));
            assert_eq!(sim.s.seq(v).unwrap().num_computed, 0);
        }
        if !sim.s.has_work() {
            break;
        }
    }
    assert_eq!(first_preempted, Some(3));
    sim.run_to_end(200);
    for id in 1..=3 {
        assert_eq!(sim.done[&id], solo(&prompt(4, id as u32), 12), "request {id}");
    }
}

#[test]
fn preempted_request_is_rescheduled_before_later_arrivals() {
    let mut sim = Sim::new(6, 8, 64, false);
    for id in 1..=3 {
        sim.add(id, prompt(4, id as u32), 12);
    }
    while sim.steps.last().is_none_or(|p| p.preempted.is_empty()) {
        sim.step();
    }
    sim.add(10, prompt(2, 10), 2);
    // The waiting queue stays in arrival order: the preempted 3 before 10.
    let waiting: Vec<SeqId> = sim.s.waiting().collect();
    assert_eq!(waiting, vec![3, 10]);
    sim.run_to_end(200);
    assert_eq!(sim.done[&10], solo(&prompt(2, 10), 2));
}

#[test]
fn admission_is_first_come_first_served() {
    // 4 blocks: request 1 takes 3, request 2 needs 3 and must wait, and
    // request 3 (needing 1) must not overtake it.
    let mut sim = Sim::new(4, 8, 64, false);
    sim.add(1, prompt(12, 1), 1);
    sim.add(2, prompt(12, 2), 1);
    sim.add(3, prompt(2, 3), 1);
    let p = sim.step();
    let ids: Vec<SeqId> = p.scheduled.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![1]);
    assert_eq!(sim.s.num_waiting(), 2);
    // Once 1 is done, 2 goes first and 3 fits beside it.
    let p = sim.step();
    let ids: Vec<SeqId> = p.scheduled.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![2, 3]);
    sim.run_to_end(20);
    assert_eq!(sim.done.len(), 3);
}

#[test]
fn prefix_hit_skips_the_cached_blocks() {
    let mut sim = Sim::new(64, 8, 64, true);
    let shared = prompt(16, 5);
    let mut a = shared.clone();
    a.extend([60, 61, 62]);
    let mut b = shared.clone();
    b.extend([70, 71]);
    sim.add(1, a.clone(), 3);
    sim.run_to_end(20);
    sim.add(2, b.clone(), 3);
    let p = sim.step();
    assert_eq!(
        p.scheduled[0].num_tokens, 2,
        "only the two new tokens are computed"
    );
    assert_eq!(sim.s.seq(2).unwrap().cached_prompt_tokens, Some(16));
    assert_eq!(sim.s.blocks().stats().tokens_saved, 16);
    sim.run_to_end(20);
    assert_eq!(sim.done[&2], solo(&b, 3));
    assert_eq!(sim.done[&1], solo(&a, 3));
}

#[test]
fn scored_prompt_skips_the_cache_and_its_rows_are_budgeted() {
    // Rows for 5 positions per step, in a 64-token budget.
    let mut sim = Sim::with_rows(64, 8, 64, true, 5);
    let p = prompt(18, 4);
    sim.add(1, p.clone(), 2);
    sim.run_to_end(20);
    // The same prompt again, scored: its cached blocks are not used.
    sim.add_scored(2, p.clone(), 3);
    sim.add(3, p.clone(), 3);
    let first = sim.step();
    assert_eq!(sim.s.seq(2).unwrap().cached_prompt_tokens, Some(0));
    assert_eq!(first.scheduled[0].num_tokens, 5, "cut to the row budget");
    // The plain one behind it still gets its hit.
    assert_eq!(sim.s.seq(3).unwrap().cached_prompt_tokens, Some(16));
    sim.run_to_end(40);
    assert_eq!(sim.scores[&2], solo_scores(&p));
    assert_eq!(sim.done[&2], solo(&p, 3));
    assert_eq!(sim.done[&3], solo(&p, 3));
    // 17 scored positions at 5 a step.
    let scoring_steps = sim.steps.iter().filter(|s| !s.prompt_rows.is_empty()).count();
    assert_eq!(scoring_steps, 4);
    // A one-token prompt has nothing to score.
    sim.add_scored(4, vec![9], 2);
    sim.run_to_end(10);
    assert!(sim.scores[&4].is_empty());
}

#[test]
fn aborting_anywhere_frees_everything() {
    let mut sim = Sim::new(40, 8, 8, true);
    for id in 0..5 {
        sim.add(id, prompt(10 + id as usize, id as u32), 20);
    }
    for step in 0..12 {
        sim.step();
        if step % 3 == 2 {
            let victim = sim
                .s
                .running()
                .first()
                .copied()
                .or_else(|| sim.s.waiting().next());
            if let Some(v) = victim {
                assert!(sim.s.finish(v).is_some());
                sim.s.blocks().check_invariants().unwrap();
            }
        }
    }
    for id in 0..5 {
        sim.s.finish(id);
    }
    assert!(!sim.s.has_work());
    assert_eq!(sim.s.blocks().num_free_blocks(), 40);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any mix of arrival times, prompt lengths, pool sizes, budgets and
    /// caching gives every request exactly its solo output.
    #[test]
    fn output_matches_solo_runs(
        reqs in prop::collection::vec((0usize..4, 1usize..36, 1usize..10, 0u32..2, any::<bool>()), 1..12),
        num_blocks in 12usize..48,
        budget in 1usize..24,
        max_seqs in 1usize..6,
        caching in any::<bool>(),
        rows in 1usize..12,
    ) {
        let mut sim = Sim::with_rows(num_blocks, max_seqs, budget, caching, rows);
        // Family-shared prefixes give the cache something to find.
        let make = |len: usize, fam: u32, id: u32| {
            let mut p = prompt(len.min(20), fam);
            p.extend(prompt(len.saturating_sub(20), 50 + id));
            p
        };
        let mut pending: Vec<(usize, SeqId, Vec<u32>, usize, bool)> = reqs
            .iter()
            .enumerate()
            .map(|(i, &(at, len, max, fam, scored))| (at, i as SeqId, make(len, fam, i as u32), max, scored))
            .collect();
        pending.sort_by_key(|r| (r.0, r.1));
        let expected: HashMap<SeqId, Vec<u32>> =
            pending.iter().map(|(_, id, p, m, _)| (*id, solo(p, *m))).collect();
        let expected_scores: HashMap<SeqId, Vec<(usize, u32)>> = pending
            .iter()
            .filter(|r| r.4)
            .map(|(_, id, p, _, _)| (*id, solo_scores(p)))
            .collect();
        // A sequence (prompt + output) must fit the pool on its own.
        prop_assume!(pending.iter().all(|(_, _, p, m, _)| p.len() + m <= num_blocks * BS));
        let mut t = 0;
        let mut steps = 0;
        while !pending.is_empty() || sim.s.has_work() {
            while pending.first().is_some_and(|r| r.0 <= t) {
                let (_, id, p, m, scored) = pending.remove(0);
                if scored {
                    sim.add_scored(id, p, m);
                } else {
                    sim.add(id, p, m);
                }
            }
            if sim.s.has_work() {
                sim.step();
            }
            t += 1;
            steps += 1;
            prop_assert!(steps < 5000, "no progress");
        }
        prop_assert_eq!(&sim.done, &expected);
        // Every scored position exactly once, in order, from the right context.
        prop_assert_eq!(&sim.scores, &expected_scores);
        prop_assert_eq!(sim.s.blocks().num_free_blocks(), num_blocks);
    }
}

/// Two schedulers fed the same requests: one plans each decode step ahead
/// with placeholders (`schedule_lookahead`, then `set_last_token`), the
/// other appends the sampled token and plans normally. Their plans must
/// agree step for step (slots, positions, block tables), and a lookahead
/// that is not certain (a request waiting) must change nothing.
#[test]
fn lookahead_plans_what_schedule_would_and_declines_without_change() {
    let cfg = SchedulerConfig {
        max_num_seqs: 2,
        max_num_batched_tokens: 64,
        max_prompt_logprob_rows: 0,
        long_prefill: LongPrefill::default(),
    };
    let new = || Scheduler::new(cfg, BlockManager::new(12, BS, true));
    let (mut ahead, mut plain) = (new(), new());
    for (id, len) in [(1u64, 5usize), (2, 7)] {
        ahead.add(id, prompt(len, id as u32)).unwrap();
        plain.add(id, prompt(len, id as u32)).unwrap();
    }
    // The prefill step, alike in both.
    let first = ahead.schedule();
    assert_eq!(plain.schedule().layout, first.layout);
    ahead.complete_step(&first).unwrap();
    plain.complete_step(&first).unwrap();
    let ids: Vec<SeqId> = ahead.running().to_vec();
    for step in 0..6u32 {
        // The tokens "sampled" by the step in flight.
        let sampled: Vec<u32> = ids.iter().map(|&id| 100 + step + id as u32).collect();
        let plan = ahead
            .schedule_lookahead(&ids, 999)
            .unwrap()
            .expect("certain: nobody waits, blocks to spare");
        assert!(plan.layout.tokens.iter().all(|&t| t == 999));
        for (&id, &t) in ids.iter().zip(&sampled) {
            ahead.set_last_token(id, t).unwrap();
            plain.append_token(id, t).unwrap();
        }
        let want = plain.schedule();
        assert_eq!(plan.layout.slot_mapping, want.layout.slot_mapping, "step {step}");
        assert_eq!(plan.layout.positions, want.layout.positions, "step {step}");
        assert_eq!(plan.layout.seqs, want.layout.seqs, "step {step}");
        assert_eq!(want.layout.tokens, sampled);
        ahead.complete_step(&plan).unwrap();
        plain.complete_step(&want).unwrap();
        ahead.blocks().check_invariants().unwrap();
    }
    // A third request waits (two running at most): not certain.
    ahead.add(3, prompt(4, 3)).unwrap();
    let lens: Vec<usize> = ids
        .iter()
        .map(|&id| ahead.seq(id).unwrap().tokens.len())
        .collect();
    let free = ahead.blocks().num_free_blocks();
    assert!(ahead.schedule_lookahead(&ids, 999).unwrap().is_none());
    let after: Vec<usize> = ids
        .iter()
        .map(|&id| ahead.seq(id).unwrap().tokens.len())
        .collect();
    assert_eq!(after, lens);
    assert_eq!(ahead.blocks().num_free_blocks(), free);
    // Not the running set: declined too.
    assert!(ahead.schedule_lookahead(&ids[..1], 999).unwrap().is_none());
}
