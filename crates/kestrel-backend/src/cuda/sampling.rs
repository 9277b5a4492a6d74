//! Sampling on the device (kernels/sampling.cu): the engine's sampler chain
//! per logits row, one block per row; only token ids come back.

use super::buffers::{CudaAct, DevBuf, PinnedStaging};
use super::launch::{i32_of, Arg};
use super::CudaBackend;
use crate::error::BackendError;
use crate::layout::DeviceSample;

/// `SampleRow` of sampling.cu (48 bytes, `u` first for alignment).
#[repr(C)]
#[derive(Clone, Copy)]
struct SampleRow {
    u: f64,
    inv_t: f32,
    top_p: f32,
    min_p_log: f32,
    rep: f32,
    presence: f32,
    frequency: f32,
    top_k: u32,
    pen_off: u32,
    pen_n: u32,
    greedy: u32,
}

/// Grows `buf` to `bytes` (never inside a capture: sampling runs after it).
fn sized(be: &CudaBackend, buf: &mut Option<DevBuf>, bytes: usize, what: &str) -> Result<u64, BackendError> {
    if buf.as_ref().is_none_or(|b| b.bytes < bytes) {
        *buf = Some(DevBuf::alloc(&be.dev.stream, bytes.max(16), what)?);
    }
    Ok(buf.as_ref().map_or(0, |b| b.ptr))
}

/// Largest vocabulary the kernel takes (SAMPLE_MAXJ tokens per thread of 1024).
pub(crate) const MAX_VOCAB: usize = 256 * 1024;

/// Whether device sampling is on: the fused kernel set, unless
/// `KESTREL_DEVICE_SAMPLING=0` (for A/B runs against the host sampler).
pub(crate) fn enabled_by_env() -> bool {
    super::knobs::on_unless_zero("KESTREL_DEVICE_SAMPLING")
}

/// Fewest ids per block of the chunked sampler (a multiple of its 256
/// threads): one row of Gemma's 262,144 logits is then 128 blocks.
const SAMPLE_CHUNK_MIN: usize = 2048;

/// Whether a row takes the chunked sampler (`sample_chunk_*`): no penalty,
/// and greedy or a draw without top-k and top-p (temperature and min-p
/// only: OpenAI's defaults), unless `KESTREL_SAMPLE_CHUNKED=0` (for A/B runs
/// against the single-block kernel).
pub(crate) fn chunked(r: &DeviceSample) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| super::knobs::on_unless_zero("KESTREL_SAMPLE_CHUNKED"))
        && r.penalties.is_empty()
        && (r.greedy || (r.top_k == 0 && r.top_p >= 1.0))
}

/// The rows as the kernels' `SampleRow`s, and the penalty pairs they index.
fn pack(rows: &[DeviceSample]) -> Result<(Vec<SampleRow>, Vec<u32>), BackendError> {
    let mut packed = Vec::with_capacity(rows.len());
    let mut pens: Vec<u32> = Vec::new();
    for r in rows {
        let off =
            u32::try_from(pens.len() / 2).map_err(|_| BackendError::Other("too many penalties".into()))?;
        for &(id, count) in &r.penalties {
            pens.extend([id, count]);
        }
        packed.push(SampleRow {
            u: r.u,
            inv_t: r.inv_t,
            top_p: r.top_p,
            min_p_log: r.min_p_log,
            rep: r.repetition,
            presence: r.presence,
            frequency: r.frequency,
            top_k: r.top_k,
            pen_off: off,
            pen_n: r.penalties.len() as u32,
            greedy: r.greedy as u32,
        });
    }
    Ok((packed, pens))
}

/// The packed rows as bytes.
fn row_bytes(packed: &[SampleRow]) -> &[u8] {
    // SAFETY: SampleRow is repr(C) plain data without padding (8 + 40 bytes).
    unsafe { std::slice::from_raw_parts(packed.as_ptr() as *const u8, std::mem::size_of_val(packed)) }
}

impl CudaBackend {
    pub(crate) fn sample_rows_impl(
        &self,
        x: &CudaAct,
        rows: &[DeviceSample],
    ) -> Result<Vec<u32>, BackendError> {
        if rows.len() != x.rows {
            return Err(BackendError::Other(format!(
                "sample_rows: {} sampling rows for {} logits rows",
                rows.len(),
                x.rows
            )));
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if x.cols > MAX_VOCAB {
            return Err(BackendError::Unsupported(format!(
                "sampling on the device over {} logits (at most {MAX_VOCAB})",
                x.cols
            )));
        }
        let (packed, pens) = pack(rows)?;
        let row_bytes = row_bytes(&packed);
        if rows.len() <= MAX_CHUNKED_ROWS && rows.iter().all(chunked) {
            let keys = {
                let mut st = self.lock()?;
                sized(self, &mut st.sample_keys, rows.len() * 8, "sampling row keys")?
            };
            let out_ptr = self.launch_chunked(x, row_bytes, keys)?;
            let mut ids = vec![0u32; rows.len()];
            self.dtoh(&mut ids, out_ptr, "sampled tokens")?;
            return Ok(ids);
        }
        let (rows_ptr, pens_ptr, out_ptr) = {
            let mut st = self.lock()?;
            if st.capturing {
                return Err(BackendError::Unsupported(
                    "sample_rows inside a graph capture".into(),
                ));
            }
            (
                sized(self, &mut st.sample_rows, row_bytes.len(), "sampling parameters")?,
                sized(self, &mut st.sample_pens, pens.len() * 4, "sampling penalties")?,
                sized(self, &mut st.sample_out, rows.len() * 4, "sampled tokens")?,
            )
        };
        self.htod(rows_ptr, row_bytes, "sampling parameters")?;
        if !pens.is_empty() {
            self.htod(pens_ptr, &pens, "sampling penalties")?;
        }
        self.run(
            "sample_rows",
            (rows.len() as u32, 1, 1),
            1024,
            0,
            &[
                Arg::Ptr(x.ptr()),
                i32_of(x.cols, "vocab")?,
                Arg::Ptr(rows_ptr),
                Arg::Ptr(pens_ptr),
                Arg::Ptr(out_ptr),
            ],
        )?;
        let mut ids = vec![0u32; rows.len()];
        self.dtoh(&mut ids, out_ptr, "sampled tokens")?;
        Ok(ids)
    }

    /// Launches the chunked sampler over the rows of `x` (`row_bytes`: their
    /// packed `SampleRow`s): the row's max first (`sample_chunk_max`, as
    /// argmax keys into `keys`), then the chunk masses and the draw
    /// (`sample_chunk_draw`), which leaves each row's token in the returned
    /// buffer and, as an argmax key, in `keys`.
    pub(crate) fn launch_chunked(
        &self,
        x: &CudaAct,
        row_bytes: &[u8],
        keys: u64,
    ) -> Result<u64, BackendError> {
        let n = x.rows;
        // About four blocks per SM over all rows, at least SAMPLE_CHUNK_MIN
        // ids each (as argmax_rows spreads its blocks).
        let sms = self.dev.sm_count.max(1) as usize;
        let per_row = (4 * sms)
            .div_ceil(n)
            .clamp(1, x.cols.div_ceil(SAMPLE_CHUNK_MIN).max(1));
        let chunk = x.cols.div_ceil(per_row).next_multiple_of(256).max(256);
        let chunks = x.cols.div_ceil(chunk);
        let (rows_ptr, sums, counters, out_ptr) = {
            let mut st = self.lock()?;
            if st.capturing {
                return Err(BackendError::Unsupported(
                    "sample_rows inside a graph capture".into(),
                ));
            }
            let ptrs = (
                sized(self, &mut st.sample_rows, row_bytes.len(), "sampling parameters")?,
                sized(self, &mut st.sample_sums, n * chunks * 8, "sampling chunk masses")?,
                sized(self, &mut st.sample_count, n * 4, "sampling row counters")?,
                sized(self, &mut st.sample_out, n * 4, "sampled tokens")?,
            );
            // The parameters go up through pinned memory without a stream
            // sync: an overlapped step's draw is queued right behind its
            // forward pass, and a synchronous copy made the host wait for
            // that pass before it could launch the next step. Two stagings
            // in turn: rewriting one waits only for the copy two draws
            // back, long done by then.
            let what = "sampling parameters";
            let slot = st.sample_next;
            st.sample_next = 1 - slot;
            let staging = PinnedStaging::ready(
                &mut st.sample_staging[slot],
                &self.dev.stream,
                row_bytes.len(),
                256,
                what,
            )?;
            let host = &mut staging.as_mut_slice(what)?[..row_bytes.len()];
            host.copy_from_slice(row_bytes);
            self.dev
                .ctx
                .bind_to_thread()
                .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
            // SAFETY: the device buffer holds row_bytes.len() bytes (sized
            // above); the pinned source is not rewritten before the event
            // recorded after this copy has passed (`ready`).
            unsafe { cudarc::driver::result::memcpy_htod_async(ptrs.0, host, self.dev.stream.cu_stream()) }
                .map_err(|e| BackendError::Cuda(format!("{what}: {e}")))?;
            staging.record(&self.dev.stream, what)?;
            ptrs
        };
        self.run(
            "zero_u64",
            (1, 1, 1),
            256,
            0,
            &[Arg::Ptr(keys), i32_of(n, "sampling rows")?],
        )?;
        let grid = (chunks as u32, n as u32, 1);
        let (vocab, chunk) = (i32_of(x.cols, "vocab")?, i32_of(chunk, "sampling chunk")?);
        self.run(
            "sample_chunk_max",
            grid,
            256,
            0,
            &[Arg::Ptr(x.ptr()), vocab, chunk, Arg::Ptr(keys)],
        )?;
        self.run(
            "sample_chunk_draw",
            grid,
            256,
            0,
            &[
                Arg::Ptr(x.ptr()),
                vocab,
                chunk,
                Arg::Ptr(rows_ptr),
                Arg::Ptr(keys),
                Arg::Ptr(sums),
                Arg::Ptr(counters),
                Arg::Ptr(out_ptr),
            ],
        )?;
        Ok(out_ptr)
    }

    /// `Backend::queue_sample`: the chunked sampler with its keys in the
    /// argmax key buffer, queued as `queue_argmax` queues (so that
    /// `take_argmax` and `feed_argmax` serve sampled rows too).
    pub(crate) fn queue_sample_impl(&self, x: &CudaAct, rows: &[DeviceSample]) -> Result<u64, BackendError> {
        if rows.len() != x.rows || rows.len() > MAX_CHUNKED_ROWS || !rows.iter().all(chunked) {
            return Err(BackendError::Unsupported(
                "queue_sample: rows that need the full sampler chain".into(),
            ));
        }
        let (packed, _) = pack(rows)?;
        let keys = {
            let mut st = self.lock()?;
            self.argmax_keys(&mut st, rows.len() * 8)?
        };
        self.launch_chunked(x, row_bytes(&packed), keys)?;
        self.queue_keys(rows.len())
    }
}

/// Most rows of one chunked launch (the grid's y dimension).
const MAX_CHUNKED_ROWS: usize = 65_535;

#[cfg(test)]
mod tests {
    #[test]
    fn row_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<super::SampleRow>(), 48);
    }
}
