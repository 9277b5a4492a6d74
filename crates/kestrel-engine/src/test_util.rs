//! Test fixtures (feature `test-util`), shared by this crate's integration
//! tests and the server's: the default model and its tokenizer on the CPU
//! backend, loaded once per test binary.
//!
//! Tests need the model: when it is missing they fail (with what to run),
//! they never skip silently. Panicking is this module's way to fail a test.

use std::sync::{Arc, OnceLock};

use kestrel_backend::cpu::CpuBackend;
use kestrel_formats::ModelFile;
use kestrel_model::Model;
use kestrel_tokenizer::Tokenizer;

/// The default model (Gemma 3 270M Q4_K_M GGUF) and its tokenizer.
pub struct DefaultModel {
    pub model: Arc<Model<CpuBackend>>,
    pub tok: Arc<Tokenizer>,
}

/// Loads the default model from `KESTREL_MODEL` or the default path.
pub fn load_default_model() -> Result<DefaultModel, String> {
    let path = kestrel_formats::default_model_path();
    if !path.exists() {
        return Err(format!(
            "default model not found at {}: run scripts/fetch-model.sh (or set KESTREL_MODEL)",
            path.display()
        ));
    }
    let model = Model::load(&path, Arc::new(CpuBackend::new()))
        .map_err(|e| format!("loading {}: {e}", path.display()))?;
    let tok = match model.file() {
        ModelFile::Gguf(g) => {
            Tokenizer::from_gguf(g).map_err(|e| format!("tokenizer of {}: {e}", path.display()))?
        }
        _ => return Err(format!("{} is not a GGUF file", path.display())),
    };
    Ok(DefaultModel {
        model: Arc::new(model),
        tok: Arc::new(tok),
    })
}

/// The default model, loaded on first use; panics (failing the test) with
/// the reason when it cannot be loaded.
pub fn default_model() -> &'static DefaultModel {
    static MODEL: OnceLock<DefaultModel> = OnceLock::new();
    MODEL.get_or_init(|| load_default_model().unwrap_or_else(|e| panic!("{e}")))
}
