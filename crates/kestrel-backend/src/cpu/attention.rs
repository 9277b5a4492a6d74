//! Paged KV cache and causal attention over it.
//!
//! Pool layout, per K and per V: `[layer][slot][kv_head][head_dim]` where
//! slot = block * block_size + offset, so one token's keys of all KV heads
//! are one contiguous row (written with one copy). Elements are stored as
//! the `KvSpec` asks (f32, f16 or bf16) and widened to f32 for the math.
//!
//! Attention: see [`attention`].

use half::{bf16, f16};

use crate::cpu::attn_f16acc;
#[cfg(target_arch = "x86_64")]
use crate::cpu::attn_kernels::Avx2;
use crate::cpu::attn_kernels::{exp_shift_sum, AttnKernels, Portable};
use crate::cpu::features::SimdLevel;
use crate::cpu::ops::fast_tanh;
use crate::cpu::parallel::chunks_mut;
use crate::error::BackendError;
use crate::layout::{AttnParams, BatchLayout, KvDType, KvSpec};

/// Storage of one of K or V for all layers.
#[derive(Debug)]
pub enum KvStore {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl KvStore {
    fn zeroed(dtype: KvDType, n: usize) -> KvStore {
        match dtype {
            KvDType::F32 => KvStore::F32(vec![0.0; n]),
            KvDType::F16 => KvStore::F16(vec![f16::ZERO; n]),
            KvDType::Bf16 => KvStore::Bf16(vec![bf16::ZERO; n]),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvStore::F32(v) => v[at..at + src.len()].copy_from_slice(src),
            KvStore::F16(v) => {
                for (d, &s) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = f16::from_f32(s);
                }
            }
            KvStore::Bf16(v) => {
                for (d, &s) in v[at..at + src.len()].iter_mut().zip(src) {
                    *d = bf16::from_f32(s);
                }
            }
        }
    }

    /// The `n` values at `at` as f32: borrowed for f32 storage, widened into
    /// `scratch` otherwise.
    #[inline(always)]
    fn read<'a, K: AttnKernels>(&'a self, k: K, at: usize, n: usize, scratch: &'a mut [f32]) -> &'a [f32] {
        match self {
            KvStore::F32(v) => &v[at..at + n],
            KvStore::F16(v) => {
                k.widen_f16(&v[at..at + n], &mut scratch[..n]);
                &scratch[..n]
            }
            KvStore::Bf16(v) => {
                k.widen_bf16(&v[at..at + n], &mut scratch[..n]);
                &scratch[..n]
            }
        }
    }
}

/// The paged KV cache of all layers.
#[derive(Debug)]
pub struct CpuKvPool {
    pub(crate) spec: KvSpec,
    k: KvStore,
    v: KvStore,
}

impl CpuKvPool {
    pub fn new(spec: &KvSpec) -> Result<CpuKvPool, BackendError> {
        if spec.block_size == 0 || spec.head_dim == 0 || spec.n_kv_heads == 0 {
            return Err(BackendError::Other(format!(
                "alloc_kv: block_size, n_kv_heads and head_dim must be positive, got {spec:?}"
            )));
        }
        let n = [
            spec.n_layers,
            spec.num_blocks,
            spec.block_size,
            spec.n_kv_heads,
            spec.head_dim,
        ]
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| BackendError::OutOfMemory(format!("alloc_kv: {spec:?} overflows")))?;
        Ok(CpuKvPool {
            spec: spec.clone(),
            k: KvStore::zeroed(spec.dtype, n),
            v: KvStore::zeroed(spec.dtype, n),
        })
    }

    /// Stored keys / values of all layers.
    pub(crate) fn k(&self) -> &KvStore {
        &self.k
    }

    pub(crate) fn v(&self) -> &KvStore {
        &self.v
    }

    fn kv_dim(&self) -> usize {
        self.spec.n_kv_heads * self.spec.head_dim
    }

    fn slots(&self) -> usize {
        self.spec.num_blocks * self.spec.block_size
    }

    /// Element offset of (layer, slot, kv head).
    #[inline]
    fn at(&self, layer: usize, slot: usize, kvh: usize) -> usize {
        ((layer * self.slots() + slot) * self.spec.n_kv_heads + kvh) * self.spec.head_dim
    }

    fn check_layer(&self, layer: usize, op: &str) -> Result<(), BackendError> {
        if layer >= self.spec.n_layers {
            return Err(BackendError::Other(format!(
                "{op}: layer {layer} out of range (the KV pool has {} layers)",
                self.spec.n_layers
            )));
        }
        Ok(())
    }

    /// Stores K and V rows (`[n_tokens, kv_dim]`) at the batch's slots.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], b: &BatchLayout) -> Result<(), BackendError> {
        self.check_layer(layer, "write_kv")?;
        let kd = self.kv_dim();
        let slots = self.slots();
        for (i, &slot) in b.slot_mapping.iter().enumerate() {
            let slot = slot as usize;
            if slot >= slots {
                return Err(BackendError::Other(format!(
                    "write_kv: slot_mapping[{i}] = {slot} out of range (pool has {slots} slots)"
                )));
            }
            let at = self.at(layer, slot, 0);
            self.k.write(at, &k[i * kd..(i + 1) * kd]);
            self.v.write(at, &v[i * kd..(i + 1) * kd]);
        }
        Ok(())
    }
}

/// Checks everything attention will index with, so the kernel itself
/// cannot go out of bounds on a malformed batch.
fn validate(pool: &CpuKvPool, b: &BatchLayout, p: &AttnParams, q_rows: usize) -> Result<(), BackendError> {
    let s = &pool.spec;
    let err = |m: String| Err(BackendError::Other(format!("attention: {m}")));
    if p.head_dim != s.head_dim || p.n_kv_heads != s.n_kv_heads {
        return err(format!(
            "params head_dim {} / n_kv_heads {} differ from the KV pool's {} / {}",
            p.head_dim, p.n_kv_heads, s.head_dim, s.n_kv_heads
        ));
    }
    if p.n_kv_heads == 0 || !p.n_heads.is_multiple_of(p.n_kv_heads) {
        return err(format!(
            "n_heads {} is not a multiple of n_kv_heads {}",
            p.n_heads, p.n_kv_heads
        ));
    }
    if b.block_size as usize != s.block_size {
        return err(format!(
            "batch block_size {} differs from the KV pool's {}",
            b.block_size, s.block_size
        ));
    }
    if b.positions.len() != q_rows {
        return err(format!(
            "batch has {} positions for {q_rows} query rows",
            b.positions.len()
        ));
    }
    for (si, seq) in b.seqs.iter().enumerate() {
        let (q0, ql) = (seq.query_start as usize, seq.query_len as usize);
        if q0 + ql > q_rows {
            return err(format!(
                "sequence {si}: query rows {q0}..{} exceed the {q_rows} rows",
                q0 + ql
            ));
        }
        let cap = seq.block_table.len() * s.block_size;
        if seq.context_len as usize > cap {
            return err(format!(
                "sequence {si}: context_len {} exceeds its {} blocks of {}",
                seq.context_len,
                seq.block_table.len(),
                s.block_size
            ));
        }
        if let Some(&blk) = seq.block_table.iter().find(|&&blk| blk as usize >= s.num_blocks) {
            return err(format!(
                "sequence {si}: block {blk} out of range (pool has {} blocks)",
                s.num_blocks
            ));
        }
        for r in q0..q0 + ql {
            if b.positions[r] >= seq.context_len {
                return err(format!(
                    "row {r}: position {} not below sequence {si}'s context_len {}",
                    b.positions[r], seq.context_len
                ));
            }
        }
    }
    Ok(())
}

/// Work items per thread wanted before key ranges are split (decode has
/// one row per sequence: without splitting, one KV head = one task).
const TASKS_PER_THREAD: usize = 4;
/// Fewest keys worth a split of their own.
const MIN_KEYS_PER_SPLIT: usize = 64;
/// Keys whose values are accumulated together (see `AttnKernels::accumulate`).
const KEY_BLOCK: usize = 16;

/// Causal attention of `q` (`[rows, n_heads * head_dim]`) into `out` (same
/// shape). Rows not covered by any sequence are left as zeros.
///
/// One task per (query row, KV head, key split): it serves every query
/// head of the KV head's group, so each key and value row is read once per
/// row rather than once per head. A task leaves its unnormalised partial
/// result (running max, exp-sum, weighted value sum per head) in `part`;
/// the splits of a (row, KV head) are merged at the end (split-K "flash
/// decoding": a long context of one decoding sequence still uses every
/// thread).
pub fn attention(
    level: SimdLevel,
    q: &[f32],
    pool: &CpuKvPool,
    layer: usize,
    b: &BatchLayout,
    p: &AttnParams,
    out: &mut [f32],
) -> Result<(), BackendError> {
    pool.check_layer(layer, "attention")?;
    let hd = p.head_dim;
    let qd = p.n_heads * hd;
    let rows = q.len().checked_div(qd).unwrap_or(0);
    validate(pool, b, p, rows)?;
    out.fill(0.0);
    if rows == 0 {
        return Ok(());
    }
    // Row → (sequence, first key, last key); None: no sequence, output zero.
    let mut ranges: Vec<Option<(usize, usize, usize)>> = vec![None; rows];
    for (si, seq) in b.seqs.iter().enumerate() {
        let q0 = seq.query_start as usize;
        for (r, range) in ranges
            .iter_mut()
            .enumerate()
            .skip(q0)
            .take(seq.query_len as usize)
        {
            let pos = b.positions[r] as usize;
            let lo = match p.window {
                Some(w) => (pos + 1).saturating_sub(w as usize),
                None => 0,
            };
            *range = Some((si, lo, pos));
        }
    }
    let group = p.n_heads / p.n_kv_heads;
    let units = rows * p.n_kv_heads;
    let threads = rayon::current_num_threads().max(1);
    let max_keys = ranges
        .iter()
        .flatten()
        .map(|&(_, lo, hi)| hi + 1 - lo)
        .max()
        .unwrap_or(0);
    let splits = if units >= threads * TASKS_PER_THREAD {
        1
    } else {
        (threads * TASKS_PER_THREAD)
            .div_ceil(units)
            .min(max_keys.div_ceil(MIN_KEYS_PER_SPLIT))
            .max(1)
    };
    // Per task: o (group * hd), then m (group), then l (group).
    let stride = group * (hd + 2);
    let mut part = vec![0f32; units * splits * stride];
    // An f16 cache with a short query batch: ggml's f16-accumulator flash
    // attention (see `attn_f16acc`).
    let f16acc = match (attn_f16acc::applies(pool, rows), pool.k(), pool.v()) {
        (true, KvStore::F16(k16), KvStore::F16(v16)) => Some((&k16[..], &v16[..])),
        _ => None,
    };
    #[cfg(target_arch = "x86_64")]
    let avx2 = if level >= SimdLevel::Avx2 {
        Avx2::new()
    } else {
        None
    };
    let task = |i: usize, buf: &mut [f32]| {
        let (unit, s) = (i / splits, i % splits);
        let (row, kvh) = (unit / p.n_kv_heads, unit % p.n_kv_heads);
        let (table, a, e) = match ranges[row] {
            Some((si, lo, hi)) => {
                let n = hi + 1 - lo;
                (
                    &b.seqs[si].block_table[..],
                    lo + n * s / splits,
                    lo + n * (s + 1) / splits,
                )
            }
            None => (&[][..], 0, 0),
        };
        let qh = &q[row * qd + kvh * group * hd..row * qd + (kvh + 1) * group * hd];
        if let Some((k16, v16)) = f16acc {
            let bs = pool.spec.block_size;
            let at = |j: usize| pool.at(layer, table[j / bs] as usize * bs + j % bs, kvh);
            attn_f16acc::attend_part_f16acc(k16, v16, &at, a..e, qh, hd, p.scale, p.softcap, buf);
            return;
        }
        let job = Part {
            pool,
            layer,
            kvh,
            table,
            keys: a..e,
            q: qh,
            p,
        };
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = avx2 {
            // SAFETY: `k` exists only when AVX2/FMA/F16C are present.
            unsafe { attend_part_avx2(k, &job, buf) };
            return;
        }
        attend_part(Portable, &job, buf);
    };
    chunks_mut(&mut part, stride, task);
    // Merge the splits of every (row, KV head).
    for unit in 0..units {
        let (row, kvh) = (unit / p.n_kv_heads, unit % p.n_kv_heads);
        let parts = &part[unit * splits * stride..(unit + 1) * splits * stride];
        for h in 0..group {
            let m = |s: usize| parts[s * stride + group * hd + h];
            let l = |s: usize| parts[s * stride + group * hd + group + h];
            let big = (0..splits).map(m).fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = (0..splits)
                .map(|s| if l(s) > 0.0 { (m(s) - big).exp() } else { 0.0 })
                .collect();
            let total: f32 = (0..splits).map(|s| weights[s] * l(s)).sum();
            if total <= 0.0 {
                continue;
            }
            let o = &mut out[row * qd + (kvh * group + h) * hd..row * qd + (kvh * group + h + 1) * hd];
            for (s, &wgt) in weights.iter().enumerate() {
                let f = wgt / total;
                if f == 0.0 {
                    continue;
                }
                let src = &parts[s * stride + h * hd..s * stride + (h + 1) * hd];
                for (oi, &si) in o.iter_mut().zip(src) {
                    *oi += f * si;
                }
            }
        }
    }
    Ok(())
}

/// One task's inputs: query heads `q` (one KV group of one row) against the
/// keys at positions `keys` of a sequence.
struct Part<'a> {
    pool: &'a CpuKvPool,
    layer: usize,
    kvh: usize,
    table: &'a [u32],
    keys: std::ops::Range<usize>,
    q: &'a [f32],
    p: &'a AttnParams,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_part_avx2(k: Avx2, job: &Part<'_>, buf: &mut [f32]) {
    attend_part(k, job, buf)
}

/// Writes into `buf` the unnormalised attention of `job`: per head the
/// weighted value sum `o` (`group * hd`), the max score `m` and the sum of
/// `exp(score - m)` `l` (m = -inf, l = 0 for an empty key range).
#[inline(always)]
fn attend_part<K: AttnKernels>(k: K, job: &Part<'_>, buf: &mut [f32]) {
    let p = job.p;
    let hd = p.head_dim;
    let g = job.q.len() / hd;
    let (o, rest) = buf.split_at_mut(g * hd);
    let (m, l) = rest.split_at_mut(g);
    o.fill(0.0);
    let n = job.keys.len();
    if n == 0 {
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        return;
    }
    let pool = job.pool;
    let bs = pool.spec.block_size;
    let at = |j: usize| {
        let slot = job.table[j / bs] as usize * bs + j % bs;
        pool.at(job.layer, slot, job.kvh)
    };
    // Keys go in blocks: K rows (widened when stored as f16/bf16) for the
    // scores, V rows for the weighted sum, which keeps each output slice in
    // registers across the block.
    let mut kbuf = vec![0f32; KEY_BLOCK * hd];
    let mut dots = vec![0f32; g];
    // scores[h * n + j]: per head contiguous, for the softmax.
    let mut scores = vec![0f32; g * n];
    for (j, pos) in job.keys.clone().enumerate() {
        let krow = pool.k.read(k, at(pos), hd, &mut kbuf[..hd]);
        k.dot_heads(job.q, krow, hd, &mut dots);
        for (h, &d) in dots.iter().enumerate() {
            scores[h * n + j] = d;
        }
    }
    for h in 0..g {
        let sc = &mut scores[h * n..(h + 1) * n];
        for v in sc.iter_mut() {
            *v *= p.scale;
        }
        if let Some(cap) = p.softcap {
            let inv = 1.0 / cap;
            for v in sc.iter_mut() {
                *v = cap * fast_tanh(*v * inv);
            }
        }
        let max = sc.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        m[h] = max;
        l[h] = exp_shift_sum(sc, max);
    }
    let mut pblk = vec![0f32; KEY_BLOCK * g];
    let keys: Vec<usize> = job.keys.clone().collect();
    for (bi, blk) in keys.chunks(KEY_BLOCK).enumerate() {
        let j0 = bi * KEY_BLOCK;
        for (jj, _) in blk.iter().enumerate() {
            for h in 0..g {
                pblk[jj * g + h] = scores[h * n + j0 + jj];
            }
        }
        let vals: Vec<&[f32]> = match &pool.v {
            KvStore::F32(v) => blk.iter().map(|&pos| &v[at(pos)..at(pos) + hd]).collect(),
            other => {
                for (jj, &pos) in blk.iter().enumerate() {
                    other.read(k, at(pos), hd, &mut kbuf[jj * hd..(jj + 1) * hd]);
                }
                kbuf[..blk.len() * hd].chunks_exact(hd).collect()
            }
        };
        k.accumulate(&pblk[..blk.len() * g], &vals, hd, o);
    }
}
