//! The CPU backend: quantized matmuls with integer SIMD dot products
//! (AVX-512 VNNI, AVX2 or portable, chosen at run time), paged attention and
//! the element-wise ops, parallelised over rayon's global pool.
//!
//! Layout of the module:
//! * `features`: SIMD level detection, thread count;
//! * `storage`, `repack`: weights are copied at upload (see `storage` for
//!   why) into aligned memory, Q4_0/Q5_0/Q8_0 rows into the SIMD-friendly
//!   "x8" layout; nothing is dequantized;
//! * `act_quant`: activations quantized to 8 bits per matmul, as llama.cpp
//!   does (Q8_0-like blocks of 32, Q8_K-like blocks of 256);
//! * `quant_dot`: integer dot-product kernels per (type, level) and their
//!   dispatch; `matmul`: the row/tile split of a matmul over threads;
//! * `attention`, `attn_kernels`: paged KV pool and causal attention;
//!   `attn_f16acc`: with an f16 cache and a short query batch, attention
//!   with ggml's f16 value accumulator (llama.cpp's default numerics);
//! * `ops`: norms, RoPE, activations; `parallel`: the fork-join helper.
//!
//! Environment:
//! * `KESTREL_CPU_KERNELS=scalar|avx2|avx512` forces a kernel set (default:
//!   the best this CPU supports);
//! * `KESTREL_THREADS=N` sets the global rayon pool's size (default: the
//!   number of physical cores). The pool is process-wide: if something
//!   built it before the backend, its size stands and `describe()` says so;
//! * `KESTREL_CPU_X8=0` keeps Q4_0/Q5_0/Q8_0 weights in GGML's layout
//!   (slower; for comparing kernels).

pub mod act_quant;
pub mod attention;
pub mod attn_f16acc;
pub mod attn_kernels;
pub mod features;
pub mod matmul;
pub mod ops;
pub mod parallel;
pub mod quant_dot;
pub mod repack;
pub mod storage;

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use kestrel_formats::{DType, TensorView};

pub use attention::CpuKvPool;
pub use features::SimdLevel;
pub use matmul::{bench_matvec, CpuWeight};

use crate::backend::{Activation, Backend, Result};
use crate::error::BackendError;
use crate::layout::{AttnParams, BatchLayout, KvSpec, RopeParams, RopeStyle};

/// A row-major f32 matrix in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl CpuAct {
    /// Wraps `data` (`rows * cols` values) as an activation.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuAct> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(BackendError::Other(format!(
                "activation of {rows} x {cols} needs {} values, got {}",
                rows.saturating_mul(cols),
                data.len()
            )));
        }
        Ok(CpuAct { rows, cols, data })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// An f32 vector (norm weights, biases).
#[derive(Clone, Debug)]
pub struct CpuVector {
    name: String,
    data: Vec<f32>,
}

impl CpuVector {
    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

/// A RoPE configuration.
#[derive(Clone, Debug)]
pub struct CpuRope {
    style: RopeStyle,
    inv_freq: Vec<f32>,
    mscale: f32,
}

/// A step's batch metadata (kept on the host as given, validated).
#[derive(Clone, Debug)]
pub struct CpuBatch {
    layout: BatchLayout,
}

/// The CPU backend. Cheap to create; holds only its configuration.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    level: SimdLevel,
    threads: usize,
    /// Queued argmax results (`queue_argmax`): computed at once here, kept
    /// for `take_argmax` and `feed_argmax` so that the engine's overlapped
    /// steps run (and are tested) on the CPU too.
    queued: Arc<Mutex<QueuedArgmax>>,
    /// Matrices dequantized to f32 at upload (`with_f32_weights`).
    f32_weights: bool,
}

/// The latest queued argmax results by ticket (the two newest are kept, as
/// on CUDA).
#[derive(Debug, Default)]
struct QueuedArgmax {
    next: u64,
    results: std::collections::VecDeque<(u64, Vec<u32>)>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new()
    }
}

impl CpuBackend {
    fn queued_argmax(&self) -> Result<std::sync::MutexGuard<'_, QueuedArgmax>> {
        self.queued
            .lock()
            .map_err(|_| BackendError::Other("queued argmax state poisoned".into()))
    }

    /// Backend with the kernel set and thread count from the environment
    /// (see the module docs). Invalid environment values are reported with
    /// a warning and replaced by the defaults.
    pub fn new() -> CpuBackend {
        let level = match SimdLevel::from_env() {
            Ok(Some(l)) => l,
            Ok(None) => SimdLevel::best(),
            Err(e) => {
                tracing::warn!("{e}; using the best available kernels");
                SimdLevel::best()
            }
        };
        let threads = match features::threads_from_env() {
            Ok(Some(n)) => n,
            Ok(None) => features::physical_cores(),
            Err(e) => {
                tracing::warn!("{e}; using one thread per physical core");
                features::physical_cores()
            }
        };
        init_pool(threads);
        CpuBackend {
            level,
            threads: rayon::current_num_threads(),
            queued: Arc::default(),
            f32_weights: false,
        }
    }

    /// Backend with an explicit kernel set (tests, benchmarks). Errors when
    /// the CPU lacks the level's features.
    pub fn with_level(level: SimdLevel) -> Result<CpuBackend> {
        if !level.available() {
            return Err(BackendError::Unsupported(format!(
                "this CPU lacks the features of the '{}' kernels",
                level.name()
            )));
        }
        let mut b = CpuBackend::new();
        b.level = level;
        Ok(b)
    }

    /// This backend with every matrix dequantized to f32 when uploaded, so
    /// that matmuls take f32 activations instead of llama.cpp's 8-bit ones:
    /// the exact f32 arithmetic of the stored weights, an oracle for
    /// backends that keep activations in floating point (CUDA). About four
    /// times the memory of a 4-bit model and slower; for tests and checks.
    pub fn with_f32_weights(mut self) -> CpuBackend {
        self.f32_weights = true;
        self
    }

    pub fn level(&self) -> SimdLevel {
        self.level
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Uploads host data as an activation (tests, and models that build
    /// inputs on the host).
    pub fn act_from_vec(&self, rows: usize, cols: usize, data: Vec<f32>) -> Result<CpuAct> {
        CpuAct::from_vec(rows, cols, data)
    }
}

/// Sizes rayon's global pool once per process.
fn init_pool(threads: usize) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kestrel-cpu-{i}"))
            .build_global()
        {
            tracing::warn!(
                "rayon's global pool was already set up ({e}); it keeps {} threads",
                rayon::current_num_threads()
            );
        }
    });
}

fn shape_err(op: &str, what: &str, want: String, got: String) -> BackendError {
    BackendError::Other(format!("{op}: {what} must be {want}, got {got}"))
}

fn check_shape(op: &str, what: &str, a: &CpuAct, rows: usize, cols: usize) -> Result<()> {
    if a.rows != rows || a.cols != cols {
        return Err(shape_err(
            op,
            what,
            format!("{rows} x {cols}"),
            format!("{} x {}", a.rows, a.cols),
        ));
    }
    Ok(())
}

fn check_len(op: &str, what: &str, len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(shape_err(op, what, format!("{want} long"), len.to_string()));
    }
    Ok(())
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Weight = CpuWeight;
    type Vector = CpuVector;
    type Rope = CpuRope;
    type KvPool = CpuKvPool;
    type Batch = CpuBatch;

    fn describe(&self) -> String {
        format!(
            "cpu ({}, {} thread{}{})",
            self.level.name(),
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            if self.f32_weights { ", f32 weights" } else { "" }
        )
    }

    fn upload_matrix(&self, t: &TensorView<'_>) -> Result<CpuWeight> {
        if self.f32_weights && t.dtype != DType::F32 {
            let values = t.to_f32().map_err(|e| BackendError::Tensor {
                name: t.name.to_string(),
                problem: e.to_string(),
            })?;
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let view = TensorView {
                name: t.name,
                dtype: DType::F32,
                shape: t.shape,
                data: &bytes,
            };
            return CpuWeight::from_view(&view, false);
        }
        CpuWeight::from_view(t, quant_dot::uses_x8(self.level, t.dtype))
    }

    fn upload_vector(&self, t: &TensorView<'_>, offset: f32) -> Result<CpuVector> {
        let rows = t.rows();
        if t.shape.len() != 1 && rows != 1 {
            return Err(BackendError::Tensor {
                name: t.name.to_string(),
                problem: format!("expected a 1-D vector, got shape {:?}", t.shape),
            });
        }
        let mut data = t.to_f32().map_err(|e| BackendError::Tensor {
            name: t.name.to_string(),
            problem: e.to_string(),
        })?;
        if offset != 0.0 {
            for v in data.iter_mut() {
                *v += offset;
            }
        }
        Ok(CpuVector {
            name: t.name.to_string(),
            data,
        })
    }

    fn make_rope(&self, p: &RopeParams) -> Result<CpuRope> {
        if p.inv_freq.iter().any(|f| !f.is_finite()) || !p.mscale.is_finite() {
            return Err(BackendError::Other(
                "make_rope: inv_freq and mscale must be finite".into(),
            ));
        }
        Ok(CpuRope {
            style: p.style,
            inv_freq: p.inv_freq.clone(),
            mscale: p.mscale,
        })
    }

    fn alloc_kv(&self, spec: &KvSpec) -> Result<CpuKvPool> {
        CpuKvPool::new(spec)
    }

    fn alloc_act(&self, rows: usize, cols: usize) -> Result<CpuAct> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| BackendError::OutOfMemory(format!("activation of {rows} x {cols} overflows")))?;
        CpuAct::from_vec(rows, cols, vec![0.0; n])
    }

    fn read_act(&self, a: &CpuAct) -> Result<Vec<f32>> {
        Ok(a.data.clone())
    }

    fn prepare_batch(&self, b: &BatchLayout) -> Result<CpuBatch> {
        let n = b.tokens.len();
        let err = |m: String| Err(BackendError::Other(format!("prepare_batch: {m}")));
        if b.positions.len() != n || b.slot_mapping.len() != n {
            return err(format!(
                "{n} tokens but {} positions and {} slots",
                b.positions.len(),
                b.slot_mapping.len()
            ));
        }
        if b.block_size == 0 {
            return err("block_size is 0".into());
        }
        let mut covered = vec![false; n];
        for (si, s) in b.seqs.iter().enumerate() {
            let (q0, ql) = (s.query_start as usize, s.query_len as usize);
            if q0 + ql > n {
                return err(format!(
                    "sequence {si}: rows {q0}..{} exceed the {n} tokens",
                    q0 + ql
                ));
            }
            if covered[q0..q0 + ql].iter().any(|&c| c) {
                return err(format!(
                    "sequence {si}: rows {q0}..{} overlap another sequence",
                    q0 + ql
                ));
            }
            covered[q0..q0 + ql].fill(true);
        }
        Ok(CpuBatch { layout: b.clone() })
    }

    fn embed(&self, table: &CpuWeight, batch: &CpuBatch, scale: f32, out: &mut CpuAct) -> Result<()> {
        let toks = &batch.layout.tokens;
        check_shape("embed", "out", out, toks.len(), table.cols)?;
        if let Some((i, &t)) = toks.iter().enumerate().find(|(_, &t)| t as usize >= table.rows) {
            return Err(BackendError::Other(format!(
                "embed: token {t} (row {i}) out of range: '{}' has {} rows",
                table.name, table.rows
            )));
        }
        for (&t, o) in toks.iter().zip(out.data.chunks_mut(table.cols.max(1))) {
            matmul::dequantize_row(table, t as usize, o)?;
            if scale != 1.0 {
                for v in o.iter_mut() {
                    *v *= scale;
                }
            }
        }
        Ok(())
    }

    fn rms_norm(&self, x: &CpuAct, w: &CpuVector, eps: f32, out: &mut CpuAct) -> Result<()> {
        check_len("rms_norm", &format!("weight '{}'", w.name), w.data.len(), x.cols)?;
        check_shape("rms_norm", "out", out, x.rows, x.cols)?;
        let (xd, wd, cols) = (&x.data, &w.data, x.cols);
        ops::for_rows(&mut out.data, cols, |r, o| {
            ops::rms_norm_row(&xd[r * cols..(r + 1) * cols], wd, eps, o)
        });
        Ok(())
    }

    fn add_rms_norm(
        &self,
        x: &mut CpuAct,
        delta: &CpuAct,
        w: &CpuVector,
        eps: f32,
        out: &mut CpuAct,
    ) -> Result<()> {
        check_shape("add_rms_norm", "delta", delta, x.rows, x.cols)?;
        check_len(
            "add_rms_norm",
            &format!("weight '{}'", w.name),
            w.data.len(),
            x.cols,
        )?;
        check_shape("add_rms_norm", "out", out, x.rows, x.cols)?;
        for (a, &b) in x.data.iter_mut().zip(&delta.data) {
            *a += b;
        }
        self.rms_norm(x, w, eps, out)
    }

    fn add(&self, x: &mut CpuAct, y: &CpuAct) -> Result<()> {
        check_shape("add", "y", y, x.rows, x.cols)?;
        for (a, &b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn matmul(&self, x: &CpuAct, w: &CpuWeight, out: &mut CpuAct) -> Result<()> {
        if x.cols != w.cols {
            return Err(BackendError::Other(format!(
                "matmul: x has {} columns but weight '{}' is [{}, {}]",
                x.cols, w.name, w.rows, w.cols
            )));
        }
        check_shape("matmul", "out", out, x.rows, w.rows)?;
        if x.rows == 0 || w.rows == 0 {
            return Ok(());
        }
        matmul::matmul(self.level, &x.data, x.rows, w, &mut out.data);
        Ok(())
    }

    fn add_bias(&self, x: &mut CpuAct, b: &CpuVector) -> Result<()> {
        check_len("add_bias", &format!("bias '{}'", b.name), b.data.len(), x.cols)?;
        for row in x.data.chunks_mut(x.cols.max(1)) {
            for (a, &bi) in row.iter_mut().zip(&b.data) {
                *a += bi;
            }
        }
        Ok(())
    }

    fn qk_norm_rope(
        &self,
        x: &mut CpuAct,
        n_heads: usize,
        head_dim: usize,
        norm: Option<&CpuVector>,
        eps: f32,
        rope: &CpuRope,
        batch: &CpuBatch,
    ) -> Result<()> {
        let op = "qk_norm_rope";
        if n_heads * head_dim != x.cols {
            return Err(shape_err(
                op,
                "x columns",
                format!("n_heads * head_dim = {}", n_heads * head_dim),
                x.cols.to_string(),
            ));
        }
        check_len(op, "batch positions", batch.layout.positions.len(), x.rows)?;
        if let Some(w) = norm {
            check_len(op, &format!("norm weight '{}'", w.name), w.data.len(), head_dim)?;
        }
        if 2 * rope.inv_freq.len() > head_dim {
            return Err(shape_err(
                op,
                "2 * rope inv_freq length",
                format!("at most head_dim = {head_dim}"),
                (2 * rope.inv_freq.len()).to_string(),
            ));
        }
        let pos = &batch.layout.positions;
        ops::for_rows(&mut x.data, x.cols, |r, row| {
            for head in row.chunks_mut(head_dim.max(1)) {
                if let Some(w) = norm {
                    ops::rms_norm_inplace(head, &w.data, eps);
                }
                ops::rope_head(head, rope.style, &rope.inv_freq, rope.mscale, pos[r]);
            }
        });
        Ok(())
    }

    fn write_kv(
        &self,
        pool: &mut CpuKvPool,
        layer: usize,
        k: &CpuAct,
        v: &CpuAct,
        batch: &CpuBatch,
    ) -> Result<()> {
        let kd = pool.spec.n_kv_heads * pool.spec.head_dim;
        let n = batch.layout.slot_mapping.len();
        check_shape("write_kv", "k", k, n, kd)?;
        check_shape("write_kv", "v", v, n, kd)?;
        pool.write(layer, &k.data, &v.data, &batch.layout)
    }

    fn attention(
        &self,
        q: &CpuAct,
        pool: &CpuKvPool,
        layer: usize,
        batch: &CpuBatch,
        p: &AttnParams,
        out: &mut CpuAct,
    ) -> Result<()> {
        check_shape("attention", "q", q, q.rows, p.n_heads * p.head_dim)?;
        check_shape("attention", "out", out, q.rows, p.n_heads * p.head_dim)?;
        attention::attention(self.level, &q.data, pool, layer, &batch.layout, p, &mut out.data)
    }

    fn gated_activation(&self, gate: &CpuAct, up: &CpuAct, act: Activation, out: &mut CpuAct) -> Result<()> {
        check_shape("gated_activation", "up", up, gate.rows, gate.cols)?;
        check_shape("gated_activation", "out", out, gate.rows, gate.cols)?;
        let level = self.level;
        let cols = gate.cols;
        let (g, u) = (&gate.data, &up.data);
        ops::for_rows(&mut out.data, cols, |r, o| {
            let (gr, ur) = (&g[r * cols..(r + 1) * cols], &u[r * cols..(r + 1) * cols]);
            match act {
                Activation::Silu => ops::swiglu(level, gr, ur, o),
                Activation::GeluTanh => ops::geglu(level, gr, ur, o),
            }
        });
        Ok(())
    }

    fn gather_rows(&self, x: &CpuAct, rows: &[u32], out: &mut CpuAct) -> Result<()> {
        check_shape("gather_rows", "out", out, rows.len(), x.cols)?;
        for (i, (&r, o)) in rows.iter().zip(out.data.chunks_mut(x.cols.max(1))).enumerate() {
            let r = r as usize;
            if r >= x.rows {
                return Err(BackendError::Other(format!(
                    "gather_rows: rows[{i}] = {r} out of range (x has {} rows)",
                    x.rows
                )));
            }
            o.copy_from_slice(&x.data[r * x.cols..(r + 1) * x.cols]);
        }
        Ok(())
    }

    fn softcap(&self, x: &mut CpuAct, cap: f32) -> Result<()> {
        if !(cap.is_finite() && cap > 0.0) {
            return Err(BackendError::Other(format!(
                "softcap: cap must be a positive number, got {cap}"
            )));
        }
        let level = self.level;
        ops::for_rows(&mut x.data, x.cols, |_, row| ops::softcap(level, row, cap));
        Ok(())
    }

    fn argmax_rows(&self, x: &CpuAct) -> Result<Vec<u32>> {
        Ok(x.data
            .chunks(x.cols.max(1))
            .take(x.rows)
            .map(|r| crate::layout::argmax(r) as u32)
            .collect())
    }

    fn supports_argmax_feed(&self) -> bool {
        true
    }

    fn queue_argmax(&self, x: &CpuAct) -> Result<u64> {
        let ids = self.argmax_rows(x)?;
        let mut q = self.queued_argmax()?;
        let ticket = q.next;
        q.next += 1;
        q.results.push_back((ticket, ids));
        while q.results.len() > 2 {
            q.results.pop_front();
        }
        Ok(ticket)
    }

    fn take_argmax(&self, ticket: u64) -> Result<Vec<u32>> {
        let q = self.queued_argmax()?;
        q.results
            .iter()
            .find(|(t, _)| *t == ticket)
            .map(|(_, ids)| ids.clone())
            .ok_or_else(|| {
                BackendError::Other(format!("argmax ticket {ticket} is gone (two newer were queued)"))
            })
    }

    fn feed_argmax(&self, batch: &mut CpuBatch, rows: usize) -> Result<()> {
        let q = self.queued_argmax()?;
        let Some((_, ids)) = q.results.back() else {
            return Err(BackendError::Other("feed_argmax before any queued argmax".into()));
        };
        if rows > ids.len() || rows > batch.layout.tokens.len() {
            return Err(BackendError::Other(format!(
                "feed_argmax: {rows} rows, but the argmax has {} and the batch {}",
                ids.len(),
                batch.layout.tokens.len()
            )));
        }
        batch.layout.tokens[..rows].copy_from_slice(&ids[..rows]);
        Ok(())
    }

    fn act_rows(&self, x: &CpuAct) -> usize {
        x.rows
    }
}
