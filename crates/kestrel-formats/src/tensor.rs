//! Tensor descriptions and borrowed tensor views.

use crate::{dequantize_row, DType, FormatError};

/// Where a tensor lives in a file and what it holds.
///
/// `offset` is documented by whoever produces the value:
/// * [`crate::parse_gguf_header`]: relative to the start of the data section;
/// * [`crate::GgufFile::tensor_infos`]: absolute file offset;
/// * [`crate::SafetensorsDir::tensor_infos`]: absolute offset within the
///   tensor's own shard file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// Row-major, outermost dimension first (PyTorch order).
    pub shape: Vec<usize>,
    pub offset: u64,
    pub n_bytes: usize,
}

/// A tensor borrowed from a mapped file. `shape` is row-major, outermost
/// first, like PyTorch: a GGUF tensor with ggml ne=[in, out] has shape
/// [out, in]. `data` is the raw stored bytes (possibly unaligned).
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// Total number of elements (1 for a 0-D tensor).
    pub fn n_elems(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of rows: product of all but the last dimension (1 for 1-D).
    pub fn rows(&self) -> usize {
        match self.shape.split_last() {
            Some((_, outer)) => outer.iter().product(),
            None => 1,
        }
    }

    /// Length of a row: the last dimension (1 for a 0-D tensor).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes of one stored row.
    pub fn row_bytes(&self) -> usize {
        // Views built by this crate always have whole blocks per row; a
        // hand-built inconsistent view just yields short/empty rows.
        self.dtype.row_bytes(self.cols()).unwrap_or(0)
    }

    /// Raw bytes of row `r`.
    ///
    /// # Panics
    /// If `r >= self.rows()` (like slice indexing) .
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        let start = r.saturating_mul(rb);
        assert!(
            r < self.rows(),
            "tensor '{}': row {r} out of range (rows = {})",
            self.name,
            self.rows()
        );
        let end = start.saturating_add(rb).min(self.data.len());
        self.data.get(start.min(end)..end).unwrap_or(&[])
    }

    /// Dequantizes (or converts) the whole tensor to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>, FormatError> {
        let mut out = vec![0.0f32; self.n_elems()];
        let cols = self.cols();
        if cols == 0 {
            return Ok(out);
        }
        let rb = self.dtype.row_bytes(cols).ok_or(FormatError::NotBlockMultiple {
            dtype: self.dtype,
            n_elems: cols,
            block_elems: self.dtype.block_elems(),
        })?;
        let needed = rb.saturating_mul(self.rows());
        if self.data.len() != needed {
            return Err(FormatError::BufferSize {
                dtype: self.dtype,
                n_elems: self.n_elems(),
                expected: needed,
                got: self.data.len(),
            });
        }
        for (src, dst) in self.data.chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
            dequantize_row(self.dtype, src, dst)?;
        }
        Ok(out)
    }
}
