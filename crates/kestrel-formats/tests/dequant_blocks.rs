//! Dequantization of hand-built blocks, checked against values computed
//! independently from the documented GGML formulas. The K-quant references
//! below deliberately follow GGML's loop structure (walking pointers through
//! the block) rather than the per-element index math of the crate, so a
//! layout mistake in either shows up as a mismatch.

mod common;

use common::{f16_bytes, Rng};
use kestrel_formats::{dequantize_row, DType, FormatError};

fn deq(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize_row(dtype, bytes, &mut out).expect("dequantize");
    out
}

fn h(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

#[test]
fn floats() {
    let vals = [1.5f32, -2.25, 0.0, 65504.0, -1e-3];
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(deq(DType::F32, &f32b, 5), vals);
    let f16b: Vec<u8> = vals.iter().flat_map(|v| f16_bytes(*v)).collect();
    let got = deq(DType::F16, &f16b, 5);
    assert_eq!(&got[..4], &vals[..4]);
    assert!((got[4] + 1e-3).abs() < 1e-6);
    // bf16 1.5 = 0x3FC0, -2.25 = 0xC010.
    let bf: Vec<u8> = [0x3FC0u16, 0xC010].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(deq(DType::BF16, &bf, 2), [1.5, -2.25]);
}

/// Nibble pattern used by the 32-element tests: byte i holds i (low) and
/// 15 - i (high), so element i = i and element i + 16 = 15 - i.
fn nibbles() -> Vec<u8> {
    (0..16u8).map(|i| i | ((15 - i) << 4)).collect()
}

fn nib(i: usize) -> i32 {
    if i < 16 {
        i as i32
    } else {
        15 - (i as i32 - 16)
    }
}

#[test]
fn q4_0() {
    let mut b = f16_bytes(0.5).to_vec();
    b.extend(nibbles());
    let got = deq(DType::Q4_0, &b, 32);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.5 * (nib(i) - 8) as f32, "element {i}");
    }
    assert_eq!(got[0], -4.0);
    assert_eq!(got[16], 3.5);
}

#[test]
fn q4_1() {
    let mut b = f16_bytes(0.25).to_vec();
    b.extend(f16_bytes(-1.0));
    b.extend(nibbles());
    let got = deq(DType::Q4_1, &b, 32);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.25 * nib(i) as f32 - 1.0, "element {i}");
    }
}

#[test]
fn q5_0() {
    let qh: u32 = 0xA5A5_0F0F;
    let mut b = f16_bytes(1.0).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend(nibbles());
    let got = deq(DType::Q5_0, &b, 32);
    for (i, v) in got.iter().enumerate() {
        let q = nib(i) + 16 * ((qh >> i) & 1) as i32;
        assert_eq!(*v, (q - 16) as f32, "element {i}");
    }
    // Element 0: nibble 0, qh bit 0 set -> 16 - 16 = 0; element 4: bit 4 clear -> 4 - 16.
    assert_eq!(got[0], 0.0);
    assert_eq!(got[4], -12.0);
}

#[test]
fn q5_1() {
    let qh: u32 = 0x1234_ABCD;
    let mut b = f16_bytes(0.5).to_vec();
    b.extend(f16_bytes(2.0));
    b.extend(qh.to_le_bytes());
    b.extend(nibbles());
    let got = deq(DType::Q5_1, &b, 32);
    for (i, v) in got.iter().enumerate() {
        let q = nib(i) + 16 * ((qh >> i) & 1) as i32;
        assert_eq!(*v, 0.5 * q as f32 + 2.0, "element {i}");
    }
}

#[test]
fn q8_0() {
    let mut b = f16_bytes(0.125).to_vec();
    b.extend((0..32).map(|i| (i as i8 * 4 - 64) as u8));
    let got = deq(DType::Q8_0, &b, 32);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.125 * (i as f32 * 4.0 - 64.0), "element {i}");
    }
}

#[test]
fn q8_k() {
    let mut b = 0.01f32.to_le_bytes().to_vec();
    b.extend((0..256).map(|i| i as u8)); // as i8: 0..127, then -128..-1
    b.extend([0u8; 32]); // bsums are not used for dequantization
    let got = deq(DType::Q8_K, &b, 256);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(*v, 0.01 * f32::from(i as u8 as i8), "element {i}");
    }
}

/// Q4_K with d = 1, dmin = 0 and every scale 1: values are the raw nibbles,
/// checking the nibble order (low nibbles of 32 bytes, then high nibbles).
#[test]
fn q4_k_unit_scales() {
    let mut b = f16_bytes(1.0).to_vec();
    b.extend(f16_bytes(0.0));
    // Pairs 0..4: low 6 bits of bytes 0..4 (scale) and 4..8 (min); pairs
    // 4..8: low nibbles of bytes 8..12 (scale).
    b.extend([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
    let qs: Vec<u8> = (0..128)
        .map(|i| (i % 16) as u8 | (((i / 8) % 16) << 4) as u8)
        .collect();
    b.extend(&qs);
    let got = deq(DType::Q4_K, &b, 256);
    for c in 0..4 {
        for l in 0..32 {
            assert_eq!(got[64 * c + l], f32::from(qs[32 * c + l] & 15));
            assert_eq!(got[64 * c + 32 + l], f32::from(qs[32 * c + l] >> 4));
        }
    }
}

/// Q6_K with d = 1, all scales 1, ql = 0 and qh = 0b10_01_00_11: the four
/// quarters of each 128-half get high bits 3, 0, 1, 2 -> q = 48, 0, 16, 32.
#[test]
fn q6_k_high_bits() {
    let mut b = vec![0u8; 128];
    b.extend([0b1001_0011u8; 64]);
    b.extend([1u8; 16]);
    b.extend(f16_bytes(1.0));
    let got = deq(DType::Q6_K, &b, 256);
    for (e, v) in got.iter().enumerate() {
        let expected = [48.0, 0.0, 16.0, 32.0][(e % 128) / 32] - 32.0;
        assert_eq!(*v, expected, "element {e}");
    }
}

// ---- Loop-structured references for random K-quant blocks ----

fn ref_q2_k(b: &[u8]) -> Vec<f32> {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let d = read_h(b, 80);
    let dmin = read_h(b, 82);
    let mut y = Vec::new();
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                for l in 0..16 {
                    let v = (q[16 * half + l] >> shift) & 3;
                    y.push(d * f32::from(sc & 15) * f32::from(v) - dmin * f32::from(sc >> 4));
                }
            }
        }
    }
    y
}

fn ref_q3_k(b: &[u8]) -> Vec<f32> {
    let (hm, qs, sb) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = read_h(b, 108);
    // Unpack via 32-bit words as GGML does.
    let w = |i: usize| u32::from_le_bytes([sb[4 * i], sb[4 * i + 1], sb[4 * i + 2], sb[4 * i + 3]]);
    let (a0, a1, tmp) = (w(0), w(1), w(2));
    let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let words = [
        (a0 & k2) | ((tmp & k1) << 4),
        (a1 & k2) | (((tmp >> 2) & k1) << 4),
        ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ];
    let scales: Vec<i32> = words
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|s| i32::from(s) - 32)
        .collect();
    let mut y = Vec::new();
    let (mut is, mut m) = (0, 1u8);
    for n in 0..2 {
        let q = &qs[32 * n..];
        for shift in [0, 2, 4, 6] {
            for half in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in 0..16 {
                    let i = 16 * half + l;
                    let low = i32::from((q[i] >> shift) & 3);
                    let sub = if hm[i] & m != 0 { 0 } else { 4 };
                    y.push(dl * (low - sub) as f32);
                }
            }
            m <<= 1;
        }
    }
    y
}

fn scale_min(j: usize, q: &[u8]) -> (f32, f32) {
    let (s, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (f32::from(s), f32::from(m))
}

fn ref_q4_k(b: &[u8]) -> Vec<f32> {
    let (d, dmin) = (read_h(b, 0), read_h(b, 2));
    let (sc, qs) = (&b[4..16], &b[16..144]);
    let mut y = Vec::new();
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (s1, m1) = scale_min(2 * c, sc);
        let (s2, m2) = scale_min(2 * c + 1, sc);
        y.extend(q.iter().map(|v| d * s1 * f32::from(v & 15) - dmin * m1));
        y.extend(q.iter().map(|v| d * s2 * f32::from(v >> 4) - dmin * m2));
    }
    y
}

fn ref_q5_k(b: &[u8]) -> Vec<f32> {
    let (d, dmin) = (read_h(b, 0), read_h(b, 2));
    let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    let mut y = Vec::new();
    let (mut u1, mut u2) = (1u8, 2u8);
    for c in 0..4 {
        let q = &qs[32 * c..32 * c + 32];
        let (s1, m1) = scale_min(2 * c, sc);
        let (s2, m2) = scale_min(2 * c + 1, sc);
        for l in 0..32 {
            let hi = if qh[l] & u1 != 0 { 16.0 } else { 0.0 };
            y.push(d * s1 * (f32::from(q[l] & 15) + hi) - dmin * m1);
        }
        for l in 0..32 {
            let hi = if qh[l] & u2 != 0 { 16.0 } else { 0.0 };
            y.push(d * s2 * (f32::from(q[l] >> 4) + hi) - dmin * m2);
        }
        u1 <<= 2;
        u2 <<= 2;
    }
    y
}

fn ref_q6_k(b: &[u8]) -> Vec<f32> {
    let d = read_h(b, 208);
    let mut y = vec![0.0; 256];
    for n in 0..2 {
        let ql = &b[64 * n..];
        let qh = &b[128 + 32 * n..];
        let sc = &b[192 + 8 * n..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| f32::from(sc[is + k] as i8);
            y[128 * n + l] = d * s(0) * q1 as f32;
            y[128 * n + l + 32] = d * s(2) * q2 as f32;
            y[128 * n + l + 64] = d * s(4) * q3 as f32;
            y[128 * n + l + 96] = d * s(6) * q4 as f32;
        }
    }
    y
}

fn read_h(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Random block bytes with the f16 scale fields overwritten by sane values.
fn random_block(rng: &mut Rng, dtype: DType, f16_fields: &[usize]) -> Vec<u8> {
    let mut b: Vec<u8> = (0..dtype.block_bytes()).map(|_| rng.byte()).collect();
    for at in f16_fields {
        let v = h(rng.unit() * 0.1);
        b[*at..*at + 2].copy_from_slice(&f16_bytes(v));
    }
    b
}

#[test]
fn k_quants_match_loop_references() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    type Ref = fn(&[u8]) -> Vec<f32>;
    let cases: [(DType, &[usize], Ref); 5] = [
        (DType::Q2_K, &[80, 82], ref_q2_k),
        (DType::Q3_K, &[108], ref_q3_k),
        (DType::Q4_K, &[0, 2], ref_q4_k),
        (DType::Q5_K, &[0, 2], ref_q5_k),
        (DType::Q6_K, &[208], ref_q6_k),
    ];
    for (dtype, fields, reference) in cases {
        for trial in 0..50 {
            // Two blocks per row, to check block stepping too.
            let mut bytes = random_block(&mut rng, dtype, fields);
            bytes.extend(random_block(&mut rng, dtype, fields));
            let mut expected = reference(&bytes[..dtype.block_bytes()]);
            expected.extend(reference(&bytes[dtype.block_bytes()..]));
            let got = deq(dtype, &bytes, 512);
            assert_eq!(got, expected, "{dtype:?} trial {trial}");
        }
    }
}

#[test]
fn q4_k_packed_scales() {
    // Distinct scales 1..=8 and mins 10..=17 (6-bit), hand-packed:
    // pairs 0..4 live in bytes 0..8 directly; pairs 4..8 split 4+2 bits.
    let sc = [1u8, 2, 3, 4, 53, 54, 55, 56];
    let mn = [10u8, 11, 12, 13, 44, 45, 46, 47];
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    let mut b = f16_bytes(0.5).to_vec();
    b.extend(f16_bytes(0.25));
    b.extend(s);
    b.extend([0x21u8; 128]); // low nibble 1, high nibble 2
    let got = deq(DType::Q4_K, &b, 256);
    for (e, v) in got.iter().enumerate() {
        let j = e / 32;
        let q = if (e % 64) < 32 { 1.0 } else { 2.0 };
        let expected = 0.5 * f32::from(sc[j]) * q - 0.25 * f32::from(mn[j]);
        assert_eq!(*v, expected, "element {e}");
    }
}

#[test]
fn size_errors() {
    let mut out = vec![0.0; 33];
    assert!(matches!(
        dequantize_row(DType::Q8_0, &[0; 34], &mut out),
        Err(FormatError::NotBlockMultiple { .. })
    ));
    let mut out = vec![0.0; 32];
    let err = dequantize_row(DType::Q8_0, &[0; 33], &mut out).unwrap_err();
    assert!(err.to_string().contains("need 34 bytes but 33"), "{err}");
}

#[test]
fn dtype_table() {
    for d in DType::ALL {
        assert_eq!(DType::from_ggml(d.ggml_id()), Some(d));
        assert_eq!(d.is_quantized(), d.block_elems() > 1);
        assert_eq!(d.row_bytes(d.block_elems() * 3), Some(3 * d.block_bytes()));
    }
    assert_eq!(DType::from_ggml(30), Some(DType::BF16));
    assert_eq!(DType::from_ggml(4), None);
    assert_eq!(DType::Q4_K.name(), "Q4_K");
    assert_eq!(DType::Q4_K.row_bytes(640), None);
    assert_eq!(DType::Q8_0.row_bytes(640), Some(680));
}
