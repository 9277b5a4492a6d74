//! Dot products of stored weight rows with prepared activation rows, one
//! kernel per (weight type, SIMD level), and the table that picks them.
//!
//! A kernel computes a whole range of weight rows against a few activation
//! rows, so the per-row loop is compiled inside the `#[target_feature]`
//! function and the row dot inlines into it (no indirect call per row: the
//! LM head alone has 262144 rows). `scalar` holds the portable kernels (the
//! reference for the others, and the only ones for Q2_K/Q3_K/Q8_K); `simd`
//! the AVX2 / AVX-512 VNNI ones, generic over tokens per pass and VNNI.

pub mod layout;
pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub mod simd;

use kestrel_formats::DType;

use crate::cpu::act_quant::ActRow;
use crate::cpu::features::SimdLevel;

/// `out[r * out_stride + t] = dot(w row r, acts[t])` for every row of `w`
/// (`w.len()` is a multiple of `row_bytes`) and every activation row.
///
/// # Safety
/// The CPU must support the kernel's SIMD level (guaranteed by
/// [`rows_fn`], which only returns kernels of an available level); `out` must
/// hold `(rows - 1) * out_stride + acts.len()` values (checked: panics
/// otherwise), and the activation rows must be in the weight type's format
/// with matching length (checked per row dot).
pub type RowsFn =
    unsafe fn(w: &[u8], row_bytes: usize, acts: &[ActRow<'_>], out: &mut [f32], out_stride: usize);

macro_rules! rows_kernels {
    ($modname:ident, $src:ident, #[$attr:meta], { $($dt:ident => $f:ident),* $(,)? }) => {
        mod $modname {
            use super::*;
            $(
                #[$attr]
                unsafe fn $f(
                    w: &[u8],
                    row_bytes: usize,
                    acts: &[ActRow<'_>],
                    out: &mut [f32],
                    out_stride: usize,
                ) {
                    let n = acts.len();
                    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
                        let o = &mut out[r * out_stride..r * out_stride + n];
                        for (ot, a) in o.iter_mut().zip(acts) {
                            *ot = super::$src::$f(wr, a);
                        }
                    }
                }
            )*
            pub(super) fn get(dt: DType) -> Option<RowsFn> {
                match dt {
                    $(DType::$dt => Some($f as RowsFn),)*
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}

// The scalar kernels need no features; `inline(never)` keeps them
// separate functions like the others.
rows_kernels!(rows_scalar, scalar, #[inline(never)], {
    F32 => dot_f32, F16 => dot_f16, BF16 => dot_bf16,
    Q4_0 => dot_q4_0, Q4_1 => dot_q4_1, Q5_0 => dot_q5_0, Q5_1 => dot_q5_1, Q8_0 => dot_q8_0,
    Q2_K => dot_q2_k, Q3_K => dot_q3_k, Q4_K => dot_q4_k, Q5_K => dot_q5_k, Q6_K => dot_q6_k,
    Q8_K => dot_q8_k,
});

/// Row loops of the SIMD levels: tokens in groups of `$group` through the
/// N-token kernels (each weight block decoded once per group), the rest one
/// at a time.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_rows_kernels {
    ($modname:ident, #[$attr:meta], $vnni:expr, $group:expr, { $($dt:ident => $f:ident),* $(,)? }) => {
        mod $modname {
            use super::*;
            $(
                #[$attr]
                unsafe fn $f(
                    w: &[u8],
                    row_bytes: usize,
                    acts: &[ActRow<'_>],
                    out: &mut [f32],
                    out_stride: usize,
                ) {
                    const G: usize = $group;
                    let n = acts.len();
                    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
                        let o = &mut out[r * out_stride..r * out_stride + n];
                        let mut t = 0;
                        while t + G <= n {
                            let v = simd::$f::<G, { $vnni }>(wr, &acts[t..t + G]);
                            o[t..t + G].copy_from_slice(&v);
                            t += G;
                        }
                        while t < n {
                            o[t] = simd::$f::<1, { $vnni }>(wr, &acts[t..t + 1])[0];
                            t += 1;
                        }
                    }
                }
            )*
            pub(super) fn get(dt: DType) -> Option<RowsFn> {
                match dt {
                    $(DType::$dt => Some($f as RowsFn),)*
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_rows_kernels!(rows_avx2, #[target_feature(enable = "avx2,fma,f16c")], false, 4, {
    F32 => dot_f32, F16 => dot_f16, BF16 => dot_bf16,
    Q4_0 => dot_q4_0, Q4_1 => dot_q4_1, Q5_0 => dot_q5_0, Q5_1 => dot_q5_1, Q8_0 => dot_q8_0,
    Q4_K => dot_q4_k, Q5_K => dot_q5_k, Q6_K => dot_q6_k,
});

#[cfg(target_arch = "x86_64")]
simd_rows_kernels!(rows_avx2_x8, #[target_feature(enable = "avx2,fma,f16c")], false, 4, {
    Q4_0 => dot_q4_0x8, Q5_0 => dot_q5_0x8, Q8_0 => dot_q8_0x8,
});

#[cfg(target_arch = "x86_64")]
simd_rows_kernels!(
    rows_avx512_x8,
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")],
    true,
    8,
    { Q4_0 => dot_q4_0x8, Q5_0 => dot_q5_0x8, Q8_0 => dot_q8_0x8 }
);

#[cfg(target_arch = "x86_64")]
simd_rows_kernels!(
    rows_avx512,
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")],
    true,
    8,
    {
        F32 => dot_f32, F16 => dot_f16, BF16 => dot_bf16,
        Q4_0 => dot_q4_0, Q4_1 => dot_q4_1, Q5_0 => dot_q5_0, Q5_1 => dot_q5_1, Q8_0 => dot_q8_0,
        Q4_K => dot_q4_k, Q5_K => dot_q5_k, Q6_K => dot_q6_k,
    }
);

/// The offset the SIMD kernels' unsigned encoding of `dtype` adds to
/// every quant (removed through `ActRow::lane_off` / `blk_off`): Q4_0's 8
/// and Q5_0's 16, and Q8_0's sign-bit flip (128) in the VNNI kernels.
pub fn weight_offset(level: SimdLevel, dtype: DType) -> i32 {
    match (level, dtype) {
        (SimdLevel::Scalar, _) => 0,
        (_, DType::Q4_0) => 8,
        (_, DType::Q5_0) => 16,
        (SimdLevel::Avx512Vnni, DType::Q8_0) => 128,
        _ => 0,
    }
}

/// Environment variable that keeps weights in GGML's layout (`=0`), for
/// comparing kernels.
pub const X8_ENV: &str = "KESTREL_CPU_X8";

/// Whether weights of `dtype` are stored in the x8 layout at `level`
/// (the SIMD levels, for the types that have one, unless `KESTREL_CPU_X8=0`).
pub fn uses_x8(level: SimdLevel, dtype: DType) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled = *ENABLED.get_or_init(|| std::env::var(X8_ENV).map(|v| v.trim() != "0").unwrap_or(true));
    enabled && level >= SimdLevel::Avx2 && level.available() && crate::cpu::repack::has_x8(dtype)
}

/// The kernel for weight type `dtype` at `level` (`x8`: the weight is in
/// the x8 layout, see `uses_x8`), falling back to the best lower level that
/// has one (every type has a scalar kernel). Returns the level actually used.
///
/// A `level` the CPU lacks is lowered to the best available one, so the
/// returned kernel is always safe to run on this CPU.
pub fn rows_fn(level: SimdLevel, dtype: DType, x8: bool) -> (RowsFn, SimdLevel) {
    let level = if level.available() {
        level
    } else {
        SimdLevel::best()
    };
    #[cfg(target_arch = "x86_64")]
    if x8 {
        let f = if level >= SimdLevel::Avx512Vnni {
            rows_avx512_x8::get(dtype).map(|f| (f, SimdLevel::Avx512Vnni))
        } else {
            rows_avx2_x8::get(dtype).map(|f| (f, SimdLevel::Avx2))
        };
        if let Some(f) = f {
            return f;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        if level >= SimdLevel::Avx512Vnni {
            if let Some(f) = rows_avx512::get(dtype) {
                return (f, SimdLevel::Avx512Vnni);
            }
        }
        if level >= SimdLevel::Avx2 {
            if let Some(f) = rows_avx2::get(dtype) {
                return (f, SimdLevel::Avx2);
            }
        }
    }
    match rows_scalar::get(dtype) {
        Some(f) => (f, SimdLevel::Scalar),
        // Every DType has a scalar kernel (see the table above).
        None => unreachable!("no scalar kernel for {dtype}"),
    }
}

/// f32 dot of two slices with the best kernel of `level`.
#[inline]
pub fn dot_f32(level: SimdLevel, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if level >= SimdLevel::Avx2 && level.available() {
            // SAFETY: AVX2/FMA/F16C are present (checked just above).
            return unsafe { simd::dot_f32_slices(a, b) };
        }
    }
    let _ = level;
    scalar::dot_f32_slices(a, b)
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(level: SimdLevel, alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if level >= SimdLevel::Avx2 && level.available() {
            // SAFETY: AVX2/FMA/F16C are present (checked just above).
            unsafe { simd::axpy(alpha, x, y) };
            return;
        }
    }
    let _ = level;
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}
