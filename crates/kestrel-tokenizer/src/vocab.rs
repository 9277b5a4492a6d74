//! The vocabulary as kestrel sees it, whatever file it came from: each
//! token's stored text, its kind, and the bytes it contributes to decoded
//! text (its "piece"). Decoding is a concatenation of pieces, which is what
//! makes the streaming decoder exact and cheap.
//!
//! Texts and pieces are packed into one buffer each (262k tokens would
//! otherwise be 524k small allocations), and text lookup uses an
//! open-addressing table of ids so the texts are stored only once.

/// What a token is, following llama.cpp's token types (GGUF
/// `tokenizer.ggml.token_type`); Hugging Face added tokens map to
/// `Control` (special) or `UserDefined` (not special).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// Ordinary vocabulary entry.
    Normal,
    /// The unknown token (`<unk>`).
    Unknown,
    /// Control token (`<bos>`, `<start_of_turn>`, ...): recognised in input
    /// text, left out of `decode`.
    Control,
    /// User-defined token (e.g. Gemma's whitespace runs and HTML tags):
    /// recognised in input text before normal tokenization, decoded verbatim.
    UserDefined,
    /// Reserved, never produced or printed.
    Unused,
    /// Byte-fallback token `<0xNN>`: decodes to the single byte NN.
    Byte,
    /// A token type value the file does not define; never printed.
    Undefined,
}

impl TokenKind {
    /// Maps a GGUF `token_type` value (llama.cpp's enum).
    pub(crate) fn from_gguf(value: i64) -> TokenKind {
        match value {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Undefined,
        }
    }

    /// Whether text matching this token is cut out of the input before the
    /// model-specific tokenization runs (llama.cpp's special-token cache:
    /// control, user-defined and unknown tokens).
    pub(crate) fn is_matched_in_text(self) -> bool {
        matches!(
            self,
            TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
        )
    }

    /// Whether this token's piece appears in decoded text.
    pub(crate) fn is_printed(self, with_special: bool) -> bool {
        match self {
            TokenKind::Normal | TokenKind::UserDefined | TokenKind::Byte => true,
            TokenKind::Control | TokenKind::Unknown => with_special,
            TokenKind::Unused | TokenKind::Undefined => false,
        }
    }
}

/// The byte of a byte-fallback token's text, `<0xNN>` (two hex digits).
pub(crate) fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Token texts, kinds and pieces, plus text-to-id lookup.
#[derive(Clone, Debug)]
pub(crate) struct Vocab {
    texts: String,
    text_ends: Vec<usize>,
    pieces: Vec<u8>,
    piece_ends: Vec<usize>,
    kinds: Vec<TokenKind>,
    index: TextIndex,
}

/// Accumulates tokens in id order; `finish` builds the lookup table.
#[derive(Default)]
pub(crate) struct VocabBuilder {
    texts: String,
    text_ends: Vec<usize>,
    pieces: Vec<u8>,
    piece_ends: Vec<usize>,
    kinds: Vec<TokenKind>,
}

impl VocabBuilder {
    pub(crate) fn with_capacity(tokens: usize, text_bytes: usize) -> Self {
        VocabBuilder {
            texts: String::with_capacity(text_bytes),
            text_ends: Vec::with_capacity(tokens),
            pieces: Vec::with_capacity(text_bytes),
            piece_ends: Vec::with_capacity(tokens),
            kinds: Vec::with_capacity(tokens),
        }
    }

    /// Appends the next token (its id is the number pushed before it).
    pub(crate) fn push(&mut self, text: &str, kind: TokenKind, piece: &[u8]) {
        self.texts.push_str(text);
        self.text_ends.push(self.texts.len());
        self.pieces.extend_from_slice(piece);
        self.piece_ends.push(self.pieces.len());
        self.kinds.push(kind);
    }

    /// Appends a token whose piece is produced by `write_piece` straight into
    /// the packed buffer (avoids a temporary per token).
    pub(crate) fn push_with(&mut self, text: &str, kind: TokenKind, write_piece: impl FnOnce(&mut Vec<u8>)) {
        self.texts.push_str(text);
        self.text_ends.push(self.texts.len());
        write_piece(&mut self.pieces);
        self.piece_ends.push(self.pieces.len());
        self.kinds.push(kind);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.kinds.len()
    }

    pub(crate) fn finish(self) -> Vocab {
        let mut vocab = Vocab {
            texts: self.texts,
            text_ends: self.text_ends,
            pieces: self.pieces,
            piece_ends: self.piece_ends,
            kinds: self.kinds,
            index: TextIndex::default(),
        };
        vocab.index = TextIndex::build(&vocab);
        vocab
    }
}

impl Vocab {
    pub(crate) fn len(&self) -> usize {
        self.kinds.len()
    }

    fn range(ends: &[usize], id: u32) -> Option<(usize, usize)> {
        let i = usize::try_from(id).ok()?;
        let end = *ends.get(i)?;
        let start = if i == 0 { 0 } else { ends[i - 1] };
        Some((start, end))
    }

    /// The token's text as stored in the file (e.g. "▁the", "<0x0A>").
    pub(crate) fn text(&self, id: u32) -> Option<&str> {
        let (start, end) = Self::range(&self.text_ends, id)?;
        self.texts.get(start..end)
    }

    /// The bytes this token contributes to decoded text.
    pub(crate) fn piece(&self, id: u32) -> Option<&[u8]> {
        let (start, end) = Self::range(&self.piece_ends, id)?;
        self.pieces.get(start..end)
    }

    pub(crate) fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(usize::try_from(id).ok()?).copied()
    }

    /// Changes a token's kind (used to promote end-of-turn tokens that a
    /// converter left as normal to control, as llama.cpp does).
    pub(crate) fn set_kind(&mut self, id: u32, kind: TokenKind) {
        if let Some(slot) = usize::try_from(id).ok().and_then(|i| self.kinds.get_mut(i)) {
            *slot = kind;
        }
    }

    /// The id whose text is exactly `text`; with duplicate texts, the
    /// highest id wins (as in llama.cpp's token_to_id map).
    pub(crate) fn lookup(&self, text: &str) -> Option<u32> {
        self.index.get(self, text.as_bytes())
    }

    /// Ids and texts of tokens matched verbatim in input text. With
    /// `parse_special` false, only user-defined tokens (llama.cpp skips
    /// control and unknown tokens then).
    pub(crate) fn matched_in_text(&self, parse_special: bool) -> impl Iterator<Item = (u32, &str)> + '_ {
        (0..self.len() as u32).filter_map(move |id| {
            let kind = self.kind(id)?;
            let text = self.text(id)?;
            let matched = if parse_special {
                kind.is_matched_in_text()
            } else {
                kind == TokenKind::UserDefined
            };
            (matched && !text.is_empty()).then_some((id, text))
        })
    }
}

/// Open-addressing hash table from token text to id. Slots hold ids only;
/// keys are compared against the vocabulary's packed texts. Probe lengths
/// depend only on the vocabulary, never on the text being looked up.
#[derive(Clone, Debug, Default)]
struct TextIndex {
    slots: Vec<u32>,
    mask: usize,
}

const EMPTY: u32 = u32::MAX;

/// A fast non-cryptographic hash (FNV-style over 8-byte words, with a final
/// avalanche); lookups are bounded by the table's own clustering, so
/// adversarial input cannot slow them down.
fn hash_bytes(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325 ^ (bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(w)).wrapping_mul(K).rotate_left(29);
    }
    h ^= h >> 32;
    h = h.wrapping_mul(K);
    h ^ (h >> 29)
}

impl TextIndex {
    fn build(vocab: &Vocab) -> TextIndex {
        // Load factor at most 1/2 keeps linear-probe chains short.
        let capacity = (vocab.len().max(1) * 2).next_power_of_two();
        let mut index = TextIndex {
            slots: vec![EMPTY; capacity],
            mask: capacity - 1,
        };
        for id in 0..vocab.len() as u32 {
            let Some(text) = vocab.text(id) else { continue };
            let mut slot = (hash_bytes(text.as_bytes()) as usize) & index.mask;
            loop {
                let current = index.slots[slot];
                if current == EMPTY {
                    index.slots[slot] = id;
                    break;
                }
                if vocab.text(current) == Some(text) {
                    // Later ids override earlier ones with the same text.
                    index.slots[slot] = id;
                    break;
                }
                slot = (slot + 1) & index.mask;
            }
        }
        index
    }

    fn get(&self, vocab: &Vocab, key: &[u8]) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mut slot = (hash_bytes(key) as usize) & self.mask;
        loop {
            let id = self.slots[slot];
            if id == EMPTY {
                return None;
            }
            if vocab.text(id).map(str::as_bytes) == Some(key) {
                return Some(id);
            }
            slot = (slot + 1) & self.mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Vocab {
        let mut b = VocabBuilder::default();
        b.push("<unk>", TokenKind::Unknown, b"<unk>");
        b.push("▁a", TokenKind::Normal, b" a");
        b.push("<0x41>", TokenKind::Byte, b"A");
        b.push("dup", TokenKind::Normal, b"dup");
        b.push("dup", TokenKind::Normal, b"dup");
        b.finish()
    }

    #[test]
    fn byte_tokens_parse_only_in_canonical_form() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(0x0A));
        assert_eq!(parse_byte_token("<0xff>"), Some(0xFF));
        assert_eq!(parse_byte_token("<0x0A"), None);
        assert_eq!(parse_byte_token("<0x0AB>"), None);
        assert_eq!(parse_byte_token("0x0A"), None);
    }

    #[test]
    fn lookup_finds_every_text_and_prefers_the_last_duplicate() {
        let v = small();
        assert_eq!(v.lookup("<unk>"), Some(0));
        assert_eq!(v.lookup("▁a"), Some(1));
        assert_eq!(v.lookup("<0x41>"), Some(2));
        assert_eq!(v.lookup("dup"), Some(4));
        assert_eq!(v.lookup("missing"), None);
        assert_eq!(v.lookup(""), None);
    }

    #[test]
    fn texts_pieces_and_kinds_are_per_id() {
        let v = small();
        assert_eq!(v.len(), 5);
        assert_eq!(v.text(1), Some("▁a"));
        assert_eq!(v.piece(1), Some(&b" a"[..]));
        assert_eq!(v.piece(2), Some(&b"A"[..]));
        assert_eq!(v.kind(0), Some(TokenKind::Unknown));
        assert_eq!(v.text(5), None);
        assert_eq!(v.piece(u32::MAX), None);
        let matched: Vec<u32> = v.matched_in_text(true).map(|(id, _)| id).collect();
        assert_eq!(matched, vec![0]);
    }
}
