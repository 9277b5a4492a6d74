//! L2 residency hints for decode (`kestrel_l2_hints` in kernels/common.cu).
//!
//! At one sequence a decode step reads ~69 MB of layer weights and then the
//! 178 MB LM head, more than the 50 MB L2, so every step starts with the
//! layer weights in DRAM. The hints let an A/B run keep part of them in the
//! L2: the LM head streamed with evict-first loads, and a fixed fraction of
//! the layer weights' lines prefetched as evict-last (which the hardware
//! holds in the persisting part of the L2, sized here). Off by default until
//! a GPU run says they pay.

use std::sync::Arc;

use cudarc::driver::CudaModule;

use super::device::Device;
use super::knobs;
use crate::error::BackendError;

/// `KESTREL_L2`: bit 0 streams the LM head; bits 1-4 are the eighths of
/// the other weights' lines kept (0-8). 0 (the default) leaves the L2 alone.
fn hints_from_env() -> Result<i32, BackendError> {
    let Some(v) = knobs::usize_of("KESTREL_L2") else {
        return Ok(0);
    };
    if v > 17 {
        return Err(BackendError::Other(format!(
            "KESTREL_L2={v}: expected bit 0 (stream the LM head) plus 2 x eighths kept (0-8), at most 17"
        )));
    }
    Ok(v as i32)
}

/// Writes the hints into the module and, when lines are to be kept, sets
/// the persisting L2 size to the most the device allows.
pub(crate) fn apply(dev: &Device, module: &Arc<CudaModule>) -> Result<(), BackendError> {
    let hints = hints_from_env()?;
    if hints == 0 {
        return Ok(());
    }
    let err =
        |what: &str, e: cudarc::driver::DriverError| BackendError::Cuda(format!("L2 hints: {what}: {e}"));
    if hints >> 1 > 0 {
        let max = dev
            .ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE,
            )
            .map_err(|e| err("persisting L2 size", e))?;
        // SAFETY: sets a limit of the current context (bound by Device::open).
        unsafe {
            cudarc::driver::sys::cuCtxSetLimit(
                cudarc::driver::sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE,
                max.max(0) as usize,
            )
        }
        .result()
        .map_err(|e| err("cuCtxSetLimit", e))?;
    }
    let mut sym = module
        .get_global("kestrel_l2_hints", &dev.stream)
        .map_err(|e| err("kestrel_l2_hints", e))?;
    dev.stream
        .memcpy_htod(&hints.to_ne_bytes(), &mut sym)
        .map_err(|e| err("writing kestrel_l2_hints", e))?;
    dev.stream.synchronize().map_err(|e| err("synchronize", e))?;
    tracing::info!(
        "L2 hints {hints}: LM head streamed {}, {} / 8 of other weight lines kept",
        hints & 1 == 1,
        hints >> 1
    );
    Ok(())
}
