//! Perplexity with llama.cpp's protocol (`llama-perplexity -c N`), so the two
//! can be compared on the same file: the whole text is tokenized once with
//! BOS, cut into floor(n_tokens / N) chunks of N tokens, each chunk evaluated
//! on its own with its first token replaced by BOS, and the negative
//! log-likelihood averaged over the second half of each chunk only (logits
//! at positions N/2 .. N-2 predicting tokens N/2+1 .. N-1).

use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_model::Model;

use crate::error::EngineError;

/// Result of a perplexity run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Perplexity {
    /// exp(mean NLL) over all scored tokens.
    pub ppl: f64,
    pub mean_nll: f64,
    /// Tokens scored (chunks * (ctx - 1 - ctx/2)).
    pub scored: usize,
    pub chunks: usize,
    /// Running perplexity after each chunk (what llama-perplexity prints).
    pub per_chunk: Vec<f64>,
}

/// `log_softmax(logits)[target]`, in f64.
fn log_prob(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target as usize] as f64 - max - sum.ln()
}

/// Perplexity of `tokens` (already including BOS at the start, as llama.cpp
/// tokenizes) in chunks of `ctx`, calling `progress(done, total)` per chunk.
pub fn perplexity<B: Backend>(
    model: &Model<B>,
    tokens: &[u32],
    ctx: usize,
    bos: u32,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity, EngineError> {
    if ctx < 4 {
        return Err(EngineError::Request(format!(
            "context {ctx} is too small for perplexity (at least 4)"
        )));
    }
    if ctx > model.config.context_len {
        return Err(EngineError::Request(format!(
            "context {ctx} exceeds the model's context length {}",
            model.config.context_len
        )));
    }
    let chunks = tokens.len() / ctx;
    if chunks == 0 {
        return Err(EngineError::Request(format!(
            "the text has {} tokens, fewer than one chunk of {ctx}: use a longer file or a smaller --ctx",
            tokens.len()
        )));
    }
    let bs = 16usize;
    let blocks = ctx.div_ceil(bs);
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut kv = model
        .backend
        .alloc_kv(&model.kv_spec(blocks, bs, KvDType::F32))
        .map_err(|e| EngineError::Model(e.into()))?;
    let first = ctx / 2;
    let rows: Vec<u32> = (first as u32..ctx as u32 - 1).collect();
    let vocab = model.config.vocab_size;
    let (mut nll, mut scored) = (0f64, 0usize);
    let mut per_chunk = Vec::with_capacity(chunks);
    for c in 0..chunks {
        let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
        chunk[0] = bos;
        let layout = BatchLayout::single(&chunk, 0, &table, bs as u32);
        let logits = model.forward(&layout, &mut kv, &rows)?;
        let flat = model
            .backend
            .read_act(&logits)
            .map_err(|e| EngineError::Model(e.into()))?;
        for (i, row) in flat.chunks(vocab).enumerate() {
            nll -= log_prob(row, chunk[first + i + 1]);
            scored += 1;
        }
        per_chunk.push((nll / scored as f64).exp());
        progress(c + 1, chunks);
    }
    let mean_nll = nll / scored as f64;
    Ok(Perplexity {
        ppl: mean_nll.exp(),
        mean_nll,
        scored,
        chunks,
        per_chunk,
    })
}
