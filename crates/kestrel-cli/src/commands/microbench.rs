//! `kestrel microbench`: every fused operation of a decode step against its
//! reference, on the CPU or on CUDA, with the same random inputs: agreement
//! (max abs / relative error against a per-op tolerance), median time, and
//! achieved GB/s (TFLOP/s for products) against the device's peak
//! bandwidth measured at startup. See docs/microbench.md.
//!
//! Reference and fused are two backends run through the same generic code:
//! on CUDA the `Reference` and `Fused` kernel sets; on the CPU the scalar
//! kernels and the best SIMD ones (`KESTREL_CPU_KERNELS` picks another).
//! The reference implementation calls the composition of plain ops (what the
//! trait's defaults do); the fused one calls the fused trait method.

mod agreement;
mod attention;
mod inputs;
mod matmuls;
mod measure;
mod norms;
mod peak;
mod report;
mod run;
mod sampler;
mod spec;
mod upload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use kestrel_backend::cpu::{CpuBackend, SimdLevel};
use kestrel_backend::{Backend, KvDType};
use kestrel_bench::capsule;
use serde_json::{json, Value};

use crate::device::Device;
use measure::Timing;
use run::{Outcome, Run, Status};
use spec::{parse_list, Op, Role, Selection, Types};

/// `--kv`: element type of the KV cache of the attention cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KvArg {
    F32,
    F16,
    Bf16,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: Device,
    /// Operations (comma-separated; default: all): rms_norm, add_rms_norm,
    /// residual_norm, geglu, swiglu, rope, qk_norm_rope, qk_norm_rope_store,
    /// gemv, qkv, gated_ffn, matmul_residual_norm, gated_ffn_residual_norm,
    /// attention, argmax, softmax, top_k.
    #[arg(long, value_delimiter = ',')]
    pub ops: Vec<String>,
    /// Weight types of the ops with matrices (default: q8_0, q5_0, q4_0,
    /// q4_k, q5_k, q6_k, f16, bf16, f32, model). `model`: each matrix in
    /// the type the default model stores it in.
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// Matrices of the `gemv` op, by role in the default model (default:
    /// attn_out, ffn_up, ffn_down, lm_head; also attn_q, attn_k, attn_v, ffn_gate).
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// Activation rows (tokens of a decode step; sequences for attention).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub rows: Vec<usize>,
    /// Context lengths of the attention cases.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub ctx: Vec<usize>,
    /// KV cache element type of the attention cases.
    #[arg(long, value_enum, default_value = "f16")]
    pub kv: KvArg,
    /// Timed samples per implementation.
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed samples before them.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Shortest sample (µs): faster ops run several times per sample.
    #[arg(long, default_value_t = 1000)]
    pub min_sample_us: u64,
    /// Rotate each case over copies of its weights (or KV cache) holding at
    /// least this many MiB, so that every run reads them from memory as a
    /// decode step through many layers does, not from a cache that one
    /// small matrix fits in. 0: one copy (cache-hot numbers).
    #[arg(long, default_value_t = 128)]
    pub cold_mib: usize,
    /// Buffer size of the peak-bandwidth probes (MiB).
    #[arg(long, default_value_t = 256)]
    pub peak_mib: usize,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the result as one JSON document on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Write the capsule here (default: benchmarks/<time>-microbench-<device>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// On CUDA, also time kernel handoffs: graphs of this many chained,
    /// near-empty kernels (one and two blocks per SM), with the decode
    /// graph's PDL wait and with release/acquire counters (0: off).
    #[arg(long, default_value_t = 0)]
    pub boundaries: usize,
}

/// Most activation rows / sequences of a case (memory: an LM head output
/// is rows x 262,144 floats).
const MAX_ROWS: usize = 256;
/// Largest peak-probe buffer (three of them are allocated).
const MAX_PEAK_MIB: usize = 16 * 1024;
/// Longest attention context (the KV fill is rows x ctx tokens).
const MAX_CTX: usize = 131_072;

fn selection(a: &Args) -> Result<Selection> {
    let ops = parse_list(&a.ops, &Op::ALL, Op::parse)?;
    let types = parse_list(&a.types, &Types::DEFAULT, Types::parse)?;
    let shapes = parse_list(&a.shapes, &Role::DEFAULT_GEMV, Role::parse)?;
    if ops.is_empty() {
        bail!("--ops: no operation given");
    }
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if a.peak_mib == 0 || a.peak_mib > MAX_PEAK_MIB {
        bail!("--peak-mib must be in 1..={MAX_PEAK_MIB}, got {}", a.peak_mib);
    }
    if a.rows.is_empty() || a.rows.iter().any(|&r| r == 0 || r > MAX_ROWS) {
        bail!("--rows: every value must be in 1..={MAX_ROWS}, got {:?}", a.rows);
    }
    if ops.contains(&Op::Attention) && (a.ctx.is_empty() || a.ctx.iter().any(|&c| c == 0 || c > MAX_CTX)) {
        bail!("--ctx: every value must be in 1..={MAX_CTX}, got {:?}", a.ctx);
    }
    let rows = unique(&a.rows);
    let ctx = unique(&a.ctx);
    Ok(Selection {
        ops,
        types,
        shapes,
        rows,
        ctx,
        kv: match a.kv {
            KvArg::F32 => KvDType::F32,
            KvArg::F16 => KvDType::F16,
            KvArg::Bf16 => KvDType::Bf16,
        },
        seed: a.seed,
    })
}

/// `v` without repeats, in the order given.
fn unique(v: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(v.len());
    for &x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

struct Job {
    args: Args,
    sel: Selection,
    timing: Timing,
}

/// What a finished run hands back to `main`.
struct Finished {
    result: Value,
    table: String,
    problems: Vec<String>,
}

impl Job {
    fn execute<R: Backend + 'static, F: Backend + 'static>(
        &self,
        reference: &R,
        fused: &F,
        on_host: bool,
        device: String,
    ) -> Result<Finished> {
        let a = &self.args;
        eprintln!(
            "microbench on {device}: reference {}, fused {}",
            reference.describe(),
            fused.describe()
        );
        let mut probes = peak::backend_probes(fused, a.peak_mib)?;
        if on_host {
            probes.extend(peak::host_probes(a.peak_mib)?);
        }
        let peak = peak::peak(probes, a.peak_mib);
        eprintln!("peak bandwidth: {:.1} GB/s ({})", peak.gb_s, peak.method);
        let run = Run {
            reference,
            fused,
            on_host,
            timing: self.timing,
            peak_gb_s: peak.gb_s,
            cold_bytes: a.cold_mib as f64 * 1024.0 * 1024.0,
        };
        let cases = self.sel.cases();
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(cases.len());
        for (i, c) in cases.iter().enumerate() {
            let o = run.case(c);
            eprintln!("[{}/{}] {}", i + 1, cases.len(), progress(&o));
            outcomes.push(o);
        }
        let problems = problems(&outcomes);
        let (rd, fd) = (reference.describe(), fused.describe());
        let table = report::table(&device, (&rd, &fd), &peak, &outcomes);
        let result = json!({
            "kind": "microbench",
            "device": device,
            "backends": {"reference": rd, "fused": fd},
            "config": {
                "ops": self.sel.ops.iter().map(|o| o.name()).collect::<Vec<_>>(),
                "types": self.sel.types.iter().map(|t| t.name()).collect::<Vec<_>>(),
                "shapes": self.sel.shapes.iter().map(|r| r.name()).collect::<Vec<_>>(),
                "rows": self.sel.rows,
                "ctx": self.sel.ctx,
                "kv": format!("{:?}", a.kv).to_lowercase(),
                "iters": a.iters,
                "warmup": a.warmup,
                "min_sample_us": a.min_sample_us,
                "cold_mib": a.cold_mib,
                "seed": a.seed,
            },
            "peak": peak,
            "agreement": report::agreement_by_op(&outcomes),
            "problems": problems,
            "cases": outcomes.iter().map(report::case_json).collect::<Vec<_>>(),
            "rows": report::rows(&outcomes),
        });
        Ok(Finished {
            result,
            table,
            problems,
        })
    }
}

fn progress(o: &Outcome) -> String {
    let name = o.case.test_name();
    match &o.status {
        Status::Done {
            reference,
            fused,
            agreement,
        } => format!(
            "{name}: reference {:.2} us, fused {:.2} us, {:.2} GB/s, max rel err {:.1e} {}",
            reference.median_us,
            fused.median_us,
            fused.gb_s,
            agreement.max_rel,
            if agreement.ok { "ok" } else { "DISAGREE" }
        ),
        Status::Skipped(why) => format!("{name}: skipped ({why})"),
        Status::Failed(why) => format!("{name}: FAILED: {why}"),
    }
}

/// Cases that disagree beyond their tolerance or failed to run.
fn problems(outcomes: &[Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter_map(|o| match &o.status {
            Status::Done { agreement, .. } if !agreement.ok => Some(format!(
                "{}: fused disagrees with reference (max rel err {:.2e} > {:.0e}, {} non-finite)",
                o.case.test_name(),
                agreement.max_rel,
                agreement.tolerance,
                agreement.non_finite
            )),
            Status::Failed(why) => Some(format!("{}: failed: {why}", o.case.test_name())),
            _ => None,
        })
        .collect()
}

fn on_cpu(job: &Job) -> Result<Finished> {
    let reference = CpuBackend::with_level(SimdLevel::Scalar)?;
    let fused = CpuBackend::new();
    job.execute(&reference, &fused, true, "cpu".into())
}

/// Runs the job on CUDA device `n`. Outer error: no usable GPU (why).
#[cfg(feature = "cuda")]
fn on_cuda(n: usize, job: &Job) -> std::result::Result<Result<Finished>, String> {
    use kestrel_backend::cuda::{CudaBackend, KernelSet};
    let fused = CudaBackend::with_kernels(n, KernelSet::Fused).map_err(|e| e.to_string())?;
    let reference = CudaBackend::with_kernels(n, KernelSet::Reference).map_err(|e| e.to_string())?;
    // The same tuning knob as every other command (crate::device).
    if let Some(s) = std::env::var("KESTREL_ATTN_SPLITS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        fused.set_max_attention_splits(s);
    }
    let done = job.execute(&reference, &fused, false, format!("cuda:{n}"));
    Ok(done.and_then(|mut d| {
        if job.args.boundaries > 0 {
            kernel_boundaries(&fused, job.args.boundaries, &mut d)?;
        }
        Ok(d)
    }))
}

/// `--boundaries`: the handoff chains of `CudaBackend::kernel_boundaries`,
/// added to the table and the capsule.
#[cfg(feature = "cuda")]
fn kernel_boundaries(
    fused: &kestrel_backend::cuda::CudaBackend,
    kernels: usize,
    d: &mut Finished,
) -> Result<()> {
    const REPLAYS: usize = 20;
    let sms = fused.sm_count().max(1) as u32;
    let mut rows = Vec::new();
    d.table.push_str(&format!(
        "\nkernel handoffs (graphs of {kernels} chained near-empty kernels, best / median of {REPLAYS} replays):\n"
    ));
    for blocks in [sms, 2 * sms] {
        for c in fused.kernel_boundaries(kernels, blocks, REPLAYS)? {
            d.table.push_str(&format!(
                "  {:<5} {:>4} blocks: {:.2} / {:.2} us per kernel\n",
                c.handoff, c.blocks, c.us_per_kernel, c.us_per_kernel_median
            ));
            rows.push(json!({
                "handoff": c.handoff,
                "blocks": c.blocks,
                "kernels": c.kernels,
                "replays": REPLAYS,
                "us_per_kernel_best": c.us_per_kernel,
                "us_per_kernel_median": c.us_per_kernel_median,
            }));
        }
    }
    d.result["boundaries"] = json!(rows);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn on_cuda(_n: usize, _job: &Job) -> std::result::Result<Result<Finished>, String> {
    Err("this kestrel was built without the `cuda` feature".into())
}

pub fn main(a: Args) -> Result<()> {
    let sel = selection(&a)?;
    let timing = Timing {
        warmup: a.warmup,
        iters: a.iters,
        min_sample: Duration::from_micros(a.min_sample_us),
    };
    let job = Job {
        args: a.clone(),
        sel,
        timing,
    };
    let done = match a.device {
        Device::Cpu => on_cpu(&job)?,
        Device::Cuda(n) => match on_cuda(n, &job) {
            Ok(r) => r?,
            Err(why) => bail!("--device cuda:{n}: no usable GPU: {why}"),
        },
        Device::Auto => match on_cuda(0, &job) {
            Ok(r) => r?,
            Err(why) => {
                eprintln!("device: cpu (no usable GPU: {why})");
                on_cpu(&job)?
            }
        },
    };
    let path = capsule::write(&done.result, None, a.out.as_deref(), "microbench")?;
    if a.json {
        eprint!("{}", done.table);
        println!("{}", serde_json::to_string_pretty(&done.result)?);
    } else {
        print!("{}", done.table);
    }
    eprintln!("capsule: {}", path.display());
    if !done.problems.is_empty() {
        bail!(
            "{} case(s) need attention:\n  {}",
            done.problems.len(),
            done.problems.join("\n  ")
        );
    }
    Ok(())
}
