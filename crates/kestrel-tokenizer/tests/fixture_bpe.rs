//! The tiny byte-level BPE of tests/fixtures (trained with HF tokenizers by
//! scripts/make_fixtures.py) through both construction paths: from
//! tokenizer.json and from a GGUF's `gpt2` tokenizer metadata. Both must
//! reproduce HF's ids for every case of tokenizer_golden.json.

use std::path::PathBuf;

use kestrel_formats::GgufFile;
use kestrel_tokenizer::Tokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn cases() -> Vec<(String, Vec<u32>)> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tokenizer_golden.json")).unwrap())
            .unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                serde_json::from_value(c["ids"].clone()).unwrap(),
            )
        })
        .collect()
}

fn check(tok: &Tokenizer, what: &str) {
    let cases = cases();
    assert!(cases.len() >= 10, "too few golden cases");
    for (text, want) in &cases {
        let got = tok.encode(text, false).unwrap();
        assert_eq!(&got, want, "{what}: encoding of {text:?}");
        assert_eq!(
            &tok.decode_with_special(&got).unwrap(),
            text,
            "{what}: decode of {text:?}"
        );
    }
}

#[test]
fn tokenizer_json_matches_hf() {
    let tok = Tokenizer::from_hf_dir(&fixtures().join("llama/hf")).unwrap();
    check(&tok, "tokenizer.json");
}

#[test]
fn gguf_gpt2_metadata_matches_hf() {
    for file in [
        "llama/model-f32.gguf",
        "qwen2/model-bf16.gguf",
        "gemma3/model-f32.gguf",
    ] {
        let g = GgufFile::open(fixtures().join(file)).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        check(&tok, file);
    }
}
