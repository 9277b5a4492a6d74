//! Device buffers and the backend's associated types.

use std::sync::Arc;

use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

use super::weights::Format;
use crate::error::BackendError;
use crate::layout::{KvSpec, RopeStyle};
use crate::memory::{Ledger, MemClass};

/// A raw device allocation with its address cached (kernels take raw
/// pointers; event tracking is off, so no per-use bookkeeping is needed).
pub struct DevBuf {
    _slice: CudaSlice<u8>,
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    /// What it holds, for the ledger.
    class: MemClass,
}

/// Every device buffer of this process, by class (`device_allocations`).
pub(crate) static LEDGER: Ledger = Ledger::new();

impl DevBuf {
    /// Workspace (activations, scratch, metadata): see `alloc_in`.
    pub(crate) fn alloc(stream: &Arc<CudaStream>, bytes: usize, what: &str) -> Result<DevBuf, BackendError> {
        Self::alloc_in(MemClass::Workspace, stream, bytes, what)
    }

    pub(crate) fn alloc_in(
        class: MemClass,
        stream: &Arc<CudaStream>,
        bytes: usize,
        what: &str,
    ) -> Result<DevBuf, BackendError> {
        // Never allocate 0 bytes: the driver rejects it and every kernel
        // expects a valid address.
        let n = bytes.max(16);
        let slice = stream
            .alloc_zeros::<u8>(n)
            .map_err(|e| BackendError::OutOfMemory(format!("{what}: {n} bytes: {e}")))?;
        let ptr = {
            let (p, _sync) = slice.device_ptr(stream);
            p
        };
        LEDGER.add(class, n as u64);
        Ok(DevBuf {
            _slice: slice,
            ptr,
            bytes,
            class,
        })
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // What `alloc_in` counted: the allocated size.
        LEDGER.sub(self.class, self.bytes.max(16) as u64);
    }
}

/// Pinned host memory for asynchronous copies (batch metadata up, argmax
/// ids down) with the event recorded after its last copy: it is reused or
/// read only once that copy is done, and the host never syncs the stream.
pub(crate) struct PinnedStaging<T> {
    host: PinnedHostSlice<T>,
    done: CudaEvent,
}

fn driver(what: &str, e: cudarc::driver::DriverError) -> BackendError {
    BackendError::Cuda(format!("{what}: {e}"))
}

impl<T: DeviceRepr + ValidAsZeroBits> PinnedStaging<T> {
    /// `slot`'s staging, ready to be rewritten: its last copy waited for,
    /// at least `len` elements (grown to a power of two, at least
    /// `min_cap`). `what` names it in errors.
    pub(crate) fn ready<'a>(
        slot: &'a mut Option<Self>,
        stream: &Arc<CudaStream>,
        len: usize,
        min_cap: usize,
        what: &str,
    ) -> Result<&'a mut Self, BackendError> {
        if let Some(s) = slot.as_ref() {
            s.wait(what)?;
        }
        let grow = slot.as_ref().is_none_or(|s| s.host.len() < len);
        if grow {
            let cap = len.max(min_cap).next_power_of_two();
            // SAFETY: callers read only elements that their copies wrote.
            let host = unsafe { stream.context().alloc_pinned_with_flags::<T>(cap, 0) }
                .map_err(|e| driver(&format!("allocating pinned {what}"), e))?;
            let done = match slot.take() {
                Some(s) => s.done,
                None => stream
                    .context()
                    .new_event(None)
                    .map_err(|e| driver(&format!("creating the event of {what}"), e))?,
            };
            *slot = Some(PinnedStaging { host, done });
        }
        slot.as_mut()
            .ok_or_else(|| BackendError::Other(format!("{what}: staging missing")))
    }

    /// Waits for the copies recorded so far.
    pub(crate) fn wait(&self, what: &str) -> Result<(), BackendError> {
        self.done
            .synchronize()
            .map_err(|e| driver(&format!("waiting for the copy of {what}"), e))
    }

    /// Marks the end of the copies just queued on `stream`.
    pub(crate) fn record(&self, stream: &Arc<CudaStream>, what: &str) -> Result<(), BackendError> {
        self.done
            .record(stream)
            .map_err(|e| driver(&format!("recording the copy of {what}"), e))
    }

    pub(crate) fn as_mut_slice(&mut self, what: &str) -> Result<&mut [T], BackendError> {
        self.host
            .as_mut_slice()
            .map_err(|e| driver(&format!("mapping pinned {what}"), e))
    }

    pub(crate) fn as_slice(&self, what: &str) -> Result<&[T], BackendError> {
        self.host
            .as_slice()
            .map_err(|e| driver(&format!("reading pinned {what}"), e))
    }
}

/// f32 activation `[rows, cols]`.
pub struct CudaAct {
    pub(crate) buf: DevBuf,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl CudaAct {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub(crate) fn ptr(&self) -> u64 {
        self.buf.ptr
    }
}

/// Weight `[rows = out, cols = in]` in a device layout of `kernels/dequant.cu`.
pub struct CudaWeight {
    pub(crate) buf: DevBuf,
    pub(crate) format: Format,
    pub(crate) stored: kestrel_formats::DType,
    pub(crate) name: String,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) off1: usize,
    pub(crate) off2: usize,
    /// The same matrix dequantized to f16 (`[rows, cols]`, row-major), kept
    /// beside the stored format when the backend's dense budget allows, so
    /// that GEMMs of batched decode and prefill read it directly instead of
    /// dequantizing the weight again every step.
    pub(crate) dense: Option<DevBuf>,
    /// Unique for the process's lifetime (a weight's address may be reused
    /// by a later model's): names the weights of a `Stacked` group.
    pub(crate) id: u64,
    /// Built on first use when this weight leads a group computed by one
    /// GEMM (see `Stacked`); None when the group did not fit the budget.
    pub(crate) stacked: std::sync::OnceLock<Option<Stacked>>,
    /// A tall Q8_0 matrix (the LM head) also in the tile order that
    /// `mma_q8_0t_*` reads (mma_q8.cu), made at upload from the dense
    /// budget: (buffer, offset of its scales). The packed layout stays for
    /// the embedding lookup and the other kernels.
    pub(crate) tiled: Option<(DevBuf, usize)>,
}

/// f16 copies of several weights with the same columns stacked row-wise
/// (Q, K, V; gate and up), so that a batched step computes the group with
/// one GEMM into `[rows, sum of rows]` instead of one GEMM per weight: at
/// 64 activation rows each small GEMM kept only a few SMs busy (H200: the
/// three QKV GEMMs took 28 us per layer).
pub(crate) struct Stacked {
    /// Ids of the weights after the leading one, in order.
    pub(crate) followers: Vec<u64>,
    pub(crate) buf: DevBuf,
    pub(crate) rows: usize,
}

impl CudaWeight {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Stored dtype of the source tensor.
    pub fn stored_dtype(&self) -> kestrel_formats::DType {
        self.stored
    }
    /// Bytes the weight occupies on the device (stored format plus the f16
    /// mirror when there is one).
    pub fn device_bytes(&self) -> usize {
        self.buf.bytes + self.dense.as_ref().map_or(0, |d| d.bytes)
    }
    pub(crate) fn ptrs(&self) -> (u64, u64, u64) {
        (
            self.buf.ptr,
            self.buf.ptr + self.off1 as u64,
            self.buf.ptr + self.off2 as u64,
        )
    }
}

/// f32 vector.
pub struct CudaVector {
    pub(crate) buf: DevBuf,
    pub(crate) len: usize,
}

/// RoPE table: `inv_freq` on the device.
pub struct CudaRope {
    pub(crate) buf: DevBuf,
    pub(crate) n_pairs: usize,
    pub(crate) style: RopeStyle,
    pub(crate) mscale: f32,
}

impl CudaRope {
    /// The kernels' code of the pair layout (`style` in elementwise.cu).
    pub(crate) fn style_code(&self) -> i32 {
        match self.style {
            RopeStyle::Interleaved => 0,
            RopeStyle::Neox => 1,
        }
    }
}

/// Paged KV pool. Layout per layer: K for every slot (`[slots, kv_dim]`),
/// then V likewise; slot = block * block_size + offset.
pub struct CudaKvPool {
    pub(crate) buf: DevBuf,
    pub(crate) spec: KvSpec,
    /// Unique for the process's lifetime: decode graphs are cached per pool
    /// (their kernels hold its address and layer offsets), and a new pool
    /// may reuse a freed pool's address with a different shape.
    pub(crate) id: u64,
}

impl CudaKvPool {
    pub(crate) fn kv_dim(&self) -> usize {
        self.spec.n_kv_heads * self.spec.head_dim
    }
    pub(crate) fn slots(&self) -> usize {
        self.spec.num_blocks * self.spec.block_size
    }
    /// Element offset of layer `l`'s K, and of V relative to K.
    pub(crate) fn offsets(&self, layer: usize) -> (i64, i64) {
        let per = (self.slots() * self.kv_dim()) as i64;
        (2 * per * layer as i64, per)
    }
    pub(crate) fn dtype_code(&self) -> i32 {
        match self.spec.dtype {
            crate::layout::KvDType::F32 => 0,
            crate::layout::KvDType::F16 => 1,
            crate::layout::KvDType::Bf16 => 2,
        }
    }
}

/// Device addresses of one step's metadata (inside the backend's persistent
/// metadata buffer) plus the host facts kernels' launch shapes need.
pub struct CudaBatch {
    pub(crate) write_id: u64,
    pub(crate) tokens: u64,
    pub(crate) positions: u64,
    pub(crate) slots: u64,
    pub(crate) token_seq: u64,
    /// Per row, the first position of its sequence this step stores
    /// (`BatchLayout::first_new_positions`): attention reads keys from
    /// there on only after the step's K/V stores.
    pub(crate) fresh: u64,
    /// Some row reads a key another row of the step stores (a prefill
    /// chunk, or a speculative step's rows).
    pub(crate) chained: bool,
    pub(crate) block_tables: u64,
    pub(crate) bt_stride: usize,
    pub(crate) block_size: usize,
    pub(crate) num_tokens: usize,
    pub(crate) num_seqs: usize,
    pub(crate) max_token: u32,
    pub(crate) max_slot: u32,
    pub(crate) max_block: u32,
}

impl CudaBatch {
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
}
