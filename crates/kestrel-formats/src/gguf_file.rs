//! A memory-mapped GGUF file with validated tensor locations.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::gguf_header::parse_gguf_header_from;
use crate::{FormatError, MetaValue, TensorInfo, TensorView};

/// An open GGUF file. Tensor data stays in the page cache; views borrow it.
pub struct GgufFile {
    path: PathBuf,
    map: Option<Mmap>,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    /// `offset` is ABSOLUTE (file offset of the tensor's first byte).
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_offset: u64,
    alignment: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and validates `path`: header, every tensor's type and shape,
    /// alignment, and that every tensor's bytes lie within the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, FormatError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| FormatError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // Mapping an empty file fails on some platforms; an empty file is
        // simply a truncated header.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only. As with every mmap-based model
            // loader, another process truncating or rewriting the file while
            // it is mapped is outside what we can guard against.
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let header = parse_gguf_header_from(bytes, &path)?;
        let file_len = bytes.len() as u64;

        let mut tensors = header.tensors;
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, t) in tensors.iter_mut().enumerate() {
            let start = header.data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes as u64));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => t.offset = start,
                _ => {
                    let start = header.data_offset.saturating_add(t.offset);
                    return Err(FormatError::Truncated {
                        path,
                        what: format!("tensor '{}'", t.name),
                        start,
                        end: start.saturating_add(t.n_bytes as u64),
                        len: file_len,
                    });
                }
            }
            by_name.insert(t.name.clone(), i);
        }
        Ok(GgufFile {
            path,
            map,
            version: header.version,
            metadata: header.metadata,
            tensors,
            by_name,
            data_offset: header.data_offset,
            alignment: header.alignment,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// File offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn missing(&self, key: &str) -> FormatError {
        FormatError::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
        }
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &MetaValue) -> FormatError {
        let found = match v {
            MetaValue::Array(_) | MetaValue::String(_) => v.type_name().to_owned(),
            other => format!("{} {other:?}", other.type_name()),
        };
        FormatError::WrongType {
            path: self.path.clone(),
            key: key.to_owned(),
            expected,
            found,
        }
    }

    /// Any integer value that fits in u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, FormatError> {
        self.opt_u32(key)?.ok_or_else(|| self.missing(key))
    }

    /// An F32/F64 or integer value, as f32.
    pub fn get_f32(&self, key: &str) -> Result<f32, FormatError> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, FormatError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    /// None if absent; an error if present but not an integer fitting u32.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>, FormatError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, "an unsigned integer fitting in u32", v)),
        }
    }

    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, FormatError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, FormatError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// `general.architecture` (e.g. "gemma3").
    pub fn architecture(&self) -> Result<&str, FormatError> {
        self.get_str("general.architecture")
    }

    /// Tensor infos in file order; `offset` is an absolute file offset.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let t = &self.tensors[*self.by_name.get(name)?];
        let bytes: &[u8] = self.map.as_deref().unwrap_or(&[]);
        // Bounds were validated in open(); `get` keeps this panic-free anyway.
        let start = usize::try_from(t.offset).ok()?;
        let data = bytes.get(start..start.checked_add(t.n_bytes)?)?;
        Some(TensorView {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data,
        })
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub fn file_size(&self) -> u64 {
        self.bytes().len() as u64
    }
}
