//! Queued greedy ids for overlapped decode steps (`Backend::queue_argmax`,
//! `take_argmax`, `feed_argmax`).
//!
//! The engine launches step N+1 before the host has step N's tokens: N's
//! argmax keys are copied to pinned host memory behind an event (no stream
//! sync, so N+1's launch is not held up), and a one-block kernel turns the
//! same keys into N+1's input tokens on the device. Two result slots, so
//! that N's ids stay readable while N+1's are queued.

use cudarc::driver::{CudaEvent, PinnedHostSlice};

use super::launch::{i32_of, Arg};
use super::{CudaAct, CudaBackend, CudaBatch};
use crate::backend::Result;
use crate::error::BackendError;

struct Slot {
    ticket: u64,
    rows: usize,
    host: PinnedHostSlice<u64>,
    copied: CudaEvent,
}

#[derive(Default)]
pub(crate) struct ArgmaxQueue {
    next: u64,
    slots: [Option<Slot>; 2],
}

fn cuda(what: &str, e: cudarc::driver::DriverError) -> BackendError {
    BackendError::Cuda(format!("{what}: {e}"))
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
        let rows = x.rows;
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
        let i = (ticket % 2) as usize;
        // The slot's previous copy must be done before it is overwritten.
        let old = q.slots[i].take();
        if let Some(s) = &old {
            s.copied
                .synchronize()
                .map_err(|e| cuda("waiting for an earlier argmax copy", e))?;
        }
        let (mut host, copied) = match old {
            Some(s) if s.host.len() >= rows.max(1) => (s.host, s.copied),
            old => {
                let cap = rows.max(64).next_power_of_two();
                // SAFETY: only the `rows` words the copy below writes are read.
                let host = unsafe { stream.context().alloc_pinned_with_flags::<u64>(cap, 0) }
                    .map_err(|e| cuda("allocating pinned argmax ids", e))?;
                let copied = match old {
                    Some(s) => s.copied,
                    None => stream
                        .context()
                        .new_event(None)
                        .map_err(|e| cuda("creating the argmax event", e))?,
                };
                (host, copied)
            }
        };
        if rows > 0 {
            let dst = host
                .as_mut_slice()
                .map_err(|e| cuda("mapping the pinned argmax ids", e))?;
            // SAFETY: the key buffer holds `rows` keys (checked above); the
            // pinned destination is not touched until `copied` completes.
            unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut dst[..rows], keys, stream.cu_stream()) }
                .map_err(|e| cuda("queueing the argmax ids", e))?;
        }
        copied
            .record(stream)
            .map_err(|e| cuda("recording the argmax copy", e))?;
        q.slots[i] = Some(Slot {
            ticket,
            rows,
            host,
            copied,
        });
        Ok(ticket)
    }

    pub(crate) fn take_argmax_impl(&self, ticket: u64) -> Result<Vec<u32>> {
        let mut st = self.lock()?;
        let slot = st.queued.slots[(ticket % 2) as usize]
            .as_mut()
            .filter(|s| s.ticket == ticket)
            .ok_or_else(|| {
                BackendError::Other(format!("argmax ticket {ticket} is gone (two newer were queued)"))
            })?;
        slot.copied
            .synchronize()
            .map_err(|e| cuda("waiting for the argmax ids", e))?;
        let rows = slot.rows;
        let keys = slot
            .host
            .as_slice()
            .map_err(|e| cuda("reading the pinned argmax ids", e))?;
        Ok(keys[..rows].iter().map(|&k| id_of_key(k)).collect())
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
            let newest = st.queued.slots.iter().flatten().max_by_key(|s| s.ticket);
            match (newest, st.ids.as_ref()) {
                (Some(s), Some(b)) if s.rows >= rows && b.bytes >= rows * 8 => b.ptr,
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
