//! The decoder-only transformer: weights on a backend and the forward pass.
//! Every supported architecture runs through `Model::forward`; the
//! differences are fields of `ModelConfig`.

use std::path::Path;
use std::sync::Arc;

use kestrel_backend::{AttnParams, Backend, BatchLayout, KvDType, KvSpec};
use kestrel_formats::{DType, ModelFile, TensorView};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::names::WeightSource;

/// Weights of one transformer block on backend `B`.
pub struct LayerWeights<B: Backend> {
    pub attn_norm: B::Vector,
    pub wq: B::Weight,
    pub wk: B::Weight,
    pub wv: B::Weight,
    pub wo: B::Weight,
    pub bq: Option<B::Vector>,
    pub bk: Option<B::Vector>,
    pub bv: Option<B::Vector>,
    pub q_norm: Option<B::Vector>,
    pub k_norm: Option<B::Vector>,
    pub post_attn_norm: Option<B::Vector>,
    pub ffn_norm: B::Vector,
    pub w_gate: B::Weight,
    pub w_up: B::Weight,
    pub w_down: B::Weight,
    pub post_ffn_norm: Option<B::Vector>,
}

/// A loaded model: configuration, the mapped file (which backends may borrow
/// weight bytes from) and the weights uploaded to backend `B`.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub backend: Arc<B>,
    embed: B::Weight,
    lm_head: Option<B::Weight>,
    output_norm: B::Vector,
    layers: Vec<LayerWeights<B>>,
    ropes: Vec<B::Rope>,
    /// Stored dtypes of the weights, for reports.
    pub weight_types: Vec<(String, DType)>,
    /// Bytes of weights uploaded.
    pub weight_bytes: u64,
    // Declared last so that it is dropped after the weights that may point into it.
    file: Arc<ModelFile>,
}

/// Scratch activations of one forward step.
struct Scratch<B: Backend> {
    x: B::Act,
    h: B::Act,
    q: B::Act,
    k: B::Act,
    v: B::Act,
    attn: B::Act,
    o: B::Act,
    gate: B::Act,
    up: B::Act,
    act: B::Act,
}

impl<B: Backend> Model<B> {
    /// Open a GGUF file or HF directory and upload its weights to `backend`.
    pub fn load(path: &Path, backend: Arc<B>) -> Result<Model<B>, ModelError> {
        let file = Arc::new(ModelFile::open(path)?);
        let config = match file.as_ref() {
            ModelFile::Gguf(g) => ModelConfig::from_gguf(g)?,
            ModelFile::Safetensors(st) => {
                ModelConfig::from_hf(st.config(), &st.dir().join("config.json").display().to_string())?
            }
        };
        Self::from_file(file, config, backend)
    }

    pub fn from_file(file: Arc<ModelFile>, config: ModelConfig, backend: Arc<B>) -> Result<Model<B>, ModelError> {
        let src = WeightSource::new(&file, config.arch);
        let source = file.path().display().to_string();
        // Shared by the loading closures below, hence the cells.
        let weight_types = std::cell::RefCell::new(Vec::new());
        let weight_bytes = std::cell::Cell::new(0u64);
        let c = &config;

        let fetch = |name: &str, shape: &[usize]| -> Result<TensorView<'_>, ModelError> {
            let t = src
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { file: source.clone(), name: name.to_string() })?;
            // 1-D tensors may be stored as [1, n] by some writers.
            let got: Vec<usize> = t.shape.iter().copied().filter(|&d| d != 1 || shape.len() > 1).collect();
            if got != shape {
                return Err(ModelError::Shape { file: source.clone(),
                    name: name.to_string(),
                    got: t.shape.to_vec(),
                    expected: shape.to_vec(),
                });
            }
            weight_types.borrow_mut().push((name.to_string(), t.dtype));
            weight_bytes.set(weight_bytes.get() + t.data.len() as u64);
            Ok(t)
        };
        let be = backend.as_ref();
        let norm_off = c.norm_offset;
        let embed = be.upload_matrix(&fetch("token_embd.weight", &[c.vocab_size, c.hidden])?)?;
        let lm_head = if c.tied_embeddings {
            None
        } else {
            Some(be.upload_matrix(&fetch("output.weight", &[c.vocab_size, c.hidden])?)?)
        };
        let output_norm = be.upload_vector(&fetch("output_norm.weight", &[c.hidden])?, norm_off)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let n = |t: &str| format!("blk.{i}.{t}");
            let mat = |t: &str, shape: &[usize]| -> Result<B::Weight, ModelError> {
                Ok(be.upload_matrix(&fetch(&n(t), shape)?)?)
            };
            let wq = mat("attn_q.weight", &[c.q_dim(), c.hidden])?;
            let wk = mat("attn_k.weight", &[c.kv_dim(), c.hidden])?;
            let wv = mat("attn_v.weight", &[c.kv_dim(), c.hidden])?;
            let wo = mat("attn_output.weight", &[c.hidden, c.q_dim()])?;
            let w_gate = mat("ffn_gate.weight", &[c.ffn_dim, c.hidden])?;
            let w_up = mat("ffn_up.weight", &[c.ffn_dim, c.hidden])?;
            let w_down = mat("ffn_down.weight", &[c.hidden, c.ffn_dim])?;
            let vec = |t: &str, len: usize, offset: f32| -> Result<B::Vector, ModelError> {
                Ok(be.upload_vector(&fetch(&n(t), &[len])?, offset)?)
            };
            let attn_norm = vec("attn_norm.weight", c.hidden, norm_off)?;
            let ffn_norm = vec("ffn_norm.weight", c.hidden, norm_off)?;
            let (bq, bk, bv) = if c.qkv_bias {
                (
                    Some(vec("attn_q.bias", c.q_dim(), 0.0)?),
                    Some(vec("attn_k.bias", c.kv_dim(), 0.0)?),
                    Some(vec("attn_v.bias", c.kv_dim(), 0.0)?),
                )
            } else {
                (None, None, None)
            };
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(vec("attn_q_norm.weight", c.head_dim, norm_off)?),
                    Some(vec("attn_k_norm.weight", c.head_dim, norm_off)?),
                )
            } else {
                (None, None)
            };
            let (post_attn_norm, post_ffn_norm) = if c.post_norms {
                (
                    Some(vec("post_attention_norm.weight", c.hidden, norm_off)?),
                    Some(vec("post_ffw_norm.weight", c.hidden, norm_off)?),
                )
            } else {
                (None, None)
            };
            layers.push(LayerWeights {
                attn_norm,
                wq,
                wk,
                wv,
                wo,
                bq,
                bk,
                bv,
                q_norm,
                k_norm,
                post_attn_norm,
                ffn_norm,
                w_gate,
                w_up,
                w_down,
                post_ffn_norm,
            });
        }
        let ropes = config.ropes.iter().map(|r| be.make_rope(r)).collect::<Result<Vec<_>, _>>()?;
        Ok(Model {
            config,
            backend,
            embed,
            lm_head,
            output_norm,
            layers,
            ropes,
            weight_types: weight_types.into_inner(),
            weight_bytes: weight_bytes.get(),
            file,
        })
    }

    pub fn file(&self) -> &ModelFile {
        &self.file
    }

    /// A KV pool of `num_blocks` blocks of `block_size` tokens for this model.
    pub fn kv_spec(&self, num_blocks: usize, block_size: usize, dtype: KvDType) -> KvSpec {
        KvSpec {
            n_layers: self.config.n_layers,
            num_blocks,
            block_size,
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            dtype,
        }
    }

    fn scratch(&self, rows: usize) -> Result<Scratch<B>, ModelError> {
        let c = &self.config;
        let be = self.backend.as_ref();
        Ok(Scratch {
            x: be.alloc_act(rows, c.hidden)?,
            h: be.alloc_act(rows, c.hidden)?,
            q: be.alloc_act(rows, c.q_dim())?,
            k: be.alloc_act(rows, c.kv_dim())?,
            v: be.alloc_act(rows, c.kv_dim())?,
            attn: be.alloc_act(rows, c.q_dim())?,
            o: be.alloc_act(rows, c.hidden)?,
            gate: be.alloc_act(rows, c.ffn_dim)?,
            up: be.alloc_act(rows, c.ffn_dim)?,
            act: be.alloc_act(rows, c.ffn_dim)?,
        })
    }

    /// Run one step: write the batch's K/V into `kv` and return logits
    /// `[logit_rows.len(), vocab]` for the listed token rows.
    pub fn forward(
        &self,
        layout: &BatchLayout,
        kv: &mut B::KvPool,
        logit_rows: &[u32],
    ) -> Result<B::Act, ModelError> {
        let n = layout.num_tokens();
        if n == 0 {
            return Err(ModelError::Request("forward called with an empty batch".into()));
        }
        if let Some(&bad) = layout.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        if let Some(&bad) = logit_rows.iter().find(|&&r| r as usize >= n) {
            return Err(ModelError::Request(format!("logit row {bad} is outside the batch of {n} tokens")));
        }
        let c = &self.config;
        let be = self.backend.as_ref();
        let batch = be.prepare_batch(layout)?;
        let mut s = self.scratch(n)?;

        be.embed(&self.embed, &batch, c.embed_scale, &mut s.x)?;
        be.rms_norm(&s.x, &self.layers[0].attn_norm, c.rms_eps, &mut s.h)?;
        for (i, (lw, lc)) in self.layers.iter().zip(&c.layers).enumerate() {
            // Attention block.
            be.matmul(&s.h, &lw.wq, &mut s.q)?;
            be.matmul(&s.h, &lw.wk, &mut s.k)?;
            be.matmul(&s.h, &lw.wv, &mut s.v)?;
            if let (Some(bq), Some(bk), Some(bv)) = (&lw.bq, &lw.bk, &lw.bv) {
                be.add_bias(&mut s.q, bq)?;
                be.add_bias(&mut s.k, bk)?;
                be.add_bias(&mut s.v, bv)?;
            }
            let rope = &self.ropes[lc.rope];
            be.qk_norm_rope(&mut s.q, c.n_heads, c.head_dim, lw.q_norm.as_ref(), c.rms_eps, rope, &batch)?;
            be.qk_norm_rope(&mut s.k, c.n_kv_heads, c.head_dim, lw.k_norm.as_ref(), c.rms_eps, rope, &batch)?;
            be.write_kv(kv, i, &s.k, &s.v, &batch)?;
            let p = AttnParams {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: c.attn_scale,
                window: lc.window,
                softcap: c.attn_softcap,
            };
            be.attention(&s.q, kv, i, &batch, &p, &mut s.attn)?;
            be.matmul(&s.attn, &lw.wo, &mut s.o)?;
            if let Some(pn) = &lw.post_attn_norm {
                // Reuse `h` (free until the FFN norm) for the normed output.
                be.rms_norm(&s.o, pn, c.rms_eps, &mut s.h)?;
                std::mem::swap(&mut s.o, &mut s.h);
            }
            be.add_rms_norm(&mut s.x, &s.o, &lw.ffn_norm, c.rms_eps, &mut s.h)?;

            // Feed-forward block.
            be.matmul(&s.h, &lw.w_gate, &mut s.gate)?;
            be.matmul(&s.h, &lw.w_up, &mut s.up)?;
            be.gated_activation(&s.gate, &s.up, c.activation, &mut s.act)?;
            be.matmul(&s.act, &lw.w_down, &mut s.o)?;
            if let Some(pn) = &lw.post_ffn_norm {
                be.rms_norm(&s.o, pn, c.rms_eps, &mut s.h)?;
                std::mem::swap(&mut s.o, &mut s.h);
            }
            // Residual add fused with the next norm: the next layer's
            // attention norm, or the final norm after the last layer.
            let next_norm = match self.layers.get(i + 1) {
                Some(next) => &next.attn_norm,
                None => &self.output_norm,
            };
            be.add_rms_norm(&mut s.x, &s.o, next_norm, c.rms_eps, &mut s.h)?;
        }

        // Only the rows that need logits go through the (large) LM head.
        let mut picked = be.alloc_act(logit_rows.len(), c.hidden)?;
        be.gather_rows(&s.h, logit_rows, &mut picked)?;
        let mut logits = be.alloc_act(logit_rows.len(), c.vocab_size)?;
        be.matmul(&picked, self.lm_head.as_ref().unwrap_or(&self.embed), &mut logits)?;
        if let Some(cap) = c.final_softcap {
            be.softcap(&mut logits, cap)?;
        }
        Ok(logits)
    }
}
