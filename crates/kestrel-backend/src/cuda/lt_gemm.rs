//! f16 × f16 → f32 GEMMs through cuBLASLt, with the algorithm chosen once
//! per shape.
//!
//! Why not plain `cublasGemmEx`: its default algorithm for the decode-step
//! GEMMs (64-256 activation rows by a 640-4096 wide weight) runs 40-100
//! CTAs on a 132-SM GPU (ncu, H200: 5-6 us for 1-5 MB of weights, a tenth of
//! the bandwidth). cuBLASLt lists its candidates (tile shapes, split-K) for
//! a shape; in mode `tune` (`KESTREL_GEMM=tune`, opt-in) they are timed on
//! the real operands at the first, uncaptured use of a decode-sized shape
//! and the fastest is kept (H200, default model, decode at 64 sequences,
//! an earlier form that tuned every exact shape: 55,853 -> 57,288 tok/s in
//! one run, 56,955 in another). Products of more than `TUNE_MAX_ROWS`
//! activation rows (prefill) stay on `cublasGemmEx`. Not the default yet:
//! the bucketed form below was not run on a GPU (the session's GPU time
//! ran out); the default is `cublasGemmEx` for every product.
//!
//! A choice serves every row count of its bucket (rounded up to a multiple
//! of 16), checked by `cublasLtMatmulAlgoCheck` for the exact shape: timing
//! every row count a server meets (each costs ~150 timed launches) cost a
//! first serving run a third of its throughput. Different algorithms round
//! differently, so a choice must not change between runs either: choices are
//! stored in the kernel cache directory, per GPU model and cuBLASLt version
//! (`gemm-<gpu>-<version>.txt`, one line per bucket: `m t k ldc` and the
//! eight words of the opaque cublasLtMatmulAlgo_t), and a later process
//! takes the stored algorithm instead of timing again.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;

use crate::error::BackendError;

/// How f16 GEMMs are run (`KESTREL_GEMM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GemmMode {
    /// `cublasGemmEx` with the default algorithm.
    Cublas,
    /// cuBLASLt with its first heuristic candidate.
    Lt,
    /// cuBLASLt, candidates timed at the shape's first use.
    Tune,
}

/// `KESTREL_GEMM=cublas|lt|tune` (default and other values: cublas).
pub(crate) fn gemm_mode() -> GemmMode {
    static MODE: std::sync::OnceLock<GemmMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("KESTREL_GEMM").as_deref().map(str::trim) {
        Ok("lt") => GemmMode::Lt,
        Ok("tune") => GemmMode::Tune,
        _ => GemmMode::Cublas,
    })
}

/// Row counts up to which f16 GEMMs go through cuBLASLt's tuned choices
/// (decode steps; graphs exist up to 256 rows).
pub(crate) const TUNE_MAX_ROWS: usize = 256;

/// Row-count granularity of stored choices.
const BUCKET_ROWS: usize = 16;

/// The bucket a shape's choice is stored under.
fn bucket(s: Shape) -> Shape {
    Shape {
        t: s.t.next_multiple_of(BUCKET_ROWS),
        ..s
    }
}

/// Stored algorithm choices: bucket shape -> the algorithm's opaque words.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Choices {
    map: HashMap<Shape, [u64; 8]>,
}

impl Choices {
    /// Parses the stored text; malformed lines are skipped (the file is a
    /// cache: the worst outcome of a bad line is timing that shape again).
    pub(crate) fn parse(text: &str) -> Choices {
        let mut map = HashMap::new();
        for line in text.lines() {
            let v: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if v.len() == 12 {
                let dim = |i: usize| v[i] as usize;
                let mut algo = [0u64; 8];
                algo.copy_from_slice(&v[4..]);
                let shape = Shape {
                    m: dim(0),
                    t: dim(1),
                    k: dim(2),
                    ldc: dim(3),
                };
                map.insert(shape, algo);
            }
        }
        Choices { map }
    }

    /// The text form, sorted so that equal choices give equal files.
    pub(crate) fn render(&self) -> String {
        let mut lines: Vec<String> = self
            .map
            .iter()
            .map(|(s, a)| {
                let words: Vec<String> = a.iter().map(|w| w.to_string()).collect();
                format!("{} {} {} {} {}", s.m, s.t, s.k, s.ldc, words.join(" "))
            })
            .collect();
        lines.sort();
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// The file of stored choices for this GPU model and cuBLASLt version.
fn choices_path(gpu: &str) -> Option<std::path::PathBuf> {
    let tag: String = gpu
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // SAFETY: a plain version query.
    let version = unsafe { sys::cublasLtGetVersion() };
    super::compile::cache_dir().map(|d| d.join(format!("gemm-{tag}-{version}.txt")))
}

/// Heuristic candidates timed per shape.
const CANDIDATES: usize = 12;

/// `C[t, m] (row stride ldc) = X[t, k] · A[m, k]ᵀ`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Shape {
    pub m: usize,
    pub t: usize,
    pub k: usize,
    pub ldc: usize,
}

/// Device addresses of one product's operands.
#[derive(Clone, Copy)]
pub(crate) struct Operands {
    pub a: u64,
    pub x: u64,
    pub c: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

/// Descriptors and the chosen algorithm of one shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    la: sys::cublasLtMatrixLayout_t,
    lx: sys::cublasLtMatrixLayout_t,
    lc: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `make_plan` (layouts possibly still null if it
        // failed half way: cuBLASLt refuses those), destroyed once here.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.lc);
            let _ = lt::destroy_matrix_layout(self.lx);
            let _ = lt::destroy_matrix_layout(self.la);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle, one plan per shape seen and the stored choices.
pub(crate) struct LtGemm {
    handle: sys::cublasLtHandle_t,
    plans: HashMap<Shape, Plan>,
    choices: Choices,
    path: Option<std::path::PathBuf>,
}

// SAFETY: the handle and descriptors are plain heap objects of cuBLASLt,
// used only under the backend's state lock.
unsafe impl Send for LtGemm {}

impl Drop for LtGemm {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once, after every plan.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

impl LtGemm {
    /// A handle, with the choices stored for GPU model `gpu`.
    pub(crate) fn new(gpu: &str) -> Result<Self, BackendError> {
        let path = choices_path(gpu);
        let choices = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| Choices::parse(&t))
            .unwrap_or_default();
        Ok(LtGemm {
            handle: lt::create_handle().map_err(|e| lt_err("create handle", e))?,
            plans: HashMap::new(),
            choices,
            path,
        })
    }

    /// Adds a choice and rewrites the file (see `store_cache_file`).
    fn remember(&mut self, shape: Shape, algo: [u64; 8]) {
        self.choices.map.insert(shape, algo);
        let Some(path) = &self.path else { return };
        // Another process may have stored shapes meanwhile: keep them too.
        if let Ok(text) = std::fs::read_to_string(path) {
            for (s, i) in Choices::parse(&text).map {
                self.choices.map.entry(s).or_insert(i);
            }
        }
        super::compile::store_cache_file(path, &self.choices.render());
    }

    /// Runs the product on `stream`. The shape's plan is made at its first
    /// use: with `may_time` (not capturing, mode Tune) by timing the
    /// candidates on these operands (their output is overwritten by the
    /// real run that follows), otherwise the first candidate.
    pub(crate) fn gemm(
        &mut self,
        stream: &Arc<CudaStream>,
        shape: Shape,
        ops: Operands,
        may_time: bool,
        what: &str,
    ) -> Result<(), BackendError> {
        if !self.plans.contains_key(&shape) {
            let stored = self.choices.map.get(&bucket(shape)).copied();
            let (plan, timed) = self.make_plan(stream, shape, ops, stored, may_time, what)?;
            if let Some(algo) = timed {
                self.remember(bucket(shape), algo);
            }
            self.plans.insert(shape, plan);
        }
        let plan = &self.plans[&shape];
        self.launch(stream, plan, &plan.algo, ops)
            .map_err(|e| lt_err(&format!("matmul for '{what}' {shape:?}"), e))
    }

    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ops: Operands,
    ) -> Result<(), cudarc::cublaslt::result::CublasError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: the plan's layouts describe the caller's live buffers; the
        // algorithm needs at most `ops.workspace_bytes` (make_plan keeps only those).
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                ops.a as *const c_void,
                plan.la,
                ops.x as *const c_void,
                plan.lx,
                ops.c as *const c_void,
                plan.lc,
                ops.c as *mut c_void,
                plan.lc,
                algo,
                ops.workspace as *mut c_void,
                ops.workspace_bytes,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }

    /// The shape's plan: the stored choice of its bucket when there is one
    /// and cuBLASLt accepts it for this exact shape, else the fastest
    /// candidate when `may_time`, else the first. Also returns the algorithm
    /// when it was chosen by timing.
    fn make_plan(
        &self,
        stream: &Arc<CudaStream>,
        s: Shape,
        ops: Operands,
        stored: Option<[u64; 8]>,
        may_time: bool,
        what: &str,
    ) -> Result<(Plan, Option<[u64; 8]>), BackendError> {
        use sys::cudaDataType::{CUDA_R_16F, CUDA_R_32F};
        // Column-major terms, as for cublasGemmEx: C[m, t] = op(A)[m, k] ·
        // X[k, t], A stored as k × m (row-major [m, k] weights), X as k × t.
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)
            .map_err(|e| lt_err("matmul desc", e))?;
        let mut plan = Plan {
            desc,
            la: std::ptr::null_mut(),
            lx: std::ptr::null_mut(),
            lc: std::ptr::null_mut(),
            algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let trans = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        // SAFETY: desc is live; the attribute is a cublasOperation_t.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const c_void,
                std::mem::size_of_val(&trans),
            )
        }
        .map_err(|e| lt_err("TRANSA", e))?;
        let layout = |ty, rows: usize, cols: usize, ld: usize| {
            lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
                .map_err(|e| lt_err("matrix layout", e))
        };
        plan.la = layout(CUDA_R_16F, s.k, s.m, s.k)?;
        plan.lx = layout(CUDA_R_16F, s.k, s.t, s.k)?;
        plan.lc = layout(CUDA_R_32F, s.m, s.t, s.ldc)?;

        if let Some(words) = stored {
            let algo = sys::cublasLtMatmulAlgo_t { data: words };
            // SAFETY: the plan's descriptors are live; result is plain data.
            let fits = unsafe {
                let mut r: sys::cublasLtMatmulHeuristicResult_t = std::mem::zeroed();
                let st = sys::cublasLtMatmulAlgoCheck(
                    self.handle,
                    plan.desc,
                    plan.la,
                    plan.lx,
                    plan.lc,
                    plan.lc,
                    &algo,
                    &mut r,
                );
                st == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= ops.workspace_bytes
            };
            if fits {
                tracing::debug!("GEMM '{what}' {s:?}: stored choice");
                plan.algo = algo;
                return Ok((plan, None));
            }
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let ws = ops.workspace_bytes as u64;
        // SAFETY: pref is live; the attribute is a u64; pref destroyed below.
        let found = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            );
            let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = vec![std::mem::zeroed(); CANDIDATES];
            let mut count = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc,
                plan.la,
                plan.lx,
                plan.lc,
                plan.lc,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            );
            let _ = lt::destroy_matmul_pref(pref);
            set.map_err(|e| lt_err("workspace preference", e))?;
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(lt_err(&format!("heuristic for '{what}' {s:?}"), status));
            }
            results.truncate(count.max(0) as usize);
            results.retain(|r| {
                r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                    && r.workspaceSize <= ops.workspace_bytes
            });
            results
        };
        let Some(first) = found.first() else {
            return Err(BackendError::Unsupported(format!(
                "cuBLASLt has no algorithm for '{what}' {s:?}"
            )));
        };
        let mut pick = 0;
        let mut timed = None;
        if may_time && found.len() > 1 {
            let mut times = Vec::with_capacity(found.len());
            for r in &found {
                times.push(self.time_algo(stream, &plan, &r.algo, ops)?);
            }
            // Fastest; a later candidate must win by 2% to replace an earlier
            // one, so that timing noise does not reorder near-equal ones.
            for (i, &us) in times.iter().enumerate() {
                if us < times[pick] * 0.98 {
                    pick = i;
                }
            }
            timed = Some(found[pick].algo.data);
            tracing::debug!(
                "GEMM '{what}' {s:?}: candidate {pick} of {} ({:.2} us; first {:.2} us; waves {:.2})",
                found.len(),
                times[pick],
                times[0],
                found[pick].wavesCount
            );
        } else {
            tracing::debug!(
                "GEMM '{what}' {s:?}: first of {} (waves {:.2})",
                found.len(),
                first.wavesCount
            );
        }
        plan.algo = found[pick].algo;
        Ok((plan, timed))
    }

    /// Mean microseconds of one launch of `algo` (3 warm-up launches, then
    /// 10 between events).
    fn time_algo(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
        ops: Operands,
    ) -> Result<f32, BackendError> {
        let ev = |what| {
            stream
                .context()
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| BackendError::Cuda(format!("timing event ({what}): {e}")))
        };
        let (start, end) = (ev("start")?, ev("end")?);
        for _ in 0..3 {
            self.launch(stream, plan, algo, ops)
                .map_err(|e| lt_err("timing launch", e))?;
        }
        start
            .record(stream)
            .map_err(|e| BackendError::Cuda(format!("event record: {e}")))?;
        const RUNS: usize = 10;
        for _ in 0..RUNS {
            self.launch(stream, plan, algo, ops)
                .map_err(|e| lt_err("timing launch", e))?;
        }
        end.record(stream)
            .map_err(|e| BackendError::Cuda(format!("event record: {e}")))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| BackendError::Cuda(format!("event time: {e}")))?;
        Ok(ms * 1000.0 / RUNS as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_choices_round_trip_and_skip_bad_lines() {
        let text = "640 64 2048 640 1 2 3 4 5 6 7 18446744073709551615\n\
                    1536 64 640 1536 0 0 0 0 0 0 0 9\nnot a line\n1 2 3 4 5\n";
        let c = Choices::parse(text);
        assert_eq!(c.map.len(), 2);
        let s = Shape {
            m: 640,
            t: 64,
            k: 2048,
            ldc: 640,
        };
        assert_eq!(c.map.get(&s), Some(&[1, 2, 3, 4, 5, 6, 7, u64::MAX]));
        // Sorted text: parsing what was rendered gives the same choices.
        let again = Choices::parse(&c.render());
        assert_eq!(again, c);
        assert_eq!(
            c.render(),
            "1536 64 640 1536 0 0 0 0 0 0 0 9\n640 64 2048 640 1 2 3 4 5 6 7 18446744073709551615\n"
        );
    }

    #[test]
    fn row_counts_share_a_bucket_of_16() {
        let s = |t| Shape {
            m: 640,
            t,
            k: 1024,
            ldc: 640,
        };
        assert_eq!(bucket(s(49)), s(64));
        assert_eq!(bucket(s(64)), s(64));
        assert_eq!(bucket(s(65)).t, 80);
        assert_eq!(bucket(s(5)).t, 16);
    }
}
