//! Where kestrel's default model lives. One definition for the binary and
//! every test that needs the real file.

use std::path::PathBuf;

/// File name of the default model (Gemma 3 270M Q4_K_M), as
/// `scripts/fetch-model.sh` writes it.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// The default model's path: `$KESTREL_MODEL`, else
/// `$KESTREL_MODEL_DIR/<file>`, else `$XDG_CACHE_HOME` or `~/.cache`, then
/// `kestrel/models/<file>` (the same rule as `scripts/fetch-model.sh`).
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
