//! The decoder-only transformer: weights on a backend and the forward pass.
//! Every supported architecture runs through `Model::forward`; the
//! differences are fields of `ModelConfig`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use kestrel_backend::{
    AttnParams, Backend, BatchLayout, BlockInput, Graph, KvDType, KvSpec, QkvRows, ResidualNorm,
};
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
    /// Scratch, logits and graphs of forward steps.
    state: Mutex<StepState<B>>,
    /// Whether decode steps may be captured and replayed as graphs (on by
    /// default; off to compare against eager launches, e.g. in `validate`).
    graphs_enabled: std::sync::atomic::AtomicBool,
    /// Thread holding `state` through a `Logits` (to refuse re-entry
    /// instead of deadlocking).
    holder: Mutex<Option<std::thread::ThreadId>>,
    // Declared last so that it is dropped after the weights that may point into it.
    file: Arc<ModelFile>,
}

/// Scratch activations of one forward step, kept per batch size so that
/// steady decoding allocates nothing on the device (and so that captured
/// graphs keep pointing at live buffers).
struct Scratch<B: Backend> {
    x: B::Act,
    /// Normed input of the attention block (and of the LM head).
    h: B::Act,
    /// Normed input of the feed-forward block.
    hf: B::Act,
    t: B::Act,
    q: B::Act,
    k: B::Act,
    v: B::Act,
    attn: B::Act,
    /// Output of the attention block's projection (Wo).
    o: B::Act,
    /// Output of the feed-forward block (down projection).
    f: B::Act,
    gate: B::Act,
    up: B::Act,
    act: B::Act,
}

/// Logits buffers for `m` logit rows: the gathered hidden rows and the logits.
struct LogitBufs<B: Backend> {
    picked: B::Act,
    logits: B::Act,
}

/// A decode graph's key: token count, KV pool, whether the step is
/// greedy-only (its LM head may fold in the argmax, `Backend::matmul_argmax`)
/// and whether rows read keys other rows store (a speculative step: a
/// backend may launch such a step differently, see
/// `BatchLayout::has_chained_rows`).
type GraphKey = (usize, u64, bool, bool);

/// Persistent per-model step state: scratch by token count, logits by logit
/// row count, and decode graphs by `GraphKey`, each with whether its LM head
/// folded in the argmax.
struct StepState<B: Backend> {
    scratch: HashMap<usize, Scratch<B>>,
    logits: HashMap<usize, LogitBufs<B>>,
    graphs: HashMap<GraphKey, (Graph, bool)>,
    /// Keys whose capture failed: run them eagerly from then on.
    no_graph: HashSet<GraphKey>,
    /// Logit row count of the last step (the buffer `Logits` points at).
    current: usize,
    /// Last use (a step counter) of each scratch size and logits size.
    tick: u64,
    used_scratch: HashMap<usize, u64>,
    used_logits: HashMap<usize, u64>,
}

/// Most scratch sets kept (one per token count); older ones are dropped.
const MAX_SCRATCH_SIZES: usize = 48;
/// Most logits elements kept over all row counts (1 GiB of f32): a decode
/// step of n sequences needs n full vocabulary rows, and the engine's batch
/// size wanders, so unbounded per-size buffers would grow without end.
const MAX_LOGIT_ELEMS: usize = 256 << 20;

impl<B: Backend> StepState<B> {
    /// Before a step of `n` tokens and `m` logit rows: marks both sizes as
    /// used and drops the least recently used other sizes (with the graphs
    /// recorded on their buffers) beyond the caps, so that device memory
    /// stays bounded however batch sizes vary.
    fn evict_for(&mut self, n: usize, m: usize, vocab: usize) {
        self.tick += 1;
        self.used_scratch.insert(n, self.tick);
        self.used_logits.insert(m, self.tick);
        while self.scratch.len() >= MAX_SCRATCH_SIZES && !self.scratch.contains_key(&n) {
            let Some(old) = lru(&self.used_scratch, self.scratch.keys(), n) else {
                break;
            };
            self.scratch.remove(&old);
            self.graphs.retain(|k, _| k.0 != old);
        }
        let total = |l: &HashMap<usize, LogitBufs<B>>| l.keys().map(|r| r * vocab).sum::<usize>();
        while !self.logits.contains_key(&m)
            && !self.logits.is_empty()
            && total(&self.logits) + m * vocab > MAX_LOGIT_ELEMS
        {
            let Some(old) = lru(&self.used_logits, self.logits.keys(), m) else {
                break;
            };
            self.logits.remove(&old);
            // Decode graphs write logits of n = m rows.
            self.graphs.retain(|k, _| k.0 != old);
        }
    }
}

/// The least recently used key of `keys` other than `keep`.
fn lru<'a>(used: &HashMap<usize, u64>, keys: impl Iterator<Item = &'a usize>, keep: usize) -> Option<usize> {
    keys.filter(|&&k| k != keep)
        .min_by_key(|&&k| used.get(&k).copied().unwrap_or(0))
        .copied()
}

impl<B: Backend> Default for StepState<B> {
    fn default() -> Self {
        StepState {
            scratch: HashMap::new(),
            logits: HashMap::new(),
            graphs: HashMap::new(),
            no_graph: HashSet::new(),
            current: 0,
            tick: 0,
            used_scratch: HashMap::new(),
            used_logits: HashMap::new(),
        }
    }
}

/// The logits of the last `forward` (`[logit_rows, vocab]`), living in a
/// buffer the model reuses: drop this before the next `forward`.
pub struct Logits<'a, B: Backend> {
    guard: MutexGuard<'a, StepState<B>>,
    holder: &'a Mutex<Option<std::thread::ThreadId>>,
}

impl<B: Backend> Drop for Logits<'_, B> {
    fn drop(&mut self) {
        // Cleared before the guard (a field) is released.
        if let Ok(mut h) = self.holder.lock() {
            *h = None;
        }
    }
}

fn poisoned() -> ModelError {
    ModelError::Request("model step state poisoned by an earlier panic".into())
}

impl<B: Backend> std::ops::Deref for Logits<'_, B> {
    type Target = B::Act;
    fn deref(&self) -> &B::Act {
        // `forward` inserts the buffer for `current` before returning a guard.
        &self.guard.logits[&self.guard.current].logits
    }
}

/// Graphs are captured for decode steps of at most this many sequences, one
/// graph per sequence count (GEMV launches up to 32 rows; cuBLAS GEMMs on
/// the weights' f16 mirrors above that, which capture too). A capture that
/// fails (e.g. a weight without a mirror) leaves that size eager.
const GRAPH_MAX_ROWS: usize = 256;

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

    pub fn from_file(
        file: Arc<ModelFile>,
        config: ModelConfig,
        backend: Arc<B>,
    ) -> Result<Model<B>, ModelError> {
        let src = WeightSource::new(&file, config.arch);
        let source = file.path().display().to_string();
        // Shared by the loading closures below, hence the cells.
        let weight_types = std::cell::RefCell::new(Vec::new());
        let weight_bytes = std::cell::Cell::new(0u64);
        let c = &config;

        let fetch = |name: &str, shape: &[usize]| -> Result<TensorView<'_>, ModelError> {
            let t = src.get(name).ok_or_else(|| ModelError::MissingTensor {
                file: source.clone(),
                name: name.to_string(),
            })?;
            // 1-D tensors may be stored as [1, n] by some writers.
            let got: Vec<usize> = t
                .shape
                .iter()
                .copied()
                .filter(|&d| d != 1 || shape.len() > 1)
                .collect();
            if got != shape {
                return Err(ModelError::Shape {
                    file: source.clone(),
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
        let ropes = config
            .ropes
            .iter()
            .map(|r| be.make_rope(r))
            .collect::<Result<Vec<_>, _>>()?;
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
            state: Mutex::new(StepState::default()),
            holder: Mutex::new(None),
            graphs_enabled: std::sync::atomic::AtomicBool::new(true),
            file,
        })
    }

    /// Allow or forbid graph capture of decode steps (graphs already
    /// captured are dropped when forbidding).
    pub fn set_graphs(&self, enabled: bool) {
        self.graphs_enabled
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
        if !enabled {
            if let Ok(mut st) = self.state.lock() {
                st.graphs.clear();
            }
        }
    }

    /// How many token-count scratch sets and logit-row buffers the model
    /// holds now (bounded: see `MAX_SCRATCH_SIZES`, `MAX_LOGIT_ELEMS`).
    pub fn step_buffer_counts(&self) -> (usize, usize) {
        self.state
            .lock()
            .map(|st| (st.scratch.len(), st.logits.len()))
            .unwrap_or((0, 0))
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
            hf: be.alloc_act(rows, c.hidden)?,
            t: be.alloc_act(rows, c.hidden)?,
            q: be.alloc_act(rows, c.q_dim())?,
            k: be.alloc_act(rows, c.kv_dim())?,
            v: be.alloc_act(rows, c.kv_dim())?,
            attn: be.alloc_act(rows, c.q_dim())?,
            o: be.alloc_act(rows, c.hidden)?,
            f: be.alloc_act(rows, c.hidden)?,
            gate: be.alloc_act(rows, c.ffn_dim)?,
            up: be.alloc_act(rows, c.ffn_dim)?,
            act: be.alloc_act(rows, c.ffn_dim)?,
        })
    }

    /// Run one step: write the batch's K/V into `kv` and return logits
    /// `[logit_rows.len(), vocab]` for the listed token rows. The logits live
    /// in a buffer the model reuses: drop them before the next call (a call
    /// while they are held is an error, not a deadlock).
    pub fn forward(
        &self,
        layout: &BatchLayout,
        kv: &mut B::KvPool,
        logit_rows: &[u32],
    ) -> Result<Logits<'_, B>, ModelError> {
        self.forward_impl(layout, kv, logit_rows, None, false)
    }

    /// `forward` of a step whose logits only feed an argmax (every row
    /// greedy, nothing else read from them): the backend may fold the argmax
    /// into the LM head, and the returned logits may then hold no values;
    /// read them only through `argmax_rows` or `queue_argmax`.
    pub fn forward_greedy(
        &self,
        layout: &BatchLayout,
        kv: &mut B::KvPool,
        logit_rows: &[u32],
    ) -> Result<Logits<'_, B>, ModelError> {
        self.forward_impl(layout, kv, logit_rows, None, true)
    }

    /// `forward` whose first `fed_rows` input tokens are the ids of the
    /// backend's latest `queue_argmax` or `queue_sample` (the layout's
    /// tokens there are placeholders): an overlapped decode step, launched
    /// before the previous step's ids reach the host. With `greedy`, as
    /// `forward_greedy` (the logits may only feed an argmax).
    pub fn forward_fed(
        &self,
        layout: &BatchLayout,
        kv: &mut B::KvPool,
        logit_rows: &[u32],
        fed_rows: usize,
        greedy: bool,
    ) -> Result<Logits<'_, B>, ModelError> {
        self.forward_impl(layout, kv, logit_rows, Some(fed_rows), greedy)
    }

    fn forward_impl(
        &self,
        layout: &BatchLayout,
        kv: &mut B::KvPool,
        logit_rows: &[u32],
        fed_rows: Option<usize>,
        greedy: bool,
    ) -> Result<Logits<'_, B>, ModelError> {
        let n = layout.num_tokens();
        if n == 0 {
            return Err(ModelError::Request("forward called with an empty batch".into()));
        }
        if let Some(&bad) = layout
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Request(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.config.vocab_size
            )));
        }
        if let Some(&bad) = logit_rows.iter().find(|&&r| r as usize >= n) {
            return Err(ModelError::Request(format!(
                "logit row {bad} is outside the batch of {n} tokens"
            )));
        }
        let mut st = match self.state.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::WouldBlock) => {
                // Held by this thread: waiting would never end.
                let mine = self
                    .holder
                    .lock()
                    .map(|h| *h == Some(std::thread::current().id()))
                    .unwrap_or(false);
                if mine {
                    return Err(ModelError::Request(
                        "forward called while the logits of the previous step are still held (drop them first)"
                            .into(),
                    ));
                }
                // Another thread's step (models may be shared): wait for it.
                self.state.lock().map_err(|_| poisoned())?
            }
            Err(std::sync::TryLockError::Poisoned(_)) => return Err(poisoned()),
        };
        if let Ok(mut h) = self.holder.lock() {
            *h = Some(std::thread::current().id());
        }
        let c = &self.config;
        let be = self.backend.as_ref();
        let m = logit_rows.len();
        // Decode steps whose logits are every row, in order, are graph candidates.
        let identity = logit_rows.iter().enumerate().all(|(i, &r)| i as u32 == r) && m == n;
        let decode = layout.seqs.iter().all(|s| s.query_len == 1);
        let graphable = be.supports_graphs()
            && self.graphs_enabled.load(std::sync::atomic::Ordering::Relaxed)
            && identity
            && decode
            && n <= GRAPH_MAX_ROWS;
        if graphable {
            // Generous, so that prefill steps and growing contexts rarely
            // reallocate the metadata (which would make graphs stale).
            let blocks = layout.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
            be.reserve_batch(n.max(4096), layout.seqs.len().max(256), blocks.max(1024))?;
        }
        let mut batch = be.prepare_batch(layout)?;
        if let Some(rows) = fed_rows {
            be.feed_argmax(&mut batch, rows)?;
        }
        st.evict_for(n, m, c.vocab_size);
        if let Entry::Vacant(e) = st.scratch.entry(n) {
            e.insert(self.scratch(n)?);
        }
        if let Entry::Vacant(e) = st.logits.entry(m) {
            e.insert(LogitBufs {
                picked: be.alloc_act(m, c.hidden)?,
                logits: be.alloc_act(m, c.vocab_size)?,
            });
        }
        st.current = m;
        let chained = graphable && n > 1 && layout.has_chained_rows();
        let key = (n, be.pool_id(kv), greedy, chained);
        if graphable {
            if let Some((g, folded)) = st.graphs.get(&key) {
                if be.replay(g)? {
                    if *folded {
                        let m = st.current;
                        if let Some(lb) = st.logits.get(&m) {
                            be.argmax_ready(&lb.logits)?;
                        }
                    }
                    return Ok(Logits {
                        guard: st,
                        holder: &self.holder,
                    });
                }
                st.graphs.remove(&key);
            }
        }
        let state = &mut *st;
        let (s, lb) = match (state.scratch.get_mut(&n), state.logits.get_mut(&m)) {
            (Some(s), Some(l)) => (s, l),
            _ => return Err(ModelError::Request("step buffers missing".into())),
        };
        let folded = self.step(s, lb, &batch, kv, logit_rows, identity, greedy)?;
        if graphable && !state.no_graph.contains(&key) {
            // The eager run above sized every lazily grown scratch buffer;
            // record the same step for replay from the next step on.
            be.begin_capture()?;
            let r = self.step(s, lb, &batch, kv, logit_rows, identity, greedy);
            let g = be.end_capture();
            match (r, g) {
                (Ok(f), Ok(g)) => {
                    // Graphs of pools other than this one are for pools
                    // that are gone or idle: drop them (bounded memory when
                    // callers create pools one after another).
                    state.graphs.retain(|k, _| k.1 == key.1);
                    state.no_graph.retain(|k| k.1 == key.1);
                    state.graphs.insert(key, (g, f));
                }
                (r, g) => {
                    let why = r.err().map(|e| e.to_string()).or(g.err().map(|e| e.to_string()));
                    tracing::warn!("decode graph for {n} rows not captured, running eagerly: {why:?}");
                    state.no_graph.insert(key);
                }
            }
        }
        if folded {
            // Declared after the capture, which records launches only.
            be.argmax_ready(&lb.logits)?;
        }
        Ok(Logits {
            guard: st,
            holder: &self.holder,
        })
    }

    /// The operations of one step (run eagerly or recorded into a graph).
    /// Returns whether the LM head folded in the argmax (greedy steps only).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        s: &mut Scratch<B>,
        lb: &mut LogitBufs<B>,
        batch: &B::Batch,
        kv: &mut B::KvPool,
        logit_rows: &[u32],
        identity: bool,
        greedy: bool,
    ) -> Result<bool, ModelError> {
        let c = &self.config;
        let be = self.backend.as_ref();
        be.embed(&self.embed, batch, c.embed_scale, &mut s.x)?;
        be.rms_norm(&s.x, &self.layers[0].attn_norm, c.rms_eps, &mut s.h)?;
        // Each residual step (post-norm, add, next norm) is handed to the
        // operation that consumes its output, so that a backend may run it
        // inside that operation's launch (CUDA at decode sizes).
        for (i, (lw, lc)) in self.layers.iter().zip(&c.layers).enumerate() {
            // Attention block: projections, q/k norm + RoPE, K/V store; from
            // the second layer on, after the previous FFN's residual step.
            let rows = QkvRows {
                q: &mut s.q,
                k: &mut s.k,
                v: &mut s.v,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
            };
            let w = [&lw.wq, &lw.wk, &lw.wv];
            let bias = [lw.bq.as_ref(), lw.bk.as_ref(), lw.bv.as_ref()];
            let norms = [lw.q_norm.as_ref(), lw.k_norm.as_ref()];
            let rope = &self.ropes[lc.rope];
            let input = match i.checked_sub(1).map(|p| &self.layers[p]) {
                None => BlockInput::Normed(&s.h),
                Some(prev) => BlockInput::Residual {
                    delta: &s.f,
                    step: ResidualNorm {
                        x: &mut s.x,
                        post_norm: prev.post_ffn_norm.as_ref(),
                        next_norm: &lw.attn_norm,
                        eps: c.rms_eps,
                        tmp: &mut s.t,
                        out: &mut s.h,
                    },
                },
            };
            let p = AttnParams {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                scale: c.attn_scale,
                window: lc.window,
                softcap: c.attn_softcap,
            };
            be.attention_block(
                input,
                w,
                bias,
                rows,
                norms,
                c.rms_eps,
                rope,
                kv,
                i,
                batch,
                &p,
                &mut s.attn,
            )?;
            be.matmul(&s.attn, &lw.wo, &mut s.o)?;

            // Feed-forward block after the attention block's residual step.
            let res = ResidualNorm {
                x: &mut s.x,
                post_norm: lw.post_attn_norm.as_ref(),
                next_norm: &lw.ffn_norm,
                eps: c.rms_eps,
                tmp: &mut s.t,
                out: &mut s.hf,
            };
            let w = [&lw.w_gate, &lw.w_up, &lw.w_down];
            be.ffn_block(
                BlockInput::Residual {
                    delta: &s.o,
                    step: res,
                },
                w,
                c.activation,
                &mut s.gate,
                &mut s.up,
                &mut s.act,
                &mut s.f,
            )?;
        }
        // The last FFN's residual step and the final norm.
        let last = self
            .layers
            .last()
            .ok_or_else(|| ModelError::Request("model has no layers".into()))?;
        be.residual_norm(
            &mut s.x,
            &s.f,
            last.post_ffn_norm.as_ref(),
            &self.output_norm,
            c.rms_eps,
            &mut s.t,
            &mut s.h,
        )?;

        // Only the rows that need logits go through the (large) LM head.
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let x = if identity {
            &s.h
        } else {
            be.gather_rows(&s.h, logit_rows, &mut lb.picked)?;
            &lb.picked
        };
        // A final softcap could turn distinct logits into equal ones (and so
        // change which comes first): those models keep the logits.
        if greedy && c.final_softcap.is_none() {
            return Ok(be.matmul_argmax(x, head, &mut lb.logits)?);
        }
        be.matmul(x, head, &mut lb.logits)?;
        if let Some(cap) = c.final_softcap {
            be.softcap(&mut lb.logits, cap)?;
        }
        Ok(false)
    }
}
