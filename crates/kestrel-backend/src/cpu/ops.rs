//! Row-wise and element-wise operations: RMSNorm, RoPE, gated activations,
//! soft-capping. Shapes are checked by the caller (`cpu::mod`).
//!
//! The transcendental functions (exp for SiLU, tanh for GELU/soft-capping)
//! use a polynomial `exp` written in plain arithmetic so the compiler can
//! vectorise whole rows: libm's scalar `tanhf` would cost ~0.7 ms per decoded
//! token on the FFN activations alone. The kernels are compiled once per
//! SIMD level (`#[target_feature]` wrappers around one generic body).

use crate::cpu::features::leveled;
use crate::cpu::parallel::chunks_mut;
use crate::layout::RopeStyle;

/// Element count above which a row-wise op is spread over the thread pool;
/// below it the hand-off costs more than the work.
pub const PAR_ELEMS: usize = 1 << 15;

/// Runs `f(row_index, row)` over the rows of `data` (`cols` wide), in
/// parallel when the matrix is large.
pub fn for_rows<F>(data: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Send + Sync,
{
    if cols == 0 {
        return;
    }
    if data.len() >= PAR_ELEMS && data.len() > cols {
        // Groups of rows of about PAR_ELEMS / 4 values per chunk.
        let per = (PAR_ELEMS / 4 / cols).max(1);
        chunks_mut(data, per * cols, |ci, rows| {
            for (k, r) in rows.chunks_mut(cols).enumerate() {
                f(ci * per + k, r);
            }
        });
    } else {
        data.chunks_mut(cols).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// `1 / sqrt(mean(x²) + eps)`, the sum in f64 as ggml does.
#[inline]
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (ss / x.len().max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `out = x / rms(x) * w`.
#[inline]
pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let s = rms_scale(x, eps);
    for ((o, &v), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = (v * s) * wi;
    }
}

/// In-place RMSNorm of one head.
#[inline]
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let s = rms_scale(x, eps);
    for (v, &wi) in x.iter_mut().zip(w) {
        *v = (*v * s) * wi;
    }
}

/// Rotates one head by the angles `pos * inv_freq[i]` (cos/sin scaled by
/// `mscale`); only the first `2 * inv_freq.len()` dims are rotated.
/// Interleaved pairs (2i, 2i+1); NeoX pairs (i, i + n_rot/2) where n_rot is
/// the rotated width (the whole head without partial rotary).
pub fn rope_head(x: &mut [f32], style: RopeStyle, inv_freq: &[f32], mscale: f32, pos: u32) {
    let half = inv_freq.len();
    for (i, &f) in inv_freq.iter().enumerate() {
        // In f64: for long contexts pos * f reaches 1e4..1e5 rad, where f32
        // would lose ~1e-3 rad of the angle.
        let (s, c) = (pos as f64 * f as f64).sin_cos();
        let (s, c) = (s as f32 * mscale, c as f32 * mscale);
        let (a, b) = match style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::Neox => (i, i + half),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

// ---- vectorisable transcendental functions --------------------------------

/// `e^x` for f32, relative error ~2e-7 over the whole range, written
/// without branches or calls so loops over it vectorise. Saturates to 0
/// below -87.3 and to f32::MAX-ish above 88.7 (as expf does to 0 / inf).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // x = k ln2 + r, |r| <= ln2/2; Cody-Waite split of ln2 keeps r exact.
    let k = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = k.mul_add(-0.693_145_75, x);
    let r = k.mul_add(-1.428_606_8e-6, r);
    // Taylor to degree 7 on |r| <= 0.347: truncation ~5e-9.
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^k via the exponent bits (k in -126..=128 after the clamp).
    let ki = k as i32;
    let scale = f32::from_bits(((ki + 127).clamp(1, 254) as u32) << 23);
    // k = 128 (x near 88.7) does not fit one scale: split it.
    let extra = if ki > 127 { 2.0 } else { 1.0 };
    p * scale * extra
}

/// `tanh(x)` from `fast_exp`; absolute error ~2e-7.
#[inline(always)]
pub fn fast_tanh(x: f32) -> f32 {
    let a = x.abs().min(20.0);
    let e = fast_exp(2.0 * a);
    let t = 1.0 - 2.0 / (e + 1.0);
    t.copysign(x)
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + fast_exp(-x))
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_tanh(SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)))
}

#[inline(always)]
fn geglu_body(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = gelu_tanh(g) * u;
    }
}

#[inline(always)]
fn swiglu_body(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = silu(g) * u;
    }
}

#[inline(always)]
fn softcap_body(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x.iter_mut() {
        *v = cap * fast_tanh(*v * inv);
    }
}

leveled!(geglu, geglu_body, (g: &[f32], u: &[f32], o: &mut [f32]));
leveled!(swiglu, swiglu_body, (g: &[f32], u: &[f32], o: &mut [f32]));
leveled!(softcap, softcap_body, (x: &mut [f32], cap: f32));

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::features::SimdLevel;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = fast_exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(-1000.0).min(1e-37), fast_exp(-1000.0));
        assert!(fast_exp(88.7) > 3e38 && fast_exp(88.7).is_finite());
    }

    #[test]
    fn activations_match_f64_formulas() {
        for i in -4000..4000 {
            let x = i as f32 * 0.005;
            let xd = x as f64;
            let gelu = 0.5
                * xd
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3))).tanh());
            let silu_ref = xd / (1.0 + (-xd).exp());
            assert!(
                (gelu_tanh(x) as f64 - gelu).abs() < 1e-6 * (1.0 + gelu.abs()),
                "gelu({x})"
            );
            assert!(
                (silu(x) as f64 - silu_ref).abs() < 1e-6 * (1.0 + silu_ref.abs()),
                "silu({x})"
            );
            assert!((fast_tanh(x) as f64 - xd.tanh()).abs() < 1e-6, "tanh({x})");
        }
        // Large magnitudes saturate cleanly.
        assert_eq!(gelu_tanh(-50.0), 0.0);
        assert_eq!(gelu_tanh(50.0), 50.0);
        assert!(silu(-100.0).abs() < 1e-30);
    }

    #[test]
    fn every_level_computes_the_same_activations() {
        let g: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.013).collect();
        let u: Vec<f32> = (0..1003).map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1).collect();
        let mut want = vec![0f32; g.len()];
        geglu_body(&g, &u, &mut want);
        for level in SimdLevel::all_available() {
            let mut o = vec![0f32; g.len()];
            geglu(level, &g, &u, &mut o);
            for (a, b) in o.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{level:?}: {a} vs {b}");
            }
            swiglu(level, &g, &u, &mut o);
            for i in 0..g.len() {
                let r = g[i] as f64 / (1.0 + (-(g[i] as f64)).exp()) * u[i] as f64;
                assert!(
                    (o[i] as f64 - r).abs() < 1e-5 * (1.0 + r.abs()),
                    "{level:?} swiglu"
                );
            }
            let mut x = g.clone();
            softcap(level, &mut x, 3.0);
            for (v, &gi) in x.iter().zip(&g) {
                let r = 3.0 * (gi as f64 / 3.0).tanh();
                assert!((*v as f64 - r).abs() < 2e-6, "{level:?} softcap");
            }
        }
    }

    #[test]
    fn rms_norm_matches_reference() {
        let x: Vec<f32> = (0..640).map(|i| ((i * 13 % 37) as f32 - 18.0) * 0.21).collect();
        let w: Vec<f32> = (0..640).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0f32; 640];
        rms_norm_row(&x, &w, 1e-6, &mut out);
        let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 640.0;
        let s = 1.0 / (ms + 1e-6).sqrt();
        for i in 0..640 {
            let r = x[i] as f64 * s * w[i] as f64;
            assert!((out[i] as f64 - r).abs() < 1e-5 * (1.0 + r.abs()));
        }
    }

    #[test]
    fn rope_rotates_the_documented_pairs() {
        let inv: Vec<f32> = (0..4).map(|i| 10000f32.powf(-(i as f32) / 4.0)).collect();
        let x0: Vec<f32> = (0..10).map(|i| i as f32 * 0.3 - 1.0).collect();
        for style in [RopeStyle::Interleaved, RopeStyle::Neox] {
            let mut x = x0.clone();
            rope_head(&mut x, style, &inv, 1.5, 7);
            let mut want = x0.clone();
            for (i, &f) in inv.iter().enumerate() {
                let (a, b) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Neox => (i, i + 4),
                };
                let th = 7.0 * f as f64;
                let (s, c) = (th.sin() * 1.5, th.cos() * 1.5);
                want[a] = (x0[a] as f64 * c - x0[b] as f64 * s) as f32;
                want[b] = (x0[a] as f64 * s + x0[b] as f64 * c) as f32;
            }
            for i in 0..10 {
                assert!(
                    (x[i] - want[i]).abs() < 1e-5,
                    "{style:?} dim {i}: {} vs {}",
                    x[i],
                    want[i]
                );
            }
            // Dims 8 and 9 are beyond the rotated width: untouched.
            assert_eq!(&x[8..], &x0[8..]);
        }
    }
}
