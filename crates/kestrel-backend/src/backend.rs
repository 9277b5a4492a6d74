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
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32, out: &mut Self::Act)
        -> Result<()>;
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
    fn act_rows(&self, x: &Self::Act) -> usize;

    /// Wait for queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
