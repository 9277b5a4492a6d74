//! Parsing of the GGUF header: magic, version, metadata key/values and tensor
//! infos. Written to be safe on hostile input: every count and length is
//! checked against the bytes that remain before anything is allocated, and
//! nesting is bounded, so no input can panic or allocate more than a small
//! multiple of its own size.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::{DType, FormatError, MetaValue, TensorInfo};

/// "GGUF" read as a little-endian u32.
pub const GGUF_MAGIC: u32 = 0x4655_4747;
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// GGML tensors have at most this many dimensions.
pub const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal GGUF; deeper nesting than this is rejected so
/// hostile input cannot exhaust the stack.
const MAX_ARRAY_DEPTH: usize = 4;

/// The parsed header of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor infos in file order. `offset` is RELATIVE to `data_offset`
    /// here; [`crate::GgufFile`] turns it into an absolute file offset.
    pub tensors: Vec<TensorInfo>,
    /// Absolute file offset where the tensor data section starts (the end of
    /// the header rounded up to `alignment`).
    pub data_offset: u64,
    /// `general.alignment`, or 32 when absent.
    pub alignment: u64,
}

/// Parses a GGUF header from `bytes` (the start of a file; tensor data need
/// not be present). Errors name the input as `<input>`.
pub fn parse_gguf_header(bytes: &[u8]) -> Result<GgufHeader, FormatError> {
    parse_gguf_header_from(bytes, Path::new("<input>"))
}

/// As [`parse_gguf_header`], naming `path` in errors.
pub fn parse_gguf_header_from(bytes: &[u8], path: &Path) -> Result<GgufHeader, FormatError> {
    let mut r = Reader { bytes, pos: 0, path };
    let magic = r.u32("magic")?;
    if magic != GGUF_MAGIC {
        return Err(FormatError::NotGguf {
            path: path.to_path_buf(),
            magic,
        });
    }
    let version = r.u32("version")?;
    if version != 2 && version != 3 {
        if (2..=3).contains(&version.swap_bytes()) {
            return Err(r.malformed(format!(
                "big-endian GGUF (version {}) is not supported",
                version.swap_bytes()
            )));
        }
        return Err(FormatError::UnsupportedVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let n_tensors = r.u64("tensor count")?;
    let n_kv = r.u64("metadata count")?;

    // Smallest possible encodings: a KV is key length (8) + type (4) + a
    // 1-byte value; a tensor info is name length (8) + n_dims (4) + one dim
    // (8) + type (4) + offset (8).
    let n_kv = r.bounded_count(n_kv, 13, "metadata entries")?;
    let n_tensors = r.bounded_count(n_tensors, 32, "tensor infos")?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("type of metadata '{key}'"))?;
        let value = r.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.malformed(format!("duplicate metadata key '{key}'")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(r.malformed(format!(
                "general.alignment must be a non-zero power-of-two u32, got {other:?}"
            )))
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info = r.tensor_info(i, alignment)?;
        if !names.insert(info.name.clone()) {
            return Err(r.malformed(format!("duplicate tensor name '{}'", info.name)));
        }
        tensors.push(info);
    }

    let end = r.pos as u64;
    let data_offset = end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| r.malformed("data offset overflows".to_owned()))?;
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn path(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    fn malformed(&self, message: String) -> FormatError {
        FormatError::Malformed {
            path: self.path(),
            message,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], FormatError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(FormatError::Truncated {
                path: self.path(),
                what: what.to_owned(),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(n as u64),
                len: self.bytes.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], FormatError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count whose smallest encoding cannot fit in what remains,
    /// so that `Vec::with_capacity(count)` is always bounded by input size.
    /// Reported as truncation: either the input was cut short or the count
    /// is absurd, and the message shows both numbers.
    fn bounded_count(&self, count: u64, min_size: usize, what: &str) -> Result<usize, FormatError> {
        let max = (self.remaining() / min_size.max(1)) as u64;
        if count > max {
            return Err(FormatError::Truncated {
                path: self.path(),
                what: format!("{count} {what} (at least {min_size} bytes each)"),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(count.saturating_mul(min_size as u64)),
                len: self.bytes.len() as u64,
            });
        }
        // count <= remaining, which is a usize.
        Ok(count as usize)
    }

    fn string_bytes(&mut self, what: &str) -> Result<&[u8], FormatError> {
        let len = self.u64(&format!("length of {what}"))?;
        if len > self.remaining() as u64 {
            return Err(FormatError::Truncated {
                path: self.path(),
                what: what.to_owned(),
                start: self.pos as u64,
                end: (self.pos as u64).saturating_add(len),
                len: self.bytes.len() as u64,
            });
        }
        self.take(len as usize, what)
    }

    /// A string that must be valid UTF-8 (keys and tensor names).
    fn string(&mut self, what: &str) -> Result<String, FormatError> {
        let at = self.pos;
        let b = self.string_bytes(what)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(self.malformed(format!("{what} at byte {at} is not valid UTF-8"))),
        }
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, FormatError> {
        let what = format!("value of metadata '{key}'");
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>(&what)?[0]),
            1 => MetaValue::I8(self.array::<1>(&what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.malformed(format!("metadata '{key}': invalid bool byte {b}"))),
            },
            // Token strings of some vocabularies are not valid UTF-8 on
            // their own; keep the file usable rather than rejecting it.
            8 => MetaValue::String(String::from_utf8_lossy(self.string_bytes(&what)?).into_owned()),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!(
                        "metadata '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let elem_ty = self.u32(&format!("element type of metadata '{key}'"))?;
                let count = self.u64(&format!("length of metadata array '{key}'"))?;
                let min = min_value_size(elem_ty).ok_or_else(|| {
                    self.malformed(format!("metadata '{key}': unknown array element type {elem_ty}"))
                })?;
                let count = self.bounded_count(count, min, &format!("elements in array '{key}'"))?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => return Err(self.malformed(format!("metadata '{key}': unknown value type {ty}"))),
        })
    }

    fn tensor_info(&mut self, i: usize, alignment: u64) -> Result<TensorInfo, FormatError> {
        let name = self.string(&format!("name of tensor #{i}"))?;
        let n_dims = self.u32(&format!("dimension count of tensor '{name}'"))? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.malformed(format!(
                "tensor '{name}' has {n_dims} dimensions (expected 1..={MAX_DIMS})"
            )));
        }
        // ggml order: ne[0] is the innermost (contiguous) dimension.
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = self.u64(&format!("dimensions of tensor '{name}'"))?;
            // ggml stores dimensions as int64.
            if d > i64::MAX as u64 {
                return Err(self.malformed(format!("tensor '{name}' has a negative dimension")));
            }
            ne.push(d);
        }
        let type_id = self.u32(&format!("type of tensor '{name}'"))?;
        let offset = self.u64(&format!("data offset of tensor '{name}'"))?;
        let dtype = DType::from_ggml(type_id).ok_or_else(|| FormatError::UnsupportedTensorType {
            path: self.path(),
            tensor: name.clone(),
            type_id,
        })?;
        if offset % alignment != 0 {
            return Err(self.malformed(format!(
                "tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let shape: Vec<usize> = ne.iter().rev().map(|d| *d as usize).collect();
        if ne.iter().any(|d| usize::try_from(*d).is_err()) {
            return Err(self.malformed(format!("tensor '{name}' dimensions {ne:?} do not fit in memory")));
        }
        let n_bytes = tensor_bytes(dtype, &shape).map_err(|message| {
            self.malformed(format!("tensor '{name}' ({dtype}, ggml ne {ne:?}): {message}"))
        })?;
        Ok(TensorInfo {
            name,
            dtype,
            shape,
            offset,
            n_bytes,
        })
    }
}

/// Bytes of a tensor of `shape` (outermost first), checking block
/// divisibility of the row and overflow.
pub(crate) fn tensor_bytes(dtype: DType, shape: &[usize]) -> Result<usize, String> {
    let (cols, outer) = match shape.split_last() {
        Some((c, o)) => (*c, o),
        None => (1, &[][..]),
    };
    let row = dtype.row_bytes(cols).ok_or_else(|| {
        format!(
            "row length {cols} is not a multiple of the block size {}",
            dtype.block_elems()
        )
    })?;
    outer
        .iter()
        .try_fold(row, |acc, d| acc.checked_mul(*d))
        .filter(|n| *n as u64 <= i64::MAX as u64)
        .ok_or_else(|| "size overflows".to_owned())
}

/// Smallest encoded size of a value of GGUF type `ty`, or None if unknown.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        10..=12 => 8,
        _ => return None,
    })
}
