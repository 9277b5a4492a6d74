//! Run-time choice of the CPU kernel set and of the thread count.
//!
//! The binary is built for baseline x86-64; the SIMD kernels are compiled
//! with `#[target_feature]` and only ever called after `SimdLevel::available`
//! said the CPU has the features, so one build runs everywhere.

use crate::error::BackendError;

/// Environment variable forcing a kernel set (`scalar`, `avx2`, `avx512`).
pub const KERNELS_ENV: &str = "KESTREL_CPU_KERNELS";
/// Environment variable setting the number of worker threads.
pub const THREADS_ENV: &str = "KESTREL_THREADS";

/// A set of CPU kernels, ordered from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust, always available.
    Scalar,
    /// AVX2 + FMA + F16C (256-bit `maddubs`/`madd` integer dot products).
    Avx2,
    /// AVX-512 (F, BW, VL) with VNNI (`vpdpbusd`), on top of AVX2.
    Avx512Vnni,
}

impl SimdLevel {
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Scalar, SimdLevel::Avx2, SimdLevel::Avx512Vnni];

    /// Short name used by `describe()` and accepted by `KESTREL_CPU_KERNELS`.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Whether this CPU can run the kernels of this level.
    pub fn available(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            SimdLevel::Avx2 => has_avx2(),
            SimdLevel::Avx512Vnni => has_avx2() && has_avx512_vnni(),
        }
    }

    /// The fastest level this CPU supports.
    pub fn best() -> SimdLevel {
        SimdLevel::ALL
            .iter()
            .rev()
            .copied()
            .find(|l| l.available())
            .unwrap_or(SimdLevel::Scalar)
    }

    /// Every level this CPU supports (for tests comparing them).
    pub fn all_available() -> Vec<SimdLevel> {
        SimdLevel::ALL.iter().copied().filter(|l| l.available()).collect()
    }

    /// Parses a `KESTREL_CPU_KERNELS` value.
    pub fn parse(s: &str) -> Result<SimdLevel, BackendError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(SimdLevel::Scalar),
            "avx2" => Ok(SimdLevel::Avx2),
            "avx512" | "avx512-vnni" | "avx512vnni" => Ok(SimdLevel::Avx512Vnni),
            other => Err(BackendError::Other(format!(
                "{KERNELS_ENV}={other:?}: expected one of scalar, avx2, avx512"
            ))),
        }
    }

    /// The level requested by `KESTREL_CPU_KERNELS`, if set. Errors when the
    /// value is unknown or the CPU lacks the requested features.
    pub fn from_env() -> Result<Option<SimdLevel>, BackendError> {
        let Ok(v) = std::env::var(KERNELS_ENV) else {
            return Ok(None);
        };
        if v.trim().is_empty() {
            return Ok(None);
        }
        let level = SimdLevel::parse(&v)?;
        if !level.available() {
            return Err(BackendError::Unsupported(format!(
                "{KERNELS_ENV}={v}: this CPU lacks the features of the '{}' kernels",
                level.name()
            )));
        }
        Ok(Some(level))
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx2() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn has_avx512_vnni() -> bool {
    false
}

/// Threads requested by `KESTREL_THREADS`, if set to a positive integer.
pub fn threads_from_env() -> Result<Option<usize>, BackendError> {
    let Ok(v) = std::env::var(THREADS_ENV) else {
        return Ok(None);
    };
    if v.trim().is_empty() {
        return Ok(None);
    }
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(Some(n)),
        _ => Err(BackendError::Other(format!(
            "{THREADS_ENV}={v:?}: expected a positive integer"
        ))),
    }
}

/// Number of physical cores: SMT siblings share the load/store units the
/// kernels saturate, so one thread per core is the useful maximum. Falls
/// back to the logical CPU count when sysfs is unreadable.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    physical_cores_from_sysfs()
        .filter(|&n| n > 0 && n <= logical)
        .unwrap_or(logical)
}

fn physical_cores_from_sysfs() -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    let dir = std::fs::read_dir("/sys/devices/system/cpu").ok()?;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(idx) = name.strip_prefix("cpu") else {
            continue;
        };
        if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let topo = entry.path().join("topology");
        let read = |f: &str| {
            std::fs::read_to_string(topo.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        // Offline CPUs have no topology directory; skip them.
        let (Some(pkg), Some(core)) = (read("physical_package_id"), read("core_id")) else {
            continue;
        };
        cores.insert((pkg, core));
    }
    Some(cores.len())
}

/// Compiles `$body` once per SIMD level (baseline x86-64 has no rounding
/// instruction: `round_ties_even` would be a libm call per element).
macro_rules! leveled {
    ($name:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
        pub fn $name(level: $crate::cpu::features::SimdLevel, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
                unsafe fn v512($($arg: $ty),*) { $body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) { $body($($arg),*) }
                if level >= $crate::cpu::features::SimdLevel::Avx512Vnni && $crate::cpu::features::SimdLevel::Avx512Vnni.available() {
                    // SAFETY: the features were just checked.
                    return unsafe { v512($($arg),*) };
                }
                if level >= $crate::cpu::features::SimdLevel::Avx2 && $crate::cpu::features::SimdLevel::Avx2.available() {
                    // SAFETY: the features were just checked.
                    return unsafe { v256($($arg),*) };
                }
            }
            let _ = level;
            $body($($arg),*)
        }
    };
}
pub(crate) use leveled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_documented_names() {
        assert_eq!(SimdLevel::parse("scalar").ok(), Some(SimdLevel::Scalar));
        assert_eq!(SimdLevel::parse(" AVX2 ").ok(), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse("avx512").ok(), Some(SimdLevel::Avx512Vnni));
        assert!(SimdLevel::parse("sse9").is_err());
    }

    #[test]
    fn best_level_is_available_and_scalar_always_is() {
        assert!(SimdLevel::Scalar.available());
        assert!(SimdLevel::best().available());
        assert!(SimdLevel::all_available().contains(&SimdLevel::best()));
    }

    #[test]
    fn physical_cores_is_positive() {
        assert!(physical_cores() >= 1);
    }
}
