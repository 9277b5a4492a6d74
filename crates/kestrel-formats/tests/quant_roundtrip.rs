//! quantize_row -> dequantize_row round trips stay within each format's
//! precision: about half a quantization step of the (sub-)block.

use kestrel_formats::{dequantize_row, quantize_row, DType, FormatError};
use proptest::prelude::*;

/// Largest error allowed for element `i` of block `x` (the block containing
/// it), derived from how the encoder picks its steps (see quant/*.rs):
/// half a step, plus slack for f16/6-bit scale rounding.
fn bound(dtype: DType, block: &[f32], v: f32) -> f32 {
    let amax = block.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let min = block.iter().copied().fold(f32::INFINITY, f32::min);
    // The K-quant mins are clamped at 0, so their range always includes 0.
    let r0 = max.max(0.0) - min.min(0.0);
    let eps = 1e-6 * amax + 1e-30;
    eps + match dtype {
        DType::F32 => 0.0,
        DType::F16 => v.abs() * 2f32.powi(-11) + 2f32.powi(-25),
        DType::BF16 => v.abs() * 2f32.powi(-8),
        DType::Q8_0 => 0.51 * amax / 127.0,
        DType::Q8_K => 0.5 * amax / 127.0,
        DType::Q4_0 => 0.51 * amax / 7.0,
        DType::Q5_0 => 0.51 * amax / 15.0,
        DType::Q4_1 => 0.51 * ((max - min) + min.abs() * 2f32.powi(-10)) / 15.0,
        DType::Q5_1 => 0.51 * ((max - min) + min.abs() * 2f32.powi(-10)) / 31.0,
        DType::Q2_K => 0.6 * r0 / 3.0,
        DType::Q3_K => 0.53 * amax / 3.0,
        DType::Q4_K => 0.52 * r0 / 15.0,
        DType::Q5_K => 0.52 * r0 / 31.0,
        DType::Q6_K => 0.51 * amax / 31.0,
    }
}

fn check_round_trip(dtype: DType, src: &[f32]) -> Result<(), TestCaseError> {
    let mut bytes = vec![0xEEu8; 3]; // quantize_row appends
    quantize_row(dtype, src, &mut bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&bytes[..3], &[0xEE; 3]);
    prop_assert_eq!(Some(bytes.len() - 3), dtype.row_bytes(src.len()));
    let mut out = vec![f32::NAN; src.len()];
    dequantize_row(dtype, &bytes[3..], &mut out).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (bi, (xb, yb)) in src
        .chunks(dtype.block_elems())
        .zip(out.chunks(dtype.block_elems()))
        .enumerate()
    {
        for (i, (x, y)) in xb.iter().zip(yb).enumerate() {
            let b = bound(dtype, xb, *x);
            prop_assert!(
                (x - y).abs() <= b,
                "{:?} block {} elem {}: {} -> {} (err {}, bound {})",
                dtype,
                bi,
                i,
                x,
                y,
                (x - y).abs(),
                b
            );
        }
    }
    Ok(())
}

/// Rows of 1..=3 blocks of 256 (a multiple of every block size), with a
/// random magnitude and an optional offset so both symmetric and skewed
/// blocks occur.
fn row() -> impl Strategy<Value = Vec<f32>> {
    (1usize..=3, -3i32..=3, prop_oneof![Just(0.0f32), -1.0f32..1.0]).prop_flat_map(|(blocks, exp, offset)| {
        let scale = 10f32.powi(exp);
        prop::collection::vec(-1.0f32..1.0, blocks * 256)
            .prop_map(move |v| v.into_iter().map(|x| (x + offset) * scale).collect())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_all_types(src in row()) {
        for dtype in DType::ALL {
            check_round_trip(dtype, &src)?;
        }
    }
}

#[test]
fn special_blocks() {
    let zeros = vec![0.0f32; 256];
    let constant = vec![-3.5f32; 256];
    let mut spike = vec![0.0f32; 256];
    spike[77] = 1000.0;
    spike[200] = -0.001;
    let positive: Vec<f32> = (0..256).map(|i| 5.0 + i as f32 * 0.01).collect();
    for dtype in DType::ALL {
        for src in [&zeros, &constant, &spike, &positive] {
            check_round_trip(dtype, src).unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        }
    }
}

#[test]
fn quantize_rejects_partial_blocks() {
    let mut out = Vec::new();
    let err = quantize_row(DType::Q4_K, &[0.0; 100], &mut out).unwrap_err();
    assert!(matches!(err, FormatError::NotBlockMultiple { .. }));
    assert!(err.to_string().contains("256"), "{err}");
    assert!(out.is_empty());
}
