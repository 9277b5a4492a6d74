//! `ModelConfig`: everything that distinguishes one supported architecture
//! from another, as data. One forward pass (`forward.rs`) reads it; there is
//! no per-architecture copy of the transformer.
//!
//! Two readers fill it: GGUF metadata (`from_gguf`, following llama.cpp's
//! conventions for each architecture) and Hugging Face `config.json`
//! (`from_hf`, both the transformers 4 and 5 spellings of RoPE parameters).

use kestrel_backend::{Activation, RopeParams, RopeStyle};
use kestrel_formats::GgufFile;
use serde_json::Value;

use crate::error::ModelError;

/// Architectures with a tested implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// From GGUF `general.architecture` or an HF `model_type`.
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "llama" | "mistral" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" | "gemma3_text" => Some(Arch::Gemma3),
            _ => None,
        }
    }
}

pub const SUPPORTED_ARCHS: &str = "llama, qwen2, qwen3, gemma3";

/// Per-layer variation (gemma3 interleaves sliding-window and global layers,
/// each with its own RoPE base).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerConfig {
    /// Sliding attention window in tokens; None for global attention.
    pub window: Option<u32>,
    /// Index into `ModelConfig::ropes`.
    pub rope: usize,
}

/// Mixture-of-experts feed-forward (not implemented yet: the loader rejects
/// such files with a clear error; the field exists so the config can carry it).
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub n_experts: usize,
    pub n_experts_used: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub ffn_dim: usize,
    pub rms_eps: f32,
    /// Longest context the model was trained for.
    pub context_len: usize,
    pub activation: Activation,
    /// q, k, v projections carry biases (qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (qwen3, gemma3).
    pub qk_norm: bool,
    /// Norms after attention and after the FFN, before the residual add (gemma).
    pub post_norms: bool,
    /// Embeddings multiplied by this (gemma: sqrt(hidden)).
    pub embed_scale: f32,
    /// LM head shares the token embedding.
    pub tied_embeddings: bool,
    /// Added to every RMSNorm weight at load (HF gemma stores `w - 1`; GGUF
    /// files already carry the +1).
    pub norm_offset: f32,
    /// Multiplier of q·k.
    pub attn_scale: f32,
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    pub ropes: Vec<RopeParams>,
    pub layers: Vec<LayerConfig>,
    pub moe: Option<MoeConfig>,
}

impl ModelConfig {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Bytes of KV cache per token at `bytes_per_elem` (all layers, K and V).
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> usize {
        2 * self.n_layers * self.kv_dim() * bytes_per_elem
    }

    fn check(&self, source: &str) -> Result<(), ModelError> {
        let bad = |what: String| {
            Err(ModelError::Config {
                file: source.to_string(),
                problem: what,
            })
        };
        if self.hidden == 0 || self.n_layers == 0 || self.n_heads == 0 || self.head_dim == 0 {
            return bad("hidden size, layer count, head count and head dim must be > 0".into());
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "head count {} must be a multiple of the KV head count {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        for r in &self.ropes {
            if 2 * r.inv_freq.len() > self.head_dim {
                return bad(format!(
                    "RoPE dimension {} exceeds head dim {}",
                    2 * r.inv_freq.len(),
                    self.head_dim
                ));
            }
        }
        Ok(())
    }

    /// Read from GGUF metadata, following llama.cpp's per-architecture conventions.
    pub fn from_gguf(g: &GgufFile) -> Result<ModelConfig, ModelError> {
        let src = g.path().display().to_string();
        let arch_name = g.architecture()?;
        let arch = Arch::parse(arch_name).ok_or_else(|| ModelError::UnknownArch {
            file: src.clone(),
            arch: arch_name.to_string(),
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden = g.get_u32(&key("embedding_length"))? as usize;
        let n_layers = g.get_u32(&key("block_count"))? as usize;
        let n_heads = g.get_u32(&key("attention.head_count"))? as usize;
        let n_kv_heads = g
            .opt_u32(&key("attention.head_count_kv"))?
            .unwrap_or(n_heads as u32) as usize;
        let head_dim = g
            .opt_u32(&key("attention.key_length"))?
            .map(|v| v as usize)
            .unwrap_or(hidden / n_heads.max(1));
        let ffn_dim = g.get_u32(&key("feed_forward_length"))? as usize;
        let rms_eps = g
            .opt_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-6);
        let context_len = g.opt_u32(&key("context_length"))?.unwrap_or(4096) as usize;
        let freq_base = g.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_dim = g
            .opt_u32(&key("rope.dimension_count"))?
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        let vocab_size = match g.tensor("token_embd.weight") {
            Some(t) => t.shape[0],
            None => {
                return Err(ModelError::MissingTensor {
                    file: src,
                    name: "token_embd.weight".into(),
                })
            }
        };
        let tied = g.tensor("output.weight").is_none();
        if let Some(n) = g.opt_u32(&key("expert_count"))? {
            if n > 0 {
                return Err(ModelError::Unsupported {
                    file: src,
                    what: format!("mixture-of-experts ({n} experts) is not implemented yet"),
                });
            }
        }

        // Frequency scaling stored in the file: linear factor, or llama3's
        // per-pair factors as the `rope_freqs.weight` tensor (llama.cpp divides
        // each pair's frequency by its factor).
        let linear = match g.opt_str(&key("rope.scaling.type"))? {
            Some("linear") => g.opt_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            _ => 1.0,
        };
        let freq_factors = match g.tensor("rope_freqs.weight") {
            Some(t) => Some(t.to_f32()?),
            None => None,
        };
        // llama.cpp permutes llama's q/k rows at conversion so that adjacent
        // pairs rotate; the other architectures keep NeoX halves.
        let style = if arch == Arch::Llama {
            RopeStyle::Interleaved
        } else {
            RopeStyle::Neox
        };
        let mut global = rope_params(style, rope_dim, freq_base, linear);
        if let Some(f) = &freq_factors {
            if f.len() != global.inv_freq.len() {
                return Err(ModelError::Config {
                    file: src,
                    problem: format!(
                        "rope_freqs.weight has {} factors, expected {}",
                        f.len(),
                        global.inv_freq.len()
                    ),
                });
            }
            for (v, f) in global.inv_freq.iter_mut().zip(f) {
                *v /= f;
            }
        }

        let mut cfg = base_config(arch, hidden, n_heads, head_dim);
        cfg.vocab_size = vocab_size;
        cfg.n_layers = n_layers;
        cfg.n_kv_heads = n_kv_heads;
        cfg.ffn_dim = ffn_dim;
        cfg.rms_eps = rms_eps;
        cfg.context_len = context_len;
        cfg.tied_embeddings = tied;
        cfg.norm_offset = 0.0;
        cfg.qkv_bias = g.tensor("blk.0.attn_q.bias").is_some();
        cfg.attn_softcap = g.opt_f32(&key("attn_logit_softcapping"))?;
        cfg.final_softcap = g.opt_f32(&key("final_logit_softcapping"))?;
        if arch == Arch::Gemma3 {
            // llama.cpp: every 6th layer is global, the others slide with RoPE
            // base 10k; the window comes from the file.
            let window = g.opt_u32(&key("attention.sliding_window"))?;
            let local = rope_params(style, rope_dim, 10_000.0, 1.0);
            cfg.ropes = vec![global, local];
            cfg.layers = gemma3_layers(n_layers, window, 6);
        } else {
            cfg.ropes = vec![global];
            cfg.layers = vec![
                LayerConfig {
                    window: None,
                    rope: 0
                };
                n_layers
            ];
        }
        cfg.check(&src)?;
        Ok(cfg)
    }

    /// Read from a Hugging Face `config.json`.
    pub fn from_hf(config: &Value, source: &str) -> Result<ModelConfig, ModelError> {
        let cfg_err = |problem: String| ModelError::Config {
            file: source.to_string(),
            problem,
        };
        // Gemma3ForConditionalGeneration keeps the language model's settings
        // under text_config.
        let c = config.get("text_config").unwrap_or(config);
        let model_type = c
            .get("model_type")
            .or_else(|| config.get("model_type"))
            .and_then(Value::as_str)
            .ok_or_else(|| cfg_err("no model_type".into()))?;
        let arch = Arch::parse(model_type).ok_or_else(|| ModelError::UnknownArch {
            file: source.to_string(),
            arch: model_type.to_string(),
        })?;
        let req = |k: &str| -> Result<usize, ModelError> {
            c.get(k)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| cfg_err(format!("missing or non-integer '{k}'")))
        };
        let opt_f = |k: &str| c.get(k).and_then(Value::as_f64);
        let hidden = req("hidden_size")?;
        let n_heads = req("num_attention_heads")?;
        let head_dim = c
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(hidden / n_heads.max(1));
        if c.get("num_local_experts")
            .or_else(|| c.get("num_experts"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
            > 0
        {
            return Err(ModelError::Unsupported {
                file: source.to_string(),
                what: "mixture-of-experts is not implemented yet".into(),
            });
        }
        let mut cfg = base_config(arch, hidden, n_heads, head_dim);
        cfg.vocab_size = req("vocab_size")?;
        cfg.n_layers = req("num_hidden_layers")?;
        cfg.n_kv_heads = c
            .get("num_key_value_heads")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        cfg.ffn_dim = req("intermediate_size")?;
        cfg.rms_eps = opt_f("rms_norm_eps").unwrap_or(1e-6) as f32;
        cfg.context_len = c
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .unwrap_or(4096) as usize;
        cfg.tied_embeddings = c
            .get("tie_word_embeddings")
            .or_else(|| config.get("tie_word_embeddings"))
            .and_then(Value::as_bool)
            .unwrap_or(arch == Arch::Gemma3);
        cfg.qkv_bias = match arch {
            Arch::Qwen2 => true,
            _ => c.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        };
        cfg.attn_softcap = opt_f("attn_logit_softcapping").map(|v| v as f32);
        cfg.final_softcap = opt_f("final_logit_softcapping").map(|v| v as f32);

        // RoPE: transformers 5 writes `rope_parameters` (per layer type for
        // gemma3), transformers 4 `rope_theta` + `rope_scaling`.
        let rp = c.get("rope_parameters");
        let global_rp = rp.and_then(|r| r.get("full_attention")).or(rp);
        let theta = global_rp
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or_else(|| opt_f("rope_theta"))
            .unwrap_or(10_000.0) as f32;
        let scaling = global_rp
            .filter(|r| r.get("rope_type").is_some())
            .or_else(|| c.get("rope_scaling"));
        let partial = opt_f("partial_rotary_factor").unwrap_or(1.0);
        let rope_dim = ((head_dim as f64) * partial) as usize;
        let mut global = rope_params(RopeStyle::Neox, rope_dim, theta, 1.0);
        if let Some(s) = scaling.filter(|s| !s.is_null()) {
            apply_hf_rope_scaling(&mut global, s).map_err(cfg_err)?;
        }

        if arch == Arch::Gemma3 {
            cfg.norm_offset = 1.0;
            let qpas = opt_f("query_pre_attn_scalar").unwrap_or(head_dim as f64);
            cfg.attn_scale = (1.0 / qpas.sqrt()) as f32;
            let local_theta = rp
                .and_then(|r| r.get("sliding_attention"))
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .or_else(|| opt_f("rope_local_base_freq"))
                .unwrap_or(10_000.0) as f32;
            let local = rope_params(RopeStyle::Neox, rope_dim, local_theta, 1.0);
            cfg.ropes = vec![global, local];
            let window = c.get("sliding_window").and_then(Value::as_u64).map(|v| v as u32);
            cfg.layers = match c.get("layer_types").and_then(Value::as_array) {
                Some(types) => {
                    if types.len() != cfg.n_layers {
                        return Err(cfg_err(format!(
                            "layer_types has {} entries for {} layers",
                            types.len(),
                            cfg.n_layers
                        )));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("sliding_attention") => Ok(LayerConfig { window, rope: 1 }),
                            Some("full_attention") => Ok(LayerConfig {
                                window: None,
                                rope: 0,
                            }),
                            other => Err(cfg_err(format!("unknown layer type {other:?}"))),
                        })
                        .collect::<Result<_, _>>()?
                }
                None => {
                    let pattern = c
                        .get("sliding_window_pattern")
                        .and_then(Value::as_u64)
                        .unwrap_or(6);
                    gemma3_layers(cfg.n_layers, window, pattern as usize)
                }
            };
        } else {
            cfg.ropes = vec![global];
            cfg.layers = vec![
                LayerConfig {
                    window: None,
                    rope: 0
                };
                cfg.n_layers
            ];
        }
        cfg.check(source)?;
        Ok(cfg)
    }
}

/// Defaults that follow from the architecture alone.
fn base_config(arch: Arch, hidden: usize, n_heads: usize, head_dim: usize) -> ModelConfig {
    let gemma = arch == Arch::Gemma3;
    ModelConfig {
        arch,
        vocab_size: 0,
        hidden,
        n_layers: 0,
        n_heads,
        n_kv_heads: n_heads,
        head_dim,
        ffn_dim: 0,
        rms_eps: 1e-6,
        context_len: 4096,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        qkv_bias: false,
        qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
        post_norms: gemma,
        embed_scale: if gemma { (hidden as f32).sqrt() } else { 1.0 },
        tied_embeddings: false,
        norm_offset: 0.0,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        attn_softcap: None,
        final_softcap: None,
        ropes: Vec::new(),
        layers: Vec::new(),
        moe: None,
    }
}

/// Gemma3's layer pattern: layer i is global when (i + 1) % pattern == 0.
fn gemma3_layers(n_layers: usize, window: Option<u32>, pattern: usize) -> Vec<LayerConfig> {
    (0..n_layers)
        .map(|i| {
            if pattern == 0 || (i + 1) % pattern == 0 || window.is_none() {
                LayerConfig {
                    window: None,
                    rope: 0,
                }
            } else {
                LayerConfig { window, rope: 1 }
            }
        })
        .collect()
}

/// Plain RoPE frequencies `base^(-2i/dim) / linear_factor` for `dim/2` pairs.
pub fn rope_params(style: RopeStyle, dim: usize, base: f32, linear_factor: f32) -> RopeParams {
    let inv_freq = (0..dim / 2)
        .map(|i| {
            let f = (base as f64).powf(-(2.0 * i as f64) / dim as f64) / linear_factor as f64;
            f as f32
        })
        .collect();
    RopeParams {
        style,
        inv_freq,
        mscale: 1.0,
    }
}

/// HF `rope_scaling` / `rope_parameters`: linear and llama3 (the ones the
/// supported architectures use); anything else is an error, not a silent
/// mismatch.
fn apply_hf_rope_scaling(r: &mut RopeParams, s: &Value) -> Result<(), String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let f = |k: &str| s.get(k).and_then(Value::as_f64);
    match kind {
        "default" => Ok(()),
        "linear" => {
            let factor = f("factor").ok_or("linear rope scaling without 'factor'")?;
            for v in &mut r.inv_freq {
                *v = (*v as f64 / factor) as f32;
            }
            Ok(())
        }
        "llama3" => {
            let factor = f("factor").ok_or("llama3 rope scaling without 'factor'")?;
            let low = f("low_freq_factor").unwrap_or(1.0);
            let high = f("high_freq_factor").unwrap_or(4.0);
            let old_ctx = f("original_max_position_embeddings").unwrap_or(8192.0);
            let low_wavelen = old_ctx / low;
            let high_wavelen = old_ctx / high;
            for v in &mut r.inv_freq {
                let freq = *v as f64;
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let scaled = if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / factor
                } else {
                    let smooth = (old_ctx / wavelen - low) / (high - low);
                    (1.0 - smooth) * freq / factor + smooth * freq
                };
                *v = scaled as f32;
            }
            Ok(())
        }
        other => Err(format!("unsupported rope scaling type '{other}'")),
    }
}
