//! GEMMs that run the small step after them in their own last blocks
//! (hgemm.cu's `hgemm_res_*`, `hgemm_glu_*`, `hgemm_rope_*`): the residual
//! step after the Wo and down projections, the gated activation after the
//! gate/up projection, the q/k norm + RoPE + K/V store after the QKV
//! projection. At a few sequences a decode step is a chain of dependent
//! launches, each costing more than its work; this removes four of the nine
//! launches of a layer without repeating work in every block (the
//! prologues of gemv.cu did, and lost). Same arithmetic and summation order
//! as the standalone kernels, so the same bits (tests.rs checks).

use super::buffers::{CudaAct, CudaWeight, DevBuf};
use super::launch::Arg;
use super::{act_code, shape_err, CudaBackend, KernelSet};
use crate::backend::{Activation, Backend, ResidualNorm};
use crate::error::BackendError;

type Result<T> = std::result::Result<T, BackendError>;

/// Ticket counters of the tails (one per group of blocks a step waits for:
/// the whole grid, a gate/up column pair of tiles, a head).
pub(crate) const COUNTERS: usize = 4096;
/// Most activation rows of a tail launch (its kernels exist for 1, 2 and 4
/// tiles of 8 rows).
pub(crate) const MAX_ROWS: usize = 32;
/// The tail kernels' middle names (`hgemm_{kind}_{tiles}`).
pub(crate) const KINDS: [&str; 3] = ["res", "glu", "rope"];
/// Dynamic shared memory a tail may use without opting in (48 KiB).
const SMEM: usize = 48 << 10;

/// Default of the backend's `tail_rows`: the tuning knob
/// `KESTREL_TAIL_ROWS` (0: off), else 0 until measured.
pub(crate) fn default_rows() -> usize {
    super::knobs::usize_of("KESTREL_TAIL_ROWS").map_or(0, |n| n.min(MAX_ROWS))
}

/// The step an `hgemm_{kind}_*` launch runs after its GEMM: the kernel's
/// arguments after the ticket counters, and its dynamic shared memory.
pub(crate) struct Tail {
    pub(crate) kind: &'static str,
    pub(crate) args: Vec<Arg>,
    pub(crate) smem: u32,
}

impl CudaBackend {
    /// Whether an f16 GEMM of `t` rows and `k` columns may end with a tail:
    /// the fused set, rows within `tail_rows` and above the GEMV path's,
    /// `hgemm_*` sizes, and no decode megakernel being recorded (it knows
    /// only the plain kernels).
    pub(crate) fn tail_takes(&self, t: usize, k: usize) -> bool {
        use std::sync::atomic::Ordering;
        let rows = self.tail_rows.load(Ordering::Relaxed).min(MAX_ROWS);
        self.kernels == KernelSet::Fused
            && !self.recording.load(Ordering::Relaxed)
            && (1..=rows).contains(&t)
            && t > self.gemv_rows()
            && self.hgemm_takes(t, k)
    }

    /// `matmul_residual_norm` with the residual step in the GEMM's last
    /// block when `w` takes the f16-mirror GEMM at these rows; otherwise
    /// the matmul and `residual_norm` launches.
    pub(crate) fn matmul_residual_tail(
        &self,
        a: &CudaAct,
        w: &CudaWeight,
        delta: &mut CudaAct,
        r: ResidualNorm<'_, CudaBackend>,
    ) -> Result<()> {
        let (t, m) = (a.rows, w.rows);
        let gemm_path = self.tail_takes(t, w.cols)
            && !self.mma_q8_takes(t, w)
            && !self.gemv_takes(t, &[w])
            && 2 * m * 4 <= SMEM;
        let dense = w.dense.as_ref().map(|d| d.ptr).filter(|_| gemm_path);
        let Some(dense) = dense else {
            self.matmul(a, w, delta)?;
            return self.residual_norm(r.x, delta, r.post_norm, r.next_norm, r.eps, r.tmp, r.out);
        };
        if a.cols != w.cols || delta.rows != t || delta.cols != m {
            return Err(shape_err(
                "matmul_residual_norm",
                format!(
                    "a [{}, {}] · W '{}' [{m}, {}]ᵀ does not fit delta [{}, {}]",
                    a.rows, a.cols, w.name, w.cols, delta.rows, delta.cols
                ),
            ));
        }
        super::same_shape("matmul_residual_norm", r.x, delta)?;
        super::same_shape("matmul_residual_norm", r.out, delta)?;
        if r.next_norm.len != m || r.post_norm.is_some_and(|p| p.len != m) {
            return Err(shape_err(
                "matmul_residual_norm",
                format!("norm weights do not have {m} elements"),
            ));
        }
        // One f16 scratch for the GEMM's operand and the step's f16 output
        // (the next GEMM's operand): every block has read the operand before
        // the last one starts the step, and one size check means no
        // reallocation between the two.
        let mut st = self.lock()?;
        let scratch = self.x16_scratch(&mut st, t * w.cols.max(m) * 2)?;
        drop(st);
        let Some((x16, fresh)) = scratch else {
            // Too small while capturing: the plain launches.
            self.matmul(a, w, delta)?;
            return self.residual_norm(r.x, delta, r.post_norm, r.next_norm, r.eps, r.tmp, r.out);
        };
        let x = self.f16_operand(a, x16, fresh)?;
        let tail = Tail {
            kind: "res",
            args: vec![
                Arg::Ptr(r.x.ptr()),
                Arg::Ptr(r.post_norm.map_or(0, |p| p.buf.ptr)),
                Arg::Ptr(r.next_norm.buf.ptr),
                Arg::F32(r.eps),
                // residual_norm's block size: its summation order.
                Arg::I32(Self::norm_threads(m) as i32),
                Arg::Ptr(r.out.ptr()),
                Arg::Ptr(x16),
            ],
            smem: (2 * m * 4) as u32,
        };
        self.gemm_f16(w, dense, m, x, t, delta.ptr(), m, Some(&tail))?;
        self.mark_f16_side_output(r.out, x16);
        Ok(())
    }

    /// The stacked gate/up GEMM with the gated activation in its tail into
    /// `act_out` (and its f16 copy for the down GEMM); false when it does
    /// not apply (nothing ran).
    pub(crate) fn gate_up_act_tail(
        &self,
        h: &CudaAct,
        w: &[&CudaWeight; 2],
        act: Activation,
        act_out: &mut CudaAct,
    ) -> Result<bool> {
        let (t, f) = (h.rows, act_out.cols);
        if !self.tail_takes(t, h.cols) || !f.is_multiple_of(16) || f / 16 > COUNTERS {
            return Ok(false);
        }
        // Not the activation scratch: the GEMM still reads h there while
        // its first pairs of tiles form their columns.
        let Some(act16) = self.x16_side(t * f * 2)? else {
            return Ok(false);
        };
        let tail = Tail {
            kind: "glu",
            args: vec![Arg::I32(act_code(act)), Arg::Ptr(act_out.ptr()), Arg::Ptr(act16)],
            smem: 0,
        };
        if self.stacked_gemm(h, w, Some(&tail))?.is_none() {
            return Ok(false);
        }
        self.mark_f16_side_output(act_out, act16);
        Ok(true)
    }

    /// The stacked Q/K/V GEMM with q/k norm + RoPE + K/V store in its tail
    /// (`rope_args`: `qk_norm_rope_store`'s arguments); false when it does
    /// not apply (nothing ran).
    pub(crate) fn qkv_rope_tail(
        &self,
        h: &CudaAct,
        w: &[&CudaWeight; 3],
        heads: (usize, usize, usize),
        rope_args: Vec<Arg>,
    ) -> Result<bool> {
        let (n_heads, n_kv_heads, head_dim) = heads;
        if !self.tail_takes(h.rows, h.cols)
            || !head_dim.is_multiple_of(16)
            || n_heads + n_kv_heads > COUNTERS
            || head_dim * 4 > SMEM
        {
            return Ok(false);
        }
        let tail = Tail {
            kind: "rope",
            args: rope_args,
            smem: (head_dim * 4) as u32,
        };
        Ok(self.stacked_gemm(h, w, Some(&tail))?.is_some())
    }

    /// The second f16 activation scratch grown to `bytes` (None when it is
    /// too small while capturing: a capture must not allocate).
    fn x16_side(&self, bytes: usize) -> Result<Option<u64>> {
        let mut st = self.lock()?;
        if st.x16b.as_ref().is_none_or(|b| b.bytes < bytes) {
            if st.capturing {
                return Ok(None);
            }
            st.x16b = Some(DevBuf::alloc(
                &self.dev.stream,
                bytes,
                "second f16 activation scratch",
            )?);
            // Graphs captured earlier hold the freed buffer's address.
            st.meta.epoch += 1;
            self.x16_src.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(st.x16b.as_ref().map(|b| b.ptr))
    }
}
