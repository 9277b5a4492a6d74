//! Tensor names. The model asks for weights by their GGUF (llama.cpp) names;
//! for Hugging Face directories this module translates them.

use kestrel_formats::{ModelFile, TensorView};

use crate::config::Arch;

/// A model file seen through canonical (GGUF) tensor names.
pub struct WeightSource<'a> {
    file: &'a ModelFile,
    arch: Arch,
    /// Prefix of the language model's tensors in an HF checkpoint
    /// ("model." usually; multimodal gemma3 nests it deeper).
    hf_prefix: String,
}

impl<'a> WeightSource<'a> {
    pub fn new(file: &'a ModelFile, arch: Arch) -> Self {
        let hf_prefix = match file {
            ModelFile::Gguf(_) => String::new(),
            ModelFile::Safetensors(st) => ["model.", "model.language_model.", "language_model.model."]
                .into_iter()
                .find(|p| st.tensor(&format!("{p}embed_tokens.weight")).is_some())
                .unwrap_or("model.")
                .to_string(),
        };
        WeightSource {
            file,
            arch,
            hf_prefix,
        }
    }

    pub fn get(&self, canonical: &str) -> Option<TensorView<'a>> {
        match self.file {
            ModelFile::Gguf(g) => g.tensor(canonical),
            ModelFile::Safetensors(st) => {
                let name = self.hf_name(canonical)?;
                st.tensor(&name)
            }
        }
    }

    /// The HF name of a canonical tensor name, None where HF has no such tensor.
    fn hf_name(&self, canonical: &str) -> Option<String> {
        let p = &self.hf_prefix;
        match canonical {
            "token_embd.weight" => return Some(format!("{p}embed_tokens.weight")),
            "output_norm.weight" => return Some(format!("{p}norm.weight")),
            "output.weight" => {
                // lm_head sits beside the `model.` prefix, not under it.
                let outer = p.strip_suffix("model.").unwrap_or("");
                return Some(format!("{outer}lm_head.weight"));
            }
            _ => {}
        }
        let rest = canonical.strip_prefix("blk.")?;
        let (layer, tail) = rest.split_once('.')?;
        let gemma = self.arch == Arch::Gemma3;
        let hf_tail = match tail {
            "attn_norm.weight" => "input_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_q.bias" => "self_attn.q_proj.bias",
            "attn_k.bias" => "self_attn.k_proj.bias",
            "attn_v.bias" => "self_attn.v_proj.bias",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "attn_q_norm.weight" => "self_attn.q_norm.weight",
            "attn_k_norm.weight" => "self_attn.k_norm.weight",
            // In llama/qwen checkpoints `post_attention_layernorm` is the norm
            // before the FFN; gemma has both a real post-attention norm and a
            // separate pre-FFN norm.
            "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
            "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            _ => return None,
        };
        Some(format!("{p}layers.{layer}.{hf_tail}"))
    }
}
