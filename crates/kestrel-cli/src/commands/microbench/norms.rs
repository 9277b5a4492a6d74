//! Row-wise ops: RMSNorm, its residual variants, the gated activations, and
//! argmax over the vocabulary.

use anyhow::Result;
use kestrel_backend::backend::residual_norm_unfused;
use kestrel_backend::{Activation, Backend};

use super::inputs::Inputs;
use super::measure::{Impl, Prepared};
use super::spec::{Case, EPS, FFN, HIDDEN, VOCAB};
use super::upload;

/// `out = rms_norm(x, w)`: one kernel in both sets.
pub struct RmsNorm<B: Backend> {
    x: B::Act,
    w: B::Vector,
    out: B::Act,
}

impl<B: Backend> RmsNorm<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs) -> Result<Self> {
        let r = c.rows;
        Ok(RmsNorm {
            x: upload::act(be, r, HIDDEN, &inp.act(0, r * HIDDEN, 4.0))?,
            w: upload::vector(be, "norm", &inp.norm_weight(1, HIDDEN))?,
            out: be.alloc_act(r, HIDDEN)?,
        })
    }
}

impl<B: Backend> Prepared<B> for RmsNorm<B> {
    fn run(&mut self, be: &B, _imp: Impl) -> Result<()> {
        Ok(be.rms_norm(&self.x, &self.w, EPS, &mut self.out)?)
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        Ok(be.read_act(&self.out)?)
    }
}

/// `x += delta; out = rms_norm(x, w)`: `add` then `rms_norm` against
/// `add_rms_norm`. With `post`, gemma's residual step: `delta` is normed by
/// the post-norm first (`residual_norm_unfused` against `Backend::residual_norm`).
pub struct AddNorm<B: Backend> {
    x: B::Act,
    delta: B::Act,
    post: Option<B::Vector>,
    next: B::Vector,
    tmp: B::Act,
    out: B::Act,
}

impl<B: Backend> AddNorm<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs, post_norm: bool) -> Result<Self> {
        let r = c.rows;
        let post = match post_norm {
            true => Some(upload::vector(be, "post_norm", &inp.norm_weight(3, HIDDEN))?),
            false => None,
        };
        Ok(AddNorm {
            x: upload::act(be, r, HIDDEN, &inp.act(0, r * HIDDEN, 4.0))?,
            delta: upload::act(be, r, HIDDEN, &inp.act(1, r * HIDDEN, 1.0))?,
            post,
            next: upload::vector(be, "next_norm", &inp.norm_weight(2, HIDDEN))?,
            tmp: be.alloc_act(r, HIDDEN)?,
            out: be.alloc_act(r, HIDDEN)?,
        })
    }
}

impl<B: Backend> Prepared<B> for AddNorm<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        let s = self;
        match (&s.post, imp) {
            (None, Impl::Reference) => {
                be.add(&mut s.x, &s.delta)?;
                be.rms_norm(&s.x, &s.next, EPS, &mut s.out)?;
            }
            (None, Impl::Fused) => be.add_rms_norm(&mut s.x, &s.delta, &s.next, EPS, &mut s.out)?,
            (Some(post), Impl::Reference) => residual_norm_unfused(
                be,
                &mut s.x,
                &s.delta,
                Some(post),
                &s.next,
                EPS,
                &mut s.tmp,
                &mut s.out,
            )?,
            (Some(post), Impl::Fused) => be.residual_norm(
                &mut s.x,
                &s.delta,
                Some(post),
                &s.next,
                EPS,
                &mut s.tmp,
                &mut s.out,
            )?,
        }
        Ok(())
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        let mut v = be.read_act(&self.x)?;
        v.extend(be.read_act(&self.out)?);
        Ok(v)
    }
}

/// `out = act(gate) * up` over the FFN width.
pub struct GatedAct<B: Backend> {
    gate: B::Act,
    up: B::Act,
    act: Activation,
    out: B::Act,
}

impl<B: Backend> GatedAct<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs, act: Activation) -> Result<Self> {
        let r = c.rows;
        Ok(GatedAct {
            gate: upload::act(be, r, FFN, &inp.act(0, r * FFN, 4.0))?,
            up: upload::act(be, r, FFN, &inp.act(1, r * FFN, 2.0))?,
            act,
            out: be.alloc_act(r, FFN)?,
        })
    }
}

impl<B: Backend> Prepared<B> for GatedAct<B> {
    fn run(&mut self, be: &B, _imp: Impl) -> Result<()> {
        Ok(be.gated_activation(&self.gate, &self.up, self.act, &mut self.out)?)
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        Ok(be.read_act(&self.out)?)
    }
}

/// Greedy sampling of `rows` rows of logits: through the host (what the
/// reference kernel set does) against `argmax_rows` (a device kernel on CUDA).
pub struct Argmax<B: Backend> {
    logits: B::Act,
    ids: Vec<u32>,
}

impl<B: Backend> Argmax<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs) -> Result<Self> {
        let r = c.rows;
        Ok(Argmax {
            logits: upload::act(be, r, VOCAB, &inp.act(0, r * VOCAB, 20.0))?,
            ids: Vec::new(),
        })
    }
}

impl<B: Backend> Prepared<B> for Argmax<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        self.ids = match imp {
            Impl::Reference => {
                let v = be.read_act(&self.logits)?;
                v.chunks(VOCAB)
                    .map(|row| kestrel_backend::layout::argmax(row) as u32)
                    .collect()
            }
            Impl::Fused => be.argmax_rows(&self.logits)?,
        };
        Ok(())
    }

    fn outputs(&mut self, _be: &B) -> Result<Vec<f32>> {
        // Ids below 2^24 are exact in f32.
        Ok(self.ids.iter().map(|&i| i as f32).collect())
    }
}
