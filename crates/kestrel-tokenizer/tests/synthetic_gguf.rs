//! Tokenizers built from small hand-made GGUF vocabularies: SentencePiece
//! with a space prefix, byte-level BPE, and the errors for bad metadata.

mod common;

use std::path::PathBuf;

use kestrel_formats::{GgufFile, GgufWriter, MetaValue};
use kestrel_tokenizer::{
    ChatMessage, ChatTemplateSource, StreamDecoder, TokenKind, Tokenizer, TokenizerError,
};
use proptest::prelude::*;

fn write(name: &str, w: &GgufWriter) -> PathBuf {
    let path = common::scratch_dir(name).join("vocab.gguf");
    w.write_to(&path).expect("write gguf");
    path
}

fn load(path: &PathBuf) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&GgufFile::open(path).expect("open gguf"))
}

/// A Llama-2-style SentencePiece vocabulary: <unk> <s> </s>, 256 byte
/// tokens, a few pieces, ChatML control tokens; no add_space_prefix key
/// (so the SentencePiece default, true, applies).
fn spm_writer() -> GgufWriter {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types: Vec<i32> = vec![2, 3, 3];
    let mut scores: Vec<f32> = vec![0.0; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (text, score) in [
        ("\u{2581}", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("\u{2581}a", -4.0),
        ("ab", -5.0),
        ("\u{2581}ab", -6.0),
    ] {
        tokens.push(text.into());
        types.push(1);
        scores.push(score);
    }
    for text in ["<|im_start|>", "<|im_end|>"] {
        tokens.push(text.into());
        types.push(3);
        scores.push(0.0);
    }
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "llama")
        .add_meta("tokenizer.ggml.model", "llama")
        .add_meta("tokenizer.ggml.tokens", tokens)
        .add_meta("tokenizer.ggml.scores", scores)
        .add_meta("tokenizer.ggml.token_type", types)
        .add_meta("tokenizer.ggml.bos_token_id", 1u32)
        .add_meta("tokenizer.ggml.eos_token_id", 2u32)
        .add_meta("tokenizer.ggml.unknown_token_id", 0u32);
    w
}

const SPM_A: u32 = 259 + 1;
const SPM_B: u32 = 259 + 2;
const SPM_SPACE_A: u32 = 259 + 3;
const SPM_SPACE_AB: u32 = 259 + 5;
const SPM_IM_START: u32 = 265;
const SPM_IM_END: u32 = 266;

#[test]
fn sentencepiece_with_space_prefix() {
    let tok = load(&write("spm", &spm_writer())).unwrap();
    assert_eq!(tok.vocab_size(), 267);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(tok.add_bos_default());
    // A space is prefixed at the start and after each special token.
    assert_eq!(
        tok.encode("ab ab", false).unwrap(),
        vec![SPM_SPACE_AB, SPM_SPACE_AB]
    );
    assert_eq!(
        tok.encode("<|im_start|>ab<|im_end|>a", true).unwrap(),
        vec![1, SPM_IM_START, SPM_SPACE_AB, SPM_IM_END, SPM_SPACE_A]
    );
    // Characters outside the vocabulary become byte tokens.
    assert_eq!(tok.encode("é", false).unwrap(), vec![259, 3 + 0xC3, 3 + 0xA9]);
    assert_eq!(tok.token_kind(3 + 0xC3), Some(TokenKind::Byte));
    // Decoding drops the prefixed space again; a continuation stream keeps
    // it (the text follows a prompt).
    let ids = tok.encode("ab a", true).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), "ab a");
    let mut cont = StreamDecoder::continuation(&tok);
    let streamed: String = ids.iter().map(|&id| cont.push(id).unwrap()).collect();
    assert_eq!(streamed, " ab a");
    assert_eq!(tok.decode(&[SPM_A, SPM_B]).unwrap(), "ab");
    // ChatML tokens in the vocabulary select the ChatML built-in, and
    // <|im_end|> ends generation.
    assert_eq!(
        tok.chat_template_source(),
        ChatTemplateSource::BuiltIn("chatml".into())
    );
    assert_eq!(tok.eos_ids(), &[2, SPM_IM_END]);
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(256) })]

    // U+2581 itself is left out: SentencePiece reads it as a space.
    #[test]
    fn spm_round_trip_and_stream(text in "[ab é]{0,24}",
                                 extra in prop::collection::vec(0u32..267, 0..16)) {
        let tok = load(&write("spm-prop", &spm_writer())).unwrap();
        let ids = tok.encode(&text, true).unwrap();
        // The leading space added by encoding is removed by decoding.
        prop_assert_eq!(tok.decode(&ids).unwrap(), text);
        let mut all = ids.clone();
        all.extend(extra);
        let mut stream = StreamDecoder::new(&tok);
        let mut out = String::new();
        for k in 0..all.len() {
            out.push_str(&stream.push(all[k]).unwrap());
            let done = format!("{out}{}", stream.clone().flush());
            prop_assert_eq!(done, tok.decode(&all[..=k]).unwrap());
        }
    }
}

/// GPT-2's byte alphabet (bytes to printable characters).
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

fn bpe_writer(pre: &str) -> GgufWriter {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types: Vec<i32> = vec![1; 256];
    for t in ["Ġt", "he", "Ġthe", "<|endoftext|>"] {
        tokens.push(t.into());
        types.push(if t.starts_with("<|") { 3 } else { 1 });
    }
    let merges = vec!["Ġ t".to_owned(), "h e".into(), "Ġt he".into()];
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "gpt2")
        .add_meta("tokenizer.ggml.model", "gpt2")
        .add_meta("tokenizer.ggml.pre", pre)
        .add_meta("tokenizer.ggml.tokens", tokens)
        .add_meta("tokenizer.ggml.token_type", types)
        .add_meta("tokenizer.ggml.merges", merges)
        .add_meta("tokenizer.ggml.eos_token_id", 259u32);
    w
}

#[test]
fn byte_level_bpe() {
    let tok = load(&write("bpe", &bpe_writer("gpt2"))).unwrap();
    let t = u32::from(b't');
    assert_eq!(tok.encode(" the", false).unwrap(), vec![258]);
    assert_eq!(tok.encode("the the", false).unwrap(), vec![t, 257, 258]);
    assert_eq!(
        tok.encode("the<|endoftext|>\n", false).unwrap(),
        vec![t, 257, 259, u32::from(b'\n')]
    );
    let text = "the €<|endoftext|> the\n";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode_with_special(&ids).unwrap(), text);
    assert_eq!(tok.decode(&ids).unwrap(), "the € the\n");
    assert_eq!(tok.token_text(258).as_deref(), Some(" the"));
    assert_eq!(tok.eos_ids(), &[259]);
    assert_eq!(tok.bos_id(), None);
    assert!(!tok.add_bos_default());
    assert_eq!(tok.chat_template_source(), ChatTemplateSource::None);
    let err = tok
        .apply_chat_template(&[ChatMessage::user("hi")], true)
        .unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
}

#[test]
fn gguf_chat_template_is_used_when_present() {
    let mut w = spm_writer();
    w.add_meta(
        "tokenizer.chat_template",
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}\
         {% if add_generation_prompt %}[assistant]{% endif %}",
    );
    let tok = load(&write("spm-template", &w)).unwrap();
    assert_eq!(tok.chat_template_source(), ChatTemplateSource::FromFile);
    let s = tok.apply_chat_template(&[ChatMessage::user("x")], true).unwrap();
    assert_eq!(s, "<s>[user]x[assistant]");
    // The template emits BOS itself, so encoding the prompt adds no second.
    let ids = tok.encode_chat_prompt(&s).unwrap();
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1);
}

#[test]
fn unknown_tokenizer_model_is_named_with_the_file() {
    let mut w = spm_writer();
    w.add_meta("tokenizer.ggml.model", "bert");
    let path = write("bert", &w);
    let err = load(&path).unwrap_err();
    assert!(matches!(err, TokenizerError::UnsupportedModel { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("'bert'"), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn unknown_pre_tokenizer_is_named() {
    let err = load(&write("pre", &bpe_writer("mystery"))).unwrap_err();
    assert!(err.to_string().contains("'mystery'"), "{err}");
}

#[test]
fn bad_metadata_is_reported_with_its_key() {
    let mut w = spm_writer();
    w.add_meta("tokenizer.ggml.token_type", vec![1i32; 3]);
    let err = load(&write("types", &w)).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.ggml.token_type") && msg.contains("267"),
        "{msg}"
    );

    let mut w = spm_writer();
    w.add_meta("tokenizer.ggml.bos_token_id", 9999u32);
    let msg = load(&write("bos", &w)).unwrap_err().to_string();
    assert!(msg.contains("bos_token_id") && msg.contains("9999"), "{msg}");

    let mut w = spm_writer();
    w.add_meta("tokenizer.ggml.tokens", MetaValue::U32(5));
    let msg = load(&write("tokens", &w)).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer.ggml.tokens") && msg.contains("array"),
        "{msg}"
    );

    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", "llama");
    let msg = load(&write("nomodel", &w)).unwrap_err().to_string();
    assert!(msg.contains("tokenizer.ggml.model"), "{msg}");
}
