//! The `Backend` trait: the fused operations one transformer forward pass is
//! written against. CPU and CUDA implement it; the model never sees which.
//!
//! Shapes: an activation (`Act`) is a row-major f32 matrix `[rows, cols]`, one
//! row per token of the step's flattened batch. A weight matrix (`Weight`) is
//! `[out, in]` in its stored format (quantized rows stay quantized); `matmul`
//! computes `out[t] = W · x[t]` for every token row `t`.

use kestrel_formats::TensorView;

use crate::error::BackendError;
use crate::layout::{AttnParams, BatchLayout, KvSpec, RopeParams};

pub type Result<T> = std::result::Result<T, BackendError>;

/// Gated activation of the feed-forward block: `act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU: llama, qwen).
    Silu,
    /// GELU, tanh approximation (GeGLU: gemma).
    GeluTanh,
}

/// The operations of one forward pass. Every method works on the device the
/// backend owns; only `read_act` / `argmax_rows` bring data back to the host.
pub trait Backend: Send + Sync {
    /// Activation buffer: f32 `[rows, cols]`.
    type Act: Send;
    /// Weight matrix `[out, in]` in its stored dtype.
    type Weight: Send + Sync;
    /// f32 vector (norm weights, biases).
    type Vector: Send + Sync;
    /// RoPE frequency table (one per distinct RoPE configuration).
    type Rope: Send + Sync;
    /// Paged KV cache of all layers.
    type KvPool: Send;
    /// Per-step batch metadata (positions, block tables, slot mapping) on the device.
    type Batch: Send;

    /// One line naming the device and the kernel set, e.g. "cpu (avx512-vnni, 2 threads)".
    fn describe(&self) -> String;

    // ---- loading -------------------------------------------------------------

    /// Upload a 2-D weight `[out, in]` in its stored format.
    fn upload_matrix(&self, t: &TensorView<'_>) -> Result<Self::Weight>;
    /// Upload a 1-D tensor as f32, adding `offset` to every element (HF gemma
    /// stores norm weights as `w - 1`).
    fn upload_vector(&self, t: &TensorView<'_>, offset: f32) -> Result<Self::Vector>;
    fn make_rope(&self, p: &RopeParams) -> Result<Self::Rope>;
    fn alloc_kv(&self, spec: &KvSpec) -> Result<Self::KvPool>;

    // ---- buffers -------------------------------------------------------------

    fn alloc_act(&self, rows: usize, cols: usize) -> Result<Self::Act>;
    /// Copy an activation to the host (tests, logits for host-side sampling).
    fn read_act(&self, a: &Self::Act) -> Result<Vec<f32>>;
    /// Upload the step's batch metadata.
    fn prepare_batch(&self, b: &BatchLayout) -> Result<Self::Batch>;

    // ---- operations ----------------------------------------------------------

    /// `out[i] = dequant(table[tokens[i]]) * scale`; `tokens` come from `batch`.
    fn embed(&self, table: &Self::Weight, batch: &Self::Batch, scale: f32, out: &mut Self::Act)
        -> Result<()>;
    /// `out = x / rms(x) * w` per row.
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32, out: &mut Self::Act) -> Result<()>;
    /// Fused residual: `x += delta; out = rms_norm(x, w)`.
    fn add_rms_norm(
        &self,
        x: &mut Self::Act,
        delta: &Self::Act,
        w: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<()>;
    /// `out[t] = W · x[t]` for every row t of x.
    fn matmul(&self, x: &Self::Act, w: &Self::Weight, out: &mut Self::Act) -> Result<()>;
    /// `matmul` of an LM head whose output only feeds an argmax (a greedy
    /// step). A backend that can may fold the argmax into the product and
    /// skip writing the logits: it returns true, `out`'s values are then
    /// undefined and, once `argmax_ready(out)` has been called, the next
    /// `argmax_rows` / `queue_argmax` of `out` answers the folded ids.
    /// Default: a plain `matmul`, false.
    fn matmul_argmax(&self, x: &Self::Act, w: &Self::Weight, out: &mut Self::Act) -> Result<bool> {
        self.matmul(x, w, out)?;
        Ok(false)
    }
    /// Declares that the step just run (or replayed) produced `out` by a
    /// `matmul_argmax` that returned true.
    fn argmax_ready(&self, _out: &Self::Act) -> Result<()> {
        Ok(())
    }
    /// `x[t] += b` for every row.
    fn add_bias(&self, x: &mut Self::Act, b: &Self::Vector) -> Result<()>;
    /// Per-head RMSNorm (when `norm` is given) followed by RoPE at the batch's
    /// positions, in place on `x` viewed as `[rows, n_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope(
        &self,
        x: &mut Self::Act,
        n_heads: usize,
        head_dim: usize,
        norm: Option<&Self::Vector>,
        eps: f32,
        rope: &Self::Rope,
        batch: &Self::Batch,
    ) -> Result<()>;
    /// Store this step's K and V rows (`[rows, n_kv_heads*head_dim]`) of one
    /// layer into the pool at the batch's slot mapping.
    fn write_kv(
        &self,
        pool: &mut Self::KvPool,
        layer: usize,
        k: &Self::Act,
        v: &Self::Act,
        batch: &Self::Batch,
    ) -> Result<()>;
    /// Causal attention of this step's queries (`[rows, n_heads*head_dim]`)
    /// over the keys and values of their sequences, read through block
    /// tables; the step's own K/V must already be written.
    fn attention(
        &self,
        q: &Self::Act,
        pool: &Self::KvPool,
        layer: usize,
        batch: &Self::Batch,
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `out = act(gate) * up`, elementwise.
    fn gated_activation(
        &self,
        gate: &Self::Act,
        up: &Self::Act,
        act: Activation,
        out: &mut Self::Act,
    ) -> Result<()>;
    /// `out[i] = x[rows[i]]`: pick the rows that need logits.
    fn gather_rows(&self, x: &Self::Act, rows: &[u32], out: &mut Self::Act) -> Result<()>;
    /// `x = softcap * tanh(x / softcap)` (gemma2-style final logit soft-capping).
    fn softcap(&self, x: &mut Self::Act, cap: f32) -> Result<()>;

    /// Index of the largest value of every row (greedy sampling without
    /// moving logits to the host). Default: through the host.
    fn argmax_rows(&self, x: &Self::Act) -> Result<Vec<u32>> {
        let v = self.read_act(x)?;
        let rows = self.act_rows(x);
        let cols = v.len() / rows.max(1);
        Ok((0..rows)
            .map(|r| crate::layout::argmax(&v[r * cols..(r + 1) * cols]) as u32)
            .collect())
    }
    // ---- overlapped greedy steps (defaults: unsupported) --------------------

    /// Whether `queue_argmax`, `take_argmax` and `feed_argmax` work here: a
    /// greedy decode step can then be launched with the previous step's
    /// argmax as its input tokens before those reach the host, so that the
    /// host's work of one step overlaps the device's work of the next.
    fn supports_argmax_feed(&self) -> bool {
        false
    }
    /// Queues the argmax of every row of `x` and its copy to the host
    /// without waiting; returns the ticket for `take_argmax`. The ids stay
    /// on the device for `feed_argmax` until the next `queue_argmax`.
    fn queue_argmax(&self, _x: &Self::Act) -> Result<u64> {
        Err(BackendError::Unsupported("queued argmax on this backend".into()))
    }
    /// The ids of a queued argmax, one per row (waits for them).
    fn take_argmax(&self, _ticket: u64) -> Result<Vec<u32>> {
        Err(BackendError::Unsupported("queued argmax on this backend".into()))
    }
    /// `queue_argmax` for rows that draw a token: the draw of every row of
    /// `x` by `rows` (one entry per row; greedy rows take the argmax),
    /// queued without waiting; `take_argmax` answers the ticket and
    /// `feed_argmax` feeds its ids. Only where `queues_samples` says so.
    fn queue_sample(&self, _x: &Self::Act, _rows: &[crate::layout::DeviceSample]) -> Result<u64> {
        Err(BackendError::Unsupported(
            "queued sampling on this backend".into(),
        ))
    }
    /// Whether `queue_sample` takes this row (rows of `vocab` logits).
    fn queues_sample(&self, _row: &crate::layout::DeviceSample, _vocab: usize) -> bool {
        false
    }
    /// Makes the batch's first `rows` input tokens the ids of the latest
    /// queued argmax's rows, in order, where they are computed (no wait).
    fn feed_argmax(&self, _batch: &mut Self::Batch, _rows: usize) -> Result<()> {
        Err(BackendError::Unsupported("queued argmax on this backend".into()))
    }

    /// Whether `sample_rows` runs on this backend for rows of `vocab`
    /// logits (the engine then keeps logits on the device for non-greedy
    /// rows).
    fn device_sampling(&self, _vocab: usize) -> bool {
        false
    }
    /// One token per row of `x` by the sampler chain in `rows` (one entry
    /// per row), computed where the logits are; `x` is used as scratch.
    fn sample_rows(&self, _x: &Self::Act, _rows: &[crate::layout::DeviceSample]) -> Result<Vec<u32>> {
        Err(BackendError::Unsupported(
            "sampling on this backend's device".into(),
        ))
    }
    /// Whether work is queued and runs while the caller goes on (a device
    /// with its own stream): host work placed between a forward call and
    /// reading its result then overlaps the device's work.
    fn runs_async(&self) -> bool {
        false
    }
    /// Wait for queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn act_rows(&self, x: &Self::Act) -> usize;

    // ---- fused operations (defaults compose the primitives above) ----------

    /// `q = Wq·h (+bq)`, `k = Wk·h (+bk)`, `v = Wv·h (+bv)`: one launch on GPUs.
    #[allow(clippy::too_many_arguments)]
    fn qkv(
        &self,
        h: &Self::Act,
        w: [&Self::Weight; 3],
        bias: [Option<&Self::Vector>; 3],
        q: &mut Self::Act,
        k: &mut Self::Act,
        v: &mut Self::Act,
    ) -> Result<()> {
        qkv_unfused(self, h, w, bias, q, k, v)
    }

    /// q/k per-head norm + RoPE for `q` and `k`, then the K/V store of
    /// `layer` (what `qk_norm_rope` twice and `write_kv` do).
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_store(
        &self,
        qkv: QkvRows<'_, Self>,
        norms: [Option<&Self::Vector>; 2],
        eps: f32,
        rope: &Self::Rope,
        pool: &mut Self::KvPool,
        layer: usize,
        batch: &Self::Batch,
    ) -> Result<()> {
        qk_norm_rope_store_unfused(self, qkv, norms, eps, rope, pool, layer, batch)
    }

    /// The attention block's input side: `qkv` into `rows.q`, `rows.k`,
    /// `rows.v`, then `qk_norm_rope_store` on them. One call so that a
    /// backend may keep the three projections in one buffer in between
    /// (CUDA at GEMM sizes: one GEMM on stacked weights).
    #[allow(clippy::too_many_arguments)]
    fn qkv_rope_store(
        &self,
        h: &Self::Act,
        w: [&Self::Weight; 3],
        bias: [Option<&Self::Vector>; 3],
        rows: QkvRows<'_, Self>,
        norms: [Option<&Self::Vector>; 2],
        eps: f32,
        rope: &Self::Rope,
        pool: &mut Self::KvPool,
        layer: usize,
        batch: &Self::Batch,
    ) -> Result<()> {
        self.qkv(h, w, bias, rows.q, rows.k, rows.v)?;
        self.qk_norm_rope_store(rows, norms, eps, rope, pool, layer, batch)
    }

    /// Residual step: `delta' = post_norm ? rms_norm(delta, post_norm) : delta;
    /// x += delta'; out = rms_norm(x, next_norm)`. `tmp` (shape of `x`) is
    /// scratch for backends that need it.
    #[allow(clippy::too_many_arguments)]
    fn residual_norm(
        &self,
        x: &mut Self::Act,
        delta: &Self::Act,
        post_norm: Option<&Self::Vector>,
        next_norm: &Self::Vector,
        eps: f32,
        tmp: &mut Self::Act,
        out: &mut Self::Act,
    ) -> Result<()> {
        residual_norm_unfused(self, x, delta, post_norm, next_norm, eps, tmp, out)
    }

    /// `out = W_down · (act(W_gate·h) * (W_up·h))`; `gate`, `up`, `act_out`
    /// are `[rows, ffn]` scratch.
    #[allow(clippy::too_many_arguments)]
    fn gated_ffn(
        &self,
        h: &Self::Act,
        w: [&Self::Weight; 3],
        act: Activation,
        gate: &mut Self::Act,
        up: &mut Self::Act,
        act_out: &mut Self::Act,
        out: &mut Self::Act,
    ) -> Result<()> {
        self.matmul(h, w[0], gate)?;
        self.matmul(h, w[1], up)?;
        self.gated_activation(gate, up, act, act_out)?;
        self.matmul(act_out, w[2], out)
    }

    /// `delta = W · a`, then the residual step `r` on `delta` (what
    /// `matmul` + `residual_norm` do): one launch on GPUs.
    fn matmul_residual_norm(
        &self,
        a: &Self::Act,
        w: &Self::Weight,
        delta: &mut Self::Act,
        r: ResidualNorm<'_, Self>,
    ) -> Result<()> {
        matmul_residual_norm_unfused(self, a, w, delta, r)
    }

    /// `gated_ffn` into `out`, then the residual step `r` on `out`: on GPUs
    /// the activation, down projection and residual step are one launch.
    #[allow(clippy::too_many_arguments)]
    fn gated_ffn_residual_norm(
        &self,
        h: &Self::Act,
        w: [&Self::Weight; 3],
        act: Activation,
        gate: &mut Self::Act,
        up: &mut Self::Act,
        act_out: &mut Self::Act,
        out: &mut Self::Act,
        r: ResidualNorm<'_, Self>,
    ) -> Result<()> {
        self.gated_ffn(h, w, act, gate, up, act_out, out)?;
        residual_norm_unfused_into(self, out, r).map(|_| ())
    }

    /// A layer's attention block up to the output projection: the block's
    /// input (`input`, resolved by its residual step when it has one), the
    /// QKV projections into `rows`, q/k norm (epsilon `eps`) + RoPE + K/V
    /// store, attention
    /// into `out`. One call so that a backend may run the residual step
    /// inside the projection's launch and the RoPE step inside attention's
    /// (CUDA at decode sizes); the contents of `rows.q` / `rows.k` and of
    /// the input's `out` are then unspecified afterwards.
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        input: BlockInput<'_, Self>,
        w: [&Self::Weight; 3],
        bias: [Option<&Self::Vector>; 3],
        rows: QkvRows<'_, Self>,
        norms: [Option<&Self::Vector>; 2],
        eps: f32,
        rope: &Self::Rope,
        pool: &mut Self::KvPool,
        layer: usize,
        batch: &Self::Batch,
        p: &AttnParams,
        out: &mut Self::Act,
    ) -> Result<()> {
        attention_block_unfused(
            self, input, w, bias, rows, norms, eps, rope, pool, layer, batch, p, out,
        )
    }

    /// A layer's feed-forward block: its input (resolved by its residual
    /// step when it has one), then `gated_ffn` into `out`. On GPUs at decode
    /// sizes the residual step runs inside the gate/up launch (the input's
    /// `out` is then left unwritten).
    #[allow(clippy::too_many_arguments)]
    fn ffn_block(
        &self,
        input: BlockInput<'_, Self>,
        w: [&Self::Weight; 3],
        act: Activation,
        gate: &mut Self::Act,
        up: &mut Self::Act,
        act_out: &mut Self::Act,
        out: &mut Self::Act,
    ) -> Result<()> {
        let h = input.resolve(self)?;
        self.gated_ffn(h, w, act, gate, up, act_out, out)
    }

    // ---- memory -------------------------------------------------------------

    /// `(free, total)` bytes of the device's memory, for backends with a
    /// device of their own (the CPU backend uses host memory: `None`).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }

    /// Device buffers this process holds, by class (weights, weight copies,
    /// KV, workspace); `None` for backends without device memory.
    fn device_allocations(&self) -> Option<crate::memory::DeviceAllocations> {
        None
    }

    // ---- graphs (defaults: unsupported) -------------------------------------

    /// Whether `begin_capture` / `end_capture` / `replay` work here.
    fn supports_graphs(&self) -> bool {
        false
    }
    /// Pre-sizes batch metadata so that captured graphs stay valid for
    /// steps up to these sizes.
    fn reserve_batch(&self, _max_tokens: usize, _max_seqs: usize, _max_blocks_per_seq: usize) -> Result<()> {
        Ok(())
    }
    /// Starts recording the operations issued next instead of running them.
    fn begin_capture(&self) -> Result<()> {
        Err(BackendError::Unsupported("graph capture on this backend".into()))
    }
    /// Ends a capture; the graph replays the recorded operations.
    fn end_capture(&self) -> Result<Graph> {
        Err(BackendError::Unsupported("graph capture on this backend".into()))
    }
    /// Runs a captured graph on the metadata of the last `prepare_batch`.
    /// `Ok(false)`: the graph is stale (buffers it reads were reallocated)
    /// and must be captured again; nothing ran.
    fn replay(&self, _g: &Graph) -> Result<bool> {
        Err(BackendError::Unsupported("graph replay on this backend".into()))
    }
    /// Identity of a KV pool, never reused within the process (graphs are
    /// captured per pool; a new pool may get a freed one's address).
    fn pool_id(&self, _pool: &Self::KvPool) -> u64 {
        0
    }
}

/// This step's q, k and v rows, as `qk_norm_rope_store` takes them.
pub struct QkvRows<'a, B: Backend + ?Sized> {
    pub q: &'a mut B::Act,
    pub k: &'a mut B::Act,
    pub v: &'a mut B::Act,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// The residual step that follows a projection (see `residual_norm`):
/// `x += post_norm ? rms_norm(delta, post_norm) : delta; out = rms_norm(x, next_norm)`.
/// `out` must not be the projection's input.
pub struct ResidualNorm<'a, B: Backend + ?Sized> {
    pub x: &'a mut B::Act,
    pub post_norm: Option<&'a B::Vector>,
    pub next_norm: &'a B::Vector,
    pub eps: f32,
    /// Scratch of the shape of `x`, for backends that need it.
    pub tmp: &'a mut B::Act,
    pub out: &'a mut B::Act,
}

/// The input of a transformer block: a normalized activation, or the
/// residual step that produces it from the previous block's output
/// (`delta`), which a backend may fuse into the block's first launch.
pub enum BlockInput<'a, B: Backend + ?Sized> {
    Normed(&'a B::Act),
    Residual {
        delta: &'a B::Act,
        step: ResidualNorm<'a, B>,
    },
}

impl<'a, B: Backend + ?Sized> BlockInput<'a, B> {
    /// The normalized activation, running the residual step if there is one.
    pub fn resolve(self, be: &B) -> Result<&'a B::Act> {
        match self {
            BlockInput::Normed(h) => Ok(h),
            BlockInput::Residual { delta, step } => residual_norm_unfused_into(be, delta, step),
        }
    }
}

/// `attention_block` from the backend's own operations.
#[allow(clippy::too_many_arguments)]
pub fn attention_block_unfused<B: Backend + ?Sized>(
    be: &B,
    input: BlockInput<'_, B>,
    w: [&B::Weight; 3],
    bias: [Option<&B::Vector>; 3],
    rows: QkvRows<'_, B>,
    norms: [Option<&B::Vector>; 2],
    eps: f32,
    rope: &B::Rope,
    pool: &mut B::KvPool,
    layer: usize,
    batch: &B::Batch,
    p: &AttnParams,
    out: &mut B::Act,
) -> Result<()> {
    let h = input.resolve(be)?;
    let QkvRows {
        q,
        k,
        v,
        n_heads,
        n_kv_heads,
        head_dim,
    } = rows;
    let r = QkvRows {
        q: &mut *q,
        k,
        v,
        n_heads,
        n_kv_heads,
        head_dim,
    };
    be.qkv_rope_store(h, w, bias, r, norms, eps, rope, pool, layer, batch)?;
    be.attention(q, pool, layer, batch, p, out)
}

/// A captured sequence of operations (backend-specific inside).
pub struct Graph {
    pub inner: Box<dyn std::any::Any + Send>,
}

/// `qkv` from primitives (the default, and reference kernel sets).
#[allow(clippy::too_many_arguments)]
pub fn qkv_unfused<B: Backend + ?Sized>(
    be: &B,
    h: &B::Act,
    w: [&B::Weight; 3],
    bias: [Option<&B::Vector>; 3],
    q: &mut B::Act,
    k: &mut B::Act,
    v: &mut B::Act,
) -> Result<()> {
    be.matmul(h, w[0], q)?;
    be.matmul(h, w[1], k)?;
    be.matmul(h, w[2], v)?;
    if let (Some(bq), Some(bk), Some(bv)) = (bias[0], bias[1], bias[2]) {
        be.add_bias(q, bq)?;
        be.add_bias(k, bk)?;
        be.add_bias(v, bv)?;
    }
    Ok(())
}

/// `qk_norm_rope_store` from primitives.
#[allow(clippy::too_many_arguments)]
pub fn qk_norm_rope_store_unfused<B: Backend + ?Sized>(
    be: &B,
    r: QkvRows<'_, B>,
    norms: [Option<&B::Vector>; 2],
    eps: f32,
    rope: &B::Rope,
    pool: &mut B::KvPool,
    layer: usize,
    batch: &B::Batch,
) -> Result<()> {
    be.qk_norm_rope(r.q, r.n_heads, r.head_dim, norms[0], eps, rope, batch)?;
    be.qk_norm_rope(r.k, r.n_kv_heads, r.head_dim, norms[1], eps, rope, batch)?;
    be.write_kv(pool, layer, r.k, r.v, batch)
}

/// `residual_norm` from primitives.
#[allow(clippy::too_many_arguments)]
pub fn residual_norm_unfused<B: Backend + ?Sized>(
    be: &B,
    x: &mut B::Act,
    delta: &B::Act,
    post_norm: Option<&B::Vector>,
    next_norm: &B::Vector,
    eps: f32,
    tmp: &mut B::Act,
    out: &mut B::Act,
) -> Result<()> {
    match post_norm {
        Some(pn) => {
            be.rms_norm(delta, pn, eps, tmp)?;
            be.add_rms_norm(x, tmp, next_norm, eps, out)
        }
        None => be.add_rms_norm(x, delta, next_norm, eps, out),
    }
}

/// `residual_norm` (the backend's own, fused or not) of `r` on `delta`;
/// returns the normalized output `r.out`.
pub fn residual_norm_unfused_into<'a, B: Backend + ?Sized>(
    be: &B,
    delta: &B::Act,
    r: ResidualNorm<'a, B>,
) -> Result<&'a B::Act> {
    be.residual_norm(r.x, delta, r.post_norm, r.next_norm, r.eps, r.tmp, r.out)?;
    Ok(r.out)
}

/// `matmul_residual_norm` as `matmul` then `residual_norm`.
pub fn matmul_residual_norm_unfused<B: Backend + ?Sized>(
    be: &B,
    a: &B::Act,
    w: &B::Weight,
    delta: &mut B::Act,
    r: ResidualNorm<'_, B>,
) -> Result<()> {
    be.matmul(a, w, delta)?;
    residual_norm_unfused_into(be, delta, r).map(|_| ())
}
