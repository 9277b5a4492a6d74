//! Running one implementation of a prepared case: its outputs on fresh
//! inputs, then its median time.
//!
//! Timing: every sample runs the op `inner` times back to back and then
//! waits for the device (`Backend::synchronize`; CPU ops are synchronous),
//! so a GPU's asynchronous launches are all counted and the wait is paid
//! once per sample. `inner` is chosen from one timed call so that a sample
//! lasts at least `min_sample`: a 3 µs kernel is timed over hundreds of
//! launches instead of being lost in the clock and the sync.

use std::time::{Duration, Instant};

use anyhow::Result;
use kestrel_backend::Backend;

/// Which implementation of an op to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    Reference,
    Fused,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Reference => "reference",
            Impl::Fused => "fused",
        }
    }
}

/// A case with its inputs on a backend, ready to run either implementation.
pub trait Prepared<B: Backend> {
    /// Queues one run of the op (it may run asynchronously on a device).
    fn run(&mut self, be: &B, imp: Impl) -> Result<()>;
    /// The op's results (outputs and inputs it updates in place), read back.
    fn outputs(&mut self, be: &B) -> Result<Vec<f32>>;
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub warmup: usize,
    pub iters: usize,
    pub min_sample: Duration,
}

/// Most runs of an op in one sample (bounds a sample of a ~ns host op).
const MAX_INNER: usize = 100_000;

pub struct Measured {
    /// Results of the first run, on the untouched inputs.
    pub outputs: Vec<f32>,
    /// Time of one run, µs, per sample.
    pub samples_us: Vec<f64>,
    /// Runs per sample.
    pub inner: usize,
}

pub fn measure<B: Backend>(be: &B, p: &mut dyn Prepared<B>, imp: Impl, t: &Timing) -> Result<Measured> {
    // First run on the fresh inputs: in-place ops change them afterwards.
    p.run(be, imp)?;
    be.synchronize()?;
    let outputs = p.outputs(be)?;
    // The first run may also have allocated scratch: calibrate on the second.
    let t0 = Instant::now();
    p.run(be, imp)?;
    be.synchronize()?;
    let one = t0.elapsed().as_secs_f64().max(1e-9);
    let inner = ((t.min_sample.as_secs_f64() / one).ceil() as usize).clamp(1, MAX_INNER);
    for _ in 0..t.warmup {
        sample(be, p, imp, inner)?;
    }
    let mut samples_us = Vec::with_capacity(t.iters);
    for _ in 0..t.iters {
        samples_us.push(sample(be, p, imp, inner)?);
    }
    Ok(Measured {
        outputs,
        samples_us,
        inner,
    })
}

/// One sample: `inner` runs and a wait; µs per run.
fn sample<B: Backend>(be: &B, p: &mut dyn Prepared<B>, imp: Impl, inner: usize) -> Result<f64> {
    let t0 = Instant::now();
    for _ in 0..inner {
        p.run(be, imp)?;
    }
    be.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() * 1e6 / inner as f64)
}

/// Several prepared copies of a case, run in turn: each run reads weights
/// (or a KV cache) that the previous runs have pushed out of the caches,
/// as a decode step does when it moves on to the next layer. Outputs are
/// those of the first copy, which the first run goes to.
pub struct Rotating<B: Backend> {
    items: Vec<Box<dyn Prepared<B>>>,
    next: usize,
}

impl<B: Backend> Rotating<B> {
    pub fn new(items: Vec<Box<dyn Prepared<B>>>) -> Rotating<B> {
        Rotating { items, next: 0 }
    }
}

impl<B: Backend> Prepared<B> for Rotating<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        let i = self.next;
        self.next = (i + 1) % self.items.len().max(1);
        match self.items.get_mut(i) {
            Some(p) => p.run(be, imp),
            None => anyhow::bail!("no prepared copy to run"),
        }
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        match self.items.first_mut() {
            Some(p) => p.outputs(be),
            None => anyhow::bail!("no prepared copy to read"),
        }
    }
}
