//! What one kernel boundary costs inside a CUDA graph (diagnostic behind
//! `kestrel microbench --boundaries`; kernels in kernels/boundary.cu).
//!
//! Why: a batch-1 decode step of the default model is ~160 kernels, each
//! latency-bound, and attention's phase stamps (NOTES-cuda, session 16) put
//! ~1.8 us between one kernel's end and the next one's PDL wait returning.
//! Whether that is the price of any handoff or of the grid-completion wait
//! in particular decides what to build next: this times a chain of kernels
//! that do nothing but hand over: with the decode graph's handoff
//! (`griddepcontrol.wait`), and with a release/acquire counter per kernel
//! polled by the next kernel (launched when the poll before it passed, or
//! all of them resident at once).

use std::time::Instant;

use super::buffers::DevBuf;
use super::launch::Arg;
use super::CudaBackend;
use crate::backend::Result;
use crate::error::BackendError;

/// Threads per block of the chain kernels (only thread 0 works; the size
/// matters only for how a block occupies an SM).
const THREADS: u32 = 128;

/// One measured handoff.
#[derive(Clone, Debug)]
pub struct BoundaryCost {
    /// `pdl` (griddepcontrol.wait), `flag` (release/acquire counter, the
    /// next kernel launched once the poll passed) or `flag-early` (every
    /// later kernel resident and polling at once).
    pub handoff: &'static str,
    pub blocks: u32,
    pub kernels: usize,
    /// Best replay's time divided by `kernels`.
    pub us_per_kernel: f64,
    /// Median replay's time divided by `kernels`.
    pub us_per_kernel_median: f64,
}

impl CudaBackend {
    /// Times graphs of `kernels` chained launches of `blocks` blocks each,
    /// for each handoff (see `BoundaryCost::handoff`), over `replays`
    /// replays (after one untimed).
    pub fn kernel_boundaries(
        &self,
        kernels: usize,
        blocks: u32,
        replays: usize,
    ) -> Result<Vec<BoundaryCost>> {
        if kernels < 2 || blocks == 0 || replays == 0 {
            return Err(BackendError::Other(
                "kernel_boundaries: needs at least 2 kernels, 1 block and 1 replay".into(),
            ));
        }
        let s = &self.dev.stream;
        let buf = DevBuf::alloc(s, (kernels + 1) * blocks as usize * 4, "boundary chain values")?;
        let count = DevBuf::alloc(s, kernels * 4, "boundary chain counters")?;
        let pass = DevBuf::alloc(s, kernels * 4, "boundary chain pass counters")?;
        let failed = DevBuf::alloc(s, 4, "boundary chain failure flag")?;
        let mut out = Vec::new();
        let mut runs = 0;
        for handoff in ["pdl", "flag", "flag-early"] {
            self.begin_capture()?;
            let launched = (0..kernels).try_for_each(|i| {
                let src = if i == 0 { kernels } else { i };
                let mut args = vec![Arg::Ptr(buf.ptr), Arg::I32(src as i32), Arg::I32(i as i32)];
                if handoff != "pdl" {
                    args.extend([
                        Arg::I32((i + 1 == kernels) as i32),
                        Arg::I32((handoff == "flag-early") as i32),
                        Arg::Ptr(count.ptr),
                        Arg::Ptr(pass.ptr),
                        Arg::Ptr(failed.ptr),
                    ]);
                }
                let name = if handoff == "pdl" {
                    "chain_pdl"
                } else {
                    "chain_flag"
                };
                self.run(name, (blocks, 1, 1), THREADS, 0, &args)
            });
            // End the capture even when a launch failed, so the stream is usable.
            let graph = self.end_capture();
            launched?;
            let graph = graph?;
            let mut times = Vec::with_capacity(replays);
            for r in 0..=replays {
                let t0 = Instant::now();
                self.replay(&graph)?;
                crate::Backend::synchronize(self)?;
                if r > 0 {
                    times.push(t0.elapsed().as_secs_f64() * 1e6 / kernels as f64);
                }
            }
            let mut flag = [0u32; 1];
            self.dtoh(&mut flag, failed.ptr, "boundary chain failure flag")?;
            if flag[0] != 0 {
                return Err(BackendError::Other(format!(
                    "kernel_boundaries: a {handoff} chain kernel gave up polling its predecessor's counter"
                )));
            }
            // See boundary.cu: the last row counts every kernel of every
            // replay (the untimed one and the pdl chain's included).
            let mut last = vec![0f32; blocks as usize];
            let offset = (kernels * blocks as usize * 4) as u64;
            self.dtoh(&mut last, buf.ptr + offset, "boundary chain values")?;
            runs += replays + 1;
            let want = (kernels * runs) as f32;
            if let Some(v) = last.iter().find(|&&v| v != want) {
                return Err(BackendError::Other(format!(
                    "kernel_boundaries: {handoff} chain ended with {v}, expected {want}: a handoff let a kernel read before its predecessor wrote"
                )));
            }
            times.sort_by(f64::total_cmp);
            out.push(BoundaryCost {
                handoff,
                blocks,
                kernels,
                us_per_kernel: times[0],
                us_per_kernel_median: times[times.len() / 2],
            });
        }
        Ok(out)
    }
}
