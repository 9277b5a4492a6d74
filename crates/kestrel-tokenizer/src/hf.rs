//! Loading a Hugging Face model directory's tokenizer: tokenizer.json runs
//! in the `tokenizers` crate exactly as in transformers; the side files
//! supply the chat template and special ids.

use std::path::Path;

use serde_json::Value;
use tokenizers::DecoderWrapper;

use crate::byte_level::ByteDecoder;
use crate::chat::{BuiltIn, ChatTemplate};
use crate::tokenizer::{end_of_generation_ids, Encoder, Tokenizer};
use crate::vocab::{parse_byte_token, TokenKind, VocabBuilder};
use crate::TokenizerError;

pub(crate) fn load(dir: &Path) -> Result<Tokenizer, TokenizerError> {
    let tokenizer_json = dir.join("tokenizer.json");
    if !tokenizer_json.is_file() {
        return Err(TokenizerError::MissingTokenizerJson { path: tokenizer_json });
    }
    let hf = tokenizers::Tokenizer::from_file(&tokenizer_json).map_err(|e| TokenizerError::Build {
        path: tokenizer_json.clone(),
        message: e.to_string(),
    })?;
    let config_path = dir.join("tokenizer_config.json");
    let generation_path = dir.join("generation_config.json");
    let model_path = dir.join("config.json");
    let tok_config = read_json(&config_path)?.unwrap_or(Value::Null);
    let generation = read_json(&generation_path)?.unwrap_or(Value::Null);
    let model_config = read_json(&model_path)?.unwrap_or(Value::Null);

    let decoding = Decoding::of(hf.get_decoder(), &tokenizer_json)?;
    let added = hf.get_added_tokens_decoder();
    // Ids may be sparse; cover every id the model or the added tokens use.
    let n = added
        .keys()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(hf.get_vocab_size(false));
    let unk_text = token_text_field(&tok_config, "unk_token");
    let bytes = ByteDecoder::new();
    let mut builder = VocabBuilder::with_capacity(n, n * 8);
    for id in 0..n as u32 {
        if let Some(token) = added.get(&id) {
            let kind = if token.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
            builder.push(&token.content, kind, token.content.as_bytes());
            continue;
        }
        let Some(text) = hf.id_to_token(id) else {
            builder.push("", TokenKind::Unused, b"");
            continue;
        };
        if unk_text.as_deref() == Some(text.as_str()) {
            builder.push(&text, TokenKind::Unknown, text.as_bytes());
        } else if let Some(byte) = decoding.byte_fallback.then(|| parse_byte_token(&text)).flatten() {
            builder.push(&text, TokenKind::Byte, &[byte]);
        } else if decoding.byte_level {
            builder.push_with(&text, TokenKind::Normal, |buf| bytes.decode_into(&text, buf));
        } else if let Some(mark) = decoding.word_mark {
            let piece = text.replace(mark, " ");
            builder.push(&text, TokenKind::Normal, piece.as_bytes());
        } else {
            builder.push(&text, TokenKind::Normal, text.as_bytes());
        }
    }
    let mut vocab = builder.finish();

    let json_err = |path: &Path, message: String| TokenizerError::Json {
        path: path.to_path_buf(),
        message,
    };
    let check = |id: u64, path: &Path, field: &str| -> Result<u32, TokenizerError> {
        u32::try_from(id)
            .ok()
            .filter(|&i| (i as usize) < n)
            .ok_or_else(|| {
                json_err(
                    path,
                    format!("{field}: token id {id} is outside the vocabulary of {n} tokens"),
                )
            })
    };
    let by_text = |field: &str| token_text_field(&tok_config, field).and_then(|t| hf.token_to_id(&t));

    let bos = match by_text("bos_token") {
        Some(id) => Some(id),
        None => first_id(&generation, "bos_token_id")
            .map(|id| check(id, &generation_path, "bos_token_id"))
            .or_else(|| {
                first_id(&model_config, "bos_token_id").map(|id| check(id, &model_path, "bos_token_id"))
            })
            .transpose()?,
    };
    let mut eos_ids: Vec<Option<u32>> = vec![by_text("eos_token")];
    for (config, path) in [(&generation, &generation_path), (&model_config, &model_path)] {
        for id in all_ids(config, "eos_token_id") {
            eos_ids.push(Some(check(id, path, "eos_token_id")?));
        }
    }
    let eos = eos_ids.iter().flatten().next().copied();
    let eog = end_of_generation_ids(&mut vocab, &eos_ids);

    let add_bos = match tok_config.get("add_bos_token").and_then(Value::as_bool) {
        Some(b) => b,
        // No explicit flag: the post-processor decides (Llama 3 adds BOS
        // through its template, Qwen adds nothing).
        None => bos.is_some_and(|b| {
            hf.encode_fast("a", true)
                .is_ok_and(|e| e.get_ids().first() == Some(&b))
        }),
    };

    let chat = chat_template(dir, &tok_config, &config_path)?.unwrap_or_else(|| {
        let model_type = model_config.get("model_type").and_then(Value::as_str);
        match BuiltIn::choose(model_type, &vocab) {
            Some(b) => ChatTemplate::BuiltIn(b),
            None => ChatTemplate::None,
        }
    });

    Ok(Tokenizer {
        vocab,
        encoder: Encoder::Hf(Box::new(hf)),
        bos,
        eos,
        eog,
        add_bos,
        strip_leading_space: decoding.strip_leading_space,
        chat,
        origin: dir.to_path_buf(),
    })
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TokenizerError::Json {
                path: path.to_path_buf(),
                message: format!("invalid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A special-token field of tokenizer_config.json: a string, or an
/// AddedToken object with "content".
fn token_text_field(config: &Value, field: &str) -> Option<String> {
    match config.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Ids of a field that may be a number or a list of numbers.
fn all_ids(config: &Value, field: &str) -> Vec<u64> {
    match config.get(field) {
        Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    }
}

fn first_id(config: &Value, field: &str) -> Option<u64> {
    all_ids(config, field).into_iter().next()
}

/// chat_template.jinja wins over tokenizer_config.json's `chat_template`
/// (as in transformers); the latter may be a string or a list of named
/// templates, of which "default" is used.
fn chat_template(
    dir: &Path,
    tok_config: &Value,
    config_path: &Path,
) -> Result<Option<ChatTemplate>, TokenizerError> {
    let jinja_path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja_path) {
        Ok(source) => {
            return Ok(Some(ChatTemplate::from_jinja(
                source,
                jinja_path.display().to_string(),
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TokenizerError::Io {
                path: jinja_path,
                source,
            })
        }
    }
    let origin = format!("chat_template in {}", config_path.display());
    let source = match tok_config.get("chat_template") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(list)) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|entry| {
                    let name = entry.get("name").and_then(Value::as_str);
                    let template = entry.get("template").and_then(Value::as_str)?;
                    (want.is_none() || name == want).then(|| template.to_owned())
                })
            };
            named(Some("default"))
                .or_else(|| named(None))
                .ok_or_else(|| TokenizerError::Json {
                    path: config_path.to_path_buf(),
                    message: "chat_template is a list without any {\"name\", \"template\"} entry".into(),
                })?
        }
        Some(other) => {
            return Err(TokenizerError::Json {
                path: config_path.to_path_buf(),
                message: format!(
                    "chat_template should be a string or a list of named templates, not {}",
                    json_kind(other)
                ),
            })
        }
    };
    Ok(Some(ChatTemplate::from_jinja(source, origin)))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What tokenizer.json's decoder does, reduced to per-token pieces.
#[derive(Debug, Default, PartialEq, Eq)]
struct Decoding {
    /// GPT-2 byte-level alphabet.
    byte_level: bool,
    /// `<0xNN>` tokens are raw bytes.
    byte_fallback: bool,
    /// SentencePiece word mark replaced by a space (normally U+2581).
    word_mark: Option<char>,
    /// One leading space is dropped from the decoded text.
    strip_leading_space: bool,
}

impl Decoding {
    fn of(decoder: Option<&DecoderWrapper>, path: &Path) -> Result<Decoding, TokenizerError> {
        let mut d = Decoding::default();
        if let Some(decoder) = decoder {
            let json = serde_json::to_value(decoder).map_err(|e| TokenizerError::Build {
                path: path.to_path_buf(),
                message: format!("cannot inspect the decoder: {e}"),
            })?;
            d.add(&json, path)?;
        }
        Ok(d)
    }

    fn add(&mut self, json: &Value, path: &Path) -> Result<(), TokenizerError> {
        let unsupported = |what: String| TokenizerError::UnsupportedDecoder {
            path: path.to_path_buf(),
            what,
        };
        let kind = json.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "ByteLevel" => self.byte_level = true,
            "ByteFallback" => self.byte_fallback = true,
            // Fuse only joins tokens; pieces are concatenated anyway.
            "Fuse" => {}
            "Sequence" => {
                let parts = json.get("decoders").and_then(Value::as_array);
                for part in parts.into_iter().flatten() {
                    self.add(part, path)?;
                }
            }
            "Metaspace" => {
                self.word_mark = json
                    .get("replacement")
                    .and_then(Value::as_str)
                    .and_then(|s| s.chars().next());
                let scheme = json.get("prepend_scheme").and_then(Value::as_str);
                self.strip_leading_space = scheme != Some("never");
            }
            "Replace" => {
                let pattern = json
                    .get("pattern")
                    .and_then(|p| p.get("String"))
                    .and_then(Value::as_str);
                let content = json.get("content").and_then(Value::as_str);
                let mut chars = pattern.unwrap_or("").chars();
                match (chars.next(), chars.next(), content) {
                    (Some(mark), None, Some(" ")) => self.word_mark = Some(mark),
                    _ => return Err(unsupported(format!("Replace {json}"))),
                }
            }
            "Strip" => {
                let num = |f: &str| json.get(f).and_then(Value::as_u64).unwrap_or(0);
                let content = json.get("content").and_then(Value::as_str);
                match (content, num("start"), num("stop")) {
                    (_, 0, 0) => {}
                    (Some(" "), 1, 0) => self.strip_leading_space = true,
                    _ => return Err(unsupported(format!("Strip {json}"))),
                }
            }
            other => return Err(unsupported(format!("{other} decoder"))),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decoding(v: Value) -> Result<Decoding, TokenizerError> {
        let mut d = Decoding::default();
        d.add(&v, Path::new("tokenizer.json"))?;
        Ok(d)
    }

    #[test]
    fn llama2_style_decoder_sequence() {
        let d = decoding(json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]}))
        .unwrap();
        assert_eq!(
            d,
            Decoding {
                byte_level: false,
                byte_fallback: true,
                word_mark: Some('\u{2581}'),
                strip_leading_space: true
            }
        );
    }

    #[test]
    fn metaspace_and_byte_level() {
        let d = decoding(json!({"type": "Metaspace", "replacement": "\u{2581}",
                                "prepend_scheme": "first", "split": true}))
        .unwrap();
        assert!(d.strip_leading_space && d.word_mark == Some('\u{2581}'));
        let d = decoding(json!({"type": "Metaspace", "replacement": "\u{2581}",
                                "prepend_scheme": "never", "split": true}))
        .unwrap();
        assert!(!d.strip_leading_space);
        let d = decoding(json!({"type": "ByteLevel", "add_prefix_space": false,
                                "trim_offsets": true, "use_regex": true}))
        .unwrap();
        assert!(d.byte_level && !d.byte_fallback);
    }

    #[test]
    fn unsupported_decoders_are_named() {
        let err = decoding(json!({"type": "WordPiece", "prefix": "##", "cleanup": true})).unwrap_err();
        assert!(err.to_string().contains("WordPiece"), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn config_fields_accept_strings_objects_and_lists() {
        let c = json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true},
                       "eos_token_id": [1, 2], "bos_token_id": 7});
        assert_eq!(token_text_field(&c, "bos_token").as_deref(), Some("<s>"));
        assert_eq!(token_text_field(&c, "eos_token").as_deref(), Some("</s>"));
        assert_eq!(token_text_field(&c, "pad_token"), None);
        assert_eq!(all_ids(&c, "eos_token_id"), vec![1, 2]);
        assert_eq!(first_id(&c, "bos_token_id"), Some(7));
    }
}
