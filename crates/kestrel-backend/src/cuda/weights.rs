//! Host-side repacking of stored weights into the device layouts that
//! `kernels/dequant.cu` documents. Packing keeps every block 16-byte aligned
//! so that the GEMV kernels can use 16-byte loads: Q8_0/Q4_0/Q5_0/Q6_K move
//! their f16 scales (and Q5_0 its fifth bits) into separate arrays; Q4_K and
//! Q5_K blocks (144 and 176 bytes) are aligned as stored. Types without a
//! device kernel (Q4_1, Q5_1, Q2_K, Q3_K, Q8_K) are dequantized on the host
//! and stored as F16.

use kestrel_formats::{DType, TensorView};

use crate::error::BackendError;

/// Device weight format codes (the DT_* constants of common.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    Q8_0 = 3,
    Q4_0 = 4,
    Q5_0 = 5,
    Q4K = 6,
    Q5K = 7,
    Q6K = 8,
}

impl Format {
    /// Name of the fused GEMV kernel family.
    pub fn gemv_name(self) -> &'static str {
        match self {
            Format::F32 => "gemv_f32",
            Format::F16 => "gemv_f16",
            Format::Bf16 => "gemv_bf16",
            Format::Q8_0 => "gemv_q8_0",
            Format::Q4_0 => "gemv_q4_0",
            Format::Q5_0 => "gemv_q5_0",
            Format::Q4K => "gemv_q4_k",
            Format::Q5K => "gemv_q5_k",
            Format::Q6K => "gemv_q6_k",
        }
    }
}

/// A weight packed for the device: one buffer holding up to three arrays.
pub(crate) struct Packed {
    pub format: Format,
    /// The stored dtype (before any host fallback), for `describe`/errors.
    pub stored: DType,
    pub bytes: Vec<u8>,
    pub off1: usize,
    pub off2: usize,
}

const ALIGN: usize = 256;

fn pad(v: &mut Vec<u8>) -> usize {
    let n = v.len().div_ceil(ALIGN) * ALIGN;
    v.resize(n, 0);
    n
}

/// Splits `nb` blocks of `bb` bytes into arrays by byte ranges `parts`
/// (each `(start, len)`), concatenated with 256-byte alignment. Returns the
/// buffer and the offsets of parts 1 and 2 (0 when absent).
fn split_blocks(data: &[u8], bb: usize, parts: &[(usize, usize)]) -> (Vec<u8>, [usize; 3]) {
    let nb = data.len() / bb;
    let mut out = Vec::with_capacity(data.len() + 3 * ALIGN);
    let mut offs = [0usize; 3];
    for (i, &(start, len)) in parts.iter().enumerate() {
        offs[i] = pad(&mut out);
        for b in 0..nb {
            out.extend_from_slice(&data[b * bb + start..b * bb + start + len]);
        }
    }
    pad(&mut out);
    (out, offs)
}

pub(crate) fn pack(t: &TensorView<'_>) -> Result<Packed, BackendError> {
    let err = |problem: String| BackendError::Tensor {
        name: t.name.to_string(),
        problem,
    };
    if t.shape.len() != 2 {
        return Err(err(format!(
            "expected a 2-D weight [out, in], got shape {:?}",
            t.shape
        )));
    }
    let (rows, cols) = (t.shape[0], t.shape[1]);
    if rows == 0 || cols == 0 || rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(err(format!("unsupported weight shape {:?}", t.shape)));
    }
    let row_bytes = t.dtype.row_bytes(cols).ok_or_else(|| {
        err(format!(
            "{} columns are not a whole number of {} blocks",
            cols, t.dtype
        ))
    })?;
    let expected = row_bytes
        .checked_mul(rows)
        .ok_or_else(|| err("size overflows".into()))?;
    if t.data.len() != expected {
        return Err(err(format!(
            "expected {expected} bytes of {} data, got {}",
            t.dtype,
            t.data.len()
        )));
    }
    let d = t.data;
    let (format, bytes, offs) = match t.dtype {
        DType::F32 => (Format::F32, d.to_vec(), [0; 3]),
        DType::F16 => (Format::F16, d.to_vec(), [0; 3]),
        DType::BF16 => (Format::Bf16, d.to_vec(), [0; 3]),
        // d f16 | qs[32]
        DType::Q8_0 => {
            let (b, o) = split_blocks(d, 34, &[(2, 32), (0, 0), (0, 2)]);
            (Format::Q8_0, b, o)
        }
        // d | qs[16]
        DType::Q4_0 => {
            let (b, o) = split_blocks(d, 18, &[(2, 16), (0, 0), (0, 2)]);
            (Format::Q4_0, b, o)
        }
        // d | qh u32 | qs[16]
        DType::Q5_0 => {
            let (b, o) = split_blocks(d, 22, &[(6, 16), (2, 4), (0, 2)]);
            (Format::Q5_0, b, o)
        }
        DType::Q4_K => (Format::Q4K, d.to_vec(), [0; 3]),
        DType::Q5_K => (Format::Q5K, d.to_vec(), [0; 3]),
        // ql[128] qh[64] scales[16] | d
        DType::Q6_K => {
            let (b, o) = split_blocks(d, 210, &[(0, 208), (0, 0), (208, 2)]);
            (Format::Q6K, b, o)
        }
        DType::Q4_1 | DType::Q5_1 | DType::Q2_K | DType::Q3_K | DType::Q8_K => {
            let f = t
                .to_f32()
                .map_err(|e| err(format!("dequantizing {} on the host: {e}", t.dtype)))?;
            let mut b = Vec::with_capacity(f.len() * 2);
            for v in f {
                b.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            (Format::F16, b, [0; 3])
        }
    };
    let mut bytes = bytes;
    if offs == [0; 3] {
        pad(&mut bytes);
    }
    Ok(Packed {
        format,
        stored: t.dtype,
        bytes,
        off1: offs[1],
        off2: offs[2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_formats::quantize_row;

    fn quantized(dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
        let mut b = Vec::new();
        for r in 0..rows {
            let src: Vec<f32> = (0..cols)
                .map(|i| ((i * 7 + r * 13) % 29) as f32 / 7.0 - 2.0)
                .collect();
            quantize_row(dtype, &src, &mut b).expect("quantize");
        }
        b
    }

    #[test]
    fn q8_0_splits_scales_from_quants() {
        let data = quantized(DType::Q8_0, 3, 64);
        let shape = [3, 64];
        let p = pack(&TensorView {
            name: "w",
            dtype: DType::Q8_0,
            shape: &shape,
            data: &data,
        })
        .expect("pack");
        assert_eq!(p.format, Format::Q8_0);
        for b in 0..6 {
            assert_eq!(
                &p.bytes[b * 32..b * 32 + 32],
                &data[b * 34 + 2..b * 34 + 34],
                "quants of block {b}"
            );
            assert_eq!(
                &p.bytes[p.off2 + 2 * b..p.off2 + 2 * b + 2],
                &data[b * 34..b * 34 + 2],
                "scale of block {b}"
            );
        }
        assert_eq!(p.off2 % 256, 0);
    }

    #[test]
    fn q5_0_and_q6_k_keep_every_byte() {
        let data = quantized(DType::Q5_0, 2, 64);
        let shape = [2, 64];
        let p = pack(&TensorView {
            name: "w",
            dtype: DType::Q5_0,
            shape: &shape,
            data: &data,
        })
        .expect("pack");
        for b in 0..4 {
            assert_eq!(&p.bytes[16 * b..16 * b + 16], &data[22 * b + 6..22 * b + 22]);
            assert_eq!(
                &p.bytes[p.off1 + 4 * b..p.off1 + 4 * b + 4],
                &data[22 * b + 2..22 * b + 6]
            );
            assert_eq!(
                &p.bytes[p.off2 + 2 * b..p.off2 + 2 * b + 2],
                &data[22 * b..22 * b + 2]
            );
        }
        let data = quantized(DType::Q6_K, 2, 256);
        let shape = [2, 256];
        let p = pack(&TensorView {
            name: "w",
            dtype: DType::Q6_K,
            shape: &shape,
            data: &data,
        })
        .expect("pack");
        for b in 0..2 {
            assert_eq!(&p.bytes[208 * b..208 * b + 208], &data[210 * b..210 * b + 208]);
            assert_eq!(
                &p.bytes[p.off2 + 2 * b..p.off2 + 2 * b + 2],
                &data[210 * b + 208..210 * b + 210]
            );
        }
    }

    #[test]
    fn unsupported_types_fall_back_to_f16_and_bad_views_are_refused() {
        let data = quantized(DType::Q4_1, 2, 32);
        let shape = [2, 32];
        let p = pack(&TensorView {
            name: "w",
            dtype: DType::Q4_1,
            shape: &shape,
            data: &data,
        })
        .expect("pack");
        assert_eq!((p.format, p.stored), (Format::F16, DType::Q4_1));
        let short = &data[..data.len() - 1];
        let e = pack(&TensorView {
            name: "blk.0.w",
            dtype: DType::Q4_1,
            shape: &shape,
            data: short,
        })
        .err();
        assert!(
            e.map(|e| e.to_string()).unwrap_or_default().contains("blk.0.w"),
            "error must name the tensor"
        );
        let flat = [64];
        assert!(pack(&TensorView {
            name: "w",
            dtype: DType::Q4_1,
            shape: &flat,
            data: &data
        })
        .is_err());
        let odd = [2, 48];
        assert!(pack(&TensorView {
            name: "w",
            dtype: DType::Q8_0,
            shape: &odd,
            data: &data
        })
        .is_err());
    }
}
