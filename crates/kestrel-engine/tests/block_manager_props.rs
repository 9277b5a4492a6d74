//! Property tests of the paged KV block manager under random add / grow /
//! finish / abort sequences. A shadow "KV pool" records which token each
//! slot was computed for, so a prefix hit is checked against what is really
//! in the blocks, not against the manager's own bookkeeping.

use kestrel_engine::block_manager::{BlockError, BlockManager, SeqId};
use proptest::prelude::*;

const BS: usize = 4;

#[derive(Clone, Debug)]
enum Op {
    /// New sequence: `shared` tokens of family `family`'s prefix, then
    /// `tail` tokens of its own; `chunk` tokens computed at admission.
    Add {
        family: u8,
        shared: usize,
        tail: usize,
        chunk: usize,
    },
    /// Compute up to `n` more known tokens, or when all are computed, append
    /// `n` generated ones.
    Step {
        which: usize,
        n: usize,
    },
    Finish {
        which: usize,
    },
    Abort {
        which: usize,
    },
    /// Drop the prefix cache (DELETE /v1/cache).
    ClearCache,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 0usize..24, 0usize..10, 1usize..30)
            .prop_map(|(family, shared, tail, chunk)| Op::Add { family, shared, tail, chunk }),
        6 => (any::<usize>(), 1usize..7).prop_map(|(which, n)| Op::Step { which, n }),
        1 => any::<usize>().prop_map(|which| Op::Finish { which }),
        1 => any::<usize>().prop_map(|which| Op::Abort { which }),
        1 => Just(Op::ClearCache),
    ]
}

struct Live {
    id: SeqId,
    tokens: Vec<u32>,
    computed: usize,
}

struct Harness {
    m: BlockManager,
    live: Vec<Live>,
    /// Shadow pool: the token each slot's KV was computed for.
    kv: Vec<[Option<u32>; BS]>,
    next_id: SeqId,
    next_token: u32,
}

impl Harness {
    fn fresh_tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.next_token += 1;
                1000 + self.next_token
            })
            .collect()
    }

    /// Runs positions `from..to` of sequence `i` through the "model".
    fn compute(&mut self, i: usize, to: usize) -> Result<(), TestCaseError> {
        let s = &self.live[i];
        let table = self
            .m
            .block_table(s.id)
            .expect("live sequence has a table")
            .to_vec();
        for p in s.computed..to {
            let b = table[p / BS];
            // Never write into a block another sequence holds.
            for other in &self.live {
                if other.id != s.id {
                    let t = self.m.block_table(other.id).unwrap_or(&[]);
                    prop_assert!(!t.contains(&b), "seq {} writes shared block {b}", s.id);
                }
            }
            self.kv[b as usize][p % BS] = Some(s.tokens[p]);
        }
        let s = &mut self.live[i];
        s.computed = to;
        self.m
            .commit(s.id, &s.tokens[..to])
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        Ok(())
    }

    /// Taking `taken` fresh blocks must pop the head of the free list.
    fn check_taken_from_head(
        before: &[(u32, Option<u64>)],
        hits: &[u32],
        taken: &[u32],
    ) -> Result<(), TestCaseError> {
        let order: Vec<u32> = before
            .iter()
            .map(|&(b, _)| b)
            .filter(|b| !hits.contains(b))
            .collect();
        prop_assert_eq!(
            &order[..taken.len()],
            taken,
            "fresh blocks not taken in LRU order"
        );
        Ok(())
    }

    fn add(&mut self, family: u8, shared: usize, tail: usize, chunk: usize) -> Result<(), TestCaseError> {
        let mut tokens: Vec<u32> = (0..shared as u32).map(|i| u32::from(family) * 100 + i).collect();
        tokens.extend(self.fresh_tokens(tail));
        if tokens.is_empty() {
            tokens = self.fresh_tokens(1);
        }
        let id = self.next_id;
        self.next_id += 1;
        let cached = self.m.cached_prefix(&tokens);
        prop_assert!(cached < tokens.len() && cached.is_multiple_of(BS));
        let slots = cached + chunk.min(tokens.len() - cached);
        let before = self.m.free_list();
        let stats_before = self.m.stats();
        let can = self.m.can_allocate(&tokens, slots);
        match self.m.allocate(id, &tokens, slots) {
            Ok(got) => {
                prop_assert!(can);
                prop_assert_eq!(got, cached);
                let table = self.m.block_table(id).expect("allocated").to_vec();
                prop_assert_eq!(table.len(), slots.div_ceil(BS));
                // The hit blocks really hold this prompt's KV.
                for p in 0..cached {
                    prop_assert_eq!(self.kv[table[p / BS] as usize][p % BS], Some(tokens[p]));
                }
                Self::check_taken_from_head(&before, &table[..cached / BS], &table[cached / BS..])?;
                prop_assert_eq!(
                    self.m.stats().tokens_saved - stats_before.tokens_saved,
                    cached as u64
                );
                self.live.push(Live {
                    id,
                    tokens,
                    computed: cached,
                });
                let i = self.live.len() - 1;
                self.compute(i, slots)?;
            }
            Err(BlockError::OutOfBlocks { .. }) => {
                prop_assert!(!can);
                prop_assert_eq!(self.m.free_list(), before, "a failed allocation changed the pool");
                prop_assert!(self.m.block_table(id).is_none());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        }
        Ok(())
    }

    fn step(&mut self, which: usize, n: usize) -> Result<(), TestCaseError> {
        if self.live.is_empty() {
            return Ok(());
        }
        let i = which % self.live.len();
        if self.live[i].computed == self.live[i].tokens.len() {
            let new = self.fresh_tokens(n);
            self.live[i].tokens.extend(new);
            return Ok(());
        }
        let s = &self.live[i];
        let to = (s.computed + n).min(s.tokens.len());
        let (id, old) = (s.id, self.m.block_table(s.id).unwrap_or(&[]).to_vec());
        let before = self.m.free_list();
        match self.m.append_slots(id, to) {
            Ok(()) => {
                let table = self.m.block_table(id).expect("live").to_vec();
                prop_assert_eq!(&table[..old.len()], &old[..]);
                Self::check_taken_from_head(&before, &[], &table[old.len()..])?;
                self.compute(i, to)?;
            }
            Err(BlockError::OutOfBlocks { .. }) => {
                prop_assert_eq!(self.m.free_list(), before);
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        }
        Ok(())
    }

    fn release(&mut self, which: usize) -> Result<(), TestCaseError> {
        if self.live.is_empty() {
            return Ok(());
        }
        let s = self.live.swap_remove(which % self.live.len());
        let table = self.m.block_table(s.id).expect("live").to_vec();
        let before = self.m.free_list();
        let others: std::collections::HashSet<u32> = self
            .live
            .iter()
            .flat_map(|o| self.m.block_table(o.id).unwrap_or(&[]).to_vec())
            .collect();
        self.m
            .free(s.id)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(self.m.free(s.id), Err(BlockError::UnknownSeq { seq: s.id }));
        // Uncached blocks go to the head (in table order), cached ones to the
        // tail, the end of the chain first.
        let after = self.m.free_list();
        let released: Vec<(u32, Option<u64>)> = after
            .iter()
            .copied()
            .filter(|&(b, _)| table.contains(&b) && !others.contains(&b))
            .collect();
        let mut expected: Vec<(u32, Option<u64>)> =
            released.iter().copied().filter(|&(_, h)| h.is_none()).collect();
        expected.sort_by_key(|&(b, _)| table.iter().position(|&t| t == b));
        expected.extend(before);
        let mut cached: Vec<(u32, Option<u64>)> =
            released.iter().copied().filter(|&(_, h)| h.is_some()).collect();
        cached.sort_by_key(|&(b, _)| std::cmp::Reverse(table.iter().position(|&t| t == b)));
        expected.extend(cached);
        prop_assert_eq!(after, expected);
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        self.m.check_invariants().map_err(TestCaseError::fail)?;
        let mut used = std::collections::HashSet::new();
        for s in &self.live {
            let table = self.m.block_table(s.id).expect("live sequence has a table");
            used.extend(table.iter().copied());
            prop_assert!(table.len() * BS >= s.computed);
            // Hash chain: one hash per computed full block, each chaining
            // from the previous one over the block's tokens.
            if self.m.prefix_caching() {
                let hashes = self.m.seq_hashes(s.id).expect("live");
                prop_assert_eq!(hashes.len(), s.computed / BS);
                let mut parent = None;
                for (i, &h) in hashes.iter().enumerate() {
                    let want = self.m.chain_hash(parent, &s.tokens[i * BS..(i + 1) * BS]);
                    prop_assert_eq!(h, want, "hash of block {} of seq {}", i, s.id);
                    parent = Some(h);
                }
            }
        }
        prop_assert_eq!(self.m.num_used_blocks(), used.len());
        prop_assert_eq!(self.m.num_free_blocks() + used.len(), self.m.num_blocks());
        Ok(())
    }
}

fn run(ops: Vec<Op>, num_blocks: usize, caching: bool) -> Result<(), TestCaseError> {
    let mut h = Harness {
        m: BlockManager::new(num_blocks, BS, caching),
        live: Vec::new(),
        kv: vec![[None; BS]; num_blocks],
        next_id: 1,
        next_token: 0,
    };
    for op in ops {
        match op {
            Op::Add {
                family,
                shared,
                tail,
                chunk,
            } => h.add(family, shared, tail, chunk)?,
            Op::Step { which, n } => h.step(which, n)?,
            Op::Finish { which } | Op::Abort { which } => h.release(which)?,
            Op::ClearCache => {
                let free = h.m.num_free_blocks();
                h.m.clear_cache();
                prop_assert_eq!(h.m.num_cached_blocks(), 0);
                prop_assert_eq!(h.m.num_free_blocks(), free);
            }
        }
        h.check()?;
    }
    let stats = h.m.stats();
    while !h.live.is_empty() {
        h.release(0)?;
        h.check()?;
    }
    // Everything freed: the pool is exactly as free as when new.
    prop_assert_eq!(h.m.num_free_blocks(), num_blocks);
    prop_assert_eq!(h.m.num_used_blocks(), 0);
    prop_assert_eq!(h.m.num_seqs(), 0);
    if !caching {
        prop_assert_eq!(stats.hits + stats.misses + stats.tokens_saved, 0);
        prop_assert_eq!(h.m.num_cached_blocks(), 0);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_workloads_keep_the_pool_consistent(
        ops in prop::collection::vec(op(), 1..80),
        num_blocks in 4usize..40,
        caching in prop::bool::weighted(0.8),
    ) {
        run(ops, num_blocks, caching)?;
    }
}

/// A shared prefix computed once is found by every later sequence, and the
/// hit counters say so.
#[test]
fn shared_prefix_is_computed_once() {
    let mut m = BlockManager::new(64, BS, true);
    let prefix: Vec<u32> = (0..20).collect();
    let mut first = prefix.clone();
    first.push(500);
    m.allocate(1, &first, first.len()).unwrap();
    m.commit(1, &first).unwrap();
    m.free(1).unwrap();
    let mut saved = 0;
    for id in 2..6u64 {
        let mut p = prefix.clone();
        p.push(500 + id as u32);
        assert_eq!(m.allocate(id, &p, p.len()), Ok(20));
        saved += 20;
    }
    let stats = m.stats();
    assert_eq!(stats.tokens_saved, saved);
    assert_eq!(stats.hits, 4 * 5);
    assert_eq!(stats.misses, 5);
    m.check_invariants().unwrap();
    // Five sequences, the prefix's five blocks shared by the four live ones.
    assert_eq!(m.num_used_blocks(), 5 + 4);
}

/// Under pressure, the least recently freed cached prefix is evicted first.
#[test]
fn eviction_follows_lru_order() {
    let mut m = BlockManager::new(4, BS, true);
    let a: Vec<u32> = (0..5).collect();
    let b: Vec<u32> = (100..105).collect();
    for (id, p) in [(1, &a), (2, &b)] {
        m.allocate(id, p, p.len()).unwrap();
        m.commit(id, p).unwrap();
    }
    m.free(1).unwrap(); // a's block freed first: least recently used
    m.free(2).unwrap();
    assert_eq!((m.cached_prefix(&a), m.cached_prefix(&b)), (4, 4));
    // Two fresh blocks: the two uncached partial blocks, no eviction yet.
    m.allocate(3, &[7; 8], 8).unwrap();
    assert_eq!(m.stats().evictions, 0);
    // One more evicts a's block, not b's.
    m.allocate(4, &[8], 1).unwrap();
    assert_eq!(m.stats().evictions, 1);
    assert_eq!((m.cached_prefix(&a), m.cached_prefix(&b)), (0, 4));
    m.check_invariants().unwrap();
}
