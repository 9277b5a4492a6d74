//! Fused operations of the decode path: several GEMVs in one launch (QKV,
//! gate + up), q/k norm + RoPE + KV store in one kernel, and the residual
//! step (post-norm, add, next norm) in one kernel, and K-quant GEMVs that
//! form their activation on the load (act(gate) * up) and run the residual
//! step in their last block (`gemv_fx`). The reference kernel set composes
//! the plain kernels instead (see `backend.rs`).

use super::buffers::{CudaAct, CudaBatch, CudaKvPool, CudaRope, CudaVector, CudaWeight};
use super::launch::{i32_of, Arg};
use super::matmul::{gemv_cap, gemv_kernel, GEMV_MAX_ROWS};
use super::weights::Format;
use super::{shape_err, CudaBackend};
use crate::backend::Activation;
use crate::error::BackendError;
use crate::layout::RopeStyle;

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

/// Family code of `gemv_fx_*` in gemv.cu (K-quants only).
fn fx_family(w: &CudaWeight) -> Option<i32> {
    match w.format {
        Format::Q4K => Some(0),
        Format::Q5K => Some(1),
        Format::Q6K => Some(2),
        _ => None,
    }
}

/// The residual step run by the last block of `gemv_fx`:
/// `x += post ? rms_norm(delta, post) : delta; out = rms_norm(x, next)`.
pub(crate) struct FxResidual<'a> {
    pub x: &'a mut CudaAct,
    pub post: Option<&'a CudaVector>,
    pub next: &'a CudaVector,
    pub eps: f32,
    pub out: &'a mut CudaAct,
}

impl CudaBackend {
    /// Whether `gemv_fx` takes weight `w` with activations of `rows` rows
    /// (one launch: at most `GEMV_MAX_ROWS`).
    pub(crate) fn gemv_fx_fits(w: &CudaWeight, rows: usize) -> bool {
        (1..=GEMV_MAX_ROWS).contains(&rows) && fx_family(w).is_some()
    }

    /// `delta = W · a` where `a = x`, or `a = act(x) * up` with `gated`;
    /// then, with `res`, the residual step on `delta` in the same launch.
    pub(crate) fn gemv_fx(
        &self,
        x: &CudaAct,
        gated: Option<(&CudaAct, Activation)>,
        w: &CudaWeight,
        delta: &mut CudaAct,
        res: Option<FxResidual<'_>>,
    ) -> Result<()> {
        let fam = fx_family(w).ok_or_else(|| {
            BackendError::Unsupported(format!(
                "gemv_fx of '{}' ({:?} is not a K-quant)",
                w.name, w.format
            ))
        })?;
        let t = x.rows;
        if !(1..=GEMV_MAX_ROWS).contains(&t) {
            return Err(shape_err(
                "gemv_fx",
                format!("{t} activation rows (1..={GEMV_MAX_ROWS} taken)"),
            ));
        }
        if x.cols != w.cols || delta.rows != t || delta.cols != w.rows {
            return Err(shape_err(
                "gemv_fx",
                format!(
                    "x [{t}, {}] · '{}' [{}, {}]ᵀ does not fit delta [{}, {}]",
                    x.cols, w.name, w.rows, w.cols, delta.rows, delta.cols
                ),
            ));
        }
        let (up, act) = match gated {
            Some((u, a)) => {
                super::same_shape("gemv_fx (gate, up)", x, u)?;
                (u.ptr(), super::act_code(a))
            }
            None => (0, 0),
        };
        let mut res_args = [
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::F32(0.0),
            Arg::Ptr(0),
            Arg::Ptr(0),
        ];
        if let Some(r) = res {
            super::same_shape("gemv_fx (residual)", r.x, delta)?;
            super::same_shape("gemv_fx (residual out)", r.out, delta)?;
            if r.next.len != delta.cols || r.post.is_some_and(|p| p.len != delta.cols) {
                return Err(shape_err(
                    "gemv_fx",
                    format!("norm weights do not have {} elements", delta.cols),
                ));
            }
            res_args = [
                Arg::Ptr(r.x.ptr()),
                Arg::Ptr(r.post.map(|p| p.buf.ptr).unwrap_or(0)),
                Arg::Ptr(r.next.buf.ptr),
                Arg::F32(r.eps),
                Arg::Ptr(r.out.ptr()),
                Arg::Ptr(self.fx_counter.ptr),
            ];
        }
        let (p0, _, p2) = w.ptrs();
        let mut args = vec![
            Arg::I32(fam),
            Arg::Ptr(p0),
            Arg::Ptr(p2),
            i32_of(w.rows, "weight rows")?,
            i32_of(w.cols, "weight cols")?,
            Arg::Ptr(x.ptr()),
            Arg::Ptr(up),
            Arg::I32(act),
            i32_of(t, "rows")?,
            Arg::Ptr(delta.ptr()),
        ];
        args.extend(res_args);
        let blocks = w.rows.div_ceil(8) as u32;
        self.run(&format!("gemv_fx_{}", gemv_cap(t)), (blocks, 1, 1), 256, 0, &args)
    }

    /// Whether `multi_gemv` takes activations of `rows` rows by `ws`
    /// (decode sizes; see `gemv_takes`).
    pub(crate) fn multi_gemv_fits(rows: usize, ws: &[&CudaWeight]) -> bool {
        super::matmul::gemv_takes(rows, ws)
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
                            Arg::Ptr(o + (r0 * w.rows * 4) as u64),
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
            self.run(&format!("gemv3_{cap}"), (total, 1, 1), 256, 0, &args)?;
            r0 += n;
        }
        Ok(())
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
            "residual_norm",
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
        // rope_store_item: at most ROPE_PER (4) elements per thread of 128.
        if 2 * rope.n_pairs > head_dim || head_dim > 4 * 128 {
            return Err(shape_err(
                "qk_norm_rope_store",
                format!("{} RoPE pairs for head_dim {head_dim}", rope.n_pairs),
            ));
        }
        if norms.iter().flatten().any(|w| w.len != head_dim) {
            return Err(shape_err(
                "qk_norm_rope_store",
                format!("q/k norm weights are not of head_dim {head_dim}"),
            ));
        }
        super::check_kv_target("qk_norm_rope_store", pool, layer, batch)?;
        let style = match rope.style {
            RopeStyle::Interleaved => 0,
            RopeStyle::Neox => 1,
        };
        let (lo, vo) = pool.offsets(layer);
        self.run(
            "qk_norm_rope_store",
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
                Arg::Ptr(norms[0].map(|w| w.buf.ptr).unwrap_or(0)),
                Arg::Ptr(norms[1].map(|w| w.buf.ptr).unwrap_or(0)),
                Arg::F32(eps),
                Arg::Ptr(rope.buf.ptr),
                i32_of(rope.n_pairs, "pairs")?,
                Arg::I32(style),
                Arg::F32(rope.mscale),
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
