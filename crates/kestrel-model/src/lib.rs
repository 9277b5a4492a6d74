//! One decoder-only transformer, configured per architecture by data.
//!
//! - `config`: `ModelConfig` from GGUF metadata or HF config.json
//! - `names`: canonical (GGUF) tensor names and their HF spellings
//! - `model`: weights on a backend and the forward pass

pub mod config;
pub mod error;
pub mod model;
pub mod names;

pub use config::{Arch, LayerConfig, ModelConfig};
pub use error::ModelError;
pub use model::{Logits, Model};
