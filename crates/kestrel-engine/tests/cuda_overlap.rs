//! Overlapped steps on CUDA (the engine's default there): each step is
//! launched before the previous step's tokens reach the host, its input
//! tokens fed from the previous argmax, or the previous draws (seeded
//! sampling without penalties), on the device. Every request's tokens must
//! equal those of plain steps. Requests end by length only, so that
//! both runs batch the same rows in every step (an end by EOS costs the
//! overlapped run one wasted row, which changes the batch shape and may
//! change GEMM rounding). Skips, saying so, where no GPU is usable.

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::Backend as _;
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
    let Some((model, tok)) = cuda_model() else { return };
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

/// The default model on CUDA with its tokenizer; None (after saying SKIP)
/// without a usable GPU.
fn cuda_model() -> Option<(Arc<Model<CudaBackend>>, Arc<Tokenizer>)> {
    let be = Arc::new(CudaBackend::for_tests(KernelSet::Fused)?);
    let path = kestrel_formats::default_model_path();
    let model =
        Arc::new(Model::load(&path, be).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())));
    let tok = match model.file() {
        ModelFile::Gguf(g) => Arc::new(Tokenizer::from_gguf(g).expect("tokenizer")),
        _ => panic!("the default model is a GGUF file"),
    };
    Some((model, tok))
}

/// llama.cpp's reference prompts (KESTREL_GREEDY_JSON: where the GPU
/// machine has greedy.json, as for cuda_reference).
fn reference_prompts() -> Vec<Vec<u32>> {
    let path = std::env::var("KESTREL_GREEDY_JSON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/gemma3-270m/greedy.json"
        )
        .into()
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let refs: serde_json::Value = serde_json::from_str(&text).expect("greedy.json is JSON");
    refs.as_array()
        .expect("a list")
        .iter()
        .map(|c| serde_json::from_value(c["prompt_ids"].clone()).expect("ids"))
        .collect()
}

/// Each prompt alone (concurrency 1: its prefill, then its decode steps
/// with nothing beside them), `gen` greedy tokens each.
fn lone_requests(
    model: &Arc<Model<CudaBackend>>,
    tok: &Arc<Tokenizer>,
    prompts: &[Vec<u32>],
    gen: usize,
    speculation: Option<kestrel_engine::NgramSpeculation>,
    overlap: bool,
) -> (Vec<Vec<u32>>, kestrel_engine::EngineStats) {
    let mut e = Engine::new(
        model.clone(),
        tok.clone(),
        EngineConfig {
            num_kv_blocks: 256,
            speculation,
            ..EngineConfig::default()
        },
    )
    .expect("engine");
    e.set_overlap(overlap);
    let total = e.stats().kv_blocks_total;
    let mut out = Vec::new();
    for p in prompts {
        let params = SamplingParams {
            max_tokens: gen,
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let rx = e.add_request(p.clone(), params).expect("add").1;
        while e.has_work() {
            e.step().expect("step");
        }
        let mut t = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::Token { id, .. } => t.push(id),
                Event::Error { message } => panic!("request failed: {message}"),
                _ => {}
            }
        }
        assert_eq!(t.len(), gen);
        out.push(t);
    }
    assert_eq!(e.block_manager().num_free_blocks(), total, "blocks leaked");
    (out, e.stats())
}

/// A request alone: its first decode step is fed from its prefill's argmax
/// (the prefill's logits row gathered from the last prompt row), then from
/// decode steps. The tokens must be those of plain steps. (The first
/// request of a fresh backend once got a wrong second token: the first
/// decode step grew the argmax key buffer and fed from the new, zeroed one.)
#[test]
fn lone_requests_decode_the_same_with_and_without_overlap() {
    let Some((model, tok)) = cuda_model() else { return };
    let prompts = reference_prompts();
    // Overlapped first, on a fresh backend: its buffers grow during the
    // first request, between the prefill's queued argmax and the step fed
    // from it.
    let (overlapped, st) = lone_requests(&model, &tok, &prompts, 24, None, true);
    let (plain, _) = lone_requests(&model, &tok, &prompts, 24, None, false);
    assert!(st.overlapped_steps > 0, "no step was overlapped");
    let mut bad = Vec::new();
    for (i, (a, b)) in plain.iter().zip(&overlapped).enumerate() {
        if a != b {
            println!("request {i}: plain {a:?}");
            println!("request {i}: overlapped {b:?}");
            bad.push(i);
        }
    }
    assert!(bad.is_empty(), "overlapped steps changed requests {bad:?}");
    println!("{} lone requests identical with overlap", prompts.len());
}

/// N-gram speculation on CUDA: the engine checks drafted tokens as extra
/// rows of a decode step and keeps what the argmax confirms. The prompts are
/// llama.cpp's reference prompts, whose greedy text repeats itself, so many
/// drafts are accepted. Each request's tokens must equal those of plain
/// greedy steps up to the first step where plain decoding's top two logits
/// are within 0.05 (there the different batch shape may round the other way;
/// the model test `speculative_rows_equal_one_token_steps` bounds the
/// logits themselves), and no block may leak.
#[test]
fn speculative_greedy_steps_match_plain_steps() {
    let Some((model, tok)) = cuda_model() else { return };
    let prompts = reference_prompts();
    let gen = 48;
    let (plain, ps) = lone_requests(&model, &tok, &prompts, gen, None, false);
    let spec = kestrel_engine::NgramSpeculation::default();
    let (spec, ss) = lone_requests(&model, &tok, &prompts, gen, Some(spec), true);
    assert_eq!(ps.speculative_steps, 0);
    assert!(ss.accepted_tokens > 0, "no draft was accepted: {ss:?}");
    println!(
        "speculation: {} of {} drafts accepted, {} steps against {} plain",
        ss.accepted_tokens, ss.draft_tokens, ss.steps, ps.steps
    );
    let mut identical = 0;
    for (i, (p, s)) in plain.iter().zip(&spec).enumerate() {
        let Some(at) = p.iter().zip(s).position(|(a, b)| a != b) else {
            identical += 1;
            continue;
        };
        // The plain run's logits at the step that differs.
        let bs = 16;
        let mut seq = prompts[i].clone();
        seq.extend_from_slice(&p[..at]);
        let table: Vec<u32> = (0..seq.len().div_ceil(bs) as u32 + 1).collect();
        let mut kv = model
            .backend
            .alloc_kv(&model.kv_spec(table.len(), bs, kestrel_backend::KvDType::F32))
            .expect("kv");
        let layout = kestrel_backend::BatchLayout::single(&seq, 0, &table, bs as u32);
        let logits = model
            .forward(&layout, &mut kv, &[seq.len() as u32 - 1])
            .expect("forward");
        let row = model.backend.read_act(&logits).expect("read");
        let top = kestrel_backend::layout::argmax(&row);
        let second = row
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != top)
            .map(|(_, &v)| v)
            .fold(f32::NEG_INFINITY, f32::max);
        let margin = row[top] - second;
        println!(
            "request {i}: differs at token {at} (plain {} / speculative {}; top {top}, margin {margin:.3})",
            p[at], s[at]
        );
        assert!(
            margin < 0.05,
            "request {i}: speculation changed token {at} where plain decoding's margin is {margin}"
        );
    }
    println!("{identical} of {} requests identical", prompts.len());
}
