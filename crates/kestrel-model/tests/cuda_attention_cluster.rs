//! Decode attention whose key splits merge over a thread block cluster
//! (`attention_cl`, `set_attention_cluster`) against the same splits merged
//! through global partials (`attention_pre`): every decode step's logits
//! must be identical, bit for bit, on the default model, at contexts from 1
//! to ~320 keys (8 to 16 splits, some of them empty), for f32 and f16 KV
//! caches. Both runs cap the splits at 16, the cluster's size. Skips, saying
//! so, where no GPU is usable.

mod common;

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::layout::KvDType;
use kestrel_backend::Backend;
use kestrel_model::Model;

/// Greedy tokens and every decode step's logits.
type Decoded = (Vec<u32>, Vec<Vec<f32>>);

fn run(cluster: bool, prompts: &[Vec<u32>], kv: KvDType) -> (Vec<Decoded>, u64) {
    let be = CudaBackend::with_kernels(0, KernelSet::Fused).unwrap();
    be.set_attention_cluster(cluster);
    be.set_max_attention_splits(16);
    let be = Arc::new(be);
    let model = Model::load(&common::default_model(), be.clone()).unwrap();
    let got = prompts
        .iter()
        .map(|p| {
            let (tokens, _, steps) = common::greedy_steps(&model, p, 12, kv, true);
            (tokens, steps)
        })
        .collect();
    (got, be.attention_cluster_launches())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn cluster_merged_attention_equals_global_merge_bit_for_bit() {
    match CudaBackend::with_kernels(0, KernelSet::Fused) {
        Ok(b) => println!("device: {}", b.describe()),
        Err(e) => {
            println!("SKIP: no CUDA device: {e}");
            return;
        }
    }
    let prompts: Vec<Vec<u32>> = [1usize, 20, 130, 300]
        .iter()
        .map(|&n| {
            (0..n as u32)
                .map(|i| 2 + (i * 7919 + n as u32) % 200_000)
                .collect()
        })
        .collect();
    for kv in [KvDType::F32, KvDType::F16] {
        let (cl, n_cl) = run(true, &prompts, kv);
        let (plain, n_plain) = run(false, &prompts, kv);
        println!("{kv:?}: {n_cl} attention_cl launches, {n_plain} without");
        assert!(n_cl > 0, "attention_cl never ran");
        assert_eq!(n_plain, 0, "attention_cl ran while it was off");
        let mut failures = Vec::new();
        for (i, ((tc, sc), (tp, sp))) in cl.iter().zip(&plain).enumerate() {
            let n = prompts[i].len();
            if tc != tp {
                failures.push(format!(
                    "{kv:?} prompt of {n}: greedy tokens differ: {tc:?} vs {tp:?}"
                ));
            }
            if let Some(s) = sc.iter().zip(sp).position(|(a, b)| !same_bits(a, b)) {
                failures.push(format!("{kv:?} prompt of {n}: decode step {s}'s logits differ"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
