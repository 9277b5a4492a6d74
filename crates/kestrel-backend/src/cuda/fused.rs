//! Fused operations of the decode path: several GEMVs in one launch (QKV,
//! gate + up), q/k norm + RoPE + KV store in one kernel, the residual step
//! (post-norm, add, next norm) in one kernel, and GEMVs that form their own
//! activation (the residual step, or act(gate) * up) in every block instead
//! of a launch before them (`gemv_prologue`). The reference kernel set
//! composes the plain kernels instead (see `backend.rs`).

use super::buffers::{CudaAct, CudaBatch, CudaKvPool, CudaRope, CudaVector, CudaWeight};
use super::launch::{i32_of, Arg};
use super::matmul::{gemv_cap, gemv_kernel, GEMV_MAX_ROWS};
use super::{shape_err, CudaBackend};
use crate::backend::Activation;
use crate::error::BackendError;

type Result<T> = std::result::Result<T, BackendError>;

/// Family code of `gemv_any` in gemv.cu, for a GEMV kernel family name.
pub(crate) fn gemv_kind(family: &str) -> Option<i32> {
    GEMV_FAMILIES.iter().position(|&f| f == family).map(|i| i as i32)
}

/// The GEMV kernel families, in the order of their `gemv_any` codes.
pub(crate) const GEMV_FAMILIES: [&str; 12] = [
    "gemv_f32",
    "gemv_f16",
    "gemv_bf16",
    "gemv_q8_0",
    "gemv_q8_0r4",
    "gemv_q4_0",
    "gemv_q5_0",
    "gemv_q4_0r2",
    "gemv_q5_0r2",
    "gemv_q4_k",
    "gemv_q5_k",
    "gemv_q6_k",
];

/// How a `gemvp` launch forms its activation rows (see gemv.cu).
pub(crate) enum Prologue<'a> {
    /// `act(gate) * up` (what `gated_activation` computes).
    Gated {
        gate: &'a CudaAct,
        up: &'a CudaAct,
        act: Activation,
    },
    /// The residual step of `residual_norm`: `res += post ? rms_norm(delta)
    /// * post : delta`, activation `rms_norm(res) * norm`.
    Residual {
        res: &'a mut CudaAct,
        delta: &'a CudaAct,
        post: Option<&'a CudaVector>,
        norm: &'a CudaVector,
        eps: f32,
    },
}

impl<'a> Prologue<'a> {
    /// The residual step `step` on `delta`, run inside the launch.
    pub(crate) fn residual(delta: &'a CudaAct, step: crate::backend::ResidualNorm<'a, CudaBackend>) -> Self {
        Prologue::Residual {
            res: step.x,
            delta,
            post: step.post_norm,
            norm: step.next_norm,
            eps: step.eps,
        }
    }
}

/// Most activation rows of a `gemvp` launch (its kernels exist for 1, 2, 4).
pub(crate) const PROLOGUE_MAX_ROWS: usize = 4;
/// Shared memory a `gemvp` launch may use without opting in (48 KiB).
const PROLOGUE_SMEM: usize = 48 << 10;

impl CudaBackend {
    /// Whether `gemv_prologue` takes `t` activation rows of `cols` columns
    /// by the weights `ws` (with the residual step when `residual`): the
    /// fused set at GEMV sizes, the fusion switched on, and the rows fit in
    /// shared memory. Off while captures record a decode megakernel, which
    /// runs the unfused sequence.
    pub(crate) fn prologue_takes(&self, t: usize, cols: usize, ws: &[&CudaWeight], residual: bool) -> bool {
        let copies = if residual { 2 } else { 1 };
        self.kernels == super::KernelSet::Fused
            && self.fusion_on(if residual {
                super::FUSE_RESIDUAL
            } else {
                super::FUSE_GATED
            })
            && !self.mega.load(std::sync::atomic::Ordering::Relaxed)
            && (1..=PROLOGUE_MAX_ROWS).contains(&t)
            && cols.is_multiple_of(4)
            && copies * t * cols * 4 <= PROLOGUE_SMEM
            && ws.iter().all(|w| w.cols == cols)
            && self.multi_gemv_fits(t, ws)
    }

    /// `outs[i] = W_i · x` for up to three weights, where every block forms
    /// x itself by `p` (see `Prologue`); one launch.
    pub(crate) fn gemv_prologue(
        &self,
        p: Prologue<'_>,
        ws: &[&CudaWeight],
        outs: &mut [&mut CudaAct],
    ) -> Result<()> {
        let (t, cols) = match &p {
            Prologue::Gated { gate, up, .. } => {
                super::same_shape("gemvp (gate, up)", gate, up)?;
                (gate.rows, gate.cols)
            }
            Prologue::Residual {
                res,
                delta,
                post,
                norm,
                ..
            } => {
                super::same_shape("gemvp (residual, delta)", res, delta)?;
                if norm.len != res.cols || post.is_some_and(|w| w.len != res.cols) {
                    return Err(shape_err(
                        "gemvp",
                        format!("norm weights do not have {} elements", res.cols),
                    ));
                }
                (res.rows, res.cols)
            }
        };
        let residual = matches!(p, Prologue::Residual { .. });
        if !self.prologue_takes(t, cols, ws, residual) {
            return Err(shape_err(
                "gemvp",
                format!("{t} rows of {cols} columns by {} weights are not taken", ws.len()),
            ));
        }
        let out_ptrs: Vec<u64> = outs.iter().map(|o| o.ptr()).collect();
        for (w, o) in ws.iter().zip(outs.iter()) {
            if o.rows != t || o.cols != w.rows {
                return Err(shape_err(
                    "gemvp",
                    format!(
                        "'{}' [{}, {}] does not fit an output [{}, {}]",
                        w.name, w.rows, w.cols, o.rows, o.cols
                    ),
                ));
            }
        }
        let cap = gemv_cap(t);
        let mut args = match p {
            Prologue::Gated { gate, up, act } => vec![
                Arg::I32(1),
                Arg::Ptr(gate.ptr()),
                Arg::Ptr(up.ptr()),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::F32(0.0),
                Arg::I32(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::I32(super::act_code(act)),
            ],
            Prologue::Residual {
                res,
                delta,
                post,
                norm,
                eps,
            } => vec![
                Arg::I32(2),
                Arg::Ptr(0),
                Arg::Ptr(delta.ptr()),
                Arg::Ptr(post.map(|w| w.buf.ptr).unwrap_or(0)),
                Arg::Ptr(norm.buf.ptr),
                Arg::F32(eps),
                // residual_norm's block size: its sums are grouped by it.
                Arg::I32(Self::norm_threads(cols) as i32),
                Arg::Ptr(res.ptr()),
                Arg::Ptr(self.gp_counter.ptr),
                Arg::I32(0),
            ],
        };
        args.extend([i32_of(t, "rows")?, i32_of(cols, "cols")?]);
        let (groups, total) = Self::gemv_groups(ws, &out_ptrs, cap)?;
        args.extend(groups);
        let smem = (if residual { 2 } else { 1 }) * t * cols * 4;
        self.run(&format!("gemvp_{cap}"), (total, 1, 1), 256, smem as u32, &args)
    }

    /// The three weight groups of a `gemv3` / `gemvp` launch (absent ones
    /// zero) and the launch's block count.
    fn gemv_groups(ws: &[&CudaWeight], outs: &[u64], cap: usize) -> Result<(Vec<Arg>, u32)> {
        let mut args = Vec::with_capacity(20);
        let mut total = 0u32;
        for i in 0..3 {
            match (ws.get(i), outs.get(i)) {
                (Some(w), Some(&o)) => {
                    let (family, rpw) = gemv_kernel(w, cap);
                    let (p0, p1, p2) = w.ptrs();
                    let nb = w.rows.div_ceil(8 * rpw) as u32;
                    total += nb;
                    args.extend([
                        Arg::I32(gemv_kind(family).unwrap_or(11)),
                        Arg::Ptr(p0),
                        Arg::Ptr(p1),
                        Arg::Ptr(p2),
                        i32_of(w.rows, "weight rows")?,
                        Arg::Ptr(o),
                    ]);
                    if i < 2 {
                        args.push(Arg::I32(nb as i32));
                    }
                }
                _ => {
                    args.extend([
                        Arg::I32(0),
                        Arg::Ptr(0),
                        Arg::Ptr(0),
                        Arg::Ptr(0),
                        Arg::I32(0),
                        Arg::Ptr(0),
                    ]);
                    if i < 2 {
                        args.push(Arg::I32(0));
                    }
                }
            }
        }
        Ok((args, total))
    }

    /// Whether `multi_gemv` takes activations of `rows` rows by `ws`
    /// (decode sizes; see `gemv_takes`).
    pub(crate) fn multi_gemv_fits(&self, rows: usize, ws: &[&CudaWeight]) -> bool {
        self.gemv_takes(rows, ws)
    }

    /// Whether `multi_gemm` takes `ws` (every weight has an f16 mirror).
    pub(crate) fn multi_gemm_fits(ws: &[&CudaWeight]) -> bool {
        ws.iter().all(|w| w.dense.is_some())
    }

    /// `outs[i] = W_i · x` for up to three weights sharing x, one launch per
    /// 8 activation rows.
    pub(crate) fn multi_gemv(
        &self,
        x: &CudaAct,
        ws: &[&CudaWeight],
        outs: &[u64],
        out_cols: &[usize],
    ) -> Result<()> {
        if ws.is_empty() || ws.len() > 3 || ws.len() != outs.len() {
            return Err(BackendError::Other(format!(
                "multi_gemv: {} weights for {} outputs",
                ws.len(),
                outs.len()
            )));
        }
        for (w, &oc) in ws.iter().zip(out_cols) {
            if w.cols != x.cols || w.rows != oc {
                return Err(shape_err(
                    "multi_gemv",
                    format!(
                        "x [{}, {}] · '{}' [{}, {}]ᵀ does not fit an output of {oc} columns",
                        x.rows, x.cols, w.name, w.rows, w.cols
                    ),
                ));
            }
        }
        let t = x.rows;
        let mut r0 = 0;
        while r0 < t {
            let n = (t - r0).min(GEMV_MAX_ROWS);
            let cap = gemv_cap(n);
            let mut args = vec![
                Arg::Ptr(x.ptr() + (r0 * x.cols * 4) as u64),
                i32_of(n, "rows")?,
                i32_of(x.cols, "cols")?,
            ];
            let shifted: Vec<u64> = outs
                .iter()
                .zip(ws)
                .map(|(&o, w)| o + (r0 * w.rows * 4) as u64)
                .collect();
            let (groups, total) = Self::gemv_groups(ws, &shifted, cap)?;
            args.extend(groups);
            self.run(&format!("gemv3_{cap}"), (total, 1, 1), 256, 0, &args)?;
            r0 += n;
        }
        Ok(())
    }

    /// The variant of a norm kernel that reads its constants (norm weights,
    /// RoPE table, the step's positions and slots) before waiting for the
    /// previous kernel, unless a step is being recorded for the decode
    /// megakernel (which knows the plain names) or the tuning knob
    /// `KESTREL_NORM_PRE=0` asks for the plain one (A/B runs).
    fn pre_wait_name(&self, plain: &'static str, pre: &'static str) -> &'static str {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| super::knobs::on_unless_zero("KESTREL_NORM_PRE"));
        if on && !self.recording.load(std::sync::atomic::Ordering::Relaxed) {
            pre
        } else {
            plain
        }
    }

    pub(crate) fn residual_norm_fused(
        &self,
        x: &mut CudaAct,
        delta: &CudaAct,
        post_norm: Option<&CudaVector>,
        next_norm: &CudaVector,
        eps: f32,
        out: &mut CudaAct,
    ) -> Result<()> {
        super::same_shape("residual_norm", x, delta)?;
        super::same_shape("residual_norm", x, out)?;
        if next_norm.len != x.cols || post_norm.is_some_and(|p| p.len != x.cols) {
            return Err(shape_err(
                "residual_norm",
                format!("norm weights do not have {} elements", x.cols),
            ));
        }
        let out16 = self.f16_side_output(out)?;
        self.run(
            self.pre_wait_name("residual_norm", "residual_norm_pre"),
            (x.rows as u32, 1, 1),
            Self::norm_threads(x.cols),
            0,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(delta.ptr()),
                Arg::Ptr(post_norm.map(|p| p.buf.ptr).unwrap_or(0)),
                Arg::Ptr(next_norm.buf.ptr),
                Arg::F32(eps),
                i32_of(x.cols, "cols")?,
                Arg::Ptr(out.ptr()),
                Arg::Ptr(out16),
            ],
        )?;
        self.mark_f16_side_output(out, out16);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qk_norm_rope_store_fused(
        &self,
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &CudaAct,
        heads: (usize, usize, usize),
        norms: [Option<&CudaVector>; 2],
        eps: f32,
        rope: &CudaRope,
        pool: &mut CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
        stacked: Option<u64>,
    ) -> Result<()> {
        self.check_batch(batch)?;
        let (n_heads, n_kv_heads, head_dim) = heads;
        super::same_shape("qk_norm_rope_store", k, v)?;
        let kv_dim = pool.kv_dim();
        if q.cols != n_heads * head_dim || q.rows != batch.num_tokens || k.rows != batch.num_tokens {
            return Err(shape_err(
                "qk_norm_rope_store",
                format!(
                    "q [{}, {}] is not [{} tokens, {n_heads}×{head_dim}]",
                    q.rows, q.cols, batch.num_tokens
                ),
            ));
        }
        if k.cols != kv_dim || n_kv_heads * head_dim != kv_dim || pool.spec.head_dim != head_dim {
            return Err(shape_err(
                "qk_norm_rope_store",
                format!(
                    "k [{}, {}] does not match the pool's {n_kv_heads}×{head_dim}",
                    k.rows, k.cols
                ),
            ));
        }
        let norm_rope = norm_rope_args(
            "qk_norm_rope_store",
            norms,
            eps,
            rope,
            head_dim,
            pool,
            layer,
            batch,
        )?;
        let (lo, vo) = pool.offsets(layer);
        self.run(
            self.pre_wait_name("qk_norm_rope_store", "qk_norm_rope_store_pre"),
            (q.rows as u32, (n_heads + n_kv_heads) as u32, 1),
            128,
            (head_dim * 4) as u32,
            &[
                Arg::Ptr(q.ptr()),
                Arg::Ptr(k.ptr()),
                Arg::Ptr(v.ptr()),
                i32_of(n_heads, "n_heads")?,
                i32_of(n_kv_heads, "n_kv_heads")?,
                i32_of(head_dim, "head_dim")?,
                norm_rope[0],
                norm_rope[1],
                norm_rope[2],
                norm_rope[3],
                norm_rope[4],
                norm_rope[5],
                norm_rope[6],
                Arg::Ptr(batch.positions),
                Arg::Ptr(pool.buf.ptr),
                Arg::I64(lo),
                Arg::I64(vo),
                Arg::I32(pool.dtype_code()),
                Arg::Ptr(batch.slots),
                // With a stacked QKV GEMM output ([rows, q + k + v], see
                // `stacked_gemm`) the inputs come from there and v is copied out.
                Arg::Ptr(stacked.unwrap_or(0)),
                i32_of(q.cols + 2 * k.cols, "stacked QKV columns")?,
                Arg::Ptr(if stacked.is_some() { v.ptr() } else { 0 }),
            ],
        )
    }
}

/// The q/k norm weights, their epsilon and the RoPE table as the kernels
/// built on `rope_store_item` take them (qw, kw, eps, inv_freq, n_pairs,
/// style, mscale), once the norms have `head_dim` elements, the table fits
/// `rope_store_item` (at most ROPE_PER = 4 elements per thread of 128) and
/// the pool has the layer and the batch's slots.
#[allow(clippy::too_many_arguments)]
pub(crate) fn norm_rope_args(
    op: &str,
    norms: [Option<&CudaVector>; 2],
    eps: f32,
    rope: &CudaRope,
    head_dim: usize,
    pool: &CudaKvPool,
    layer: usize,
    batch: &CudaBatch,
) -> Result<[Arg; 7]> {
    if 2 * rope.n_pairs > head_dim || head_dim > 4 * 128 {
        return Err(shape_err(
            op,
            format!("{} RoPE pairs for head_dim {head_dim}", rope.n_pairs),
        ));
    }
    if norms.iter().flatten().any(|w| w.len != head_dim) {
        return Err(shape_err(
            op,
            format!("q/k norm weights are not of head_dim {head_dim}"),
        ));
    }
    super::check_kv_target(op, pool, layer, batch)?;
    Ok([
        Arg::Ptr(norms[0].map(|w| w.buf.ptr).unwrap_or(0)),
        Arg::Ptr(norms[1].map(|w| w.buf.ptr).unwrap_or(0)),
        Arg::F32(eps),
        Arg::Ptr(rope.buf.ptr),
        i32_of(rope.n_pairs, "pairs")?,
        Arg::I32(rope.style_code()),
        Arg::F32(rope.mscale),
    ])
}
