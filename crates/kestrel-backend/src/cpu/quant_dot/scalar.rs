//! Portable dot products of one stored weight row with one activation row.
//! They are the reference the SIMD kernels are tested against and the
//! fallback for CPUs (and types) without a SIMD version.
//!
//! Every quantized kernel accumulates the integer products of one weight
//! block exactly and applies the float scales once per block (per sub-block
//! scale for K-quants), as ggml does.

use half::{bf16, f16};

use super::layout::*;
use crate::cpu::act_quant::ActRow;

#[inline]
pub(crate) fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Number of 32-blocks of an activation row, checking the weight row holds
/// as many blocks of `bb` bytes.
#[inline]
fn blocks32(w: &[u8], x: &ActRow<'_>, bb: usize) -> usize {
    let nb = x.qs.len() / 32;
    assert!(
        w.len() == nb * bb && x.d.len() == nb && x.sums.len() == nb,
        "weight row / activation row size mismatch"
    );
    nb
}

#[inline]
fn blocks256(w: &[u8], x: &ActRow<'_>, bb: usize) -> usize {
    let nb = x.qs.len() / 256;
    assert!(
        w.len() == nb * bb && x.d.len() == nb && x.bsums.len() == nb * 16,
        "weight row / activation row size mismatch"
    );
    nb
}

#[inline]
fn idot(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&p, &q)| p as i32 * q as i32).sum()
}

pub fn dot_q8_0(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks32(w, x, Q8_0_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
        let mut s = 0i32;
        for (j, &q) in blk[2..].iter().enumerate() {
            s += (q as i8) as i32 * x.qs[b * 32 + j] as i32;
        }
        acc += rd_f16(blk, 0) * x.d[b] * s as f32;
    }
    acc
}

/// Q4_0 and Q4_1: nibble j is element j (low) and j+16 (high).
fn nib_dot(qs: &[u8], xq: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (qs[j] & 0x0F) as i32 * xq[j] as i32 + (qs[j] >> 4) as i32 * xq[j + 16] as i32;
    }
    s
}

pub fn dot_q4_0(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks32(w, x, Q4_0_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q4_0_BYTES..(b + 1) * Q4_0_BYTES];
        // Unsigned nibbles minus the offset 8: Σ(q-8)x = Σqx - 8Σx.
        let s = nib_dot(&blk[2..18], &x.qs[b * 32..b * 32 + 32]) - 8 * x.sums[b];
        acc += rd_f16(blk, 0) * x.d[b] * s as f32;
    }
    acc
}

pub fn dot_q4_1(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks32(w, x, Q4_1_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q4_1_BYTES..(b + 1) * Q4_1_BYTES];
        let s = nib_dot(&blk[4..20], &x.qs[b * 32..b * 32 + 32]);
        acc += rd_f16(blk, 0) * x.d[b] * s as f32 + rd_f16(blk, 2) * x.d[b] * x.sums[b] as f32;
    }
    acc
}

/// Q5_0 and Q5_1: nibbles as Q4, bit j of `qh` is the fifth bit of element j.
fn nib5_dot(qh: u32, qs: &[u8], xq: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as i32 | ((((qh >> j) & 1) as i32) << 4);
        let hi = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
        s += lo * xq[j] as i32 + hi * xq[j + 16] as i32;
    }
    s
}

pub fn dot_q5_0(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks32(w, x, Q5_0_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q5_0_BYTES..(b + 1) * Q5_0_BYTES];
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        let s = nib5_dot(qh, &blk[6..22], &x.qs[b * 32..b * 32 + 32]) - 16 * x.sums[b];
        acc += rd_f16(blk, 0) * x.d[b] * s as f32;
    }
    acc
}

pub fn dot_q5_1(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks32(w, x, Q5_1_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q5_1_BYTES..(b + 1) * Q5_1_BYTES];
        let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
        let s = nib5_dot(qh, &blk[8..24], &x.qs[b * 32..b * 32 + 32]);
        acc += rd_f16(blk, 0) * x.d[b] * s as f32 + rd_f16(blk, 2) * x.d[b] * x.sums[b] as f32;
    }
    acc
}

pub fn dot_q2_k(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks256(w, x, Q2_K_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q2_K_BYTES..(b + 1) * Q2_K_BYTES];
        let scales = &blk[Q2_K_SCALES..Q2_K_SCALES + 16];
        let qs = &blk[Q2_K_QS..Q2_K_QS + 64];
        let xq = &x.qs[b * 256..(b + 1) * 256];
        let bs = &x.bsums[b * 16..(b + 1) * 16];
        let mut sumi = 0i32;
        let mut summ = 0i32;
        // Element e = 128n + 32j + l holds bits 2j..2j+2 of qs[32n + l];
        // its scale/min byte is scales[e / 16].
        for (g, &sc) in scales.iter().enumerate() {
            let (n, j, l0) = (g / 8, (g % 8) / 2, (g % 2) * 16);
            let mut s = 0i32;
            for l in l0..l0 + 16 {
                let q = ((qs[32 * n + l] >> (2 * j)) & 3) as i32;
                s += q * xq[128 * n + 32 * j + l] as i32;
            }
            sumi += (sc & 0x0F) as i32 * s;
            summ += (sc >> 4) as i32 * bs[g] as i32;
        }
        let dx = x.d[b];
        acc += rd_f16(blk, Q2_K_D) * dx * sumi as f32 - rd_f16(blk, Q2_K_DMIN) * dx * summ as f32;
    }
    acc
}

pub fn dot_q3_k(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks256(w, x, Q3_K_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q3_K_BYTES..(b + 1) * Q3_K_BYTES];
        let hmask = &blk[Q3_K_HMASK..Q3_K_HMASK + 32];
        let qs = &blk[Q3_K_QS..Q3_K_QS + 64];
        let scales = q3k_scales(&blk[Q3_K_SCALES..Q3_K_SCALES + 12]);
        let xq = &x.qs[b * 256..(b + 1) * 256];
        let mut sumi = 0i32;
        for (g, &sc) in scales.iter().enumerate() {
            let (n, j, l0) = (g / 8, (g % 8) / 2, (g % 2) * 16);
            let m = 1u8 << (4 * n + j);
            let mut s = 0i32;
            for l in l0..l0 + 16 {
                let q = ((qs[32 * n + l] >> (2 * j)) & 3) as i32 - if hmask[l] & m != 0 { 0 } else { 4 };
                s += q * xq[128 * n + 32 * j + l] as i32;
            }
            sumi += sc as i32 * s;
        }
        acc += rd_f16(blk, Q3_K_D) * x.d[b] * sumi as f32;
    }
    acc
}

/// Sixteen 6-bit Q3_K scales (already minus 32): low nibbles in bytes 0..8,
/// high 2-bit pairs in bytes 8..12.
pub(crate) fn q3k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K super-block.
#[inline]
pub(crate) fn k4_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// Σ_j min_j · (sum of the 32 activation quants of sub-block j).
#[inline]
pub(crate) fn k4_min_sum(mn: &[u8; 8], bsums: &[i16]) -> i32 {
    (0..8)
        .map(|j| mn[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32))
        .sum()
}

pub fn dot_q4_k(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks256(w, x, Q4_K_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q4_K_BYTES..(b + 1) * Q4_K_BYTES];
        let (sc, mn) = k4_scales_mins(&blk[Q4_K_SCALES..Q4_K_SCALES + 12]);
        let qs = &blk[Q4_K_QS..Q4_K_QS + 128];
        let xq = &x.qs[b * 256..(b + 1) * 256];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                lo += (qs[32 * c + l] & 0x0F) as i32 * xq[64 * c + l] as i32;
                hi += (qs[32 * c + l] >> 4) as i32 * xq[64 * c + 32 + l] as i32;
            }
            sumi += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
        }
        let summ = k4_min_sum(&mn, &x.bsums[b * 16..(b + 1) * 16]);
        let dx = x.d[b];
        acc += rd_f16(blk, 0) * dx * sumi as f32 - rd_f16(blk, 2) * dx * summ as f32;
    }
    acc
}

pub fn dot_q5_k(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks256(w, x, Q5_K_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q5_K_BYTES..(b + 1) * Q5_K_BYTES];
        let (sc, mn) = k4_scales_mins(&blk[Q5_K_SCALES..Q5_K_SCALES + 12]);
        let qh = &blk[Q5_K_QH..Q5_K_QH + 32];
        let qs = &blk[Q5_K_QS..Q5_K_QS + 128];
        let xq = &x.qs[b * 256..(b + 1) * 256];
        let mut sumi = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let ql = (qs[32 * c + l] & 0x0F) as i32 | ((((qh[l] >> (2 * c)) & 1) as i32) << 4);
                let qu = (qs[32 * c + l] >> 4) as i32 | ((((qh[l] >> (2 * c + 1)) & 1) as i32) << 4);
                lo += ql * xq[64 * c + l] as i32;
                hi += qu * xq[64 * c + 32 + l] as i32;
            }
            sumi += sc[2 * c] as i32 * lo + sc[2 * c + 1] as i32 * hi;
        }
        let summ = k4_min_sum(&mn, &x.bsums[b * 16..(b + 1) * 16]);
        let dx = x.d[b];
        acc += rd_f16(blk, 0) * dx * sumi as f32 - rd_f16(blk, 2) * dx * summ as f32;
    }
    acc
}

pub fn dot_q6_k(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks256(w, x, Q6_K_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q6_K_BYTES..(b + 1) * Q6_K_BYTES];
        let ql = &blk[Q6_K_QL..Q6_K_QL + 128];
        let qh = &blk[Q6_K_QH..Q6_K_QH + 64];
        let sc = &blk[Q6_K_SCALES..Q6_K_SCALES + 16];
        let xq = &x.qs[b * 256..(b + 1) * 256];
        // Per 16-element group: Σ q·x with unsigned q in 0..64.
        let mut g = [0i32; 16];
        for n in 0..2 {
            for l in 0..32 {
                let (a, c, h) = (ql[64 * n + l], ql[64 * n + 32 + l], qh[32 * n + l]);
                let q = [
                    (a & 0x0F) | ((h & 3) << 4),
                    (c & 0x0F) | (((h >> 2) & 3) << 4),
                    (a >> 4) | (((h >> 4) & 3) << 4),
                    (c >> 4) | (((h >> 6) & 3) << 4),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    let e = 128 * n + 32 * k + l;
                    g[e / 16] += qk as i32 * xq[e] as i32;
                }
            }
        }
        let bs = &x.bsums[b * 16..(b + 1) * 16];
        let mut sumi = 0i32;
        for k in 0..16 {
            // The stored quants are q + 32: Σ(q-32)x = Σqx - 32Σx.
            sumi += (sc[k] as i8) as i32 * (g[k] - 32 * bs[k] as i32);
        }
        acc += rd_f16(blk, Q6_K_D) * x.d[b] * sumi as f32;
    }
    acc
}

pub fn dot_q8_k(w: &[u8], x: &ActRow<'_>) -> f32 {
    let nb = blocks256(w, x, Q8_K_BYTES);
    let mut acc = 0f32;
    for b in 0..nb {
        let blk = &w[b * Q8_K_BYTES..(b + 1) * Q8_K_BYTES];
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        let wq: Vec<i8> = blk[4..260].iter().map(|&q| q as i8).collect();
        let s = idot(&wq, &x.qs[b * 256..(b + 1) * 256]);
        acc += d * x.d[b] * s as f32;
    }
    acc
}

/// f32 dot with eight partial sums (so the compiler can vectorise it).
#[inline]
fn dot_lanes(n: usize, w: impl Fn(usize) -> f32, x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for k in 0..8 {
            acc[k] += w(i + k) * x[i + k];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (i, &xi) in x.iter().enumerate().take(n).skip(full) {
        s += w(i) * xi;
    }
    s
}

pub fn dot_f32(w: &[u8], x: &ActRow<'_>) -> f32 {
    let n = x.f.len();
    assert_eq!(w.len(), n * 4, "weight row / activation row size mismatch");
    dot_lanes(
        n,
        |i| f32::from_le_bytes([w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]]),
        x.f,
    )
}

pub fn dot_f16(w: &[u8], x: &ActRow<'_>) -> f32 {
    let n = x.f.len();
    assert_eq!(w.len(), n * 2, "weight row / activation row size mismatch");
    dot_lanes(n, |i| rd_f16(w, 2 * i), x.f)
}

pub fn dot_bf16(w: &[u8], x: &ActRow<'_>) -> f32 {
    let n = x.f.len();
    assert_eq!(w.len(), n * 2, "weight row / activation row size mismatch");
    dot_lanes(
        n,
        |i| bf16::from_bits(u16::from_le_bytes([w[2 * i], w[2 * i + 1]])).to_f32(),
        x.f,
    )
}

/// Plain f32 dot product of two slices (attention, tests).
pub fn dot_f32_slices(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    dot_lanes(n, |i| a[i], b)
}
