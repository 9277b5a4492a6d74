//! Queued greedy ids for overlapped decode steps (`Backend::queue_argmax`,
//! `take_argmax`, `feed_argmax`).
//!
//! The engine launches step N+1 before the host has step N's tokens: N's
//! argmax keys are copied to pinned host memory behind an event (no stream
//! sync, so N+1's launch is not held up), and a one-block kernel turns the
//! same keys into N+1's input tokens on the device. Two result slots, so
//! that N's ids stay readable while N+1's are queued.

use super::buffers::PinnedStaging;
use super::launch::{i32_of, Arg};
use super::{CudaAct, CudaBackend, CudaBatch};
use crate::backend::Result;
use crate::error::BackendError;

const WHAT: &str = "argmax ids";

/// One queued argmax: its ids' pinned copy and which ticket they are.
#[derive(Default)]
struct Slot {
    staging: Option<PinnedStaging<u64>>,
    /// None while the slot holds no readable ids.
    ticket: Option<u64>,
    rows: usize,
}

#[derive(Default)]
pub(crate) struct ArgmaxQueue {
    next: u64,
    slots: [Slot; 2],
}

/// Host id of an argmax key (see `argmax_rows` in elementwise.cu); key 0:
/// the row had only NaNs, answered 0 as `layout::argmax` does.
pub(crate) fn id_of_key(k: u64) -> u32 {
    if k == 0 {
        0
    } else {
        u32::MAX - (k as u32)
    }
}

impl CudaBackend {
    pub(crate) fn queue_argmax_impl(&self, x: &CudaAct) -> Result<u64> {
        self.launch_argmax(x)?;
        self.queue_keys(x.rows)
    }

    /// Queues the copy of the first `rows` keys of the argmax key buffer
    /// (written by the launches just before) to the host.
    pub(crate) fn queue_keys(&self, rows: usize) -> Result<u64> {
        let stream = &self.dev.stream;
        let mut st = self.lock()?;
        let keys = match st.ids.as_ref() {
            Some(b) if b.bytes >= rows * 8 => b.ptr,
            _ if rows == 0 => 0,
            _ => {
                return Err(BackendError::Other(
                    "queue_argmax: the argmax keys are missing".into(),
                ))
            }
        };
        let q = &mut st.queued;
        let ticket = q.next;
        q.next += 1;
        let slot = &mut q.slots[(ticket % 2) as usize];
        slot.ticket = None;
        // The slot's previous copy is waited for before it is overwritten.
        let staging = PinnedStaging::ready(&mut slot.staging, stream, rows, 64, WHAT)?;
        if rows > 0 {
            let dst = staging.as_mut_slice(WHAT)?;
            // SAFETY: the key buffer holds `rows` keys (checked above); the
            // pinned destination is not touched until the recorded copy
            // completes.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut dst[..rows], keys, stream.cu_stream()) }
                .map_err(|e| BackendError::Cuda(format!("queueing the argmax ids: {e}")))?;
        }
        staging.record(stream, WHAT)?;
        slot.ticket = Some(ticket);
        slot.rows = rows;
        Ok(ticket)
    }

    pub(crate) fn take_argmax_impl(&self, ticket: u64) -> Result<Vec<u32>> {
        let st = self.lock()?;
        let slot = &st.queued.slots[(ticket % 2) as usize];
        let staging = slot
            .staging
            .as_ref()
            .filter(|_| slot.ticket == Some(ticket))
            .ok_or_else(|| {
                BackendError::Other(format!("argmax ticket {ticket} is gone (two newer were queued)"))
            })?;
        staging.wait(WHAT)?;
        let keys = staging.as_slice(WHAT)?;
        Ok(keys[..slot.rows].iter().map(|&k| id_of_key(k)).collect())
    }

    pub(crate) fn feed_argmax_impl(&self, batch: &mut CudaBatch, rows: usize) -> Result<()> {
        if rows > batch.num_tokens {
            return Err(BackendError::Other(format!(
                "feed_argmax: {rows} rows but the batch has {} tokens",
                batch.num_tokens
            )));
        }
        let keys = {
            let st = self.lock()?;
            let newest = st
                .queued
                .slots
                .iter()
                .filter_map(|s| s.ticket.map(|t| (t, s.rows)))
                .max();
            match (newest, st.ids.as_ref()) {
                (Some((_, queued_rows)), Some(b)) if queued_rows >= rows && b.bytes >= rows * 8 => b.ptr,
                _ => {
                    return Err(BackendError::Other(format!(
                        "feed_argmax: no queued argmax of at least {rows} rows"
                    )))
                }
            }
        };
        if rows == 0 {
            return Ok(());
        }
        self.run(
            "tokens_from_keys",
            (rows.div_ceil(256) as u32, 1, 1),
            256,
            0,
            &[Arg::Ptr(keys), i32_of(rows, "rows")?, Arg::Ptr(batch.tokens)],
        )
    }
}
