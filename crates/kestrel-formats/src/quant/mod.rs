//! Reference (scalar, obviously-correct) conversion between f32 and the
//! stored tensor types. The block layouts are GGML's (see the GGUF spec and
//! ggml-common.h); each submodule documents the layouts it handles.
//!
//! These routines favour clarity over speed: the backends have their own
//! fast kernels and test them against this code.

mod block32;
mod float;
mod kquant;

use half::f16;

use crate::{DType, FormatError};

/// Dequantizes one row: `out.len()` elements decoded from `bytes`.
///
/// `out.len()` must be a multiple of `dtype.block_elems()` and `bytes.len()`
/// must be exactly `dtype.row_bytes(out.len())`.
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    let n = out.len();
    let expected = dtype.row_bytes(n).ok_or(FormatError::NotBlockMultiple {
        dtype,
        n_elems: n,
        block_elems: dtype.block_elems(),
    })?;
    if bytes.len() != expected {
        return Err(FormatError::BufferSize {
            dtype,
            n_elems: n,
            expected,
            got: bytes.len(),
        });
    }
    let be = dtype.block_elems();
    let bb = dtype.block_bytes();
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be));
    match dtype {
        DType::F32 => float::dequant_f32(bytes, out),
        DType::F16 => float::dequant_f16(bytes, out),
        DType::BF16 => float::dequant_bf16(bytes, out),
        DType::Q4_0 => blocks.for_each(|(b, y)| block32::dequant_q4_0(b, y)),
        DType::Q4_1 => blocks.for_each(|(b, y)| block32::dequant_q4_1(b, y)),
        DType::Q5_0 => blocks.for_each(|(b, y)| block32::dequant_q5_0(b, y)),
        DType::Q5_1 => blocks.for_each(|(b, y)| block32::dequant_q5_1(b, y)),
        DType::Q8_0 => blocks.for_each(|(b, y)| block32::dequant_q8_0(b, y)),
        DType::Q2_K => blocks.for_each(|(b, y)| kquant::dequant_q2_k(b, y)),
        DType::Q3_K => blocks.for_each(|(b, y)| kquant::dequant_q3_k(b, y)),
        DType::Q4_K => blocks.for_each(|(b, y)| kquant::dequant_q4_k(b, y)),
        DType::Q5_K => blocks.for_each(|(b, y)| kquant::dequant_q5_k(b, y)),
        DType::Q6_K => blocks.for_each(|(b, y)| kquant::dequant_q6_k(b, y)),
        DType::Q8_K => blocks.for_each(|(b, y)| kquant::dequant_q8_k(b, y)),
    }
    Ok(())
}

/// Reference quantization of `src` to `dtype`, APPENDING the encoded bytes
/// to `out` (so several rows can be encoded into one tensor buffer).
///
/// Supports every [`DType`]. The rounding choices are simpler than
/// llama.cpp's (no iterative error search) but every value round-trips
/// within half a quantization step of its sub-block. Inputs should be finite
/// and of a magnitude representable by the f16 block scales.
pub fn quantize_row(dtype: DType, src: &[f32], out: &mut Vec<u8>) -> Result<(), FormatError> {
    let n = src.len();
    let expected = dtype.row_bytes(n).ok_or(FormatError::NotBlockMultiple {
        dtype,
        n_elems: n,
        block_elems: dtype.block_elems(),
    })?;
    out.reserve(expected);
    let start = out.len();
    let be = dtype.block_elems();
    match dtype {
        DType::F32 => float::quant_f32(src, out),
        DType::F16 => float::quant_f16(src, out),
        DType::BF16 => float::quant_bf16(src, out),
        DType::Q4_0 => src.chunks_exact(be).for_each(|x| block32::quant_q4_0(x, out)),
        DType::Q4_1 => src.chunks_exact(be).for_each(|x| block32::quant_q4_1(x, out)),
        DType::Q5_0 => src.chunks_exact(be).for_each(|x| block32::quant_q5_0(x, out)),
        DType::Q5_1 => src.chunks_exact(be).for_each(|x| block32::quant_q5_1(x, out)),
        DType::Q8_0 => src.chunks_exact(be).for_each(|x| block32::quant_q8_0(x, out)),
        DType::Q2_K => src.chunks_exact(be).for_each(|x| kquant::quant_q2_k(x, out)),
        DType::Q3_K => src.chunks_exact(be).for_each(|x| kquant::quant_q3_k(x, out)),
        DType::Q4_K => src.chunks_exact(be).for_each(|x| kquant::quant_q4_k(x, out)),
        DType::Q5_K => src.chunks_exact(be).for_each(|x| kquant::quant_q5_k(x, out)),
        DType::Q6_K => src.chunks_exact(be).for_each(|x| kquant::quant_q6_k(x, out)),
        DType::Q8_K => src.chunks_exact(be).for_each(|x| kquant::quant_q8_k(x, out)),
    }
    debug_assert_eq!(out.len() - start, expected, "{dtype:?} encoder size");
    Ok(())
}

/// Reads a little-endian f16 at `at` as f32. Callers pass fixed in-block
/// offsets of blocks whose length was checked by `dequantize_row`.
fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The smallest f16 that is >= `v` (for non-negative finite `v`), so a scale
/// rounded to f16 never shrinks the range it must cover.
fn f16_at_least(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() < v {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

/// The largest f16 that is <= `v` (for finite `v`), so a stored minimum never
/// rises above the values it must cover.
fn f16_at_most(v: f32) -> f16 {
    let h = f16::from_f32(v);
    if h.to_f32() > v {
        // Stepping the bit pattern moves away from zero for negatives and
        // towards zero for positives.
        if h.to_bits() & 0x8000 != 0 {
            f16::from_bits(h.to_bits() + 1)
        } else if h.to_bits() == 0 {
            f16::from_bits(0x8001)
        } else {
            f16::from_bits(h.to_bits() - 1)
        }
    } else {
        h
    }
}

fn push_f16(out: &mut Vec<u8>, h: f16) {
    out.extend_from_slice(&h.to_bits().to_le_bytes());
}

/// Largest absolute value (0 for an empty slice).
fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// `v / step`, rounded to nearest and clamped to `[lo, hi]`; 0 if `step` is 0.
fn quantize_value(v: f32, step: f32, lo: i32, hi: i32) -> i32 {
    if step == 0.0 {
        return 0.clamp(lo, hi);
    }
    // `as` saturates and maps NaN to 0, so hostile input cannot panic here.
    ((v / step).round() as i32).clamp(lo, hi)
}
