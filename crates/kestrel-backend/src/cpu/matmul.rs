//! `out[t] = W · x[t]` for a stored (usually quantized) weight matrix.
//!
//! Activations are quantized once per call (see `act_quant`), then the
//! output rows are split over the thread pool:
//! * one token (decode, a matrix-vector product, memory-bound): row ranges
//!   of ~64 KB of weights, claimed dynamically by the calling thread and
//!   the pool's workers (`parallel::run_chunks`), so a late or busy core
//!   never holds the others up;
//! * several tokens (prefill): tiles of weight rows, each computed against
//!   all tokens in chunks that fit in L2, so every weight block is read from
//!   memory once and reused from cache for every token; the kernels
//!   themselves decode each weight block once for 4-8 tokens. Tiles produce
//!   a transposed `[row][token]` result that is transposed back at the end.

use kestrel_formats::{DType, TensorView};

use crate::cpu::act_quant::{ActFormat, ActRow, QuantActs};
use crate::cpu::features::SimdLevel;
use crate::cpu::parallel::chunks_mut;
use crate::cpu::quant_dot::{rows_fn, weight_offset, RowsFn};
use crate::cpu::storage::AlignedBytes;
use crate::error::BackendError;

/// A weight matrix `[rows, cols]` in its stored format.
#[derive(Debug)]
pub struct CpuWeight {
    pub(crate) name: String,
    pub(crate) dtype: DType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) row_bytes: usize,
    /// Rows are in the x8 layout (`cpu::repack`) rather than GGML's.
    pub(crate) x8: bool,
    pub(crate) data: AlignedBytes,
}

impl CpuWeight {
    /// Copies a tensor view (2-D `[out, in]`, or 1-D as one row), into the
    /// x8 layout when `x8` (only for the types that have one).
    pub fn from_view(t: &TensorView<'_>, x8: bool) -> Result<CpuWeight, BackendError> {
        let bad = |problem: String| BackendError::Tensor {
            name: t.name.to_string(),
            problem,
        };
        if t.shape.is_empty() || t.shape.len() > 2 {
            return Err(bad(format!(
                "expected a 2-D weight [out, in], got shape {:?}",
                t.shape
            )));
        }
        let rows = t.rows();
        let cols = t.cols();
        let row_bytes = t.dtype.row_bytes(cols).ok_or_else(|| {
            bad(format!(
                "row length {cols} is not a multiple of the {} block size {}",
                t.dtype,
                t.dtype.block_elems()
            ))
        })?;
        let expected = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| bad(format!("shape {:?} overflows the address space", t.shape)))?;
        if t.data.len() != expected {
            return Err(bad(format!(
                "{} data of shape {:?} needs {expected} bytes, got {}",
                t.dtype,
                t.shape,
                t.data.len()
            )));
        }
        let x8 = x8 && crate::cpu::repack::has_x8(t.dtype);
        let data = if x8 {
            AlignedBytes::build(t.data.len(), t.name, |dst| {
                for (s, d) in t
                    .data
                    .chunks_exact(row_bytes)
                    .zip(dst.chunks_exact_mut(row_bytes))
                {
                    crate::cpu::repack::repack_row(t.dtype, s, d);
                }
            })?
        } else {
            AlignedBytes::copy_from(t.data, t.name)?
        };
        Ok(CpuWeight {
            name: t.name.to_string(),
            dtype: t.dtype,
            rows,
            cols,
            row_bytes,
            x8,
            data,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stored bytes of row `r` (`r < rows`).
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        &self.data.as_slice()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// Bytes of weights per decode chunk: small enough that the caller never
/// waits long for a helper's last chunk (~5 µs), large enough to amortise
/// claiming it.
const DECODE_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of quantized activations per token chunk in prefill (fits in L2
/// next to the weight tile).
const TOKEN_CHUNK_BYTES: usize = 96 << 10;
/// Bytes of weights per prefill tile (stays in L1/L2 while all token chunks
/// pass over it).
const TILE_BYTES: usize = 16 << 10;

/// `out = x · Wᵀ`: `x` is `[n_tok, cols]`, `out` is `[n_tok, rows]`.
/// Shapes are checked by the caller.
pub fn matmul(level: SimdLevel, x: &[f32], n_tok: usize, w: &CpuWeight, out: &mut [f32]) {
    let (f, used) = rows_fn(level, w.dtype, w.x8);
    let acts = QuantActs::new(
        ActFormat::for_weight(w.dtype),
        x,
        n_tok,
        w.cols,
        weight_offset(used, w.dtype),
        w.x8,
        level,
    );
    let rows = acts.rows_vec();
    if n_tok == 1 {
        matvec(f, w, &rows, out);
    } else {
        matmat(f, w, &rows, out);
    }
}

fn matvec(f: RowsFn, w: &CpuWeight, x: &[ActRow<'_>], out: &mut [f32]) {
    let rb = w.row_bytes.max(1);
    let chunk = (DECODE_CHUNK_BYTES / rb).max(1);
    let data = w.data.as_slice();
    chunks_mut(out, chunk, |ci, o| {
        let r0 = ci * chunk;
        let wr = &data[r0 * rb..(r0 + o.len()) * rb];
        // SAFETY: `f` comes from `rows_fn`, which only returns kernels of an
        // available SIMD level; `o` holds one value per row of `wr`.
        unsafe { f(wr, rb, x, o, 1) };
    });
}

fn matmat(f: RowsFn, w: &CpuWeight, x: &[ActRow<'_>], out: &mut [f32]) {
    let n_tok = x.len();
    let threads = rayon::current_num_threads().max(1);
    let rb = w.row_bytes.max(1);
    // Tile height: fits TILE_BYTES, yet leaves a few tiles per thread.
    let tile = (TILE_BYTES / rb)
        .clamp(1, 64)
        .min(w.rows.div_ceil(threads * 4).max(1));
    let act_row_bytes = w.cols + w.cols / 8; // quants + scales/sums, roughly
    let tok_chunk = (TOKEN_CHUNK_BYTES / act_row_bytes.max(1)).clamp(1, n_tok);
    let data = w.data.as_slice();
    let mut tr = vec![0f32; w.rows * n_tok];
    chunks_mut(&mut tr, tile * n_tok, |ti, o| {
        let r0 = ti * tile;
        let nr = o.len() / n_tok;
        let wr = &data[r0 * rb..(r0 + nr) * rb];
        for t0 in (0..n_tok).step_by(tok_chunk) {
            let t1 = (t0 + tok_chunk).min(n_tok);
            // SAFETY: as in `matvec`; row r of the tile writes
            // o[r * n_tok + t0 .. r * n_tok + t1], inside `o`.
            unsafe { f(wr, rb, &x[t0..t1], &mut o[t0..], n_tok) };
        }
    });
    // Back to token-major order.
    let rows = w.rows;
    chunks_mut(out, rows * 16, |ci, o| {
        for (k, orow) in o.chunks_mut(rows).enumerate() {
            let t = ci * 16 + k;
            for (r, v) in orow.iter_mut().enumerate() {
                *v = tr[r * n_tok + t];
            }
        }
    });
}

/// Dequantizes row `r` of `w` into `out` (`cols` values).
pub fn dequantize_row(w: &CpuWeight, r: usize, out: &mut [f32]) -> Result<(), BackendError> {
    let unpacked;
    let row = if w.x8 {
        let mut buf = vec![0u8; w.row_bytes];
        crate::cpu::repack::unpack_row(w.dtype, w.row(r), &mut buf);
        unpacked = buf;
        &unpacked[..]
    } else {
        w.row(r)
    };
    kestrel_formats::dequantize_row(w.dtype, row, out).map_err(|e| BackendError::Tensor {
        name: w.name.clone(),
        problem: format!("dequantizing row {r}: {e}"),
    })
}

/// Memory bandwidth of a matrix-vector product: builds a `rows x cols`
/// matrix of `dtype` with random-ish values, runs `iters` products after one
/// warm-up, and returns the weight bytes streamed per second in GB/s. Uses
/// the kernel level and thread pool the process is set up with.
pub fn bench_matvec(dtype: DType, rows: usize, cols: usize, iters: usize) -> Result<f64, BackendError> {
    let level = crate::cpu::features::SimdLevel::from_env()?.unwrap_or_else(SimdLevel::best);
    let row_bytes = dtype.row_bytes(cols).ok_or_else(|| {
        BackendError::Other(format!(
            "bench_matvec: cols = {cols} is not a multiple of the {dtype} block size {}",
            dtype.block_elems()
        ))
    })?;
    // Quantize a handful of distinct rows and repeat them: quantizing 178 MB
    // row by row would take longer than the benchmark.
    let distinct = 64.min(rows.max(1));
    let mut proto = Vec::with_capacity(distinct * row_bytes);
    let mut src = vec![0f32; cols];
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..distinct {
        for v in src.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *v = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        }
        kestrel_formats::quantize_row(dtype, &src, &mut proto)
            .map_err(|e| BackendError::Other(format!("bench_matvec: quantize {dtype}: {e}")))?;
    }
    let mut bytes = Vec::with_capacity(rows * row_bytes);
    while bytes.len() < rows * row_bytes {
        let take = (rows * row_bytes - bytes.len()).min(proto.len());
        bytes.extend_from_slice(&proto[..take]);
    }
    let shape = [rows, cols];
    let view = TensorView {
        name: "bench",
        dtype,
        shape: &shape,
        data: &bytes,
    };
    let w = CpuWeight::from_view(&view, crate::cpu::quant_dot::uses_x8(level, dtype))?;
    drop(bytes);
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let mut out = vec![0f32; rows];
    matmul(level, &x, 1, &w, &mut out);
    let iters = iters.max(1);
    let start = std::time::Instant::now();
    for _ in 0..iters {
        matmul(level, &x, 1, &w, &mut out);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((rows * row_bytes * iters) as f64 / secs / 1e9)
}
