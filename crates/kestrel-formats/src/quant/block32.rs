//! The 32-element block quantizations ("legacy" GGML types).
//!
//! Layouts (all little-endian, f16 scales):
//! * Q4_0 (18 B): `d`, `qs[16]`; element i<16 is the low nibble of qs[i],
//!   element i+16 the high nibble; value = d * (q - 8).
//! * Q4_1 (20 B): `d`, `m`, `qs[16]` as Q4_0; value = d * q + m.
//! * Q5_0 (22 B): `d`, `qh: u32`, `qs[16]`; bit i of qh is the 5th bit of
//!   element i; value = d * (q - 16).
//! * Q5_1 (24 B): `d`, `m`, `qh: u32`, `qs[16]`; value = d * q + m.
//! * Q8_0 (34 B): `d`, `qs[32]: i8`; value = d * q.

use super::{abs_max, f16_at_least, f16_at_most, push_f16, quantize_value, read_f16};

/// The 4-bit quants of a 32-element block: element i (< 16) is in the low
/// nibble of byte i, element i + 16 in the high nibble.
fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

fn pack_nibbles(q: &[u8; 32], out: &mut Vec<u8>) {
    for i in 0..16 {
        out.push((q[i] & 0x0F) | (q[i + 16] << 4));
    }
}

fn high_bit(qh: u32, i: usize) -> u8 {
    ((qh >> i) & 1) as u8
}

pub(super) fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let qs = &b[2..18];
    for (i, v) in y.iter_mut().enumerate() {
        *v = d * (i32::from(nibble(qs, i)) - 8) as f32;
    }
}

pub(super) fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let qs = &b[4..20];
    for (i, v) in y.iter_mut().enumerate() {
        *v = d * f32::from(nibble(qs, i)) + m;
    }
}

pub(super) fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for (i, v) in y.iter_mut().enumerate() {
        let q = nibble(qs, i) | (high_bit(qh, i) << 4);
        *v = d * (i32::from(q) - 16) as f32;
    }
}

pub(super) fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for (i, v) in y.iter_mut().enumerate() {
        let q = nibble(qs, i) | (high_bit(qh, i) << 4);
        *v = d * f32::from(q) + m;
    }
}

pub(super) fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    for (q, v) in b[2..34].iter().zip(y) {
        *v = d * f32::from(*q as i8);
    }
}

/// Symmetric quantization to q in [-half, half-1] with step amax / (half-1),
/// returning the stored f16 scale and the quants offset by `half`.
fn symmetric(x: &[f32], half: i32) -> (half::f16, [u8; 32]) {
    let d = f16_at_least(abs_max(x) / (half - 1) as f32);
    let step = d.to_f32();
    let mut q = [0u8; 32];
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = (quantize_value(*v, step, -half, half - 1) + half) as u8;
    }
    (d, q)
}

/// Affine quantization to q in [0, levels] with value = d * q + m.
fn affine(x: &[f32], levels: i32) -> (half::f16, half::f16, [u8; 32]) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m = f16_at_most(min);
    let d = f16_at_least(((max - m.to_f32()) / levels as f32).max(0.0));
    let step = d.to_f32();
    let mut q = [0u8; 32];
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = quantize_value(*v - m.to_f32(), step, 0, levels) as u8;
    }
    (d, m, q)
}

fn high_bits(q: &[u8; 32]) -> u32 {
    q.iter()
        .enumerate()
        .fold(0u32, |acc, (i, v)| acc | (u32::from(v >> 4) << i))
}

pub(super) fn quant_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric(x, 8);
    push_f16(out, d);
    pack_nibbles(&q, out);
}

pub(super) fn quant_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = affine(x, 15);
    push_f16(out, d);
    push_f16(out, m);
    pack_nibbles(&q, out);
}

pub(super) fn quant_q5_0(x: &[f32], out: &mut Vec<u8>) {
    let (d, q) = symmetric(x, 16);
    push_f16(out, d);
    out.extend_from_slice(&high_bits(&q).to_le_bytes());
    pack_nibbles(&q, out);
}

pub(super) fn quant_q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (d, m, q) = affine(x, 31);
    push_f16(out, d);
    push_f16(out, m);
    out.extend_from_slice(&high_bits(&q).to_le_bytes());
    pack_nibbles(&q, out);
}

pub(super) fn quant_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let d = f16_at_least(abs_max(x) / 127.0);
    push_f16(out, d);
    for v in x {
        out.push(quantize_value(*v, d.to_f32(), -127, 127) as i8 as u8);
    }
}
