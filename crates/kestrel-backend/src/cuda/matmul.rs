//! `matmul` dispatch: fused GEMV for decode-sized batches, cuBLAS (weights
//! dequantized to f16 in row chunks, f32 accumulation) for prefill, and the
//! naive reference kernel.

use cudarc::cublas::sys as cb;

use super::buffers::{CudaAct, CudaWeight, DevBuf};
use super::launch::{i32_of, Arg};
use super::weights::Format;
use super::{CudaBackend, KernelSet};
use crate::error::BackendError;

/// At most this many activation rows go through the GEMV kernels in one launch.
pub(crate) const GEMV_MAX_ROWS: usize = 8;
/// Up to this many rows, repeated GEMV launches beat dequantize + GEMM.
pub(crate) const GEMV_REPEAT_ROWS: usize = 32;
/// f16 scratch for dequantized weight chunks (elements).
const W16_CHUNK_ELEMS: usize = 32 << 20;

/// Smallest compiled row capacity (1, 2, 4, 8) holding `n` rows.
pub(crate) fn gemv_cap(n: usize) -> usize {
    match n {
        0..=1 => 1,
        2 => 2,
        3..=4 => 4,
        _ => 8,
    }
}

/// Q8_0 matrices at least this tall use 4 rows per warp.
const Q8_TALL: usize = 16_384;

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
        if t <= GEMV_REPEAT_ROWS {
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

    fn gemm_cublas(&self, x: &CudaAct, w: &CudaWeight, out: &mut CudaAct) -> Result<(), BackendError> {
        let (t, k, m_all) = (x.rows, w.cols, w.rows);
        let mut st = self.lock()?;
        if st.capturing {
            return Err(BackendError::Unsupported(format!(
                "matmul of {t} rows (cuBLAS prefill path) inside a graph capture; capture decode steps of at most {GEMV_REPEAT_ROWS} rows"
            )));
        }
        let chunk_rows = (W16_CHUNK_ELEMS / k).clamp(1, m_all);
        let need_x = t * k * 2;
        let need_w = chunk_rows * k * 2;
        if st.x16.as_ref().is_none_or(|b| b.bytes < need_x) {
            st.x16 = Some(DevBuf::alloc(&self.dev.stream, need_x, "f16 activation scratch")?);
        }
        if st.w16.as_ref().is_none_or(|b| b.bytes < need_w) {
            st.w16 = Some(DevBuf::alloc(&self.dev.stream, need_w, "f16 weight scratch")?);
        }
        if st.blas.is_none() {
            let b = cudarc::cublas::CudaBlas::new(self.dev.stream.clone())
                .map_err(|e| BackendError::Cuda(format!("creating the cuBLAS handle: {e}")))?;
            st.blas = Some(b);
        }
        let (x16, w16) = match (&st.x16, &st.w16) {
            (Some(a), Some(b)) => (a.ptr, b.ptr),
            _ => return Err(BackendError::Cuda("scratch buffers missing".into())),
        };
        let handle = match &st.blas {
            Some(b) => *b.handle(),
            None => return Err(BackendError::Cuda("cuBLAS handle missing".into())),
        };
        let nx = t * k;
        self.run(
            "f32_to_f16",
            (super::launch::grid_for(nx), 1, 1),
            256,
            0,
            &[Arg::Ptr(x.ptr()), Arg::I64(nx as i64), Arg::Ptr(x16)],
        )?;
        let wa = Self::weight_args(w)?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut r0 = 0;
        while r0 < m_all {
            let m = chunk_rows.min(m_all - r0);
            let mut args = wa.to_vec();
            args.extend([Arg::I64(r0 as i64), i32_of(m, "chunk rows")?, Arg::Ptr(w16)]);
            self.run(
                "dequant_f16",
                (super::launch::grid_for(m * k).min(4096), 1, 1),
                256,
                0,
                &args,
            )?;
            // Column-major view: C[m, t] (ldc = m_all) = op(A)[m, k] · B[k, t]
            // with A = the chunk stored [m, k] row-major (k × m col-major, transposed)
            // and B = x16 stored [t, k] row-major (k × t col-major).
            let c_ptr = out.ptr() + (r0 * 4) as u64;
            // SAFETY: all pointers are live device buffers sized above.
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    handle,
                    cb::cublasOperation_t::CUBLAS_OP_T,
                    cb::cublasOperation_t::CUBLAS_OP_N,
                    m as i32,
                    t as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    w16 as *const _,
                    cb::cudaDataType::CUDA_R_16F,
                    k as i32,
                    x16 as *const _,
                    cb::cudaDataType::CUDA_R_16F,
                    k as i32,
                    &beta as *const f32 as *const _,
                    c_ptr as *mut _,
                    cb::cudaDataType::CUDA_R_32F,
                    m_all as i32,
                    cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| BackendError::Cuda(format!("cublasGemmEx for '{}': {e}", w.name)))?;
            r0 += m;
        }
        Ok(())
    }
}
