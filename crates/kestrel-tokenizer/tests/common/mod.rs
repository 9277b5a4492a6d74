//! Shared helpers for the integration tests: the default model, the
//! llama.cpp reference outputs, and scratch directories.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kestrel_formats::GgufFile;
use kestrel_tokenizer::Tokenizer;

/// The default model (`kestrel_formats::default_model_path`). Fails (never
/// skips) when it is missing.
pub fn model_path() -> PathBuf {
    let path = kestrel_formats::default_model_path();
    assert!(
        path.is_file(),
        "default model not found at {}: run scripts/fetch-model.sh (or set KESTREL_MODEL)",
        path.display()
    );
    path
}

/// The default model's tokenizer, loaded once per test binary.
pub fn gemma() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = model_path();
        let gguf = GgufFile::open(&path).expect("open default model");
        Tokenizer::from_gguf(&gguf).expect("tokenizer from default model")
    })
}

pub fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/gemma3-270m"
    ))
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let path = reference_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A fresh, empty scratch directory unique to this process and `name`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kestrel-tokenizer-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}
