//! The sampler's softmax and top-k over the vocabulary, on the host (no
//! backend has a device version): the engine's code against a plain
//! reference.

use anyhow::Result;
use kestrel_backend::Backend;
use kestrel_engine::sampling::{log_softmax_normalizer, top_k_candidates};

use super::inputs::Inputs;
use super::measure::{Impl, Prepared};
use super::spec::{Case, TOP_K, VOCAB};

/// `rows` sequences' logits; the backend argument is not used.
pub struct Softmax {
    logits: Vec<f32>,
    lse: Vec<f64>,
}

impl Softmax {
    pub fn new(c: &Case, inp: &Inputs) -> Softmax {
        Softmax {
            logits: inp.act(0, c.rows * VOCAB, 20.0),
            lse: Vec::new(),
        }
    }
}

/// `ln(sum(exp(l)))` the textbook way: the max, then every term in f64.
pub fn reference_lse(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln()
}

impl<B: Backend> Prepared<B> for Softmax {
    fn run(&mut self, _be: &B, imp: Impl) -> Result<()> {
        let f = match imp {
            Impl::Reference => reference_lse,
            Impl::Fused => log_softmax_normalizer,
        };
        self.lse = self.logits.chunks(VOCAB).map(f).collect();
        Ok(())
    }

    fn outputs(&mut self, _be: &B) -> Result<Vec<f32>> {
        Ok(self.lse.iter().map(|&v| v as f32).collect())
    }
}

pub struct TopK {
    logits: Vec<f32>,
    ids: Vec<u32>,
}

impl TopK {
    pub fn new(c: &Case, inp: &Inputs) -> TopK {
        TopK {
            logits: inp.act(0, c.rows * VOCAB, 20.0),
            ids: Vec::new(),
        }
    }
}

/// The `k` best `(logit, id)`, best first and lowest id on ties, by sorting everything.
pub fn reference_top_k(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut all: Vec<(f32, u32)> = logits.iter().enumerate().map(|(i, &l)| (l, i as u32)).collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    all.truncate(k);
    all
}

impl<B: Backend> Prepared<B> for TopK {
    fn run(&mut self, _be: &B, imp: Impl) -> Result<()> {
        let f = match imp {
            Impl::Reference => reference_top_k,
            Impl::Fused => top_k_candidates,
        };
        self.ids = self
            .logits
            .chunks(VOCAB)
            .flat_map(|row| f(row, TOP_K).into_iter().map(|(_, id)| id))
            .collect();
        Ok(())
    }

    fn outputs(&mut self, _be: &B) -> Result<Vec<f32>> {
        Ok(self.ids.iter().map(|&i| i as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_match_hand_computed_values() {
        let l = [1.0f32, 3.0, 3.0, -2.0];
        let want = (1f64.exp() + 2.0 * 3f64.exp() + (-2f64).exp()).ln();
        assert!((reference_lse(&l) - want).abs() < 1e-12);
        assert_eq!(reference_top_k(&l, 3), vec![(3.0, 1), (3.0, 2), (1.0, 0)]);
    }
}
