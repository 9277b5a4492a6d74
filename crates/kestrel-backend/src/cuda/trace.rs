//! Phase stamps of decode attention (diagnostic knob `KESTREL_TRACE=1`):
//! the kernel module is compiled with `#define KESTREL_TRACE 1` (compile.rs;
//! a separate cache entry, the default module is unchanged), the stamps of
//! `attention_impl` and `qk_norm_rope_store_pre` (common.cu, `TRACE_*`) are
//! summed into a device buffer, and the backend prints their means when it
//! is dropped. Answers where attention's time goes inside the CUDA graph:
//! before its PDL wait, in the wake-up after the RoPE kernel, or in its body.

use std::sync::Arc;

use cudarc::driver::CudaModule;

use super::buffers::DevBuf;
use super::device::Device;
use crate::error::BackendError;

/// i64 slots of the buffer: `TRACE_*` in common.cu, which says what each
/// sums (`TRACE_ROPE_END`, slot 7, is an absolute time the kernels share).
const SLOTS: usize = 10;
const N: usize = 0;
const ENTRY_WAIT: usize = 1;
const WAIT_Q: usize = 2;
const KEYS: usize = 3;
const PARTIAL: usize = 4;
const MERGE_N: usize = 5;
const MERGE: usize = 6;
const ROPE_WAIT: usize = 8;
const ROPE_ENTRY: usize = 9;

/// Whether this process asked for the traced kernel module.
pub(crate) fn requested() -> bool {
    super::knobs::on_if_one("KESTREL_TRACE")
}

/// The stamp buffer of a traced module, zeroed and pointed at by the
/// module's `kestrel_trace`; None when tracing was not requested.
pub(crate) fn setup(dev: &Device, module: &Arc<CudaModule>) -> Result<Option<DevBuf>, BackendError> {
    if !requested() {
        return Ok(None);
    }
    let err = |what: &str, e: cudarc::driver::DriverError| {
        BackendError::Cuda(format!("KESTREL_TRACE: {what}: {e}"))
    };
    // Allocated zeroed.
    let buf = DevBuf::alloc(&dev.stream, SLOTS * 8, "trace stamps")?;
    let mut sym = module
        .get_global("kestrel_trace", &dev.stream)
        .map_err(|e| err("kestrel_trace", e))?;
    dev.stream
        .memcpy_htod(&buf.ptr.to_ne_bytes(), &mut sym)
        .map_err(|e| err("writing kestrel_trace", e))?;
    dev.stream.synchronize().map_err(|e| err("synchronize", e))?;
    eprintln!("KESTREL_TRACE=1: attention phase stamps on (diagnostic build of the kernels)");
    Ok(Some(buf))
}

/// The means of the stamps (the buffer's slots as read back), one line each.
fn report(v: &[i64; SLOTS]) -> String {
    let mean = |slot: usize, n: i64| {
        if n > 0 {
            v[slot] as f64 / n as f64 / 1000.0
        } else {
            f64::NAN
        }
    };
    let (n, m) = (v[N], v[MERGE_N]);
    format!(
        "KESTREL_TRACE: attention_pre, {n} launches stamped (block (0, 0, 0)), means in us:\n\
         \x20 RoPE kernel's last block ends -> attention entry {:.2} (negative: resident before)\n\
         \x20 RoPE kernel's last block ends -> attention's PDL wait returns {:.2}\n\
         \x20 entry -> wait returns {:.2}\n\
         \x20 wait -> query loaded {:.2}\n\
         \x20 the split's keys {:.2}\n\
         \x20 warp merge, partial, fence, counter {:.2}\n\
         \x20 merging split ({m} stamped): wait -> output written {:.2}",
        mean(ROPE_ENTRY, n),
        mean(ROPE_WAIT, n),
        mean(ENTRY_WAIT, n),
        mean(WAIT_Q, n),
        mean(KEYS, n),
        mean(PARTIAL, n),
        mean(MERGE, m),
    )
}

impl Drop for super::CudaBackend {
    fn drop(&mut self) {
        let Some(buf) = &self.trace else {
            return;
        };
        let mut v = [0i64; SLOTS];
        match self.dtoh(&mut v, buf.ptr, "KESTREL_TRACE: reading the stamps") {
            Ok(()) => eprintln!("{}", report(&v)),
            Err(e) => eprintln!("{e}"),
        }
    }
}
