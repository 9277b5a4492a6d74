//! Tokenizers loaded from Hugging Face model directories written here:
//! a byte-level BPE with ChatML templates and a Llama-2-style
//! SentencePiece BPE.

mod common;

use std::path::{Path, PathBuf};

use kestrel_tokenizer::{ChatMessage, ChatTemplateSource, StreamDecoder, Tokenizer, TokenizerError};
use serde_json::{json, Value};

fn write_json(dir: &Path, name: &str, value: &Value) {
    std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn byte_char(b: u8) -> char {
    let mut next = 0x100u32;
    for x in 0..=255u8 {
        let own = matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if x == b {
            return if own {
                char::from(x)
            } else {
                char::from_u32(next).unwrap()
            };
        }
        if !own {
            next += 1;
        }
    }
    unreachable!()
}

fn added(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

/// A Qwen-like byte-level BPE tokenizer.json: 256 byte characters, three
/// merges, and the ChatML special tokens 260..=262.
fn byte_level_dir(name: &str) -> PathBuf {
    let dir = common::scratch_dir(name);
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    for (i, t) in ["Ġt", "he", "Ġthe", "Hi"].iter().enumerate() {
        vocab.insert((*t).to_owned(), json!(256 + i));
    }
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    write_json(
        &dir,
        "tokenizer.json",
        &json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(260, "<|endoftext|>"), added(261, "<|im_start|>"),
                             added(262, "<|im_end|>")],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": ["Ġ t", "h e", "Ġt he", "H i"]}
        }),
    );
    write_json(
        &dir,
        "generation_config.json",
        &json!({"eos_token_id": [262, 260]}),
    );
    write_json(&dir, "config.json", &json!({"model_type": "qwen2"}));
    dir
}

/// A realistic ChatML template (default system prompt, stripped contents),
/// written with `{%-`/`{{-` whitespace control like Qwen's.
const CHATML_TEMPLATE: &str = "{%- for message in messages %}
    {%- if loop.first and message.role != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content.strip() + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
";

/// An older-style template that relies on trim_blocks/lstrip_blocks.
const BLOCKS_TEMPLATE: &str = "{% for message in messages %}
{% if message['role'] == 'system' %}
    {{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>' }}
{% else %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' }}
{% endif %}
";

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::user("Hi "),
        ChatMessage::assistant("Hello!"),
        ChatMessage::user("Bye"),
    ]
}

#[test]
fn byte_level_dir_with_chatml_template() {
    let dir = byte_level_dir("chatml");
    write_json(
        &dir,
        "tokenizer_config.json",
        &json!({"bos_token": null, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}),
    );
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 263);
    assert_eq!(tok.bos_id(), None);
    assert!(!tok.add_bos_default());
    assert_eq!(tok.eos_ids(), &[262, 260]);
    assert_eq!(tok.chat_template_source(), ChatTemplateSource::FromFile);

    // Expected output computed with Python's jinja2 under transformers'
    // settings (trim_blocks, lstrip_blocks).
    let prompt = tok.apply_chat_template(&conversation(), true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
         <|im_start|>assistant\n"
    );

    let ids = tok.encode_chat_prompt(&prompt).unwrap();
    assert_eq!(ids[0], 261);
    assert_eq!(ids.iter().filter(|&&id| id == 262).count(), 4);
    assert!(ids.contains(&259), "\"Hi\" merges: {ids:?}");
    assert_eq!(tok.decode_with_special(&ids).unwrap(), prompt);
    assert_eq!(
        tok.decode(&tok.encode("<|im_start|>the the", false).unwrap())
            .unwrap(),
        "the the"
    );
    assert_eq!(tok.encode(" the", false).unwrap(), vec![258]);
    let mut stream = StreamDecoder::new(&tok);
    let streamed: String = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(streamed, tok.decode(&ids).unwrap());
}

#[test]
fn chat_template_jinja_file_wins_and_blocks_are_trimmed() {
    let dir = byte_level_dir("blocks");
    write_json(
        &dir,
        "tokenizer_config.json",
        &json!({"eos_token": {"content": "<|im_end|>", "special": true},
                "chat_template": "ignored because chat_template.jinja exists"}),
    );
    std::fs::write(dir.join("chat_template.jinja"), BLOCKS_TEMPLATE).unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    let prompt = tok.apply_chat_template(&conversation(), true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>user\nHi <|im_end|>\n\n<|im_start|>assistant\nHello!<|im_end|>\n\n\
         <|im_start|>user\nBye<|im_end|>\n\n<|im_start|>assistant\n\n"
    );
    let mut with_system = vec![ChatMessage::system("Sys")];
    with_system.extend(conversation());
    assert_eq!(
        tok.apply_chat_template(&with_system, false).unwrap(),
        "    <|im_start|>system\nSys<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n\n\
         <|im_start|>assistant\nHello!<|im_end|>\n\n<|im_start|>user\nBye<|im_end|>\n\n"
    );
}

#[test]
fn dir_without_template_falls_back_to_builtin_chatml() {
    let dir = byte_level_dir("builtin");
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(
        tok.chat_template_source(),
        ChatTemplateSource::BuiltIn("chatml".into())
    );
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::user("x")], true).unwrap(),
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// A Llama-2-style tokenizer.json: BPE with byte fallback, a normalizer
/// that prepends U+2581 and replaces spaces, and a decoder that strips the
/// first space.
#[test]
fn sentencepiece_style_tokenizer_json() {
    let dir = common::scratch_dir("llama2");
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*t).to_owned(), json!(i));
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    for (i, t) in ["\u{2581}", "a", "b", "\u{2581}a", "ab", "\u{2581}ab"]
        .iter()
        .enumerate()
    {
        vocab.insert((*t).to_owned(), json!(259 + i));
    }
    write_json(
        &dir,
        "tokenizer.json",
        &json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                      "vocab": vocab, "merges": ["\u{2581} a", "a b", "\u{2581}a b"]}
        }),
    );
    write_json(
        &dir,
        "tokenizer_config.json",
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "add_bos_token": true}),
    );
    let tok = Tokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!((tok.bos_id(), tok.eos_ids()), (Some(1), &[2u32][..]));
    assert!(tok.add_bos_default());
    assert_eq!(tok.encode("ab ab", true).unwrap(), vec![1, 264, 264]);
    let ids = tok.encode("é a", false).unwrap();
    assert_eq!(ids, vec![259, 3 + 0xC3, 3 + 0xA9, 262]);
    assert_eq!(tok.decode(&ids).unwrap(), "é a");
    assert_eq!(tok.decode(&[1, 264, 264, 2]).unwrap(), "ab ab");
    let mut cont = StreamDecoder::continuation(&tok);
    let streamed: String = [264, 264].iter().map(|&id| cont.push(id).unwrap()).collect();
    assert_eq!(streamed, " ab ab");
    assert_eq!(tok.chat_template_source(), ChatTemplateSource::None);
}

#[test]
fn missing_tokenizer_json_is_named() {
    let dir = common::scratch_dir("empty");
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(
        matches!(err, TokenizerError::MissingTokenizerJson { .. }),
        "{err:?}"
    );
    let expected = dir.join("tokenizer.json").display().to_string();
    assert!(err.to_string().contains(&expected), "{err}");
}

#[test]
fn malformed_side_files_are_named() {
    let dir = byte_level_dir("badjson");
    std::fs::write(dir.join("tokenizer_config.json"), "{ not json").unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    let dir = byte_level_dir("badid");
    write_json(&dir, "generation_config.json", &json!({"eos_token_id": 5000}));
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("generation_config.json") && msg.contains("5000"),
        "{msg}"
    );
}
