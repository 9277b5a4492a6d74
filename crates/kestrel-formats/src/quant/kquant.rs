//! The 256-element "K" super-block quantizations.
//!
//! Common numbering: element `e` of a super-block belongs to sub-block
//! `e / 16` (Q2_K, Q3_K, Q6_K: 16 sub-blocks of 16) or `e / 32` (Q4_K, Q5_K:
//! 8 sub-blocks of 32). Layouts (little-endian, f16 scales unless noted):
//!
//! * Q2_K (84 B): `scales[16]` (low nibble scale, high nibble min, per
//!   sub-block), `qs[64]`, `d`, `dmin`. Element e = 128n + 32j + l (l < 32)
//!   is bits 2j..2j+2 of qs[32n + l]; value = d*sc*q - dmin*m.
//! * Q3_K (110 B): `hmask[32]`, `qs[64]`, `scales[12]`, `d`. Low 2 bits as
//!   Q2_K; the 3rd bit is bit (4n + j) of hmask[l]; q3 = low + 4*high - 4.
//!   Sixteen 6-bit scales: low 4 bits in scales[i] (i < 8) or the high
//!   nibble of scales[i - 8]; top 2 bits at bits 2*(i/4) of scales[8 + i%4];
//!   value = d * (scale - 32) * q3.
//! * Q4_K (144 B): `d`, `dmin`, `scales[12]` (eight 6-bit scales and mins,
//!   see `scale_min_k4`), `qs[128]`; element 64c + l (l < 32) is the low
//!   nibble of qs[32c + l], element 64c + 32 + l its high nibble;
//!   value = d*sc*q - dmin*m.
//! * Q5_K (176 B): as Q4_K with `qh[32]` between scales and qs; the 5th bit
//!   of element 64c + l is bit 2c of qh[l], of 64c + 32 + l bit 2c + 1.
//! * Q6_K (210 B): `ql[128]`, `qh[64]`, `scales[16]: i8`, `d`. For half
//!   n (elements 128n..128n+128) and l < 32, with L = ql[64n..], H = qh[32n..]:
//!   element 128n+l = L[l] low | H[l] bits 0-1, +32: L[l+32] low | bits 2-3,
//!   +64: L[l] high | bits 4-5, +96: L[l+32] high | bits 6-7 (4 low bits,
//!   2 high bits); value = d * scale * (q - 32).
//! * Q8_K (292 B): `d: f32`, `qs[256]: i8`, `bsums[16]: i16` (sums of each
//!   16 quants, used by dot products only); value = d * q.

use super::{abs_max, f16_at_least, push_f16, quantize_value, read_f16};

const QK_K: usize = 256;

/// Decodes the 6-bit (scale, min) pair `j` (0..8) of a Q4_K/Q5_K block:
/// pairs 0..4 sit in the low 6 bits of bytes j and j+4; pairs 4..8 keep their
/// low 4 bits in byte j+4 (scale low nibble, min high nibble) and their top 2
/// bits in the spare top bits of bytes j-4 (scale) and j (min).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Inverse of `scale_min_k4` for all eight pairs (values < 64).
fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    s
}

/// Decodes the sixteen 6-bit Q3_K scales (still offset by 32).
fn scales_q3k(s: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, v) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *v = low | (high << 4);
    }
    out
}

fn pack_scales_q3k(sc: &[u8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (i, v) in sc.iter().enumerate() {
        if i < 8 {
            s[i] |= v & 0x0F;
        } else {
            s[i - 8] |= (v & 0x0F) << 4;
        }
        s[8 + i % 4] |= ((v >> 4) & 3) << (2 * (i / 4));
    }
    s
}

/// Byte index and shift of element `e`'s 2-bit field in Q2_K/Q3_K `qs`.
fn two_bit_pos(e: usize) -> (usize, u32) {
    let (n, r) = (e / 128, e % 128);
    (32 * n + r % 32, 2 * (r / 32) as u32)
}

pub(super) fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = read_f16(b, 80);
    let dmin = read_f16(b, 82);
    for (e, v) in y.iter_mut().enumerate() {
        let (byte, shift) = two_bit_pos(e);
        let q = (qs[byte] >> shift) & 3;
        let s = scales[e / 16];
        *v = d * f32::from(s & 0x0F) * f32::from(q) - dmin * f32::from(s >> 4);
    }
}

pub(super) fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = scales_q3k(&b[96..108]);
    let d = read_f16(b, 108);
    for (e, v) in y.iter_mut().enumerate() {
        let (byte, shift) = two_bit_pos(e);
        let low = i32::from((qs[byte] >> shift) & 3);
        let hbit = (e / 128) * 4 + (e % 128) / 32;
        let high = i32::from((hmask[e % 32] >> hbit) & 1);
        let q = low + 4 * high - 4;
        let sc = i32::from(scales[e / 16]) - 32;
        *v = d * sc as f32 * q as f32;
    }
}

pub(super) fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let dmin = read_f16(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (e, v) in y.iter_mut().enumerate() {
        let (c, r) = (e / 64, e % 64);
        let byte = qs[32 * c + r % 32];
        let q = if r < 32 { byte & 0x0F } else { byte >> 4 };
        let (sc, m) = scale_min_k4(e / 32, scales);
        *v = d * f32::from(sc) * f32::from(q) - dmin * f32::from(m);
    }
}

pub(super) fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let dmin = read_f16(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (e, v) in y.iter_mut().enumerate() {
        let (c, r) = (e / 64, e % 64);
        let byte = qs[32 * c + r % 32];
        let low = if r < 32 { byte & 0x0F } else { byte >> 4 };
        let high = (qh[r % 32] >> (2 * c + r / 32)) & 1;
        let q = low | (high << 4);
        let (sc, m) = scale_min_k4(e / 32, scales);
        *v = d * f32::from(sc) * f32::from(q) - dmin * f32::from(m);
    }
}

/// Position of element `e`'s bits in Q6_K: (ql byte, ql uses high nibble,
/// qh byte, qh shift).
fn six_bit_pos(e: usize) -> (usize, bool, usize, u32) {
    let (n, r) = (e / 128, e % 128);
    let (quarter, l) = (r / 32, r % 32);
    let ql_byte = 64 * n + l + if quarter % 2 == 1 { 32 } else { 0 };
    (ql_byte, quarter >= 2, 32 * n + l, 2 * quarter as u32)
}

pub(super) fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = read_f16(b, 208);
    for (e, v) in y.iter_mut().enumerate() {
        let (lb, hi_nibble, hb, hshift) = six_bit_pos(e);
        let low = if hi_nibble { ql[lb] >> 4 } else { ql[lb] & 0x0F };
        let high = (qh[hb] >> hshift) & 3;
        let q = i32::from(low | (high << 4)) - 32;
        let sc = f32::from(scales[e / 16] as i8);
        *v = d * sc * q as f32;
    }
}

pub(super) fn dequant_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (q, v) in b[4..4 + QK_K].iter().zip(y) {
        *v = d * f32::from(*q as i8);
    }
}

/// Result of the shared "scale and min per sub-block" quantizer.
struct Affine {
    d: half::f16,
    dmin: half::f16,
    scales: Vec<u8>,
    mins: Vec<u8>,
    q: [u8; QK_K],
}

/// Quantizes a super-block as value = d*sc*q - dmin*m with q in [0, levels]
/// and sc, m in [0, scale_max], one (sc, m) per sub-block of `sub` elements.
///
/// The mins are fixed first (rounded up, so m*dmin covers the sub-block's
/// negative extreme), then the scales are sized for what remains (also
/// rounded up), so no value is clipped and the error stays under half a
/// step plus the scale quantization slack.
fn affine_super_block(x: &[f32], sub: usize, levels: i32, scale_max: u8) -> Affine {
    let n_sub = QK_K / sub;
    let smax = f32::from(scale_max);
    let neg_min: Vec<f32> = x
        .chunks_exact(sub)
        .map(|c| -c.iter().copied().fold(0.0f32, f32::min))
        .collect();
    let dmin = f16_at_least(neg_min.iter().copied().fold(0.0, f32::max) / smax);
    let mins: Vec<u8> = neg_min
        .iter()
        .map(|m| ceil_ratio(*m, dmin.to_f32(), scale_max))
        .collect();
    let needed: Vec<f32> = x
        .chunks_exact(sub)
        .zip(&mins)
        .map(|(c, m)| {
            let max = c.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            ((max + dmin.to_f32() * f32::from(*m)) / levels as f32).max(0.0)
        })
        .collect();
    let d = f16_at_least(needed.iter().copied().fold(0.0, f32::max) / smax);
    let scales: Vec<u8> = needed
        .iter()
        .map(|s| ceil_ratio(*s, d.to_f32(), scale_max))
        .collect();
    let mut q = [0u8; QK_K];
    for (e, qe) in q.iter_mut().enumerate() {
        let j = e / sub;
        let step = d.to_f32() * f32::from(scales[j]);
        let offset = dmin.to_f32() * f32::from(mins[j]);
        *qe = quantize_value(x[e] + offset, step, 0, levels) as u8;
    }
    debug_assert_eq!(scales.len(), n_sub);
    Affine {
        d,
        dmin,
        scales,
        mins,
        q,
    }
}

/// ceil(v / unit) clamped to [0, max]; 0 when unit is 0.
fn ceil_ratio(v: f32, unit: f32, max: u8) -> u8 {
    if unit == 0.0 {
        return 0;
    }
    (v / unit).ceil().clamp(0.0, f32::from(max)) as u8
}

/// Quantizes a super-block as value = d*sc*q with q in [-qmax, qmax] and
/// sc in [0, scale_max], one sc per sub-block of 16.
fn symmetric_super_block(x: &[f32], qmax: i32, scale_max: u8) -> (half::f16, [u8; 16], [i8; QK_K]) {
    let want: Vec<f32> = x.chunks_exact(16).map(|c| abs_max(c) / qmax as f32).collect();
    let d = f16_at_least(want.iter().copied().fold(0.0, f32::max) / f32::from(scale_max));
    let mut scales = [0u8; 16];
    for (s, w) in scales.iter_mut().zip(&want) {
        *s = ceil_ratio(*w, d.to_f32(), scale_max);
    }
    let mut q = [0i8; QK_K];
    for (e, qe) in q.iter_mut().enumerate() {
        let step = d.to_f32() * f32::from(scales[e / 16]);
        *qe = quantize_value(x[e], step, -qmax, qmax) as i8;
    }
    (d, scales, q)
}

pub(super) fn quant_q2_k(x: &[f32], out: &mut Vec<u8>) {
    let a = affine_super_block(x, 16, 3, 15);
    for (s, m) in a.scales.iter().zip(&a.mins) {
        out.push(s | (m << 4));
    }
    let mut qs = [0u8; 64];
    for (e, q) in a.q.iter().enumerate() {
        let (byte, shift) = two_bit_pos(e);
        qs[byte] |= q << shift;
    }
    out.extend_from_slice(&qs);
    push_f16(out, a.d);
    push_f16(out, a.dmin);
}

pub(super) fn quant_q3_k(x: &[f32], out: &mut Vec<u8>) {
    // Signed 6-bit scales are stored offset by 32; only the non-negative
    // half is used, which loses nothing since q itself carries the sign.
    let (d, scales, q) = symmetric_super_block(x, 3, 31);
    let mut hmask = [0u8; 32];
    let mut qs = [0u8; 64];
    for (e, qe) in q.iter().enumerate() {
        let u = (i32::from(*qe) + 4) as u8; // 0..8: bit 2 is the high bit
        let (byte, shift) = two_bit_pos(e);
        qs[byte] |= (u & 3) << shift;
        let hbit = (e / 128) * 4 + (e % 128) / 32;
        hmask[e % 32] |= (u >> 2) << hbit;
    }
    out.extend_from_slice(&hmask);
    out.extend_from_slice(&qs);
    let stored: [u8; 16] = scales.map(|s| s + 32);
    out.extend_from_slice(&pack_scales_q3k(&stored));
    push_f16(out, d);
}

fn to_array8(v: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.iter_mut().zip(v).for_each(|(d, s)| *d = *s);
    a
}

pub(super) fn quant_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let a = affine_super_block(x, 32, 15, 63);
    push_f16(out, a.d);
    push_f16(out, a.dmin);
    out.extend_from_slice(&pack_scale_min_k4(&to_array8(&a.scales), &to_array8(&a.mins)));
    let mut qs = [0u8; 128];
    for (e, q) in a.q.iter().enumerate() {
        let (c, r) = (e / 64, e % 64);
        qs[32 * c + r % 32] |= if r < 32 { *q } else { q << 4 };
    }
    out.extend_from_slice(&qs);
}

pub(super) fn quant_q5_k(x: &[f32], out: &mut Vec<u8>) {
    let a = affine_super_block(x, 32, 31, 63);
    push_f16(out, a.d);
    push_f16(out, a.dmin);
    out.extend_from_slice(&pack_scale_min_k4(&to_array8(&a.scales), &to_array8(&a.mins)));
    let mut qh = [0u8; 32];
    let mut qs = [0u8; 128];
    for (e, q) in a.q.iter().enumerate() {
        let (c, r) = (e / 64, e % 64);
        let low = q & 0x0F;
        qs[32 * c + r % 32] |= if r < 32 { low } else { low << 4 };
        qh[r % 32] |= (q >> 4) << (2 * c + r / 32);
    }
    out.extend_from_slice(&qh);
    out.extend_from_slice(&qs);
}

pub(super) fn quant_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, scales, q) = symmetric_super_block(x, 31, 127);
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (e, qe) in q.iter().enumerate() {
        let u = (i32::from(*qe) + 32) as u8; // 0..64
        let (lb, hi_nibble, hb, hshift) = six_bit_pos(e);
        ql[lb] |= if hi_nibble { (u & 0x0F) << 4 } else { u & 0x0F };
        qh[hb] |= (u >> 4) << hshift;
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend_from_slice(&scales);
    push_f16(out, d);
}

pub(super) fn quant_q8_k(x: &[f32], out: &mut Vec<u8>) {
    // Q8_K keeps an f32 scale, so no f16 rounding slack is needed.
    let d = abs_max(x) / 127.0;
    out.extend_from_slice(&d.to_le_bytes());
    let q: Vec<i8> = x.iter().map(|v| quantize_value(*v, d, -127, 127) as i8).collect();
    out.extend(q.iter().map(|v| *v as u8));
    for c in q.chunks_exact(16) {
        let sum: i16 = c.iter().map(|v| i16::from(*v)).sum();
        out.extend_from_slice(&sum.to_le_bytes());
    }
}
