//! SentencePiece-BPE encoding as llama.cpp's "llama" (SPM) tokenizer does
//! it: start from single characters and repeatedly merge the adjacent pair
//! whose concatenation is the vocabulary entry with the highest score (ties:
//! leftmost pair first); characters that end up as no token become their
//! UTF-8 bytes' `<0xNN>` tokens.
//!
//! Why not `tokenizers`' BPE model with merges derived from the scores (as
//! Hugging Face's SentencePiece converter does)? That model gives every
//! merge rule its own rank, so two rules producing the same token (e.g.
//! "a"+"aa" and "aa"+"a") are ordered by rank instead of by position, and
//! an unknown character is split into byte tokens before merging instead
//! of after. Both can change the output relative to llama.cpp; it also has
//! to build ~500k merge rules for Gemma's vocabulary. Implementing the
//! algorithm itself is exact by construction and needs only the vocabulary.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use crate::vocab::Vocab;
use crate::TokenizerError;

/// Scores and fallbacks for SentencePiece-BPE.
#[derive(Clone, Debug)]
pub(crate) struct SpmModel {
    /// Per-token merge priority (higher merges first).
    scores: Vec<f32>,
    /// `<0xNN>` token for each byte, if the vocabulary has it.
    byte_ids: [Option<u32>; 256],
    unk: Option<u32>,
    /// Prepend a space to text that follows the start or a special token.
    pub(crate) add_space_prefix: bool,
    path: PathBuf,
}

const NONE: usize = usize::MAX;

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

#[derive(Clone, Copy, Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text: if either side has changed since
    /// this entry was queued, the lengths no longer add up and it is stale.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SpmModel {
    pub(crate) fn new(
        scores: Vec<f32>,
        byte_ids: [Option<u32>; 256],
        unk: Option<u32>,
        add_space_prefix: bool,
        path: &Path,
    ) -> SpmModel {
        SpmModel {
            scores,
            byte_ids,
            unk,
            add_space_prefix,
            path: path.to_path_buf(),
        }
    }

    fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// Tokenizes one fragment of ordinary text (no special tokens inside).
    /// Spaces must already be escaped to U+2581.
    pub(crate) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
        for (start, ch) in text.char_indices() {
            let index = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: if index == 0 { NONE } else { index - 1 },
                next: index + 1,
            });
        }
        let Some(last) = symbols.last_mut() else {
            return Ok(());
        };
        last.next = NONE;

        let mut queue = BinaryHeap::with_capacity(symbols.len());
        for left in 1..symbols.len() {
            self.push_bigram(vocab, text, &symbols, left - 1, left, &mut queue);
        }

        while let Some(bigram) = queue.pop() {
            let (l, r) = (symbols[bigram.left], symbols[bigram.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != bigram.size {
                continue;
            }
            // Merge the right symbol into the left one and unlink it.
            symbols[bigram.left].len += r.len;
            symbols[bigram.right].len = 0;
            symbols[bigram.left].next = r.next;
            if r.next != NONE {
                symbols[r.next].prev = bigram.left;
            }
            self.push_bigram(vocab, text, &symbols, l.prev, bigram.left, &mut queue);
            self.push_bigram(vocab, text, &symbols, bigram.left, r.next, &mut queue);
        }

        let mut i = 0;
        while i != NONE {
            let s = symbols[i];
            let piece = text.get(s.start..s.start + s.len).unwrap_or("");
            match vocab.lookup(piece) {
                Some(id) => out.push(id),
                // Only single characters can fail the lookup: merges only
                // ever form vocabulary entries.
                None => self.push_bytes(piece, out)?,
            }
            i = s.next;
        }
        Ok(())
    }

    fn push_bigram(
        &self,
        vocab: &Vocab,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        if left == NONE || right == NONE {
            return;
        }
        let start = symbols[left].start;
        let size = symbols[left].len + symbols[right].len;
        let Some(merged) = text.get(start..start + size) else {
            return;
        };
        if let Some(id) = vocab.lookup(merged) {
            queue.push(Bigram {
                score: self.score(id),
                left,
                right,
                size,
            });
        }
    }

    fn push_bytes(&self, piece: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        for &byte in piece.as_bytes() {
            match self.byte_ids[usize::from(byte)].or(self.unk) {
                Some(id) => out.push(id),
                None => {
                    return Err(TokenizerError::NoByteToken {
                        path: self.path.clone(),
                        byte,
                    })
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::{TokenKind, VocabBuilder};

    fn model(tokens: &[(&str, f32)]) -> (Vocab, SpmModel) {
        let mut b = VocabBuilder::default();
        let mut scores = Vec::new();
        let mut byte_ids = [None; 256];
        for &(t, s) in tokens {
            let kind = if t.starts_with("<0x") {
                TokenKind::Byte
            } else {
                TokenKind::Normal
            };
            if kind == TokenKind::Byte {
                let byte = u8::from_str_radix(&t[3..5], 16).unwrap();
                byte_ids[byte as usize] = Some(b.len() as u32);
            }
            b.push(t, kind, t.as_bytes());
            scores.push(s);
        }
        let m = SpmModel::new(scores, byte_ids, None, false, Path::new("test"));
        (b.finish(), m)
    }

    fn enc(v: &Vocab, m: &SpmModel, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        m.encode(v, text, &mut out)?;
        Ok(out)
    }

    #[test]
    fn merges_by_score_not_by_position() {
        // "bc" outscores "ab", so "abc" becomes a + bc even though ab is left.
        let (v, m) = model(&[("a", 0.), ("b", 0.), ("c", 0.), ("ab", 1.), ("bc", 2.)]);
        assert_eq!(enc(&v, &m, "abc").unwrap(), vec![0, 4]);
    }

    #[test]
    fn equal_scores_merge_leftmost_first() {
        let (v, m) = model(&[("a", 0.), ("aa", 1.)]);
        assert_eq!(enc(&v, &m, "aaa").unwrap(), vec![1, 0]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let (v, m) = model(&[("a", 0.), ("<0xC3>", 0.), ("<0xA9>", 0.)]);
        assert_eq!(enc(&v, &m, "aé").unwrap(), vec![0, 1, 2]);
        let err = enc(&v, &m, "z").unwrap_err();
        assert!(err.to_string().contains("0x7A"), "{err}");
    }

    #[test]
    fn empty_text_gives_no_tokens() {
        let (v, m) = model(&[("a", 0.)]);
        assert!(enc(&v, &m, "").unwrap().is_empty());
    }
}
