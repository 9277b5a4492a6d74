//! Per-step batch metadata in one persistent device buffer.
//!
//! `prepare_batch` overwrites the same buffer every step (growing it only
//! when a batch does not fit), so a CUDA graph captured over one step reads
//! the next step's tokens, positions, slots and block tables on replay.
//! Layout (u32): tokens | positions | slots | token_seq (row -> sequence) |
//! fresh (row -> first position of its sequence this step stores, see
//! `BatchLayout::first_new_positions`) | block tables `[cap_seqs, bt_stride]`.
//!
//! The capacities are generous (so that graphs rarely go stale), which makes
//! the buffer large (~330 KB at 256 sequences of 1,024 blocks) while a step
//! uses a few KB of it. The host therefore packs only the used words into a
//! pinned staging buffer and two 2D copies scatter them into place: a decode
//! step of 64 sequences spent ~100 us of host time uploading the whole
//! buffer from pageable memory (H200, session 6).

use std::sync::Arc;

use cudarc::driver::{sys, CudaStream};

use super::buffers::{CudaBatch, DevBuf, PinnedStaging};
use crate::error::BackendError;
use crate::layout::BatchLayout;

/// Per-row arrays ahead of the block tables.
const ROW_ARRAYS: usize = 5;

#[derive(Default)]
pub(crate) struct Meta {
    buf: Option<DevBuf>,
    pub cap_tokens: usize,
    pub cap_seqs: usize,
    pub bt_stride: usize,
    /// Bumped whenever the buffer is reallocated (captured graphs go stale).
    pub epoch: u64,
    /// Bumped on every upload; a batch is valid only while it is current.
    pub write_id: u64,
    /// Pinned staging of the used words (rewritten once its last copy is done).
    staging: Option<PinnedStaging<u32>>,
}

fn bad(msg: String) -> BackendError {
    BackendError::Other(format!("batch layout: {msg}"))
}

/// Checks a layout and returns (row -> sequence, max blocks per sequence).
fn validate(b: &BatchLayout) -> Result<(Vec<u32>, usize), BackendError> {
    let n = b.tokens.len();
    if b.positions.len() != n || b.slot_mapping.len() != n {
        return Err(bad(format!(
            "tokens ({n}), positions ({}) and slot_mapping ({}) must have the same length",
            b.positions.len(),
            b.slot_mapping.len()
        )));
    }
    if b.block_size == 0 {
        return Err(bad("block_size must be positive".into()));
    }
    let mut seq_of = vec![u32::MAX; n];
    let mut max_blocks = 1;
    for (si, s) in b.seqs.iter().enumerate() {
        let (q0, ql) = (s.query_start as usize, s.query_len as usize);
        if q0 + ql > n {
            return Err(bad(format!(
                "sequence {si}: rows {q0}..{} exceed the {n} tokens",
                q0 + ql
            )));
        }
        let cap = s.block_table.len() as u64 * b.block_size as u64;
        if s.context_len as u64 > cap {
            return Err(bad(format!(
                "sequence {si}: context_len {} exceeds its {} blocks of {}",
                s.context_len,
                s.block_table.len(),
                b.block_size
            )));
        }
        max_blocks = max_blocks.max(s.block_table.len());
        for (r, (slot, &pos)) in seq_of[q0..q0 + ql]
            .iter_mut()
            .zip(&b.positions[q0..q0 + ql])
            .enumerate()
        {
            let r = q0 + r;
            if *slot != u32::MAX {
                return Err(bad(format!("row {r} belongs to two sequences")));
            }
            if pos >= s.context_len {
                return Err(bad(format!(
                    "row {r}: position {pos} not below its sequence's context_len {}",
                    s.context_len
                )));
            }
            *slot = si as u32;
        }
    }
    if let Some(r) = seq_of.iter().position(|&s| s == u32::MAX) {
        return Err(bad(format!("row {r} belongs to no sequence")));
    }
    Ok((seq_of, max_blocks))
}

impl Meta {
    /// Grows capacity to at least the given sizes (reallocating bumps `epoch`).
    pub fn reserve(
        &mut self,
        stream: &Arc<CudaStream>,
        tokens: usize,
        seqs: usize,
        blocks: usize,
    ) -> Result<(), BackendError> {
        if self.buf.is_some()
            && tokens <= self.cap_tokens
            && seqs <= self.cap_seqs
            && blocks <= self.bt_stride
        {
            return Ok(());
        }
        let ct = tokens.max(self.cap_tokens).max(8).next_power_of_two();
        let cs = seqs.max(self.cap_seqs).max(8).next_power_of_two();
        let bs = blocks.max(self.bt_stride).max(16).next_power_of_two();
        let words = ROW_ARRAYS * ct + cs * bs;
        self.buf = Some(DevBuf::alloc(stream, words * 4, "batch metadata")?);
        self.cap_tokens = ct;
        self.cap_seqs = cs;
        self.bt_stride = bs;
        self.epoch += 1;
        Ok(())
    }

    pub fn upload(&mut self, stream: &Arc<CudaStream>, b: &BatchLayout) -> Result<CudaBatch, BackendError> {
        let (seq_of, max_blocks) = validate(b)?;
        let (n, ns) = (b.tokens.len(), b.seqs.len());
        self.reserve(stream, n, ns, max_blocks)?;
        let (ct, stride) = (self.cap_tokens, self.bt_stride);
        const WHAT: &str = "batch metadata";
        // Packed: the per-row arrays, then each sequence's table in
        // `max_blocks` words (unused tail words are never read: kernels look
        // up only blocks below the context length). After the step's sync
        // the previous copy is always done: `ready` returns at once.
        let fresh = b.first_new_positions(&seq_of);
        let chained = fresh.iter().zip(&b.positions).any(|(f, p)| f != p);
        let words = ROW_ARRAYS * n + ns * max_blocks;
        let staging = PinnedStaging::ready(&mut self.staging, stream, words, 4096, WHAT)?;
        let h = staging.as_mut_slice(WHAT)?;
        h[..n].copy_from_slice(&b.tokens);
        h[n..2 * n].copy_from_slice(&b.positions);
        h[2 * n..3 * n].copy_from_slice(&b.slot_mapping);
        h[3 * n..4 * n].copy_from_slice(&seq_of);
        h[4 * n..5 * n].copy_from_slice(&fresh);
        let mut max_block = 0;
        for (si, s) in b.seqs.iter().enumerate() {
            let o = ROW_ARRAYS * n + si * max_blocks;
            h[o..o + s.block_table.len()].copy_from_slice(&s.block_table);
            max_block = max_block.max(s.block_table.iter().copied().max().unwrap_or(0));
        }
        let buf = self
            .buf
            .as_ref()
            .ok_or_else(|| bad("metadata buffer missing".into()))?;
        let host = h.as_ptr();
        // Rows of the per-row arrays are `ct` words apart on the device, the
        // tables `stride` words apart.
        let copies = [
            (0usize, n, ct, ROW_ARRAYS, 0u64),
            (
                ROW_ARRAYS * n,
                max_blocks,
                stride,
                ns,
                4 * (ROW_ARRAYS * ct) as u64,
            ),
        ];
        for (src, width, pitch, height, dst) in copies {
            if width == 0 || height == 0 {
                continue;
            }
            let c = sys::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
                // SAFETY (pointer arithmetic): src + width * height words fit `words`.
                srcHost: unsafe { host.add(src) } as *const std::ffi::c_void,
                srcDevice: 0,
                srcArray: std::ptr::null_mut(),
                srcPitch: width * 4,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: buf.ptr + dst,
                dstArray: std::ptr::null_mut(),
                dstPitch: pitch * 4,
                WidthInBytes: width * 4,
                Height: height,
            };
            // SAFETY: the source is pinned and stays untouched until the
            // staging's recorded copy completes; the destination rows lie inside the buffer
            // (`reserve` made ct >= n, bt_stride >= max_blocks, cap_seqs >= ns).
            unsafe { sys::cuMemcpy2DAsync_v2(&c, stream.cu_stream()) }
                .result()
                .map_err(|e| BackendError::Cuda(format!("uploading batch metadata: {e}")))?;
        }
        staging.record(stream, WHAT)?;
        self.write_id += 1;
        let p = buf.ptr;
        Ok(CudaBatch {
            write_id: self.write_id,
            tokens: p,
            positions: p + 4 * ct as u64,
            slots: p + 8 * ct as u64,
            token_seq: p + 12 * ct as u64,
            fresh: p + 16 * ct as u64,
            chained,
            block_tables: p + 4 * (ROW_ARRAYS * ct) as u64,
            bt_stride: stride,
            block_size: b.block_size as usize,
            num_tokens: n,
            num_seqs: ns,
            max_token: b.tokens.iter().copied().max().unwrap_or(0),
            max_slot: b.slot_mapping.iter().copied().max().unwrap_or(0),
            max_block,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SeqLayout;

    fn two_seqs() -> BatchLayout {
        BatchLayout {
            tokens: vec![1, 2, 3, 4],
            positions: vec![0, 1, 2, 9],
            slot_mapping: vec![16, 17, 18, 41],
            seqs: vec![
                SeqLayout {
                    block_table: vec![1],
                    context_len: 3,
                    query_start: 0,
                    query_len: 3,
                },
                SeqLayout {
                    block_table: vec![7, 2],
                    context_len: 10,
                    query_start: 3,
                    query_len: 1,
                },
            ],
            block_size: 8,
        }
    }

    #[test]
    fn valid_layout_maps_rows_to_sequences() {
        let (seq_of, max_blocks) = validate(&two_seqs()).expect("valid");
        assert_eq!(seq_of, vec![0, 0, 0, 1]);
        assert_eq!(max_blocks, 2);
    }

    type Edit = Box<dyn Fn(&mut BatchLayout)>;

    #[test]
    fn invalid_layouts_are_refused_with_the_reason() {
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|b| b.positions.pop().map(|_| ()).unwrap_or(())),
                "same length",
            ),
            (Box::new(|b| b.seqs[1].query_start = 2), "two sequences"),
            (Box::new(|b| b.seqs[1].query_len = 0), "no sequence"),
            (Box::new(|b| b.positions[3] = 10), "not below"),
            (Box::new(|b| b.seqs[1].context_len = 17), "exceeds its 2 blocks"),
            (Box::new(|b| b.seqs[0].query_len = 5), "exceed the 4 tokens"),
            (Box::new(|b| b.block_size = 0), "block_size"),
        ];
        for (edit, want) in cases {
            let mut b = two_seqs();
            edit(&mut b);
            let e = validate(&b).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                e.contains(want),
                "expected an error containing '{want}', got '{e}'"
            );
        }
    }
}
