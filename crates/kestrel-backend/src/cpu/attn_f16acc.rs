//! Attention over an f16 KV cache the way ggml's CPU flash attention
//! computes it for short query batches, so that kestrel with an f16 cache
//! makes the same rounding choices as llama.cpp with its default settings
//! (`-fa auto` resolves to on for the CPU, `-ctk f16 -ctv f16`).
//!
//! What ggml does for one query row (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`,
//! used when the micro-batch has fewer than 64 query rows):
//! * the query is rounded to f16 (K's dot-product type) before `q · k`;
//! * one pass over the keys in order with an online softmax: on a new
//!   maximum the value accumulator is rescaled by `exp(M_old - M)`,
//!   otherwise the key's weight is `exp(s - M)`;
//! * the value accumulator is an f16 vector: every rescale and every
//!   `acc += w * v` (one fused multiply-add in f32) is rounded back to f16;
//! * the result is `f32(acc) * (1 / Σ weights)`.
//!
//! The f16 accumulator is a real approximation (about 3 significant digits
//! per step), not rounding noise: on the reference prompts it moves the
//! model's logit margins by ~0.1 compared with f32 attention (see
//! docs/REFERENCE-NUMERICS.md). It only applies when the cache already is
//! f16; an f32 cache keeps the exact two-pass softmax of `attention`.

use half::f16;

use crate::cpu::attention::{CpuKvPool, KvStore};

/// ggml's flash attention switches to its tiled f32 kernel from this many
/// query rows per micro-batch (`GGML_FA_TILE_Q`); below it the f16
/// accumulator path runs.
pub const F16_ACC_MAX_ROWS: usize = 64;

/// Whether a step of `rows` query rows over `pool` takes the f16-accumulator
/// path: both K and V stored as f16 and fewer rows than ggml's tile.
pub fn applies(pool: &CpuKvPool, rows: usize) -> bool {
    rows < F16_ACC_MAX_ROWS && matches!((pool.k(), pool.v()), (KvStore::F16(_), KvStore::F16(_)))
}

/// One task: the query heads `q` (`g` heads of `hd`, one KV group of one
/// row) against the keys/values whose element offsets `at(j)` gives, for
/// j in `keys`. Writes, like `attention::attend_part`, the unnormalised
/// value sums `o` (g * hd), the running max `m` (g) and the weight sum `l`
/// (g) into `buf`.
#[allow(clippy::too_many_arguments)]
pub fn attend_part_f16acc(
    k16: &[f16],
    v16: &[f16],
    at: &dyn Fn(usize) -> usize,
    keys: std::ops::Range<usize>,
    q: &[f32],
    hd: usize,
    scale: f32,
    softcap: Option<f32>,
    buf: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::features::SimdLevel::Avx2.available() {
        // SAFETY: AVX2/FMA/F16C were just checked.
        unsafe { body_fma(k16, v16, at, keys, q, hd, scale, softcap, buf) };
        return;
    }
    body(k16, v16, at, keys, q, hd, scale, softcap, buf)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn body_fma(
    k16: &[f16],
    v16: &[f16],
    at: &dyn Fn(usize) -> usize,
    keys: std::ops::Range<usize>,
    q: &[f32],
    hd: usize,
    scale: f32,
    softcap: Option<f32>,
    buf: &mut [f32],
) {
    body(k16, v16, at, keys, q, hd, scale, softcap, buf)
}

#[inline(always)]
fn round16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn body(
    k16: &[f16],
    v16: &[f16],
    at: &dyn Fn(usize) -> usize,
    keys: std::ops::Range<usize>,
    q: &[f32],
    hd: usize,
    scale: f32,
    softcap: Option<f32>,
    buf: &mut [f32],
) {
    let g = q.len() / hd;
    let (o, rest) = buf.split_at_mut(g * hd);
    let (m, l) = rest.split_at_mut(g);
    o.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);
    let mut qr = vec![0f32; hd];
    let mut kr = vec![0f32; hd];
    let mut vr = vec![0f32; hd];
    for h in 0..g {
        for (d, &s) in qr.iter_mut().zip(&q[h * hd..(h + 1) * hd]) {
            *d = round16(s);
        }
        // `acc` holds f16 values (kept widened to f32 between steps).
        let acc = &mut o[h * hd..(h + 1) * hd];
        let (mut mx, mut sum) = (f32::NEG_INFINITY, 0f32);
        for j in keys.clone() {
            let a = at(j);
            for (d, s) in kr.iter_mut().zip(&k16[a..a + hd]) {
                *d = s.to_f32();
            }
            let mut s = dot8(&qr, &kr) * scale;
            if let Some(cap) = softcap {
                s = cap * (s / cap).tanh();
            }
            let (ms, vs) = if s > mx {
                let ms = (mx - s).exp();
                mx = s;
                for x in acc.iter_mut() {
                    *x = round16(*x * ms);
                }
                (ms, 1.0)
            } else {
                (1.0, (s - mx).exp())
            };
            for (d, s) in vr.iter_mut().zip(&v16[a..a + hd]) {
                *d = s.to_f32();
            }
            for (x, &v) in acc.iter_mut().zip(&vr) {
                *x = round16(v.mul_add(vs, *x));
            }
            sum = sum * ms + vs;
        }
        m[h] = mx;
        l[h] = sum;
    }
}

/// `a · b` with eight partial sums (the order ggml's f16 dot uses differs;
/// this only matters at f32 rounding level).
#[inline(always)]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            lanes[i] = x[i].mul_add(y[i], lanes[i]);
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel against a plain transcription of ggml's loop, and proof
    /// that the f16 accumulator is visible (so this cannot pass on an f32
    /// path).
    #[test]
    fn follows_ggml_f16_accumulator_not_f32() {
        let (hd, n) = (64usize, 50usize);
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.0;
        let k16: Vec<f16> = (0..n * hd).map(|i| f16::from_f32(val(i))).collect();
        let v16: Vec<f16> = (0..n * hd).map(|i| f16::from_f32(val(i + 12345))).collect();
        let q: Vec<f32> = (0..hd).map(|i| val(i + 777) * 0.3).collect();
        let mut buf = vec![0f32; hd + 2];
        attend_part_f16acc(&k16, &v16, &|j| j * hd, 0..n, &q, hd, 0.125, None, &mut buf);
        let (o, l) = (&buf[..hd], buf[hd + 1]);
        // ggml, step by step.
        let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0f32);
        let mut acc = vec![f16::ZERO; hd];
        // Exact softmax-weighted sum (f64) for comparison.
        let mut scores = Vec::new();
        for j in 0..n {
            let mut s = 0f32;
            for i in 0..hd {
                s += round16(q[i]) * k16[j * hd + i].to_f32();
            }
            s *= 0.125;
            scores.push(s as f64);
            let (ms, vs) = if s > m {
                let ms = (m - s).exp();
                m = s;
                acc.iter_mut().for_each(|a| *a = f16::from_f32(a.to_f32() * ms));
                (ms, 1.0)
            } else {
                (1.0, (s - m).exp())
            };
            for i in 0..hd {
                acc[i] = f16::from_f32(v16[j * hd + i].to_f32().mul_add(vs, acc[i].to_f32()));
            }
            s_sum = s_sum * ms + vs;
        }
        assert!((l - s_sum).abs() <= 1e-5 * s_sum, "{l} vs {s_sum}");
        let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut worst_exact = 0f64;
        for i in 0..hd {
            let want = acc[i].to_f32();
            // Only the dot's summation order differs: at most one f16 step.
            assert!(
                (o[i] - want).abs() <= want.abs() * 1e-3 + 1e-6,
                "[{i}] {} vs {want}",
                o[i]
            );
            let exact: f64 = (0..n)
                .map(|j| (scores[j] - mx).exp() * v16[j * hd + i].to_f32() as f64)
                .sum();
            worst_exact = worst_exact.max((o[i] as f64 - exact).abs());
        }
        assert!(worst_exact > 1e-4, "no sign of f16 accumulation ({worst_exact})");
    }
}
