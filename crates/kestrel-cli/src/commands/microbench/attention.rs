//! The attention block's ops: RoPE (with or without the q/k norm), the
//! fused norm + RoPE + KV store, and paged decode attention.

use anyhow::Result;
use kestrel_backend::backend::qk_norm_rope_store_unfused;
use kestrel_backend::{AttnParams, Backend, QkvRows};

use super::inputs::Inputs;
use super::measure::{Impl, Prepared};
use super::spec::{Case, ATTN_SCALE, EPS, HEAD_DIM, KV_DIM, N_HEADS, N_KV_HEADS, Q_DIM};
use super::upload;

fn params() -> AttnParams {
    AttnParams {
        n_heads: N_HEADS,
        n_kv_heads: N_KV_HEADS,
        head_dim: HEAD_DIM,
        scale: ATTN_SCALE,
        window: None,
        softcap: None,
    }
}

/// Positions of the decode rows of the RoPE cases: spread out, so that
/// rows rotate by different angles, and short, so that filling the cache
/// below them stays cheap.
fn rope_ctxs(rows: usize) -> Vec<usize> {
    (0..rows).map(|i| 8 + 29 * i).collect()
}

/// `qk_norm_rope` on q, with (`qk_norm_rope`) or without (`rope`) the per-head norm.
pub struct Rope<B: Backend> {
    q: B::Act,
    norm: Option<B::Vector>,
    rope: B::Rope,
    batch: B::Batch,
}

impl<B: Backend> Rope<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs, with_norm: bool) -> Result<Self> {
        let r = c.rows;
        let q = upload::act(be, r, Q_DIM, &inp.act(0, r * Q_DIM, 2.0))?;
        let norm = match with_norm {
            true => Some(upload::vector(be, "q_norm", &inp.norm_weight(1, HEAD_DIM))?),
            false => None,
        };
        let rope = upload::rope(be)?;
        let batch = be.prepare_batch(&upload::decode_layout(&rope_ctxs(r)))?;
        Ok(Rope { q, norm, rope, batch })
    }
}

impl<B: Backend> Prepared<B> for Rope<B> {
    fn run(&mut self, be: &B, _imp: Impl) -> Result<()> {
        let s = self;
        Ok(be.qk_norm_rope(
            &mut s.q,
            N_HEADS,
            HEAD_DIM,
            s.norm.as_ref(),
            EPS,
            &s.rope,
            &s.batch,
        )?)
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        Ok(be.read_act(&self.q)?)
    }
}

/// q/k norm + RoPE + store of K and V into the paged cache: two
/// `qk_norm_rope` and a `write_kv` against `Backend::qk_norm_rope_store`.
pub struct QkNormRopeStore<B: Backend> {
    q: B::Act,
    k: B::Act,
    v: B::Act,
    norms: [B::Vector; 2],
    rope: B::Rope,
    pool: B::KvPool,
    batch: B::Batch,
    out: B::Act,
}

impl<B: Backend> QkNormRopeStore<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs) -> Result<Self> {
        let r = c.rows;
        let ctxs = rope_ctxs(r);
        let n: usize = ctxs.iter().sum();
        // Every slot attention reads later is written: earlier tokens by
        // the fill, the step's own by the op.
        let pool = upload::filled_pool(
            be,
            &ctxs,
            c.kv,
            &inp.act(10, n * KV_DIM, 2.0),
            &inp.act(11, n * KV_DIM, 2.0),
        )?;
        let q = upload::act(be, r, Q_DIM, &inp.act(0, r * Q_DIM, 2.0))?;
        let k = upload::act(be, r, KV_DIM, &inp.act(1, r * KV_DIM, 2.0))?;
        let v = upload::act(be, r, KV_DIM, &inp.act(2, r * KV_DIM, 2.0))?;
        let norms = [
            upload::vector(be, "q_norm", &inp.norm_weight(3, HEAD_DIM))?,
            upload::vector(be, "k_norm", &inp.norm_weight(4, HEAD_DIM))?,
        ];
        let rope = upload::rope(be)?;
        let batch = be.prepare_batch(&upload::decode_layout(&ctxs))?;
        Ok(QkNormRopeStore {
            q,
            k,
            v,
            norms,
            rope,
            pool,
            batch,
            out: be.alloc_act(r, Q_DIM)?,
        })
    }
}

impl<B: Backend> Prepared<B> for QkNormRopeStore<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        let s = self;
        let rows = QkvRows {
            q: &mut s.q,
            k: &mut s.k,
            v: &mut s.v,
            n_heads: N_HEADS,
            n_kv_heads: N_KV_HEADS,
            head_dim: HEAD_DIM,
        };
        let norms = [Some(&s.norms[0]), Some(&s.norms[1])];
        match imp {
            Impl::Reference => {
                qk_norm_rope_store_unfused(be, rows, norms, EPS, &s.rope, &mut s.pool, 0, &s.batch)?
            }
            Impl::Fused => be.qk_norm_rope_store(rows, norms, EPS, &s.rope, &mut s.pool, 0, &s.batch)?,
        }
        Ok(())
    }

    /// q and k as rotated, and attention of q over the cache: it reads the
    /// stored K and V of this step, so a wrong store shows up here.
    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        be.attention(&self.q, &self.pool, 0, &self.batch, &params(), &mut self.out)?;
        let mut v = be.read_act(&self.q)?;
        v.extend(be.read_act(&self.k)?);
        v.extend(be.read_act(&self.out)?);
        Ok(v)
    }
}

/// Decode attention: `rows` sequences, one query token each, over `ctx`
/// cached tokens each (all layers global, as gemma's full-attention layers).
/// With several `copies` of the cache, each run reads the next one (see
/// `measure::Rotating`); all hold the same keys and values.
pub struct Attention<B: Backend> {
    q: B::Act,
    pools: Vec<B::KvPool>,
    next: usize,
    batch: B::Batch,
    out: B::Act,
}

impl<B: Backend> Attention<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs, copies: usize) -> Result<Self> {
        let r = c.rows;
        let ctxs = vec![c.ctx.unwrap_or(1).max(1); r];
        let n: usize = ctxs.iter().sum();
        let (k, v) = (inp.act(10, n * KV_DIM, 2.0), inp.act(11, n * KV_DIM, 2.0));
        let pools = (0..copies.max(1))
            .map(|_| upload::filled_pool(be, &ctxs, c.kv, &k, &v))
            .collect::<Result<Vec<_>>>()?;
        let q = upload::act(be, r, Q_DIM, &inp.act(0, r * Q_DIM, 2.0))?;
        let batch = be.prepare_batch(&upload::decode_layout(&ctxs))?;
        Ok(Attention {
            q,
            pools,
            next: 0,
            batch,
            out: be.alloc_act(r, Q_DIM)?,
        })
    }
}

impl<B: Backend> Prepared<B> for Attention<B> {
    fn run(&mut self, be: &B, _imp: Impl) -> Result<()> {
        let i = self.next;
        self.next = (i + 1) % self.pools.len();
        Ok(be.attention(&self.q, &self.pools[i], 0, &self.batch, &params(), &mut self.out)?)
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        Ok(be.read_act(&self.out)?)
    }
}
