//! The decode megakernel's program: recorded from the kernel launches of a
//! captured single-row decode step, compiled into the ops of
//! `kernels/megakernel.cu`, and replayed as one persistent launch instead of
//! the CUDA graph (which is still captured, as the fallback).
//!
//! Recording happens at the launch level (`CudaBackend::run`), so the model
//! code is unchanged and every op keeps the exact arguments its standalone
//! kernel had. A step the megakernel cannot run (several rows, cuBLAS, a
//! kernel it does not know, shared memory beyond the device's) simply
//! keeps its graph. Off by default (`KESTREL_MEGAKERNEL=1` turns it on):
//! see `enabled_by_env`. Tuning knobs, all environment variables:
//! `KESTREL_MEGAKERNEL_X2=1` (two blocks per SM, at most 128 registers),
//! `KESTREL_MEGAKERNEL_BLOCKS_PER_SM`, `KESTREL_MEGAKERNEL_AHEAD` (rounds
//! of GEMV weights prefetched into L2; 0 = off, the fastest so far), and
//! `KESTREL_MEGAKERNEL_TRACE=1` (per-op times of block 0, printed when the
//! program is dropped).

use std::collections::{HashMap, HashSet};

use super::buffers::DevBuf;
use super::fused::gemv_kind;
use super::launch::Arg;
use super::CudaBackend;
use crate::error::BackendError;

/// `MkOp` of megakernel.cu (same layout: 208 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct MkOp {
    code: u32,
    i: [u32; 15],
    f: [f32; 4],
    p: [u64; 16],
}

const MK_BARRIER: u32 = 0;
const MK_EMBED: u32 = 1;
const MK_NORM: u32 = 2;
const MK_RESNORM: u32 = 3;
const MK_GATED: u32 = 4;
const MK_LOAD: u32 = 5;
const MK_GEMV: u32 = 6;
const MK_ROPE: u32 = 7;
const MK_ATTN: u32 = 8;
const MK_STORE: u32 = 9;

/// GEMVs with at least this many rows (the LM head) run as their own
/// launch after the program: 62 rounds of work items per block at one
/// block per SM are latency-bound (H200: ~130 us inside vs ~75 us as a
/// fully occupied kernel).
const TAIL_ROWS: u32 = 16_384;

/// Marks a pointer as a shared-memory slot (float offset in the low bits).
const SHARED: u64 = 1 << 63;

/// Threads of the megakernel's blocks (the GEMV work items assume 8 warps).
pub(crate) const MK_THREADS: u32 = 256;

/// One launch seen while recording.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    pub name: String,
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
    pub args: Vec<Arg>,
}

/// Launches of the step being captured, or why it cannot become a program.
#[derive(Default)]
pub(crate) struct Recorder {
    pub launches: Vec<Launch>,
    pub refused: Option<String>,
}

/// A compiled program, ready to launch.
pub struct MegaProgram {
    ops: DevBuf,
    nops: usize,
    /// Grid barrier state (arrivals, generation); self-resetting.
    bar: DevBuf,
    pub(crate) smem_bytes: u32,
    scratch_off: u32,
    pub(crate) grid: u32,
    pub(crate) barriers: usize,
    /// Launched after the program (the LM head).
    tail: Option<Launch>,
    func: &'static str,
    /// Rounds of GEMV work items requested ahead (`mk_gemv`).
    ahead: i32,
    /// Diagnostics (`KESTREL_MEGAKERNEL_TRACE=1`): op start times of block
    /// 0, read back after every launch and summed per op kind.
    trace: Option<Trace>,
}

struct Trace {
    buf: DevBuf,
    codes: Vec<u32>,
    /// Nanoseconds per op index, summed over launches; launch count.
    sums: std::sync::Mutex<(Vec<u64>, u64)>,
}

const OP_NAMES: [&str; 10] = [
    "barrier",
    "embed",
    "norm",
    "resnorm",
    "gated",
    "load",
    "gemv",
    "rope",
    "attention",
    "store",
];

impl Drop for MegaProgram {
    fn drop(&mut self) {
        let Some(t) = &self.trace else { return };
        let Ok(g) = t.sums.lock() else { return };
        let (sums, n) = &*g;
        if *n == 0 {
            return;
        }
        let mut by_kind = [0u64; 10];
        let mut count = [0usize; 10];
        for (i, &c) in t.codes.iter().enumerate() {
            by_kind[c as usize] += sums[i];
            count[c as usize] += 1;
        }
        let total: u64 = sums.iter().sum();
        eprintln!(
            "megakernel trace: {n} launches, {:.1} us per step (block 0's view)",
            total as f64 / *n as f64 / 1e3
        );
        for k in 0..10 {
            if count[k] > 0 {
                eprintln!(
                    "  {:<10} {:>4} ops {:>9.1} us/step {:>7.2} us each",
                    OP_NAMES[k],
                    count[k],
                    by_kind[k] as f64 / *n as f64 / 1e3,
                    by_kind[k] as f64 / *n as f64 / 1e3 / count[k] as f64
                );
            }
        }
        // One layer in detail: the ops between the second and third RoPE.
        let ropes: Vec<usize> = (0..t.codes.len()).filter(|&i| t.codes[i] == MK_ROPE).collect();
        if ropes.len() >= 3 {
            let line: Vec<String> = (ropes[1] - 3..ropes[2] - 3)
                .map(|i| {
                    format!(
                        "{}={:.2}",
                        OP_NAMES[t.codes[i] as usize],
                        sums[i] as f64 / *n as f64 / 1e3
                    )
                })
                .collect();
            eprintln!("  one layer (us): {}", line.join(" "));
        }
        let mut idx: Vec<usize> = (0..sums.len()).collect();
        idx.sort_by_key(|&i| std::cmp::Reverse(sums[i]));
        for &i in idx.iter().take(6) {
            eprintln!(
                "  op {i:>4} ({}) {:.2} us",
                OP_NAMES[t.codes[i] as usize],
                sums[i] as f64 / *n as f64 / 1e3
            );
        }
    }
}

/// The host-side op list and its shared-memory plan.
#[derive(Debug)]
pub(crate) struct Plan {
    ops: Vec<MkOp>,
    /// Floats of slots (the per-phase scratch follows them).
    slot_floats: u32,
    scratch_floats: u32,
    /// The step's last launch when it runs after the program (`TAIL_ROWS`).
    tail: Option<Launch>,
}

impl std::fmt::Debug for MkOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MkOp({})", self.code)
    }
}

fn ptr(a: &[Arg], i: usize) -> Result<u64, String> {
    match a.get(i) {
        Some(Arg::Ptr(p)) => Ok(*p),
        other => Err(format!("argument {i}: expected a pointer, got {other:?}")),
    }
}

fn int(a: &[Arg], i: usize) -> Result<i32, String> {
    match a.get(i) {
        Some(Arg::I32(v)) => Ok(*v),
        other => Err(format!("argument {i}: expected an i32, got {other:?}")),
    }
}

fn uint(a: &[Arg], i: usize) -> Result<u32, String> {
    let v = int(a, i)?;
    u32::try_from(v).map_err(|_| format!("argument {i}: negative ({v})"))
}

fn long(a: &[Arg], i: usize) -> Result<u64, String> {
    match a.get(i) {
        Some(Arg::I64(v)) => Ok(*v as u64),
        other => Err(format!("argument {i}: expected an i64, got {other:?}")),
    }
}

fn float(a: &[Arg], i: usize) -> Result<f32, String> {
    match a.get(i) {
        Some(Arg::F32(v)) => Ok(*v),
        other => Err(format!("argument {i}: expected an f32, got {other:?}")),
    }
}

fn one_row(l: &Launch) -> Result<(), String> {
    if l.grid.0 != 1 {
        return Err(format!(
            "'{}' over {} rows (the megakernel runs one)",
            l.name, l.grid.0
        ));
    }
    Ok(())
}

/// Floats of one attention item's shared area (`att_smem_floats` in attention.cu).
fn att_smem_floats(head_dim: u32) -> u32 {
    5 * head_dim + 8 + 34
}

#[derive(Default)]
struct Compiler {
    ops: Vec<MkOp>,
    /// Activation address -> (shared slot offset, floats); a slot stays
    /// reserved for its address (the model reuses the same buffers in
    /// every layer, so this stays small).
    slots: HashMap<u64, (u32, u32)>,
    /// Slots holding the activation's current value.
    valid: HashSet<u64>,
    /// Slots whose global copy is stale (written only in shared memory).
    shared_only: HashSet<u64>,
    slot_floats: u32,
    scratch_floats: u32,
    /// A distributed phase ran since the last barrier.
    dirty: bool,
    /// Global buffers replicated ops read since the last barrier.
    seg_reads: HashSet<u64>,
}

impl Compiler {
    fn barrier(&mut self) {
        self.ops.push(MkOp {
            code: MK_BARRIER,
            ..Default::default()
        });
        self.dirty = false;
        self.seg_reads.clear();
    }

    /// Before an op every block runs for itself: it may read what the
    /// previous phase wrote.
    fn pre_replicated(&mut self) {
        if self.dirty {
            self.barrier();
        }
    }

    /// Before a phase spread over the blocks that writes `writes`.
    fn pre_distributed(&mut self, writes: &[u64]) {
        if self.dirty || writes.iter().any(|w| self.seg_reads.contains(w)) {
            self.barrier();
        }
        self.dirty = true;
        for w in writes {
            // The global copy is now the current one.
            self.valid.remove(w);
            self.shared_only.remove(w);
        }
    }

    /// Where a replicated op reads `p`: its slot, or global memory.
    fn src(&mut self, p: u64) -> u64 {
        match self.slot(p) {
            Some(tagged) => tagged,
            None => {
                self.seg_reads.insert(p);
                p
            }
        }
    }

    /// The shared slot holding `p`'s current value, if any.
    fn slot(&self, p: u64) -> Option<u64> {
        self.valid
            .contains(&p)
            .then(|| self.slots.get(&p).map(|&(off, _)| SHARED | off as u64))
            .flatten()
    }

    /// The slot a replicated op writes `p` into (allocated on first use).
    fn dst(&mut self, p: u64, floats: u32) -> Result<u64, String> {
        let off = match self.slots.get(&p) {
            Some(&(off, n)) if n >= floats => off,
            Some(&(_, n)) => return Err(format!("activation {p:#x} used with {floats} and {n} floats")),
            None => {
                let off = self.slot_floats;
                self.slot_floats += floats.div_ceil(4) * 4; // 16-byte aligned float4 reads
                self.slots.insert(p, (off, floats));
                off
            }
        };
        self.valid.insert(p);
        self.shared_only.insert(p);
        Ok(SHARED | off as u64)
    }

    /// A distributed phase reads `p` from global memory: it must be current there.
    fn global_input(&self, p: u64, what: &str) -> Result<(), String> {
        if self.shared_only.contains(&p) {
            return Err(format!(
                "{what} reads an activation that only exists in shared memory"
            ));
        }
        Ok(())
    }

    /// The GEMV input: a slot as it is, a global activation staged into one.
    fn gemv_input(&mut self, x: u64, cols: u32) -> Result<u64, String> {
        if let Some(tagged) = self.slot(x) {
            return Ok(tagged);
        }
        self.pre_replicated();
        let src = self.src(x);
        let dst = self.dst(x, cols)?;
        // Staged copies are identical to the global value.
        self.shared_only.remove(&x);
        let mut op = MkOp {
            code: MK_LOAD,
            ..Default::default()
        };
        op.i[0] = cols;
        op.p[0] = src;
        op.p[1] = dst;
        self.ops.push(op);
        Ok(dst)
    }

    fn scratch(&mut self, floats: u32) {
        self.scratch_floats = self.scratch_floats.max(floats);
    }

    fn gemv(&mut self, x: u64, cols: u32, weights: &[(i32, [u64; 3], u32, u64, u32)]) -> Result<(), String> {
        // Q4_0 / Q5_0 with two rows per warp: half the rounds of work items
        // per block (each row's arithmetic is the same as with one).
        let weights: Vec<_> = weights
            .iter()
            .map(|&(kind, ps, rows, out, nb)| match kind {
                5 | 6 => (kind + 2, ps, rows, out, rows.div_ceil(16)),
                _ => (kind, ps, rows, out, nb),
            })
            .collect();
        let x = self.gemv_input(x, cols)?;
        let outs: Vec<u64> = weights.iter().map(|w| w.3).collect();
        self.pre_distributed(&outs);
        let mut op = MkOp {
            code: MK_GEMV,
            ..Default::default()
        };
        op.i[0] = weights.len() as u32;
        op.i[1] = cols;
        op.p[0] = x;
        for (j, &(kind, ps, rows, out, nb)) in weights.iter().enumerate() {
            op.i[2 + 3 * j] = kind as u32;
            op.i[3 + 3 * j] = rows;
            op.i[4 + 3 * j] = nb;
            op.p[1 + 4 * j] = ps[0];
            op.p[2 + 4 * j] = ps[1];
            op.p[3 + 4 * j] = ps[2];
            op.p[4 + 4 * j] = out;
        }
        self.ops.push(op);
        Ok(())
    }

    fn add(&mut self, l: &Launch) -> Result<(), String> {
        let a = &l.args[..];
        match l.name.as_str() {
            "embed" => {
                one_row(l)?;
                self.pre_replicated();
                let cols = uint(a, 4)?;
                let mut op = MkOp {
                    code: MK_EMBED,
                    ..Default::default()
                };
                op.i[0] = uint(a, 5)?;
                op.i[1] = uint(a, 3)?;
                op.i[2] = cols;
                op.f[0] = float(a, 7)?;
                op.p[..4].copy_from_slice(&[ptr(a, 0)?, ptr(a, 1)?, ptr(a, 2)?, ptr(a, 6)?]);
                op.p[4] = self.dst(ptr(a, 8)?, cols)?;
                self.ops.push(op);
                self.scratch(32);
            }
            "rms_norm" => {
                one_row(l)?;
                self.pre_replicated();
                let cols = uint(a, 3)?;
                let mut op = MkOp {
                    code: MK_NORM,
                    ..Default::default()
                };
                op.i[0] = cols;
                op.i[1] = l.block;
                op.f[0] = float(a, 2)?;
                op.p[0] = self.src(ptr(a, 0)?);
                op.p[1] = ptr(a, 1)?;
                op.p[2] = self.dst(ptr(a, 4)?, cols)?;
                self.ops.push(op);
                self.scratch(32);
            }
            "residual_norm" => {
                one_row(l)?;
                if ptr(a, 7)? != 0 {
                    return Err("residual_norm with an f16 side output".into());
                }
                let cols = uint(a, 5)?;
                let x = ptr(a, 0)?;
                if self.slot(x).is_none() {
                    // The residual enters shared memory here and stays there.
                    self.gemv_input(x, cols)?;
                }
                self.pre_replicated();
                let mut op = MkOp {
                    code: MK_RESNORM,
                    ..Default::default()
                };
                op.i[0] = cols;
                op.i[1] = l.block;
                op.f[0] = float(a, 4)?;
                op.p[0] = self.dst(x, cols)?;
                op.p[1] = self.src(ptr(a, 1)?);
                op.p[2] = ptr(a, 2)?;
                op.p[3] = ptr(a, 3)?;
                op.p[4] = self.dst(ptr(a, 6)?, cols)?;
                self.ops.push(op);
                // Block sums, then the staged delta and both norm weights.
                self.scratch(32 + 3 * cols);
            }
            "gated_act" => {
                if ptr(a, 5)? != 0 {
                    return Err("gated_act with an f16 side output".into());
                }
                let n = match a.get(3) {
                    Some(Arg::I64(n)) => u32::try_from(*n).map_err(|_| "gated_act: size".to_string())?,
                    other => return Err(format!("gated_act size: {other:?}")),
                };
                self.pre_replicated();
                let mut op = MkOp {
                    code: MK_GATED,
                    ..Default::default()
                };
                op.i[0] = uint(a, 2)?;
                op.i[1] = n;
                op.p[0] = self.src(ptr(a, 0)?);
                op.p[1] = self.src(ptr(a, 1)?);
                op.p[2] = self.dst(ptr(a, 4)?, n)?;
                self.ops.push(op);
            }
            "gemv3_1" => {
                if int(a, 1)? != 1 {
                    return Err("gemv3 over several rows".into());
                }
                let cols = uint(a, 2)?;
                let mut ws = Vec::new();
                let mut used = 0u32;
                for j in 0..3 {
                    let b = 3 + 7 * j;
                    let rows = uint(a, b + 4)?;
                    if rows == 0 {
                        continue;
                    }
                    let nb = if j < 2 { uint(a, b + 6)? } else { l.grid.0 - used };
                    used += nb;
                    let ps = [ptr(a, b + 1)?, ptr(a, b + 2)?, ptr(a, b + 3)?];
                    ws.push((int(a, b)?, ps, rows, ptr(a, b + 5)?, nb));
                }
                self.gemv(ptr(a, 0)?, cols, &ws)?;
            }
            "qk_norm_rope_store" => {
                one_row(l)?;
                if a.len() > 19 && ptr(a, 19)? != 0 {
                    return Err("qk_norm_rope_store from a stacked GEMM output".into());
                }
                for (i, what) in [(0, "q"), (1, "k"), (2, "v")] {
                    self.global_input(ptr(a, i)?, what)?;
                }
                let pool = ptr(a, 14)?;
                self.pre_distributed(&[ptr(a, 0)?, ptr(a, 1)?, pool]);
                let mut op = MkOp {
                    code: MK_ROPE,
                    ..Default::default()
                };
                op.i[..7].copy_from_slice(&[
                    uint(a, 3)?,
                    uint(a, 4)?,
                    uint(a, 5)?,
                    uint(a, 10)?,
                    uint(a, 11)?,
                    uint(a, 17)?,
                    l.block,
                ]);
                op.f[0] = float(a, 8)?;
                op.f[1] = float(a, 12)?;
                op.p[..11].copy_from_slice(&[
                    ptr(a, 0)?,
                    ptr(a, 1)?,
                    ptr(a, 2)?,
                    ptr(a, 6)?,
                    ptr(a, 7)?,
                    ptr(a, 9)?,
                    ptr(a, 13)?,
                    pool,
                    ptr(a, 18)?,
                    long(a, 15)?,
                    long(a, 16)?,
                ]);
                if l.block > MK_THREADS {
                    return Err(format!("qk_norm_rope_store with {} threads", l.block));
                }
                self.scratch(32 + op.i[2]);
                self.ops.push(op);
            }
            "attention" => {
                one_row(l)?;
                if a.len() > 20 && ptr(a, 20)? != 0 {
                    return Err("attention with an f16 side output".into());
                }
                if l.block != 128 {
                    return Err(format!("attention with {} threads", l.block));
                }
                self.global_input(ptr(a, 0)?, "attention")?;
                let out = ptr(a, 16)?;
                self.pre_distributed(&[out]);
                let head_dim = uint(a, 12)?;
                let mut op = MkOp {
                    code: MK_ATTN,
                    ..Default::default()
                };
                op.i[..8].copy_from_slice(&[
                    uint(a, 4)?,
                    uint(a, 8)?,
                    uint(a, 9)?,
                    uint(a, 10)?,
                    uint(a, 11)?,
                    head_dim,
                    uint(a, 14)?,
                    uint(a, 17)?,
                ]);
                op.f[0] = float(a, 13)?;
                op.f[1] = float(a, 15)?;
                op.p[..10].copy_from_slice(&[
                    ptr(a, 0)?,
                    ptr(a, 1)?,
                    ptr(a, 5)?,
                    ptr(a, 6)?,
                    ptr(a, 7)?,
                    out,
                    ptr(a, 18)?,
                    ptr(a, 19)?,
                    long(a, 2)?,
                    long(a, 3)?,
                ]);
                if op.i[7] != l.grid.2 {
                    return Err("attention split count differs from its grid".into());
                }
                self.scratch(2 * att_smem_floats(head_dim));
                self.ops.push(op);
            }
            name => {
                let family = name
                    .strip_suffix("_1")
                    .filter(|f| f.starts_with("gemv_"))
                    .ok_or_else(|| format!("kernel '{name}' has no megakernel op"))?;
                let kind =
                    gemv_kind(family).ok_or_else(|| format!("kernel '{name}' has no megakernel op"))?;
                if int(a, 6)? != 1 {
                    return Err(format!("'{name}' over several rows"));
                }
                let ps = [ptr(a, 0)?, ptr(a, 1)?, ptr(a, 2)?];
                self.gemv(
                    ptr(a, 5)?,
                    uint(a, 4)?,
                    &[(kind, ps, uint(a, 3)?, ptr(a, 7)?, l.grid.0)],
                )?;
            }
        }
        Ok(())
    }
}

/// Compiles a recorded step into ops (pure: testable without a GPU).
pub(crate) fn compile(launches: &[Launch]) -> Result<Plan, String> {
    let mut c = Compiler::default();
    let mut tail = None;
    for (i, l) in launches.iter().enumerate() {
        let before = c.ops.len();
        c.add(l).map_err(|e| format!("{e} (launch '{}')", l.name))?;
        let last = i + 1 == launches.len();
        let big = c
            .ops
            .last()
            .is_some_and(|o| o.code == MK_GEMV && o.i[0] == 1 && o.i[3] >= TAIL_ROWS);
        if last && big && c.ops.len() > before {
            // Run it as its own launch; its input goes back to global memory.
            let op = c.ops.pop().expect("just added");
            while c.ops.len() > before && c.ops.last().is_some_and(|o| o.code == MK_BARRIER) {
                c.ops.pop();
            }
            let x = match &l.args[..] {
                a if l.name == "gemv3_1" => ptr(a, 0)?,
                a => ptr(a, 5)?,
            };
            if op.p[0] & SHARED != 0 {
                let mut st = MkOp {
                    code: MK_STORE,
                    ..Default::default()
                };
                st.i[0] = op.i[1];
                st.p[0] = op.p[0];
                st.p[1] = x;
                c.ops.push(st);
            }
            tail = Some(l.clone());
        }
    }
    if !c.ops.iter().any(|o| o.code == MK_GEMV) {
        return Err("no matrix products recorded".into());
    }
    Ok(Plan {
        ops: c.ops,
        slot_floats: c.slot_floats,
        scratch_floats: c.scratch_floats,
        tail,
    })
}

impl Plan {
    pub(crate) fn barriers(&self) -> usize {
        self.ops.iter().filter(|o| o.code == MK_BARRIER).count()
    }
}

/// Whether the megakernel is on: off unless `KESTREL_MEGAKERNEL=1`. It is
/// bit-identical to the graph path but not yet faster (H200, tg128 of the
/// default model: 1,348 tok/s against the graph's 1,545; the per-op times
/// are in benchmarks/NOTES-cuda.md, session 3).
pub(crate) fn enabled_by_env() -> bool {
    super::knobs::on_if_one("KESTREL_MEGAKERNEL")
}

impl CudaBackend {
    /// Turns recording of decode programs on or off for later captures
    /// (graphs captured before keep what they have).
    /// Its programs are built from GEMV launches, so turning it on also
    /// sends steps of up to `MEGAKERNEL_GEMV_ROWS` rows to the GEMVs.
    pub fn set_megakernel(&self, on: bool) {
        self.mega.store(on, std::sync::atomic::Ordering::Relaxed);
        if on {
            self.set_gemv_rows(self.gemv_rows().max(super::matmul::MEGAKERNEL_GEMV_ROWS));
        }
    }

    pub(crate) fn megakernel_on(&self) -> bool {
        self.mega.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Decode steps this backend has run as megakernel programs.
    pub fn megakernel_launches(&self) -> u64 {
        self.mega_launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a launch while a step is being captured.
    pub(crate) fn record(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: u32, args: &[Arg]) {
        if !self.recording.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Ok(mut r) = self.recorder.lock() {
            if let Some(r) = r.as_mut() {
                r.launches.push(Launch {
                    name: name.to_string(),
                    grid,
                    block,
                    smem,
                    args: args.to_vec(),
                });
            }
        }
    }

    /// Marks the step being captured as one the megakernel cannot run.
    pub(crate) fn record_refused(&self, why: &str) {
        if !self.recording.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Ok(mut r) = self.recorder.lock() {
            if let Some(r) = r.as_mut() {
                r.refused.get_or_insert_with(|| why.to_string());
            }
        }
    }

    /// Builds the program of a finished recording (None when the step
    /// cannot run as one; the reason is logged).
    pub(crate) fn build_program(&self, rec: Recorder) -> Option<MegaProgram> {
        let plan = match rec.refused {
            Some(why) => Err(why),
            None => compile(&rec.launches),
        };
        let r = plan.and_then(|plan| self.upload_program(&plan).map_err(|e| e.to_string()));
        match r {
            Ok(p) => {
                tracing::debug!(
                    "decode megakernel: {} ops, {} barriers, {} blocks, {} B shared",
                    p.nops,
                    p.barriers,
                    p.grid,
                    p.smem_bytes
                );
                Some(p)
            }
            Err(why) => {
                tracing::debug!("decode step keeps its CUDA graph: {why}");
                None
            }
        }
    }

    fn upload_program(&self, plan: &Plan) -> Result<MegaProgram, BackendError> {
        let smem_bytes = (plan.slot_floats + plan.scratch_floats) * 4;
        let func = if super::knobs::on_if_one("KESTREL_MEGAKERNEL_X2") {
            "decode_program_x2"
        } else {
            "decode_program"
        };
        self.k.set_max_dynamic_smem(func, smem_bytes)?;
        let per_sm = self.k.occupancy(func, MK_THREADS, smem_bytes)?;
        if per_sm == 0 {
            return Err(BackendError::Unsupported(format!(
                "decode megakernel: no block fits with {smem_bytes} B of shared memory"
            )));
        }
        let want = super::knobs::usize_of("KESTREL_MEGAKERNEL_BLOCKS_PER_SM")
            .map_or(2, |n| n.clamp(1, u32::MAX as usize) as u32);
        let grid = per_sm.min(want) * self.dev.sm_count.max(1) as u32;
        // SAFETY: MkOp is repr(C) plain data (no padding: 4 + 60 + 16 + 128 bytes).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                plan.ops.as_ptr() as *const u8,
                plan.ops.len() * std::mem::size_of::<MkOp>(),
            )
        };
        let ops = self.upload_bytes(
            crate::memory::MemClass::Workspace,
            bytes,
            "decode megakernel program",
        )?;
        let bar = DevBuf::alloc(&self.dev.stream, 8, "decode megakernel barrier")?;
        let trace = if super::knobs::on_if_one("KESTREL_MEGAKERNEL_TRACE") {
            Some(Trace {
                buf: DevBuf::alloc(&self.dev.stream, (plan.ops.len() + 1) * 8, "megakernel trace")?,
                codes: plan.ops.iter().map(|o| o.code).collect(),
                sums: std::sync::Mutex::new((vec![0; plan.ops.len()], 0)),
            })
        } else {
            None
        };
        let (regs, local) = self.k.resources(func)?;
        tracing::debug!(
            "decode megakernel: {regs} registers, {local} B local memory per thread, {per_sm} blocks/SM fit"
        );
        let ahead =
            super::knobs::usize_of("KESTREL_MEGAKERNEL_AHEAD").map_or(0, |n| n.min(i32::MAX as usize) as i32);
        Ok(MegaProgram {
            tail: plan.tail.clone(),
            func,
            ahead,
            trace,
            ops,
            nops: plan.ops.len(),
            bar,
            smem_bytes,
            scratch_off: plan.slot_floats,
            grid,
            barriers: plan.barriers(),
        })
    }

    /// Runs a program: the whole decode step in one launch.
    pub(crate) fn launch_program(&self, p: &MegaProgram) -> Result<(), BackendError> {
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| BackendError::Cuda(format!("binding the context: {e}")))?;
        self.mega_launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.k.launch(
            &self.dev.stream,
            p.func,
            (p.grid, 1, 1),
            MK_THREADS,
            p.smem_bytes,
            &[
                Arg::Ptr(p.ops.ptr),
                Arg::I32(p.nops as i32),
                Arg::Ptr(p.bar.ptr),
                Arg::I32(p.scratch_off as i32),
                Arg::Ptr(p.trace.as_ref().map_or(0, |t| t.buf.ptr)),
                Arg::I32(p.ahead),
            ],
        )?;
        if let Some(l) = &p.tail {
            self.k
                .launch(&self.dev.stream, &l.name, l.grid, l.block, l.smem, &l.args)?;
        }
        if let Some(t) = &p.trace {
            let mut times = vec![0u64; p.nops + 1];
            self.dev
                .stream
                .synchronize()
                .map_err(|e| BackendError::Cuda(format!("megakernel trace: {e}")))?;
            self.dtoh(&mut times, t.buf.ptr, "megakernel trace")?;
            if let Ok(mut g) = t.sums.lock() {
                for (i, w) in times.windows(2).enumerate() {
                    g.0[i] += w[1].saturating_sub(w[0]);
                }
                g.1 += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(name: &str, grid: (u32, u32, u32), block: u32, args: Vec<Arg>) -> Launch {
        Launch {
            name: name.into(),
            grid,
            block,
            smem: 0,
            args,
        }
    }

    const X: u64 = 0x1000_0000;
    const H: u64 = 0x2000_0000;
    const O: u64 = 0x3000_0000;
    const O2: u64 = 0x3100_0000;
    const W: u64 = 0x4000_0000;

    fn gemv(x: u64, out: u64, cols: i32, rows: i32) -> Launch {
        let args = vec![
            Arg::Ptr(W),
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::I32(rows),
            Arg::I32(cols),
            Arg::Ptr(x),
            Arg::I32(1),
            Arg::Ptr(out),
        ];
        launch("gemv_q8_0_1", ((rows as u32).div_ceil(8), 1, 1), 256, args)
    }

    fn resnorm(x: u64, delta: u64, out: u64, cols: i32) -> Launch {
        let args = vec![
            Arg::Ptr(x),
            Arg::Ptr(delta),
            Arg::Ptr(0),
            Arg::Ptr(W),
            Arg::F32(1e-6),
            Arg::I32(cols),
            Arg::Ptr(out),
            Arg::Ptr(0),
        ];
        launch("residual_norm", (1, 1, 1), 64, args)
    }

    #[test]
    fn op_layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<MkOp>(), 208);
        assert_eq!(std::mem::align_of::<MkOp>(), 8);
    }

    #[test]
    fn residual_chain_keeps_values_in_shared_memory_and_places_barriers() {
        // x += f(W·h) twice: the second GEMV's input comes from the residual
        // step (a slot), and a barrier separates each GEMV from the step that
        // reads its output.
        let ls = vec![
            gemv(H, O, 64, 64),
            resnorm(X, O, H, 64),
            gemv(H, O2, 64, 64),
            resnorm(X, O2, H, 64),
        ];
        let plan = compile(&ls).expect("compiles");
        let codes: Vec<u32> = plan.ops.iter().map(|o| o.code).collect();
        // H is global at first: staged, then GEMV; x enters shared memory once.
        assert_eq!(
            codes,
            vec![MK_LOAD, MK_GEMV, MK_BARRIER, MK_LOAD, MK_RESNORM, MK_GEMV, MK_BARRIER, MK_RESNORM]
        );
        let gemv2 = &plan.ops[5];
        assert_ne!(
            gemv2.p[0] & SHARED,
            0,
            "second GEMV reads its input from shared memory"
        );
        assert_eq!(plan.barriers(), 2);
    }

    #[test]
    fn a_tall_final_gemv_runs_after_the_program_from_global_memory() {
        // The LM head: its input (a residual step's output, in shared
        // memory) is stored back, and the launch itself becomes the tail.
        let ls = vec![gemv(H, O, 64, 64), resnorm(X, O, H, 64), gemv(H, O2, 64, 262_144)];
        let plan = compile(&ls).expect("compiles");
        assert_eq!(plan.tail.as_ref().map(|l| l.grid.0), Some(262_144 / 8));
        let last = plan.ops.last().expect("ops");
        assert_eq!(last.code, MK_STORE);
        assert_eq!((last.p[1], last.i[0]), (H, 64));
        assert!(plan.ops.iter().filter(|o| o.code == MK_GEMV).count() == 1);
    }

    #[test]
    fn a_reused_buffer_keeps_its_slot() {
        // O is staged, rewritten by a GEMV, staged again: one slot, not two.
        let ls = vec![
            gemv(H, O, 64, 64),
            gemv(O, X, 64, 64),
            gemv(H, O, 64, 64),
            gemv(O, X, 64, 64),
        ];
        let plan = compile(&ls).expect("compiles");
        assert_eq!(plan.slot_floats, 2 * 64, "slots for H and O only");
        let loads = plan.ops.iter().filter(|o| o.code == MK_LOAD).count();
        assert_eq!(loads, 3, "H once, O after each GEMV that wrote it");
    }

    #[test]
    fn a_distributed_phase_never_overwrites_what_this_segment_still_reads() {
        // The residual step reads O; a GEMV writing O in the same segment
        // would race with blocks still reading it: a barrier must come first.
        let ls = vec![gemv(H, O, 64, 64), resnorm(X, O, H, 64), gemv(H, O, 64, 64)];
        let plan = compile(&ls).expect("compiles");
        let codes: Vec<u32> = plan.ops.iter().map(|o| o.code).collect();
        let last_gemv = codes.iter().rposition(|&c| c == MK_GEMV).expect("gemv");
        assert_eq!(codes[last_gemv - 1], MK_BARRIER);
    }

    #[test]
    fn unknown_kernels_and_several_rows_are_refused() {
        let e = compile(&[launch("softcap", (1, 1, 1), 256, vec![])]).unwrap_err();
        assert!(e.contains("softcap"), "{e}");
        let mut g = gemv(H, O, 64, 64);
        g.args[6] = Arg::I32(2);
        assert!(compile(&[g]).unwrap_err().contains("several rows"));
        let mut r = resnorm(X, O, H, 64);
        r.grid.0 = 3;
        assert!(compile(&[gemv(H, O, 64, 64), r]).unwrap_err().contains("rows"));
    }

    #[test]
    fn attention_may_not_read_a_value_that_only_lives_in_shared_memory() {
        let att = launch(
            "attention",
            (1, 4, 2),
            128,
            vec![
                Arg::Ptr(H),
                Arg::Ptr(W),
                Arg::I64(0),
                Arg::I64(0),
                Arg::I32(1),
                Arg::Ptr(1),
                Arg::Ptr(2),
                Arg::Ptr(3),
                Arg::I32(8),
                Arg::I32(16),
                Arg::I32(4),
                Arg::I32(1),
                Arg::I32(64),
                Arg::F32(0.125),
                Arg::I32(0),
                Arg::F32(0.0),
                Arg::Ptr(O),
                Arg::I32(2),
                Arg::Ptr(5),
                Arg::Ptr(6),
            ],
        );
        // H written by a residual step lives only in shared memory.
        let e = compile(&[gemv(H, O, 64, 64), resnorm(X, O, H, 64), att.clone()]).unwrap_err();
        assert!(e.contains("shared memory"), "{e}");
        // Written by a GEMV it is in global memory: fine.
        let plan = compile(&[gemv(X, H, 64, 64), att]).expect("compiles");
        assert_eq!(plan.ops.last().map(|o| o.code), Some(MK_ATTN));
        assert_eq!(plan.scratch_floats, 2 * att_smem_floats(64));
    }
}
