//! Perplexity (llama.cpp's protocol) against an independent oracle: the tiny
//! gemma3 fixture's golden logits from HF transformers.

use std::path::PathBuf;
use std::sync::Arc;

use kestrel_backend::cpu::CpuBackend;
use kestrel_engine::perplexity;
use kestrel_model::Model;
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gemma3")
        .join(p)
}

#[test]
fn one_chunk_matches_golden_logits() {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(fixture("golden.json")).unwrap()).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(g["tokens"].clone()).unwrap();
    let logits: Vec<Vec<f64>> = serde_json::from_value(g["logits"].clone()).unwrap();
    let ctx = tokens.len();
    // Oracle: mean NLL over positions ctx/2 .. ctx-2 predicting the next token.
    let mut nll = 0.0;
    for pos in ctx / 2..ctx - 1 {
        let row = &logits[pos];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        nll -= row[tokens[pos + 1] as usize] - lse;
    }
    let want = (nll / (ctx - 1 - ctx / 2) as f64).exp();

    let model = Model::load(&fixture("model-f32.gguf"), Arc::new(CpuBackend::new())).unwrap();
    let mut calls = 0;
    let got = perplexity(&model, &tokens, ctx, tokens[0], |_, _| calls += 1).unwrap();
    assert_eq!((got.chunks, got.scored, calls), (1, ctx - 1 - ctx / 2, 1));
    assert!(
        (got.ppl - want).abs() / want < 1e-4,
        "ppl {} vs golden {want}",
        got.ppl
    );

    // Several chunks: the same text twice gives two identical chunks (the
    // first token of each is BOS either way), so the same perplexity.
    let twice: Vec<u32> = tokens.iter().chain(&tokens).copied().collect();
    let two = perplexity(&model, &twice, ctx, tokens[0], |_, _| {}).unwrap();
    assert_eq!(two.chunks, 2);
    assert!((two.ppl - got.ppl).abs() / got.ppl < 1e-6);

    // Too little text, or a context the model cannot take, is a clear error.
    let e = perplexity(&model, &tokens[..10], ctx, tokens[0], |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("fewer than one chunk"), "{e}");
    let e = perplexity(&model, &tokens, 1 << 20, tokens[0], |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("context length"), "{e}");
}
