//! Device-event timing helpers for benchmarks (not used on the hot path).

use cudarc::driver::sys::CUevent_flags;

use super::buffers::DevBuf;
use super::CudaBackend;
use crate::backend::{Backend, Result};
use crate::error::BackendError;

fn cuda(what: &str) -> impl Fn(cudarc::driver::DriverError) -> BackendError + '_ {
    move |e| BackendError::Cuda(format!("{what}: {e}"))
}

impl CudaBackend {
    /// Mean time in ms of `f` over `iters` runs, measured with
    /// device events around the whole loop (after one warm-up run).
    pub fn time_ms(&self, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        f()?;
        self.synchronize()?;
        let start = self
            .dev
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda("event"))?;
        let end = self
            .dev
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda("event"))?;
        start.record(&self.dev.stream).map_err(cuda("event record"))?;
        for _ in 0..iters {
            f()?;
        }
        end.record(&self.dev.stream).map_err(cuda("event record"))?;
        end.synchronize().map_err(cuda("event sync"))?;
        let ms = start.elapsed_ms(&end).map_err(cuda("elapsed"))?;
        Ok(ms as f64 / iters.max(1) as f64)
    }

    /// Device-to-device copy bandwidth in GB/s, counting bytes read plus written.
    pub fn copy_bandwidth_gbs(&self, bytes: usize, iters: usize) -> Result<f64> {
        let a = DevBuf::alloc(&self.dev.stream, bytes, "copy source")?;
        let b = DevBuf::alloc(&self.dev.stream, bytes, "copy destination")?;
        let ms = self.time_ms(iters, || {
            // SAFETY: both buffers hold `bytes` bytes.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(b.ptr, a.ptr, bytes, self.dev.stream.cu_stream())
            }
            .map_err(cuda("memcpy"))
        })?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
    }
}
