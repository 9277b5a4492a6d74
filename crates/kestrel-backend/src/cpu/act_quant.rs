//! Quantization of activation rows to 8-bit blocks before a matmul, the way
//! llama.cpp does it, so that every weight block meets its activations in an
//! integer dot product and the numerics follow llama.cpp's closely:
//!
//! * 32-element blocks (for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights): scale
//!   `d = max|x| / 127` rounded to f16 as ggml stores it, quants
//!   `round_half_even(x * 127 / max|x|)`, plus the block's quant sum (weights
//!   with an offset or an unsigned encoding need `Σ q_x`).
//! * 256-element super-blocks (for K-quant weights): ggml's Q8_K: the scale
//!   maps the largest-magnitude element to -127, quants are clamped to 127,
//!   plus sums of every 16 quants (the K-quants' mins and Q6_K's offset).

use half::f16;
use kestrel_formats::DType;
use rayon::prelude::*;

use crate::cpu::features::{leveled, SimdLevel};

/// Elements per activation block for the 32-block weight types.
pub const QB: usize = 32;
/// Elements per activation super-block for the K-quant weight types.
pub const QKB: usize = 256;

/// The form activations take for a given weight type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActFormat {
    /// Plain f32 (float weights).
    F32,
    /// 32-element blocks with an f32 scale and the quant sum.
    Q8x32,
    /// 256-element blocks with an f32 scale and per-16 quant sums.
    Q8x256,
}

impl ActFormat {
    pub fn for_weight(dtype: DType) -> ActFormat {
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => ActFormat::F32,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => ActFormat::Q8x32,
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::Q8_K => {
                ActFormat::Q8x256
            }
        }
    }

    fn block(self) -> usize {
        match self {
            ActFormat::F32 => 1,
            ActFormat::Q8x32 => QB,
            ActFormat::Q8x256 => QKB,
        }
    }
}

/// One activation row as the dot-product kernels see it. Only the fields of
/// the row's format are filled; the others are empty.
#[derive(Clone, Copy, Debug)]
pub struct ActRow<'a> {
    /// f32 activations (`ActFormat::F32`).
    pub f: &'a [f32],
    /// Quants, `cols` of them.
    pub qs: &'a [i8],
    /// One scale per block.
    pub d: &'a [f32],
    /// Per-32 quant sums (`Q8x32`).
    pub sums: &'a [i32],
    /// Per-16 quant sums (`Q8x256`).
    pub bsums: &'a [i16],
    /// Per-32 `-(offset / 8) * Σq` (`Q8x32`): what each of the 8 i32 lanes of
    /// a SIMD block dot must add to remove an unsigned weight encoding's
    /// offset (see `quant_dot::weight_offset`).
    pub lane_off: &'a [i32],
    /// Per-32 `d * Σq / 8` (`Q8x32`): the activation side of a weight
    /// offset (Q4_1/Q5_1 `m`), spread over 8 lanes.
    pub dxs8: &'a [f32],
    /// Per-32 `-offset * Σq` (`Q8x32`): the whole offset correction of a
    /// block, for kernels that keep one block per lane (x8 layout).
    pub blk_off: &'a [i32],
}

/// All activation rows of one matmul, quantized for one weight type.
pub struct QuantActs<'a> {
    pub format: ActFormat,
    pub rows: usize,
    pub cols: usize,
    f: &'a [f32],
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<i32>,
    bsums: Vec<i16>,
    lane_off: Vec<i32>,
    dxs8: Vec<f32>,
    blk_off: Vec<i32>,
}

/// One row's work for the 32-block quantization: (x, quants), (scales, sums).
type Row32<'r> = ((&'r [f32], &'r mut [i8]), (&'r mut [f32], &'r mut [i32]));
/// One row's work for the 256-block quantization: (x, quants), (scales, 16-sums).
type Row256<'r> = ((&'r [f32], &'r mut [i8]), (&'r mut [f32], &'r mut [i16]));

/// Rows*cols above which quantization is spread over the thread pool.
const PAR_THRESHOLD: usize = 1 << 16;

impl<'a> QuantActs<'a> {
    /// Quantizes `x` (`rows` x `cols`, row-major). `cols` must be a multiple
    /// of the format's block (the caller checked it against the weight).
    /// `offset` (a multiple of 8) is the weight encoding's offset that
    /// `lane_off` / `blk_off` remove; `x8` permutes every whole group of 256
    /// quants for the x8 weight layout (`cpu::repack`); `level` picks the
    /// instruction set the quantization loop is compiled for.
    pub fn new(
        format: ActFormat,
        x: &'a [f32],
        rows: usize,
        cols: usize,
        offset: i32,
        x8: bool,
        level: SimdLevel,
    ) -> QuantActs<'a> {
        debug_assert_eq!(x.len(), rows * cols);
        debug_assert_eq!(cols % format.block(), 0);
        let mut a = QuantActs {
            format,
            rows,
            cols,
            f: x,
            qs: Vec::new(),
            d: Vec::new(),
            sums: Vec::new(),
            bsums: Vec::new(),
            lane_off: Vec::new(),
            dxs8: Vec::new(),
            blk_off: Vec::new(),
        };
        if format == ActFormat::F32 || cols == 0 {
            return a;
        }
        let nb = cols / format.block();
        a.qs = vec![0i8; rows * cols];
        a.d = vec![0f32; rows * nb];
        let par = rows > 1 && rows * cols >= PAR_THRESHOLD;
        match format {
            ActFormat::F32 => {}
            ActFormat::Q8x32 => {
                a.sums = vec![0i32; rows * nb];
                let work = |((xr, qr), (dr, sr)): Row32<'_>| quantize_row_q8x32(level, xr, qr, dr, sr);
                let it_x = x.chunks_exact(cols);
                if par {
                    x.par_chunks_exact(cols)
                        .zip(a.qs.par_chunks_exact_mut(cols))
                        .zip(a.d.par_chunks_exact_mut(nb).zip(a.sums.par_chunks_exact_mut(nb)))
                        .for_each(work);
                } else {
                    it_x.zip(a.qs.chunks_exact_mut(cols))
                        .zip(a.d.chunks_exact_mut(nb).zip(a.sums.chunks_exact_mut(nb)))
                        .for_each(work);
                }
                a.lane_off = a.sums.iter().map(|&s| -(offset / 8) * s).collect();
                a.blk_off = a.sums.iter().map(|&s| -offset * s).collect();
                a.dxs8 =
                    a.d.iter()
                        .zip(&a.sums)
                        .map(|(&d, &s)| d * s as f32 / 8.0)
                        .collect();
                if x8 {
                    for row in a.qs.chunks_exact_mut(cols) {
                        crate::cpu::repack::permute_row(row, cols);
                    }
                }
            }
            ActFormat::Q8x256 => {
                let nbs = cols / 16;
                a.bsums = vec![0i16; rows * nbs];
                let work = |((xr, qr), (dr, br)): Row256<'_>| quantize_row_q8x256(level, xr, qr, dr, br);
                if par {
                    x.par_chunks_exact(cols)
                        .zip(a.qs.par_chunks_exact_mut(cols))
                        .zip(
                            a.d.par_chunks_exact_mut(nb)
                                .zip(a.bsums.par_chunks_exact_mut(nbs)),
                        )
                        .for_each(work);
                } else {
                    x.chunks_exact(cols)
                        .zip(a.qs.chunks_exact_mut(cols))
                        .zip(a.d.chunks_exact_mut(nb).zip(a.bsums.chunks_exact_mut(nbs)))
                        .for_each(work);
                }
            }
        }
        a
    }

    /// Row `t` (must be `< rows`).
    pub fn row(&self, t: usize) -> ActRow<'_> {
        let c = self.cols;
        match self.format {
            ActFormat::F32 => ActRow {
                f: &self.f[t * c..(t + 1) * c],
                qs: &[],
                d: &[],
                sums: &[],
                bsums: &[],
                lane_off: &[],
                dxs8: &[],
                blk_off: &[],
            },
            ActFormat::Q8x32 => {
                let nb = c / QB;
                ActRow {
                    f: &[],
                    qs: &self.qs[t * c..(t + 1) * c],
                    d: &self.d[t * nb..(t + 1) * nb],
                    sums: &self.sums[t * nb..(t + 1) * nb],
                    bsums: &[],
                    lane_off: &self.lane_off[t * nb..(t + 1) * nb],
                    dxs8: &self.dxs8[t * nb..(t + 1) * nb],
                    blk_off: &self.blk_off[t * nb..(t + 1) * nb],
                }
            }
            ActFormat::Q8x256 => {
                let nb = c / QKB;
                let nbs = c / 16;
                ActRow {
                    f: &[],
                    qs: &self.qs[t * c..(t + 1) * c],
                    d: &self.d[t * nb..(t + 1) * nb],
                    sums: &[],
                    bsums: &self.bsums[t * nbs..(t + 1) * nbs],
                    lane_off: &[],
                    dxs8: &[],
                    blk_off: &[],
                }
            }
        }
    }

    /// All rows, in order.
    pub fn rows_vec(&self) -> Vec<ActRow<'_>> {
        (0..self.rows).map(|t| self.row(t)).collect()
    }
}

leveled!(quantize_row_q8x32, q8x32_body, (x: &[f32], qs: &mut [i8], d: &mut [f32], sums: &mut [i32]));
leveled!(quantize_row_q8x256, q8x256_body, (x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]));

/// ggml's Q8_0 activation quantization (as its x86 SIMD path does it:
/// round half to even, scale rounded to f16).
#[inline(always)]
fn q8x32_body(x: &[f32], qs: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    for (((xb, qb), db), sb) in x
        .chunks_exact(QB)
        .zip(qs.chunks_exact_mut(QB))
        .zip(d.iter_mut())
        .zip(sums.iter_mut())
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        *db = f16::from_f32(amax / 127.0).to_f32();
        let mut s = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            // |v * id| <= 127 (up to rounding), so the cast cannot wrap.
            let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
            *q = r;
            s += r as i32;
        }
        *sb = s;
    }
}

/// ggml's Q8_K quantization: the largest-magnitude element maps to -127.
#[inline(always)]
fn q8x256_body(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for (((xb, qb), db), bb) in x
        .chunks_exact(QKB)
        .zip(qs.chunks_exact_mut(QKB))
        .zip(d.iter_mut())
        .zip(bsums.chunks_exact_mut(QKB / 16))
    {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *db = 0.0;
            qb.fill(0);
            bb.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8;
        }
        for (b, q16) in bb.iter_mut().zip(qb.chunks_exact(16)) {
            *b = q16.iter().map(|&q| q as i16).sum();
        }
        *db = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8x32_roundtrip_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.13).collect();
        let a = QuantActs::new(ActFormat::Q8x32, &x, 1, 64, 16, false, SimdLevel::best());
        let r = a.row(0);
        for b in 0..2 {
            let amax = x[b * 32..(b + 1) * 32].iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut s = 0;
            for j in 0..32 {
                let q = r.qs[b * 32 + j] as f32;
                s += r.qs[b * 32 + j] as i32;
                // The f16 scale moves the grid by at most 2^-11 relative.
                assert!((q * r.d[b] - x[b * 32 + j]).abs() <= amax / 127.0 * 0.5 + amax * 1e-3);
            }
            assert_eq!(s, r.sums[b]);
            assert_eq!(r.lane_off[b], -2 * s);
            assert_eq!(r.blk_off[b], -16 * s);
            assert!((r.dxs8[b] - r.d[b] * s as f32 / 8.0).abs() <= 1e-6 * r.dxs8[b].abs());
        }
    }

    #[test]
    fn q8x256_maps_largest_magnitude_to_minus_127() {
        let mut x: Vec<f32> = (0..512).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.01).collect();
        x[7] = -3.0;
        x[300] = 2.5;
        let a = QuantActs::new(ActFormat::Q8x256, &x, 2, 256, 0, false, SimdLevel::best());
        let r0 = a.row(0);
        assert_eq!(r0.qs[7], -127);
        assert!((r0.d[0] - 3.0 / 127.0).abs() < 1e-7);
        let r1 = a.row(1);
        assert_eq!(r1.qs[300 - 256], -127);
        assert!(r1.d[0] < 0.0, "positive max gives a negative scale");
        for (g, &b) in r1.bsums.iter().enumerate() {
            let s: i16 = r1.qs[g * 16..(g + 1) * 16].iter().map(|&q| q as i16).sum();
            assert_eq!(s, b);
        }
        for (j, &q) in r1.qs.iter().enumerate() {
            assert!((q as f32 * r1.d[0] - x[256 + j]).abs() <= 2.5 / 127.0 * 0.5 + 1e-6);
        }
    }

    #[test]
    fn zero_rows_quantize_to_zero() {
        let x = vec![0f32; 256];
        let a = QuantActs::new(ActFormat::Q8x256, &x, 1, 256, 0, false, SimdLevel::best());
        assert_eq!(a.row(0).d[0], 0.0);
        assert!(a.row(0).qs.iter().all(|&q| q == 0));
        let a = QuantActs::new(ActFormat::Q8x32, &x, 1, 256, 0, false, SimdLevel::best());
        assert!(a.row(0).d.iter().all(|&d| d == 0.0));
    }
}
