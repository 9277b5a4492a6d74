//! The one error type of this crate. Every message names the file (when one
//! is known) and says what was wrong, so a user can act on it without a
//! debugger.

use std::path::PathBuf;

use crate::DType;

/// Everything that can go wrong while reading model files or converting
/// quantized blocks.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// An I/O operation (open, stat, mmap, read, write) failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the GGUF magic.
    #[error("{}: not a GGUF file (magic 0x{magic:08x}, expected 0x46554747 \"GGUF\")", path.display())]
    NotGguf { path: PathBuf, magic: u32 },

    /// The GGUF version is not 2 or 3.
    #[error("{}: unsupported GGUF version {version} (supported: 2, 3)", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },

    /// Some structure runs past the end of the file.
    #[error("{}: truncated: {what} needs bytes {start}..{end} but the file has {len}", path.display())]
    Truncated {
        path: PathBuf,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },

    /// A tensor's ggml type id is unknown or not supported by kestrel.
    #[error("{}: unsupported tensor type {type_id} for tensor '{tensor}'", path.display())]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },

    /// Structurally malformed content (bad count, bad shape, misalignment, ...).
    #[error("{}: {message}", path.display())]
    Malformed { path: PathBuf, message: String },

    /// A required metadata key is absent.
    #[error("{}: missing metadata key '{key}'", path.display())]
    MissingKey { path: PathBuf, key: String },

    /// A metadata key exists but holds the wrong kind of value.
    #[error("{}: metadata key '{key}' should be {expected} but is {found}", path.display())]
    WrongType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        found: String,
    },

    /// A JSON file (config.json, index json) could not be parsed.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The directory is not a Hugging Face model directory.
    #[error("{}: no config.json: not a Hugging Face model directory", dir.display())]
    NotModelDir { dir: PathBuf },

    /// A shard named in model.safetensors.index.json does not exist.
    #[error("{}: shard '{shard}' listed in the index does not exist", index.display())]
    MissingShard { index: PathBuf, shard: String },

    /// A safetensors tensor uses a dtype kestrel does not load.
    #[error("{}: tensor '{tensor}' has unsupported dtype {dtype} (supported: F32, F16, BF16)", path.display())]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    /// A row length is not a whole number of quantization blocks.
    #[error("{dtype:?}: {n_elems} elements is not a multiple of the block size {block_elems}")]
    NotBlockMultiple {
        dtype: DType,
        n_elems: usize,
        block_elems: usize,
    },

    /// A byte buffer has the wrong size for the number of elements requested.
    #[error("{dtype:?}: {n_elems} elements need {expected} bytes but {got} were given")]
    BufferSize {
        dtype: DType,
        n_elems: usize,
        expected: usize,
        got: usize,
    },

    /// The model path is neither a GGUF file nor a model directory.
    #[error("{}: {message}", path.display())]
    UnknownModelFormat { path: PathBuf, message: String },
}
