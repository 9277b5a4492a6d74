//! Opening a model and its tokenizer, with a progress line on stderr.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use kestrel_backend::Backend;
use kestrel_formats::ModelFile;
use kestrel_model::Model;
use kestrel_tokenizer::Tokenizer;

/// The tokenizer that belongs to a model file.
pub fn tokenizer_for(file: &ModelFile) -> Result<Tokenizer> {
    Ok(match file {
        ModelFile::Gguf(g) => Tokenizer::from_gguf(g)?,
        ModelFile::Safetensors(st) => Tokenizer::from_hf_dir(st.dir())?,
    })
}

/// Load model and tokenizer onto `backend`, reporting the time taken.
pub fn load<B: Backend>(path: &Path, backend: Arc<B>) -> Result<(Model<B>, Tokenizer)> {
    let t0 = Instant::now();
    let model = Model::load(path, backend.clone()).with_context(|| format!("loading {}", path.display()))?;
    let tok = tokenizer_for(model.file()).with_context(|| format!("tokenizer of {}", path.display()))?;
    eprintln!(
        "loaded {} ({}, {} layers, {:.0} MB of weights) on {} in {:.2} s",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        model.config.arch.name(),
        model.config.n_layers,
        model.weight_bytes as f64 / 1e6,
        backend.describe(),
        t0.elapsed().as_secs_f64()
    );
    Ok((model, tok))
}
