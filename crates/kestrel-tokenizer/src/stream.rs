//! Streaming detokenization: token ids in, finished text out.
//!
//! Decoding is a concatenation of per-token byte pieces read as UTF-8
//! (see `Tokenizer::decode`), so a stream only has to hold back the bytes of
//! a character that is not complete yet (at most 3). Each push costs time
//! proportional to its own piece; there is no window of earlier tokens to
//! re-decode, and creating a decoder allocates nothing.
//!
//! Invalid byte sequences become U+FFFD at exactly the points where
//! `String::from_utf8_lossy` would put them for the whole byte string, so
//! the concatenated output always equals `decode` of the same ids.

use crate::tokenizer::{strip_first_space, Tokenizer};
use crate::TokenizerError;

/// Detokenizer state without a borrow of the tokenizer, for callers that
/// keep it next to an `Arc<Tokenizer>`; `StreamDecoder` wraps it.
#[derive(Clone, Debug, Default)]
pub struct StreamState {
    /// Bytes of an unfinished UTF-8 sequence.
    pending: Vec<u8>,
    /// Drop one leading space from the next printed piece.
    strip: bool,
    with_special: bool,
}

impl StreamState {
    /// A state that decodes exactly like `tok.decode` (including dropping
    /// the first leading space for tokenizers that do).
    pub fn new(tok: &Tokenizer) -> StreamState {
        StreamState {
            pending: Vec::new(),
            strip: tok.strip_leading_space,
            with_special: false,
        }
    }

    /// A state for text that continues earlier output (generated tokens
    /// after a prompt): never drops a leading space.
    pub fn continuation() -> StreamState {
        StreamState::default()
    }

    /// Show control tokens as their text (like `decode_with_special`).
    pub fn set_with_special(&mut self, with_special: bool) {
        self.with_special = with_special;
    }

    /// Adds one token; returns the text that became final.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        let Some(piece) = tok.printed_piece(id, self.with_special)? else {
            return Ok(String::new());
        };
        let piece = strip_first_space(piece, &mut self.strip);
        if self.pending.is_empty() {
            // Common case: nothing held back, and the piece is complete.
            if let Ok(text) = std::str::from_utf8(piece) {
                return Ok(text.to_owned());
            }
        }
        self.pending.extend_from_slice(piece);
        Ok(self.take_complete())
    }

    /// Emits the complete prefix of `pending`, replacing each invalid
    /// sequence with U+FFFD; keeps a trailing unfinished character.
    fn take_complete(&mut self) -> String {
        let mut out = String::with_capacity(self.pending.len());
        let mut start = 0;
        while start < self.pending.len() {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.pending.len();
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    if let Ok(text) = std::str::from_utf8(&self.pending[start..valid_end]) {
                        out.push_str(text);
                    }
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + bad;
                        }
                        None => {
                            // Unfinished character at the end: wait.
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: held-back bytes of an unfinished character come out
    /// as U+FFFD (as `decode` shows them at the end of a sequence).
    pub fn flush(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an unfinished character are held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

/// Streaming detokenizer borrowing its tokenizer.
///
/// ```no_run
/// # fn demo(tok: &kestrel_tokenizer::Tokenizer, ids: &[u32]) -> Result<(), kestrel_tokenizer::TokenizerError> {
/// let mut stream = kestrel_tokenizer::StreamDecoder::new(tok);
/// for &id in ids {
///     print!("{}", stream.push(id)?);
/// }
/// print!("{}", stream.flush());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    state: StreamState,
}

impl<'a> StreamDecoder<'a> {
    /// Output concatenates to exactly `tok.decode(ids)`.
    pub fn new(tok: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            state: StreamState::new(tok),
        }
    }

    /// For generated text following a prompt: never drops a leading space
    /// (matters only for SentencePiece models with `add_space_prefix`).
    pub fn continuation(tok: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tok,
            state: StreamState::continuation(),
        }
    }

    /// Show control tokens as their text.
    pub fn with_special(mut self, with_special: bool) -> StreamDecoder<'a> {
        self.state.set_with_special(with_special);
        self
    }

    /// Adds one token; returns the text that became final (possibly "").
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.state.push(self.tok, id)
    }

    /// Ends the stream, returning any held-back bytes as U+FFFD.
    pub fn flush(&mut self) -> String {
        self.state.flush()
    }

    pub fn has_pending(&self) -> bool {
        self.state.has_pending()
    }
}
