//! Building a tokenizer from GGUF metadata (`tokenizer.ggml.*`), following
//! llama.cpp's reading of those keys.

use std::borrow::Cow;

use kestrel_formats::{GgufFile, MetaValue};
use tokenizers::models::bpe::{BpeBuilder, Vocab as BpeVocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::byte_level::ByteDecoder;
use crate::chat::{BuiltIn, ChatTemplate};
use crate::special::SpecialMatcher;
use crate::spm::SpmModel;
use crate::tokenizer::{end_of_generation_ids, Encoder, Tokenizer};
use crate::vocab::{parse_byte_token, TokenKind, Vocab, VocabBuilder};
use crate::TokenizerError;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_EOT: &str = "tokenizer.ggml.eot_token_id";
const KEY_EOM: &str = "tokenizer.ggml.eom_token_id";
const KEY_UNK: &str = "tokenizer.ggml.unknown_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_ARCH: &str = "general.architecture";

pub(crate) fn load(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let model = gguf.get_str(KEY_MODEL)?;
    match model {
        "llama" => load_spm(gguf),
        "gpt2" => load_bpe(gguf),
        other => Err(TokenizerError::UnsupportedModel {
            path: gguf.path().to_path_buf(),
            model: other.to_owned(),
        }),
    }
}

fn bad(gguf: &GgufFile, key: &str, message: String) -> TokenizerError {
    TokenizerError::BadMetadata {
        path: gguf.path().to_path_buf(),
        key: key.to_owned(),
        message,
    }
}

fn array<'g>(gguf: &'g GgufFile, key: &str) -> Result<Option<&'g [MetaValue]>, TokenizerError> {
    match gguf.meta(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| bad(gguf, key, format!("should be an array but is {}", v.type_name()))),
    }
}

/// An optional per-token array: absent, or exactly one element per token.
fn per_token<'g>(
    gguf: &'g GgufFile,
    key: &str,
    n_tokens: usize,
) -> Result<Option<&'g [MetaValue]>, TokenizerError> {
    let Some(values) = array(gguf, key)? else {
        return Ok(None);
    };
    if values.len() != n_tokens {
        return Err(bad(
            gguf,
            key,
            format!("has {} entries but {KEY_TOKENS} has {n_tokens}", values.len()),
        ));
    }
    Ok(Some(values))
}

fn strings<'g>(gguf: &'g GgufFile, key: &str) -> Result<Option<Vec<&'g str>>, TokenizerError> {
    let Some(values) = array(gguf, key)? else {
        return Ok(None);
    };
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().ok_or_else(|| {
                bad(
                    gguf,
                    key,
                    format!("element {i} should be a string but is {}", v.type_name()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn token_texts(gguf: &GgufFile) -> Result<Vec<&str>, TokenizerError> {
    let tokens = strings(gguf, KEY_TOKENS)?
        .ok_or_else(|| bad(gguf, KEY_TOKENS, "missing: the file has no vocabulary".into()))?;
    if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
        return Err(bad(
            gguf,
            KEY_TOKENS,
            format!("has {} tokens; expected 1 to 2^32-1", tokens.len()),
        ));
    }
    Ok(tokens)
}

fn token_kinds(gguf: &GgufFile, n_tokens: usize) -> Result<Vec<TokenKind>, TokenizerError> {
    let Some(types) = per_token(gguf, KEY_TYPES, n_tokens)? else {
        return Ok(vec![TokenKind::Normal; n_tokens]);
    };
    types
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_i64().map(TokenKind::from_gguf).ok_or_else(|| {
                bad(
                    gguf,
                    KEY_TYPES,
                    format!("element {i} should be an integer but is {}", v.type_name()),
                )
            })
        })
        .collect()
}

/// A token-id key, checked against the vocabulary size.
fn token_id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>, TokenizerError> {
    match gguf.opt_u32(key)? {
        Some(id) if id as usize >= n_tokens => Err(bad(
            gguf,
            key,
            format!("token id {id} is outside the vocabulary of {n_tokens} tokens"),
        )),
        other => Ok(other),
    }
}

fn opt_bool(gguf: &GgufFile, key: &str) -> Result<Option<bool>, TokenizerError> {
    match gguf.meta(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(gguf, key, format!("should be a bool but is {}", v.type_name()))),
    }
}

/// llama.cpp stores empty token texts under a placeholder so that every
/// token stays addressable by text; do the same.
fn non_empty(text: &str, id: usize) -> Cow<'_, str> {
    if text.is_empty() {
        Cow::Owned(format!("[EMPTY_{id}]"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Writes a SentencePiece piece with its U+2581 word marks as spaces.
fn unescape_spaces_into(text: &str, out: &mut Vec<u8>) {
    for (i, part) in text.split('\u{2581}').enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(part.as_bytes());
    }
}

fn chat_template(gguf: &GgufFile, vocab: &Vocab) -> Result<ChatTemplate, TokenizerError> {
    if let Some(source) = gguf.opt_str(KEY_CHAT_TEMPLATE)? {
        return Ok(ChatTemplate::from_jinja(
            source.to_owned(),
            format!("{KEY_CHAT_TEMPLATE} in {}", gguf.path().display()),
        ));
    }
    let arch = gguf.opt_str(KEY_ARCH)?;
    Ok(match BuiltIn::choose(arch, vocab) {
        Some(b) => ChatTemplate::BuiltIn(b),
        None => ChatTemplate::None,
    })
}

fn load_spm(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let path = gguf.path();
    let tokens = token_texts(gguf)?;
    let n = tokens.len();
    let kinds = token_kinds(gguf, n)?;
    let scores: Vec<f32> = match per_token(gguf, KEY_SCORES, n)? {
        None => vec![0.0; n],
        Some(values) => values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    bad(
                        gguf,
                        KEY_SCORES,
                        format!("element {i} should be a number but is {}", v.type_name()),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
    };

    let text_bytes = tokens.iter().map(|t| t.len()).sum();
    let mut builder = VocabBuilder::with_capacity(n, text_bytes);
    for (i, (&raw, &kind)) in tokens.iter().zip(&kinds).enumerate() {
        let text = non_empty(raw, i);
        match kind {
            TokenKind::Normal => builder.push_with(&text, kind, |buf| unescape_spaces_into(&text, buf)),
            TokenKind::Byte => {
                let byte = parse_byte_token(&text).ok_or_else(|| {
                    bad(
                        gguf,
                        KEY_TOKENS,
                        format!("token {i} has type BYTE but its text {text:?} is not <0xNN>"),
                    )
                })?;
                builder.push(&text, kind, &[byte]);
            }
            _ => builder.push(&text, kind, text.as_bytes()),
        }
    }
    let mut vocab = builder.finish();

    // llama.cpp's defaults for SentencePiece vocabularies (original LLaMA).
    let default_id = |id: u32| ((id as usize) < n).then_some(id);
    let bos = token_id(gguf, KEY_BOS, n)?.or(default_id(1));
    let eos = token_id(gguf, KEY_EOS, n)?.or(default_id(2));
    let unk = token_id(gguf, KEY_UNK, n)?.or(default_id(0));
    let eot = token_id(gguf, KEY_EOT, n)?;
    let eom = token_id(gguf, KEY_EOM, n)?;
    let add_bos = opt_bool(gguf, KEY_ADD_BOS)?.unwrap_or(true);
    let add_space_prefix = opt_bool(gguf, KEY_ADD_SPACE_PREFIX)?.unwrap_or(true);

    // Byte fallback looks tokens up by text, as llama.cpp does; ASCII bytes
    // may also be plain one-character tokens.
    let mut byte_ids = [None; 256];
    for (b, slot) in byte_ids.iter_mut().enumerate() {
        *slot = vocab.lookup(&format!("<0x{b:02X}>")).or_else(|| {
            let byte = u8::try_from(b).ok().filter(u8::is_ascii)?;
            vocab.lookup(char::from(byte).encode_utf8(&mut [0u8; 4]))
        });
    }

    let eog = end_of_generation_ids(&mut vocab, &[eos, eot, eom]);
    let specials = SpecialMatcher::new(vocab.matched_in_text(true));
    let user_defined = SpecialMatcher::new(vocab.matched_in_text(false));
    let chat = chat_template(gguf, &vocab)?;
    let model = SpmModel::new(scores, byte_ids, unk, add_space_prefix, path);
    Ok(Tokenizer {
        vocab,
        encoder: Encoder::Spm {
            model: Box::new(model),
            specials,
            user_defined,
        },
        bos,
        eos,
        eog,
        add_bos,
        strip_leading_space: add_space_prefix,
        chat,
        origin: path.to_path_buf(),
    })
}

/// Pre-tokenizer regexes (Hugging Face syntax, applied in turn, matches
/// isolated) for the `tokenizer.ggml.pre` values kestrel supports, with
/// llama.cpp's per-type settings: (regexes, ignore_merges, add_bos).
fn pre_tokenizer(pre: &str) -> Option<(&'static [&'static str], bool, bool)> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const DIGITS: &str = r"\p{N}";
    match pre {
        "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => Some((&[GPT2], false, false)),
        "llama3" | "llama-v3" | "llama-bpe" | "dbrx" | "smaug-bpe" => Some((&[LLAMA3], true, true)),
        "qwen2" | "stablelm2" | "megrez" => Some((&[QWEN2], false, false)),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            Some((&[DIGITS, GPT2], false, false))
        }
        _ => None,
    }
}

const SUPPORTED_PRE: &str = "gpt2, gpt-2, mpt, olmo, jais, llama3, llama-v3, llama-bpe, dbrx, \
                             smaug-bpe, qwen2, stablelm2, megrez, starcoder, refact, command-r, \
                             smollm, codeshell, exaone, minerva-7b";

fn load_bpe(gguf: &GgufFile) -> Result<Tokenizer, TokenizerError> {
    let path = gguf.path();
    let pre = gguf.opt_str(KEY_PRE)?.unwrap_or("default");
    let (regexes, ignore_merges, default_add_bos) =
        pre_tokenizer(pre).ok_or_else(|| TokenizerError::UnsupportedPreTokenizer {
            path: path.to_path_buf(),
            pre: pre.to_owned(),
            supported: SUPPORTED_PRE,
        })?;

    let tokens = token_texts(gguf)?;
    let n = tokens.len();
    let kinds = token_kinds(gguf, n)?;
    let text_bytes = tokens.iter().map(|t| t.len()).sum();
    let mut builder = VocabBuilder::with_capacity(n, text_bytes);
    let bytes = ByteDecoder::new();
    let mut bpe_vocab = BpeVocab::with_capacity(n);
    for (i, (&raw, &kind)) in tokens.iter().zip(&kinds).enumerate() {
        let text = non_empty(raw, i);
        if kind == TokenKind::Normal {
            builder.push_with(&text, kind, |buf| bytes.decode_into(&text, buf));
        } else {
            // Added tokens are stored as plain text, not byte-level encoded.
            builder.push(&text, kind, text.as_bytes());
        }
        bpe_vocab.insert(text.into_owned(), i as u32);
    }
    let mut vocab = builder.finish();

    let merges = strings(gguf, KEY_MERGES)?
        .ok_or_else(|| bad(gguf, KEY_MERGES, "missing: a gpt2 vocabulary needs merges".into()))?;
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // Split at the first space after the first character, so that a
            // left side starting with a space still parses.
            let cut = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(at, _)| at)
                .ok_or_else(|| {
                    bad(
                        gguf,
                        KEY_MERGES,
                        format!("element {i} ({m:?}) is not of the form \"left right\""),
                    )
                })?;
            Ok((m[..cut].to_owned(), m[cut + 1..].to_owned()))
        })
        .collect::<Result<Vec<_>, TokenizerError>>()?;

    let build_err = |message: String| TokenizerError::Build {
        path: path.to_path_buf(),
        message,
    };
    let bpe = BpeBuilder::new()
        .vocab_and_merges(bpe_vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| build_err(format!("byte-level BPE from {KEY_TOKENS}/{KEY_MERGES}: {e}")))?;
    let mut pre_tokenizers = Vec::with_capacity(regexes.len() + 1);
    for re in regexes {
        let split = Split::new(
            SplitPattern::Regex((*re).to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| build_err(format!("pre-tokenizer regex for '{pre}': {e}")))?;
        pre_tokenizers.push(PreTokenizerWrapper::from(split));
    }
    pre_tokenizers.push(PreTokenizerWrapper::from(ByteLevel::new(false, true, false)));
    let mut bpe_tokenizer = tokenizers::Tokenizer::new(bpe);
    bpe_tokenizer.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));

    let bos = token_id(gguf, KEY_BOS, n)?;
    let eos = token_id(gguf, KEY_EOS, n)?;
    let eot = token_id(gguf, KEY_EOT, n)?;
    let eom = token_id(gguf, KEY_EOM, n)?;
    let add_bos = opt_bool(gguf, KEY_ADD_BOS)?.unwrap_or(default_add_bos);

    let eog = end_of_generation_ids(&mut vocab, &[eos, eot, eom]);
    let specials = SpecialMatcher::new(vocab.matched_in_text(true));
    let user_defined = SpecialMatcher::new(vocab.matched_in_text(false));
    let chat = chat_template(gguf, &vocab)?;
    Ok(Tokenizer {
        vocab,
        encoder: Encoder::GgufBpe {
            bpe: Box::new(bpe_tokenizer),
            specials,
            user_defined,
        },
        bos,
        eos,
        eog,
        add_bos,
        strip_leading_space: false,
        chat,
        origin: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_marks_become_spaces() {
        let mut out = Vec::new();
        unescape_spaces_into("\u{2581}a\u{2581}\u{2581}b", &mut out);
        assert_eq!(out, b" a  b");
    }

    #[test]
    fn every_supported_pre_tokenizer_is_listed() {
        for name in SUPPORTED_PRE.split(", ") {
            assert!(pre_tokenizer(name).is_some(), "{name}");
        }
        assert!(pre_tokenizer("default").is_none());
    }
}
