//! The decode megakernel (one persistent launch per single-row decode step)
//! against the CUDA graph of the same kernels: every decode step's logits
//! must be identical, bit for bit, on the default model, for f32 and f16
//! KV caches. Skips, saying so, where no GPU is usable.

mod common;

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::layout::KvDType;
use kestrel_backend::Backend;
use kestrel_model::Model;

/// Greedy tokens and the logits of every decode step.
type Decoded = (Vec<u32>, Vec<Vec<f32>>);

fn run(mega: bool, prompts: &[Vec<u32>], kv: KvDType) -> (Vec<Decoded>, u64) {
    let be = CudaBackend::with_kernels(0, KernelSet::Fused).unwrap();
    be.set_megakernel(mega);
    // The megakernel's programs are built from the GEMV kernels (turning it
    // on sends steps of up to 4 rows to them) and its attention op is the
    // per-head item: compare with the graph path running the same kernels.
    be.set_gemv_rows(4);
    be.set_attention_dec(false);
    be.set_attention_keys_per_split(0);
    let be = Arc::new(be);
    let model = Model::load(&common::default_model(), be.clone()).unwrap();
    let got = prompts
        .iter()
        .map(|p| {
            let (tokens, _, steps) = common::greedy_steps(&model, p, 40, kv, true);
            (tokens, steps)
        })
        .collect();
    (got, be.megakernel_launches())
}

#[test]
fn megakernel_steps_equal_graph_steps_bit_for_bit() {
    match CudaBackend::for_tests(KernelSet::Fused) {
        Some(b) => println!("device: {}", b.describe()),
        None => return,
    }
    let prompts: Vec<Vec<u32>> = vec![
        vec![2, 818, 5279, 529, 7001, 563],
        vec![2, 9259, 3570, 496, 990, 236764],
        (0..300u32).map(|i| 2 + (i * 7919) % 200_000).collect(),
    ];
    for kv in [KvDType::F32, KvDType::F16] {
        let (mega, n_mega) = run(true, &prompts, kv);
        let (graph, n_graph) = run(false, &prompts, kv);
        println!("{kv:?}: {n_mega} megakernel steps, {n_graph} without");
        assert!(n_mega > 0, "the megakernel never ran");
        assert_eq!(n_graph, 0, "the megakernel ran while switched off");
        let mut failures = Vec::new();
        for (i, ((tm, lm), (tg, lg))) in mega.iter().zip(&graph).enumerate() {
            if tm != tg {
                failures.push(format!(
                    "{kv:?} prompt {i}: greedy tokens differ: {tm:?} vs {tg:?}"
                ));
            }
            let mut worst = 0.0f32;
            let mut first = None;
            for (s, (a, b)) in lm.iter().zip(lg).enumerate() {
                let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
                let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                if !same && first.is_none() {
                    first = Some(s);
                }
                worst = worst.max(diff);
            }
            println!("{kv:?} prompt {i}: first differing step {first:?}, max |diff| {worst:e}");
            if let Some(s) = first {
                failures.push(format!(
                    "{kv:?} prompt {i}: logits differ from step {s} (max |diff| {worst:e})"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
