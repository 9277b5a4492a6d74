//! Every case on a pair of backends: the reference implementation on the
//! reference backend, the fused one on the fused backend, same inputs.

use anyhow::{Context, Result};
use kestrel_backend::{Activation, Backend};
use kestrel_bench::Stats;

use super::agreement::{compare, Agreement};
use super::attention::{Attention, QkNormRopeStore, Rope};
use super::inputs::Inputs;
use super::matmuls::{GatedFfn, Gemv, MatmulResidualNorm, Qkv};
use super::measure::{measure, Impl, Measured, Prepared, Rotating, Timing};
use super::norms::{AddNorm, Argmax, GatedAct, RmsNorm};
use super::sampler::{Softmax, TopK};
use super::spec::{Case, Op};

/// One implementation's timing of a case.
#[derive(Clone, Debug)]
pub struct Timed {
    pub samples_us: Vec<f64>,
    pub inner: usize,
    pub median_us: f64,
    /// From the median time.
    pub gb_s: f64,
    pub tflop_s: f64,
    /// `gb_s` over the measured peak bandwidth.
    pub peak_frac: f64,
}

#[derive(Clone, Debug)]
pub enum Status {
    Done {
        reference: Timed,
        fused: Timed,
        agreement: Agreement,
    },
    Skipped(String),
    Failed(String),
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub case: Case,
    pub bytes: f64,
    pub flops: f64,
    /// Copies of the weights / KV cache the runs rotate over.
    pub copies: usize,
    pub status: Status,
}

pub struct Run<'a, R: Backend, F: Backend> {
    pub reference: &'a R,
    pub fused: &'a F,
    /// Whether the backends work in host memory (the sampler's host-only ops run then).
    pub on_host: bool,
    pub timing: Timing,
    pub peak_gb_s: f64,
    /// Each case's weights or KV cache are copied until the copies hold at
    /// least this many bytes (0: one copy, cache-hot).
    pub cold_bytes: f64,
}

/// Most copies of a case's streamed data (bounds the upload time of tiny matrices).
const MAX_COPIES: usize = 512;

/// Copies of the case's weights or KV cache that together hold `cold_bytes`.
pub fn copies(c: &Case, cold_bytes: f64) -> usize {
    let each = c.streamed_bytes();
    if each <= 0.0 || cold_bytes <= 0.0 {
        return 1;
    }
    ((cold_bytes / each).ceil() as usize).clamp(1, MAX_COPIES)
}

fn prepare<B: Backend + 'static>(
    be: &B,
    c: &Case,
    inp: &Inputs,
    copies: usize,
) -> Result<Box<dyn Prepared<B>>> {
    if c.op.has_weights() && copies > 1 {
        let items = (0..copies)
            .map(|_| prepare(be, c, inp, 1))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Box::new(Rotating::new(items)));
    }
    Ok(match c.op {
        Op::RmsNorm => Box::new(RmsNorm::new(be, c, inp)?),
        Op::AddRmsNorm => Box::new(AddNorm::new(be, c, inp, false)?),
        Op::ResidualNorm => Box::new(AddNorm::new(be, c, inp, true)?),
        Op::Geglu => Box::new(GatedAct::new(be, c, inp, Activation::GeluTanh)?),
        Op::Swiglu => Box::new(GatedAct::new(be, c, inp, Activation::Silu)?),
        Op::Rope => Box::new(Rope::new(be, c, inp, false)?),
        Op::QkNormRope => Box::new(Rope::new(be, c, inp, true)?),
        Op::QkNormRopeStore => Box::new(QkNormRopeStore::new(be, c, inp)?),
        Op::Gemv => {
            let role = c.role.context("a gemv case without a matrix")?;
            Box::new(Gemv::new(be, c, inp, role)?)
        }
        Op::Qkv => Box::new(Qkv::new(be, c, inp)?),
        Op::GatedFfn => {
            let act = c.act.unwrap_or(Activation::GeluTanh);
            Box::new(GatedFfn::new(be, c, inp, act, false)?)
        }
        Op::MatmulResidualNorm => Box::new(MatmulResidualNorm::new(be, c, inp)?),
        Op::GatedFfnResidualNorm => Box::new(GatedFfn::new(be, c, inp, Activation::GeluTanh, true)?),
        Op::Attention => Box::new(Attention::new(be, c, inp, copies)?),
        Op::Argmax => Box::new(Argmax::new(be, c, inp)?),
        Op::Softmax => Box::new(Softmax::new(c, inp)),
        Op::TopK => Box::new(TopK::new(c, inp)),
    })
}

/// Prepares the case on `be`, measures `imp`, and frees the case's buffers
/// (a 671 MB F32 LM head is on one backend at a time).
fn one<B: Backend + 'static>(
    be: &B,
    c: &Case,
    inp: &Inputs,
    copies: usize,
    imp: Impl,
    t: &Timing,
) -> Result<Measured> {
    let mut p = prepare(be, c, inp, copies)
        .with_context(|| format!("preparing the inputs of the {} run", imp.name()))?;
    measure(be, &mut *p, imp, t).with_context(|| format!("running the {} implementation", imp.name()))
}

impl<R: Backend + 'static, F: Backend + 'static> Run<'_, R, F> {
    fn timed(&self, m: Measured, bytes: f64, flops: f64) -> Timed {
        let median_us = Stats::of(&m.samples_us).median;
        let per_s = 1e6 / median_us.max(1e-12);
        let gb_s = bytes * per_s / 1e9;
        Timed {
            samples_us: m.samples_us,
            inner: m.inner,
            median_us,
            gb_s,
            tflop_s: flops * per_s / 1e12,
            peak_frac: if self.peak_gb_s > 0.0 {
                gb_s / self.peak_gb_s
            } else {
                0.0
            },
        }
    }

    pub fn case(&self, c: &Case) -> Outcome {
        let (bytes, flops) = c.cost();
        let copies = copies(c, self.cold_bytes);
        let status = self.status(c, bytes, flops, copies);
        Outcome {
            case: c.clone(),
            bytes,
            flops,
            copies,
            status,
        }
    }

    fn status(&self, c: &Case, bytes: f64, flops: f64, copies: usize) -> Status {
        if let Some(why) = c.unsupported() {
            return Status::Skipped(why);
        }
        if c.op.host_only() && !self.on_host {
            return Status::Skipped(
                "the sampler runs on the host: no device implementation to measure".into(),
            );
        }
        let run = || -> Result<(Measured, Measured)> {
            let inp = Inputs::build(c)?;
            let r = one(self.reference, c, &inp, copies, Impl::Reference, &self.timing)?;
            let f = one(self.fused, c, &inp, copies, Impl::Fused, &self.timing)?;
            Ok((r, f))
        };
        match run() {
            Ok((r, f)) => {
                let agreement = compare(&r.outputs, &f.outputs, c.op.compare());
                Status::Done {
                    reference: self.timed(r, bytes, flops),
                    fused: self.timed(f, bytes, flops),
                    agreement,
                }
            }
            Err(e) => Status::Failed(format!("{e:#}")),
        }
    }
}
