//! GEMMs that run the next small step in their last blocks (the residual
//! step after Wo and down, the gated activation after gate/up, q/k norm +
//! RoPE + K/V store after QKV: `set_tail_rows`) against the same kernels as
//! separate launches: the logits of every prefill and decode step must be
//! identical, bit for bit, on the default model, at 1 to 32 rows (every
//! tail kernel size) and past them, for f32 and f16 KV caches. Skips,
//! saying so, where no GPU is usable.

mod common;

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::layout::KvDType;
use kestrel_backend::Backend;
use kestrel_model::Model;

/// Greedy tokens, the prompt's last logits and every decode step's logits.
type Decoded = (Vec<u32>, Vec<f32>, Vec<Vec<f32>>);

fn run(tail_rows: usize, prompts: &[Vec<u32>], kv: KvDType) -> (Vec<Decoded>, u64) {
    let be = CudaBackend::with_kernels(0, KernelSet::Fused).unwrap();
    be.set_tail_rows(tail_rows);
    let be = Arc::new(be);
    let model = Model::load(&common::default_model(), be.clone()).unwrap();
    let got = prompts
        .iter()
        .map(|p| common::greedy_steps(&model, p, 12, kv, true))
        .collect();
    (got, be.tail_launches())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn gemm_tails_equal_separate_launches_bit_for_bit() {
    match CudaBackend::with_kernels(0, KernelSet::Fused) {
        Ok(b) => println!("device: {}", b.describe()),
        Err(e) => {
            println!("SKIP: no CUDA device: {e}");
            return;
        }
    }
    // Prefills of 1, 3, 8, 17, 32 rows take the 1-, 2- and 4-tile tail
    // kernels; 40 rows none (both runs then take the same launches).
    let prompts: Vec<Vec<u32>> = [1usize, 3, 8, 17, 32, 40]
        .iter()
        .map(|&n| {
            (0..n as u32)
                .map(|i| 2 + (i * 7919 + n as u32) % 200_000)
                .collect()
        })
        .collect();
    for kv in [KvDType::F32, KvDType::F16] {
        let (tails, n_tails) = run(32, &prompts, kv);
        let (plain, n_plain) = run(0, &prompts, kv);
        println!("{kv:?}: {n_tails} tail launches, {n_plain} without");
        assert!(n_tails > 0, "no GEMM ran a tail");
        assert_eq!(n_plain, 0, "a GEMM ran a tail while they were off");
        let mut failures = Vec::new();
        for (i, ((tt, ft, st), (tp, fp, sp))) in tails.iter().zip(&plain).enumerate() {
            let n = prompts[i].len();
            if tt != tp {
                failures.push(format!(
                    "{kv:?} prompt of {n}: greedy tokens differ: {tt:?} vs {tp:?}"
                ));
            }
            if !same_bits(ft, fp) {
                failures.push(format!("{kv:?} prompt of {n}: the prefill's logits differ"));
            }
            if let Some(s) = st.iter().zip(sp).position(|(a, b)| !same_bits(a, b)) {
                failures.push(format!("{kv:?} prompt of {n}: decode step {s}'s logits differ"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
