//! Paged KV block pool with prefix caching.
//!
//! The pool holds `num_blocks` blocks of `block_size` token slots. Each
//! sequence owns a block table (block ids in position order); a block may sit
//! in several tables at once when sequences share a cached prefix, so every
//! block carries a reference count equal to the number of tables holding it.
//!
//! # Prefix caching
//!
//! Once all tokens of a *full* block are computed, the block is identified by
//! a chained hash: `hash(parent block's hash, this block's token ids)`, so one
//! hash names the whole prefix up to and including the block. A later
//! sequence whose prompt starts with the same tokens takes references on
//! those blocks instead of recomputing them. Only full blocks are shared, and
//! a sequence only writes at positions past its cached prefix, so a shared
//! block is never written and no copy-on-write is needed.
//!
//! # Free list and eviction
//!
//! Blocks with no references are on one free list, which is also the LRU
//! order of the cache: a freed block that carries a hash keeps it (and stays
//! findable) and goes to the tail; a freed block without one goes to the head,
//! because it is worth nothing and should be reused first. Allocation takes
//! from the head, evicting the hash of a cached block it takes. A sequence's
//! blocks are freed last-to-first, so the end of a chain is evicted before its
//! beginning (a child is unreachable without its parent anyway).
//!
//! The hash is SipHash keyed at random once per pool: deterministic for the
//! pool's life, yet nobody can craft token sequences that collide with another
//! user's prefix. The tokens of every cached block are kept and compared on a
//! hit as well, so even an accidental collision cannot serve wrong KV.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// Identifies a sequence to the block manager (the engine's request id).
pub type SeqId = u64;

/// Sentinel for "no block" in the free-list links.
const NIL: u32 = u32::MAX;

/// Chain hash of the (virtual) parent of a sequence's first block.
const ROOT_HASH: u64 = 0x6b65_7374_7265_6c00;

/// Why the block manager refused an operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Not enough free blocks; nothing was changed.
    #[error("KV cache is full: {needed} more blocks needed but only {free} are free")]
    OutOfBlocks { needed: usize, free: usize },
    /// `allocate` on a sequence that already has a block table.
    #[error("sequence {seq} already has KV blocks; free it before allocating again")]
    DuplicateSeq { seq: SeqId },
    /// An operation named a sequence without a block table.
    #[error("sequence {seq} has no KV blocks (never allocated, or already freed)")]
    UnknownSeq { seq: SeqId },
}

/// Prefix-cache counters since the pool was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Full prompt blocks found in the cache.
    pub hits: u64,
    /// Full prompt blocks looked up and not found.
    pub misses: u64,
    /// Prompt tokens not recomputed thanks to hits.
    pub tokens_saved: u64,
    /// Cached blocks whose contents were dropped to make room.
    pub evictions: u64,
}

/// What identifies a cached block: its chain hash and, to rule out
/// collisions, its parent's hash and its own tokens.
#[derive(Clone, Debug)]
struct BlockKey {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

#[derive(Clone, Debug)]
struct Block {
    ref_count: u32,
    /// Set while this block is the cache entry for its hash.
    key: Option<BlockKey>,
    /// Free-list links (meaningful only while `in_free`).
    prev: u32,
    next: u32,
    in_free: bool,
}

/// One sequence's blocks.
#[derive(Clone, Debug, Default)]
struct SeqTable {
    blocks: Vec<u32>,
    /// Chain hash of each leading full block whose tokens are all computed
    /// (`hashes.len() <= blocks.len()`); kept even when the block is not the
    /// cache entry, because the next block's hash chains from it.
    hashes: Vec<u64>,
}

/// The paged KV block pool: block tables, reference counts, prefix cache.
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Head (next to be reused) and tail (most recently freed) of the free list.
    head: u32,
    tail: u32,
    num_free: usize,
    cache: HashMap<u64, u32>,
    tables: HashMap<SeqId, SeqTable>,
    prefix_caching: bool,
    hasher: RandomState,
    stats: CacheStats,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens (both at least 1;
    /// smaller values are raised to 1 so the pool is never degenerate).
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> BlockManager {
        let num_blocks = num_blocks.clamp(1, NIL as usize - 1);
        let mut m = BlockManager {
            block_size: block_size.max(1),
            blocks: vec![
                Block {
                    ref_count: 0,
                    key: None,
                    prev: NIL,
                    next: NIL,
                    in_free: false,
                };
                num_blocks
            ],
            head: NIL,
            tail: NIL,
            num_free: 0,
            cache: HashMap::new(),
            tables: HashMap::new(),
            prefix_caching,
            hasher: RandomState::new(),
            stats: CacheStats::default(),
        };
        for b in 0..num_blocks as u32 {
            m.push_tail(b);
        }
        m
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }
    /// Blocks with no reference (including cached ones that may be reused).
    pub fn num_free_blocks(&self) -> usize {
        self.num_free
    }
    /// Blocks held by at least one sequence.
    pub fn num_used_blocks(&self) -> usize {
        self.blocks.len() - self.num_free
    }
    /// Blocks whose contents are findable by hash (in use or free).
    pub fn num_cached_blocks(&self) -> usize {
        self.cache.len()
    }
    pub fn prefix_caching(&self) -> bool {
        self.prefix_caching
    }
    pub fn stats(&self) -> CacheStats {
        self.stats
    }
    /// Number of sequences holding blocks.
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }
    /// The sequence's block ids in position order.
    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.tables.get(&seq).map(|t| t.blocks.as_slice())
    }
    /// Chain hashes of the sequence's computed full blocks.
    pub fn seq_hashes(&self, seq: SeqId) -> Option<&[u64]> {
        self.tables.get(&seq).map(|t| t.hashes.as_slice())
    }
    /// Token slots the sequence's blocks provide.
    pub fn num_slots(&self, seq: SeqId) -> usize {
        self.tables
            .get(&seq)
            .map_or(0, |t| t.blocks.len() * self.block_size)
    }

    /// Hash of a block holding `tokens` after a block whose hash is `parent`
    /// (`None` for a sequence's first block).
    pub fn chain_hash(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_u64(parent.unwrap_or(ROOT_HASH));
        for &t in tokens {
            h.write_u32(t);
        }
        h.finish()
    }

    /// Chain hashes of the full blocks of `tokens`, in order: the identity
    /// under which each block is (or will be) cached.
    pub fn block_hashes<'a>(&'a self, tokens: &'a [u32]) -> impl Iterator<Item = u64> + 'a {
        let mut parent = None;
        tokens.chunks_exact(self.block_size).map(move |chunk| {
            let h = self.chain_hash(parent, chunk);
            parent = Some(h);
            h
        })
    }

    /// Cached blocks of the longest cached prefix of `tokens` and their
    /// hashes. At least one token is always left to compute, because the
    /// last one must run through the model to produce logits.
    fn lookup(&self, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let mut hit = Vec::new();
        let mut hashes = Vec::new();
        if !self.prefix_caching {
            return (hit, hashes);
        }
        let mut parent = None;
        for chunk in tokens[..self.max_lookup_blocks(tokens) * self.block_size].chunks(self.block_size) {
            let h = self.chain_hash(parent, chunk);
            let found = self.cache.get(&h).copied().filter(|&b| {
                self.blocks[b as usize]
                    .key
                    .as_ref()
                    .is_some_and(|k| k.parent == parent.unwrap_or(ROOT_HASH) && k.tokens.as_ref() == chunk)
            });
            match found {
                Some(b) => {
                    hit.push(b);
                    hashes.push(h);
                    parent = Some(h);
                }
                None => break,
            }
        }
        (hit, hashes)
    }

    /// Full blocks of `tokens` that a lookup may match.
    fn max_lookup_blocks(&self, tokens: &[u32]) -> usize {
        tokens.len().saturating_sub(1) / self.block_size
    }

    /// Leading tokens of `tokens` already in the cache (whole blocks, and
    /// never all of them). Read-only: nothing is reserved.
    pub fn cached_prefix(&self, tokens: &[u32]) -> usize {
        self.lookup(tokens).0.len() * self.block_size
    }

    /// Free blocks `allocate(tokens, num_slots)` would take, and how many it
    /// would find cached.
    fn allocation_need(&self, tokens: &[u32], num_slots: usize) -> (usize, Vec<u32>, Vec<u64>) {
        let (hit, hashes) = self.lookup(tokens);
        let cached = hit.len() * self.block_size;
        let total = num_slots.max(cached).div_ceil(self.block_size);
        let revived = hit
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_count == 0)
            .count();
        (total - hit.len() + revived, hit, hashes)
    }

    /// Whether a new sequence with `tokens` could get `num_slots` slots now.
    pub fn can_allocate(&self, tokens: &[u32], num_slots: usize) -> bool {
        self.allocation_need(tokens, num_slots).0 <= self.num_free
    }

    /// Gives a new sequence a block table covering `num_slots` token slots
    /// (at least its cached prefix), reusing cached blocks for the longest
    /// cached prefix of `tokens`. Returns the number of cached tokens, whose
    /// KV need not be computed. On error nothing changes.
    pub fn allocate(&mut self, seq: SeqId, tokens: &[u32], num_slots: usize) -> Result<usize, BlockError> {
        if self.tables.contains_key(&seq) {
            return Err(BlockError::DuplicateSeq { seq });
        }
        let (need, hit, hashes) = self.allocation_need(tokens, num_slots);
        if need > self.num_free {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.num_free,
            });
        }
        // Take the hits first so that the fresh allocations below cannot
        // evict them.
        for &b in &hit {
            if self.blocks[b as usize].ref_count == 0 {
                self.unlink(b);
            }
            self.blocks[b as usize].ref_count += 1;
        }
        let cached = hit.len() * self.block_size;
        if self.prefix_caching {
            self.stats.hits += hit.len() as u64;
            self.stats.misses += (self.max_lookup_blocks(tokens) - hit.len()) as u64;
            self.stats.tokens_saved += cached as u64;
        }
        let mut table = SeqTable { blocks: hit, hashes };
        let total = num_slots.max(cached).div_ceil(self.block_size);
        while table.blocks.len() < total {
            let b = self.take_free();
            table.blocks.push(b);
        }
        self.tables.insert(seq, table);
        Ok(cached)
    }

    /// Free blocks needed to grow `seq` to `num_slots` slots.
    pub fn blocks_needed(&self, seq: SeqId, num_slots: usize) -> Result<usize, BlockError> {
        let t = self.tables.get(&seq).ok_or(BlockError::UnknownSeq { seq })?;
        Ok(num_slots.div_ceil(self.block_size).saturating_sub(t.blocks.len()))
    }

    /// Grows `seq`'s table to cover `num_slots` token slots (no-op when it
    /// already does). On error nothing changes.
    pub fn append_slots(&mut self, seq: SeqId, num_slots: usize) -> Result<(), BlockError> {
        let need = self.blocks_needed(seq, num_slots)?;
        if need > self.num_free {
            return Err(BlockError::OutOfBlocks {
                needed: need,
                free: self.num_free,
            });
        }
        let mut fresh = Vec::with_capacity(need);
        for _ in 0..need {
            fresh.push(self.take_free());
        }
        if let Some(t) = self.tables.get_mut(&seq) {
            t.blocks.extend(fresh);
        }
        Ok(())
    }

    /// Records that the KV of `computed` (the sequence's tokens from the
    /// start, all of them computed) is in the pool: every newly full block
    /// gets its chain hash and, if its content is not cached yet, becomes
    /// the cache entry for it.
    pub fn commit(&mut self, seq: SeqId, computed: &[u32]) -> Result<(), BlockError> {
        if !self.prefix_caching {
            return if self.tables.contains_key(&seq) {
                Ok(())
            } else {
                Err(BlockError::UnknownSeq { seq })
            };
        }
        let bs = self.block_size;
        let t = self.tables.get(&seq).ok_or(BlockError::UnknownSeq { seq })?;
        let full = (computed.len() / bs).min(t.blocks.len());
        let start = t.hashes.len();
        let mut parent = t.hashes.last().copied();
        let mut new = Vec::with_capacity(full.saturating_sub(start));
        for i in start..full {
            let tokens = &computed[i * bs..(i + 1) * bs];
            let h = self.chain_hash(parent, tokens);
            new.push((t.blocks[i], h, parent.unwrap_or(ROOT_HASH), tokens));
            parent = Some(h);
        }
        for &(b, h, parent, tokens) in &new {
            // A duplicate (the same prefix computed by two sequences at once)
            // stays private; the first one is the cache entry.
            if !self.cache.contains_key(&h) && self.blocks[b as usize].key.is_none() {
                self.cache.insert(h, b);
                self.blocks[b as usize].key = Some(BlockKey {
                    hash: h,
                    parent,
                    tokens: tokens.into(),
                });
            }
        }
        if let Some(t) = self.tables.get_mut(&seq) {
            t.hashes.extend(new.iter().map(|&(_, h, _, _)| h));
        }
        Ok(())
    }

    /// Releases all of `seq`'s blocks. Cached ones stay findable until evicted.
    pub fn free(&mut self, seq: SeqId) -> Result<(), BlockError> {
        let t = self.tables.remove(&seq).ok_or(BlockError::UnknownSeq { seq })?;
        for &b in t.blocks.iter().rev() {
            let block = &mut self.blocks[b as usize];
            block.ref_count -= 1;
            if block.ref_count == 0 {
                if block.key.is_some() {
                    self.push_tail(b);
                } else {
                    self.push_head(b);
                }
            }
        }
        Ok(())
    }

    /// Drops every prefix-cache entry (DELETE /v1/cache). Blocks in use
    /// stay with their sequences but are no longer findable; free cached
    /// blocks become plain free blocks, reused first. Returns how many
    /// entries were dropped.
    pub fn clear_cache(&mut self) -> usize {
        let cached: Vec<u32> = self.cache.values().copied().collect();
        for &b in &cached {
            let block = &mut self.blocks[b as usize];
            block.key = None;
            if block.in_free {
                // Move to the head: uncached free blocks are reused first.
                self.unlink(b);
                self.push_head(b);
            }
        }
        self.cache.clear();
        cached.len()
    }

    /// Takes the head of the free list (callers check `num_free` first),
    /// evicting its cached contents.
    fn take_free(&mut self) -> u32 {
        let b = self.head;
        self.unlink(b);
        let block = &mut self.blocks[b as usize];
        if let Some(key) = block.key.take() {
            self.cache.remove(&key.hash);
            self.stats.evictions += 1;
        }
        block.ref_count = 1;
        b
    }

    fn push_tail(&mut self, b: u32) {
        let old = self.tail;
        let block = &mut self.blocks[b as usize];
        block.prev = old;
        block.next = NIL;
        block.in_free = true;
        if old == NIL {
            self.head = b;
        } else {
            self.blocks[old as usize].next = b;
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn push_head(&mut self, b: u32) {
        let old = self.head;
        let block = &mut self.blocks[b as usize];
        block.prev = NIL;
        block.next = old;
        block.in_free = true;
        if old == NIL {
            self.tail = b;
        } else {
            self.blocks[old as usize].prev = b;
        }
        self.head = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (prev, next) = {
            let block = &mut self.blocks[b as usize];
            block.in_free = false;
            (block.prev, block.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    /// Free blocks from the next to be reused to the most recently freed,
    /// with the hash of each that is cached.
    pub fn free_list(&self) -> Vec<(u32, Option<u64>)> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut b = self.head;
        while b != NIL && out.len() <= self.blocks.len() {
            let block = &self.blocks[b as usize];
            out.push((b, block.key.as_ref().map(|k| k.hash)));
            b = block.next;
        }
        out
    }

    /// Verifies every internal invariant; the error says which one broke.
    /// Meant for tests and debug assertions (cost: O(blocks + table entries)).
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.blocks.len();
        // Reference counts equal the number of tables holding each block.
        let mut refs = vec![0u32; n];
        for (seq, t) in &self.tables {
            let mut seen = std::collections::HashSet::new();
            for &b in &t.blocks {
                if b as usize >= n {
                    return Err(format!("seq {seq} holds block {b} outside the pool of {n}"));
                }
                if !seen.insert(b) {
                    return Err(format!("seq {seq} holds block {b} twice"));
                }
                refs[b as usize] += 1;
            }
            if t.hashes.len() > t.blocks.len() {
                return Err(format!("seq {seq} has more hashes than blocks"));
            }
            // Hash chain: a cached block of the table names its parent.
            for (i, (&b, &h)) in t.blocks.iter().zip(&t.hashes).enumerate() {
                if let Some(k) = &self.blocks[b as usize].key {
                    let parent = if i == 0 { ROOT_HASH } else { t.hashes[i - 1] };
                    if k.hash != h || k.parent != parent {
                        return Err(format!("seq {seq} block {i} (id {b}) breaks the hash chain"));
                    }
                }
            }
        }
        for (b, block) in self.blocks.iter().enumerate() {
            if block.ref_count != refs[b] {
                return Err(format!(
                    "block {b} has ref count {} but {} tables hold it",
                    block.ref_count, refs[b]
                ));
            }
            if block.in_free != (block.ref_count == 0) {
                return Err(format!(
                    "block {b} with ref count {} is {}on the free list",
                    block.ref_count,
                    if block.in_free { "" } else { "not " }
                ));
            }
            if let Some(k) = &block.key {
                if self.cache.get(&k.hash) != Some(&(b as u32)) {
                    return Err(format!("block {b} has a hash the cache does not map to it"));
                }
                if k.tokens.len() != self.block_size {
                    return Err(format!("cached block {b} is not full"));
                }
            }
        }
        for (&h, &b) in &self.cache {
            if self.blocks[b as usize].key.as_ref().map(|k| k.hash) != Some(h) {
                return Err(format!(
                    "cache maps hash {h:#x} to block {b}, which does not carry it"
                ));
            }
        }
        // The free list is a well-linked chain of exactly the free blocks.
        let mut count = 0;
        let mut prev = NIL;
        let mut b = self.head;
        while b != NIL {
            count += 1;
            if count > n {
                return Err("the free list has a cycle".into());
            }
            let block = &self.blocks[b as usize];
            if !block.in_free || block.prev != prev {
                return Err(format!("free list link broken at block {b}"));
            }
            prev = b;
            b = block.next;
        }
        if prev != self.tail || count != self.num_free {
            return Err(format!(
                "free list holds {count} blocks but the count says {} (or the tail is wrong)",
                self.num_free
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn allocate_covers_the_requested_slots() {
        let mut m = BlockManager::new(8, 4, true);
        assert_eq!(m.allocate(1, &toks(9, 0), 9), Ok(0));
        assert_eq!(m.block_table(1).map(<[u32]>::len), Some(3));
        assert_eq!(m.num_free_blocks(), 5);
        m.append_slots(1, 12).unwrap();
        assert_eq!(m.num_free_blocks(), 5);
        m.append_slots(1, 13).unwrap();
        assert_eq!(m.num_free_blocks(), 4);
        m.check_invariants().unwrap();
        m.free(1).unwrap();
        assert_eq!(m.num_free_blocks(), 8);
        m.check_invariants().unwrap();
    }

    #[test]
    fn out_of_blocks_changes_nothing() {
        let mut m = BlockManager::new(2, 4, true);
        assert_eq!(
            m.allocate(1, &toks(9, 0), 9),
            Err(BlockError::OutOfBlocks { needed: 3, free: 2 })
        );
        assert_eq!(m.num_free_blocks(), 2);
        assert_eq!(m.num_seqs(), 0);
        m.allocate(1, &toks(4, 0), 4).unwrap();
        assert!(m.append_slots(1, 13).is_err());
        assert_eq!(m.block_table(1).map(<[u32]>::len), Some(1));
        m.check_invariants().unwrap();
    }

    #[test]
    fn committed_prefix_is_shared_and_never_whole() {
        let mut m = BlockManager::new(16, 4, true);
        let a = toks(10, 0);
        m.allocate(1, &a, 10).unwrap();
        m.commit(1, &a).unwrap();
        assert_eq!(m.num_cached_blocks(), 2);
        // Same 8-token prefix, different tail: two blocks shared.
        let mut b = a[..8].to_vec();
        b.extend([99, 98, 97]);
        assert_eq!(m.cached_prefix(&b), 8);
        assert_eq!(m.allocate(2, &b, 11), Ok(8));
        assert_eq!(m.block_table(1).unwrap()[..2], m.block_table(2).unwrap()[..2]);
        // A prompt of exactly the cached 8 tokens keeps its last block to compute.
        assert_eq!(m.cached_prefix(&a[..8]), 4);
        // The first allocation missed both of its lookups.
        let s = m.stats();
        assert_eq!((s.hits, s.misses, s.tokens_saved), (2, 2, 8));
        m.check_invariants().unwrap();
    }

    #[test]
    fn freed_cached_blocks_are_evicted_in_lru_order_after_uncached_ones() {
        let mut m = BlockManager::new(4, 2, true);
        let a = [1, 2, 3, 4, 5];
        m.allocate(1, &a, 5).unwrap();
        m.commit(1, &a).unwrap();
        m.free(1).unwrap();
        // Block 2 (partial) is uncached and first in line; then the chain's
        // tail before its head.
        let order: Vec<u32> = m.free_list().iter().map(|&(b, _)| b).collect();
        assert_eq!(order, vec![2, 3, 1, 0]);
        assert_eq!(m.allocate(2, &[9, 9, 9, 9], 4), Ok(0));
        assert_eq!(m.block_table(2), Some(&[2, 3][..]));
        assert_eq!(m.stats().evictions, 0);
        // The next allocation evicts block 1 (the chain's second block).
        m.allocate(3, &[8], 1).unwrap();
        assert_eq!(m.block_table(3), Some(&[1][..]));
        assert_eq!(m.stats().evictions, 1);
        assert_eq!(m.cached_prefix(&a), 2);
        m.check_invariants().unwrap();
    }

    #[test]
    fn prefix_caching_off_never_hits() {
        let mut m = BlockManager::new(8, 2, false);
        let a = [1, 2, 3, 4, 5];
        m.allocate(1, &a, 5).unwrap();
        m.commit(1, &a).unwrap();
        assert_eq!(m.num_cached_blocks(), 0);
        assert_eq!(m.allocate(2, &a, 5), Ok(0));
        assert_eq!(m.stats(), CacheStats::default());
    }

    #[test]
    fn misuse_is_an_error_not_a_panic() {
        let mut m = BlockManager::new(4, 2, true);
        assert_eq!(m.free(7), Err(BlockError::UnknownSeq { seq: 7 }));
        assert_eq!(m.append_slots(7, 3), Err(BlockError::UnknownSeq { seq: 7 }));
        assert_eq!(m.commit(7, &[1]), Err(BlockError::UnknownSeq { seq: 7 }));
        m.allocate(7, &[1], 1).unwrap();
        assert_eq!(m.allocate(7, &[1], 1), Err(BlockError::DuplicateSeq { seq: 7 }));
    }
}
