//! Finding the driver and a device without panicking.
//!
//! cudarc in dynamic-loading mode panics when a library is missing (it
//! `dlopen`s lazily on first use), so every library is probed first and the
//! context creation runs under `catch_unwind` as a second guard.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::error::BackendError;

/// A context on one device, its single work stream and its properties.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub sm_count: i32,
    /// Total device memory in bytes (0 when the driver would not say).
    pub total_mem: usize,
}

fn missing(lib: &str, why: &str) -> BackendError {
    BackendError::Cuda(format!(
        "{lib} not found ({why}); the CUDA backend needs an NVIDIA driver{}",
        if lib == "libcuda.so" {
            ""
        } else {
            ", libnvrtc and libcublas (CUDA 12/13 toolkit or the nvidia-*-cu13 wheels) on the library path"
        }
    ))
}

/// Checks that libcuda, libnvrtc and libcublas can be loaded.
pub(crate) fn probe_libraries() -> Result<(), BackendError> {
    // SAFETY: these only try `dlopen` on candidate names and drop the handle.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(missing("libcuda.so", "no NVIDIA driver library on this machine"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(missing("libnvrtc.so", "needed to compile kernels at run time"));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(missing("libcublas.so", "needed for prefill matrix products"));
        }
    }
    Ok(())
}

/// How many CUDA devices the driver reports (0 without the libraries or a
/// driver). Tests use it to tell "no GPU here" (skip) from "a GPU is
/// present and the backend failed" (a failure, never a skip).
pub fn device_count() -> usize {
    if probe_libraries().is_err() {
        return 0;
    }
    guarded("counting CUDA devices", || {
        CudaContext::device_count().map_err(|e| BackendError::Cuda(e.to_string()))
    })
    .map_or(0, |n| n.max(0) as usize)
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "unknown panic".to_string()
    }
}

/// Runs `f`, turning a panic inside cudarc (missing symbol, missing
/// library) into an error that names `what`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(BackendError::Cuda(format!("{what}: {}", panic_text(p)))),
    }
}

impl Device {
    pub fn open(ordinal: usize) -> Result<Device, BackendError> {
        probe_libraries()?;
        guarded("opening the CUDA device", || {
            let count = CudaContext::device_count().map_err(|e| {
                BackendError::Cuda(format!("cuInit/cuDeviceGetCount failed: {e} (is a GPU visible?)"))
            })?;
            if count <= 0 {
                return Err(BackendError::Cuda(
                    "no CUDA device found (driver loaded, 0 devices)".into(),
                ));
            }
            if ordinal >= count as usize {
                return Err(BackendError::Cuda(format!(
                    "device ordinal {ordinal} out of range: {count} CUDA device(s) present"
                )));
            }
            let ctx = CudaContext::new(ordinal)
                .map_err(|e| BackendError::Cuda(format!("creating a context on device {ordinal}: {e}")))?;
            // One stream and no cross-stream hazards: cudarc's per-buffer
            // events would only add work to every launch and break capture.
            // SAFETY: nothing has been allocated on this context yet.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx
                .new_stream()
                .map_err(|e| BackendError::Cuda(format!("creating a stream: {e}")))?;
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let cc = ctx
                .compute_capability()
                .map_err(|e| BackendError::Cuda(format!("reading the compute capability: {e}")))?;
            let sm_count = ctx
                .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .unwrap_or(0);
            let total_mem = ctx
                .bind_to_thread()
                .ok()
                .and_then(|_| cudarc::driver::result::mem_get_info().ok())
                .map(|(_, total)| total)
                .unwrap_or(0);
            Ok(Device {
                ctx,
                stream,
                name,
                cc,
                sm_count,
                total_mem,
            })
        })
    }
}
