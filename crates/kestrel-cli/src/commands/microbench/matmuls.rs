//! Ops with weight matrices: the plain GEMV and the fused projections of a
//! decoder layer (QKV, the gated FFN, and both with the residual step).

use anyhow::Result;
use kestrel_backend::backend::{matmul_residual_norm_unfused, qkv_unfused, residual_norm_unfused};
use kestrel_backend::{Activation, Backend, ResidualNorm};

use super::inputs::Inputs;
use super::measure::{Impl, Prepared};
use super::spec::{Case, Role, EPS, FFN, HIDDEN, KV_DIM, Q_DIM};
use super::upload;

fn weight<B: Backend>(be: &B, inp: &Inputs, role: Role) -> Result<B::Weight> {
    upload::weight(be, role.name(), inp.weight(role)?)
}

/// `out = W · x` for `rows` activation rows.
pub struct Gemv<B: Backend> {
    x: B::Act,
    w: B::Weight,
    out: B::Act,
}

impl<B: Backend> Gemv<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs, role: Role) -> Result<Self> {
        let (o, i) = role.shape();
        let r = c.rows;
        Ok(Gemv {
            x: upload::act(be, r, i, &inp.act(0, r * i, 2.0))?,
            w: weight(be, inp, role)?,
            out: be.alloc_act(r, o)?,
        })
    }
}

impl<B: Backend> Prepared<B> for Gemv<B> {
    fn run(&mut self, be: &B, _imp: Impl) -> Result<()> {
        Ok(be.matmul(&self.x, &self.w, &mut self.out)?)
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        Ok(be.read_act(&self.out)?)
    }
}

/// q, k, v projections of the normed hidden state.
pub struct Qkv<B: Backend> {
    h: B::Act,
    w: [B::Weight; 3],
    q: B::Act,
    k: B::Act,
    v: B::Act,
}

impl<B: Backend> Qkv<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs) -> Result<Self> {
        let r = c.rows;
        Ok(Qkv {
            h: upload::act(be, r, HIDDEN, &inp.act(0, r * HIDDEN, 2.0))?,
            w: [
                weight(be, inp, Role::AttnQ)?,
                weight(be, inp, Role::AttnK)?,
                weight(be, inp, Role::AttnV)?,
            ],
            q: be.alloc_act(r, Q_DIM)?,
            k: be.alloc_act(r, KV_DIM)?,
            v: be.alloc_act(r, KV_DIM)?,
        })
    }
}

impl<B: Backend> Prepared<B> for Qkv<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        let s = self;
        let w = [&s.w[0], &s.w[1], &s.w[2]];
        match imp {
            Impl::Reference => qkv_unfused(be, &s.h, w, [None; 3], &mut s.q, &mut s.k, &mut s.v)?,
            Impl::Fused => be.qkv(&s.h, w, [None; 3], &mut s.q, &mut s.k, &mut s.v)?,
        }
        Ok(())
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        let mut v = be.read_act(&self.q)?;
        v.extend(be.read_act(&self.k)?);
        v.extend(be.read_act(&self.v)?);
        Ok(v)
    }
}

/// The residual stream and norms of the residual step after a projection.
struct Residual<B: Backend> {
    x: B::Act,
    post: B::Vector,
    next: B::Vector,
    tmp: B::Act,
    out: B::Act,
}

impl<B: Backend> Residual<B> {
    fn new(be: &B, rows: usize, inp: &Inputs) -> Result<Self> {
        Ok(Residual {
            x: upload::act(be, rows, HIDDEN, &inp.act(20, rows * HIDDEN, 4.0))?,
            post: upload::vector(be, "post_norm", &inp.norm_weight(21, HIDDEN))?,
            next: upload::vector(be, "next_norm", &inp.norm_weight(22, HIDDEN))?,
            tmp: be.alloc_act(rows, HIDDEN)?,
            out: be.alloc_act(rows, HIDDEN)?,
        })
    }

    fn step(&mut self) -> ResidualNorm<'_, B> {
        ResidualNorm {
            x: &mut self.x,
            post_norm: Some(&self.post),
            next_norm: &self.next,
            eps: EPS,
            tmp: &mut self.tmp,
            out: &mut self.out,
        }
    }

    fn read(&self, be: &B) -> Result<Vec<f32>> {
        let mut v = be.read_act(&self.x)?;
        v.extend(be.read_act(&self.out)?);
        Ok(v)
    }
}

/// `W_down · (act(W_gate·h) * (W_up·h))`, optionally followed by the
/// residual step (`gated_ffn_residual_norm`).
pub struct GatedFfn<B: Backend> {
    h: B::Act,
    w: [B::Weight; 3],
    act: Activation,
    gate: B::Act,
    up: B::Act,
    act_out: B::Act,
    out: B::Act,
    residual: Option<Residual<B>>,
}

impl<B: Backend> GatedFfn<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs, act: Activation, with_residual: bool) -> Result<Self> {
        let r = c.rows;
        let residual = match with_residual {
            true => Some(Residual::new(be, r, inp)?),
            false => None,
        };
        Ok(GatedFfn {
            h: upload::act(be, r, HIDDEN, &inp.act(0, r * HIDDEN, 2.0))?,
            w: [
                weight(be, inp, Role::FfnGate)?,
                weight(be, inp, Role::FfnUp)?,
                weight(be, inp, Role::FfnDown)?,
            ],
            act,
            gate: be.alloc_act(r, FFN)?,
            up: be.alloc_act(r, FFN)?,
            act_out: be.alloc_act(r, FFN)?,
            out: be.alloc_act(r, HIDDEN)?,
            residual,
        })
    }
}

impl<B: Backend> Prepared<B> for GatedFfn<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        let s = self;
        let w = [&s.w[0], &s.w[1], &s.w[2]];
        match (imp, &mut s.residual) {
            (Impl::Reference, res) => {
                be.matmul(&s.h, w[0], &mut s.gate)?;
                be.matmul(&s.h, w[1], &mut s.up)?;
                be.gated_activation(&s.gate, &s.up, s.act, &mut s.act_out)?;
                be.matmul(&s.act_out, w[2], &mut s.out)?;
                if let Some(r) = res {
                    residual_norm_unfused(
                        be,
                        &mut r.x,
                        &s.out,
                        Some(&r.post),
                        &r.next,
                        EPS,
                        &mut r.tmp,
                        &mut r.out,
                    )?;
                }
            }
            (Impl::Fused, None) => {
                be.gated_ffn(&s.h, w, s.act, &mut s.gate, &mut s.up, &mut s.act_out, &mut s.out)?
            }
            (Impl::Fused, Some(r)) => be.gated_ffn_residual_norm(
                &s.h,
                w,
                s.act,
                &mut s.gate,
                &mut s.up,
                &mut s.act_out,
                &mut s.out,
                r.step(),
            )?,
        }
        Ok(())
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        match &self.residual {
            Some(r) => r.read(be),
            None => Ok(be.read_act(&self.out)?),
        }
    }
}

/// The attention output projection followed by the residual step.
pub struct MatmulResidualNorm<B: Backend> {
    a: B::Act,
    w: B::Weight,
    delta: B::Act,
    residual: Residual<B>,
}

impl<B: Backend> MatmulResidualNorm<B> {
    pub fn new(be: &B, c: &Case, inp: &Inputs) -> Result<Self> {
        let r = c.rows;
        Ok(MatmulResidualNorm {
            a: upload::act(be, r, Q_DIM, &inp.act(0, r * Q_DIM, 2.0))?,
            w: weight(be, inp, Role::AttnOut)?,
            delta: be.alloc_act(r, HIDDEN)?,
            residual: Residual::new(be, r, inp)?,
        })
    }
}

impl<B: Backend> Prepared<B> for MatmulResidualNorm<B> {
    fn run(&mut self, be: &B, imp: Impl) -> Result<()> {
        let s = self;
        match imp {
            Impl::Reference => matmul_residual_norm_unfused(be, &s.a, &s.w, &mut s.delta, s.residual.step())?,
            Impl::Fused => be.matmul_residual_norm(&s.a, &s.w, &mut s.delta, s.residual.step())?,
        }
        Ok(())
    }

    fn outputs(&mut self, be: &B) -> Result<Vec<f32>> {
        self.residual.read(be)
    }
}
