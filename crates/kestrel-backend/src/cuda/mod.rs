//! CUDA backend: kernels compiled at run time by NVRTC (cached on disk),
//! quantized weights kept in their stored precision on the device,
//! dequant-fused GEMV for decode, cuBLAS for prefill, paged attention, and
//! persistent batch-metadata buffers so that decode steps can be captured
//! into CUDA graphs and replayed (see `graph.rs`).
//!
//! Two kernel sets: `Fused` (the fast path) and `Reference` (plain kernels:
//! whole-row dequantize + naive dot, unfused norms and RoPE, three-pass
//! attention, host argmax) so that the two can be compared token by token.

mod argmax_queue;
mod boundary;
mod buffers;
mod compile;
mod device;
mod fused;
mod graph;
mod knobs;
mod knockout;
mod l2;
mod launch;
mod lt_gemm;
mod matmul;
mod megakernel;
mod meta;
mod sampling;
mod timing;
mod trace;
mod weights;

#[cfg(test)]
mod cross_check;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::CudaModule;
use kestrel_formats::TensorView;

pub use boundary::BoundaryCost;
pub use buffers::{CudaAct, CudaBatch, CudaKvPool, CudaRope, CudaVector, CudaWeight, DevBuf};
pub use device::device_count;
pub use graph::DecodeGraph;

use crate::backend::{
    attention_block_unfused, qk_norm_rope_store_unfused, qkv_unfused, residual_norm_unfused, Activation,
    Backend, BlockInput, Graph, QkvRows, Result,
};
use crate::error::BackendError;
use crate::layout::{AttnParams, BatchLayout, KvSpec, RopeParams};
use crate::memory::MemClass;
use device::Device;
use launch::{grid_for, i32_of, Arg, Kernels};
use meta::Meta;

/// Whether the grouped attention kernels may be used (tuning knob
/// `KESTREL_ATTN_GQA=0` keeps the per-head kernel, for A/B runs).
fn gqa_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| knobs::on_unless_zero("KESTREL_ATTN_GQA"))
}

/// Attention work items (blocks) per SM that key splitting aims at (tuning
/// knob `KESTREL_ATTN_ITEMS_PER_SM`, default 2, for A/B runs).
fn attn_items_per_sm() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        knobs::usize_of("KESTREL_ATTN_ITEMS_PER_SM")
            .filter(|&n| (1..=16).contains(&n))
            .unwrap_or(2)
    })
}

/// Block-table entries a decode-tile attention item keeps in shared memory
/// (`ATT_TBL` in attention.cu).
pub(crate) const ATT_TBL: usize = 64;

/// Grouped-query decode attention kernels by log2 of the query heads per KV head.
const ATTENTION_GQA: [&str; 4] = [
    "attention_gqa1",
    "attention_gqa2",
    "attention_gqa4",
    "attention_gqa8",
];

/// Key-per-lane attention kernels (32-key tiles per warp) by log2 of the
/// query heads per KV head.
const ATTENTION_TILE: [&str; 4] = [
    "attention_tile1",
    "attention_tile2",
    "attention_tile4",
    "attention_tile8",
];

/// Whether decode steps may use the shared-memory-tile decode kernels
/// (`attention_dec*`; tuning knob `KESTREL_ATTN_DEC=0` keeps the
/// key-per-warp kernels, for A/B runs).
fn dec_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| knobs::on_unless_zero("KESTREL_ATTN_DEC"))
}

/// Tile items resident per SM (see `attention` for the split count).
const DEC_ITEMS_PER_SM: usize = 2;

/// Split count of the `attention_dec*` kernels when set (tuning knob
/// `KESTREL_ATTN_DEC_SPLITS`, for A/B runs; unset or 0: one wave of
/// `DEC_ITEMS_PER_SM` items per SM, capped by `set_max_attention_splits`).
fn dec_splits_override() -> Option<usize> {
    static N: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *N.get_or_init(|| knobs::usize_of("KESTREL_ATTN_DEC_SPLITS").filter(|&n| n > 0))
}

/// Decode steps with fewer (row, KV head) items than this keep the
/// key-per-warp kernel: a tile item's fixed cost (a chain of barriers and
/// shuffles) is larger. H200, default model (one KV head), decode tok/s
/// tile / key-per-warp: 1 sequence 17 / 10 us per layer; 32 sequences
/// 30,831 / 32,331; 64: 55,953 / 55,350; 128: 93,671 / 91,406; 256:
/// 144,187 / 111,923.
const DEC_MIN_ITEMS: usize = 64;

/// Dynamic shared memory of an `attention_dec*` item (`dec_smem_bytes` in
/// attention.cu): K and V tiles of 8 warps × 32/G keys, the G query heads
/// in f32, the tile's scores, per-head state and the block-table copy.
pub(crate) fn attention_dec_smem(group: usize, head_dim: usize) -> usize {
    let t = 8 * (32 / group);
    t * head_dim * 4 + group * head_dim * 4 + (t * group + 36 * group + 1) * 4 + ATT_TBL * 4
}

/// Whether decode steps that take the per-head kernel run `attention_pre`,
/// which reads the position, block table and first keys before waiting for
/// the previous kernel (tuning knob `KESTREL_ATTN_PRE=0` keeps `attention`,
/// for A/B runs).
fn pre_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| knobs::on_unless_zero("KESTREL_ATTN_PRE"))
}

/// Default of `set_attention_keys_per_split` (tuning knob `KESTREL_ATTN_KPS`).
fn default_keys_per_split() -> usize {
    knobs::usize_of("KESTREL_ATTN_KPS").unwrap_or(16)
}

/// Default of `set_attention_min_splits` (tuning knob
/// `KESTREL_ATTN_MIN_SPLITS`).
fn default_min_splits() -> usize {
    knobs::usize_of("KESTREL_ATTN_MIN_SPLITS").unwrap_or(DEFAULT_MIN_SPLITS)
}

/// At least 8 splits at one sequence from the first generated token: H200,
/// default model, tg128 1,600-1,625 tok/s with a floor of 1 against
/// 1,671-1,702 with 8 (four rounds), the batch curve and a 2,000-token
/// context unchanged (benchmarks/NOTES-cuda.md, session 12).
const DEFAULT_MIN_SPLITS: usize = 8;

/// Whether steps with several query rows per sequence (prefill) take the
/// key-per-lane kernels (tuning knob `KESTREL_ATTN_TILE=0` keeps the
/// per-head / grouped ones).
fn tile_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| knobs::on_unless_zero("KESTREL_ATTN_TILE"))
}

/// The kernels' code for an activation (`act` in elementwise.cu and
/// gemv.cu: 0 = SiLU, 1 = GELU tanh).
pub(crate) fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
    }
}

/// Decode fusions (bits of `set_fusions` / `KESTREL_PROLOGUE`): the
/// residual step inside the next GEMV, act(gate) * up inside the down GEMV,
/// the q/k norm + RoPE + K/V store inside attention.
pub const FUSE_RESIDUAL: u8 = 1;
pub const FUSE_GATED: u8 = 2;
pub const FUSE_ROPE: u8 = 4;
pub const FUSE_ALL: u8 = 7;
/// Off by default: measured slower or no faster than the 9-launch layer
/// (H100 / H200, tg128: all three 1,174 vs 1,471 tok/s; residual alone
/// 1,190, gated alone 1,406, rope alone 1,471; benchmarks/NOTES-cuda.md,
/// session 9).
pub const FUSE_DEFAULT: u8 = 0;

/// Which kernels the backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSet {
    /// Fused, fast kernels.
    Fused,
    /// Plain kernels for validation (`--kernels reference`).
    Reference,
}

impl std::str::FromStr for KernelSet {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<KernelSet> {
        match s {
            "fused" => Ok(KernelSet::Fused),
            "reference" => Ok(KernelSet::Reference),
            _ => Err(BackendError::Other(format!(
                "--kernels: expected 'fused' or 'reference', got '{s}'"
            ))),
        }
    }
}

/// Mutable state shared by operations: metadata, scratch, handles.
#[derive(Default)]
pub(crate) struct State {
    meta: Meta,
    x16: Option<DevBuf>,
    w16: Option<DevBuf>,
    blas: Option<cudarc::cublas::CudaBlas>,
    /// cuBLASLt handle and per-shape plans (`KESTREL_GEMM=lt|tune`).
    lt: Option<lt_gemm::LtGemm>,
    gather: Option<DevBuf>,
    ids: Option<DevBuf>,
    /// (logits address, rows) of a greedy step whose LM head wrote its
    /// argmax keys into `ids` instead of logits (`matmul_argmax`): the next
    /// argmax of that buffer uses them instead of launching its own.
    argmax_ready: Option<(u64, usize)>,
    /// Partial results of split attention, and per-(row, head) counters of
    /// finished splits (zero between launches).
    att_part: Option<DevBuf>,
    att_count: Option<DevBuf>,
    /// Output of a stacked-weight GEMM (`[rows, Σ weight rows]`).
    stacked_out: Option<DevBuf>,
    capturing: bool,
    /// cuBLAS workspace set on the handle (so that captured GEMMs never
    /// allocate).
    blas_ws: Option<DevBuf>,
    /// Device sampling: per-row parameters, penalty pairs, chosen ids.
    sample_rows: Option<DevBuf>,
    sample_pens: Option<DevBuf>,
    sample_out: Option<DevBuf>,
    /// The chunked sampler's row keys, chunk masses and row counters.
    sample_keys: Option<DevBuf>,
    sample_sums: Option<DevBuf>,
    sample_count: Option<DevBuf>,
    /// Pinned copies of the chunked sampler's row parameters, used in turn
    /// (see `launch_chunked`), and which one is next.
    sample_staging: [Option<buffers::PinnedStaging<u8>>; 2],
    sample_next: usize,
    /// Argmax ids queued for overlapped decode steps.
    queued: argmax_queue::ArgmaxQueue,
}

pub struct CudaBackend {
    dev: Device,
    /// Upper bound of the key splits of decode attention (tuning knob).
    max_attn_splits: std::sync::atomic::AtomicUsize,
    /// Whether decode steps may take the `attention_dec*` kernels.
    attn_dec: std::sync::atomic::AtomicBool,
    /// Keys per split of `attention_pre` (0: always the launch's splits).
    attn_kps: std::sync::atomic::AtomicUsize,
    /// Fewest splits of `attention_pre` however short the context (at least 1).
    attn_min_splits: std::sync::atomic::AtomicUsize,
    /// Most activation rows an f16 GEMM runs on `hgemm_*` (0: cuBLAS only).
    hgemm_rows: std::sync::atomic::AtomicUsize,
    /// Whether the LM head's Q8_0 kernels read the tiled copy (mma_q8.cu).
    lmhead_tiled: std::sync::atomic::AtomicBool,
    /// Most activation rows the GEMV kernels take when weights have f16
    /// mirrors (`matmul::default_gemv_rows`).
    gemv_rows: std::sync::atomic::AtomicUsize,
    _module: Arc<CudaModule>,
    /// Attention phase stamps (`KESTREL_TRACE=1`, cuda/trace.rs), reported
    /// when the backend is dropped.
    trace: Option<DevBuf>,
    k: Kernels,
    kernels: KernelSet,
    state: Mutex<State>,
    /// Ticket counter of `gemvp` launches with the residual step (zero
    /// between launches: the last block resets it). One stream, so one
    /// counter serves every launch.
    gp_counter: DevBuf,
    /// Which decode fusions run (bits `FUSE_*`): GEMVs that form their
    /// activation in the launch (`gemv_prologue`) instead of after a
    /// residual-step or gated-activation launch, and RoPE inside attention.
    /// `KESTREL_PROLOGUE=<bits>` sets them at start (default `FUSE_DEFAULT`).
    prologue: std::sync::atomic::AtomicU8,
    /// Device bytes still allowed for f16 weight mirrors (see
    /// `CudaWeight::dense`); set from `KESTREL_DENSE_WEIGHTS` (MiB, 0 = off),
    /// by default an eighth of the device's memory.
    dense_budget: std::sync::atomic::AtomicUsize,
    /// Address of the activation whose f16 copy the producer launched last
    /// left in the activation scratch (0: none); see `mark_f16_side_output`.
    x16_src: std::sync::atomic::AtomicU64,
    /// Whether captures also record a decode megakernel program
    /// (megakernel.rs); `KESTREL_MEGAKERNEL=1` starts it on.
    mega: std::sync::atomic::AtomicBool,
    /// The launches of the step being captured (Some only while capturing).
    recorder: Mutex<Option<megakernel::Recorder>>,
    /// Whether `recorder` holds a recording: every launch checks this
    /// instead of taking the recorder's lock.
    recording: std::sync::atomic::AtomicBool,
    /// Decode steps run as megakernel programs so far.
    mega_launches: std::sync::atomic::AtomicU64,
}

fn shape_err(op: &str, msg: String) -> BackendError {
    BackendError::Other(format!("{op}: {msg}"))
}

/// The pool has layer `layer` and a slot for every token of `batch`
/// (checked before any kernel writes K/V into it).
fn check_kv_target(op: &str, pool: &CudaKvPool, layer: usize, batch: &CudaBatch) -> Result<()> {
    if layer >= pool.spec.n_layers {
        return Err(shape_err(op, format!("layer {layer} of {}", pool.spec.n_layers)));
    }
    if batch.num_tokens > 0 && batch.max_slot as usize >= pool.slots() {
        return Err(shape_err(
            op,
            format!("slot {} beyond the pool's {} slots", batch.max_slot, pool.slots()),
        ));
    }
    Ok(())
}

fn same_shape(op: &str, a: &CudaAct, b: &CudaAct) -> Result<()> {
    if a.rows != b.rows || a.cols != b.cols {
        return Err(shape_err(
            op,
            format!(
                "shapes [{}, {}] and [{}, {}] differ",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    Ok(())
}

impl CudaBackend {
    /// Opens device `ordinal` with the fused kernels.
    pub fn new(ordinal: usize) -> Result<CudaBackend> {
        Self::with_kernels(ordinal, KernelSet::Fused)
    }

    /// For tests that need a GPU: device 0 with `kernels`, or None after
    /// printing "SKIP: no CUDA device" where this machine has none. Where a
    /// device is present and the backend still fails to start, it panics: a
    /// broken build must not pass as skipped.
    pub fn for_tests(kernels: KernelSet) -> Option<CudaBackend> {
        match Self::with_kernels(0, kernels) {
            Ok(b) => Some(b),
            Err(e) => {
                assert_eq!(
                    device_count(),
                    0,
                    "a GPU is present but the CUDA backend failed: {e}"
                );
                println!("SKIP: no CUDA device: {e}");
                None
            }
        }
    }

    /// Opens device `ordinal`; errors (never panics) when no driver, NVRTC,
    /// cuBLAS or GPU is available, saying which.
    pub fn with_kernels(ordinal: usize, kernels: KernelSet) -> Result<CudaBackend> {
        let dev = Device::open(ordinal)?;
        let module = compile::load_module(&dev.ctx, dev.cc)?;
        l2::apply(&dev, &module)?;
        let trace = trace::setup(&dev, &module)?;
        let k = Kernels::load(&module, dev.cc)?;
        // The decode tiles need more than the default 48 KiB of shared memory.
        for (name, group) in [("attention_dec4", 4), ("attention_dec8", 8)] {
            k.set_max_dynamic_smem(name, attention_dec_smem(group, 256) as u32)?;
        }
        for tiles in [1, 2, 4, 8] {
            k.set_max_dynamic_smem(&format!("mma_q8_0_{tiles}"), matmul::MMA_SMEM_MAX as u32)?;
            k.set_max_dynamic_smem(&format!("mma_q8_0_argmax_{tiles}"), matmul::MMA_SMEM_MAX as u32)?;
            k.set_max_dynamic_smem(&format!("mma_q8_0t_{tiles}"), matmul::MMA_SMEM_MAX as u32)?;
            k.set_max_dynamic_smem(&format!("mma_q8_0t_argmax_{tiles}"), matmul::MMA_SMEM_MAX as u32)?;
        }
        let gp_counter = DevBuf::alloc(&dev.stream, 4, "gemvp ticket counter")?;
        let prologue = std::env::var("KESTREL_PROLOGUE")
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(FUSE_DEFAULT);
        let dense_budget = match std::env::var("KESTREL_DENSE_WEIGHTS") {
            Ok(v) => v.trim().parse::<usize>().map(|mib| mib << 20).map_err(|_| {
                BackendError::Other(format!(
                    "KESTREL_DENSE_WEIGHTS='{v}': expected a size in MiB (0 turns the f16 weight mirrors off)"
                ))
            })?,
            Err(_) => dev.total_mem / 8,
        };
        Ok(CudaBackend {
            dense_budget: std::sync::atomic::AtomicUsize::new(dense_budget),
            x16_src: std::sync::atomic::AtomicU64::new(0),
            mega: std::sync::atomic::AtomicBool::new(megakernel::enabled_by_env()),
            recorder: Mutex::new(None),
            recording: std::sync::atomic::AtomicBool::new(false),
            mega_launches: std::sync::atomic::AtomicU64::new(0),
            gp_counter,
            prologue: std::sync::atomic::AtomicU8::new(prologue & FUSE_ALL),
            dev,
            max_attn_splits: std::sync::atomic::AtomicUsize::new(32),
            attn_dec: std::sync::atomic::AtomicBool::new(dec_enabled()),
            attn_kps: std::sync::atomic::AtomicUsize::new(default_keys_per_split()),
            attn_min_splits: std::sync::atomic::AtomicUsize::new(default_min_splits().max(1)),
            hgemm_rows: std::sync::atomic::AtomicUsize::new(matmul::default_hgemm_rows()),
            lmhead_tiled: std::sync::atomic::AtomicBool::new(true),
            gemv_rows: std::sync::atomic::AtomicUsize::new(matmul::default_gemv_rows()),
            _module: module,
            trace,
            k,
            kernels,
            state: Mutex::new(State::default()),
        })
    }

    /// Switches every decode fusion (`FUSE_ALL`) on or off (default off,
    /// see `FUSE_DEFAULT`). Graphs captured before a change keep the old
    /// kernels.
    pub fn set_prologue(&self, on: bool) {
        self.set_fusions(if on { FUSE_ALL } else { 0 });
    }

    /// Selects the decode fusions one by one (bits `FUSE_RESIDUAL`,
    /// `FUSE_GATED`, `FUSE_ROPE`; `KESTREL_PROLOGUE` gives the same number).
    pub fn set_fusions(&self, bits: u8) {
        self.prologue
            .store(bits & FUSE_ALL, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn fusion_on(&self, bit: u8) -> bool {
        self.prologue.load(std::sync::atomic::Ordering::Relaxed) & bit != 0
    }

    /// Caps how many blocks split one query row's keys in fused attention
    /// (1..=32; default 32). A tuning knob for benchmarks; graphs captured
    /// before a change keep the old split count.
    pub fn set_max_attention_splits(&self, n: usize) {
        self.max_attn_splits
            .store(n.clamp(1, 32), std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets decode steps use (or not) the shared-memory-tile decode
    /// attention (default on; `KESTREL_ATTN_DEC=0` starts it off). Off, decode
    /// attention runs the per-head kernel whose bits the decode megakernel
    /// reproduces (its test compares the two). Graphs captured before a
    /// change keep the old kernel.
    pub fn set_attention_dec(&self, on: bool) {
        self.attn_dec.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Visible keys per split of decode attention on the per-head kernel
    /// (`attention_pre`): a row uses one split per `n` keys, at most the
    /// launch's split count, so short contexts merge few partials (0: always
    /// the launch's count, the bits of `attention`; default 16,
    /// `KESTREL_ATTN_KPS`). Graphs captured before a change keep the old value.
    pub fn set_attention_keys_per_split(&self, n: usize) {
        self.attn_kps.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Fewest splits decode attention on the per-head kernel
    /// (`attention_pre`) uses however short the context; the launch's split
    /// count caps it (default 8, `KESTREL_ATTN_MIN_SPLITS`). Graphs captured
    /// before a change keep the old value.
    pub fn set_attention_min_splits(&self, n: usize) {
        self.attn_min_splits
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether tall Q8_0 products (the LM head) read the tiled copy made at
    /// upload, where there is one (default on; `KESTREL_LMHEAD_TILED=0`
    /// makes none; see mma_q8.cu). Graphs captured before a change keep the
    /// old choice.
    pub fn set_lmhead_tiled(&self, on: bool) {
        self.lmhead_tiled.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Most activation rows an f16 GEMM runs on the `hgemm_*` kernels
    /// rather than cuBLAS (default 32, `KESTREL_HGEMM_ROWS`; at most 64, 0:
    /// cuBLAS only). Graphs captured before a change keep the old choice.
    pub fn set_hgemm_rows(&self, n: usize) {
        self.hgemm_rows.store(
            n.min(matmul::HGEMM_MAX_ROWS),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Most activation rows that take the GEMV kernels when the weights have
    /// f16 mirrors (default 0: every matmul of a step on the mirrors,
    /// `KESTREL_GEMV_ROWS`; at most 8). Graphs captured before a change keep
    /// the old choice.
    pub fn set_gemv_rows(&self, n: usize) {
        self.gemv_rows
            .store(n.min(matmul::GEMV_MAX_ROWS), std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn gemv_rows(&self) -> usize {
        self.gemv_rows.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn kernel_set(&self) -> KernelSet {
        self.kernels
    }

    /// Multiprocessor count of the device.
    pub fn sm_count(&self) -> i32 {
        self.dev.sm_count
    }

    /// `gate = h · W_gateᵀ`, `up = h · W_upᵀ` on the fused set: one
    /// two-weight GEMV launch for decode-sized batches, one conversion and
    /// two GEMMs on the f16 mirrors above that; plain matmuls otherwise.
    fn gate_up(
        &self,
        op: &str,
        h: &CudaAct,
        w: [&CudaWeight; 2],
        gate: &mut CudaAct,
        up: &mut CudaAct,
    ) -> Result<()> {
        let fused = self.kernels == KernelSet::Fused;
        if fused && self.multi_gemv_fits(h.rows, &w) {
            if gate.rows != h.rows || up.rows != h.rows {
                return Err(shape_err(
                    op,
                    format!("gate/up do not have the {} rows of h", h.rows),
                ));
            }
            return self.multi_gemv(h, &w, &[gate.ptr(), up.ptr()], &[gate.cols, up.cols]);
        }
        if fused && Self::multi_gemm_fits(&w) {
            return self.multi_gemm(h, &w, &mut [gate, up]);
        }
        self.matmul(h, w[0], gate)?;
        self.matmul(h, w[1], up)
    }

    /// `act_out = act(W_gate·h) * (W_up·h)`: at GEMM sizes one GEMM on the
    /// stacked gate/up mirror and one activation launch reading its output
    /// (`gate` and `up` are then left unwritten); `gate_up` and
    /// `gated_activation` otherwise.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_act(
        &self,
        op: &str,
        h: &CudaAct,
        w: [&CudaWeight; 2],
        act: Activation,
        gate: &mut CudaAct,
        up: &mut CudaAct,
        act_out: &mut CudaAct,
    ) -> Result<()> {
        let gemm_sized = !self.multi_gemv_fits(h.rows, &w);
        if gemm_sized && w[0].rows == w[1].rows && act_out.rows == h.rows && act_out.cols == w[0].rows {
            if let Some(src) = self.stacked_gemm(h, &w)? {
                let n = act_out.rows * act_out.cols;
                let out16 = self.f16_side_output(act_out)?;
                self.elementwise(
                    "gated_act_ld",
                    n,
                    &[
                        Arg::Ptr(src),
                        Arg::I64(2 * act_out.cols as i64),
                        i32_of(act_out.cols, "ffn columns")?,
                        Arg::I32(act_code(act)),
                        Arg::I64(n as i64),
                        Arg::Ptr(act_out.ptr()),
                        Arg::Ptr(out16),
                    ],
                )?;
                self.mark_f16_side_output(act_out, out16);
                return Ok(());
            }
        }
        self.gate_up(op, h, w, gate, up)?;
        self.gated_activation(gate, up, act, act_out)
    }

    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| BackendError::Other("CUDA backend state poisoned by an earlier panic".into()))
    }

    pub(crate) fn run(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        // Whatever this launch writes, the f16 scratch no longer matches a
        // producer's output unless that producer marks it again afterwards.
        self.x16_src.store(0, std::sync::atomic::Ordering::Relaxed);
        self.record(name, grid, block, smem, args);
        if knockout::skips(name) {
            return Ok(());
        }
        self.k.launch(&self.dev.stream, name, grid, block, smem, args)
    }

    /// Pre-sizes the batch metadata (and argmax/gather buffers) so that no
    /// reallocation happens inside a captured graph or between replays.
    pub fn reserve_batch(&self, max_tokens: usize, max_seqs: usize, max_blocks_per_seq: usize) -> Result<()> {
        let mut st = self.lock()?;
        st.meta
            .reserve(&self.dev.stream, max_tokens, max_seqs, max_blocks_per_seq)?;
        self.argmax_keys(&mut st, max_tokens * 8)?;
        Self::ensure(&self.dev, &mut st.gather, max_tokens * 4, "gather indices")?;
        Ok(())
    }

    /// A scratch buffer that captured graphs point into, grown to at least
    /// `bytes`: growing it marks earlier graphs stale (they hold the old
    /// address and are captured again), and is refused while capturing (a
    /// capture must not allocate).
    pub(crate) fn graph_scratch(
        &self,
        st: &mut State,
        pick: fn(&mut State) -> &mut Option<DevBuf>,
        bytes: usize,
        what: &str,
    ) -> Result<u64> {
        if pick(st).as_ref().is_none_or(|b| b.bytes < bytes) {
            if st.capturing {
                return Err(BackendError::Other(format!(
                    "{what}: a graph capture must not allocate; run the step once before capturing"
                )));
            }
            st.meta.epoch += 1;
        }
        Self::ensure(&self.dev, pick(st), bytes, what)
    }

    /// The argmax key buffer (a `graph_scratch`), grown to at least `bytes`
    /// with its contents kept: a queued argmax's keys must survive until the
    /// next step feeds on them (`feed_argmax`), and a step may grow the
    /// buffer in between (`reserve_batch` at the first decode step after a
    /// prefill once put a zero key, token 0, into the second generated
    /// token).
    pub(crate) fn argmax_keys(&self, st: &mut State, bytes: usize) -> Result<u64> {
        let old = st.ids.take_if(|b| b.bytes < bytes);
        let ptr = match self.graph_scratch(st, |s| &mut s.ids, bytes, "argmax keys") {
            Ok(p) => p,
            Err(e) => {
                // Refused (while capturing): the keys stay where they were.
                if old.is_some() {
                    st.ids = old;
                }
                return Err(e);
            }
        };
        if let Some(old) = old {
            // SAFETY: the new buffer is larger than the old one; the copy is
            // ordered on the stream after every write of the old keys, and
            // the old buffer's free (its drop here) after the copy.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    ptr,
                    old.ptr,
                    old.bytes,
                    self.dev.stream.cu_stream(),
                )
            }
            .map_err(|e| BackendError::Cuda(format!("keeping the argmax keys: {e}")))?;
        }
        Ok(ptr)
    }

    fn ensure(dev: &Device, b: &mut Option<DevBuf>, bytes: usize, what: &str) -> Result<u64> {
        if b.as_ref().is_none_or(|x| x.bytes < bytes) {
            *b = Some(DevBuf::alloc(
                &dev.stream,
                bytes.next_power_of_two().max(256),
                what,
            )?);
        }
        b.as_ref()
            .map(|x| x.ptr)
            .ok_or_else(|| BackendError::Other(format!("{what}: buffer missing")))
    }

    fn check_batch(&self, b: &CudaBatch) -> Result<()> {
        let st = self.lock()?;
        if b.write_id != st.meta.write_id {
            return Err(BackendError::Other(
                "stale batch: a later prepare_batch overwrote its device metadata (use one batch per step)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Host-to-device copy ordered on the backend's stream, then a wait.
    /// Copies always go through the stream: memory from the stream-ordered
    /// allocator may still be in use by earlier work of any stream until
    /// this stream reaches it, which a legacy synchronous copy ignores.
    fn htod<T>(&self, dst: u64, src: &[T], what: &str) -> Result<()> {
        // A host write may land on an activation whose address a producer
        // marked (see `mark_f16_side_output`): forget the mark.
        self.x16_src.store(0, std::sync::atomic::Ordering::Relaxed);
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        // SAFETY: callers pass a device range of at least size_of_val(src) bytes;
        // `src` outlives the copy because the stream is synchronized below.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.dev.stream.cu_stream()) }
            .map_err(|e| BackendError::Cuda(format!("{what}: {e}")))?;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| BackendError::Cuda(format!("{what}: {e}")))
    }

    /// Device-to-host copy ordered on the backend's stream, then a wait.
    fn dtoh<T>(&self, dst: &mut [T], src: u64, what: &str) -> Result<()> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        // SAFETY: callers pass a device range of at least size_of_val(dst) bytes;
        // `dst` stays borrowed until the stream is synchronized below.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.dev.stream.cu_stream()) }
            .map_err(|e| BackendError::Cuda(format!("{what}: {e}")))?;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| BackendError::Cuda(format!("{what}: {e}")))
    }

    /// Allocations and synchronous copies cannot be part of a graph.
    fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.lock()?.capturing {
            return Err(BackendError::Unsupported(format!(
                "{what} inside a graph capture"
            )));
        }
        Ok(())
    }

    fn upload_bytes(&self, class: MemClass, bytes: &[u8], what: &str) -> Result<DevBuf> {
        self.refuse_in_capture(what)?;
        let buf = DevBuf::alloc_in(class, &self.dev.stream, bytes.len(), what)?;
        self.htod(buf.ptr, bytes, &format!("uploading {what}"))?;
        Ok(buf)
    }

    fn upload_f32(&self, v: &[f32], what: &str) -> Result<DevBuf> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.upload_bytes(MemClass::Weights, &bytes, what)
    }

    /// Writes f32 values into an existing activation (tests, host inputs).
    pub fn write_act(&self, a: &mut CudaAct, v: &[f32]) -> Result<()> {
        self.refuse_in_capture("write_act")?;
        if v.len() != a.rows * a.cols {
            return Err(shape_err(
                "write_act",
                format!("{} values for [{}, {}]", v.len(), a.rows, a.cols),
            ));
        }
        self.htod(a.ptr(), v, "write_act")
    }

    /// Queues the on-device argmax of every row of `x` into the backend's id
    /// buffer (capturable; `reserve_batch` first). Fetch with `fetch_argmax`.
    pub fn launch_argmax(&self, x: &CudaAct) -> Result<()> {
        let keys = {
            let mut st = self.lock()?;
            if st.argmax_ready.take() == Some((x.ptr(), x.rows)) {
                return Ok(());
            }
            if st.capturing && st.ids.as_ref().is_none_or(|b| b.bytes < x.rows * 8) {
                return Err(BackendError::Other(
                    "argmax during capture needs reserve_batch first".into(),
                ));
            }
            self.argmax_keys(&mut st, x.rows * 8)?
        };
        if x.rows == 0 {
            return Ok(());
        }
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        // SAFETY: the key buffer holds at least rows * 8 bytes.
        unsafe { cudarc::driver::result::memset_d8_async(keys, 0, x.rows * 8, self.dev.stream.cu_stream()) }
            .map_err(|e| BackendError::Cuda(format!("clearing argmax keys: {e}")))?;
        // About four 256-thread blocks per SM in all, each thread streaming
        // many 16-byte loads (at least one): 2K-element blocks (8 per
        // thread) made 8,192 blocks at 64 rows of Gemma's 262,144 logits and
        // took 34 us, about half the bandwidth.
        let sms = self.dev.sm_count.max(1) as usize;
        let per_row = (4 * sms).div_ceil(x.rows).clamp(1, x.cols.div_ceil(1024).max(1)) as u32;
        self.run(
            "argmax_rows",
            (per_row, x.rows as u32, 1),
            256,
            0,
            &[Arg::Ptr(x.ptr()), i32_of(x.cols, "cols")?, Arg::Ptr(keys)],
        )
    }

    /// Waits for the stream and returns the first `rows` ids of the last `launch_argmax`.
    pub fn fetch_argmax(&self, rows: usize) -> Result<Vec<u32>> {
        let st = self.lock()?;
        if st.capturing {
            return Err(BackendError::Unsupported(
                "fetch_argmax inside a graph capture".into(),
            ));
        }
        let keys = st
            .ids
            .as_ref()
            .ok_or_else(|| BackendError::Other("fetch_argmax before launch_argmax".into()))?;
        if keys.bytes < rows * 8 {
            return Err(BackendError::Other(format!(
                "fetch_argmax: {rows} rows exceed the id buffer"
            )));
        }
        let mut out = vec![0u64; rows];
        self.dtoh(&mut out, keys.ptr, "reading argmax ids")?;
        Ok(out.iter().map(|&k| argmax_queue::id_of_key(k)).collect())
    }

    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        self.run(name, (grid_for(n), 1, 1), 256, 0, args)
    }

    fn norm_threads(cols: usize) -> u32 {
        (cols.div_ceil(32) * 32).clamp(32, 1024) as u32
    }
}

/// The q/k norm + RoPE + K/V store that `attention_rope` runs inside
/// attention: this step's raw k and v, the norms and the RoPE table.
pub(crate) struct RopeFusion<'a> {
    k: &'a CudaAct,
    v: &'a CudaAct,
    norms: [Option<&'a CudaVector>; 2],
    eps: f32,
    rope: &'a CudaRope,
}

impl CudaBackend {
    /// `attention`, or with `fusion` (whose caller holds the pool
    /// exclusively) the q/k norm + RoPE + K/V store of this step's raw q, k,
    /// v inside the same launch (`attention_rope`): only where the per-head
    /// kernel runs (`rope_attention_takes`), an error otherwise.
    #[allow(clippy::too_many_arguments)]
    fn attention_with(
        &self,
        q: &CudaAct,
        pool: &CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
        p: &AttnParams,
        out: &mut CudaAct,
        fusion: Option<RopeFusion<'_>>,
    ) -> Result<()> {
        self.check_batch(batch)?;
        same_shape("attention", q, out)?;
        if p.head_dim != pool.spec.head_dim || p.n_kv_heads != pool.spec.n_kv_heads {
            return Err(shape_err(
                "attention",
                format!("params {p:?} do not match the pool {:?}", pool.spec),
            ));
        }
        if p.n_heads.checked_rem(p.n_kv_heads) != Some(0) {
            return Err(shape_err(
                "attention",
                format!("{} heads not a multiple of {} KV heads", p.n_heads, p.n_kv_heads),
            ));
        }
        if q.cols != p.n_heads * p.head_dim || q.rows != batch.num_tokens {
            return Err(shape_err(
                "attention",
                format!(
                    "q [{}, {}] is not [{} tokens, {}×{}]",
                    q.rows, q.cols, batch.num_tokens, p.n_heads, p.head_dim
                ),
            ));
        }
        if layer >= pool.spec.n_layers {
            return Err(shape_err(
                "attention",
                format!("layer {layer} of {}", pool.spec.n_layers),
            ));
        }
        if batch.block_size != pool.spec.block_size {
            return Err(shape_err(
                "attention",
                format!(
                    "batch block_size {} but pool block_size {}",
                    batch.block_size, pool.spec.block_size
                ),
            ));
        }
        if batch.num_seqs > 0 && batch.max_block as usize >= pool.spec.num_blocks {
            return Err(shape_err(
                "attention",
                format!(
                    "block id {} beyond the pool's {}",
                    batch.max_block, pool.spec.num_blocks
                ),
            ));
        }
        let (lo, vo) = pool.offsets(layer);
        let window = p.window.map(|w| w.min(i32::MAX as u32) as i32).unwrap_or(0);
        let cap = p.softcap.unwrap_or(0.0);
        let mut args = vec![
            Arg::Ptr(q.ptr()),
            Arg::Ptr(pool.buf.ptr),
            Arg::I64(lo),
            Arg::I64(vo),
            Arg::I32(pool.dtype_code()),
            Arg::Ptr(batch.positions),
            Arg::Ptr(batch.token_seq),
            Arg::Ptr(batch.block_tables),
            i32_of(batch.bt_stride, "bt_stride")?,
            i32_of(batch.block_size, "block_size")?,
        ];
        if self.kernels == KernelSet::Reference {
            args.push(i32_of(q.rows, "rows")?);
        }
        args.extend([
            i32_of(p.n_heads, "n_heads")?,
            i32_of(p.n_kv_heads, "n_kv_heads")?,
            i32_of(p.head_dim, "head_dim")?,
            Arg::F32(p.scale),
            Arg::I32(window),
            Arg::F32(cap),
            Arg::Ptr(out.ptr()),
        ]);
        if self.kernels == KernelSet::Reference {
            let n = q.rows * p.n_heads * p.head_dim;
            return self.run("attention_ref", (n.div_ceil(128) as u32, 1, 1), 128, 0, &args);
        }
        if p.head_dim > 256 {
            return Err(BackendError::Unsupported(format!(
                "fused attention with head_dim {} (max 256)",
                p.head_dim
            )));
        }
        let group = p.n_heads / p.n_kv_heads.max(1);
        let (grouped, dec, tile) = self.attention_kind(q.rows, batch, p, pool);
        let target = attn_items_per_sm() * self.dev.sm_count.max(1) as usize;
        if fusion.is_some() && grouped {
            return Err(BackendError::Other(
                "attention_rope: the step does not take the per-head kernel".into(),
            ));
        }
        // att_smem_floats / att_gqa_smem_floats in attention.cu.
        let smem = if dec {
            attention_dec_smem(group, p.head_dim) as u32
        } else if grouped {
            ((5 * group * p.head_dim + 41 * group + 1) * 4) as u32
        } else if fusion.is_some() {
            // attention_rope's head buffer after the item's memory.
            ((6 * p.head_dim + 8 + 34) * 4) as u32
        } else {
            ((5 * p.head_dim + 8 + 34) * 4) as u32
        };
        // Split the keys over enough blocks to fill the GPU twice; the count
        // depends only on the launch shape, so captured graphs stay valid.
        let heads = if grouped { p.n_kv_heads } else { p.n_heads };
        let blocks = q.rows * heads;
        let cap = self.max_attn_splits.load(std::sync::atomic::Ordering::Relaxed);
        let splits = if dec {
            // Two 256-thread tile items fit an SM (128 registers, 67 KB of
            // shared memory at head_dim 256): split only as far as one wave
            // holds (H200, 64 sequences: 5 splits ran 320 items, 1.21 waves,
            // 36 us per layer in ncu).
            dec_splits_override()
                .unwrap_or(DEC_ITEMS_PER_SM * self.dev.sm_count.max(1) as usize / blocks.max(1))
                .clamp(1, cap)
        } else {
            target.div_ceil(blocks.max(1)).clamp(1, cap)
        };
        let (part, counters) = if splits > 1 {
            // Partials per query head; counters per item (at most one per query head).
            let blocks = q.rows * p.n_heads;
            let bytes = blocks * splits * (p.head_dim + 2) * 4;
            let mut st = self.lock()?;
            let part = self.graph_scratch(&mut st, |s| &mut s.att_part, bytes, "attention partials")?;
            // A fresh (zeroed) counter buffer whenever it must grow.
            let counters = self.graph_scratch(
                &mut st,
                |s| &mut s.att_count,
                blocks * 4,
                "attention split counters",
            )?;
            (part, counters)
        } else {
            (0, 0)
        };
        args.extend([Arg::I32(splits as i32), Arg::Ptr(part), Arg::Ptr(counters)]);
        // The Wo GEMM of a batched step reads the output in f16.
        let out16 = self.f16_side_output(out)?;
        args.push(Arg::Ptr(out16));
        let name = if dec {
            if group == 4 {
                "attention_dec4"
            } else {
                "attention_dec8"
            }
        } else if tile {
            ATTENTION_TILE[group.trailing_zeros() as usize]
        } else if grouped {
            ATTENTION_GQA[group.trailing_zeros() as usize]
        } else if fusion.is_some() {
            "attention_rope"
        } else if pre_enabled()
            && q.rows == batch.num_seqs
            && !self.recording.load(std::sync::atomic::Ordering::Relaxed)
        {
            // A decode step: keys other than each row's own position were
            // stored by earlier steps, so they may be read before the wait.
            "attention_pre"
        } else {
            "attention"
        };
        if let Some(f) = fusion {
            args.remove(0);
            args.extend(self.rope_fusion_args(q, f, pool, layer, batch, p)?);
        }
        if name == "attention_pre" {
            let kps = self.attn_kps.load(std::sync::atomic::Ordering::Relaxed);
            args.push(i32_of(kps, "keys per split")?);
            let kmin = self.attn_min_splits.load(std::sync::atomic::Ordering::Relaxed);
            args.push(i32_of(kmin, "minimum attention splits")?);
        }
        if dec || name == "attention_pre" {
            // Which keys they may read before the PDL wait.
            args.push(Arg::Ptr(batch.fresh));
        }
        self.run(
            name,
            (q.rows as u32, heads as u32, splits as u32),
            if dec { 256 } else { 128 },
            smem,
            &args,
        )?;
        self.mark_f16_side_output(out, out16);
        Ok(())
    }

    /// Which attention kernel a step takes: (grouped, decode tiles, key
    /// tiles); none of them means the per-head kernel.
    fn attention_kind(
        &self,
        rows: usize,
        batch: &CudaBatch,
        p: &AttnParams,
        pool: &CudaKvPool,
    ) -> (bool, bool, bool) {
        // One item per KV head serves its whole query-head group (K/V read
        // once) where the grouped kernel fits; the per-head kernel otherwise,
        // and while a step is recorded for the decode megakernel, whose
        // attention op is the per-head item (same bits, see attention.cu).
        let group = p.n_heads / p.n_kv_heads.max(1);
        // The grouped kernel has G times fewer items, each G times the
        // work: it wins only once the per-head grid fills the GPU twice
        // without splitting keys (H200, default model, 4 query heads per KV
        // head: engine decode at 128 sequences 67,348 -> 79,127 tok/s; at 64,
        // where the per-head grid still splits, 50,335 -> 47,238; at one row
        // 9 -> 19 us per call).
        let target = attn_items_per_sm() * self.dev.sm_count.max(1) as usize;
        let groupable = p.head_dim.is_multiple_of(8)
            && p.n_heads.is_multiple_of(p.n_kv_heads.max(1))
            && matches!(group, 1 | 2 | 4 | 8)
            && !self.recording.load(std::sync::atomic::Ordering::Relaxed);
        // Steps with more query rows than sequences (prefill, chunked
        // prefill) take the key tiles (H200, pp512: 142,157 -> 196,007
        // tok/s); in decode steps they lose (64 sequences: 49,906 ->
        // 41,636), there the per-head or grouped kernel runs.
        let tile = groupable && tile_enabled() && rows > batch.num_seqs;
        // Decode steps of many sequences with 16-bit KV and 4 or 8 query
        // heads per KV head take the shared-memory tiles.
        let dec = groupable
            && !tile
            && self.attn_dec.load(std::sync::atomic::Ordering::Relaxed)
            && rows == batch.num_seqs
            && rows * p.n_kv_heads >= DEC_MIN_ITEMS
            && matches!(group, 4 | 8)
            && matches!(pool.spec.dtype, crate::KvDType::F16 | crate::KvDType::Bf16);
        let grouped = dec || tile || (groupable && gqa_enabled() && rows * p.n_heads > target);
        (grouped, dec, tile)
    }

    /// Whether `attention_block` can run the q/k norm + RoPE + K/V store
    /// inside attention (`attention_rope`): a decode step of at most
    /// `PROLOGUE_MAX_ROWS` sequences that takes the per-head kernel, on the
    /// fused set with the fusions on.
    fn rope_attention_takes(
        &self,
        rows: usize,
        batch: &CudaBatch,
        p: &AttnParams,
        pool: &CudaKvPool,
        rope: &CudaRope,
    ) -> bool {
        self.kernels == KernelSet::Fused
            && self.fusion_on(FUSE_ROPE)
            && !self.mega.load(std::sync::atomic::Ordering::Relaxed)
            && !self.recording.load(std::sync::atomic::Ordering::Relaxed)
            && (1..=fused::PROLOGUE_MAX_ROWS).contains(&rows)
            && rows == batch.num_seqs
            && rows == batch.num_tokens
            // Its items store their row's key themselves: a row that reads
            // another row's key would race with that store.
            && !batch.chained
            && p.head_dim <= 256
            && 2 * rope.n_pairs <= p.head_dim
            && self.attention_kind(rows, batch, p, pool) == (false, false, false)
    }

    /// The arguments `attention_rope` takes after `attention`'s (less q).
    fn rope_fusion_args(
        &self,
        q: &CudaAct,
        f: RopeFusion<'_>,
        pool: &CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
        p: &AttnParams,
    ) -> Result<Vec<Arg>> {
        let kv_dim = p.n_kv_heads * p.head_dim;
        same_shape("attention_rope (k, v)", f.k, f.v)?;
        if f.k.rows != q.rows || f.k.cols != kv_dim {
            return Err(shape_err(
                "attention_rope",
                format!("k [{}, {}] is not [{}, {kv_dim}]", f.k.rows, f.k.cols, q.rows),
            ));
        }
        let norm_rope = fused::norm_rope_args(
            "attention_rope",
            f.norms,
            f.eps,
            f.rope,
            p.head_dim,
            pool,
            layer,
            batch,
        )?;
        let mut args = vec![Arg::Ptr(q.ptr()), Arg::Ptr(f.k.ptr()), Arg::Ptr(f.v.ptr())];
        args.extend(norm_rope);
        args.push(Arg::Ptr(batch.slots));
        Ok(args)
    }
}

impl Backend for CudaBackend {
    type Act = CudaAct;
    type Weight = CudaWeight;
    type Vector = CudaVector;
    type Rope = CudaRope;
    type KvPool = CudaKvPool;
    type Batch = CudaBatch;

    fn describe(&self) -> String {
        format!(
            "cuda ({}, {:.1} GiB, sm_{}{}, {} SMs, {} kernels{})",
            self.dev.name,
            self.dev.total_mem as f64 / (1u64 << 30) as f64,
            self.dev.cc.0,
            self.dev.cc.1,
            self.dev.sm_count,
            match self.kernels {
                KernelSet::Fused => "fused",
                KernelSet::Reference => "reference",
            },
            if self.k.pdl() { ", PDL" } else { "" }
        )
    }

    fn upload_matrix(&self, t: &TensorView<'_>) -> Result<CudaWeight> {
        static NEXT_WEIGHT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let p = weights::pack(t)?;
        let buf = self.upload_bytes(MemClass::Weights, &p.bytes, t.name)?;
        let mut w = CudaWeight {
            buf,
            format: p.format,
            stored: p.stored,
            name: t.name.to_string(),
            rows: t.shape[0],
            cols: t.shape[1],
            off1: p.off1,
            off2: p.off2,
            dense: None,
            id: NEXT_WEIGHT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            stacked: std::sync::OnceLock::new(),
            tiled: None,
        };
        w.dense = self.dense_mirror(&w)?;
        w.tiled = self.q8_tiled_copy(&w)?;
        Ok(w)
    }

    fn upload_vector(&self, t: &TensorView<'_>, offset: f32) -> Result<CudaVector> {
        let v = t.to_f32().map_err(|e| BackendError::Tensor {
            name: t.name.to_string(),
            problem: e.to_string(),
        })?;
        let v: Vec<f32> = v.into_iter().map(|x| x + offset).collect();
        let buf = self.upload_f32(&v, t.name)?;
        Ok(CudaVector { buf, len: v.len() })
    }

    fn make_rope(&self, p: &RopeParams) -> Result<CudaRope> {
        if p.inv_freq.is_empty() {
            return Err(BackendError::Other("RopeParams.inv_freq is empty".into()));
        }
        let buf = self.upload_f32(&p.inv_freq, "rope inv_freq")?;
        Ok(CudaRope {
            buf,
            n_pairs: p.inv_freq.len(),
            style: p.style,
            mscale: p.mscale,
        })
    }

    fn alloc_kv(&self, spec: &KvSpec) -> Result<CudaKvPool> {
        self.refuse_in_capture("alloc_kv")?;
        if spec.block_size == 0 || spec.num_blocks == 0 || spec.n_kv_heads == 0 || spec.head_dim == 0 {
            return Err(BackendError::Other(format!(
                "KvSpec has a zero dimension: {spec:?}"
            )));
        }
        let buf = DevBuf::alloc_in(MemClass::Kv, &self.dev.stream, spec.bytes(), "KV pool")?;
        static NEXT_POOL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(CudaKvPool {
            buf,
            spec: spec.clone(),
            id: NEXT_POOL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn alloc_act(&self, rows: usize, cols: usize) -> Result<CudaAct> {
        self.refuse_in_capture("alloc_act")?;
        // A new activation may reuse a marked address (`mark_f16_side_output`).
        self.x16_src.store(0, std::sync::atomic::Ordering::Relaxed);
        let bytes = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| BackendError::Other(format!("alloc_act [{rows}, {cols}] overflows")))?;
        Ok(CudaAct {
            buf: DevBuf::alloc(&self.dev.stream, bytes, "activation")?,
            rows,
            cols,
        })
    }

    fn read_act(&self, a: &CudaAct) -> Result<Vec<f32>> {
        self.refuse_in_capture("read_act")?;
        let mut out = vec![0f32; a.rows * a.cols];
        self.dtoh(&mut out, a.ptr(), "read_act")?;
        Ok(out)
    }

    fn prepare_batch(&self, b: &BatchLayout) -> Result<CudaBatch> {
        let mut st = self.lock()?;
        if st.capturing {
            return Err(BackendError::Other(
                "prepare_batch inside a graph capture: call it before begin_capture".into(),
            ));
        }
        // A new step: no earlier step's folded argmax is pending any more.
        st.argmax_ready = None;
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        st.meta.upload(&self.dev.stream, b)
    }

    fn embed(&self, table: &CudaWeight, batch: &CudaBatch, scale: f32, out: &mut CudaAct) -> Result<()> {
        self.check_batch(batch)?;
        if out.rows != batch.num_tokens || out.cols != table.cols {
            return Err(shape_err(
                "embed",
                format!(
                    "out [{}, {}] for {} tokens of width {}",
                    out.rows, out.cols, batch.num_tokens, table.cols
                ),
            ));
        }
        if batch.num_tokens > 0 && batch.max_token as usize >= table.rows {
            return Err(shape_err(
                "embed",
                format!(
                    "token id {} out of range for '{}' with {} rows",
                    batch.max_token, table.name, table.rows
                ),
            ));
        }
        let mut args = Self::weight_args(table)?.to_vec();
        args.extend([Arg::Ptr(batch.tokens), Arg::F32(scale), Arg::Ptr(out.ptr())]);
        self.run("embed", (out.rows as u32, 1, 1), 256, 0, &args)
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaVector, eps: f32, out: &mut CudaAct) -> Result<()> {
        same_shape("rms_norm", x, out)?;
        if w.len != x.cols {
            return Err(shape_err(
                "rms_norm",
                format!("weight of {} for rows of {}", w.len, x.cols),
            ));
        }
        self.run(
            "rms_norm",
            (x.rows as u32, 1, 1),
            Self::norm_threads(x.cols),
            0,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(w.buf.ptr),
                Arg::F32(eps),
                i32_of(x.cols, "cols")?,
                Arg::Ptr(out.ptr()),
            ],
        )
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaAct,
        delta: &CudaAct,
        w: &CudaVector,
        eps: f32,
        out: &mut CudaAct,
    ) -> Result<()> {
        same_shape("add_rms_norm", x, delta)?;
        same_shape("add_rms_norm", x, out)?;
        if w.len != x.cols {
            return Err(shape_err(
                "add_rms_norm",
                format!("weight of {} for rows of {}", w.len, x.cols),
            ));
        }
        if self.kernels == KernelSet::Reference {
            self.add(x, delta)?;
            return self.rms_norm(x, w, eps, out);
        }
        self.run(
            "add_rms_norm",
            (x.rows as u32, 1, 1),
            Self::norm_threads(x.cols),
            0,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(delta.ptr()),
                Arg::Ptr(w.buf.ptr),
                Arg::F32(eps),
                i32_of(x.cols, "cols")?,
                Arg::Ptr(out.ptr()),
            ],
        )
    }

    fn add(&self, x: &mut CudaAct, y: &CudaAct) -> Result<()> {
        same_shape("add", x, y)?;
        let n = x.rows * x.cols;
        self.elementwise(
            "add_inplace",
            n,
            &[Arg::Ptr(x.ptr()), Arg::Ptr(y.ptr()), Arg::I64(n as i64)],
        )
    }

    fn matmul_argmax(&self, x: &CudaAct, w: &CudaWeight, out: &mut CudaAct) -> Result<bool> {
        self.matmul_argmax_impl(x, w, out)
    }

    fn argmax_ready(&self, out: &CudaAct) -> Result<()> {
        self.lock()?.argmax_ready = Some((out.ptr(), out.rows));
        Ok(())
    }

    fn matmul(&self, x: &CudaAct, w: &CudaWeight, out: &mut CudaAct) -> Result<()> {
        self.matmul_impl(x, w, out)
    }

    fn add_bias(&self, x: &mut CudaAct, b: &CudaVector) -> Result<()> {
        if b.len != x.cols {
            return Err(shape_err(
                "add_bias",
                format!("bias of {} for rows of {}", b.len, x.cols),
            ));
        }
        let n = x.rows * x.cols;
        self.elementwise(
            "add_bias",
            n,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(b.buf.ptr),
                i32_of(x.cols, "cols")?,
                Arg::I64(n as i64),
            ],
        )
    }

    fn qk_norm_rope(
        &self,
        x: &mut CudaAct,
        n_heads: usize,
        head_dim: usize,
        norm: Option<&CudaVector>,
        eps: f32,
        rope: &CudaRope,
        batch: &CudaBatch,
    ) -> Result<()> {
        self.check_batch(batch)?;
        if x.cols != n_heads * head_dim || x.rows != batch.num_tokens {
            return Err(shape_err(
                "qk_norm_rope",
                format!(
                    "x [{}, {}] is not [{} tokens, {n_heads}×{head_dim}]",
                    x.rows, x.cols, batch.num_tokens
                ),
            ));
        }
        if 2 * rope.n_pairs > head_dim {
            return Err(shape_err(
                "qk_norm_rope",
                format!("{} RoPE pairs exceed head_dim {head_dim}", rope.n_pairs),
            ));
        }
        if let Some(w) = norm {
            if w.len != head_dim {
                return Err(shape_err(
                    "qk_norm_rope",
                    format!("norm weight of {} for head_dim {head_dim}", w.len),
                ));
            }
        }
        let style = rope.style_code();
        let wptr = norm.map(|w| w.buf.ptr).unwrap_or(0);
        if self.kernels == KernelSet::Reference {
            let heads = x.rows * n_heads;
            if norm.is_some() {
                self.run(
                    "head_norm_ref",
                    (heads.div_ceil(128) as u32, 1, 1),
                    128,
                    0,
                    &[
                        Arg::Ptr(x.ptr()),
                        i32_of(heads, "heads")?,
                        i32_of(head_dim, "head_dim")?,
                        Arg::Ptr(wptr),
                        Arg::F32(eps),
                    ],
                )?;
            }
            let n = heads * rope.n_pairs;
            return self.run(
                "rope_ref",
                (n.div_ceil(128) as u32, 1, 1),
                128,
                0,
                &[
                    Arg::Ptr(x.ptr()),
                    i32_of(x.rows, "rows")?,
                    i32_of(n_heads, "n_heads")?,
                    i32_of(head_dim, "head_dim")?,
                    Arg::Ptr(rope.buf.ptr),
                    i32_of(rope.n_pairs, "pairs")?,
                    Arg::I32(style),
                    Arg::F32(rope.mscale),
                    Arg::Ptr(batch.positions),
                ],
            );
        }
        if head_dim * 4 > 48 * 1024 {
            return Err(BackendError::Unsupported(format!(
                "qk_norm_rope with head_dim {head_dim}"
            )));
        }
        self.run(
            "qk_norm_rope",
            (x.rows as u32, n_heads as u32, 1),
            128,
            (head_dim * 4) as u32,
            &[
                Arg::Ptr(x.ptr()),
                i32_of(n_heads, "n_heads")?,
                i32_of(head_dim, "head_dim")?,
                Arg::Ptr(wptr),
                Arg::F32(eps),
                Arg::Ptr(rope.buf.ptr),
                i32_of(rope.n_pairs, "pairs")?,
                Arg::I32(style),
                Arg::F32(rope.mscale),
                Arg::Ptr(batch.positions),
            ],
        )
    }

    fn write_kv(
        &self,
        pool: &mut CudaKvPool,
        layer: usize,
        k: &CudaAct,
        v: &CudaAct,
        batch: &CudaBatch,
    ) -> Result<()> {
        self.check_batch(batch)?;
        same_shape("write_kv", k, v)?;
        let kv_dim = pool.kv_dim();
        if k.cols != kv_dim || k.rows != batch.num_tokens {
            return Err(shape_err(
                "write_kv",
                format!(
                    "k [{}, {}] is not [{} tokens, {kv_dim}]",
                    k.rows, k.cols, batch.num_tokens
                ),
            ));
        }
        check_kv_target("write_kv", pool, layer, batch)?;
        let (lo, vo) = pool.offsets(layer);
        self.run(
            "write_kv",
            (k.rows as u32, 1, 1),
            Self::norm_threads(kv_dim).min(256),
            0,
            &[
                Arg::Ptr(pool.buf.ptr),
                Arg::I64(lo),
                Arg::I64(vo),
                Arg::I32(pool.dtype_code()),
                Arg::Ptr(k.ptr()),
                Arg::Ptr(v.ptr()),
                Arg::Ptr(batch.slots),
                i32_of(kv_dim, "kv_dim")?,
            ],
        )
    }

    fn attention(
        &self,
        q: &CudaAct,
        pool: &CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        self.attention_with(q, pool, layer, batch, p, out, None)
    }

    fn gated_activation(
        &self,
        gate: &CudaAct,
        up: &CudaAct,
        act: Activation,
        out: &mut CudaAct,
    ) -> Result<()> {
        same_shape("gated_activation", gate, up)?;
        same_shape("gated_activation", gate, out)?;
        let n = gate.rows * gate.cols;
        let out16 = if self.kernels == KernelSet::Fused {
            self.f16_side_output(out)?
        } else {
            0
        };
        self.elementwise(
            "gated_act",
            n,
            &[
                Arg::Ptr(gate.ptr()),
                Arg::Ptr(up.ptr()),
                Arg::I32(act_code(act)),
                Arg::I64(n as i64),
                Arg::Ptr(out.ptr()),
                Arg::Ptr(out16),
            ],
        )?;
        self.mark_f16_side_output(out, out16);
        Ok(())
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[u32], out: &mut CudaAct) -> Result<()> {
        if out.rows != rows.len() || out.cols != x.cols {
            return Err(shape_err(
                "gather_rows",
                format!(
                    "out [{}, {}] for {} rows of {}",
                    out.rows,
                    out.cols,
                    rows.len(),
                    x.cols
                ),
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= x.rows) {
            return Err(shape_err(
                "gather_rows",
                format!("row {r} of a {}-row activation", x.rows),
            ));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let idx = {
            let mut st = self.lock()?;
            if st.capturing {
                return Err(BackendError::Unsupported(
                    "gather_rows inside a graph capture (its host indices would be captured by address)"
                        .into(),
                ));
            }
            Self::ensure(&self.dev, &mut st.gather, rows.len() * 4, "gather indices")?
        };
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        // SAFETY: buffer sized above; pageable source is staged before return.
        unsafe { cudarc::driver::result::memcpy_htod_async(idx, rows, self.dev.stream.cu_stream()) }
            .map_err(|e| BackendError::Cuda(format!("uploading gather indices: {e}")))?;
        self.run(
            "gather_rows",
            (rows.len() as u32, 1, 1),
            Self::norm_threads(x.cols).min(256),
            0,
            &[
                Arg::Ptr(x.ptr()),
                Arg::Ptr(idx),
                i32_of(x.cols, "cols")?,
                Arg::Ptr(out.ptr()),
            ],
        )
    }

    fn softcap(&self, x: &mut CudaAct, cap: f32) -> Result<()> {
        let n = x.rows * x.cols;
        self.elementwise(
            "softcap",
            n,
            &[Arg::Ptr(x.ptr()), Arg::F32(cap), Arg::I64(n as i64)],
        )
    }

    fn argmax_rows(&self, x: &CudaAct) -> Result<Vec<u32>> {
        if self.kernels == KernelSet::Reference {
            let v = self.read_act(x)?;
            let cols = x.cols.max(1);
            return Ok((0..x.rows)
                .map(|r| crate::layout::argmax(&v[r * cols..(r + 1) * cols]) as u32)
                .collect());
        }
        if x.rows == 0 {
            return Ok(Vec::new());
        }
        self.launch_argmax(x)?;
        self.fetch_argmax(x.rows)
    }

    fn supports_argmax_feed(&self) -> bool {
        self.kernels == KernelSet::Fused
    }

    fn queue_argmax(&self, x: &CudaAct) -> Result<u64> {
        self.queue_argmax_impl(x)
    }

    fn take_argmax(&self, ticket: u64) -> Result<Vec<u32>> {
        self.take_argmax_impl(ticket)
    }

    fn feed_argmax(&self, batch: &mut CudaBatch, rows: usize) -> Result<()> {
        self.feed_argmax_impl(batch, rows)
    }

    fn queue_sample(&self, x: &CudaAct, rows: &[crate::layout::DeviceSample]) -> Result<u64> {
        if self.lock()?.argmax_ready.is_some_and(|(p, _)| p == x.ptr()) {
            return Err(BackendError::Other(
                "queue_sample: these rows hold no logits (the step computed only argmax ids)".into(),
            ));
        }
        self.queue_sample_impl(x, rows)
    }

    fn queues_sample(&self, row: &crate::layout::DeviceSample, vocab: usize) -> bool {
        self.supports_argmax_feed() && self.device_sampling(vocab) && sampling::chunked(row)
    }

    fn device_sampling(&self, vocab: usize) -> bool {
        self.kernels == KernelSet::Fused && vocab <= sampling::MAX_VOCAB && sampling::enabled_by_env()
    }

    fn sample_rows(&self, x: &CudaAct, rows: &[crate::layout::DeviceSample]) -> Result<Vec<u32>> {
        if self.lock()?.argmax_ready.is_some_and(|(p, _)| p == x.ptr()) {
            return Err(BackendError::Other(
                "sample_rows: these rows hold no logits (the step computed only argmax ids)".into(),
            ));
        }
        self.sample_rows_impl(x, rows)
    }

    fn act_rows(&self, x: &CudaAct) -> usize {
        x.rows
    }

    fn qkv(
        &self,
        h: &CudaAct,
        w: [&CudaWeight; 3],
        bias: [Option<&CudaVector>; 3],
        q: &mut CudaAct,
        k: &mut CudaAct,
        v: &mut CudaAct,
    ) -> Result<()> {
        if self.kernels == KernelSet::Reference
            || bias.iter().any(|b| b.is_some())
            || !self.multi_gemv_fits(h.rows, &w)
        {
            if self.kernels == KernelSet::Fused
                && bias.iter().all(|b| b.is_none())
                && Self::multi_gemm_fits(&w)
            {
                return self.multi_gemm(h, &w, &mut [q, k, v]);
            }
            return qkv_unfused(self, h, w, bias, q, k, v);
        }
        if q.rows != h.rows || k.rows != h.rows || v.rows != h.rows {
            return Err(shape_err(
                "qkv",
                format!("outputs do not have the {} rows of h", h.rows),
            ));
        }
        self.multi_gemv(h, &w, &[q.ptr(), k.ptr(), v.ptr()], &[q.cols, k.cols, v.cols])
    }

    fn qk_norm_rope_store(
        &self,
        r: QkvRows<'_, Self>,
        norms: [Option<&CudaVector>; 2],
        eps: f32,
        rope: &CudaRope,
        pool: &mut CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
    ) -> Result<()> {
        if self.kernels == KernelSet::Reference {
            return qk_norm_rope_store_unfused(self, r, norms, eps, rope, pool, layer, batch);
        }
        let heads = (r.n_heads, r.n_kv_heads, r.head_dim);
        self.qk_norm_rope_store_fused(r.q, r.k, r.v, heads, norms, eps, rope, pool, layer, batch, None)
    }

    fn qkv_rope_store(
        &self,
        h: &CudaAct,
        w: [&CudaWeight; 3],
        bias: [Option<&CudaVector>; 3],
        r: QkvRows<'_, Self>,
        norms: [Option<&CudaVector>; 2],
        eps: f32,
        rope: &CudaRope,
        pool: &mut CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
    ) -> Result<()> {
        // At GEMM sizes: one GEMM on the stacked Q/K/V mirror, whose output
        // the RoPE kernel reads directly (writing q, k and v out).
        if bias.iter().all(|b| b.is_none()) && !self.multi_gemv_fits(h.rows, &w) {
            if r.q.rows != h.rows || r.k.rows != h.rows || r.v.rows != h.rows {
                return Err(shape_err(
                    "qkv_rope_store",
                    format!("outputs do not have the {} rows of h", h.rows),
                ));
            }
            if (r.q.cols, r.k.cols, r.v.cols) != (w[0].rows, w[1].rows, w[2].rows) {
                return Err(shape_err(
                    "qkv_rope_store",
                    "q/k/v columns differ from the weights' rows".to_string(),
                ));
            }
            if let Some(src) = self.stacked_gemm(h, &w)? {
                let heads = (r.n_heads, r.n_kv_heads, r.head_dim);
                return self.qk_norm_rope_store_fused(
                    r.q,
                    r.k,
                    r.v,
                    heads,
                    norms,
                    eps,
                    rope,
                    pool,
                    layer,
                    batch,
                    Some(src),
                );
            }
        }
        self.qkv(h, w, bias, r.q, r.k, r.v)?;
        self.qk_norm_rope_store(r, norms, eps, rope, pool, layer, batch)
    }

    fn residual_norm(
        &self,
        x: &mut CudaAct,
        delta: &CudaAct,
        post_norm: Option<&CudaVector>,
        next_norm: &CudaVector,
        eps: f32,
        tmp: &mut CudaAct,
        out: &mut CudaAct,
    ) -> Result<()> {
        if self.kernels == KernelSet::Reference {
            return residual_norm_unfused(self, x, delta, post_norm, next_norm, eps, tmp, out);
        }
        self.residual_norm_fused(x, delta, post_norm, next_norm, eps, out)
    }

    fn gated_ffn(
        &self,
        h: &CudaAct,
        w: [&CudaWeight; 3],
        act: Activation,
        gate: &mut CudaAct,
        up: &mut CudaAct,
        act_out: &mut CudaAct,
        out: &mut CudaAct,
    ) -> Result<()> {
        // Decode sizes: gate and up in one launch, then the down projection
        // forming act(gate) * up itself (no gated_act launch; `act_out` is
        // left unwritten).
        if self.multi_gemv_fits(h.rows, &w[..2]) && self.prologue_takes(h.rows, w[2].cols, &w[2..], false) {
            self.gate_up("gated_ffn", h, [w[0], w[1]], gate, up)?;
            let p = fused::Prologue::Gated {
                gate: &*gate,
                up: &*up,
                act,
            };
            return self.gemv_prologue(p, &w[2..], &mut [out]);
        }
        self.gate_up_act("gated_ffn", h, [w[0], w[1]], act, gate, up, act_out)?;
        self.matmul(act_out, w[2], out)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        input: BlockInput<'_, Self>,
        w: [&CudaWeight; 3],
        bias: [Option<&CudaVector>; 3],
        rows: QkvRows<'_, Self>,
        norms: [Option<&CudaVector>; 2],
        eps: f32,
        rope: &CudaRope,
        pool: &mut CudaKvPool,
        layer: usize,
        batch: &CudaBatch,
        p: &AttnParams,
        out: &mut CudaAct,
    ) -> Result<()> {
        // Decode steps of a few sequences: QKV in one launch (with the
        // residual step inside when there is one), then attention with the
        // q/k norm + RoPE + K/V store inside: two launches instead of four.
        let t = rows.q.rows;
        let cols = w[0].cols;
        let gemv_sized = bias.iter().all(|b| b.is_none()) && self.multi_gemv_fits(t, &w);
        let rope_fused = gemv_sized && self.rope_attention_takes(t, batch, p, pool, rope);
        let qkv_fused = gemv_sized
            && matches!(input, BlockInput::Residual { .. })
            && self.prologue_takes(t, cols, &w, true);
        if !rope_fused && !qkv_fused {
            return attention_block_unfused(
                self, input, w, bias, rows, norms, eps, rope, pool, layer, batch, p, out,
            );
        }
        let QkvRows {
            q,
            k,
            v,
            n_heads,
            n_kv_heads,
            head_dim,
        } = rows;
        match input {
            BlockInput::Residual { delta, step } if qkv_fused => {
                let pr = fused::Prologue::residual(delta, step);
                self.gemv_prologue(pr, &w, &mut [&mut *q, &mut *k, &mut *v])?;
            }
            other => {
                let h = other.resolve(self)?;
                self.qkv(h, w, bias, q, k, v)?;
            }
        }
        if !rope_fused {
            let r = QkvRows {
                q: &mut *q,
                k,
                v,
                n_heads,
                n_kv_heads,
                head_dim,
            };
            self.qk_norm_rope_store(r, norms, eps, rope, pool, layer, batch)?;
            return self.attention(q, pool, layer, batch, p, out);
        }
        let fusion = RopeFusion {
            k: &*k,
            v: &*v,
            norms,
            eps,
            rope,
        };
        self.attention_with(q, pool, layer, batch, p, out, Some(fusion))
    }

    #[allow(clippy::too_many_arguments)]
    fn ffn_block(
        &self,
        input: BlockInput<'_, Self>,
        w: [&CudaWeight; 3],
        act: Activation,
        gate: &mut CudaAct,
        up: &mut CudaAct,
        act_out: &mut CudaAct,
        out: &mut CudaAct,
    ) -> Result<()> {
        let (delta, step) = match input {
            BlockInput::Residual { delta, step }
                if self.prologue_takes(delta.rows, delta.cols, &w[..2], true) =>
            {
                (delta, step)
            }
            other => {
                let h = other.resolve(self)?;
                return self.gated_ffn(h, w, act, gate, up, act_out, out);
            }
        };
        let p = fused::Prologue::residual(delta, step);
        self.gemv_prologue(p, &w[..2], &mut [&mut *gate, &mut *up])?;
        if self.prologue_takes(delta.rows, w[2].cols, &w[2..], false) {
            let p = fused::Prologue::Gated {
                gate: &*gate,
                up: &*up,
                act,
            };
            return self.gemv_prologue(p, &w[2..], &mut [out]);
        }
        self.gated_activation(gate, up, act, act_out)?;
        self.matmul(act_out, w[2], out)
    }

    fn supports_graphs(&self) -> bool {
        true
    }

    fn runs_async(&self) -> bool {
        true
    }

    fn device_allocations(&self) -> Option<crate::memory::DeviceAllocations> {
        Some(buffers::LEDGER.snapshot())
    }

    fn device_memory(&self) -> Option<(u64, u64)> {
        self.dev.ctx.bind_to_thread().ok()?;
        cudarc::driver::result::mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64))
    }

    fn reserve_batch(&self, max_tokens: usize, max_seqs: usize, max_blocks_per_seq: usize) -> Result<()> {
        CudaBackend::reserve_batch(self, max_tokens, max_seqs, max_blocks_per_seq)
    }

    fn begin_capture(&self) -> Result<()> {
        CudaBackend::begin_capture(self)
    }

    fn end_capture(&self) -> Result<Graph> {
        let g = CudaBackend::end_capture(self)?;
        Ok(Graph { inner: Box::new(g) })
    }

    fn replay(&self, g: &Graph) -> Result<bool> {
        let g = g.inner.downcast_ref::<DecodeGraph>().ok_or_else(|| {
            BackendError::Other("replay: the graph was not captured by the CUDA backend".into())
        })?;
        if !self.graph_is_current(g)? {
            return Ok(false);
        }
        CudaBackend::replay(self, g)?;
        Ok(true)
    }

    fn pool_id(&self, pool: &CudaKvPool) -> u64 {
        pool.id
    }

    fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("synchronize")?;
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        self.dev
            .stream
            .synchronize()
            .map_err(|e| BackendError::Cuda(format!("synchronize: {e}")))
    }
}
