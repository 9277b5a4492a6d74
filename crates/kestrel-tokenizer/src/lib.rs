//! Tokenizers for kestrel: built from GGUF metadata (SentencePiece "llama"
//! and byte-level "gpt2" vocabularies, encoding identically to llama.cpp)
//! or from a Hugging Face tokenizer.json; exact streaming detokenization;
//! chat templates (the model's Jinja template via minijinja, or built-in
//! Gemma / Llama 3 / ChatML formats).
//!
//! ```no_run
//! use kestrel_tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let gguf = kestrel_formats::GgufFile::open("model.gguf")?;
//! let tok = Tokenizer::from_gguf(&gguf)?;
//! let prompt = tok.apply_chat_template(&[ChatMessage::user("Hi")], true)?;
//! let ids = tok.encode_chat_prompt(&prompt)?;
//! let mut stream = StreamDecoder::continuation(&tok);
//! for id in ids {
//!     print!("{}", stream.push(id)?);
//! }
//! # Ok(()) }
//! ```

mod byte_level;
mod chat;
mod error;
mod gguf;
mod hf;
mod special;
mod spm;
mod stream;
mod tokenizer;
mod vocab;

pub use chat::{ChatMessage, ChatTemplateSource};
pub use error::TokenizerError;
pub use stream::{StreamDecoder, StreamState};
pub use tokenizer::Tokenizer;
pub use vocab::TokenKind;
