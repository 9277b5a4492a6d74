//! Overlapped steps on CUDA (the engine's default there): each step is
//! launched before the previous step's tokens reach the host, its input
//! tokens fed from the previous argmax, or the previous draws (seeded
//! sampling without penalties), on the device. Every request's tokens must
//! equal those of plain steps. Requests end by length only, so that
//! both runs batch the same rows in every step (an end by EOS costs the
//! overlapped run one wasted row, which changes the batch shape and may
//! change GEMM rounding). Skips, saying so, where no GPU is usable.

use std::sync::Arc;

use kestrel_backend::cuda::CudaBackend;
use kestrel_engine::engine::{Engine, EngineConfig};
use kestrel_engine::events::{Event, FinishReason};
use kestrel_engine::SamplingParams;
use kestrel_formats::ModelFile;
use kestrel_model::Model;
use kestrel_tokenizer::Tokenizer;

/// Pseudo-random prompt ids (>= 1000: clear of special tokens).
fn prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| {
            let h = (seq as u64 + 7)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64 * 2_654_435_761);
            ((h >> 17) % (vocab as u64 - 1000) + 1000) as u32
        })
        .collect()
}

/// Runs the requests (request i's parameters from `params`) with and
/// without overlapped steps and compares their tokens.
fn check(label: &str, params: impl Fn(usize) -> SamplingParams) {
    let be = match CudaBackend::new(0) {
        Ok(b) => Arc::new(b),
        Err(e) => {
            println!("SKIP: no CUDA device: {e}");
            return;
        }
    };
    let path = kestrel_formats::default_model_path();
    let model =
        Arc::new(Model::load(&path, be).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())));
    let tok = match model.file() {
        ModelFile::Gguf(g) => Arc::new(Tokenizer::from_gguf(g).expect("tokenizer")),
        _ => panic!("the default model is a GGUF file"),
    };
    let vocab = model.config.vocab_size;
    let requests = 24;
    let run = |overlap: bool| -> (Vec<Vec<u32>>, u64) {
        let mut e = Engine::new(
            model.clone(),
            tok.clone(),
            EngineConfig {
                num_kv_blocks: 512,
                max_num_seqs: 32,
                max_num_batched_tokens: 256,
                ..EngineConfig::default()
            },
        )
        .expect("engine");
        e.set_overlap(overlap);
        let total = e.stats().kv_blocks_total;
        let rxs: Vec<_> = (0..requests)
            .map(|i| {
                e.add_request(prompt(i, 5 + (i * 11) % 60, vocab), params(i))
                    .expect("add")
                    .1
            })
            .collect();
        let mut steps = 0;
        while e.has_work() {
            e.step().expect("step");
            steps += 1;
            assert!(steps < 10_000, "no progress");
        }
        assert_eq!(
            e.block_manager().num_free_blocks(),
            total,
            "{label}, overlap {overlap}: blocks leaked"
        );
        let tokens = rxs
            .iter()
            .map(|rx| {
                let mut t = Vec::new();
                let mut reason = None;
                while let Ok(ev) = rx.try_recv() {
                    match ev {
                        Event::Token { id, .. } => t.push(id),
                        Event::Finished { reason: r, .. } => reason = Some(r),
                        Event::Error { message } => panic!("request failed: {message}"),
                        _ => {}
                    }
                }
                assert_eq!(reason, Some(FinishReason::Length));
                t
            })
            .collect();
        (tokens, e.stats().overlapped_steps)
    };
    let (plain, none) = run(false);
    let (overlapped, some) = run(true);
    assert_eq!(none, 0);
    assert!(some > 0, "{label}: no step was overlapped");
    for (i, (a, b)) in plain.iter().zip(&overlapped).enumerate() {
        assert_eq!(a.len(), params(i).max_tokens, "{label}: request {i}");
        assert_eq!(a, b, "{label}: request {i}: overlapped steps changed its tokens");
    }
    println!("{label}: {some} overlapped steps; {requests} requests identical");
}

/// Request lengths vary so that batches shrink as requests end.
fn max_tokens(i: usize) -> usize {
    8 + (i * 7) % 40
}

#[test]
fn overlapped_greedy_steps_match_plain_steps() {
    check("greedy", |i| SamplingParams {
        max_tokens: max_tokens(i),
        ignore_eos: true,
        ..SamplingParams::default()
    });
}

/// Seeded draws (temperature, some with min-p, a few greedy requests in the
/// same batches): queued on the device, the same draws in the same order.
#[test]
fn overlapped_sampled_steps_match_plain_steps() {
    check("sampled", |i| SamplingParams {
        max_tokens: max_tokens(i),
        ignore_eos: true,
        temperature: if i % 5 == 4 {
            0.0
        } else {
            0.7 + 0.1 * (i % 4) as f32
        },
        min_p: if i % 3 == 0 { 0.05 } else { 0.0 },
        seed: Some(1000 + i as u64),
        ..SamplingParams::default()
    });
}
