//! Kernel sources, NVRTC compilation for the device's compute capability,
//! and the on-disk PTX cache (key: SHA-256 of source + architecture).

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};
use sha2::{Digest, Sha256};

use super::device::guarded;
use crate::error::BackendError;

/// All kernels form one translation unit: the helpers come first.
const SOURCES: [(&str, &str); 10] = [
    ("common.cu", include_str!("kernels/common.cu")),
    ("dequant.cu", include_str!("kernels/dequant.cu")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("attention.cu", include_str!("kernels/attention.cu")),
    ("gemv.cu", include_str!("kernels/gemv.cu")),
    ("mma_q8.cu", include_str!("kernels/mma_q8.cu")),
    ("hgemm.cu", include_str!("kernels/hgemm.cu")),
    ("megakernel.cu", include_str!("kernels/megakernel.cu")),
    ("sampling.cu", include_str!("kernels/sampling.cu")),
    ("boundary.cu", include_str!("kernels/boundary.cu")),
];

pub(crate) fn full_source() -> String {
    let mut s = String::new();
    // The diagnostic phase stamps (common.cu, cuda/trace.rs) are compiled in
    // only on request, so the default module (and its cache key) is unchanged.
    if super::trace::requested() {
        s.push_str("#define KESTREL_TRACE 1\n");
    }
    for (name, text) in SOURCES {
        s.push_str(&format!("// ---- {name} ----\n"));
        s.push_str(text);
        s.push('\n');
    }
    s
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("KESTREL_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/kestrel/kernels"))
}

/// Writes a file of the kernel cache directory: to a temporary name, then
/// renamed, so that a reader (another process) never sees half a file. The
/// cache is an optimisation: failing to write it is not an error.
pub(crate) fn store_cache_file(path: &std::path::Path, contents: &str) {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, contents).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

fn options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Compiles `src` to PTX for `arch` (e.g. "compute_90") with NVRTC.
pub(crate) fn compile_ptx(src: &str, arch: &str) -> Result<String, BackendError> {
    // SAFETY: only probes for the library with dlopen.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(BackendError::Cuda(
            "libnvrtc.so not found (needed to compile kernels at run time)".into(),
        ));
    }
    guarded("NVRTC", || {
        let co = CompileOptions {
            options: options(arch),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, co).map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => BackendError::Cuda(format!(
                "NVRTC failed to compile the kernels for {arch}:\n{}",
                log.to_string_lossy()
            )),
            other => BackendError::Cuda(format!("NVRTC ({arch}): {other}")),
        })?;
        Ok(ptx.to_src())
    })
}

/// The module's PTX for `arch`, computed once per process: read from the
/// disk cache or compiled (and stored there). Backends created on several
/// threads at once (the CUDA test programs) wait for the first compile
/// instead of each running NVRTC on the whole source: on a fresh GPU machine
/// that made a test program run for minutes (25 compiles at once).
fn module_ptx(arch: &str) -> Result<Arc<str>, BackendError> {
    static MEMO: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Arc<str>>>> =
        std::sync::OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    // A panic while compiling leaves nothing inserted: the map stays usable.
    let mut memo = memo.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ptx) = memo.get(arch) {
        return Ok(ptx.clone());
    }
    let src = full_source();
    let key = module_key(arch);
    let path = cache_dir().map(|d| d.join(format!("{key}-{arch}.ptx")));

    let cached = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
    let ptx_text = match cached {
        Some(t) => t,
        None => {
            let t = compile_ptx(&src, arch)?;
            if let Some(p) = &path {
                store_cache_file(p, &t);
            }
            t
        }
    };
    let ptx: Arc<str> = ptx_text.into();
    memo.insert(arch.to_string(), ptx.clone());
    Ok(ptx)
}

/// Cache key of the module compiled for `arch`: the source and the NVRTC
/// options, hashed.
pub(crate) fn module_key(arch: &str) -> String {
    let mut h = Sha256::new();
    h.update(full_source().as_bytes());
    h.update(options(arch).join(" ").as_bytes());
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Compiles (or loads from the cache) the kernel module for `cc`.
///
/// A cubin in the cache (`{key}-sm_XY.cubin`, made from this source's PTX by
/// ptxas, e.g. by scripts/gpu-pack.sh) is loaded first: a fresh machine then
/// skips NVRTC and the driver's JIT of the PTX (two and a half minutes on an
/// H200 machine for this module). One that fails to load falls back to PTX.
pub(crate) fn load_module(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<Arc<CudaModule>, BackendError> {
    let arch = format!("compute_{}{}", cc.0, cc.1);
    let cubin = cache_dir()
        .map(|d| d.join(format!("{}-sm_{}{}.cubin", module_key(&arch), cc.0, cc.1)))
        .and_then(|p| std::fs::read(p).ok());
    if let Some(bytes) = cubin {
        match guarded("loading the kernel cubin", || {
            ctx.load_module(Ptx::from_binary(bytes))
                .map_err(|e| BackendError::Cuda(format!("loading the cached cubin: {e}")))
        }) {
            Ok(m) => return Ok(m),
            Err(e) => tracing::warn!("{e}; compiling the PTX instead"),
        }
    }
    let ptx_text = module_ptx(&arch)?.to_string();
    guarded("loading the kernel module", || {
        ctx.load_module(Ptx::from_src(ptx_text))
            .map_err(|e| BackendError::Cuda(format!("loading PTX for {arch}: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile with NVRTC wherever libnvrtc exists (no GPU needed).
    #[test]
    fn kernels_compile_with_nvrtc() {
        match compile_ptx(&full_source(), "compute_90") {
            Ok(ptx) => {
                // For reading the PTX (local-memory use, load widths) offline.
                // With the cache key next to it (`<path>.key`), for making a
                // cubin with ptxas (scripts/gpu-pack.sh).
                if let Ok(path) = std::env::var("KESTREL_PTX_OUT") {
                    std::fs::write(&path, &ptx).expect("writing KESTREL_PTX_OUT");
                    std::fs::write(format!("{path}.key"), module_key("compute_90")).expect("writing the key");
                }
                for k in [
                    "gemv_q4_k_8",
                    "mma_q8_0_8",
                    "gemvp_4",
                    "attention_rope",
                    "attention",
                    "attention_pre",
                    "residual_norm_pre",
                    "qk_norm_rope_store_pre",
                    "attention_gqa4",
                    "attention_dec4",
                    "qk_norm_rope",
                    "argmax_rows",
                    "dequant_f16",
                    "decode_program",
                    "sample_rows",
                ] {
                    assert!(
                        ptx.contains(&format!(".entry {k}(")),
                        "kernel {k} missing from the PTX"
                    );
                }
            }
            Err(e) if e.to_string().contains("libnvrtc.so not found") => eprintln!("SKIP: no NVRTC: {e}"),
            Err(e) => panic!("{e}"),
        }
    }

    /// Loaders on several threads get one PTX, computed once (read from the
    /// disk cache or compiled), not one compile each.
    #[test]
    fn concurrent_loaders_share_one_ptx() {
        // SAFETY: only probes for the library with dlopen.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("SKIP: no NVRTC");
            return;
        }
        let got: Vec<Arc<str>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| module_ptx("compute_90"))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("thread").expect("ptx"))
                .collect()
        });
        assert!(got.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])));
        assert!(got[0].contains(".entry attention_dec4("));
    }
}
