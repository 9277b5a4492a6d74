//! CUDA graph capture and replay of decode steps.
//!
//! Usage by a model runner (one graph per padded batch size):
//! ```text
//! backend.reserve_batch(max_tokens, max_seqs, max_blocks)?;   // no reallocation later
//! let batch = backend.prepare_batch(&layout)?;                // outside the capture
//! backend.begin_capture()?;
//! model.forward(&backend, &batch, ...)?;  backend.launch_argmax(&logits)?;
//! let graph = backend.end_capture()?;
//! // every later step of the same shape:
//! let batch = backend.prepare_batch(&next_layout)?;           // overwrites the same buffers
//! backend.replay(&graph)?;  let ids = backend.fetch_argmax(n)?;
//! ```
//! Kernels read tokens, positions, slots and block tables from the
//! persistent metadata buffer, so replays see each step's new values; grid
//! shapes (token and sequence counts) are frozen into the graph. Inside a
//! capture, `prepare_batch`, `gather_rows` and allocations are refused.

use cudarc::driver::{sys, CudaGraph};

use super::megakernel::{MegaProgram, Recorder};
use super::CudaBackend;
use crate::backend::Result;
use crate::error::BackendError;

/// A captured, instantiated graph and the metadata epoch it was captured
/// in; for single-row steps also the same step as a megakernel program,
/// which replays run instead of the graph.
pub struct DecodeGraph {
    graph: CudaGraph,
    epoch: u64,
    program: Option<MegaProgram>,
}

// SAFETY: the graph is only launched through `CudaBackend::replay`, which
// serialises use through the backend's stream; CUDA graph execs may be used
// from any thread as long as calls are not concurrent (`&self` + the state lock).
unsafe impl Send for DecodeGraph {}

impl CudaBackend {
    /// Starts capturing this thread's launches on the backend's stream.
    pub fn begin_capture(&self) -> Result<()> {
        let mut st = self.lock()?;
        if st.capturing {
            return Err(BackendError::Other("begin_capture: already capturing".into()));
        }
        // Not self.synchronize(): that takes the state lock held here.
        self.dev
            .stream
            .synchronize()
            .map_err(|e| BackendError::Cuda(format!("begin_capture: synchronize: {e}")))?;
        self.dev
            .stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| BackendError::Cuda(format!("begin_capture: {e}")))?;
        st.capturing = true;
        if self.kernels == super::KernelSet::Fused && self.megakernel_on() {
            if let Ok(mut r) = self.recorder.lock() {
                *r = Some(Recorder::default());
                self.recording.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Ends the capture and instantiates the graph.
    pub fn end_capture(&self) -> Result<DecodeGraph> {
        let mut st = self.lock()?;
        if !st.capturing {
            return Err(BackendError::Other("end_capture without begin_capture".into()));
        }
        st.capturing = false;
        self.recording.store(false, std::sync::atomic::Ordering::Relaxed);
        let rec = self.recorder.lock().ok().and_then(|mut r| r.take());
        let g = self
            .dev
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| BackendError::Cuda(format!("end_capture: {e}")))?;
        let graph = g.ok_or_else(|| BackendError::Cuda("end_capture: nothing was captured".into()))?;
        let epoch = st.meta.epoch;
        drop(st);
        let program = rec.and_then(|r| self.build_program(r));
        Ok(DecodeGraph {
            graph,
            epoch,
            program,
        })
    }

    /// Whether the metadata buffers a graph reads are still the ones it was captured with.
    pub fn graph_is_current(&self, g: &DecodeGraph) -> Result<bool> {
        Ok(self.lock()?.meta.epoch == g.epoch)
    }

    /// Launches a captured graph; fails if the metadata buffers were
    /// reallocated since the capture (capture again after `reserve_batch`).
    pub fn replay(&self, g: &DecodeGraph) -> Result<()> {
        let st = self.lock()?;
        if st.meta.epoch != g.epoch {
            return Err(BackendError::Other(
                "replay: batch metadata buffers were reallocated since capture; capture the graph again"
                    .into(),
            ));
        }
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        if let Some(p) = &g.program {
            return self.launch_program(p);
        }
        g.graph
            .launch()
            .map_err(|e| BackendError::Cuda(format!("graph launch: {e}")))
    }
}
