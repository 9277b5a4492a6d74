//! Tests of the CPU backend against float64 references.

use kestrel_formats::{dequantize_row, quantize_row, DType, TensorView};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::act_quant::{ActFormat, QuantActs};
use super::quant_dot::rows_fn;
use super::*;
use crate::layout::{KvDType, SeqLayout};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn rand_vec(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// Weight types with a matmul path (Q8_K is only an activation format in
/// GGUF files, but it is a DType and must work too).
const WEIGHT_TYPES: [DType; 14] = DType::ALL;

struct TestWeight {
    bytes: Vec<u8>,
    deq: Vec<f32>,
    rows: usize,
    cols: usize,
    dtype: DType,
}

impl TestWeight {
    fn new(dtype: DType, rows: usize, cols: usize, seed: u64) -> TestWeight {
        let mut r = rng(seed);
        let mut bytes = Vec::new();
        for _ in 0..rows {
            // Rows of varied magnitude, a few outliers (as real weights).
            let scale = 0.05 + r.random::<f32>();
            let mut row = rand_vec(&mut r, cols, scale);
            row[r.random_range(0..cols)] *= 4.0;
            quantize_row(dtype, &row, &mut bytes).unwrap();
        }
        let rb = dtype.row_bytes(cols).unwrap();
        assert_eq!(bytes.len(), rb * rows);
        let mut deq = vec![0f32; rows * cols];
        for (src, dst) in bytes.chunks_exact(rb).zip(deq.chunks_exact_mut(cols)) {
            dequantize_row(dtype, src, dst).unwrap();
        }
        TestWeight {
            bytes,
            deq,
            rows,
            cols,
            dtype,
        }
    }

    fn upload(&self, b: &CpuBackend) -> CpuWeight {
        let shape = [self.rows, self.cols];
        let v = TensorView {
            name: "test.weight",
            dtype: self.dtype,
            shape: &shape,
            data: &self.bytes,
        };
        b.upload_matrix(&v).unwrap()
    }
}

/// Activation-quantization error bound relative to |w|·|x| per type: the
/// 8-bit activations add up to ~1/254 of each block's max per element.
fn tolerance(dtype: DType) -> f64 {
    match ActFormat::for_weight(dtype) {
        ActFormat::F32 => 1e-5,
        ActFormat::Q8x32 | ActFormat::Q8x256 => 1e-2,
    }
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt()
}

#[test]
fn matmul_matches_f64_reference_for_every_type_and_level() {
    for &dtype in &WEIGHT_TYPES {
        // Rows of whole 8-block groups, a tail (640 = 2.5 groups, as gemma's
        // hidden size) and no whole group at all (96); K-quants need 256s.
        let col_sizes: &[usize] = match dtype.block_elems() {
            256 => &[256, 512],
            32 => &[96, 256, 640],
            // Float rows: exercise the SIMD tails too.
            _ => &[45, 256, 640],
        };
        for &cols in col_sizes {
            let w = TestWeight::new(dtype, 37, cols, 7 + cols as u64);
            for n_tok in [1usize, 5] {
                let x = rand_vec(&mut rng(99 + n_tok as u64), n_tok * cols, 2.0);
                // Reference 1: exact f64 product with the unquantized activations.
                let mut want = vec![0f64; n_tok * w.rows];
                for t in 0..n_tok {
                    for r in 0..w.rows {
                        want[t * w.rows + r] = (0..cols)
                            .map(|i| w.deq[r * cols + i] as f64 * x[t * cols + i] as f64)
                            .sum();
                    }
                }
                // Reference 2: f64 product with the activations as quantized
                // (isolates the kernels' integer math from the quantization).
                let qa = QuantActs::new(
                    ActFormat::for_weight(dtype),
                    &x,
                    n_tok,
                    cols,
                    0,
                    false,
                    SimdLevel::Scalar,
                );
                let mut want_q = vec![0f64; n_tok * w.rows];
                for t in 0..n_tok {
                    let a = qa.row(t);
                    let xq: Vec<f64> = match qa.format {
                        ActFormat::F32 => a.f.iter().map(|&v| v as f64).collect(),
                        ActFormat::Q8x32 => (0..cols).map(|i| a.qs[i] as f64 * a.d[i / 32] as f64).collect(),
                        ActFormat::Q8x256 => {
                            (0..cols).map(|i| a.qs[i] as f64 * a.d[i / 256] as f64).collect()
                        }
                    };
                    for r in 0..w.rows {
                        want_q[t * w.rows + r] = (0..cols).map(|i| w.deq[r * cols + i] as f64 * xq[i]).sum();
                    }
                }
                let mut scalar_out: Option<Vec<f32>> = None;
                for level in SimdLevel::all_available() {
                    let be = CpuBackend::with_level(level).unwrap();
                    let wt = w.upload(&be);
                    let xa = be.act_from_vec(n_tok, cols, x.clone()).unwrap();
                    let mut out = be.alloc_act(n_tok, w.rows).unwrap();
                    be.matmul(&xa, &wt, &mut out).unwrap();
                    let got = be.read_act(&out).unwrap();
                    for t in 0..n_tok {
                        let xn = norm(&x[t * cols..(t + 1) * cols]);
                        for r in 0..w.rows {
                            let i = t * w.rows + r;
                            let scale = norm(&w.deq[r * cols..(r + 1) * cols]) * xn;
                            let e = (got[i] as f64 - want[i]).abs() / scale;
                            assert!(
                                e <= tolerance(dtype),
                                "{dtype} {level:?} cols={cols} n_tok={n_tok} [{t},{r}]: got {} want {} (rel {e:.2e})",
                                got[i],
                                want[i]
                            );
                            let eq = (got[i] as f64 - want_q[i]).abs() / scale;
                            assert!(
                                eq <= 2e-6,
                                "{dtype} {level:?} cols={cols} n_tok={n_tok} [{t},{r}]: got {} want {} with quantized activations (rel {eq:.2e})",
                                got[i],
                                want_q[i]
                            );
                        }
                    }
                    match &scalar_out {
                        None => scalar_out = Some(got),
                        Some(s) => {
                            for (i, (&a, &b)) in got.iter().zip(s).enumerate() {
                                let r = i % w.rows;
                                let t = i / w.rows;
                                let scale = norm(&w.deq[r * cols..(r + 1) * cols])
                                    * norm(&x[t * cols..(t + 1) * cols]);
                                assert!(
                                    ((a - b) as f64).abs() / scale <= 2e-6,
                                    "{dtype} {level:?} disagrees with scalar at {i}: {a} vs {b}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_level_has_a_kernel_for_every_type() {
    for level in SimdLevel::all_available() {
        for dtype in DType::ALL {
            let (_, used) = rows_fn(level, dtype, super::quant_dot::uses_x8(level, dtype));
            assert!(used <= level && used.available());
        }
    }
    // The hot types of the default model get SIMD kernels.
    if SimdLevel::Avx2.available() {
        for dtype in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q5_0,
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
        ] {
            let best = SimdLevel::best();
            let x8 = super::quant_dot::uses_x8(best, dtype);
            assert!(rows_fn(best, dtype, x8).1 >= SimdLevel::Avx2, "{dtype}");
        }
    }
}

#[test]
fn matmul_splits_large_matrices_over_threads_correctly() {
    // Enough rows for several decode chunks and prefill tiles.
    let (rows, cols) = (3001, 256);
    let w = TestWeight::new(DType::Q8_0, rows, cols, 5);
    let be = CpuBackend::new();
    let wt = w.upload(&be);
    for n_tok in [1usize, 3, 70] {
        let x = rand_vec(&mut rng(n_tok as u64), n_tok * cols, 1.0);
        let xa = be.act_from_vec(n_tok, cols, x.clone()).unwrap();
        let mut out = be.alloc_act(n_tok, rows).unwrap();
        be.matmul(&xa, &wt, &mut out).unwrap();
        let got = out.data();
        for t in [0, n_tok / 2, n_tok - 1] {
            for r in [0, 1, rows / 2, rows - 2, rows - 1] {
                let want: f64 = (0..cols)
                    .map(|i| w.deq[r * cols + i] as f64 * x[t * cols + i] as f64)
                    .sum();
                let scale = norm(&w.deq[r * cols..(r + 1) * cols]) * norm(&x[t * cols..(t + 1) * cols]);
                assert!(
                    (got[t * rows + r] as f64 - want).abs() / scale < 1e-2,
                    "n_tok={n_tok} [{t},{r}]"
                );
            }
        }
    }
}

#[test]
fn matmul_rejects_mismatched_shapes() {
    let be = CpuBackend::new();
    let w = TestWeight::new(DType::Q4_0, 4, 64, 1).upload(&be);
    let x = be.alloc_act(2, 32).unwrap();
    let mut out = be.alloc_act(2, 4).unwrap();
    assert!(be.matmul(&x, &w, &mut out).is_err());
    let x = be.alloc_act(2, 64).unwrap();
    let mut out = be.alloc_act(2, 5).unwrap();
    assert!(be.matmul(&x, &w, &mut out).is_err());
}

#[test]
fn upload_matrix_checks_the_data_size() {
    let be = CpuBackend::new();
    let data = vec![0u8; 33];
    let shape = [1usize, 32];
    let v = TensorView {
        name: "blk.0.short",
        dtype: DType::Q8_0,
        shape: &shape,
        data: &data,
    };
    let e = be.upload_matrix(&v).unwrap_err().to_string();
    assert!(e.contains("blk.0.short") && e.contains("34"), "{e}");
    let shape = [2usize, 33];
    let v = TensorView {
        name: "odd",
        dtype: DType::Q8_0,
        shape: &shape,
        data: &data,
    };
    assert!(be.upload_matrix(&v).is_err());
}

#[test]
fn embed_dequantizes_and_scales_rows() {
    let be = CpuBackend::new();
    let w = TestWeight::new(DType::Q8_0, 50, 64, 3);
    let table = w.upload(&be);
    let layout = BatchLayout::single(&[7, 0, 49], 0, &[0], 16);
    let batch = be.prepare_batch(&layout).unwrap();
    let mut out = be.alloc_act(3, 64).unwrap();
    be.embed(&table, &batch, 8.0, &mut out).unwrap();
    for (i, &t) in [7usize, 0, 49].iter().enumerate() {
        for c in 0..64 {
            assert_eq!(out.data()[i * 64 + c], w.deq[t * 64 + c] * 8.0);
        }
    }
    let bad = be
        .prepare_batch(&BatchLayout::single(&[50], 0, &[0], 16))
        .unwrap();
    let mut out = be.alloc_act(1, 64).unwrap();
    assert!(be.embed(&table, &bad, 1.0, &mut out).is_err());
}

fn vector(be: &CpuBackend, data: &[f32], offset: f32) -> CpuVector {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = [data.len()];
    be.upload_vector(
        &TensorView {
            name: "test.vector",
            dtype: DType::F32,
            shape: &shape,
            data: &bytes,
        },
        offset,
    )
    .unwrap()
}

#[test]
fn norms_and_residual_match_reference() {
    let be = CpuBackend::new();
    let (rows, cols) = (3, 640);
    let mut r = rng(11);
    let x0 = rand_vec(&mut r, rows * cols, 3.0);
    let delta = rand_vec(&mut r, rows * cols, 1.0);
    let wv = rand_vec(&mut r, cols, 0.5);
    let w = vector(&be, &wv, 1.0);
    let eps = 1e-6f32;
    let reference = |x: &[f32]| -> Vec<f64> {
        let mut o = vec![0f64; x.len()];
        for (xr, or) in x.chunks(cols).zip(o.chunks_mut(cols)) {
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
            let s = 1.0 / (ms + eps as f64).sqrt();
            for i in 0..cols {
                or[i] = xr[i] as f64 * s * (wv[i] as f64 + 1.0);
            }
        }
        o
    };
    let xa = be.act_from_vec(rows, cols, x0.clone()).unwrap();
    let mut out = be.alloc_act(rows, cols).unwrap();
    be.rms_norm(&xa, &w, eps, &mut out).unwrap();
    for (g, w) in out.data().iter().zip(reference(&x0)) {
        assert!((*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()));
    }
    let mut xa = be.act_from_vec(rows, cols, x0.clone()).unwrap();
    let da = be.act_from_vec(rows, cols, delta.clone()).unwrap();
    be.add_rms_norm(&mut xa, &da, &w, eps, &mut out).unwrap();
    let sum: Vec<f32> = x0.iter().zip(&delta).map(|(a, b)| a + b).collect();
    assert_eq!(xa.data(), &sum[..]);
    for (g, w) in out.data().iter().zip(reference(&sum)) {
        assert!((*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()));
    }
    // Wrong weight length is an error naming the weight.
    let short = vector(&be, &wv[..10], 0.0);
    let e = be.rms_norm(&xa, &short, eps, &mut out).unwrap_err().to_string();
    assert!(e.contains("test.vector"), "{e}");
}

#[test]
fn gated_activation_add_bias_softcap_gather_argmax() {
    let be = CpuBackend::new();
    let (rows, cols) = (2, 100);
    let mut r = rng(12);
    let g = rand_vec(&mut r, rows * cols, 6.0);
    let u = rand_vec(&mut r, rows * cols, 2.0);
    let ga = be.act_from_vec(rows, cols, g.clone()).unwrap();
    let ua = be.act_from_vec(rows, cols, u.clone()).unwrap();
    let mut out = be.alloc_act(rows, cols).unwrap();
    be.gated_activation(&ga, &ua, Activation::GeluTanh, &mut out)
        .unwrap();
    for i in 0..rows * cols {
        let x = g[i] as f64;
        let want = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
            * u[i] as f64;
        assert!((out.data()[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
    }
    be.gated_activation(&ga, &ua, Activation::Silu, &mut out).unwrap();
    for i in 0..rows * cols {
        let x = g[i] as f64;
        let want = x / (1.0 + (-x).exp()) * u[i] as f64;
        assert!((out.data()[i] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
    }
    let bias = rand_vec(&mut r, cols, 1.0);
    let mut xa = be.act_from_vec(rows, cols, g.clone()).unwrap();
    be.add_bias(&mut xa, &vector(&be, &bias, 0.0)).unwrap();
    assert_eq!(xa.data()[cols + 3], g[cols + 3] + bias[3]);
    be.softcap(&mut xa, 2.0).unwrap();
    let want = 2.0 * ((g[5] + bias[5]) as f64 / 2.0).tanh();
    assert!((xa.data()[5] as f64 - want).abs() < 1e-6);
    let mut picked = be.alloc_act(3, cols).unwrap();
    be.gather_rows(&ga, &[1, 0, 1], &mut picked).unwrap();
    assert_eq!(&picked.data()[..cols], &g[cols..]);
    assert_eq!(&picked.data()[cols..2 * cols], &g[..cols]);
    assert!(be.gather_rows(&ga, &[2, 0, 0], &mut picked).is_err());
    let am = be.argmax_rows(&ga).unwrap();
    for (row, &a) in am.iter().enumerate() {
        let rv = &g[row * cols..(row + 1) * cols];
        assert!(rv.iter().all(|&v| v <= rv[a as usize]));
    }
}

fn rope_ref(x: &[f64], style: RopeStyle, inv: &[f32], mscale: f64, pos: u32) -> Vec<f64> {
    let mut o = x.to_vec();
    let half = inv.len();
    for (i, &f) in inv.iter().enumerate() {
        let th = pos as f64 * f as f64;
        let (s, c) = (th.sin() * mscale, th.cos() * mscale);
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + half),
        };
        o[a] = x[a] * c - x[b] * s;
        o[b] = x[a] * s + x[b] * c;
    }
    o
}

#[test]
fn qk_norm_rope_matches_reference_for_both_styles_and_partial_rotary() {
    let be = CpuBackend::new();
    let (heads, hd) = (3, 16);
    let mut r = rng(21);
    for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
        for (n_pairs, with_norm) in [(8usize, true), (6, false), (4, true)] {
            let inv: Vec<f32> = (0..n_pairs)
                .map(|i| 10000f32.powf(-2.0 * i as f32 / (2 * n_pairs) as f32))
                .collect();
            let rope = be
                .make_rope(&RopeParams {
                    style,
                    inv_freq: inv.clone(),
                    mscale: 1.25,
                })
                .unwrap();
            let nw = rand_vec(&mut r, hd, 0.3);
            let norm = vector(&be, &nw, 1.0);
            let layout = BatchLayout::single(&[1, 2, 3, 4], 1000, &(0..300).collect::<Vec<_>>(), 4);
            let batch = be.prepare_batch(&layout).unwrap();
            let x0 = rand_vec(&mut r, 4 * heads * hd, 2.0);
            let mut xa = be.act_from_vec(4, heads * hd, x0.clone()).unwrap();
            be.qk_norm_rope(
                &mut xa,
                heads,
                hd,
                with_norm.then_some(&norm),
                1e-6,
                &rope,
                &batch,
            )
            .unwrap();
            for t in 0..4 {
                for h in 0..heads {
                    let off = t * heads * hd + h * hd;
                    let mut head: Vec<f64> = x0[off..off + hd].iter().map(|&v| v as f64).collect();
                    if with_norm {
                        let ms = head.iter().map(|v| v * v).sum::<f64>() / hd as f64;
                        let s = 1.0 / (ms + 1e-6).sqrt();
                        for (i, v) in head.iter_mut().enumerate() {
                            *v *= s * (nw[i] as f64 + 1.0);
                        }
                    }
                    let want = rope_ref(&head, style, &inv, 1.25, 1000 + t as u32);
                    for (i, &w) in want.iter().enumerate() {
                        let g = xa.data()[off + i] as f64;
                        assert!(
                            (g - w).abs() < 2e-5 * (1.0 + w.abs()),
                            "{style:?} pairs={n_pairs} t={t} h={h} i={i}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

/// Naive attention reference in f64 over an explicit per-sequence key list.
#[allow(clippy::too_many_arguments)]
fn attn_ref(
    q: &[f32],
    keys: &[Vec<f32>],
    vals: &[Vec<f32>],
    pos: usize,
    p: &AttnParams,
    kv_round: fn(f32) -> f32,
) -> Vec<f64> {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let mut out = vec![0f64; p.n_heads * hd];
    let lo = p
        .window
        .map(|w| (pos + 1).saturating_sub(w as usize))
        .unwrap_or(0);
    for h in 0..p.n_heads {
        let kvh = h / group;
        let mut s: Vec<f64> = (lo..=pos)
            .map(|j| {
                let mut v: f64 = (0..hd)
                    .map(|i| q[h * hd + i] as f64 * kv_round(keys[j][kvh * hd + i]) as f64)
                    .sum::<f64>()
                    * p.scale as f64;
                if let Some(c) = p.softcap {
                    v = c as f64 * (v / c as f64).tanh();
                }
                v
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut z = 0.0;
        for v in s.iter_mut() {
            *v = (*v - m).exp();
            z += *v;
        }
        for (k, j) in (lo..=pos).enumerate() {
            for i in 0..hd {
                out[h * hd + i] += s[k] / z * kv_round(vals[j][kvh * hd + i]) as f64;
            }
        }
    }
    out
}

fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// ggml's CPU flash attention with an f16 cache, written out plainly (one
/// pass, online softmax, query rounded to f16, value accumulator rounded to
/// f16 after every rescale and every added key), to check `attn_f16acc`.
fn attn_ref_ggml_f16(
    q: &[f32],
    keys: &[Vec<f32>],
    vals: &[Vec<f32>],
    pos: usize,
    p: &AttnParams,
) -> Vec<f64> {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let lo = p
        .window
        .map(|w| (pos + 1).saturating_sub(w as usize))
        .unwrap_or(0);
    let mut out = vec![0f64; p.n_heads * hd];
    for h in 0..p.n_heads {
        let kvh = h / group;
        let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![0f32; hd];
        for j in lo..=pos {
            let mut s = 0f32;
            for i in 0..hd {
                s += round_f16(q[h * hd + i]) * round_f16(keys[j][kvh * hd + i]);
            }
            s *= p.scale;
            if let Some(c) = p.softcap {
                s = c * (s / c).tanh();
            }
            let (ms, vs) = if s > m {
                let ms = (m - s).exp();
                m = s;
                acc.iter_mut().for_each(|a| *a = round_f16(*a * ms));
                (ms, 1.0)
            } else {
                (1.0, (s - m).exp())
            };
            for i in 0..hd {
                acc[i] = round_f16(round_f16(vals[j][kvh * hd + i]).mul_add(vs, acc[i]));
            }
            l = l * ms + vs;
        }
        for i in 0..hd {
            out[h * hd + i] = (acc[i] * (1.0 / l)) as f64;
        }
    }
    out
}

/// Checks one attention output against the exact reference and, for an
/// f16 cache (ggml's f16 accumulator), against `attn_ref_ggml_f16`: that
/// emulation to within an f16 step, the exact result to within what an f16
/// accumulator loses.
fn check_attn(got: &[f32], exact: &[f64], ggml: Option<&[f64]>, what: &str) {
    for (i, &w) in exact.iter().enumerate() {
        let g = got[i] as f64;
        match ggml {
            None => assert!((g - w).abs() < 1e-5, "{what} [{i}]: {g} vs {w}"),
            Some(e) => {
                assert!(
                    (g - e[i]).abs() < 2e-3 * (1.0 + e[i].abs()),
                    "{what} [{i}]: {g} vs ggml-style {}",
                    e[i]
                );
                assert!((g - w).abs() < 1e-2, "{what} [{i}]: {g} vs exact {w}");
            }
        }
    }
}

fn same(v: f32) -> f32 {
    v
}

#[test]
fn paged_attention_matches_reference() {
    // Two sequences in one batch with interleaved, non-contiguous blocks:
    // seq A: 11 cached tokens + 3 new (prefill chunk), seq B: 6 cached + 1 new (decode).
    for (kv_dtype, round, window, softcap) in [
        (KvDType::F32, same as fn(f32) -> f32, None, None),
        (KvDType::F32, same, Some(5u32), None),
        (KvDType::F16, round_f16, Some(4), Some(3.0f32)),
        (
            KvDType::Bf16,
            |v: f32| half::bf16::from_f32(v).to_f32(),
            None,
            None,
        ),
    ] {
        for level in SimdLevel::all_available() {
            let be = CpuBackend::with_level(level).unwrap();
            let p = AttnParams {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 8,
                scale: 0.35,
                window,
                softcap,
            };
            let spec = KvSpec {
                n_layers: 2,
                num_blocks: 12,
                block_size: 4,
                n_kv_heads: 2,
                head_dim: 8,
                dtype: kv_dtype,
            };
            let mut pool = be.alloc_kv(&spec).unwrap();
            let kd = 16;
            let table_a = vec![9u32, 2, 7, 4];
            let table_b = vec![5u32, 0];
            let (len_a, len_b) = (14usize, 7usize);
            let mut r = rng(31);
            let keys_a: Vec<Vec<f32>> = (0..len_a).map(|_| rand_vec(&mut r, kd, 1.5)).collect();
            let vals_a: Vec<Vec<f32>> = (0..len_a).map(|_| rand_vec(&mut r, kd, 1.0)).collect();
            let keys_b: Vec<Vec<f32>> = (0..len_b).map(|_| rand_vec(&mut r, kd, 1.5)).collect();
            let vals_b: Vec<Vec<f32>> = (0..len_b).map(|_| rand_vec(&mut r, kd, 1.0)).collect();
            let slot = |t: &[u32], pos: usize| t[pos / 4] * 4 + (pos % 4) as u32;
            let layer = 1;
            // Earlier steps: write the cached tokens (layer 0 gets garbage to
            // check layers are kept apart).
            let mut write = |tab: &[u32], ks: &[Vec<f32>], vs: &[Vec<f32>], range: std::ops::Range<usize>| {
                let n = range.len();
                let layout = BatchLayout {
                    tokens: vec![0; n],
                    positions: range.clone().map(|p| p as u32).collect(),
                    slot_mapping: range.clone().map(|p| slot(tab, p)).collect(),
                    seqs: vec![],
                    block_size: 4,
                };
                let batch = be.prepare_batch(&layout).unwrap();
                let k = be
                    .act_from_vec(n, kd, range.clone().flat_map(|p| ks[p].clone()).collect())
                    .unwrap();
                let v = be
                    .act_from_vec(n, kd, range.clone().flat_map(|p| vs[p].clone()).collect())
                    .unwrap();
                be.write_kv(&mut pool, layer, &k, &v, &batch).unwrap();
                let junk = be.act_from_vec(n, kd, vec![100.0; n * kd]).unwrap();
                be.write_kv(&mut pool, 0, &junk, &junk, &batch).unwrap();
            };
            write(&table_a, &keys_a, &vals_a, 0..11);
            write(&table_b, &keys_b, &vals_b, 0..6);
            // This step: 3 rows of A then 1 row of B.
            let positions: Vec<u32> = vec![11, 12, 13, 6];
            let layout = BatchLayout {
                tokens: vec![0; 4],
                positions: positions.clone(),
                slot_mapping: vec![
                    slot(&table_a, 11),
                    slot(&table_a, 12),
                    slot(&table_a, 13),
                    slot(&table_b, 6),
                ],
                seqs: vec![
                    SeqLayout {
                        block_table: table_a.clone(),
                        context_len: 14,
                        query_start: 0,
                        query_len: 3,
                    },
                    SeqLayout {
                        block_table: table_b.clone(),
                        context_len: 7,
                        query_start: 3,
                        query_len: 1,
                    },
                ],
                block_size: 4,
            };
            let batch = be.prepare_batch(&layout).unwrap();
            let new_k: Vec<f32> = [&keys_a[11], &keys_a[12], &keys_a[13], &keys_b[6]]
                .iter()
                .flat_map(|v| v.to_vec())
                .collect();
            let new_v: Vec<f32> = [&vals_a[11], &vals_a[12], &vals_a[13], &vals_b[6]]
                .iter()
                .flat_map(|v| v.to_vec())
                .collect();
            let k = be.act_from_vec(4, kd, new_k).unwrap();
            let v = be.act_from_vec(4, kd, new_v).unwrap();
            be.write_kv(&mut pool, layer, &k, &v, &batch).unwrap();
            let qv = rand_vec(&mut r, 4 * 32, 1.0);
            let q = be.act_from_vec(4, 32, qv.clone()).unwrap();
            let mut out = be.alloc_act(4, 32).unwrap();
            be.attention(&q, &pool, layer, &batch, &p, &mut out).unwrap();
            for row in 0..4 {
                let (ks, vs) = if row < 3 {
                    (&keys_a, &vals_a)
                } else {
                    (&keys_b, &vals_b)
                };
                let qr = &qv[row * 32..(row + 1) * 32];
                let pos = positions[row] as usize;
                let want = attn_ref(qr, ks, vs, pos, &p, round);
                let ggml = (kv_dtype == KvDType::F16).then(|| attn_ref_ggml_f16(qr, ks, vs, pos, &p));
                check_attn(
                    &out.data()[row * 32..(row + 1) * 32],
                    &want,
                    ggml.as_deref(),
                    &format!("{kv_dtype:?} {level:?} window={window:?} row {row}"),
                );
            }
        }
    }
}

#[test]
fn attention_rejects_bad_batches() {
    let be = CpuBackend::new();
    let spec = KvSpec {
        n_layers: 1,
        num_blocks: 2,
        block_size: 4,
        n_kv_heads: 1,
        head_dim: 4,
        dtype: KvDType::F32,
    };
    let mut pool = be.alloc_kv(&spec).unwrap();
    let p = AttnParams {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 4,
        scale: 1.0,
        window: None,
        softcap: None,
    };
    let q = be.alloc_act(1, 8).unwrap();
    let mut out = be.alloc_act(1, 8).unwrap();
    // Block 5 does not exist.
    let b = be.prepare_batch(&BatchLayout::single(&[1], 0, &[5], 4)).unwrap();
    assert!(be.attention(&q, &pool, 0, &b, &p, &mut out).is_err());
    let kv = be.alloc_act(1, 4).unwrap();
    assert!(be.write_kv(&mut pool, 0, &kv, &kv, &b).is_err());
    // Layer out of range.
    let b = be.prepare_batch(&BatchLayout::single(&[1], 0, &[1], 4)).unwrap();
    assert!(be.attention(&q, &pool, 1, &b, &p, &mut out).is_err());
    assert!(be.write_kv(&mut pool, 1, &kv, &kv, &b).is_err());
    // Context beyond the block table.
    let mut l = BatchLayout::single(&[1, 2], 2, &[1], 4);
    l.positions = vec![3, 4];
    l.seqs[0].context_len = 5;
    let b = be.prepare_batch(&l).unwrap();
    let q2 = be.alloc_act(2, 8).unwrap();
    let mut out2 = be.alloc_act(2, 8).unwrap();
    assert!(be.attention(&q2, &pool, 0, &b, &p, &mut out2).is_err());
    // Overlapping sequences are refused up front.
    let mut l = BatchLayout::single(&[1, 2], 0, &[0], 4);
    l.seqs.push(l.seqs[0].clone());
    assert!(be.prepare_batch(&l).is_err());
}

#[test]
fn describe_names_kernels_and_threads() {
    let be = CpuBackend::with_level(SimdLevel::Scalar).unwrap();
    let d = be.describe();
    assert!(d.starts_with("cpu (scalar, "), "{d}");
    assert!(d.contains(&format!("{} thread", be.threads())), "{d}");
}

#[test]
fn decode_attention_over_a_long_context_splits_keys_correctly() {
    // One query row over 300 cached keys in scattered blocks: few enough
    // work items that the key range is split across tasks and merged.
    let block = 16usize;
    let len = 300usize;
    let table: Vec<u32> = (0..(len.div_ceil(block) as u32)).map(|b| (b * 7) % 23).collect();
    for (kv_dtype, round, window) in [
        (KvDType::F32, same as fn(f32) -> f32, None),
        (KvDType::F32, same, Some(100u32)),
        (KvDType::F16, round_f16, None),
    ] {
        for level in SimdLevel::all_available() {
            let be = CpuBackend::with_level(level).unwrap();
            let p = AttnParams {
                n_heads: 4,
                n_kv_heads: 1,
                head_dim: 40,
                scale: 0.2,
                window,
                softcap: None,
            };
            let spec = KvSpec {
                n_layers: 1,
                num_blocks: 23,
                block_size: block,
                n_kv_heads: 1,
                head_dim: 40,
                dtype: kv_dtype,
            };
            let mut pool = be.alloc_kv(&spec).unwrap();
            let mut r = rng(41);
            let keys: Vec<Vec<f32>> = (0..len).map(|_| rand_vec(&mut r, 40, 2.0)).collect();
            let vals: Vec<Vec<f32>> = (0..len).map(|_| rand_vec(&mut r, 40, 1.0)).collect();
            let all: Vec<u32> = vec![0; len];
            let write = be
                .prepare_batch(&BatchLayout::single(&all, 0, &table, block as u32))
                .unwrap();
            let k = be.act_from_vec(len, 40, keys.concat()).unwrap();
            let v = be.act_from_vec(len, 40, vals.concat()).unwrap();
            be.write_kv(&mut pool, 0, &k, &v, &write).unwrap();
            let step = be
                .prepare_batch(&BatchLayout::single(&[0], len as u32 - 1, &table, block as u32))
                .unwrap();
            let qv = rand_vec(&mut r, 160, 1.0);
            let q = be.act_from_vec(1, 160, qv.clone()).unwrap();
            let mut out = be.alloc_act(1, 160).unwrap();
            be.attention(&q, &pool, 0, &step, &p, &mut out).unwrap();
            let want = attn_ref(&qv, &keys, &vals, len - 1, &p, round);
            let ggml = (kv_dtype == KvDType::F16).then(|| attn_ref_ggml_f16(&qv, &keys, &vals, len - 1, &p));
            check_attn(
                out.data(),
                &want,
                ggml.as_deref(),
                &format!("{kv_dtype:?} {level:?} window={window:?}"),
            );
        }
    }
}
