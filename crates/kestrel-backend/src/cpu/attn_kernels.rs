//! The inner loops of attention, once portable and once with AVX2/FMA/F16C
//! intrinsics. Both implement [`AttnKernels`]; attention's per-task body is
//! generic over it and compiled inside a `#[target_feature]` function for
//! the SIMD version, so everything inlines into one loop nest.

use half::{bf16, f16};

use crate::cpu::ops::fast_exp;

/// The vector operations of one attention task. An implementing value is
/// proof that the CPU can run them.
pub trait AttnKernels: Copy + Send + Sync {
    /// `out[h] = q_h · k` for the `out.len()` heads stored back to back in
    /// `q` (`hd` values each).
    fn dot_heads(self, q: &[f32], k: &[f32], hd: usize, out: &mut [f32]);
    /// `o_h += p[h] * v` for every head h (`o` holds `p.len()` heads of `hd`).
    fn axpy_heads(self, p: &[f32], v: &[f32], hd: usize, o: &mut [f32]);
    /// `o_h += Σ_j p[j * g + h] * vals[j]` for the g = `o.len() / hd` heads:
    /// a block of keys at once, so each slice of `o` is loaded and stored
    /// once per block instead of once per key.
    fn accumulate(self, p: &[f32], vals: &[&[f32]], hd: usize, o: &mut [f32]) {
        let g = o.len() / hd;
        for (j, v) in vals.iter().enumerate() {
            self.axpy_heads(&p[j * g..(j + 1) * g], v, hd, o);
        }
    }
    fn widen_f16(self, src: &[f16], dst: &mut [f32]);
    fn widen_bf16(self, src: &[bf16], dst: &mut [f32]);
}

/// `x[i] = exp(x[i] - max)` for all i, returning the sum. Two passes with
/// eight partial sums: a single running f32 sum is a serial chain that
/// keeps the compiler from vectorising the exponentials.
#[inline(always)]
pub fn exp_shift_sum(x: &mut [f32], max: f32) -> f32 {
    for v in x.iter_mut() {
        *v = fast_exp(*v - max);
    }
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[derive(Clone, Copy)]
pub struct Portable;

impl AttnKernels for Portable {
    #[inline(always)]
    fn dot_heads(self, q: &[f32], k: &[f32], hd: usize, out: &mut [f32]) {
        for (h, o) in out.iter_mut().enumerate() {
            *o = crate::cpu::quant_dot::scalar::dot_f32_slices(&q[h * hd..(h + 1) * hd], &k[..hd]);
        }
    }

    #[inline(always)]
    fn axpy_heads(self, p: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
        for (h, &ph) in p.iter().enumerate() {
            for (oi, &vi) in o[h * hd..(h + 1) * hd].iter_mut().zip(&v[..hd]) {
                *oi += ph * vi;
            }
        }
    }

    #[inline(always)]
    fn widen_f16(self, src: &[f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    #[inline(always)]
    fn widen_bf16(self, src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::Avx2;

#[cfg(target_arch = "x86_64")]
mod x86 {
    // Per-head register arrays indexed with constants after unrolling.
    #![allow(clippy::needless_range_loop)]

    use core::arch::x86_64::*;

    use half::{bf16, f16};

    use super::AttnKernels;

    /// AVX2/FMA/F16C kernels; a value exists only on CPUs that have them
    /// (see [`Avx2::new`]), which is what makes the methods safe to call.
    #[derive(Clone, Copy)]
    pub struct Avx2(());

    impl Avx2 {
        pub fn new() -> Option<Avx2> {
            crate::cpu::features::SimdLevel::Avx2
                .available()
                .then_some(Avx2(()))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// N heads at once, two accumulators each: 2N independent FMA chains
    /// (one chain would wait 4 cycles per FMA).
    #[inline(always)]
    unsafe fn dot_n<const N: usize>(q: *const f32, k: *const f32, hd: usize) -> [f32; N] {
        let mut a0 = [_mm256_setzero_ps(); N];
        let mut a1 = [_mm256_setzero_ps(); N];
        let mut i = 0;
        while i + 16 <= hd {
            let k0 = _mm256_loadu_ps(k.add(i));
            let k1 = _mm256_loadu_ps(k.add(i + 8));
            for h in 0..N {
                a0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * hd + i)), k0, a0[h]);
                a1[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * hd + i + 8)), k1, a1[h]);
            }
            i += 16;
        }
        while i + 8 <= hd {
            let k0 = _mm256_loadu_ps(k.add(i));
            for h in 0..N {
                a0[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * hd + i)), k0, a0[h]);
            }
            i += 8;
        }
        let mut out: [f32; N] = std::array::from_fn(|h| hsum(_mm256_add_ps(a0[h], a1[h])));
        while i < hd {
            for (h, o) in out.iter_mut().enumerate() {
                *o += *q.add(h * hd + i) * *k.add(i);
            }
            i += 1;
        }
        out
    }

    /// Heads h0..h0+N of `accumulate`: 16 output dims of N heads stay in
    /// 2N registers while the whole key block passes.
    #[inline(always)]
    unsafe fn acc_block<const N: usize>(
        p: &[f32],
        g: usize,
        h0: usize,
        vals: &[&[f32]],
        hd: usize,
        o: *mut f32,
    ) {
        let pp = p.as_ptr();
        let mut c = 0;
        while c + 16 <= hd {
            let mut a0: [__m256; N] = std::array::from_fn(|h| _mm256_loadu_ps(o.add(h * hd + c)));
            let mut a1: [__m256; N] = std::array::from_fn(|h| _mm256_loadu_ps(o.add(h * hd + c + 8)));
            for (j, v) in vals.iter().enumerate() {
                let v0 = _mm256_loadu_ps(v.as_ptr().add(c));
                let v1 = _mm256_loadu_ps(v.as_ptr().add(c + 8));
                for h in 0..N {
                    let w = _mm256_broadcast_ss(&*pp.add(j * g + h0 + h));
                    a0[h] = _mm256_fmadd_ps(w, v0, a0[h]);
                    a1[h] = _mm256_fmadd_ps(w, v1, a1[h]);
                }
            }
            for h in 0..N {
                _mm256_storeu_ps(o.add(h * hd + c), a0[h]);
                _mm256_storeu_ps(o.add(h * hd + c + 8), a1[h]);
            }
            c += 16;
        }
        while c < hd {
            for h in 0..N {
                let mut s = *o.add(h * hd + c);
                for (j, v) in vals.iter().enumerate() {
                    s += *pp.add(j * g + h0 + h) * v[c];
                }
                *o.add(h * hd + c) = s;
            }
            c += 1;
        }
    }

    impl AttnKernels for Avx2 {
        #[inline(always)]
        fn dot_heads(self, q: &[f32], k: &[f32], hd: usize, out: &mut [f32]) {
            let n = out.len();
            assert!(q.len() >= n * hd && k.len() >= hd, "dot_heads: short input");
            let (qp, kp) = (q.as_ptr(), k.as_ptr());
            let mut h = 0;
            // SAFETY: `self` proves AVX2/FMA/F16C are present;
            // the loads stay inside q[..n * hd] and k[..hd] (checked above).
            unsafe {
                while h + 4 <= n {
                    out[h..h + 4].copy_from_slice(&dot_n::<4>(qp.add(h * hd), kp, hd));
                    h += 4;
                }
                while h < n {
                    out[h] = dot_n::<1>(qp.add(h * hd), kp, hd)[0];
                    h += 1;
                }
            }
        }

        #[inline(always)]
        fn axpy_heads(self, p: &[f32], v: &[f32], hd: usize, o: &mut [f32]) {
            let n = p.len();
            assert!(o.len() >= n * hd && v.len() >= hd, "axpy_heads: short input");
            let (vp, op) = (v.as_ptr(), o.as_mut_ptr());
            // SAFETY: as in `dot_heads`; stores stay inside o[..n * hd].
            unsafe {
                let mut i = 0;
                while i + 8 <= hd {
                    let vv = _mm256_loadu_ps(vp.add(i));
                    for (h, &ph) in p.iter().enumerate() {
                        let dst = op.add(h * hd + i);
                        _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_set1_ps(ph), vv, _mm256_loadu_ps(dst)));
                    }
                    i += 8;
                }
                while i < hd {
                    for (h, &ph) in p.iter().enumerate() {
                        *op.add(h * hd + i) += ph * *vp.add(i);
                    }
                    i += 1;
                }
            }
        }

        #[inline(always)]
        fn accumulate(self, p: &[f32], vals: &[&[f32]], hd: usize, o: &mut [f32]) {
            let g = o.len() / hd;
            assert!(p.len() >= vals.len() * g, "accumulate: short weights");
            assert!(vals.iter().all(|v| v.len() >= hd), "accumulate: short value row");
            let mut h = 0;
            // SAFETY: `self` proves AVX2/FMA/F16C are present; all accesses
            // are inside o[..g * hd], p[..vals.len() * g] and vals[j][..hd]
            // (checked above).
            unsafe {
                while h + 4 <= g {
                    acc_block::<4>(p, g, h, vals, hd, o.as_mut_ptr().add(h * hd));
                    h += 4;
                }
                while h < g {
                    acc_block::<1>(p, g, h, vals, hd, o.as_mut_ptr().add(h * hd));
                    h += 1;
                }
            }
        }

        #[inline(always)]
        fn widen_f16(self, src: &[f16], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
            // SAFETY: as in `dot_heads`; i + 8 <= n bounds every access.
            unsafe {
                let mut i = 0;
                while i + 8 <= n {
                    let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
                    _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(h));
                    i += 8;
                }
                while i < n {
                    *dp.add(i) = src[i].to_f32();
                    i += 1;
                }
            }
        }

        #[inline(always)]
        fn widen_bf16(self, src: &[bf16], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let (sp, dp) = (src.as_ptr() as *const u16, dst.as_mut_ptr());
            // SAFETY: as in `widen_f16`.
            unsafe {
                let mut i = 0;
                while i + 8 <= n {
                    let h = _mm_loadu_si128(sp.add(i) as *const __m128i);
                    let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                    _mm256_storeu_ps(dp.add(i), _mm256_castsi256_ps(w));
                    i += 8;
                }
                while i < n {
                    *dp.add(i) = src[i].to_f32();
                    i += 1;
                }
            }
        }
    }
}
