//! The `Tokenizer`: encoding with the model's own algorithm, decoding by
//! concatenating per-token pieces, special ids and the chat template.

use std::path::{Path, PathBuf};

use kestrel_formats::GgufFile;

use crate::chat::{ChatMessage, ChatTemplate, ChatTemplateSource};
use crate::special::{Fragment, SpecialMatcher};
use crate::spm::SpmModel;
use crate::vocab::{TokenKind, Vocab};
use crate::TokenizerError;

/// How text becomes ids.
pub(crate) enum Encoder {
    /// GGUF "llama" vocabulary: llama.cpp's special-token partition, then
    /// SentencePiece-BPE by score on each text fragment.
    Spm {
        /// Boxed: the byte-fallback table makes it large.
        model: Box<SpmModel>,
        specials: SpecialMatcher,
        /// User-defined tokens only (matched when special parsing is off).
        user_defined: SpecialMatcher,
    },
    /// GGUF "gpt2" vocabulary: llama.cpp's special-token partition, then
    /// byte-level BPE (with the pre-tokenizer regex named by
    /// `tokenizer.ggml.pre`) by the `tokenizers` crate.
    GgufBpe {
        bpe: Box<tokenizers::Tokenizer>,
        specials: SpecialMatcher,
        /// User-defined tokens only (matched when special parsing is off).
        user_defined: SpecialMatcher,
    },
    /// tokenizer.json, run by the `tokenizers` crate as Hugging Face does.
    Hf(Box<tokenizers::Tokenizer>),
}

/// A model's tokenizer: vocabulary, encoder, special ids, chat template.
/// Cheap to share (`&Tokenizer` or `Arc<Tokenizer>`); it is `Send + Sync`.
pub struct Tokenizer {
    pub(crate) vocab: Vocab,
    pub(crate) encoder: Encoder,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    /// Every id that ends generation; `eos` first when present.
    pub(crate) eog: Vec<u32>,
    pub(crate) add_bos: bool,
    /// Decoding drops one leading space from the first printed token
    /// (SentencePiece models that prepend a space when encoding).
    pub(crate) strip_leading_space: bool,
    pub(crate) chat: ChatTemplate,
    /// The file or directory this came from, for messages.
    pub(crate) origin: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.encoder {
            Encoder::Spm { .. } => "gguf-spm",
            Encoder::GgufBpe { .. } => "gguf-bpe",
            Encoder::Hf(_) => "tokenizer.json",
        };
        f.debug_struct("Tokenizer")
            .field("origin", &self.origin)
            .field("kind", &kind)
            .field("vocab_size", &self.vocab.len())
            .field("bos", &self.bos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.chat.source())
            .finish()
    }
}

/// Token texts that end a turn in common chat formats. As in llama.cpp,
/// such tokens end generation even when the file does not list them, and
/// are treated as control tokens (hidden from `decode`).
pub(crate) const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
    "<|return|>",
    "<|call|>",
];

impl Tokenizer {
    /// Builds the tokenizer stored in a GGUF file's metadata
    /// (`tokenizer.ggml.model` "llama" = SentencePiece, "gpt2" = byte-level
    /// BPE).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        crate::gguf::load(gguf)
    }

    /// Loads `dir/tokenizer.json`, with `tokenizer_config.json` (chat
    /// template, bos/eos, add_bos_token), `generation_config.json` and
    /// `config.json` (extra end-of-sequence ids) when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        crate::hf::load(dir)
    }

    /// Encodes `text`. Special-token text inside it (e.g.
    /// `<start_of_turn>`) becomes that token, as in llama.cpp. With
    /// `add_bos`, the BOS id is prepended (if the model has one).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, add_bos, true)
    }

    /// Encodes `text` with control-token text left as plain text (as
    /// llama.cpp does with `parse_special` off, e.g. in llama-perplexity):
    /// for scoring documents that merely mention `<start_of_turn>`.
    /// User-defined tokens are still matched. (tokenizer.json vocabularies
    /// always match their added tokens.)
    pub fn encode_text(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with(text, add_bos, false)
    }

    fn encode_with(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.extend(self.bos);
        }
        match &self.encoder {
            Encoder::Spm {
                model,
                specials,
                user_defined,
            } => {
                let specials = if parse_special { specials } else { user_defined };
                // llama.cpp prefixes a space to text at the start and after
                // each special token, when the model asks for it.
                let mut after_special = true;
                let mut escaped = String::new();
                for fragment in specials.split(text) {
                    match fragment {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(t) => {
                            escaped.clear();
                            if model.add_space_prefix && after_special {
                                escaped.push('\u{2581}');
                            }
                            for c in t.chars() {
                                escaped.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            model.encode(&self.vocab, &escaped, &mut out)?;
                            after_special = false;
                        }
                    }
                }
            }
            Encoder::GgufBpe {
                bpe,
                specials,
                user_defined,
            } => {
                let specials = if parse_special { specials } else { user_defined };
                for fragment in specials.split(text) {
                    match fragment {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(t) => {
                            let enc = bpe.encode_fast(t, false).map_err(encode_error)?;
                            out.extend_from_slice(enc.get_ids());
                        }
                    }
                }
            }
            Encoder::Hf(tok) => {
                let enc = tok.encode_fast(text, false).map_err(encode_error)?;
                out.extend_from_slice(enc.get_ids());
            }
        }
        Ok(out)
    }

    /// Encodes a rendered chat prompt: like `encode` with the model's BOS
    /// default, except that no BOS is added when the text already starts
    /// with the BOS token's text (templates usually emit it themselves).
    pub fn encode_chat_prompt(&self, rendered: &str) -> Result<Vec<u32>, TokenizerError> {
        let starts_with_bos = self
            .bos
            .and_then(|b| self.vocab.text(b))
            .is_some_and(|t| !t.is_empty() && rendered.starts_with(t));
        self.encode(rendered, self.add_bos && !starts_with_bos)
    }

    /// Decodes ids to text: the pieces of normal, user-defined and byte
    /// tokens, concatenated as bytes (so byte-fallback tokens combine into
    /// characters) and read as UTF-8, each invalid sequence becoming
    /// U+FFFD. Control tokens (BOS, EOS, `<start_of_turn>`, ...) are left
    /// out; see `decode_with_special`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_impl(ids, false)
    }

    /// Like `decode`, but control and unknown tokens appear as their text.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.decode_impl(ids, true)
    }

    fn decode_impl(&self, ids: &[u32], with_special: bool) -> Result<String, TokenizerError> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip = self.strip_leading_space;
        for &id in ids {
            if let Some(piece) = self.printed_piece(id, with_special)? {
                bytes.extend_from_slice(strip_first_space(piece, &mut strip));
            }
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The bytes `id` adds to decoded text, or None if it prints nothing.
    pub(crate) fn printed_piece(&self, id: u32, with_special: bool) -> Result<Option<&[u8]>, TokenizerError> {
        let (Some(kind), Some(piece)) = (self.vocab.kind(id), self.vocab.piece(id)) else {
            return Err(TokenizerError::InvalidTokenId {
                id,
                vocab_size: self.vocab.len(),
            });
        };
        Ok(kind.is_printed(with_special).then_some(piece))
    }

    /// The token as text, as llama.cpp prints it with specials shown:
    /// "▁the" gives " the", "<0x0A>" gives "\n", `<bos>` gives "<bos>". A
    /// lone byte that is not valid UTF-8 shows as U+FFFD. None if out of
    /// range.
    pub fn token_text(&self, id: u32) -> Option<String> {
        let kind = self.vocab.kind(id)?;
        if !kind.is_printed(true) {
            return Some(String::new());
        }
        Some(String::from_utf8_lossy(self.vocab.piece(id)?).into_owned())
    }

    /// The exact bytes the token contributes to decoded text (empty for
    /// unused tokens), with control tokens as their text.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let kind = self.vocab.kind(id)?;
        if kind.is_printed(true) {
            self.vocab.piece(id)
        } else {
            Some(&[])
        }
    }

    /// The token's text exactly as stored in the vocabulary ("▁the",
    /// "<0x0A>", "Ġthe").
    pub fn token_raw(&self, id: u32) -> Option<&str> {
        self.vocab.text(id)
    }

    /// The id whose stored text is exactly `text` (e.g. "<end_of_turn>").
    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.vocab.lookup(text)
    }

    /// Whether the token is a control token (hidden by `decode`).
    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.vocab.kind(id), Some(TokenKind::Control | TokenKind::Unknown))
    }

    /// The token's kind, None if out of range.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.vocab.kind(id)
    }

    /// Number of token ids (including added/special tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The model's declared end-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// All ids that end generation: EOS plus end-of-turn tokens such as
    /// Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`, Qwen's `<|im_end|>`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Whether prompts should start with BOS by default.
    pub fn add_bos_default(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Renders a conversation with the model's chat template (or the
    /// built-in format for its family). The result usually starts with the
    /// BOS text: encode it with `encode_chat_prompt` to avoid a double BOS.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let text = |id: Option<u32>| id.and_then(|i| self.vocab.text(i)).unwrap_or("");
        self.chat
            .render(messages, add_generation_prompt, text(self.bos), text(self.eos))
    }

    pub fn chat_template_source(&self) -> ChatTemplateSource {
        self.chat.source()
    }

    /// The Jinja source of the model's own template, if it has one.
    pub fn chat_template_jinja(&self) -> Option<&str> {
        self.chat.jinja_source()
    }

    /// The file or directory the tokenizer was loaded from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }
}

/// Drops one leading space from the first printed piece when `strip` is
/// set, and clears `strip` once any piece has been printed.
pub(crate) fn strip_first_space<'p>(piece: &'p [u8], strip: &mut bool) -> &'p [u8] {
    if std::mem::take(strip) {
        piece.strip_prefix(b" ").unwrap_or(piece)
    } else {
        piece
    }
}

fn encode_error(e: tokenizers::Error) -> TokenizerError {
    TokenizerError::Encode {
        message: e.to_string(),
    }
}

/// Collects end-of-generation ids: the declared ones first, then any
/// end-of-turn token the vocabulary has, deduplicated. End-of-turn tokens
/// are made control tokens.
pub(crate) fn end_of_generation_ids(vocab: &mut Vocab, declared: &[Option<u32>]) -> Vec<u32> {
    let mut eog: Vec<u32> = Vec::new();
    for id in declared.iter().flatten() {
        if !eog.contains(id) {
            eog.push(*id);
        }
    }
    for text in END_OF_TURN_TEXTS {
        if let Some(id) = vocab.lookup(text) {
            if vocab.kind(id) != Some(TokenKind::Control) {
                vocab.set_kind(id, TokenKind::Control);
            }
            if !eog.contains(&id) {
                eog.push(id);
            }
        }
    }
    eog
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_and_stream_state_can_be_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Tokenizer>();
        shared::<crate::StreamState>();
        shared::<crate::StreamDecoder<'static>>();
    }

    #[test]
    fn first_space_is_stripped_once() {
        let mut strip = true;
        assert_eq!(strip_first_space(b" a", &mut strip), b"a");
        assert_eq!(strip_first_space(b" b", &mut strip), b" b");
        let mut strip = true;
        assert_eq!(strip_first_space(b"c ", &mut strip), b"c ");
        assert!(!strip);
    }
}
