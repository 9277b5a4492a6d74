//! Unquantized element types: F32, F16 and BF16, little-endian.

use half::{bf16, f16};

pub(super) fn dequant_f32(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(4).zip(y) {
        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub(super) fn dequant_f16(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(2).zip(y) {
        *v = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

pub(super) fn dequant_bf16(b: &[u8], y: &mut [f32]) {
    for (c, v) in b.chunks_exact(2).zip(y) {
        *v = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
    }
}

pub(super) fn quant_f32(x: &[f32], out: &mut Vec<u8>) {
    x.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
}

pub(super) fn quant_f16(x: &[f32], out: &mut Vec<u8>) {
    x.iter()
        .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes()));
}

pub(super) fn quant_bf16(x: &[f32], out: &mut Vec<u8>) {
    x.iter()
        .for_each(|v| out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes()));
}
