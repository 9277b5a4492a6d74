//! GEMMs that finish the next small step in their own epilogue (the gated
//! activation in the gate/up GEMM, the q/k norm + RoPE + K/V store in the
//! QKV GEMM run in thread-block clusters: `set_epilogues`) against the same
//! work as separate launches: the logits of every prefill and decode step
//! must be identical, bit for bit, on the default model, at 1 to 32 rows
//! (every `hgemm_*` size) and past them, for f32 and f16 KV caches. Skips,
//! saying so, where no GPU is usable.

mod common;

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet, EPI_ALL};
use kestrel_backend::layout::KvDType;
use kestrel_backend::Backend;
use kestrel_model::Model;

/// Greedy tokens, the prompt's last logits and every decode step's logits.
type Decoded = (Vec<u32>, Vec<f32>, Vec<Vec<f32>>);

fn run(epilogues: u8, prompts: &[Vec<u32>], kv: KvDType) -> (Vec<Decoded>, u64) {
    let be = CudaBackend::with_kernels(0, KernelSet::Fused).unwrap();
    be.set_epilogues(epilogues);
    let be = Arc::new(be);
    let model = Model::load(&common::default_model(), be.clone()).unwrap();
    let got = prompts
        .iter()
        .map(|p| common::greedy_steps(&model, p, 12, kv, true))
        .collect();
    (got, be.epilogue_launches())
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn gemm_epilogues_equal_separate_launches_bit_for_bit() {
    match CudaBackend::with_kernels(0, KernelSet::Fused) {
        Ok(b) => println!("device: {}", b.describe()),
        Err(e) => {
            println!("SKIP: no CUDA device: {e}");
            return;
        }
    }
    // Prefills of 1, 3, 8, 17, 32 rows take the 1-, 2- and 4-tile
    // epilogue kernels; 40 rows none (both runs then take the same launches).
    let prompts: Vec<Vec<u32>> = [1usize, 3, 8, 17, 32, 40]
        .iter()
        .map(|&n| {
            (0..n as u32)
                .map(|i| 2 + (i * 7919 + n as u32) % 200_000)
                .collect()
        })
        .collect();
    for kv in [KvDType::F32, KvDType::F16] {
        let (fused, n_fused) = run(EPI_ALL, &prompts, kv);
        let (plain, n_plain) = run(0, &prompts, kv);
        println!("{kv:?}: {n_fused} epilogue launches, {n_plain} without");
        assert!(n_fused > 0, "no GEMM ran an epilogue");
        assert_eq!(n_plain, 0, "a GEMM ran an epilogue while they were off");
        let mut failures = Vec::new();
        for (i, ((tf, ff, sf), (tp, fp, sp))) in fused.iter().zip(&plain).enumerate() {
            let n = prompts[i].len();
            if tf != tp {
                failures.push(format!(
                    "{kv:?} prompt of {n}: greedy tokens differ: {tf:?} vs {tp:?}"
                ));
            }
            if !same_bits(ff, fp) {
                failures.push(format!("{kv:?} prompt of {n}: the prefill's logits differ"));
            }
            if let Some(s) = sf.iter().zip(sp).position(|(a, b)| !same_bits(a, b)) {
                failures.push(format!("{kv:?} prompt of {n}: decode step {s}'s logits differ"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

/// Each epilogue alone also runs (and counts) when the other is off.
#[test]
fn each_epilogue_runs_on_its_own() {
    let Ok(b) = CudaBackend::with_kernels(0, KernelSet::Fused) else {
        println!("SKIP: no CUDA device");
        return;
    };
    drop(b);
    let prompt: Vec<u32> = (0..5u32).map(|i| 2 + i * 977).collect();
    let (base, _) = run(0, std::slice::from_ref(&prompt), KvDType::F16);
    for bits in [kestrel_backend::cuda::EPI_GLU, kestrel_backend::cuda::EPI_ROPE] {
        let (got, n) = run(bits, std::slice::from_ref(&prompt), KvDType::F16);
        println!("epilogue bits {bits}: {n} launches");
        assert!(n > 0, "epilogue {bits} never ran");
        assert_eq!(got[0].0, base[0].0, "epilogue {bits}: greedy tokens differ");
        assert!(
            got[0].2.iter().zip(&base[0].2).all(|(a, b)| same_bits(a, b)),
            "epilogue {bits}: decode logits differ"
        );
    }
}
