//! GPU tests: every op against a float64 host reference on random inputs of
//! awkward sizes, for both kernel sets. Without a GPU they print
//! "SKIP: no CUDA device: <reason>" and return (the no-device test still
//! checks that the error is clean).

use kestrel_formats::{dequantize_row, quantize_row, DType, TensorView};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CudaBackend, KernelSet};
use crate::backend::{Activation, Backend};
use crate::layout::{AttnParams, BatchLayout, KvDType, KvSpec, RopeParams, RopeStyle, SeqLayout};

/// A backend whose steps of up to 4 rows take the GEMV kernels (the
/// megakernel's path and the fusions' tests; the default sends them to the
/// f16 mirrors, covered by `hgemm_matches_f64_on_f16_operands_and_is_batch_invariant`).
fn backend(ks: KernelSet) -> Option<CudaBackend> {
    let b = CudaBackend::for_tests(ks)?;
    b.set_gemv_rows(4);
    Some(b)
}

const SETS: [KernelSet; 2] = [KernelSet::Fused, KernelSet::Reference];

fn rvec(rng: &mut ChaCha8Rng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// ‖a − b‖ / ‖b‖ in f64; NaN anywhere fails.
fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite output {x}");
        num += (x as f64 - y) * (x as f64 - y);
        den += y * y;
    }
    (num / den.max(1e-30)).sqrt()
}

fn act(be: &CudaBackend, rows: usize, cols: usize, v: &[f32]) -> super::CudaAct {
    let mut a = be.alloc_act(rows, cols).expect("alloc_act");
    be.write_act(&mut a, v).expect("write_act");
    a
}

/// Poisoned output buffer: NaN everywhere, so unwritten elements fail.
fn poisoned(be: &CudaBackend, rows: usize, cols: usize) -> super::CudaAct {
    act(be, rows, cols, &vec![f32::NAN; rows * cols])
}

/// Random weight in `dtype`: stored bytes and their exact dequantized values.
fn make_weight(rng: &mut ChaCha8Rng, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::new();
    for _ in 0..rows {
        let src = rvec(rng, cols, 1.0);
        quantize_row(dtype, &src, &mut bytes).expect("quantize_row");
    }
    let rb = dtype.row_bytes(cols).expect("row bytes");
    let mut deq = vec![0f32; rows * cols];
    for r in 0..rows {
        dequantize_row(
            dtype,
            &bytes[r * rb..(r + 1) * rb],
            &mut deq[r * cols..(r + 1) * cols],
        )
        .expect("dequantize");
    }
    (bytes, deq)
}

fn view<'a>(name: &'a str, dtype: DType, shape: &'a [usize], data: &'a [u8]) -> TensorView<'a> {
    TensorView {
        name,
        dtype,
        shape,
        data,
    }
}

#[test]
fn no_device_error_is_clean() {
    match CudaBackend::new(0) {
        Err(e) => {
            let msg = e.to_string();
            assert_eq!(
                super::device_count(),
                0,
                "a GPU is present but the CUDA backend failed: {msg}"
            );
            eprintln!("SKIP: no CUDA device: {msg}");
            assert!(
                msg.contains("not found") || msg.contains("CUDA"),
                "unhelpful error: {msg}"
            );
        }
        Ok(be) => {
            assert!(be.describe().starts_with("cuda ("));
            let e = CudaBackend::new(999)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("out of range"),
                "ordinal 999 should fail clearly, got '{e}'"
            );
        }
    }
}

#[test]
fn matmul_every_dtype() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cases: [(DType, usize); 13] = [
        (DType::F32, 100),
        (DType::F32, 96),
        (DType::F16, 100),
        (DType::F16, 200),
        (DType::BF16, 136),
        (DType::Q8_0, 672),
        (DType::Q4_0, 672),
        (DType::Q5_0, 352),
        (DType::Q4_K, 768),
        (DType::Q5_K, 512),
        (DType::Q6_K, 768),
        (DType::Q4_1, 96),
        (DType::Q3_K, 256),
    ];
    for ks in SETS {
        let Some(be) = backend(ks) else { return };
        // A tall Q8_0 matrix takes the 4-rows-per-warp kernel (LM head shape).
        let all = cases
            .iter()
            .map(|&(d, c)| (d, c, 77))
            .chain([(DType::Q8_0, 96, 16_389)]);
        for (dtype, cols, rows) in all {
            let (bytes, deq) = make_weight(&mut rng, dtype, rows, cols);
            let shape = [rows, cols];
            let w = be
                .upload_matrix(&view("w", dtype, &shape, &bytes))
                .expect("upload");
            for t in [1usize, 3, 8, 13, 40] {
                let x = rvec(&mut rng, t * cols, 1.0);
                let xa = act(&be, t, cols, &x);
                let mut out = poisoned(&be, t, rows);
                be.matmul(&xa, &w, &mut out).expect("matmul");
                let got = be.read_act(&out).expect("read");
                let mut want = vec![0f64; t * rows];
                for r in 0..t {
                    for o in 0..rows {
                        want[r * rows + o] = (0..cols)
                            .map(|i| deq[o * cols + i] as f64 * x[r * cols + i] as f64)
                            .sum();
                    }
                }
                let err = rel_err(&got, &want);
                // Rows > 8 go through f16 operands + cuBLAS on the fused set
                // (the weights' f16 mirrors). Types without a device kernel
                // are stored as f16 (rounded).
                let host_fallback = matches!(dtype, DType::Q4_1 | DType::Q3_K);
                let tol = if ks == KernelSet::Fused && t > be.gemv_rows() {
                    5e-3
                } else if host_fallback {
                    2e-3
                } else {
                    1e-5
                };
                assert!(
                    err < tol,
                    "{ks:?} matmul {dtype} [{rows}x{cols}] rows={t}: rel err {err:e}"
                );
            }
        }
    }
}

/// `matmul` of `t` rows `x` by `w` (dequantized values `deq`) and its
/// relative error against f64 on the operands the tensor-core kernels are
/// specified to use: weights and x rounded to f16 (only the f32
/// accumulation order differs). Returns the output and the error.
fn matmul_vs_f16_operands(
    be: &CudaBackend,
    w: &super::CudaWeight,
    deq: &[f32],
    t: usize,
    x: &[f32],
) -> (Vec<f32>, f64) {
    let (rows, cols) = (w.rows, w.cols);
    let f16r = |v: f32| half::f16::from_f32(v).to_f64();
    let xa = act(be, t, cols, x);
    let mut out = poisoned(be, t, rows);
    be.matmul(&xa, w, &mut out).expect("matmul");
    let got = be.read_act(&out).expect("read");
    let mut want = vec![0f64; t * rows];
    for r in 0..t {
        for o in 0..rows {
            want[r * rows + o] = (0..cols)
                .map(|i| f16r(deq[o * cols + i]) * f16r(x[r * cols + i]))
                .sum();
        }
    }
    let err = rel_err(&got, &want);
    (got, err)
}

/// The tensor-core Q8_0 kernel (tall matrices, 5..64 rows: the LM head of a
/// batched decode step) against f64 on the operands it is specified to use:
/// weights rounded to f16 as in the f16 mirror (f16(q * d)) and x rounded to
/// f16; only the f32 accumulation order differs, so the error is tiny.
/// Heights not a multiple of the 32-row unit, every tile count (1, 2, 4, 8
/// tiles of 8 rows) with partial tiles, and widths of one and ten spans.
#[test]
fn mma_q8_tall_matches_f64_on_f16_operands() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    for (rows, cols) in [(16_384 + 37, 640), (16_400, 64)] {
        let (bytes, deq) = make_weight(&mut rng, DType::Q8_0, rows, cols);
        let shape = [rows, cols];
        let w = be
            .upload_matrix(&view("w", DType::Q8_0, &shape, &bytes))
            .expect("upload");
        for t in [5usize, 8, 9, 16, 23, 33, 64] {
            assert!(be.mma_q8_takes(t, &w), "{t} rows should take mma_q8_0");
            let x = rvec(&mut rng, t * cols, 2.0);
            let (_, err) = matmul_vs_f16_operands(&be, &w, &deq, t, &x);
            assert!(err < 1e-5, "mma_q8_0 [{rows}x{cols}] rows={t}: rel err {err:e}");
        }
    }
}

/// The tiled copy of the LM head (`set_lmhead_tiled`) changes where the
/// Q8_0 kernel reads each weight from, not what it computes: logits and
/// folded argmax ids are bit-identical to the plain layout at every tile
/// count, on a height with a partial last unit (its padding rows repeat the
/// last row and must not be stored).
#[test]
fn mma_q8_tiled_copy_gives_the_same_bits() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    let (rows, cols) = (16_384 + 37, 640);
    let (bytes, _) = make_weight(&mut rng, DType::Q8_0, rows, cols);
    let shape = [rows, cols];
    let w = be
        .upload_matrix(&view("w", DType::Q8_0, &shape, &bytes))
        .expect("upload");
    assert!(
        w.tiled.is_some(),
        "a tall Q8_0 matrix gets its tiled copy at upload"
    );
    // As in decode steps: every row count takes the Q8_0 kernel.
    be.set_gemv_rows(0);
    for t in [1usize, 5, 8, 9, 16, 23, 33, 64] {
        assert!(be.mma_q8_takes(t, &w), "{t} rows should take mma_q8_0");
        let x = rvec(&mut rng, t * cols, 2.0);
        let xa = act(&be, t, cols, &x);
        let mut logits = Vec::new();
        let mut ids = Vec::new();
        for tiled in [false, true] {
            be.set_lmhead_tiled(tiled);
            let mut out = poisoned(&be, t, rows);
            be.matmul(&xa, &w, &mut out).expect("matmul");
            logits.push(be.read_act(&out).expect("read"));
            let mut keys = poisoned(&be, t, rows);
            assert!(be.matmul_argmax(&xa, &w, &mut keys).expect("matmul_argmax"));
            be.argmax_ready(&keys).expect("ready");
            ids.push(be.argmax_rows(&keys).expect("folded argmax"));
        }
        be.set_lmhead_tiled(true);
        let same = logits[0]
            .iter()
            .zip(&logits[1])
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "rows={t}: tiled logits differ from the plain layout's");
        assert!(
            logits[0].iter().all(|v| v.is_finite()),
            "rows={t}: every logit written"
        );
        assert_eq!(ids[0], ids[1], "rows={t}: tiled argmax ids differ");
    }
}

/// The f16 tensor-core GEMM of decode steps (`hgemm_*`, 1..64 rows on
/// f16 mirrors) against f64 on its operands (weights rounded to f16 as in
/// the mirror, x rounded to f16): only the f32 accumulation order differs.
/// Heights not a multiple of the 16-row block, every tile count with
/// partial tiles, one span of k and spans not a multiple of the 8 warps.
/// Then batch invariance: a row's result has the same bits whatever the
/// number of rows beside it (the summation order depends on k only; at
/// 2,080 columns rows 1..8 take `hgemm_1c8`, more rows the 4-span kernels).
#[test]
fn hgemm_matches_f64_on_f16_operands_and_is_batch_invariant() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    for (rows, cols) in [(77usize, 32usize), (1_544, 640), (640, 2_080)] {
        let (bytes, deq) = make_weight(&mut rng, DType::F16, rows, cols);
        let shape = [rows, cols];
        let w = be
            .upload_matrix(&view("w", DType::F16, &shape, &bytes))
            .expect("upload");
        be.set_hgemm_rows(64);
        be.set_gemv_rows(0);
        assert!(be.hgemm_takes(64, cols), "{cols} columns should take hgemm");
        let x = rvec(&mut rng, 64 * cols, 2.0);
        let mut first: Option<Vec<f32>> = None;
        for t in [64usize, 1, 2, 3, 4, 5, 8, 9, 16, 23, 33] {
            assert!(!be.gemv_takes(t, &[&w]), "{t} rows should take a GEMM");
            let (got, err) = matmul_vs_f16_operands(&be, &w, &deq, t, &x[..t * cols]);
            assert!(err < 1e-5, "hgemm [{rows}x{cols}] rows={t}: rel err {err:e}");
            match &first {
                None => first = Some(got),
                Some(all) => {
                    let same = got.iter().zip(all).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "hgemm [{rows}x{cols}]: the first {t} rows differ from the 64-row product"
                    );
                }
            }
        }
    }
}

/// The LM head with the argmax folded in (`matmul_argmax`, greedy steps)
/// answers exactly the ids of the logits' argmax: random activations at
/// every tile count, and rows whose logits tie at the maximum (identical
/// weight rows, far apart: the first must win, as in `argmax_rows`).
#[test]
fn mma_q8_folded_argmax_equals_argmax_of_logits() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    let (rows, cols) = (16_384 + 37, 640);
    let (mut bytes, _) = make_weight(&mut rng, DType::Q8_0, rows, cols);
    // Rows 40, 9,000 and the last: every quant 127 at scale 1/64, so with
    // positive activations they hold the (equal) largest logit.
    let row_bytes = cols / 32 * 34;
    for r in [40, 9_000, rows - 1] {
        for b in bytes[r * row_bytes..(r + 1) * row_bytes].chunks_exact_mut(34) {
            b[..2].copy_from_slice(&half::f16::from_f32(1.0 / 64.0).to_le_bytes());
            b[2..].fill(127);
        }
    }
    let shape = [rows, cols];
    let w = be
        .upload_matrix(&view("w", DType::Q8_0, &shape, &bytes))
        .expect("upload");
    for t in [5usize, 8, 9, 16, 23, 33, 64] {
        for positive in [false, true] {
            let mut x = rvec(&mut rng, t * cols, 2.0);
            if positive {
                x.iter_mut().for_each(|v| *v = v.abs() + 0.01);
            }
            let xa = act(&be, t, cols, &x);
            let mut logits = poisoned(&be, t, rows);
            be.matmul(&xa, &w, &mut logits).expect("matmul");
            let want = be.argmax_rows(&logits).expect("argmax");
            let mut out = poisoned(&be, t, rows);
            let folded = be.matmul_argmax(&xa, &w, &mut out).expect("matmul_argmax");
            assert!(folded, "{t} rows should fold the argmax into mma_q8_0");
            be.argmax_ready(&out).expect("ready");
            let got = be.argmax_rows(&out).expect("folded argmax");
            assert_eq!(got, want, "rows={t} positive={positive}");
            if positive {
                assert!(
                    got.iter().all(|&i| i == 40),
                    "ties: the first row wins, got {got:?}"
                );
            }
            // Without the declaration the buffer's (poisoned) values are read.
            let again = be.argmax_rows(&out).expect("argmax of the buffer");
            assert_ne!(again, want, "rows={t}: the folded ids are used once");
        }
    }
}

#[test]
fn embed_tables() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for ks in SETS {
        let Some(be) = backend(ks) else { return };
        for (dtype, cols) in [
            (DType::Q8_0, 160),
            (DType::Q6_K, 256),
            (DType::F16, 40),
            (DType::Q5_0, 64),
        ] {
            let rows = 301;
            let (bytes, deq) = make_weight(&mut rng, dtype, rows, cols);
            let shape = [rows, cols];
            let w = be
                .upload_matrix(&view("emb", dtype, &shape, &bytes))
                .expect("upload");
            let tokens: Vec<u32> = (0..11).map(|_| rng.random_range(0..rows as u32)).collect();
            let batch = be
                .prepare_batch(&BatchLayout::single(&tokens, 0, &[0], 16))
                .expect("batch");
            let mut out = poisoned(&be, tokens.len(), cols);
            be.embed(&w, &batch, 3.5, &mut out).expect("embed");
            let got = be.read_act(&out).expect("read");
            let want: Vec<f64> = tokens
                .iter()
                .flat_map(|&t| (0..cols).map(move |c| (t as usize, c)))
                .map(|(t, c)| deq[t * cols + c] as f64 * 3.5)
                .collect();
            assert!(rel_err(&got, &want) < 1e-6, "{ks:?} embed {dtype}");
            let bad = be
                .prepare_batch(&BatchLayout::single(&[rows as u32], 0, &[0], 16))
                .expect("batch");
            assert!(
                be.embed(&w, &bad, 1.0, &mut poisoned(&be, 1, cols)).is_err(),
                "out-of-range token accepted"
            );
        }
    }
}

fn rms_ref(x: &[f32], w: &[f32], eps: f32) -> Vec<f64> {
    let ms: f64 = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(&v, &g)| v as f64 * inv * g as f64)
        .collect()
}

#[test]
fn norms_and_elementwise() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for ks in SETS {
        let Some(be) = backend(ks) else { return };
        let (rows, cols) = (5, 1000);
        let x = rvec(&mut rng, rows * cols, 2.0);
        let d = rvec(&mut rng, rows * cols, 2.0);
        let g = rvec(&mut rng, cols, 1.5);
        let gbytes: Vec<u8> = g.iter().flat_map(|v| v.to_le_bytes()).collect();
        let gshape = [cols];
        let gv = be
            .upload_vector(&view("norm", DType::F32, &gshape, &gbytes), 1.0)
            .expect("vector");
        let g1: Vec<f32> = g.iter().map(|v| v + 1.0).collect();
        let xa = act(&be, rows, cols, &x);
        let mut out = poisoned(&be, rows, cols);
        be.rms_norm(&xa, &gv, 1e-6, &mut out).expect("rms_norm");
        let want: Vec<f64> = x.chunks(cols).flat_map(|r| rms_ref(r, &g1, 1e-6)).collect();
        assert!(
            rel_err(&be.read_act(&out).expect("read"), &want) < 1e-6,
            "{ks:?} rms_norm"
        );

        let mut xm = act(&be, rows, cols, &x);
        let da = act(&be, rows, cols, &d);
        let mut out = poisoned(&be, rows, cols);
        be.add_rms_norm(&mut xm, &da, &gv, 1e-5, &mut out)
            .expect("add_rms_norm");
        let sum: Vec<f32> = x.iter().zip(&d).map(|(a, b)| a + b).collect();
        let want: Vec<f64> = sum.chunks(cols).flat_map(|r| rms_ref(r, &g1, 1e-5)).collect();
        assert!(
            rel_err(&be.read_act(&out).expect("read"), &want) < 1e-6,
            "{ks:?} add_rms_norm out"
        );
        let sum64: Vec<f64> = sum.iter().map(|&v| v as f64).collect();
        assert!(
            rel_err(&be.read_act(&xm).expect("read"), &sum64) < 1e-7,
            "{ks:?} add_rms_norm residual"
        );

        let mut xb = act(&be, rows, cols, &x);
        be.add_bias(&mut xb, &gv).expect("add_bias");
        let want: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f64 + g1[i % cols] as f64)
            .collect();
        assert!(
            rel_err(&be.read_act(&xb).expect("read"), &want) < 1e-7,
            "{ks:?} add_bias"
        );

        let mut xs = act(&be, rows, cols, &x);
        be.softcap(&mut xs, 1.5).expect("softcap");
        let want: Vec<f64> = x.iter().map(|&v| 1.5 * (v as f64 / 1.5).tanh()).collect();
        assert!(
            rel_err(&be.read_act(&xs).expect("read"), &want) < 1e-6,
            "{ks:?} softcap"
        );

        for a in [Activation::Silu, Activation::GeluTanh] {
            let mut out = poisoned(&be, rows, cols);
            be.gated_activation(&xa, &da, a, &mut out).expect("gated");
            let want: Vec<f64> = x
                .iter()
                .zip(&d)
                .map(|(&g, &u)| {
                    let g = g as f64;
                    let act = match a {
                        Activation::Silu => g / (1.0 + (-g).exp()),
                        Activation::GeluTanh => {
                            0.5 * g
                                * (1.0
                                    + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g))
                                        .tanh())
                        }
                    };
                    act * u as f64
                })
                .collect();
            assert!(
                rel_err(&be.read_act(&out).expect("read"), &want) < 1e-6,
                "{ks:?} gated {a:?}"
            );
        }

        let idx = [4u32, 0, 4, 2];
        let mut out = poisoned(&be, idx.len(), cols);
        be.gather_rows(&xa, &idx, &mut out).expect("gather");
        let want: Vec<f64> = idx
            .iter()
            .flat_map(|&r| {
                x[r as usize * cols..(r as usize + 1) * cols]
                    .iter()
                    .map(|&v| v as f64)
            })
            .collect();
        assert_eq!(
            rel_err(&be.read_act(&out).expect("read"), &want),
            0.0,
            "{ks:?} gather_rows"
        );
        assert!(
            be.gather_rows(&xa, &[5], &mut poisoned(&be, 1, cols)).is_err(),
            "gather of a missing row accepted"
        );

        // argmax: ties resolve to the first index; a large vocabulary row.
        // (device ids, host ids) of `rows` rows of `cols` logits.
        let argmaxes = |rows: usize, cols: usize, logits: &[f32]| -> (Vec<u32>, Vec<u32>) {
            let la = act(&be, rows, cols, logits);
            let ids = be.argmax_rows(&la).expect("argmax");
            let want = logits
                .chunks(cols)
                .map(|r| crate::layout::argmax(r) as u32)
                .collect();
            (ids, want)
        };
        let vcols = 262_147;
        let mut logits = rvec(&mut rng, 4 * vcols, 10.0);
        logits[vcols + 7] = 50.0;
        logits[vcols + 90_000] = 50.0;
        logits[2 * vcols + vcols - 1] = 60.0;
        logits[3 * vcols..]
            .iter_mut()
            .for_each(|v| *v = f32::NEG_INFINITY);
        let (ids, want) = argmaxes(4, vcols, &logits);
        assert_eq!(ids, want, "{ks:?} argmax");
        assert_eq!(ids[1], 7);
        // A width divisible by 4 takes the 16-byte loads: ties inside one
        // load, across loads of one thread and across blocks.
        let vcols = 262_144;
        let mut logits = rvec(&mut rng, 3 * vcols, 10.0);
        logits[6] = 50.0;
        logits[5] = 50.0;
        logits[200_001] = 50.0;
        logits[vcols + 131_072] = 70.0;
        logits[vcols + 3] = 70.0;
        let (ids, want) = argmaxes(3, vcols, &logits);
        assert_eq!(ids, want, "{ks:?} argmax of 16-byte rows");
        assert_eq!(&ids[..2], &[5, 3]);
    }
}

/// Host RoPE (f64) of one head, in place: style and pairing as the kernels.
fn rope_ref(h: &mut [f64], pos: u32, inv_freq: &[f32], style: RopeStyle, mscale: f32) {
    let np = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + np),
        };
        let (s, c) = (pos as f64 * f as f64).sin_cos();
        let (c, s) = (c * mscale as f64, s * mscale as f64);
        let (x0, x1) = (h[a], h[b]);
        h[a] = x0 * c - x1 * s;
        h[b] = x0 * s + x1 * c;
    }
}

#[test]
fn qk_norm_rope_styles() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for ks in SETS {
        let Some(be) = backend(ks) else { return };
        for (style, head_dim, n_pairs, with_norm) in [
            (RopeStyle::Neox, 256, 128, true),
            (RopeStyle::Interleaved, 64, 32, false),
            (RopeStyle::Neox, 80, 20, true),
        ] {
            let n_heads = 3;
            let tokens = [5u32, 6, 7, 8, 9, 10, 11];
            let start = 30_000;
            let layout = BatchLayout::single(&tokens, start, &(0..2000).collect::<Vec<_>>(), 16);
            let batch = be.prepare_batch(&layout).expect("batch");
            let rows = tokens.len();
            let x = rvec(&mut rng, rows * n_heads * head_dim, 2.0);
            let inv_freq: Vec<f32> = (0..n_pairs)
                .map(|i| 10000f32.powf(-(i as f32) / n_pairs as f32))
                .collect();
            let rope = be
                .make_rope(&RopeParams {
                    style,
                    inv_freq: inv_freq.clone(),
                    mscale: 1.25,
                })
                .expect("rope");
            let w = rvec(&mut rng, head_dim, 1.0);
            let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let wshape = [head_dim];
            let wv = be
                .upload_vector(&view("qn", DType::F32, &wshape, &wb), 0.0)
                .expect("vector");
            let mut xa = act(&be, rows, n_heads * head_dim, &x);
            be.qk_norm_rope(
                &mut xa,
                n_heads,
                head_dim,
                with_norm.then_some(&wv),
                1e-6,
                &rope,
                &batch,
            )
            .expect("rope");
            let mut want = Vec::new();
            for (r, hrow) in x.chunks(head_dim).enumerate() {
                let mut h: Vec<f64> = if with_norm {
                    rms_ref(hrow, &w, 1e-6)
                } else {
                    hrow.iter().map(|&v| v as f64).collect()
                };
                rope_ref(&mut h, start + (r / n_heads) as u32, &inv_freq, style, 1.25);
                want.extend(h);
            }
            let err = rel_err(&be.read_act(&xa).expect("read"), &want);
            assert!(err < 1e-5, "{ks:?} qk_norm_rope {style:?} d={head_dim}: {err:e}");
        }
    }
}

fn round_kv(v: f32, dt: KvDType) -> f64 {
    match dt {
        KvDType::F32 => v as f64,
        KvDType::F16 => half::f16::from_f32(v).to_f64(),
        KvDType::Bf16 => half::bf16::from_f32(v).to_f64(),
    }
}

#[test]
fn paged_attention() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let bs = 16usize;
    for ks in SETS {
        let Some(be) = backend(ks) else { return };
        // Query heads per KV head 1, 2, 4, 8; each case runs with split keys
        // and again unsplit (max splits 1).
        for (dt, head_dim, window, softcap, n_heads, n_kv) in [
            (KvDType::F32, 80, None, None, 4usize, 2usize),
            (KvDType::F16, 256, Some(20u32), None, 8, 2),
            (KvDType::F16, 64, None, None, 16, 2),
            (KvDType::F32, 256, None, Some(25.0f32), 16, 2),
            (KvDType::F16, 64, Some(9u32), None, 8, 4),
            (KvDType::Bf16, 32, None, None, 8, 8),
            (KvDType::Bf16, 64, None, Some(30.0f32), 4, 2),
            (KvDType::F16, 128, Some(7u32), Some(20.0f32), 2, 2),
            // 4 query heads per KV head at head_dim 256 (the default model's
            // shape), enough (row, KV head) items (>= 64) for the
            // shared-memory-tile decode kernel in the decode-only step;
            // capped scores.
            (KvDType::F16, 256, None, Some(30.0f32), 96, 24),
            // The same with 8 query heads per KV head.
            (KvDType::F16, 64, None, None, 256, 32),
            // Decode rows x query heads above twice the SMs (132-SM GPUs):
            // the grouped decode kernels in the decode-only step (key per
            // warp below 64 (row, KV head) items, tiles from there).
            (KvDType::F16, 32, None, None, 128, 16),
            (KvDType::Bf16, 32, Some(25u32), None, 96, 24),
            // head_dim not a multiple of 8: the scalar-load path.
            (KvDType::Bf16, 36, Some(30u32), None, 4, 2),
        ] {
            let kv_dim = n_kv * head_dim;
            let spec = KvSpec {
                n_layers: 2,
                num_blocks: 24,
                block_size: bs,
                n_kv_heads: n_kv,
                head_dim,
                dtype: dt,
            };
            let mut pool = be.alloc_kv(&spec).expect("pool");
            // (context_len, query_len): a prefill, a decode, a chunked prefill.
            let seqs_shape = [(37usize, 37usize), (70, 1), (50, 5)];
            let mut free: Vec<u32> = (0..24).rev().collect();
            free.swap(3, 17);
            free.swap(5, 11);
            let tables: Vec<Vec<u32>> = seqs_shape
                .iter()
                .map(|&(ctx, _)| {
                    (0..ctx.div_ceil(bs))
                        .map(|_| free.pop().expect("blocks"))
                        .collect()
                })
                .collect();
            let slot = |s: usize, p: usize| tables[s][p / bs] * bs as u32 + (p % bs) as u32;
            // Step 1: write the whole history of every sequence (layer 1).
            let mut hist = BatchLayout {
                block_size: bs as u32,
                ..Default::default()
            };
            for (s, &(ctx, _)) in seqs_shape.iter().enumerate() {
                let q0 = hist.tokens.len() as u32;
                for p in 0..ctx {
                    hist.tokens.push(0);
                    hist.positions.push(p as u32);
                    hist.slot_mapping.push(slot(s, p));
                }
                hist.seqs.push(SeqLayout {
                    block_table: tables[s].clone(),
                    context_len: ctx as u32,
                    query_start: q0,
                    query_len: ctx as u32,
                });
            }
            let nh = hist.tokens.len();
            let k = rvec(&mut rng, nh * kv_dim, 1.0);
            let v = rvec(&mut rng, nh * kv_dim, 1.0);
            let hb = be.prepare_batch(&hist).expect("batch");
            be.write_kv(
                &mut pool,
                1,
                &act(&be, nh, kv_dim, &k),
                &act(&be, nh, kv_dim, &v),
                &hb,
            )
            .expect("write_kv");
            // Step 2: queries = the last query_len positions of each sequence
            // (a mixed step: the key-tile kernels), then only the last position
            // (a decode step: one query row per sequence).
            for decode_only in [false, true] {
                let seqs_q: Vec<(usize, usize)> = seqs_shape
                    .iter()
                    .map(|&(ctx, ql)| (ctx, if decode_only { 1 } else { ql }))
                    .collect();
                let mut step = BatchLayout {
                    block_size: bs as u32,
                    ..Default::default()
                };
                let mut hist_row = Vec::new(); // (seq, hist row offset)
                let mut off = 0;
                for (s, &(ctx, ql)) in seqs_q.iter().enumerate() {
                    let q0 = step.tokens.len() as u32;
                    for p in ctx - ql..ctx {
                        step.tokens.push(0);
                        step.positions.push(p as u32);
                        step.slot_mapping.push(slot(s, p));
                    }
                    step.seqs.push(SeqLayout {
                        block_table: tables[s].clone(),
                        context_len: ctx as u32,
                        query_start: q0,
                        query_len: ql as u32,
                    });
                    hist_row.push(off);
                    off += ctx;
                }
                let nq = step.tokens.len();
                let q = rvec(&mut rng, nq * n_heads * head_dim, 1.0);
                let sb = be.prepare_batch(&step).expect("batch");
                let p = AttnParams {
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim,
                    scale: 1.0 / (head_dim as f32).sqrt(),
                    window,
                    softcap,
                };
                let mut got = Vec::new();
                let (wo_bytes, _) = make_weight(&mut rng, DType::F16, 24, n_heads * head_dim);
                let wo_shape = [24, n_heads * head_dim];
                let wo = be
                    .upload_matrix(&view("wo", DType::F16, &wo_shape, &wo_bytes))
                    .expect("upload");
                for max_splits in [32, 1] {
                    be.set_max_attention_splits(max_splits);
                    let mut out = poisoned(&be, nq, n_heads * head_dim);
                    be.attention(&act(&be, nq, n_heads * head_dim, &q), &pool, 1, &sb, &p, &mut out)
                        .expect("attention");
                    // The projection that follows may read the attention's f16
                    // side output: it must equal a projection of the same values
                    // uploaded afresh.
                    let mut y = poisoned(&be, nq, 24);
                    be.matmul(&out, &wo, &mut y).expect("matmul");
                    let vals = be.read_act(&out).expect("read");
                    let mut y_fresh = poisoned(&be, nq, 24);
                    be.matmul(&act(&be, nq, n_heads * head_dim, &vals), &wo, &mut y_fresh)
                        .expect("matmul");
                    assert_eq!(
                        be.read_act(&y).expect("read"),
                        be.read_act(&y_fresh).expect("read"),
                        "{ks:?} projection of the attention output (heads {n_heads}, d={head_dim})"
                    );
                    got.push(vals);
                }
                be.set_max_attention_splits(32);
                let mut want = vec![0f64; nq * n_heads * head_dim];
                for (s, &(ctx, ql)) in seqs_q.iter().enumerate() {
                    for (j, pos) in (ctx - ql..ctx).enumerate() {
                        let row = step.seqs[s].query_start as usize + j;
                        let lo = window.map(|w| (pos + 1).saturating_sub(w as usize)).unwrap_or(0);
                        for h in 0..n_heads {
                            let kvh = h / (n_heads / n_kv);
                            let qh = &q[(row * n_heads + h) * head_dim..][..head_dim];
                            let kv = |t: usize, src: &[f32], d: usize| {
                                round_kv(src[(hist_row[s] + t) * kv_dim + kvh * head_dim + d], dt)
                            };
                            let scores: Vec<f64> = (lo..=pos)
                                .map(|t| {
                                    let mut sc =
                                        (0..head_dim).map(|d| qh[d] as f64 * kv(t, &k, d)).sum::<f64>()
                                            * p.scale as f64;
                                    if let Some(c) = softcap {
                                        sc = c as f64 * (sc / c as f64).tanh();
                                    }
                                    sc
                                })
                                .collect();
                            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                            let z: f64 = e.iter().sum();
                            for d in 0..head_dim {
                                want[(row * n_heads + h) * head_dim + d] =
                                    (lo..=pos).zip(&e).map(|(t, w)| w * kv(t, &v, d)).sum::<f64>() / z;
                            }
                        }
                    }
                }
                for (got, splits) in got.iter().zip(["split", "unsplit"]) {
                    let err = rel_err(got, &want);
                    assert!(
                    err < 1e-5,
                    "{ks:?} attention {dt:?} d={head_dim} heads={n_heads}/{n_kv} window={window:?} cap={softcap:?} {splits} decode-only={decode_only}: {err:e}"
                );
                }
                // A stale batch is refused rather than silently read.
                assert!(be
                    .attention(
                        &act(&be, nq, n_heads * head_dim, &q),
                        &pool,
                        1,
                        &hb,
                        &p,
                        &mut poisoned(&be, nq, n_heads * head_dim)
                    )
                    .is_err());
            }
        }
    }
}

#[test]
fn graph_replay_sees_new_metadata() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    let (vocab, dim, heads, hd) = (500usize, 256usize, 2usize, 128usize);
    let up = |name: &'static str, dtype: DType, rows: usize, rng: &mut ChaCha8Rng| {
        let (b, _) = make_weight(rng, dtype, rows, dim);
        let shape = [rows, dim];
        be.upload_matrix(&view(name, dtype, &shape, &b)).expect("upload")
    };
    let emb = up("emb", DType::Q8_0, vocab, &mut rng);
    let wq = up("wq", DType::Q4_K, heads * hd, &mut rng);
    let wk = up("wk", DType::Q5_0, hd, &mut rng);
    let wv = up("wv", DType::Q6_K, hd, &mut rng);
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
        .collect();
    let rope = be
        .make_rope(&RopeParams {
            style: RopeStyle::Neox,
            inv_freq: inv,
            mscale: 1.0,
        })
        .expect("rope");
    let spec = KvSpec {
        n_layers: 1,
        num_blocks: 32,
        block_size: 16,
        n_kv_heads: 1,
        head_dim: hd,
        dtype: KvDType::F16,
    };
    let mut pool = be.alloc_kv(&spec).expect("pool");
    let p = AttnParams {
        n_heads: heads,
        n_kv_heads: 1,
        head_dim: hd,
        scale: 0.1,
        window: None,
        softcap: None,
    };
    struct Bufs {
        x: super::CudaAct,
        q: super::CudaAct,
        k: super::CudaAct,
        v: super::CudaAct,
        att: super::CudaAct,
    }
    let a = |r, c| be.alloc_act(r, c).expect("act");
    let mut s = Bufs {
        x: a(1, dim),
        q: a(1, heads * hd),
        k: a(1, hd),
        v: a(1, hd),
        att: a(1, heads * hd),
    };
    let table_a: Vec<u32> = (0..8).collect();
    let table_b: Vec<u32> = (10..18).collect();
    be.reserve_batch(128, 4, 64).expect("reserve");
    // History of sequence A: positions 0..77.
    let hist: Vec<u32> = (0..77).collect();
    let hb = be
        .prepare_batch(&BatchLayout::single(&hist, 0, &table_a, 16))
        .expect("batch");
    let hk = act(&be, 77, hd, &rvec(&mut rng, 77 * hd, 1.0));
    let hv = act(&be, 77, hd, &rvec(&mut rng, 77 * hd, 1.0));
    be.write_kv(&mut pool, 0, &hk, &hv, &hb).expect("history");
    let step = |be: &CudaBackend, pool: &mut super::CudaKvPool, s: &mut Bufs, b: &super::CudaBatch| {
        be.embed(&emb, b, 2.0, &mut s.x).expect("embed");
        be.matmul(&s.x, &wq, &mut s.q).expect("matmul");
        be.matmul(&s.x, &wk, &mut s.k).expect("matmul");
        be.matmul(&s.x, &wv, &mut s.v).expect("matmul");
        be.qk_norm_rope(&mut s.q, heads, hd, None, 1e-6, &rope, b)
            .expect("rope");
        be.qk_norm_rope(&mut s.k, 1, hd, None, 1e-6, &rope, b)
            .expect("rope");
        be.write_kv(pool, 0, &s.k, &s.v, b).expect("write_kv");
        be.attention(&s.q, pool, 0, b, &p, &mut s.att).expect("attention");
        be.launch_argmax(&s.att).expect("argmax");
    };
    // Eager result of the second step (sequence A, position 77).
    let b2 = be
        .prepare_batch(&BatchLayout::single(&[321], 77, &table_a, 16))
        .expect("batch");
    step(&be, &mut pool, &mut s, &b2);
    let eager = be.read_act(&s.att).expect("read");
    let eager_id = be.fetch_argmax(1).expect("ids");
    // Capture on another sequence's first step (B, position 3), replay with A's.
    let b1 = be
        .prepare_batch(&BatchLayout::single(&[7], 3, &table_b, 16))
        .expect("batch");
    be.begin_capture().expect("begin");
    step(&be, &mut pool, &mut s, &b1);
    // What cannot live in a graph is refused instead of silently captured.
    assert!(be.read_act(&s.att).is_err(), "read_act inside a capture");
    assert!(be.alloc_act(1, 4).is_err(), "alloc_act inside a capture");
    assert!(
        be.prepare_batch(&BatchLayout::single(&[1], 0, &table_b, 16))
            .is_err(),
        "prepare_batch inside a capture"
    );
    let g = be.end_capture().expect("end");
    be.replay(&g).expect("replay");
    let first = be.read_act(&s.att).expect("read");
    let _b2 = be
        .prepare_batch(&BatchLayout::single(&[321], 77, &table_a, 16))
        .expect("batch");
    be.replay(&g).expect("replay");
    let replayed = be.read_act(&s.att).expect("read");
    assert_eq!(
        replayed, eager,
        "graph replay must equal the eager step bit for bit"
    );
    assert_ne!(
        first, eager,
        "different tokens/positions must give different results"
    );
    assert_eq!(be.fetch_argmax(1).expect("ids"), eager_id);
    // A step with more rows grows the attention scratch the graph points
    // at: the graph must turn stale instead of replaying into freed memory.
    assert!(be.graph_is_current(&g).expect("epoch"), "nothing changed yet");
    let two = be
        .prepare_batch(&BatchLayout::single(&[5, 6], 0, &table_b, 16))
        .expect("batch");
    let q2 = act(&be, 2, heads * hd, &rvec(&mut rng, 2 * heads * hd, 1.0));
    let mut o2 = be.alloc_act(2, heads * hd).expect("act");
    be.attention(&q2, &pool, 0, &two, &p, &mut o2).expect("attention");
    assert!(
        !be.graph_is_current(&g).expect("epoch"),
        "regrown attention scratch must make earlier graphs stale"
    );
}

/// Host f64 reference of the residual step: returns (new x, out).
fn residual_ref(
    x: &[f32],
    delta: &[f64],
    post: Option<&[f32]>,
    next: &[f32],
    eps: f32,
) -> (Vec<f64>, Vec<f64>) {
    let rms_inv =
        |v: &[f64]| 1.0 / (v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64 + eps as f64).sqrt();
    let d: Vec<f64> = match post {
        Some(p) => {
            let inv = rms_inv(delta);
            delta.iter().zip(p).map(|(&a, &g)| a * inv * g as f64).collect()
        }
        None => delta.to_vec(),
    };
    let nx: Vec<f64> = x.iter().zip(&d).map(|(&a, &b)| a as f64 + b).collect();
    let inv = rms_inv(&nx);
    let out = nx.iter().zip(next).map(|(&a, &g)| a * inv * g as f64).collect();
    (nx, out)
}

/// `W · a` in f64 for every row of `a` (`a` is `[t, cols]`, W `[rows, cols]`).
fn gemv_ref(w: &[f32], rows: usize, cols: usize, a: &[f64]) -> Vec<f64> {
    a.chunks(cols)
        .flat_map(|ar| (0..rows).map(move |o| (0..cols).map(|i| w[o * cols + i] as f64 * ar[i]).sum::<f64>()))
        .collect()
}

fn upload_f32_vector(be: &CudaBackend, v: &[f32]) -> super::CudaVector {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let shape = [v.len()];
    be.upload_vector(&view("norm", DType::F32, &shape, &bytes), 0.0)
        .expect("vector")
}

/// GELU (tanh) of `g` times `u` in f64.
fn gelu_mul(g: f64, u: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * g * (1.0 + (k * (g + 0.044715 * g * g * g)).tanh()) * u
}

/// The seams between blocks: `ffn_block` after a residual step, and the
/// residual step of `attention_block` (`gemv_prologue` with three weights), whose
/// residual step the fused set runs inside the projection's launch at 1..4
/// rows. Against f64 (the new residual and the projections) and bit for bit
/// against the same backend with the fusion off (a `residual_norm` launch,
/// then plain GEMVs): the fused step keeps residual_norm's arithmetic and
/// summation order, which the decode megakernel's bit-identity relies on.
/// 8 and 13 rows take the unfused path. Launches back to back also check
/// that the ticket counter is reset (a stale count would skip writing x).
#[test]
fn residual_seams_match_f64_and_unfused_bits() {
    use crate::backend::ResidualNorm;
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let ffn = 768;
    // hidden 196: no multiple of 32 (F32 projections); 640: the default model's.
    for (hidden, gdt) in [(196usize, DType::F32), (640, DType::Q5_0)] {
        let post = rvec(&mut rng, hidden, 1.5);
        let next = rvec(&mut rng, hidden, 1.5);
        let (pv, nv) = (upload_f32_vector(&be, &post), upload_f32_vector(&be, &next));
        let mut up_w = |name: &str, dt: DType, r: usize, c: usize| {
            let (bytes, deq) = make_weight(&mut rng, dt, r, c);
            let shape = [r, c];
            let w = be.upload_matrix(&view(name, dt, &shape, &bytes)).expect("upload");
            (w, deq)
        };
        let (wg, gdeq) = up_w("gate", gdt, ffn, hidden);
        let (wu, udeq) = up_w("up", gdt, ffn, hidden);
        let (wq, _) = up_w("wq", gdt, 256, hidden);
        let (wk, _) = up_w("wk", gdt, 64, hidden);
        let (wv, _) = up_w("wv", gdt, 64, hidden);
        let downs: Vec<_> = [DType::Q4_K, DType::Q5_K, DType::Q6_K]
            .into_iter()
            .map(|dt| (dt, up_w("down", dt, hidden, ffn)))
            .collect();
        for (ddt, (wd, ddeq)) in &downs {
            for t in [1usize, 2, 3, 4, 8, 13] {
                for with_post in [true, false] {
                    let what = format!("hidden {hidden} {gdt} down {ddt} rows={t} post={with_post}");
                    let pw = with_post.then_some(&pv);
                    let delta0 = rvec(&mut rng, t * hidden, 1.0);
                    let x0 = rvec(&mut rng, t * hidden, 2.0);
                    let (mut want_x, mut want_h) = (Vec::new(), Vec::new());
                    for (xr, dr) in x0.chunks(hidden).zip(delta0.chunks(hidden)) {
                        let d64: Vec<f64> = dr.iter().map(|&v| v as f64).collect();
                        let (nx, h) =
                            residual_ref(xr, &d64, with_post.then_some(post.as_slice()), &next, 1e-6);
                        want_x.extend(nx);
                        want_h.extend(h);
                    }
                    let g = gemv_ref(&gdeq, ffn, hidden, &want_h);
                    let u = gemv_ref(&udeq, ffn, hidden, &want_h);
                    let a: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| gelu_mul(g, u)).collect();
                    let want_out = gemv_ref(ddeq, hidden, ffn, &a);

                    // Feed-forward seam, fusion on then off.
                    let mut runs = Vec::new();
                    for on in [true, false] {
                        be.set_prologue(on);
                        let mut x = act(&be, t, hidden, &x0);
                        let d = act(&be, t, hidden, &delta0);
                        let (mut tmp, mut h) = (poisoned(&be, t, hidden), poisoned(&be, t, hidden));
                        let (mut gate, mut upb) = (poisoned(&be, t, ffn), poisoned(&be, t, ffn));
                        let (mut act_out, mut out) = (poisoned(&be, t, ffn), poisoned(&be, t, hidden));
                        let r = ResidualNorm {
                            x: &mut x,
                            post_norm: pw,
                            next_norm: &nv,
                            eps: 1e-6,
                            tmp: &mut tmp,
                            out: &mut h,
                        };
                        be.ffn_block(
                            crate::backend::BlockInput::Residual { delta: &d, step: r },
                            [&wg, &wu, wd],
                            Activation::GeluTanh,
                            &mut gate,
                            &mut upb,
                            &mut act_out,
                            &mut out,
                        )
                        .expect("ffn_block");
                        let (gx, gout) = (be.read_act(&x).expect("x"), be.read_act(&out).expect("out"));
                        let err = rel_err(&gx, &want_x);
                        assert!(err < 1e-6, "{what} prologue={on}: x rel err {err:e}");
                        let tol = if t > be.gemv_rows() { 5e-3 } else { 2e-5 };
                        let err = rel_err(&gout, &want_out);
                        assert!(err < tol, "{what} prologue={on}: ffn out rel err {err:e}");
                        runs.push((gx, gout));
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&runs[0].0),
                        bits(&runs[1].0),
                        "{what}: x differs from the unfused bits"
                    );
                    assert_eq!(
                        bits(&runs[0].1),
                        bits(&runs[1].1),
                        "{what}: out differs from the unfused bits"
                    );

                    // Attention seam: the residual step in the QKV launch
                    // against residual_norm + the three-weight GEMV.
                    be.set_prologue(true);
                    let ws = [&wq, &wk, &wv];
                    if t <= super::fused::PROLOGUE_MAX_ROWS && be.prologue_takes(t, hidden, &ws, true) {
                        let d = act(&be, t, hidden, &delta0);
                        let mut x = act(&be, t, hidden, &x0);
                        let mut o: Vec<_> = [256, 64, 64].iter().map(|&c| poisoned(&be, t, c)).collect();
                        let p = super::fused::Prologue::Residual {
                            res: &mut x,
                            delta: &d,
                            post: pw,
                            norm: &nv,
                            eps: 1e-6,
                        };
                        let mut outs: Vec<&mut super::CudaAct> = o.iter_mut().collect();
                        be.gemv_prologue(p, &ws, &mut outs).expect("gemvp");
                        let mut x2 = act(&be, t, hidden, &x0);
                        let (mut tmp, mut h) = (poisoned(&be, t, hidden), poisoned(&be, t, hidden));
                        be.residual_norm(&mut x2, &d, pw, &nv, 1e-6, &mut tmp, &mut h)
                            .expect("residual_norm");
                        let mut o2: Vec<_> = [256, 64, 64].iter().map(|&c| poisoned(&be, t, c)).collect();
                        let outs2: Vec<u64> = o2.iter_mut().map(|a| a.ptr()).collect();
                        be.multi_gemv(&h, &ws, &outs2, &[256, 64, 64]).expect("gemv3");
                        let read = |a: &super::CudaAct| bits(&be.read_act(a).expect("read"));
                        assert_eq!(read(&x), read(&x2), "{what}: qkv seam x bits");
                        for (i, n) in ["q", "k", "v"].iter().enumerate() {
                            assert_eq!(read(&o[i]), read(&o2[i]), "{what}: qkv seam {n} bits");
                        }
                    } else {
                        assert!(
                            t > super::fused::PROLOGUE_MAX_ROWS,
                            "{what}: the fused seam was expected"
                        );
                    }
                }
            }
        }
    }
}

/// `gated_ffn` alone (at 1..4 rows the fused set forms act(gate) * up in
/// the down projection's launch; its `act_out` scratch is then left
/// untouched).
#[test]
fn fused_gated_ffn_matches_f64() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (hidden, ffn) = (256, 1280);
    for (ks, on) in [
        (KernelSet::Fused, true),
        (KernelSet::Fused, false),
        (KernelSet::Reference, true),
    ] {
        let Some(be) = backend(ks) else { return };
        be.set_prologue(on);
        let (gbytes, gdeq) = make_weight(&mut rng, DType::Q4_K, ffn, hidden);
        let (ubytes, udeq) = make_weight(&mut rng, DType::Q4_K, ffn, hidden);
        let (dbytes, ddeq) = make_weight(&mut rng, DType::Q6_K, 77, ffn);
        let gshape = [ffn, hidden];
        let dshape = [77, ffn];
        let wg = be
            .upload_matrix(&view("gate", DType::Q4_K, &gshape, &gbytes))
            .expect("upload");
        let wu = be
            .upload_matrix(&view("up", DType::Q4_K, &gshape, &ubytes))
            .expect("upload");
        let wd = be
            .upload_matrix(&view("down", DType::Q6_K, &dshape, &dbytes))
            .expect("upload");
        for t in [1usize, 2, 5, 8] {
            let h = rvec(&mut rng, t * hidden, 1.0);
            let ha = act(&be, t, hidden, &h);
            let mut gate = poisoned(&be, t, ffn);
            let mut up = poisoned(&be, t, ffn);
            let mut act_out = poisoned(&be, t, ffn);
            let mut out = poisoned(&be, t, 77);
            be.gated_ffn(
                &ha,
                [&wg, &wu, &wd],
                Activation::GeluTanh,
                &mut gate,
                &mut up,
                &mut act_out,
                &mut out,
            )
            .expect("gated_ffn");
            let h64: Vec<f64> = h.iter().map(|&v| v as f64).collect();
            let g = gemv_ref(&gdeq, ffn, hidden, &h64);
            let u = gemv_ref(&udeq, ffn, hidden, &h64);
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let a: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| 0.5 * g * (1.0 + (k * (g + 0.044715 * g * g * g)).tanh()) * u)
                .collect();
            let want = gemv_ref(&ddeq, 77, ffn, &a);
            let err = rel_err(&be.read_act(&out).expect("read"), &want);
            // Above the GEMV row limit the fused set runs GEMMs with f16 operands.
            let tol = if ks == KernelSet::Fused && t > be.gemv_rows() {
                5e-3
            } else {
                2e-5
            };
            assert!(
                err < tol,
                "{ks:?} prologue={on} gated_ffn rows={t}: rel err {err:e}"
            );
        }
    }
}

/// `qkv_rope_store`: the fused set (3 rows: one multi-GEMV launch; 13 and 64
/// rows: one GEMM on the stacked Q/K/V mirror whose output the RoPE kernel
/// reads) against the reference kernels' composition (`qkv`, then q/k norm,
/// RoPE, K/V store): q, k, v, and attention over the K/V it stored.
#[test]
fn qkv_rope_store_matches_reference() {
    let (hidden, n_heads, n_kv, head_dim) = (256usize, 4usize, 2usize, 64usize);
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv * head_dim);
    for rows in [3usize, 13, 64] {
        let mut results = Vec::new();
        for ks in [KernelSet::Fused, KernelSet::Reference] {
            let Some(be) = backend(ks) else { return };
            // Same inputs for both sets.
            let mut rng = ChaCha8Rng::seed_from_u64(21 + rows as u64);
            let mut upload = |name: &str, dt: DType, r: usize| {
                let (bytes, _) = make_weight(&mut rng, dt, r, hidden);
                let shape = [r, hidden];
                be.upload_matrix(&view(name, dt, &shape, &bytes)).expect("upload")
            };
            let wq = upload("wq", DType::Q8_0, q_dim);
            let wk = upload("wk", DType::Q4_K, kv_dim);
            let wv = upload("wv", DType::Q6_K, kv_dim);
            let h = rvec(&mut rng, rows * hidden, 1.0);
            let norms: Vec<Vec<f32>> = (0..2).map(|_| rvec(&mut rng, head_dim, 1.0)).collect();
            let norm_vecs: Vec<_> = norms.iter().map(|w| upload_f32_vector(&be, w)).collect();
            let rope = be
                .make_rope(&RopeParams {
                    style: RopeStyle::Neox,
                    inv_freq: (0..head_dim / 2)
                        .map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32))
                        .collect(),
                    mscale: 1.0,
                })
                .expect("rope");
            let spec = KvSpec {
                n_layers: 1,
                num_blocks: 8,
                block_size: 16,
                n_kv_heads: n_kv,
                head_dim,
                dtype: KvDType::F32,
            };
            let mut pool = be.alloc_kv(&spec).expect("pool");
            let tokens: Vec<u32> = (0..rows as u32).collect();
            let layout = BatchLayout::single(&tokens, 0, &[3, 1, 6, 0, 2], 16);
            let batch = be.prepare_batch(&layout).expect("batch");
            let (mut q, mut k, mut v) = (
                poisoned(&be, rows, q_dim),
                poisoned(&be, rows, kv_dim),
                poisoned(&be, rows, kv_dim),
            );
            let qkv_rows = crate::backend::QkvRows {
                q: &mut q,
                k: &mut k,
                v: &mut v,
                n_heads,
                n_kv_heads: n_kv,
                head_dim,
            };
            be.qkv_rope_store(
                &act(&be, rows, hidden, &h),
                [&wq, &wk, &wv],
                [None, None, None],
                qkv_rows,
                [Some(&norm_vecs[0]), Some(&norm_vecs[1])],
                1e-6,
                &rope,
                &mut pool,
                0,
                &batch,
            )
            .expect("qkv_rope_store");
            let p = AttnParams {
                n_heads,
                n_kv_heads: n_kv,
                head_dim,
                scale: 0.125,
                window: None,
                softcap: None,
            };
            let mut out = poisoned(&be, rows, q_dim);
            be.attention(&q, &pool, 0, &batch, &p, &mut out)
                .expect("attention");
            let read = |a: &super::CudaAct| be.read_act(a).expect("read");
            results.push([read(&q), read(&k), read(&v), read(&out)]);
        }
        let (fused, reference) = (&results[0], &results[1]);
        // The GEMM path takes f16 operands (`backend` sends up to 4 rows to the GEMVs).
        let tol = if rows > 4 { 5e-3 } else { 1e-5 };
        for (i, what) in ["q", "k", "v", "attention"].iter().enumerate() {
            let want: Vec<f64> = reference[i].iter().map(|&x| x as f64).collect();
            let err = rel_err(&fused[i], &want);
            assert!(err < tol, "qkv_rope_store {rows} rows: {what} rel err {err:e}");
        }
    }
}

/// `attention_block` at decode sizes (1..3 sequences): QKV with the residual
/// step inside (`gemvp`) and the q/k norm + RoPE + K/V store inside
/// attention (`attention_rope`) give the bits of the unfused sequence
/// (residual_norm, gemv3, qk_norm_rope_store, attention) step after step,
/// so the keys they store agree too. Group 4 at head_dim 256 with f16 KV (the
/// default model's shape) and group 2 at head_dim 64 with f32 KV and a
/// sliding window; sequences join at different steps, so the row count
/// changes and each new key lands in a different split.
#[test]
fn attention_block_fused_equals_unfused_bits() {
    use crate::backend::{BlockInput, ResidualNorm};
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    // attention_rope always merges the launch's split count; the unfused
    // path does the same only without adaptive splits.
    be.set_attention_keys_per_split(0);
    let hidden = 640;
    let starts = [0usize, 5, 12];
    let steps = 45;
    for (n_heads, n_kv, head_dim, kvd, window) in [
        (4usize, 1usize, 256usize, KvDType::F16, None),
        (4, 2, 64, KvDType::F32, Some(5u32)),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64(31 + head_dim as u64);
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv * head_dim);
        let mut upload = |name: &str, r: usize| {
            let (bytes, _) = make_weight(&mut rng, DType::Q5_0, r, hidden);
            let shape = [r, hidden];
            be.upload_matrix(&view(name, DType::Q5_0, &shape, &bytes))
                .expect("upload")
        };
        let (wq, wk, wv) = (upload("wq", q_dim), upload("wk", kv_dim), upload("wv", kv_dim));
        let vecs: Vec<_> = [head_dim, head_dim, hidden, hidden]
            .iter()
            .map(|&n| upload_f32_vector(&be, &rvec(&mut rng, n, 1.5)))
            .collect();
        let rope = be
            .make_rope(&RopeParams {
                style: RopeStyle::Neox,
                inv_freq: (0..head_dim / 2)
                    .map(|i| 10000f32.powf(-2.0 * i as f32 / head_dim as f32))
                    .collect(),
                mscale: 1.0,
            })
            .expect("rope");
        let p = AttnParams {
            n_heads,
            n_kv_heads: n_kv,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
            softcap: None,
        };
        let inputs: Vec<(Vec<f32>, Vec<f32>)> = (0..steps)
            .map(|i| {
                let rows = starts.iter().filter(|&&s| s <= i).count();
                (
                    rvec(&mut rng, rows * hidden, 2.0),
                    rvec(&mut rng, rows * hidden, 1.0),
                )
            })
            .collect();
        let mut runs = Vec::new();
        for on in [true, false] {
            be.set_prologue(on);
            let spec = KvSpec {
                n_layers: 1,
                num_blocks: 12,
                block_size: 16,
                n_kv_heads: n_kv,
                head_dim,
                dtype: kvd,
            };
            let mut pool = be.alloc_kv(&spec).expect("pool");
            let mut got = Vec::new();
            for (i, (x0, d0)) in inputs.iter().enumerate() {
                let mut lay = BatchLayout {
                    block_size: 16,
                    ..Default::default()
                };
                for (s, _) in starts.iter().enumerate().filter(|(_, &st)| st <= i) {
                    let pos = (i - starts[s]) as u32;
                    let table: Vec<u32> = (0..4).map(|b| (s * 4 + b) as u32).collect();
                    lay.tokens.push(0);
                    lay.positions.push(pos);
                    lay.slot_mapping.push(table[(pos / 16) as usize] * 16 + pos % 16);
                    lay.seqs.push(SeqLayout {
                        block_table: table,
                        context_len: pos + 1,
                        query_start: lay.seqs.len() as u32,
                        query_len: 1,
                    });
                }
                let t = lay.seqs.len();
                let batch = be.prepare_batch(&lay).expect("batch");
                if on {
                    assert!(
                        be.prologue_takes(t, hidden, &[&wq, &wk, &wv], true)
                            && be.rope_attention_takes(t, &batch, &p, &pool, &rope),
                        "step {i}: the fused attention block was expected to apply"
                    );
                }
                let mut x = act(&be, t, hidden, x0);
                let d = act(&be, t, hidden, d0);
                let (mut tmp, mut h) = (poisoned(&be, t, hidden), poisoned(&be, t, hidden));
                let (mut q, mut k, mut v) = (
                    poisoned(&be, t, q_dim),
                    poisoned(&be, t, kv_dim),
                    poisoned(&be, t, kv_dim),
                );
                let mut out = poisoned(&be, t, q_dim);
                let input = BlockInput::Residual {
                    delta: &d,
                    step: ResidualNorm {
                        x: &mut x,
                        post_norm: Some(&vecs[2]),
                        next_norm: &vecs[3],
                        eps: 1e-6,
                        tmp: &mut tmp,
                        out: &mut h,
                    },
                };
                let rows = crate::backend::QkvRows {
                    q: &mut q,
                    k: &mut k,
                    v: &mut v,
                    n_heads,
                    n_kv_heads: n_kv,
                    head_dim,
                };
                be.attention_block(
                    input,
                    [&wq, &wk, &wv],
                    [None, None, None],
                    rows,
                    [Some(&vecs[0]), Some(&vecs[1])],
                    1e-6,
                    &rope,
                    &mut pool,
                    0,
                    &batch,
                    &p,
                    &mut out,
                )
                .expect("attention_block");
                let o = be.read_act(&out).expect("out");
                assert!(
                    o.iter().all(|v| v.is_finite()),
                    "step {i}: non-finite attention output"
                );
                got.push((
                    o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    be.read_act(&x)
                        .expect("x")
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                ));
            }
            runs.push(got);
        }
        be.set_prologue(true);
        for (i, (a, b)) in runs[0].iter().zip(&runs[1]).enumerate() {
            assert_eq!(a.1, b.1, "head_dim {head_dim} step {i}: residual differs");
            assert_eq!(
                a.0, b.0,
                "head_dim {head_dim} step {i}: attention output differs from the unfused bits"
            );
        }
    }
}

/// Both handoffs of the boundary chains hand over in order (the chain's
/// final values count every kernel of every replay; `kernel_boundaries`
/// errors otherwise), at one and three blocks per SM, and time something.
#[test]
fn kernel_boundary_chains_hand_over_in_order() {
    let Some(be) = backend(KernelSet::Fused) else {
        return;
    };
    let sms = be.sm_count() as u32;
    for blocks in [sms, 3 * sms] {
        let costs = be.kernel_boundaries(64, blocks, 3).unwrap();
        assert_eq!(costs.len(), 3);
        for c in costs {
            println!(
                "{} {} blocks: {:.2} us per kernel",
                c.handoff, c.blocks, c.us_per_kernel
            );
            assert!(c.us_per_kernel > 0.0 && c.us_per_kernel.is_finite());
        }
    }
}
