//! `matmul` dispatch: fused GEMV for decode-sized batches, cuBLAS (weights
//! dequantized to f16 in row chunks, f32 accumulation) for prefill, and the
//! naive reference kernel.

use cudarc::cublas::sys as cb;

use super::buffers::{CudaAct, CudaWeight, DevBuf, Stacked};
use super::launch::{i32_of, Arg};
use super::lt_gemm::{gemm_mode, GemmMode, LtGemm, Operands, Shape, TUNE_MAX_ROWS};
use super::weights::Format;
use super::{CudaBackend, KernelSet};
use crate::error::BackendError;
use crate::memory::MemClass;

/// At most this many activation rows go through the GEMV kernels in one launch.
pub(crate) const GEMV_MAX_ROWS: usize = 8;
/// GEMV rows the decode megakernel needs (its programs are built from GEMV
/// launches; `set_megakernel` raises the backend's `gemv_rows` to this).
pub(crate) const MEGAKERNEL_GEMV_ROWS: usize = 4;
/// Up to this many rows, repeated GEMV launches beat dequantize + GEMM.
pub(crate) const GEMV_REPEAT_ROWS: usize = 32;
/// f16 scratch for dequantized weight chunks (elements).
const W16_CHUNK_ELEMS: usize = 32 << 20;
/// cuBLAS workspace (Hopper GEMMs want up to 32 MiB).
const BLAS_WORKSPACE: usize = 32 << 20;

/// Default of the backend's `gemv_rows`, the most activation rows that take
/// the GEMV kernels when the weights have f16 mirrors (0..=8): 0, or the
/// tuning knob `KESTREL_GEMV_ROWS`. H100, tg128 of the default model: 1,910
/// / 1,901 tok/s with every decode matmul on the f16 mirrors (`hgemm_1`,
/// Q/K/V and gate/up stacked, the LM head on `mma_q8_0`) against 1,646 /
/// 1,642 with GEMVs up to 4 rows (session 13). Earlier, against cuBLAS
/// (H200): 8 sequences took 1.71 ms per step through the 8-row GEMVs and
/// 1.03 ms through GEMMs.
pub(crate) fn default_gemv_rows() -> usize {
    let n = super::knobs::usize_of("KESTREL_GEMV_ROWS").map_or(0, |n| n.min(GEMV_MAX_ROWS));
    if super::megakernel::enabled_by_env() {
        n.max(MEGAKERNEL_GEMV_ROWS)
    } else {
        n
    }
}

/// Whether stacked weight groups are used (tuning knob `KESTREL_STACKED=0`
/// turns them off, for A/B runs).
fn stacking_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::knobs::on_unless_zero("KESTREL_STACKED"))
}

/// Whether GEMMs of up to 8 rows and at least 2,048 columns (the down
/// projection) take `hgemm_1c8`, whose warps load all eight of their weight
/// spans before the PDL wait (tuning knob `KESTREL_HGEMM_CHUNK8=0` keeps
/// `hgemm_1`). Same bits. H100, default model, tg128 alternated over three
/// rounds: 1,851 / 1,789 / 1,842 tok/s against 1,802 / 1,766 / 1,804
/// (benchmarks/NOTES-cuda.md, session 16).
fn hgemm_chunk8() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::knobs::on_unless_zero("KESTREL_HGEMM_CHUNK8"))
}

/// Smallest compiled row capacity (1, 2, 4, 8) holding `n` rows.
pub(crate) fn gemv_cap(n: usize) -> usize {
    match n {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    }
}

/// Most activation rows of one `hgemm_*` launch (8 tiles of 8).
pub(crate) const HGEMM_MAX_ROWS: usize = 64;

/// Default of the backend's `hgemm_rows`: 32, or the tuning knob
/// `KESTREL_HGEMM_ROWS` (0: cuBLAS only). H100, default model, engine
/// decode tok/s `hgemm_*` / cuBLAS: 8 sequences 12,680 / 10,045; 32:
/// 32,780 / 32,775; 64: 59,700 / 65,825 (each block reads all of x, and at
/// 64 rows that is 4x its weight bytes: 8-10 us per GEMM against cuBLAS's
/// 5-6.5).
pub(crate) fn default_hgemm_rows() -> usize {
    super::knobs::usize_of("KESTREL_HGEMM_ROWS").map_or(32, |n| n.min(HGEMM_MAX_ROWS))
}

/// Q8_0 matrices at least this tall use 4 rows per warp.
const Q8_TALL: usize = 16_384;

/// Most activation rows of one `mma_q8_0` launch (8 tiles of 8); taller
/// batches keep cuBLAS on the f16 mirror, which reads the weights once
/// instead of once per 64 rows.
const MMA_MAX_ROWS: usize = 64;
/// Dynamic shared memory the `mma_q8_0` kernels may use: x of 64 rows in
/// f16 up to ~800 columns, two blocks per SM on Hopper.
pub(crate) const MMA_SMEM_MAX: usize = 100 * 1024;

/// Shared memory of an `mma_q8_0_{tiles}` launch (x in f16, rows padded
/// by 32 bytes: `mma_x_stride` in mma_q8.cu).
fn mma_q8_smem(tiles: usize, cols: usize) -> usize {
    8 * tiles * (2 * cols + 32)
}

/// Fewest activation rows that take `mma_q8_0` when set (tuning knob
/// `KESTREL_Q8_MMA_MIN`, 0 = never); unset: the first row count past the
/// GEMV path.
fn mma_min_rows_knob() -> Option<usize> {
    static ROWS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| {
        super::knobs::usize_of("KESTREL_Q8_MMA_MIN").map(|n| if n == 0 { usize::MAX } else { n })
    })
}

/// Whether greedy steps may fold the argmax into the LM head
/// (`matmul_argmax`; tuning knob `KESTREL_ARGMAX_HEAD=0` keeps logits and
/// a separate argmax, for A/B runs).
fn argmax_head_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::knobs::on_unless_zero("KESTREL_ARGMAX_HEAD"))
}

/// Whether the tensor-core Q8_0 kernel can take `w` at all: a tall Q8_0
/// matrix (the LM head) whose columns fit its layout and shared memory.
fn mma_q8_fits(w: &CudaWeight) -> bool {
    w.format == Format::Q8_0
        && w.rows >= Q8_TALL
        && w.cols.is_multiple_of(64)
        && mma_q8_smem(8, w.cols) <= MMA_SMEM_MAX
}

/// Whether tall Q8_0 matrices get a tiled copy at upload, which the LM
/// head's kernels then read (tuning knob `KESTREL_LMHEAD_TILED=0` turns it
/// off; see mma_q8.cu). H100, default model: the LM head took 84 us at 66%
/// of the DRAM bandwidth on the packed layout and 68 us at 81% tiled (ncu);
/// tg128 +2.6% (benchmarks/NOTES-cuda.md, session 22).
pub(crate) fn default_lmhead_tiled() -> bool {
    super::knobs::on_unless_zero("KESTREL_LMHEAD_TILED")
}

/// Kernel family and output rows per warp for a weight.
pub(crate) fn gemv_kernel(w: &CudaWeight, cap: usize) -> (&'static str, usize) {
    match w.format {
        Format::Q8_0 if w.rows >= Q8_TALL => ("gemv_q8_0r4", 4),
        // With several activation rows, two weight rows per warp halve the
        // activation loads; a single row keeps every warp for latency.
        Format::Q4_0 if cap > 1 => ("gemv_q4_0r2", 2),
        Format::Q5_0 if cap > 1 => ("gemv_q5_0r2", 2),
        f => (f.gemv_name(), 1),
    }
}

impl CudaBackend {
    /// Whether GEMV launches (rather than one GEMM) compute `t` activation
    /// rows by the weights `ws`: up to `gemv_rows` rows; up to 32 (repeated
    /// launches) when a weight has no f16 mirror, since one GEMM on the
    /// mirrors beats re-reading the quantized weights once per 8 rows (H200,
    /// batch 32: 5.4 ms per step through GEMVs).
    pub(crate) fn gemv_takes(&self, t: usize, ws: &[&CudaWeight]) -> bool {
        t <= self.gemv_rows() || (t <= GEMV_REPEAT_ROWS && ws.iter().any(|w| w.dense.is_none()))
    }

    /// Whether `t` activation rows by `w` take the tensor-core Q8_0 kernel:
    /// tall Q8_0 matrices (the LM head) whose columns fit its layout.
    pub(crate) fn mma_q8_takes(&self, t: usize, w: &CudaWeight) -> bool {
        let min = mma_min_rows_knob().unwrap_or(self.gemv_rows() + 1);
        mma_q8_fits(w) && (min..=MMA_MAX_ROWS).contains(&t)
    }

    pub(crate) fn weight_args(w: &CudaWeight) -> Result<[Arg; 6], BackendError> {
        let (p0, p1, p2) = w.ptrs();
        Ok([
            Arg::Ptr(p0),
            Arg::Ptr(p1),
            Arg::Ptr(p2),
            i32_of(w.rows, "weight rows")?,
            i32_of(w.cols, "weight cols")?,
            Arg::I32(w.format as i32),
        ])
    }

    pub(crate) fn matmul_impl(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        out: &mut CudaAct,
    ) -> Result<(), BackendError> {
        if x.cols != w.cols || out.cols != w.rows || out.rows != x.rows {
            return Err(BackendError::Other(format!(
                "matmul '{}': x [{}, {}] · W [{}, {}]ᵀ does not fit out [{}, {}]",
                w.name, x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
            )));
        }
        let t = x.rows;
        if self.kernels == KernelSet::Reference {
            let wa = Self::weight_args(w)?;
            let n = t * w.rows;
            let mut args = wa.to_vec();
            args.extend([Arg::Ptr(x.ptr()), i32_of(t, "rows")?, Arg::Ptr(out.ptr())]);
            return self.run("matmul_ref", (n.div_ceil(128) as u32, 1, 1), 128, 0, &args);
        }
        if self.mma_q8_takes(t, w) {
            return self.mma_q8(w, x.ptr(), t, out.ptr());
        }
        if self.gemv_takes(t, &[w]) {
            let mut r0 = 0;
            while r0 < t {
                let n = (t - r0).min(GEMV_MAX_ROWS);
                self.gemv(
                    w,
                    x.ptr() + (r0 * x.cols * 4) as u64,
                    n,
                    out.ptr() + (r0 * out.cols * 4) as u64,
                )?;
                r0 += n;
            }
            return Ok(());
        }
        self.gemm_cublas(x, w, out)
    }

    /// Fused GEMV of `n <= 8` rows starting at device address `x`.
    pub(crate) fn gemv(&self, w: &CudaWeight, x: u64, n: usize, out: u64) -> Result<(), BackendError> {
        let cap = gemv_cap(n);
        let (family, rpw) = gemv_kernel(w, cap);
        let name = format!("{family}_{cap}");
        let (p0, p1, p2) = w.ptrs();
        let blocks = w.rows.div_ceil(8 * rpw) as u32;
        let args = [
            Arg::Ptr(p0),
            Arg::Ptr(p1),
            Arg::Ptr(p2),
            i32_of(w.rows, "weight rows")?,
            i32_of(w.cols, "weight cols")?,
            Arg::Ptr(x),
            i32_of(n, "rows")?,
            Arg::Ptr(out),
        ];
        self.run(&name, (blocks, 1, 1), 256, 0, &args)
    }

    /// `out[t, rows] = x[t, :] · Wᵀ` for `t <= 64` rows through the
    /// tensor-core Q8_0 kernel (see mma_q8.cu): persistent blocks, about two
    /// per SM, each converting x to f16 once.
    /// `Backend::matmul_argmax`: where the product takes the tensor-core
    /// Q8_0 kernel, that kernel keeps each activation row's best logit and
    /// writes only the argmax keys (into the buffer `launch_argmax` fills),
    /// skipping the logits' write and the argmax pass over them (at 64 rows
    /// of Gemma's 262,144-entry vocabulary, 67 MB each way). Otherwise a
    /// plain `matmul`.
    pub(crate) fn matmul_argmax_impl(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        out: &mut CudaAct,
    ) -> Result<bool, BackendError> {
        let fused = self.kernels != KernelSet::Reference
            && argmax_head_enabled()
            && x.cols == w.cols
            && out.cols == w.rows
            && out.rows == x.rows
            && self.mma_q8_takes(x.rows, w);
        if !fused {
            self.matmul_impl(x, w, out)?;
            return Ok(false);
        }
        let t = x.rows;
        let keys = {
            let mut st = self.lock()?;
            self.argmax_keys(&mut st, t * 8)?
        };
        self.run(
            "zero_u64",
            (1, 1, 1),
            256,
            0,
            &[Arg::Ptr(keys), i32_of(t, "rows")?],
        )?;
        self.mma_q8_launch(w, x.ptr(), t, keys, "mma_q8_0_argmax")?;
        Ok(true)
    }

    /// The tiled copy of a tall Q8_0 matrix that `mma_q8_0t_*` reads (see
    /// mma_q8.cu): quants then scales, charged to the dense budget like an
    /// f16 mirror (188 MB for Gemma 3's 262,144 x 640 LM head). None for
    /// weights the Q8_0 kernel cannot take, the reference kernels,
    /// `KESTREL_LMHEAD_TILED=0`, or a spent budget.
    pub(crate) fn q8_tiled_copy(&self, w: &CudaWeight) -> Result<Option<(DevBuf, usize)>, BackendError> {
        // Only a matrix the Q8_0 kernel can take: a copy it never reads
        // would be wasted memory.
        if !mma_q8_fits(w) || self.kernels == KernelSet::Reference || !default_lmhead_tiled() {
            return Ok(None);
        }
        let units = w.rows.div_ceil(32);
        let scale_off = (units * 32 * w.cols).div_ceil(256) * 256;
        let bytes = scale_off + units * 32 * (w.cols / 32) * 2;
        let Some(buf) = self.weight_copy(bytes, "tiled Q8_0 LM head")? else {
            return Ok(None);
        };
        let (p0, _, p2) = w.ptrs();
        self.run(
            "q8_tile_pack",
            (4 * self.dev.sm_count.max(1) as u32, 1, 1),
            256,
            0,
            &[
                Arg::Ptr(p0),
                Arg::Ptr(p2),
                i32_of(w.rows, "weight rows")?,
                i32_of(w.cols, "weight cols")?,
                Arg::Ptr(buf.ptr),
                Arg::Ptr(buf.ptr + scale_off as u64),
            ],
        )?;
        Ok(Some((buf, scale_off)))
    }

    fn mma_q8(&self, w: &CudaWeight, x: u64, t: usize, out: u64) -> Result<(), BackendError> {
        self.mma_q8_launch(w, x, t, out, "mma_q8_0")
    }

    /// One `family_{tiles}` launch of the tensor-core Q8_0 kernel; `out` is
    /// the logits or (argmax family) the keys.
    fn mma_q8_launch(
        &self,
        w: &CudaWeight,
        x: u64,
        t: usize,
        out: u64,
        family: &str,
    ) -> Result<(), BackendError> {
        let tiles = t.div_ceil(8).next_power_of_two();
        let tiled = w
            .tiled
            .as_ref()
            .filter(|_| self.lmhead_tiled.load(std::sync::atomic::Ordering::Relaxed));
        let (name, p0, p2) = match tiled {
            Some((buf, off)) => (
                family.replacen("mma_q8_0", "mma_q8_0t", 1),
                buf.ptr,
                buf.ptr + *off as u64,
            ),
            None => {
                let (p0, _, p2) = w.ptrs();
                (family.to_string(), p0, p2)
            }
        };
        let units = w.rows.div_ceil(32);
        let sms = self.dev.sm_count.max(1) as usize;
        let blocks = units.div_ceil(8).min(2 * sms) as u32;
        let args = [
            Arg::Ptr(p0),
            Arg::Ptr(p2),
            i32_of(w.rows, "weight rows")?,
            i32_of(w.cols, "weight cols")?,
            Arg::Ptr(x),
            i32_of(t, "rows")?,
            Arg::Ptr(out),
        ];
        let smem = mma_q8_smem(tiles, w.cols) as u32;
        self.run(&format!("{name}_{tiles}"), (blocks, 1, 1), 256, smem, &args)
    }

    /// Where a producer kernel (residual norm, gated activation) should also
    /// write `out` as f16 for the GEMM that consumes it next: the activation
    /// scratch when `out` has more rows than the GEMV path takes (0 = none).
    /// Never allocates while capturing (then the GEMM converts as usual).
    pub(crate) fn f16_side_output(&self, out: &CudaAct) -> Result<u64, BackendError> {
        if out.rows <= self.gemv_rows() {
            return Ok(0);
        }
        let mut st = self.lock()?;
        Ok(self
            .x16_scratch(&mut st, out.rows * out.cols * 2)?
            .map_or(0, |(ptr, _)| ptr))
    }

    /// The f16 activation scratch, grown to at least `bytes`: its address and
    /// whether it was allocated just now (then it holds nothing yet). None
    /// when it is too small while a graph is being captured (a capture must
    /// not allocate).
    fn x16_scratch(&self, st: &mut super::State, bytes: usize) -> Result<Option<(u64, bool)>, BackendError> {
        let small = st.x16.as_ref().is_none_or(|b| b.bytes < bytes);
        if small {
            if st.capturing {
                return Ok(None);
            }
            st.x16 = Some(DevBuf::alloc(&self.dev.stream, bytes, "f16 activation scratch")?);
            // Graphs captured earlier hold the freed buffer's address.
            st.meta.epoch += 1;
        }
        Ok(st.x16.as_ref().map(|b| (b.ptr, small)))
    }

    /// Records that the launch just made left `out` in f16 in the activation
    /// scratch. Any later launch clears the record (`run`), so a GEMM trusts
    /// the scratch only when its operand's producer ran immediately before.
    pub(crate) fn mark_f16_side_output(&self, out: &CudaAct, out16: u64) {
        if out16 != 0 {
            self.x16_src
                .store(out.ptr(), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether the activation scratch already holds `x` in f16 (see
    /// `mark_f16_side_output`).
    fn x16_holds(&self, x: &CudaAct) -> bool {
        self.x16_src.load(std::sync::atomic::Ordering::Relaxed) == x.ptr()
    }

    /// Converts `x` to f16 into the scratch at `x16`, unless its producer
    /// already left it there (and the scratch was not just reallocated).
    fn ensure_f16_operand(&self, x: &CudaAct, x16: u64, reallocated: bool) -> Result<(), BackendError> {
        if !reallocated && self.x16_holds(x) {
            return Ok(());
        }
        let n = x.rows * x.cols;
        self.run(
            "f32_to_f16",
            (super::launch::grid_for(n), 1, 1),
            256,
            0,
            &[Arg::Ptr(x.ptr()), Arg::I64(n as i64), Arg::Ptr(x16)],
        )
    }

    /// An f16 copy of `w` when the dense budget has room for it (the fused
    /// set only; the reference set keeps to its plain kernel).
    pub(crate) fn dense_mirror(&self, w: &CudaWeight) -> Result<Option<DevBuf>, BackendError> {
        if self.kernels == KernelSet::Reference {
            return Ok(None);
        }
        let bytes = w.rows * w.cols * 2;
        let Some(buf) = self.weight_copy(bytes, "f16 weight mirror")? else {
            return Ok(None);
        };
        self.dequant_f16_into(w, buf.ptr)?;
        Ok(Some(buf))
    }

    /// A buffer for a weight copy kept for speed (f16 mirrors, stacked
    /// mirrors, the LM head's tiled copy), its bytes taken from the dense
    /// budget; None when too little of the budget is left.
    fn weight_copy(&self, bytes: usize, what: &str) -> Result<Option<DevBuf>, BackendError> {
        use std::sync::atomic::Ordering;
        let took = self
            .dense_budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(bytes)
            });
        if took.is_err() {
            return Ok(None);
        }
        DevBuf::alloc_in(MemClass::WeightCopies, &self.dev.stream, bytes, what).map(Some)
    }

    /// All of `w` dequantized to f16, row-major, at device address `dst`.
    fn dequant_f16_into(&self, w: &CudaWeight, dst: u64) -> Result<(), BackendError> {
        let mut args = Self::weight_args(w)?.to_vec();
        args.extend([Arg::I64(0), i32_of(w.rows, "weight rows")?, Arg::Ptr(dst)]);
        self.run(
            "dequant_f16",
            (super::launch::grid_for(w.rows * w.cols).min(4096), 1, 1),
            256,
            0,
            &args,
        )
    }

    /// The cuBLAS handle, created on first use with a fixed workspace so that
    /// GEMMs recorded into a graph never allocate.
    fn blas_handle(&self, st: &mut super::State) -> Result<cb::cublasHandle_t, BackendError> {
        if st.blas.is_none() {
            if st.capturing {
                return Err(BackendError::Unsupported(
                    "first cuBLAS use inside a graph capture: run the step once before capturing".into(),
                ));
            }
            let b = cudarc::cublas::CudaBlas::new(self.dev.stream.clone())
                .map_err(|e| BackendError::Cuda(format!("creating the cuBLAS handle: {e}")))?;
            let ws = DevBuf::alloc(&self.dev.stream, BLAS_WORKSPACE, "cuBLAS workspace")?;
            // SAFETY: the handle is live and the workspace outlives it (both in `st`).
            let status = unsafe { cb::cublasSetWorkspace_v2(*b.handle(), ws.ptr as *mut _, ws.bytes) };
            if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(BackendError::Cuda(format!("cublasSetWorkspace: {status:?}")));
            }
            st.blas = Some(b);
            st.blas_ws = Some(ws);
        }
        match &st.blas {
            Some(b) => Ok(*b.handle()),
            None => Err(BackendError::Cuda("cuBLAS handle missing".into())),
        }
    }

    /// `outs[i] = x · W_iᵀ` for weights that all have f16 mirrors: the
    /// activation is converted to f16 once and each product is one GEMM.
    pub(crate) fn multi_gemm(
        &self,
        x: &CudaAct,
        ws: &[&CudaWeight],
        outs: &mut [&mut CudaAct],
    ) -> Result<(), BackendError> {
        self.record_refused("a cuBLAS GEMM");
        let mut st = self.lock()?;
        let Some((x16, fresh)) = self.x16_scratch(&mut st, x.rows * x.cols * 2)? else {
            return Err(BackendError::Unsupported(
                "GEMM inside a graph capture needs its scratch sized: run the step once before capturing"
                    .into(),
            ));
        };
        drop(st);
        self.ensure_f16_operand(x, x16, fresh)?;
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            let dense = match &w.dense {
                Some(d) => d.ptr,
                None => {
                    return Err(BackendError::Other(format!(
                        "multi_gemm: '{}' has no f16 mirror",
                        w.name
                    )))
                }
            };
            if x.cols != w.cols || out.cols != w.rows || out.rows != x.rows {
                return Err(BackendError::Other(format!(
                    "multi_gemm '{}': x [{}, {}] · W [{}, {}]ᵀ does not fit out [{}, {}]",
                    w.name, x.rows, x.cols, w.rows, w.cols, out.rows, out.cols
                )));
            }
            self.gemm_f16(w, dense, w.rows, x16, x.rows, out.ptr(), w.rows)?;
        }
        Ok(())
    }

    /// The stacked f16 mirror of `ws` (see `Stacked`), built on the first
    /// call outside a capture; None when a weight has no f16 mirror, the
    /// columns differ, the dense budget is spent, or the leading weight
    /// already leads another group.
    fn stacked<'w>(&self, ws: &[&'w CudaWeight]) -> Result<Option<&'w Stacked>, BackendError> {
        let lead = ws[0];
        let ids = || ws[1..].iter().map(|w| w.id);
        if let Some(s) = lead.stacked.get() {
            return Ok(s.as_ref().filter(|s| s.followers.iter().copied().eq(ids())));
        }
        if self.lock()?.capturing {
            return Ok(None);
        }
        let fits = ws.iter().all(|w| w.dense.is_some() && w.cols == lead.cols);
        let rows: usize = ws.iter().map(|w| w.rows).sum();
        let bytes = rows * lead.cols * 2;
        let buf = if fits {
            self.weight_copy(bytes, "stacked f16 weight mirror")?
        } else {
            None
        };
        let stacked = if let Some(buf) = buf {
            let mut r0 = 0;
            for w in ws {
                self.dequant_f16_into(w, buf.ptr + (r0 * w.cols * 2) as u64)?;
                r0 += w.rows;
            }
            Some(Stacked {
                followers: ids().collect(),
                buf,
                rows,
            })
        } else {
            None
        };
        // A concurrent first call may have set it: use whichever landed.
        let _ = lead.stacked.set(stacked);
        Ok(lead.stacked.get().and_then(|s| s.as_ref()))
    }

    /// `x · [W_0; W_1; …]ᵀ` with one GEMM on the stacked mirror of `ws`,
    /// into the stacked-output scratch: its address (row stride = the sum
    /// of the weights' rows), or None when `ws` have no stacked mirror.
    pub(crate) fn stacked_gemm(&self, x: &CudaAct, ws: &[&CudaWeight]) -> Result<Option<u64>, BackendError> {
        if self.kernels != KernelSet::Fused || x.cols != ws[0].cols || !stacking_on() {
            return Ok(None);
        }
        let Some(stacked) = self.stacked(ws)? else {
            return Ok(None);
        };
        self.record_refused("a cuBLAS GEMM");
        let mut st = self.lock()?;
        let out = self.graph_scratch(
            &mut st,
            |s| &mut s.stacked_out,
            x.rows * stacked.rows * 4,
            "stacked GEMM output",
        )?;
        let Some((x16, fresh)) = self.x16_scratch(&mut st, x.rows * x.cols * 2)? else {
            return Err(BackendError::Unsupported(
                "stacked GEMM inside a graph capture needs its f16 scratch sized: run the step once before capturing"
                    .into(),
            ));
        };
        drop(st);
        self.ensure_f16_operand(x, x16, fresh)?;
        self.gemm_f16(
            ws[0],
            stacked.buf.ptr,
            stacked.rows,
            x16,
            x.rows,
            out,
            stacked.rows,
        )?;
        Ok(Some(out))
    }

    fn gemm_cublas(&self, x: &CudaAct, w: &CudaWeight, out: &mut CudaAct) -> Result<(), BackendError> {
        self.record_refused("a cuBLAS GEMM");
        let (t, k, m_all) = (x.rows, w.cols, w.rows);
        let mut st = self.lock()?;
        // With an f16 mirror the whole product is one GEMM on resident
        // weights; without, weights are dequantized chunk by chunk into scratch.
        let chunk_rows = match &w.dense {
            Some(_) => m_all,
            None => (W16_CHUNK_ELEMS / k).clamp(1, m_all),
        };
        let need_w = if w.dense.is_some() { 0 } else { chunk_rows * k * 2 };
        let w_small = need_w > 0 && st.w16.as_ref().is_none_or(|b| b.bytes < need_w);
        let not_ready = || {
            BackendError::Unsupported(format!(
                "matmul of {t} rows by '{}' inside a graph capture needs its f16 mirror and scratch ready: run the step once before capturing",
                w.name
            ))
        };
        if st.capturing && w.dense.is_none() {
            return Err(not_ready());
        }
        let Some((x16, fresh)) = self.x16_scratch(&mut st, t * k * 2)? else {
            return Err(not_ready());
        };
        if w_small {
            st.w16 = Some(DevBuf::alloc(&self.dev.stream, need_w, "f16 weight scratch")?);
        }
        let w16 = st.w16.as_ref().map(|b| b.ptr);
        drop(st);
        self.ensure_f16_operand(x, x16, fresh)?;
        let wa = Self::weight_args(w)?;
        let mut r0 = 0;
        while r0 < m_all {
            let m = chunk_rows.min(m_all - r0);
            let a_ptr = match (&w.dense, w16) {
                (Some(d), _) => d.ptr,
                (None, Some(w16)) => {
                    let mut args = wa.to_vec();
                    args.extend([Arg::I64(r0 as i64), i32_of(m, "chunk rows")?, Arg::Ptr(w16)]);
                    self.run(
                        "dequant_f16",
                        (super::launch::grid_for(m * k).min(4096), 1, 1),
                        256,
                        0,
                        &args,
                    )?;
                    w16
                }
                (None, None) => return Err(BackendError::Cuda("weight scratch missing".into())),
            };
            let c_ptr = out.ptr() + (r0 * 4) as u64;
            self.gemm_f16(w, a_ptr, m, x16, t, c_ptr, m_all)?;
            r0 += m;
        }
        Ok(())
    }

    /// Whether an f16 GEMM of `t` rows and `k` columns takes the `hgemm_*`
    /// kernels (hgemm.cu: weights loaded before the PDL wait) rather than
    /// cuBLAS: up to `hgemm_rows` rows, `k` a multiple of 32.
    pub(crate) fn hgemm_takes(&self, t: usize, k: usize) -> bool {
        let rows = self.hgemm_rows.load(std::sync::atomic::Ordering::Relaxed);
        (1..=rows).contains(&t) && k > 0 && k.is_multiple_of(32)
    }

    /// `C[t, m] (row stride ldc) = X16[t, k] · A[m, k]ᵀ` with f16 inputs and
    /// f32 accumulation and output (`w` names the product and gives k),
    /// through `hgemm_*` up to 64 rows (`hgemm_takes`), else cuBLAS or
    /// cuBLASLt (`KESTREL_GEMM`, see lt_gemm.rs).
    #[allow(clippy::too_many_arguments)]
    fn gemm_f16(
        &self,
        w: &CudaWeight,
        a_ptr: u64,
        m: usize,
        x16: u64,
        t: usize,
        c_ptr: u64,
        ldc: usize,
    ) -> Result<(), BackendError> {
        if self.hgemm_takes(t, w.cols) {
            let name = match t.div_ceil(8) {
                1 if w.cols >= 2048 && hgemm_chunk8() => "hgemm_1c8",
                1 => "hgemm_1",
                2 => "hgemm_2",
                3..=4 => "hgemm_4",
                _ => "hgemm_8",
            };
            let a_ptr = super::knockout::shared_weights(m, w.cols, t, a_ptr);
            let args = [
                Arg::Ptr(a_ptr),
                i32_of(m, "weight rows")?,
                i32_of(w.cols, "weight cols")?,
                Arg::Ptr(x16),
                i32_of(t, "rows")?,
                Arg::Ptr(c_ptr),
                i32_of(ldc, "output stride")?,
            ];
            return self.run(name, (m.div_ceil(16) as u32, 1, 1), 256, 0, &args);
        }
        let mut st = self.lock()?;
        let handle = self.blas_handle(&mut st)?;
        let ws = st
            .blas_ws
            .as_ref()
            .map(|b| (b.ptr, b.bytes))
            .ok_or_else(|| BackendError::Cuda("cuBLAS workspace missing".into()))?;
        let shape = Shape { m, t, k: w.cols, ldc };
        let ops = Operands {
            a: a_ptr,
            x: x16,
            c: c_ptr,
            workspace: ws.0,
            workspace_bytes: ws.1,
        };
        let mode = gemm_mode();
        if mode == GemmMode::Cublas || (mode == GemmMode::Tune && t > TUNE_MAX_ROWS) {
            drop(st);
            return gemm_ex_f16(handle, &w.name, shape, ops);
        }
        let capturing = st.capturing;
        let lt = match &mut st.lt {
            Some(lt) => lt,
            None if capturing => {
                return Err(BackendError::Unsupported(
                    "first cuBLASLt use inside a graph capture: run the step once before capturing".into(),
                ))
            }
            None => st.lt.insert(LtGemm::new(&self.dev.name)?),
        };
        lt.gemm(
            &self.dev.stream,
            shape,
            ops,
            mode == GemmMode::Tune && !capturing,
            &w.name,
        )
    }
}

/// `C[t, m] (row stride ldc) = X16[t, k] · A[m, k]ᵀ` (shape `sh`) with f16
/// inputs and f32 accumulation and output, in cuBLAS's column-major terms:
/// C[m, t] = op(A)[m, k] · B[k, t], where the row-major [m, k] rows are a
/// transposed k × m column-major matrix and X16 [t, k] row-major is k × t
/// column-major. `ops.workspace` is the handle's own (set at creation).
fn gemm_ex_f16(handle: cb::cublasHandle_t, what: &str, sh: Shape, ops: Operands) -> Result<(), BackendError> {
    let Shape { m, t, k, ldc } = sh;
    let (a_ptr, x16, c_ptr) = (ops.a, ops.x, ops.c);
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the callers pass live device buffers of the sizes named above.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            handle,
            cb::cublasOperation_t::CUBLAS_OP_T,
            cb::cublasOperation_t::CUBLAS_OP_N,
            m as i32,
            t as i32,
            k as i32,
            &alpha as *const f32 as *const _,
            a_ptr as *const _,
            cb::cudaDataType::CUDA_R_16F,
            k as i32,
            x16 as *const _,
            cb::cudaDataType::CUDA_R_16F,
            k as i32,
            &beta as *const f32 as *const _,
            c_ptr as *mut _,
            cb::cudaDataType::CUDA_R_32F,
            ldc as i32,
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| BackendError::Cuda(format!("cublasGemmEx for '{what}': {e}")))
}
