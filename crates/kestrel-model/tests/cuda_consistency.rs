//! The same position's logits on CUDA, computed along different paths,
//! must agree: a prompt prefilled at once, or prefilled in part and then
//! decoded token by token (GEMM then GEMV steps reading the KV the prefill
//! wrote). Compared by relative L2 distance and argmax. Skips where no GPU
//! is usable.

mod common;

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::layout::{argmax, BatchLayout, KvDType};
use kestrel_backend::Backend;
use kestrel_model::Model;

/// Logits of the last token of `seq` after prefilling its first `split`
/// tokens in one step and decoding the rest one at a time, in a fresh KV
/// pool with `spare` blocks more than needed.
fn last_logits(model: &Model<CudaBackend>, seq: &[u32], split: usize, spare: usize) -> Vec<f32> {
    let bs = 16usize;
    let blocks = seq.len().div_ceil(bs) + 1 + spare;
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let mut kv = model
        .backend
        .alloc_kv(&model.kv_spec(blocks, bs, KvDType::F32))
        .unwrap();
    let layout = BatchLayout::single(&seq[..split], 0, &table, bs as u32);
    let logits = model.forward(&layout, &mut kv, &[(split - 1) as u32]).unwrap();
    let mut last = model.backend.read_act(&logits).unwrap();
    drop(logits);
    for p in split..seq.len() {
        let layout = BatchLayout::single(&seq[p..p + 1], p as u32, &table, bs as u32);
        let logits = model.forward(&layout, &mut kv, &[0]).unwrap();
        last = model.backend.read_act(&logits).unwrap();
    }
    last
}

/// The default model on the fused CUDA kernels; None (after saying SKIP)
/// without a usable GPU.
fn cuda_model() -> Option<Model<CudaBackend>> {
    let be = CudaBackend::for_tests(KernelSet::Fused)?;
    Some(Model::load(&common::default_model(), Arc::new(be)).unwrap())
}

#[test]
fn prefill_then_decode_equals_one_prefill() {
    let Some(model) = cuda_model() else { return };
    // "The quick brown fox jumps over the lazy dog" and a longer text.
    let seqs: Vec<Vec<u32>> = vec![
        vec![2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770],
        (0..60u32).map(|i| 2 + (i * 7919) % 200_000).collect(),
    ];
    let mut failures = Vec::new();
    for (i, seq) in seqs.iter().enumerate() {
        let whole = last_logits(&model, seq, seq.len(), 0);
        for split in 1..seq.len() {
            if seq.len() - split > 12 && split % 8 != 0 {
                continue; // long sequences: a sample of the splits
            }
            let got = last_logits(&model, seq, split, 0);
            let d = common::rel_l2(&got, &whole);
            let same = argmax(&got) == argmax(&whole);
            println!(
                "seq {i} prefill {split:>2} + decode {:>2}: rel-L2 {d:.2e} argmax same {same}",
                seq.len() - split
            );
            // f16 GEMM operands in prefill against f32 GEMVs in decode leave
            // ~1e-2; a wrong KV entry or activation gives far more.
            if d > 5e-2 || !same {
                failures.push(format!(
                    "seq {i} split {split}: rel-L2 {d:.2e}, argmax same {same}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Pools come and go (one per test case, per benchmark run): a new pool,
/// possibly at a freed pool's address but of another size, must never
/// replay a decode graph captured for the old one (whose kernels hold the
/// old layer offsets). Same tokens, pools of different sizes, one model:
/// the decode logits must be the same bits.
#[test]
fn a_new_kv_pool_never_reuses_an_old_pools_graphs() {
    let Some(model) = cuda_model() else { return };
    let seq: Vec<u32> = vec![2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761];
    let first = last_logits(&model, &seq, 5, 6);
    for spare in [0, 3, 6, 1, 9] {
        let again = last_logits(&model, &seq, 5, spare);
        let same = again.iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "pool with {spare} spare blocks: rel-L2 {:.2e} vs the first pool",
            common::rel_l2(&again, &first)
        );
        assert!(
            same,
            "pool with {spare} spare blocks: logits differ (rel-L2 {:.2e})",
            common::rel_l2(&again, &first)
        );
    }
}

/// Rows of one sequence at consecutive positions in one decode step (how
/// the engine checks speculative drafts) read the keys the rows before them
/// store in that same step: each row's logits equal those of decoding the
/// tokens one step at a time. The slots first hold other tokens' K/V (a
/// rejected draft's), so a row that read a key before the step stored it
/// would see the stale one. Both KV types (their decode attention kernels
/// differ), and row counts on either side of the grouped-kernel switch.
#[test]
fn speculative_rows_equal_one_token_steps() {
    let Some(model) = cuda_model() else { return };
    let bs = 16usize;
    let prompt: Vec<u32> = (0..37u32).map(|i| 2 + (i * 7919) % 200_000).collect();
    let next: Vec<u32> = (0..12u32).map(|i| 1000 + (i * 104_729) % 200_000).collect();
    let stale: Vec<u32> = (0..12u32).map(|i| 5000 + (i * 15_485_863) % 200_000).collect();
    let mut failures = Vec::new();
    for kvt in [KvDType::F32, KvDType::F16] {
        for rows in [2usize, 5, 12] {
            let blocks = (prompt.len() + rows).div_ceil(bs) + 1;
            let table: Vec<u32> = (0..blocks as u32).rev().collect();
            let spec = model.kv_spec(blocks, bs, kvt);
            // One token per step.
            let mut kv = model.backend.alloc_kv(&spec).unwrap();
            let pre = BatchLayout::single(&prompt, 0, &table, bs as u32);
            drop(model.forward(&pre, &mut kv, &[0]).unwrap());
            let mut want = Vec::new();
            for j in 0..rows {
                let l = BatchLayout::single(&next[j..j + 1], (prompt.len() + j) as u32, &table, bs as u32);
                let logits = model.forward(&l, &mut kv, &[0]).unwrap();
                want.push(model.backend.read_act(&logits).unwrap());
            }
            // The rows in one step, after a step of other tokens at the same
            // positions; twice, so that the second runs the captured graph.
            let mut kv = model.backend.alloc_kv(&spec).unwrap();
            drop(model.forward(&pre, &mut kv, &[0]).unwrap());
            let all: Vec<u32> = (0..rows as u32).collect();
            let mut got = Vec::new();
            for _ in 0..2 {
                let s = BatchLayout::chained(&stale[..rows], prompt.len() as u32, &table, bs as u32);
                drop(model.forward(&s, &mut kv, &all).unwrap());
                let l = BatchLayout::chained(&next[..rows], prompt.len() as u32, &table, bs as u32);
                let logits = model.forward(&l, &mut kv, &all).unwrap();
                got = model.backend.read_act(&logits).unwrap();
            }
            let vocab = model.config.vocab_size;
            for (j, w) in want.iter().enumerate() {
                let g = &got[j * vocab..(j + 1) * vocab];
                let d = common::rel_l2(g, w);
                let (tw, margin) = common::top_and_margin(w);
                let same_top = argmax(g) as u32 == tw;
                println!("{kvt:?} rows {rows} row {j}: rel-L2 {d:.2e}, top {tw} margin {margin:.3} same {same_top}");
                if d > 5e-3 || (!same_top && margin >= 0.05) {
                    failures.push(format!(
                        "{kvt:?}, {rows} rows, row {j}: rel-L2 {d:.2e}, same top {same_top}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "speculative rows differ from single steps: {failures:#?}"
    );
}
