//! A small GGUF writer, for building synthetic models in tests and tools.
//!
//! ```no_run
//! use kestrel_formats::{DType, GgufWriter};
//! let mut w = GgufWriter::new();
//! w.add_meta("general.architecture", "gemma3");
//! w.add_f32_tensor("norm.weight", &[4], &[1.0, 1.0, 1.0, 1.0]).unwrap();
//! w.write_to("/tmp/tiny.gguf").unwrap();
//! ```

use std::path::{Path, PathBuf};

use crate::gguf_header::{tensor_bytes, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::{quantize_row, DType, FormatError, MetaValue};

/// Builds a GGUF file in memory. Metadata keeps insertion order (re-adding a
/// key replaces its value in place); tensors are laid out in insertion order.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn writer_path() -> PathBuf {
    PathBuf::from("<gguf writer>")
}

impl GgufWriter {
    /// A GGUF v3 writer with the default alignment of 32.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the version number written to the header (readers accept 2 and
    /// 3; other values are useful for error tests).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets the data alignment and records it as `general.alignment`.
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self, FormatError> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(FormatError::Malformed {
                path: writer_path(),
                message: format!("alignment {alignment} is not a non-zero power of two"),
            });
        }
        self.alignment = u64::from(alignment);
        self.add_meta("general.alignment", MetaValue::U32(alignment));
        Ok(self)
    }

    /// Adds (or replaces) a metadata key/value.
    pub fn add_meta(&mut self, key: impl Into<String>, value: impl Into<MetaValue>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a tensor of any type from its raw stored bytes. `shape` is
    /// row-major, outermost first (it is written to GGUF reversed, as ggml
    /// `ne`). Fails if the byte count does not match the shape.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
        data: impl Into<Vec<u8>>,
    ) -> Result<&mut Self, FormatError> {
        let name = name.into();
        let data = data.into();
        let bad = |message: String| FormatError::Malformed {
            path: writer_path(),
            message: format!("tensor '{name}': {message}"),
        };
        if shape.is_empty() || shape.len() > MAX_DIMS {
            return Err(bad(format!(
                "{} dimensions (expected 1..={MAX_DIMS})",
                shape.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(bad("added twice".to_owned()));
        }
        let expected = tensor_bytes(dtype, shape).map_err(|m| bad(format!("{dtype} {shape:?}: {m}")))?;
        if data.len() != expected {
            return Err(bad(format!(
                "{dtype} {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name,
            dtype,
            shape: shape.to_vec(),
            data,
        });
        Ok(self)
    }

    /// Adds an F32 tensor from values.
    pub fn add_f32_tensor(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        values: &[f32],
    ) -> Result<&mut Self, FormatError> {
        self.add_quantized_tensor(name, DType::F32, shape, values)
    }

    /// Adds a tensor of `dtype`, quantizing `values` row by row with
    /// [`quantize_row`].
    pub fn add_quantized_tensor(
        &mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &[usize],
        values: &[f32],
    ) -> Result<&mut Self, FormatError> {
        let name = name.into();
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(FormatError::Malformed {
                path: writer_path(),
                message: format!(
                    "tensor '{name}': shape {shape:?} has {n} elements but {} values were given",
                    values.len()
                ),
            });
        }
        let cols = shape.last().copied().unwrap_or(1).max(1);
        let mut data = Vec::new();
        for row in values.chunks(cols) {
            quantize_row(dtype, row, &mut data)?;
        }
        self.add_tensor(name, dtype, shape, data)
    }

    /// Serializes the whole file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_str(&mut out, key);
            out.extend_from_slice(&value.gguf_type().to_le_bytes());
            write_value(&mut out, key, value)?;
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).next_multiple_of(self.alignment);
        }
        pad_to(&mut out, self.alignment);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad_to(&mut out, self.alignment);
        }
        Ok(out)
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<(), FormatError> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn pad_to(out: &mut Vec<u8>, alignment: u64) {
    let target = (out.len() as u64).next_multiple_of(alignment) as usize;
    out.resize(target, 0);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, key: &str, v: &MetaValue) -> Result<(), FormatError> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => write_str(out, s),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous; an empty one is typed U8.
            let elem_ty = items.first().map_or(0, MetaValue::gguf_type);
            if let Some(bad) = items.iter().find(|i| i.gguf_type() != elem_ty) {
                return Err(FormatError::Malformed {
                    path: writer_path(),
                    message: format!(
                        "metadata '{key}': array mixes element types {} and {}",
                        items.first().map_or("?", MetaValue::type_name),
                        bad.type_name()
                    ),
                });
            }
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, key, item)?;
            }
        }
    }
    Ok(())
}
