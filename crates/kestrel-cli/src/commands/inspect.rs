//! `kestrel inspect`: what a model file holds and what it needs to run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kestrel_formats::{ModelFile, TensorInfo};
use kestrel_model::ModelConfig;
use serde_json::json;

use crate::{loading, model_path};

#[derive(Args, Clone, Debug)]
pub struct InspectArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model).
    pub model: Option<PathBuf>,
    /// Context length for the memory estimate (default: the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// List every tensor.
    #[arg(long)]
    pub tensors: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: InspectArgs) -> Result<()> {
    let path = model_path::resolve(a.model.clone())?;
    let file = ModelFile::open(&path)?;
    let (config, infos, format) = match &file {
        ModelFile::Gguf(g) => (
            ModelConfig::from_gguf(g)?,
            g.tensor_infos().to_vec(),
            format!("GGUF v{}", g.version()),
        ),
        ModelFile::Safetensors(st) => (
            ModelConfig::from_hf(st.config(), &st.dir().join("config.json").display().to_string())?,
            st.tensor_infos(),
            "safetensors directory".to_string(),
        ),
    };
    let tok = loading::tokenizer_for(&file);

    let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut weight_bytes = 0u64;
    for t in &infos {
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes as u64;
        weight_bytes += t.n_bytes as u64;
    }
    let n_params: u64 = infos
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let ctx = a.ctx.unwrap_or(config.context_len);
    let kv_f16 = config.kv_bytes_per_token(2) as u64;
    let kv_f32 = config.kv_bytes_per_token(4) as u64;
    let c = &config;
    let sliding: Vec<_> = c.layers.iter().map(|l| l.window).collect();
    let n_sliding = sliding.iter().filter(|w| w.is_some()).count();

    if a.json {
        let tensors: Vec<_> = infos.iter().map(tensor_json).collect();
        let j = json!({
            "path": path.display().to_string(),
            "format": format,
            "architecture": c.arch.name(),
            "parameters": n_params,
            "hyperparameters": {
                "vocab_size": c.vocab_size, "hidden": c.hidden, "layers": c.n_layers,
                "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
                "ffn": c.ffn_dim, "rms_eps": c.rms_eps, "context_length": c.context_len,
                "activation": format!("{:?}", c.activation), "qkv_bias": c.qkv_bias,
                "qk_norm": c.qk_norm, "post_norms": c.post_norms, "embed_scale": c.embed_scale,
                "tied_embeddings": c.tied_embeddings, "attn_scale": c.attn_scale,
                "sliding_window_layers": n_sliding,
                "layer_windows": sliding,
                "rope": c.ropes.iter().map(|r| json!({"style": format!("{:?}", r.style), "dims": 2 * r.inv_freq.len(), "inv_freq_first": r.inv_freq.first(), "inv_freq_last": r.inv_freq.last()})).collect::<Vec<_>>(),
            },
            "tensor_types": by_type.iter().map(|(k, (n, b))| (k.to_string(), json!({"count": n, "bytes": b}))).collect::<BTreeMap<_, _>>(),
            "tensors": if a.tensors { json!(tensors) } else { json!(null) },
            "tokenizer": match &tok {
                Ok(t) => json!({"vocab_size": t.vocab_size(), "bos": t.bos_id(), "eos": t.eos_ids(), "add_bos": t.add_bos_default(), "chat_template": format!("{:?}", t.chat_template_source())}),
                Err(e) => json!({"error": e.to_string()}),
            },
            "memory": {
                "weights_bytes": weight_bytes,
                "kv_bytes_per_token_f16": kv_f16,
                "kv_bytes_per_token_f32": kv_f32,
                "context": ctx,
                "total_bytes_f16_kv": weight_bytes + kv_f16 * ctx as u64,
            },
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }

    println!("{}", path.display());
    println!(
        "  format        {format}, {:.1} MB of tensors, {:.1} M parameters",
        weight_bytes as f64 / 1e6,
        n_params as f64 / 1e6
    );
    println!("  architecture  {}", c.arch.name());
    println!(
        "  layers        {} (hidden {}, FFN {}, {:?})",
        c.n_layers, c.hidden, c.ffn_dim, c.activation
    );
    println!(
        "  attention     {} heads, {} KV heads, head dim {}, scale {:.4}{}",
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.attn_scale,
        if c.qk_norm { ", q/k norm" } else { "" }
    );
    if n_sliding > 0 {
        let w = sliding.iter().flatten().next().copied().unwrap_or(0);
        println!(
            "  sliding       {n_sliding} of {} layers use a {w}-token window",
            c.n_layers
        );
    }
    for (i, r) in c.ropes.iter().enumerate() {
        println!(
            "  rope[{i}]       {:?}, {} dims, inv_freq {:.3e} .. {:.3e}",
            r.style,
            2 * r.inv_freq.len(),
            r.inv_freq.first().copied().unwrap_or(0.0),
            r.inv_freq.last().copied().unwrap_or(0.0)
        );
    }
    println!(
        "  misc          vocab {}, context {}, rms eps {:e}, embed scale {:.3}, tied LM head: {}, qkv bias: {}, post norms: {}",
        c.vocab_size, c.context_len, c.rms_eps, c.embed_scale, c.tied_embeddings, c.qkv_bias, c.post_norms
    );
    println!("  tensor types");
    for (k, (n, b)) in &by_type {
        println!("    {k:<6} {n:>4} tensors  {:>9.1} MB", *b as f64 / 1e6);
    }
    match &tok {
        Ok(t) => println!(
            "  tokenizer     vocab {}, bos {:?}, eos {:?}, add bos {}, chat template: {:?}",
            t.vocab_size(),
            t.bos_id(),
            t.eos_ids(),
            t.add_bos_default(),
            t.chat_template_source()
        ),
        Err(e) => println!("  tokenizer     unavailable: {e:#}"),
    }
    println!(
        "  memory        weights {:.1} MB + KV {:.1} KB/token (f16; {:.1} KB f32) -> {:.1} MB at {ctx} tokens (f16 KV)",
        weight_bytes as f64 / 1e6,
        kv_f16 as f64 / 1e3,
        kv_f32 as f64 / 1e3,
        (weight_bytes + kv_f16 * ctx as u64) as f64 / 1e6
    );
    if a.tensors {
        for t in &infos {
            println!("    {:<40} {:<5} {:?}", t.name, t.dtype.name(), t.shape);
        }
    }
    Ok(())
}

fn tensor_json(t: &TensorInfo) -> serde_json::Value {
    json!({"name": t.name, "type": t.dtype.name(), "shape": t.shape, "bytes": t.n_bytes})
}
