//! Sampling on the device (kernels/sampling.cu): the engine's sampler chain
//! per logits row, one block per row; only token ids come back.

use super::buffers::{CudaAct, DevBuf};
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
        let mut packed = Vec::with_capacity(rows.len());
        let mut pens: Vec<u32> = Vec::new();
        for r in rows {
            let off = u32::try_from(pens.len() / 2)
                .map_err(|_| BackendError::Other("too many penalties".into()))?;
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
        // SAFETY: SampleRow is repr(C) plain data without padding (8 + 40 bytes).
        let row_bytes = unsafe {
            std::slice::from_raw_parts(
                packed.as_ptr() as *const u8,
                packed.len() * std::mem::size_of::<SampleRow>(),
            )
        };
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
}

#[cfg(test)]
mod tests {
    #[test]
    fn row_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<super::SampleRow>(), 48);
    }
}
