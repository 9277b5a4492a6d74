//! x86-64 SIMD dot products of one weight row with N activation rows.
//!
//! Every kernel is written once, generic over
//! * `N`, the number of activation rows (tokens) served by one pass over the
//!   weight row: each block is decoded once and multiplied with N tokens
//!   (prefill); N = 1 is decode;
//! * `VNNI`: AVX-512 VNNI's `vpdpbusd`/`vpdpwssd` (u8×i8 and i16×i16 dot
//!   products accumulated straight into i32) instead of AVX2's
//!   `vpmaddubsw` + `vpmaddwd` + add.
//!
//! The functions are `#[inline(always)]` without `#[target_feature]`: they
//! are only ever inlined into the per-level row loops of `quant_dot::mod`,
//! which carry the features (AVX2+FMA+F16C, plus AVX-512 F/BW/VL/VNNI when
//! `VNNI`); a `VNNI = true` instantiation is only used from the AVX-512 loop.
//!
//! Weight formats with an offset (Q4_0's 8, Q5_0's 16, Q8_0 under VNNI
//! made unsigned by flipping the sign bit: 128) are multiplied unsigned; the
//! offset is removed exactly in integers by starting each block's 8 i32
//! lanes at `lane_off = -(offset/8)·Σx` (precomputed per activation block),
//! as ggml's per-block integer sums are exact. Scales are applied per block
//! (per 16/32 for K-quants) in f32, as ggml does.
//!
//! # Safety
//! Callers must run on a CPU with the features above and pass activation
//! rows in the weight type's format; lengths are asserted on entry, so the
//! raw-pointer loads stay inside the slices.

// Loops `for t in 0..N` index several per-token register arrays at once;
// after unrolling the indices are constants, which keeps the arrays in
// registers. Iterator chains over 3-4 arrays would obscure that.
#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

use super::layout::*;
use crate::cpu::act_quant::ActRow;

#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let h = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline(always)]
unsafe fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn ld(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Sixteen nibbles → 32 unsigned bytes in element order (low nibbles are
/// elements 0..16, high nibbles 16..32).
#[inline(always)]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    let raw = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Bit j of `bits` → byte j = 0x10 (the fifth bit of a Q5 quant), else 0.
#[inline(always)]
unsafe fn fifth_bits<const VNNI: bool>(bits: u32) -> __m256i {
    if VNNI {
        _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10))
    } else {
        let v = _mm256_set1_epi32(bits as i32);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bm = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let t = _mm256_and_si256(_mm256_shuffle_epi8(v, shuf), bm);
        _mm256_and_si256(_mm256_cmpeq_epi8(t, bm), _mm256_set1_epi8(0x10))
    }
}

/// `acc + Σ u·s` per i32 lane (u unsigned bytes, s signed; AVX2 needs
/// every adjacent pair |u·s + u·s| < 2^15).
#[inline(always)]
unsafe fn dot_acc<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, u, s)
    } else {
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
        _mm256_add_epi32(acc, p)
    }
}

/// `acc + Σ a·b` over adjacent i16 pairs per i32 lane.
#[inline(always)]
unsafe fn madd_acc<const VNNI: bool>(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpwssd_epi32(acc, a, b)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
    }
}

/// Raw pointers to the parts of N activation rows.
struct Acts<const N: usize> {
    q: [*const u8; N],
    d: [*const f32; N],
    off: [*const i32; N],
    dxs: [*const f32; N],
    bs: [*const i16; N],
    boff: [*const i32; N],
}

impl<const N: usize> Acts<N> {
    // Inlined: it runs once per row dot (262144 times per LM head matvec).
    #[inline(always)]
    fn new(xs: &[ActRow<'_>]) -> Acts<N> {
        Acts {
            q: std::array::from_fn(|t| xs[t].qs.as_ptr() as *const u8),
            d: std::array::from_fn(|t| xs[t].d.as_ptr()),
            off: std::array::from_fn(|t| xs[t].lane_off.as_ptr()),
            dxs: std::array::from_fn(|t| xs[t].dxs8.as_ptr()),
            bs: std::array::from_fn(|t| xs[t].bsums.as_ptr()),
            boff: std::array::from_fn(|t| xs[t].blk_off.as_ptr()),
        }
    }
}

/// Checks N activation rows in 32-block form against a weight row of `bb`
/// bytes per block; returns the block count.
#[inline(always)]
fn check32<const N: usize>(w: &[u8], xs: &[ActRow<'_>], bb: usize) -> usize {
    assert!(xs.len() >= N, "kernel for {N} rows given {}", xs.len());
    let nb = xs[0].qs.len() / 32;
    assert_eq!(w.len(), nb * bb, "weight row / activation row size mismatch");
    for x in &xs[..N] {
        assert!(
            x.qs.len() == nb * 32 && x.d.len() == nb && x.lane_off.len() == nb && x.dxs8.len() == nb,
            "activation row does not match the weight row"
        );
    }
    nb
}

#[inline(always)]
fn check256<const N: usize>(w: &[u8], xs: &[ActRow<'_>], bb: usize) -> usize {
    assert!(xs.len() >= N, "kernel for {N} rows given {}", xs.len());
    let nb = xs[0].qs.len() / 256;
    assert_eq!(w.len(), nb * bb, "weight row / activation row size mismatch");
    for x in &xs[..N] {
        assert!(
            x.qs.len() == nb * 256 && x.d.len() == nb && x.bsums.len() == nb * 16,
            "activation row does not match the weight row"
        );
    }
    nb
}

/// Runs `$body` over blocks `0..$nb`; it sees the block index as `$b` and
/// `$acc: &mut [__m256; N]`, one accumulator per token. Even and odd blocks
/// use separate accumulators so consecutive FMAs into one token's sum do
/// not wait on each other (that matters for N = 1). Evaluates to the N
/// horizontal sums. The arrays are indexed with constants only (after
/// unrolling), so they live in registers.
macro_rules! blocks_n {
    ($n:expr, $nb:expr, |$b:ident, $acc:ident| $body:block) => {{
        let nb = $nb;
        let mut acc0 = [_mm256_setzero_ps(); $n];
        let mut acc1 = [_mm256_setzero_ps(); $n];
        let mut i = 0;
        while i + 2 <= nb {
            {
                let $b = i;
                let $acc = &mut acc0;
                $body
            }
            {
                let $b = i + 1;
                let $acc = &mut acc1;
                $body
            }
            i += 2;
        }
        if i < nb {
            let $b = i;
            let $acc = &mut acc0;
            $body
        }
        let mut out = [0f32; $n];
        for t in 0..$n {
            out[t] = hsum_ps(_mm256_add_ps(acc0[t], acc1[t]));
        }
        out
    }};
}

#[inline(always)]
pub(crate) unsafe fn dot_q8_0<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let nb = check32::<N>(w, xs, Q8_0_BYTES);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    blocks_n!(N, nb, |b, acc| {
        let p = wp.add(b * Q8_0_BYTES);
        let wq = ld(p.add(2));
        let dw = _mm256_set1_ps(f16_at(p));
        if VNNI {
            // w + 128 is unsigned; lane_off removes 128·Σx.
            let wu = _mm256_xor_si256(wq, _mm256_set1_epi8(-128));
            for t in 0..N {
                let s0 = _mm256_set1_epi32(*a.off[t].add(b));
                let s = _mm256_dpbusd_epi32(s0, wu, ld(a.q[t].add(32 * b)));
                let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d[t].add(b)));
                acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
            }
        } else {
            // |w| × sign(w)·x: maddubs needs one unsigned operand.
            let aw = _mm256_sign_epi8(wq, wq);
            for t in 0..N {
                let sx = _mm256_sign_epi8(ld(a.q[t].add(32 * b)), wq);
                let s = dot_acc::<false>(_mm256_setzero_si256(), aw, sx);
                let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d[t].add(b)));
                acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
            }
        }
    })
}

/// Shared body of the unsigned 32-block formats without a min: `wq` is the
/// block's unsigned quants, the offset comes in through `lane_off`.
macro_rules! offset_block {
    ($a:ident, $acc:ident, $b:ident, $wq:expr, $dw:expr, $vnni:ident) => {{
        let wq = $wq;
        let dw = $dw;
        for t in 0..N {
            let s0 = _mm256_set1_epi32(*$a.off[t].add($b));
            let s = dot_acc::<$vnni>(s0, wq, ld($a.q[t].add(32 * $b)));
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*$a.d[t].add($b)));
            $acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), $acc[t]);
        }
    }};
}

/// Shared body of the formats with a min (`x = d·q + m`).
macro_rules! min_block {
    ($a:ident, $acc:ident, $b:ident, $wq:expr, $dw:expr, $mw:expr, $vnni:ident) => {{
        let wq = $wq;
        let dw = $dw;
        let mw = $mw;
        for t in 0..N {
            let s = dot_acc::<$vnni>(_mm256_setzero_si256(), wq, ld($a.q[t].add(32 * $b)));
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*$a.d[t].add($b)));
            $acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), $acc[t]);
            // m·d_x·Σx, spread over the 8 lanes.
            $acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*$a.dxs[t].add($b)), $acc[t]);
        }
    }};
}

#[inline(always)]
pub(crate) unsafe fn dot_q4_0<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let nb = check32::<N>(w, xs, Q4_0_BYTES);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    blocks_n!(N, nb, |b, acc| {
        let p = wp.add(b * Q4_0_BYTES);
        offset_block!(a, acc, b, nibbles32(p.add(2)), _mm256_set1_ps(f16_at(p)), VNNI);
    })
}

#[inline(always)]
pub(crate) unsafe fn dot_q5_0<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let nb = check32::<N>(w, xs, Q5_0_BYTES);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    blocks_n!(N, nb, |b, acc| {
        let p = wp.add(b * Q5_0_BYTES);
        let qh = (p.add(2) as *const u32).read_unaligned();
        let wq = _mm256_or_si256(nibbles32(p.add(6)), fifth_bits::<VNNI>(qh));
        offset_block!(a, acc, b, wq, _mm256_set1_ps(f16_at(p)), VNNI);
    })
}

#[inline(always)]
pub(crate) unsafe fn dot_q4_1<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let nb = check32::<N>(w, xs, Q4_1_BYTES);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    blocks_n!(N, nb, |b, acc| {
        let p = wp.add(b * Q4_1_BYTES);
        let (dw, mw) = (_mm256_set1_ps(f16_at(p)), _mm256_set1_ps(f16_at(p.add(2))));
        min_block!(a, acc, b, nibbles32(p.add(4)), dw, mw, VNNI);
    })
}

#[inline(always)]
pub(crate) unsafe fn dot_q5_1<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let nb = check32::<N>(w, xs, Q5_1_BYTES);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    blocks_n!(N, nb, |b, acc| {
        let p = wp.add(b * Q5_1_BYTES);
        let (dw, mw) = (_mm256_set1_ps(f16_at(p)), _mm256_set1_ps(f16_at(p.add(2))));
        let qh = (p.add(4) as *const u32).read_unaligned();
        let wq = _mm256_or_si256(nibbles32(p.add(8)), fifth_bits::<VNNI>(qh));
        min_block!(a, acc, b, wq, dw, mw, VNNI);
    })
}

/// x8-layout kernels (see `cpu::repack`) of Q4_0 (`KIND` 0), Q5_0 (1) and
/// Q8_0 (2): whole groups of 8 blocks with one i32 lane per block, then the
/// tail blocks (GGML layout) one by one. Activations must be permuted the
/// same way (`QuantActs` with `x8`).
#[inline(always)]
unsafe fn dot_x8<const N: usize, const VNNI: bool, const KIND: u8>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let bb = match KIND {
        0 => Q4_0_BYTES,
        1 => Q5_0_BYTES,
        _ => Q8_0_BYTES,
    };
    let nb = check32::<N>(w, xs, bb);
    for x in &xs[..N] {
        assert_eq!(x.blk_off.len(), nb, "activation row lacks block offsets");
    }
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    let m4 = _mm256_set1_epi8(0x0F);
    // Q8_0 without VNNI multiplies signed×signed with the sign trick: no offset.
    let signed = KIND == 2 && !VNNI;
    let mut acc = [_mm256_setzero_ps(); N];
    let ng = nb / 8;
    for g in 0..ng {
        let p = wp.add(g * 8 * bb);
        let dw8 = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        // Two dot chains per token (vectors j and j+4) keep each chain short.
        let mut s0: [__m256i; N] = std::array::from_fn(|t| {
            if signed {
                _mm256_setzero_si256()
            } else {
                _mm256_loadu_si256(a.boff[t].add(8 * g) as *const __m256i)
            }
        });
        let mut s1 = [_mm256_setzero_si256(); N];
        for j in 0..4 {
            let (w0, w1) = if KIND == 2 {
                let v0 = ld(p.add(16 + 32 * j));
                let v1 = ld(p.add(16 + 32 * (j + 4)));
                if VNNI {
                    let flip = _mm256_set1_epi8(-128);
                    (_mm256_xor_si256(v0, flip), _mm256_xor_si256(v1, flip))
                } else {
                    (v0, v1)
                }
            } else {
                let nib = if KIND == 1 { 48 } else { 16 };
                let raw = ld(p.add(nib + 32 * j));
                let mut lo = _mm256_and_si256(raw, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
                if KIND == 1 {
                    let m0 = (p.add(16 + 4 * j) as *const u32).read_unaligned();
                    let m1 = (p.add(16 + 4 * (j + 4)) as *const u32).read_unaligned();
                    lo = _mm256_or_si256(lo, fifth_bits::<VNNI>(m0));
                    hi = _mm256_or_si256(hi, fifth_bits::<VNNI>(m1));
                }
                (lo, hi)
            };
            for t in 0..N {
                let xb = a.q[t].add(256 * g);
                let x0 = ld(xb.add(32 * j));
                let x1 = ld(xb.add(32 * (j + 4)));
                if signed {
                    let u0 = _mm256_sign_epi8(w0, w0);
                    let u1 = _mm256_sign_epi8(w1, w1);
                    s0[t] = dot_acc::<false>(s0[t], u0, _mm256_sign_epi8(x0, w0));
                    s1[t] = dot_acc::<false>(s1[t], u1, _mm256_sign_epi8(x1, w1));
                } else {
                    s0[t] = dot_acc::<VNNI>(s0[t], w0, x0);
                    s1[t] = dot_acc::<VNNI>(s1[t], w1, x1);
                }
            }
        }
        for t in 0..N {
            let s = _mm256_add_epi32(s0[t], s1[t]);
            let sc = _mm256_mul_ps(dw8, _mm256_loadu_ps(a.d[t].add(8 * g)));
            acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    let mut done = 8 * ng;
    if nb - done >= 4 {
        let tail = half_group::<N, VNNI, KIND>(wp.add(done * bb), &a, done);
        for t in 0..N {
            acc[t] = _mm256_add_ps(acc[t], _mm256_zextps128_ps256(tail[t]));
        }
        done += 4;
    }
    // The last blocks, GGML layout (groups take exactly their blocks' bytes).
    for b in done..nb {
        let p = wp.add(b * bb);
        let dw = _mm256_set1_ps(f16_at(p));
        let wq = match KIND {
            0 => nibbles32(p.add(2)),
            1 => {
                let qh = (p.add(2) as *const u32).read_unaligned();
                _mm256_or_si256(nibbles32(p.add(6)), fifth_bits::<VNNI>(qh))
            }
            _ => {
                let v = ld(p.add(2));
                if VNNI {
                    _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                } else {
                    v
                }
            }
        };
        for t in 0..N {
            let x = ld(a.q[t].add(32 * b));
            let s = if signed {
                let u = _mm256_sign_epi8(wq, wq);
                dot_acc::<false>(_mm256_setzero_si256(), u, _mm256_sign_epi8(x, wq))
            } else {
                dot_acc::<VNNI>(_mm256_set1_epi32(*a.off[t].add(b)), wq, x)
            };
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d[t].add(b)));
            acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(s), acc[t]);
        }
    }
    std::array::from_fn(|t| hsum_ps(acc[t]))
}

/// The half group (4 blocks, 16-byte vectors) of an x8 row at `p`, whose
/// first block is block `b0` of the row: per token, 4 lanes of scaled block
/// sums. Same scheme as the whole groups of `dot_x8`.
#[inline(always)]
unsafe fn half_group<const N: usize, const VNNI: bool, const KIND: u8>(
    p: *const u8,
    a: &Acts<N>,
    b0: usize,
) -> [__m128; N] {
    let m4 = _mm_set1_epi8(0x0F);
    let signed = KIND == 2 && !VNNI;
    let dw4 = _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i));
    let ld16 = |q: *const u8| _mm_loadu_si128(q as *const __m128i);
    let dot = |acc: __m128i, u: __m128i, s: __m128i| {
        if VNNI {
            _mm_dpbusd_epi32(acc, u, s)
        } else {
            let pr = _mm_madd_epi16(_mm_maddubs_epi16(u, s), _mm_set1_epi16(1));
            _mm_add_epi32(acc, pr)
        }
    };
    // Bit b of `bits` → byte b = 0x10.
    let fifth = |bits: u16| {
        if VNNI {
            _mm_maskz_mov_epi8(bits, _mm_set1_epi8(0x10))
        } else {
            let v = _mm_set1_epi16(bits as i16);
            let shuf = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
            let bm = _mm_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let t = _mm_and_si128(_mm_shuffle_epi8(v, shuf), bm);
            _mm_and_si128(_mm_cmpeq_epi8(t, bm), _mm_set1_epi8(0x10))
        }
    };
    let mut s0: [__m128i; N] = std::array::from_fn(|t| {
        if signed {
            _mm_setzero_si128()
        } else {
            ld16(a.boff[t].add(b0) as *const u8)
        }
    });
    let mut s1 = [_mm_setzero_si128(); N];
    for j in 0..4 {
        let (w0, w1) = if KIND == 2 {
            let v0 = ld16(p.add(8 + 16 * j));
            let v1 = ld16(p.add(8 + 16 * (j + 4)));
            if VNNI {
                let flip = _mm_set1_epi8(-128);
                (_mm_xor_si128(v0, flip), _mm_xor_si128(v1, flip))
            } else {
                (v0, v1)
            }
        } else {
            let nib = if KIND == 1 { 24 } else { 8 };
            let raw = ld16(p.add(nib + 16 * j));
            let mut lo = _mm_and_si128(raw, m4);
            let mut hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m4);
            if KIND == 1 {
                let m0 = (p.add(8 + 2 * j) as *const u16).read_unaligned();
                let m1 = (p.add(8 + 2 * (j + 4)) as *const u16).read_unaligned();
                lo = _mm_or_si128(lo, fifth(m0));
                hi = _mm_or_si128(hi, fifth(m1));
            }
            (lo, hi)
        };
        for t in 0..N {
            let xb = a.q[t].add(32 * b0);
            let x0 = ld16(xb.add(16 * j));
            let x1 = ld16(xb.add(16 * (j + 4)));
            if signed {
                let u0 = _mm_sign_epi8(w0, w0);
                let u1 = _mm_sign_epi8(w1, w1);
                s0[t] = dot(s0[t], u0, _mm_sign_epi8(x0, w0));
                s1[t] = dot(s1[t], u1, _mm_sign_epi8(x1, w1));
            } else {
                s0[t] = dot(s0[t], w0, x0);
                s1[t] = dot(s1[t], w1, x1);
            }
        }
    }
    std::array::from_fn(|t| {
        let s = _mm_add_epi32(s0[t], s1[t]);
        let sc = _mm_mul_ps(dw4, _mm_loadu_ps(a.d[t].add(b0)));
        _mm_mul_ps(sc, _mm_cvtepi32_ps(s))
    })
}

#[inline(always)]
pub(crate) unsafe fn dot_q4_0x8<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    dot_x8::<N, VNNI, 0>(w, xs)
}

#[inline(always)]
pub(crate) unsafe fn dot_q5_0x8<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    dot_x8::<N, VNNI, 1>(w, xs)
}

#[inline(always)]
pub(crate) unsafe fn dot_q8_0x8<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    dot_x8::<N, VNNI, 2>(w, xs)
}

/// The eight 6-bit scales (as i16, replicated in both 128-bit lanes) and
/// eight 6-bit mins (as i16, each twice: [m0, m0, m1, m1, ..]) of a Q4_K /
/// Q5_K super-block, decoded from its 12 packed bytes with 32-bit masks:
/// scales 0..4 and mins 0..4 are the low 6 bits of bytes 0..4 / 4..8;
/// scales/mins 4..8 take their low 4 bits from bytes 8..12 and their top 2
/// bits from the top bits of bytes 0..4 / 4..8.
#[inline(always)]
unsafe fn k4_scales_mins(s: *const u8) -> (__m256i, __m256i) {
    let a0 = (s as *const u32).read_unaligned();
    let a1 = (s.add(4) as *const u32).read_unaligned();
    let a2 = (s.add(8) as *const u32).read_unaligned();
    let sc_lo = a0 & 0x3f3f_3f3f;
    let sc_hi = (a2 & 0x0f0f_0f0f) | ((a0 >> 2) & 0x3030_3030);
    let mn_lo = a1 & 0x3f3f_3f3f;
    let mn_hi = ((a2 >> 4) & 0x0f0f_0f0f) | ((a1 >> 2) & 0x3030_3030);
    let sc = (sc_lo as u64 | (sc_hi as u64) << 32) as i64;
    let mn = (mn_lo as u64 | (mn_hi as u64) << 32) as i64;
    let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc)));
    let m8 = _mm_cvtsi64_si128(mn);
    let mdup = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
    (sc16, mdup)
}

/// Broadcast of i16 element `k` of each 128-bit lane (a shuffle mask).
#[inline(always)]
unsafe fn pick16(k: usize) -> __m256i {
    _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16)
}

/// Q4_K and Q5_K (`Q5 = true`): per super-block, 8 sub-blocks of 32 with
/// 6-bit scales and mins: Σ = d·Σ_j sc_j·(q_j·x_j) - dmin·Σ_j m_j·Σx_j.
#[inline(always)]
unsafe fn dot_qk45<const N: usize, const VNNI: bool, const Q5: bool>(
    w: &[u8],
    xs: &[ActRow<'_>],
) -> [f32; N] {
    let bb = if Q5 { Q5_K_BYTES } else { Q4_K_BYTES };
    let qs_off = if Q5 { Q5_K_QS } else { Q4_K_QS };
    let nb = check256::<N>(w, xs, bb);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    let m4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let p = wp.add(b * bb);
        let (sc16, mdup) = k4_scales_mins(p.add(Q4_K_SCALES));
        let mut sumi = [_mm256_setzero_si256(); N];
        // Q5: bits 2c and 2c+1 of qh[l] are the fifth bits of elements
        // 64c+l and 64c+32+l; shifted right by 2 per chunk.
        let mut hb = if Q5 {
            ld(p.add(Q5_K_QH))
        } else {
            _mm256_setzero_si256()
        };
        for c in 0..4 {
            let raw = ld(p.add(qs_off + 32 * c));
            let mut lo = _mm256_and_si256(raw, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
            if Q5 {
                lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16::<4>(hb), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16::<3>(hb), bit4));
                hb = _mm256_srli_epi16::<2>(hb);
            }
            let s_lo = _mm256_shuffle_epi8(sc16, pick16(2 * c));
            let s_hi = _mm256_shuffle_epi8(sc16, pick16(2 * c + 1));
            for t in 0..N {
                let xb = a.q[t].add(256 * b + 64 * c);
                let p0 = _mm256_maddubs_epi16(lo, ld(xb));
                let p1 = _mm256_maddubs_epi16(hi, ld(xb.add(32)));
                sumi[t] = madd_acc::<VNNI>(sumi[t], p0, s_lo);
                sumi[t] = madd_acc::<VNNI>(sumi[t], p1, s_hi);
            }
        }
        let dw = _mm256_set1_ps(f16_at(p));
        let dmin = _mm256_set1_ps(f16_at(p.add(2)));
        for t in 0..N {
            let dx = _mm256_set1_ps(*a.d[t].add(b));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sumi[t]), acc[t]);
            let bs = _mm256_loadu_si256(a.bs[t].add(16 * b) as *const __m256i);
            let mins = _mm256_madd_epi16(bs, mdup);
            acc[t] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, dx), _mm256_cvtepi32_ps(mins), acc[t]);
        }
    }
    std::array::from_fn(|t| hsum_ps(acc[t]))
}

#[inline(always)]
pub(crate) unsafe fn dot_q4_k<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    dot_qk45::<N, VNNI, false>(w, xs)
}

#[inline(always)]
pub(crate) unsafe fn dot_q5_k<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    dot_qk45::<N, VNNI, true>(w, xs)
}

/// The four 32-quant groups of one 128-element half of a Q6_K block, as
/// unsigned bytes 0..64 (the stored quants plus 32).
#[inline(always)]
unsafe fn q6k_groups(p: *const u8, n: usize) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x30);
    let ql0 = ld(p.add(Q6_K_QL + 64 * n));
    let ql1 = ld(p.add(Q6_K_QL + 64 * n + 32));
    let qh = ld(p.add(Q6_K_QH + 32 * n));
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_and_si256(_mm256_slli_epi16::<4>(qh), m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_and_si256(_mm256_slli_epi16::<2>(qh), m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
            _mm256_and_si256(qh, m2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2),
        ),
    ]
}

/// i16 scale vector for a 32-element Q6_K group: scale k in the low 128-bit
/// lane (elements 0..16), scale k+1 in the high lane. `sc16` holds the 16
/// scales as i16; `pair` = k/2 selects the i32 lane holding (k, k+1).
#[inline(always)]
unsafe fn q6k_scale_pair(sc16: __m256i, pair: i32) -> __m256i {
    let both = _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(pair));
    let pick = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
    );
    _mm256_shuffle_epi8(both, pick)
}

#[inline(always)]
pub(crate) unsafe fn dot_q6_k<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let nb = check256::<N>(w, xs, Q6_K_BYTES);
    let a = Acts::<N>::new(xs);
    let wp = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let p = wp.add(b * Q6_K_BYTES);
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(Q6_K_SCALES) as *const __m128i));
        // Offset 32: start every lane at -32·Σ_k sc_k·Σx_k.
        let mut sumi: [__m256i; N] = std::array::from_fn(|t| {
            let bs = _mm256_loadu_si256(a.bs[t].add(16 * b) as *const __m256i);
            _mm256_sub_epi32(
                _mm256_setzero_si256(),
                _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bs)),
            )
        });
        for n in 0..2 {
            let q = q6k_groups(p, n);
            for (g, &qg) in q.iter().enumerate() {
                let scv = q6k_scale_pair(sc16, (4 * n + g) as i32);
                for t in 0..N {
                    let prod = _mm256_maddubs_epi16(qg, ld(a.q[t].add(256 * b + 128 * n + 32 * g)));
                    sumi[t] = madd_acc::<VNNI>(sumi[t], prod, scv);
                }
            }
        }
        let dw = _mm256_set1_ps(f16_at(p.add(Q6_K_D)));
        for t in 0..N {
            let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d[t].add(b)));
            acc[t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(sumi[t]), acc[t]);
        }
    }
    std::array::from_fn(|t| hsum_ps(acc[t]))
}

/// f32 dot of a float weight row (read 8 at a time by `load8`, one at a time
/// by `tail`) with N f32 activation rows.
#[inline(always)]
unsafe fn dot_float_n<const N: usize>(
    n: usize,
    xs: &[ActRow<'_>],
    load8: impl Fn(usize) -> __m256,
    tail: impl Fn(usize) -> f32,
) -> [f32; N] {
    assert!(xs.len() >= N, "kernel for {N} rows given {}", xs.len());
    for x in &xs[..N] {
        assert_eq!(x.f.len(), n, "weight row / activation row size mismatch");
    }
    let xp: [*const f32; N] = std::array::from_fn(|t| xs[t].f.as_ptr());
    let mut a0 = [_mm256_setzero_ps(); N];
    let mut a1 = [_mm256_setzero_ps(); N];
    let mut i = 0;
    while i + 16 <= n {
        let (w0, w1) = (load8(i), load8(i + 8));
        for t in 0..N {
            a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[t].add(i)), a0[t]);
            a1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[t].add(i + 8)), a1[t]);
        }
        i += 16;
    }
    if i + 8 <= n {
        let w0 = load8(i);
        for t in 0..N {
            a0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[t].add(i)), a0[t]);
        }
        i += 8;
    }
    let mut out: [f32; N] = std::array::from_fn(|t| hsum_ps(_mm256_add_ps(a0[t], a1[t])));
    while i < n {
        let wv = tail(i);
        for t in 0..N {
            out[t] += wv * *xp[t].add(i);
        }
        i += 1;
    }
    out
}

#[inline(always)]
pub(crate) unsafe fn dot_f32<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let n = w.len() / 4;
    assert_eq!(w.len(), n * 4, "F32 row of {} bytes", w.len());
    let wp = w.as_ptr() as *const f32;
    dot_float_n::<N>(
        n,
        xs,
        |i| _mm256_loadu_ps(wp.add(i)),
        |i| wp.add(i).read_unaligned(),
    )
}

#[inline(always)]
pub(crate) unsafe fn dot_f16<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let n = w.len() / 2;
    assert_eq!(w.len(), n * 2, "F16 row of {} bytes", w.len());
    let wp = w.as_ptr();
    dot_float_n::<N>(
        n,
        xs,
        |i| _mm256_cvtph_ps(_mm_loadu_si128(wp.add(2 * i) as *const __m128i)),
        |i| f16_at(wp.add(2 * i)),
    )
}

#[inline(always)]
pub(crate) unsafe fn dot_bf16<const N: usize, const VNNI: bool>(w: &[u8], xs: &[ActRow<'_>]) -> [f32; N] {
    let n = w.len() / 2;
    assert_eq!(w.len(), n * 2, "BF16 row of {} bytes", w.len());
    let wp = w.as_ptr();
    dot_float_n::<N>(
        n,
        xs,
        |i| {
            let h = _mm_loadu_si128(wp.add(2 * i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        },
        |i| f32::from_bits(((wp.add(2 * i) as *const u16).read_unaligned() as u32) << 16),
    )
}

/// f32 dot of two slices (attention).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32_slices(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut a0 = _mm256_setzero_ps();
    let mut a1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i)), _mm256_loadu_ps(bp.add(i)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i + 8)), _mm256_loadu_ps(bp.add(i + 8)), a1);
        i += 16;
    }
    let mut s = hsum_ps(_mm256_add_ps(a0, a1));
    while i < n {
        s += *ap.add(i) * *bp.add(i);
        i += 1;
    }
    s
}

/// `y += alpha * x` (attention's weighted sum of values).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let av = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)));
        _mm256_storeu_ps(yp.add(i), v);
        i += 8;
    }
    while i < n {
        *yp.add(i) += alpha * *xp.add(i);
        i += 1;
    }
}
