//! The one error type of this crate. Messages name the file, key or token
//! involved and what was expected, so a user can act without a debugger.

use std::path::PathBuf;

use kestrel_formats::FormatError;

/// Everything that can go wrong while loading a tokenizer, encoding,
/// decoding or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF reader reported a problem (missing key, wrong type, ...).
    #[error(transparent)]
    Format(#[from] FormatError),

    /// `tokenizer.ggml.model` names a tokenizer kestrel does not implement.
    #[error(
        "{}: tokenizer model '{model}' (tokenizer.ggml.model) is not supported; \
         expected \"llama\" (SentencePiece) or \"gpt2\" (byte-level BPE)",
        path.display()
    )]
    UnsupportedModel { path: PathBuf, model: String },

    /// `tokenizer.ggml.pre` names a pre-tokenizer kestrel does not implement.
    #[error(
        "{}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported for a gpt2 \
         vocabulary; supported: {supported}",
        path.display()
    )]
    UnsupportedPreTokenizer {
        path: PathBuf,
        pre: String,
        supported: &'static str,
    },

    /// A GGUF tokenizer key is present but its content is unusable.
    #[error("{}: metadata key '{key}': {message}", path.display())]
    BadMetadata {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// A Hugging Face model directory has no tokenizer.json.
    #[error(
        "{}: not found; a Hugging Face model directory needs a tokenizer.json \
         (tokenizer.model-only SentencePiece directories are not supported)",
        path.display()
    )]
    MissingTokenizerJson { path: PathBuf },

    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file could not be parsed, or holds a field of the wrong shape.
    #[error("{}: {message}", path.display())]
    Json { path: PathBuf, message: String },

    /// The `tokenizers` library rejected a tokenizer.json or our construction.
    #[error("{}: building the tokenizer failed: {message}", path.display())]
    Build { path: PathBuf, message: String },

    /// tokenizer.json uses a decoder whose output cannot be expressed as
    /// per-token bytes (needed for exact streaming).
    #[error(
        "{}: unsupported decoder in tokenizer.json: {what} \
         (supported: ByteLevel, Metaspace, Replace/ByteFallback/Fuse/Strip sequences)",
        path.display()
    )]
    UnsupportedDecoder { path: PathBuf, what: String },

    /// A token id passed to decode/stream is outside the vocabulary.
    #[error("token id {id} is out of range (the vocabulary has {vocab_size} tokens)")]
    InvalidTokenId { id: u32, vocab_size: usize },

    /// Input text needs a byte-fallback token the vocabulary lacks.
    #[error(
        "{}: the text contains byte 0x{byte:02X}, which has no <0x{byte:02X}> token \
         and the vocabulary has no unknown token to stand in for it",
        path.display()
    )]
    NoByteToken { path: PathBuf, byte: u8 },

    /// The `tokenizers` library failed while encoding.
    #[error("encoding failed: {message}")]
    Encode { message: String },

    /// The chat template is missing, does not compile, or failed to render.
    #[error("chat template ({origin}): {message}")]
    ChatTemplate { origin: String, message: String },
}
