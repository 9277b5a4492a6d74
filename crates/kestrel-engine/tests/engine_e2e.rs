//! The engine end to end on the default model (Gemma 3 270M Q4_K_M) with the
//! CPU backend: batching, chunked prefill, preemption and prefix caching must
//! not change any request's greedy output, and aborts must give back every
//! KV block. Sizes are kept small so the file runs in well under two
//! minutes on two cores.

use std::time::Duration;

use kestrel_backend::cpu::CpuBackend;
use kestrel_backend::{Backend, BatchLayout, KvDType};
use kestrel_engine::engine::{Engine, EngineConfig, RequestOptions};
use kestrel_engine::events::{Event, EventReceiver, FinishReason, PromptLogprob, Usage};
use kestrel_engine::test_util::default_model as fixture;
use kestrel_engine::{NgramSpeculation, SamplingParams, Session};
use serde_json::Value;

const GEN: usize = 12;

fn engine(cfg: EngineConfig) -> Engine<CpuBackend> {
    let f = fixture();
    Engine::new(f.model.clone(), f.tok.clone(), cfg).expect("engine")
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// Everything one request produced.
#[derive(Clone, Debug, Default, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    text: String,
    reason: Option<FinishReason>,
    usage: Usage,
    /// Prompt scores by prompt index (index 0 is never scored).
    prompt: Vec<Option<PromptLogprob>>,
    /// How many `PromptLogprobs` events brought them.
    prompt_events: usize,
}

fn collect(rx: &EventReceiver) -> Outcome {
    let mut o = Outcome {
        tokens: Vec::new(),
        text: String::new(),
        reason: None,
        usage: Usage::default(),
        prompt: Vec::new(),
        prompt_events: 0,
    };
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::PromptLogprobs { first, entries } => {
                assert!(o.tokens.is_empty(), "prompt scores after a generated token");
                assert!(first >= 1, "prompt index 0 cannot be scored");
                assert_eq!(
                    first,
                    o.prompt.len().max(1),
                    "prompt scores must come in order, each index once"
                );
                o.prompt.resize(first, None);
                o.prompt.extend(entries.into_iter().map(Some));
                o.prompt_events += 1;
            }
            Event::Token { id, text, .. } => {
                o.tokens.push(id);
                o.text.push_str(&text);
            }
            Event::Finished { reason, usage } => {
                o.reason = Some(reason);
                o.usage = usage;
            }
            Event::Error { message } => panic!("request failed: {message}"),
        }
    }
    o
}

/// Runs all prompts together until done.
fn run_batch(e: &mut Engine<CpuBackend>, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Outcome> {
    let rxs: Vec<EventReceiver> = prompts
        .iter()
        .map(|p| e.add_request(p.clone(), greedy(max_tokens)).expect("add").1)
        .collect();
    let mut steps = 0;
    while e.has_work() {
        e.step().expect("step");
        steps += 1;
        assert!(steps < 10_000, "engine made no progress");
    }
    rxs.iter().map(collect).collect()
}

/// Each prompt alone on a fresh pool without prefix caching.
fn run_solo(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Outcome> {
    let mut e = engine(EngineConfig {
        num_kv_blocks: 16,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    });
    prompts
        .iter()
        .map(|p| run_batch(&mut e, std::slice::from_ref(p), max_tokens).remove(0))
        .collect()
}

struct Reference {
    prompt: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
}

fn references() -> Vec<Reference> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/gemma3-270m/greedy.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let refs: Value = serde_json::from_str(&text).expect("greedy.json is JSON");
    refs.as_array()
        .expect("greedy.json is a list")
        .iter()
        .map(|c| {
            let ids = |k: &str| -> Vec<u32> { serde_json::from_value(c[k].clone()).expect("ids") };
            Reference {
                prompt: ids("prompt_ids"),
                tokens: ids("tokens"),
                text: c["text"].as_str().expect("text").to_string(),
            }
        })
        .collect()
}

/// The reference prompts plus two longer ones spanning several blocks.
fn prompts(refs: &[Reference]) -> Vec<Vec<u32>> {
    let mut p: Vec<Vec<u32>> = refs.iter().map(|r| r.prompt.clone()).collect();
    let tok = &fixture().tok;
    for text in [
        "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz \
         combined movable metal type with an oil-based ink and",
        "A recipe for bread: mix flour, water, salt and yeast; knead the dough for ten minutes, let it \
         rise for an hour in a warm place, shape it into a loaf, let it rise again, and then bake it in \
         a hot oven until",
    ] {
        p.push(tok.encode(text, true).expect("encode"));
    }
    p
}

#[test]
fn batching_chunking_and_preemption_keep_greedy_output_identical() {
    let refs = references();
    let prompts = prompts(&refs);
    assert!(
        prompts.iter().any(|p| p.len() > 32),
        "a prompt should span several blocks"
    );
    let solo = run_solo(&prompts, GEN);

    // Alone, the engine produces what the plain single-sequence session
    // does (llama.cpp agreement is the model crate's test), and its text is
    // llama.cpp's wherever the tokens agree.
    let f = fixture();
    for (p, s) in prompts.iter().zip(&solo) {
        let mut session = Session::new(&f.model, 256).expect("session");
        let g = session
            .generate(&f.tok, p, &greedy(GEN), |_| {})
            .expect("generate");
        assert_eq!(s.tokens, g.tokens, "engine and session differ on prompt {p:?}");
    }
    let mut text_checked = 0;
    for (r, s) in refs.iter().zip(&solo) {
        if r.tokens.starts_with(&s.tokens) {
            assert!(
                r.text.starts_with(&s.text),
                "text {:?} is not a prefix of llama.cpp's {:?}",
                s.text,
                r.text
            );
            text_checked += 1;
        }
    }
    assert!(text_checked > 0, "no reference prompt to check the text against");
    for s in &solo {
        assert_eq!(s.tokens.len(), GEN);
        assert_eq!(s.reason, Some(FinishReason::Length));
        assert!(!s.text.is_empty());
    }

    // All at once, with a small token budget so long prompts are chunked
    // beside running decodes.
    let mut e = engine(EngineConfig {
        num_kv_blocks: 64,
        max_num_batched_tokens: 24,
        ..EngineConfig::default()
    });
    let batched = run_batch(&mut e, &prompts, GEN);
    for (i, (b, s)) in batched.iter().zip(&solo).enumerate() {
        assert_eq!(
            b.tokens, s.tokens,
            "request {i}: batched output differs from solo"
        );
        assert_eq!(b.text, s.text, "request {i}");
        assert_eq!(b.usage.completion_tokens, GEN);
        assert_eq!(b.usage.prompt_tokens, prompts[i].len());
    }
    assert_eq!(e.stats().kv_blocks_used, 0);

    // A pool of six blocks for ten requests: constant preemption.
    let mut e = engine(EngineConfig {
        num_kv_blocks: 6,
        ..EngineConfig::default()
    });
    let preempted = run_batch(&mut e, &prompts, GEN);
    let stats = e.stats();
    assert!(
        stats.preemptions > 0,
        "the tiny pool should force preemption: {stats:?}"
    );
    for (i, (p, s)) in preempted.iter().zip(&solo).enumerate() {
        assert_eq!(
            p.tokens, s.tokens,
            "request {i}: output after preemption differs from solo"
        );
        assert_eq!(p.text, s.text, "request {i}");
    }
    assert_eq!(stats.kv_blocks_used, 0);
    e.block_manager().check_invariants().expect("pool consistent");
}

#[test]
fn shared_prefix_is_computed_once() {
    let tok = &fixture().tok;
    let system = "You are a careful assistant. Answer in one short sentence, use plain words, and never \
                  invent facts. If you do not know the answer, say so. The user asks: ";
    let a = tok
        .encode(&format!("{system}What is the tallest mountain on Earth?"), true)
        .expect("encode");
    let b = tok
        .encode(&format!("{system}Why is the sky blue?"), true)
        .expect("encode");
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(
        common >= 32,
        "the prompts should share at least two blocks, share {common} tokens"
    );
    let solo = run_solo(std::slice::from_ref(&b), GEN).remove(0);

    let mut e = engine(EngineConfig {
        num_kv_blocks: 32,
        ..EngineConfig::default()
    });
    run_batch(&mut e, &[a], GEN);
    let before = e.stats();
    let got = run_batch(&mut e, std::slice::from_ref(&b), GEN).remove(0);
    let after = e.stats();

    let expect_cached = common / 16 * 16;
    assert_eq!(got.usage.cached_tokens, expect_cached);
    assert_eq!(
        after.prefix_cache.tokens_saved - before.prefix_cache.tokens_saved,
        expect_cached as u64
    );
    // Only the rest of the prompt and the decodes went through the model.
    assert_eq!(
        after.tokens_computed - before.tokens_computed,
        (b.len() - expect_cached + GEN - 1) as u64
    );
    assert_eq!(
        got.tokens, solo.tokens,
        "output with a prefix hit differs from solo"
    );
    assert_eq!(got.text, solo.text);
}

#[test]
fn aborts_at_any_point_return_every_block() {
    let refs = references();
    let prompts = prompts(&refs);
    let mut e = engine(EngineConfig {
        num_kv_blocks: 12,
        max_num_batched_tokens: 16,
        ..EngineConfig::default()
    });
    let total = e.stats().kv_blocks_total;
    let mut rxs: Vec<Option<(u64, EventReceiver)>> = prompts
        .iter()
        .map(|p| Some(e.add_request(p.clone(), greedy(GEN)).expect("add")))
        .collect();
    // A fixed pseudo-random schedule of aborts and disconnects.
    let mut lcg: u64 = 0x2545_f491_4f6c_dd1d;
    let mut aborted = Vec::new();
    let mut steps = 0;
    while e.has_work() {
        e.step().expect("step");
        steps += 1;
        lcg = lcg
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        if (lcg >> 33).is_multiple_of(3) {
            let i = ((lcg >> 40) as usize) % rxs.len();
            if (lcg >> 20).is_multiple_of(4) {
                rxs[i] = None; // the client went away
            } else if let Some((id, rx)) = &rxs[i] {
                if e.abort(*id) {
                    aborted.push(i);
                    let o = collect(rx);
                    assert_eq!(o.reason, Some(FinishReason::Abort));
                    assert!(o.tokens.len() < GEN);
                }
            }
        }
        e.block_manager().check_invariants().expect("pool consistent");
        assert!(steps < 10_000);
    }
    assert!(!aborted.is_empty(), "the schedule should abort something");
    assert_eq!(e.stats().kv_blocks_used, 0);
    assert_eq!(e.block_manager().num_free_blocks(), total);
    for (i, r) in rxs.iter().enumerate() {
        if let (Some((_, rx)), false) = (r, aborted.contains(&i)) {
            assert_eq!(collect(rx).reason, Some(FinishReason::Length), "request {i}");
        }
    }
}

/// How the engine hands tokens to the streams in `streaming_modes_change_no_event`.
#[derive(Clone, Copy, Debug)]
enum Streaming {
    Eager,
    /// A step's tokens streamed during the next step (CUDA, 8+ sequences).
    Deferred,
    /// Greedy steps launched before the previous step's tokens are read,
    /// their input tokens fed from its argmax (CUDA's default).
    Overlapped,
}

/// Appends what `rx` has produced since the last call to `o`.
fn drain_into(o: &mut Outcome, rx: &EventReceiver) {
    let more = collect(rx);
    o.tokens.extend(more.tokens);
    o.text.push_str(&more.text);
    if more.reason.is_some() {
        o.reason = more.reason;
        o.usage = more.usage;
    }
}

/// Deferred streaming and overlapped steps change no event: same tokens,
/// text, finish reasons and usage, in the same order, for requests ending
/// by length (1, 2 or 3 tokens: overlapped steps then fall back to plain
/// ones), by a stop token id, by a stop string (never deferred) and by an
/// abort, and the pool comes back full.
#[test]
fn streaming_modes_change_no_event() {
    let refs = references();
    let prompts = prompts(&refs);
    let last = prompts.len() - 1;
    let run = |mode: Streaming| -> Vec<Outcome> {
        let mut e = engine(EngineConfig {
            num_kv_blocks: 64,
            max_num_batched_tokens: 32,
            ..EngineConfig::default()
        });
        e.set_deferred_streaming(Some(matches!(mode, Streaming::Deferred)));
        e.set_overlap(matches!(mode, Streaming::Overlapped));
        let total = e.stats().kv_blocks_total;
        let mut rxs = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let params = match i % 4 {
                0 => greedy(1 + i % 3),
                // Ends on a stop token id (its third greedy token) where
                // the reference is known, else on EOS if it comes.
                1 => SamplingParams {
                    ignore_eos: false,
                    stop_token_ids: refs.get(i).map(|r| vec![r.tokens[2]]).unwrap_or_default(),
                    ..greedy(GEN)
                },
                2 => SamplingParams {
                    stop: vec![" the".into()],
                    ..greedy(GEN)
                },
                _ => greedy(GEN),
            };
            rxs.push(e.add_request(p.clone(), params).expect("add"));
        }
        let mut outs = vec![Outcome::default(); rxs.len()];
        let mut aborted = false;
        let mut steps = 0;
        while e.has_work() {
            e.step().expect("step");
            steps += 1;
            for (o, (_, rx)) in outs.iter_mut().zip(&rxs) {
                drain_into(o, rx);
            }
            // The last request is aborted once it has streamed 3 tokens.
            if !aborted && outs[last].tokens.len() >= 3 {
                assert!(e.abort(rxs[last].0), "the last request is still running");
                aborted = true;
            }
            e.block_manager().check_invariants().expect("pool consistent");
            assert!(steps < 10_000);
        }
        assert!(aborted, "{mode:?}: the last request was not aborted");
        let overlapped = e.stats().overlapped_steps;
        assert_eq!(
            overlapped > 0,
            matches!(mode, Streaming::Overlapped),
            "{mode:?}: {overlapped} overlapped steps"
        );
        assert_eq!(e.block_manager().num_free_blocks(), total, "{mode:?}");
        for (o, (_, rx)) in outs.iter_mut().zip(&rxs) {
            drain_into(o, rx);
        }
        outs
    };
    let eager = run(Streaming::Eager);
    assert!(eager.iter().all(|o| o.reason.is_some()), "every request ended");
    assert_eq!(eager[last].reason, Some(FinishReason::Abort));
    let reasons: Vec<Option<FinishReason>> = eager.iter().map(|o| o.reason).collect();
    for want in [FinishReason::Length, FinishReason::Stop] {
        assert!(
            reasons.contains(&Some(want)),
            "no request ended by {want:?}: {reasons:?}"
        );
    }
    for mode in [Streaming::Deferred, Streaming::Overlapped] {
        let got = run(mode);
        assert_eq!(got[..last], eager[..last], "{mode:?}");
        // An abort ends a request wherever its stream is: the tokens it got
        // are a prefix of the same greedy continuation.
        let (a, b) = (&got[last], &eager[last]);
        assert_eq!(a.reason, Some(FinishReason::Abort), "{mode:?}");
        let n = a.tokens.len().min(b.tokens.len());
        assert!(n >= 3, "{mode:?}: aborted after {n} tokens");
        assert_eq!(a.tokens[..n], b.tokens[..n], "{mode:?}: aborted request");
    }
}

#[test]
fn threaded_handle_streams_and_aborts() {
    let handle = engine(EngineConfig {
        num_kv_blocks: 32,
        ..EngineConfig::default()
    })
    .spawn()
    .expect("spawn");
    let refs = references();
    let (_, keep) = handle
        .add_request(refs[0].prompt.clone(), greedy(GEN))
        .expect("add");
    let (cut_id, cut) = handle
        .add_request(refs[1].prompt.clone(), greedy(1000))
        .expect("add");
    // Validation errors come back at once, on the caller's side.
    assert!(handle.add_request(Vec::new(), greedy(4)).is_err());
    assert!(handle.add_request(vec![u32::MAX], greedy(4)).is_err());

    // Wait for the long request to stream, then abort it.
    match cut.recv_timeout(Duration::from_secs(60)) {
        Ok(Event::Token { .. }) => {}
        other => panic!("expected a token, got {other:?}"),
    }
    handle.abort(cut_id).expect("abort");
    let mut reason = None;
    for ev in cut.iter() {
        if let Event::Finished { reason: r, usage } = ev {
            reason = Some(r);
            assert!(usage.completion_tokens < 1000);
        }
    }
    assert_eq!(reason, Some(FinishReason::Abort));

    let mut n = 0;
    let mut end = None;
    for ev in keep.iter() {
        match ev {
            Event::Token { .. } => n += 1,
            Event::Finished { reason, usage } => end = Some((reason, usage)),
            Event::Error { message } => panic!("{message}"),
            Event::PromptLogprobs { .. } => panic!("prompt scores were not asked for"),
        }
    }
    let (reason, usage) = end.expect("stream finished");
    assert_eq!(
        (reason, n, usage.completion_tokens),
        (FinishReason::Length, GEN, GEN)
    );
    // The loop publishes stats after each step: wait for the final one.
    let mut waited = 0;
    while handle.stats().kv_blocks_used != 0 || handle.stats().running != 0 {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 1000, "blocks not returned: {:?}", handle.stats());
    }
    handle.shutdown();
    assert!(handle.add_request(refs[0].prompt.clone(), greedy(2)).is_err());
}

/// The handle and the streams cross threads (and async tasks).
#[test]
fn handle_and_streams_are_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<kestrel_engine::engine::EngineHandle>();
    check::<EventReceiver>();
}

#[test]
fn stop_strings_and_seeded_sampling_in_a_mixed_batch() {
    let refs = references();
    let prompt = refs[0].prompt.clone();
    let solo = run_solo(std::slice::from_ref(&prompt), GEN).remove(0);
    // A stop string from the middle of the greedy text: the output ends
    // right before it, with reason Stop.
    let words: Vec<&str> = solo.text.split_inclusive(' ').collect();
    assert!(words.len() >= 4, "greedy text too short: {:?}", solo.text);
    let cut: usize = words[..2].iter().map(|w| w.len()).sum();
    let stop = solo.text[cut..]
        .split(' ')
        .find(|w| !w.is_empty())
        .expect("a word")
        .to_string();
    let cut = solo.text.find(stop.as_str()).expect("stop occurs");

    let mut e = engine(EngineConfig {
        num_kv_blocks: 32,
        ..EngineConfig::default()
    });
    let sampled = |seed| SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        logprobs: Some(2),
        ..greedy(GEN)
    };
    let (_, greedy_rx) = e.add_request(prompt.clone(), greedy(GEN)).expect("add");
    let stopping = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(GEN)
    };
    let (_, stop_rx) = e.add_request(prompt.clone(), stopping).expect("add");
    let (_, s1) = e.add_request(prompt.clone(), sampled(7)).expect("add");
    let (_, s2) = e.add_request(prompt.clone(), sampled(7)).expect("add");
    let mut first_logprob = None;
    while e.has_work() {
        e.step().expect("step");
        if first_logprob.is_none() {
            if let Ok(Event::Token {
                id,
                logprob,
                top_logprobs,
                ..
            }) = s1.try_recv()
            {
                first_logprob = Some((id, logprob, top_logprobs.len()));
            }
        }
    }
    // The greedy request is unaffected by its sampling neighbours (whose
    // logits force the host-side sampler for the whole step).
    let g = collect(&greedy_rx);
    assert_eq!(g.tokens, solo.tokens);
    let st = collect(&stop_rx);
    assert_eq!(st.reason, Some(FinishReason::Stop));
    assert_eq!(
        st.text,
        solo.text[..cut],
        "text must end right before the stop {stop:?}"
    );
    assert!(st.tokens.len() < GEN);
    // Same seed, same choices; logprobs reported when asked for.
    let (first, lp, ntop) = first_logprob.expect("a sampled token");
    let (mut a, b) = (collect(&s1), collect(&s2));
    a.tokens.insert(0, first);
    assert_eq!(a.tokens, b.tokens, "seeded requests differ");
    assert_eq!(b.tokens.len(), GEN);
    assert!(lp.is_some_and(|l| l <= 0.0));
    assert_eq!(ntop, 2);
}

/// The score of each prompt token after the first by a teacher-forced
/// pass: the whole prompt in one forward on a fresh pool, every row's
/// logits, log-softmax in f64. Entry `i` scores `tokens[i + 1]`: its
/// log-probability and the `top` best `(token, logprob)`.
fn teacher_forced(tokens: &[u32], top: usize) -> Vec<(f64, Vec<(u32, f64)>)> {
    let m = &fixture().model;
    let bs = 16;
    let blocks = tokens.len().div_ceil(bs);
    let mut kv = m
        .backend
        .alloc_kv(&m.kv_spec(blocks, bs, KvDType::F32))
        .expect("kv pool");
    let table: Vec<u32> = (0..blocks as u32).collect();
    let layout = BatchLayout::single(tokens, 0, &table, bs as u32);
    let rows: Vec<u32> = (0..tokens.len() as u32 - 1).collect();
    let logits = m.forward(&layout, &mut kv, &rows).expect("forward");
    let host = m.backend.read_act(&logits).expect("read logits");
    drop(logits);
    let vocab = m.config.vocab_size;
    host.chunks_exact(vocab)
        .zip(&tokens[1..])
        .map(|(row, &next)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = f64::from(max) + row.iter().map(|&l| f64::from(l - max).exp()).sum::<f64>().ln();
            let mut order: Vec<u32> = (0..vocab as u32).collect();
            order.select_nth_unstable_by(top, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            let mut best: Vec<u32> = order[..top].to_vec();
            best.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
            let best = best
                .iter()
                .map(|&t| (t, f64::from(row[t as usize]) - lse))
                .collect();
            (f64::from(row[next as usize]) - lse, best)
        })
        .collect()
}

/// Checks a request's prompt scores against the teacher-forced pass.
fn assert_prompt_scores(what: &str, prompt: &[u32], got: &Outcome, want: &[(f64, Vec<(u32, f64)>)]) {
    assert_eq!(
        got.prompt.len(),
        prompt.len(),
        "{what}: one score per prompt token"
    );
    assert!(got.prompt[0].is_none(), "{what}: the first token has no score");
    for (i, (g, (lp, top))) in got.prompt[1..].iter().zip(want).enumerate() {
        let g = g
            .as_ref()
            .unwrap_or_else(|| panic!("{what}: token {} unscored", i + 1));
        assert_eq!(g.token, prompt[i + 1], "{what}: token {}", i + 1);
        assert!(
            (f64::from(g.logprob) - lp).abs() < 1e-4,
            "{what}: token {} logprob {} vs teacher-forced {lp}",
            i + 1,
            g.logprob
        );
        assert_eq!(g.top_logprobs.len(), top.len(), "{what}: token {}", i + 1);
        for (&(gid, glp), &(wid, wlp)) in g.top_logprobs.iter().zip(top) {
            assert!(
                (f64::from(glp) - wlp).abs() < 1e-4,
                "{what}: token {} top {glp} vs {wlp}",
                i + 1
            );
            // Ids may swap only where two alternatives are tied.
            assert!(
                gid == wid || (f64::from(glp) - wlp).abs() < 1e-4,
                "{what}: token {}",
                i + 1
            );
        }
    }
}

fn scored() -> RequestOptions {
    RequestOptions {
        prompt_logprobs: Some(3),
    }
}

#[test]
fn prompt_logprobs_match_a_teacher_forced_pass_with_chunked_prefill() {
    let refs = references();
    let prompts = prompts(&refs);
    let long = prompts.iter().max_by_key(|p| p.len()).expect("prompts").clone();
    assert!(long.len() > 30, "a prompt longer than several chunks");
    let want = teacher_forced(&long, 3);
    let solo = run_solo(std::slice::from_ref(&long), 4).remove(0);

    // A budget of 7 tokens: the prompt takes several steps, beside two
    // plain requests that decode in the same steps.
    let mut e = engine(EngineConfig {
        num_kv_blocks: 64,
        max_num_batched_tokens: 7,
        ..EngineConfig::default()
    });
    let (_, a) = e.add_request(prompts[0].clone(), greedy(6)).expect("add");
    let (_, rx) = e
        .add_request_with(long.clone(), greedy(4), scored())
        .expect("add");
    let (_, b) = e.add_request(prompts[1].clone(), greedy(6)).expect("add");
    while e.has_work() {
        e.step().expect("step");
    }
    let got = collect(&rx);
    assert!(
        got.prompt_events >= long.len() / 7,
        "{} prompt events for a prompt of {} tokens in chunks of 7",
        got.prompt_events,
        long.len()
    );
    assert_prompt_scores("chunked", &long, &got, &want);
    assert_eq!(got.tokens, solo.tokens, "scoring the prompt changed the output");
    assert_eq!(got.usage.prompt_tokens, long.len());
    for (rx, p) in [(a, &prompts[0]), (b, &prompts[1])] {
        let o = collect(&rx);
        assert!(o.prompt.is_empty(), "scores that were not asked for");
        assert_eq!(o.tokens, run_solo(std::slice::from_ref(p), 6).remove(0).tokens);
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
}

#[test]
fn prompt_logprobs_recompute_what_the_prefix_cache_holds() {
    let refs = references();
    let long = prompts(&refs)
        .into_iter()
        .max_by_key(|p| p.len())
        .expect("prompts");
    assert!(long.len() > 32, "the prompt should fill two cache blocks");
    let want = teacher_forced(&long, 3);
    let mut e = engine(EngineConfig {
        num_kv_blocks: 64,
        ..EngineConfig::default()
    });
    // A first run fills the cache; a second plain one shows the hit is there.
    run_batch(&mut e, std::slice::from_ref(&long), 2);
    let hit = run_batch(&mut e, std::slice::from_ref(&long), 2).remove(0);
    assert!(hit.usage.cached_tokens >= 32, "no prefix hit: {:?}", hit.usage);

    let before = e.stats();
    let (_, rx) = e
        .add_request_with(long.clone(), greedy(2), scored())
        .expect("add");
    while e.has_work() {
        e.step().expect("step");
    }
    let got = collect(&rx);
    let after = e.stats();
    assert_eq!(
        got.usage.cached_tokens, 0,
        "a scored prompt takes nothing from the cache"
    );
    assert_eq!(
        after.tokens_computed - before.tokens_computed,
        (long.len() + 1) as u64,
        "the whole prompt and one decode went through the model"
    );
    assert_prompt_scores("cache hit available", &long, &got, &want);
    assert_eq!(got.tokens, hit.tokens);

    // Preempted mid-prompt (a pool of six blocks for three scored prompts):
    // the recompute delivers no score twice and misses none.
    let mut e = engine(EngineConfig {
        num_kv_blocks: 6,
        max_num_batched_tokens: 16,
        ..EngineConfig::default()
    });
    let rxs: Vec<EventReceiver> = (0..3)
        .map(|_| {
            e.add_request_with(long.clone(), greedy(GEN), scored())
                .expect("add")
                .1
        })
        .collect();
    while e.has_work() {
        e.step().expect("step");
    }
    assert!(
        e.stats().preemptions > 0,
        "the tiny pool should preempt: {:?}",
        e.stats()
    );
    for (i, rx) in rxs.iter().enumerate() {
        assert_prompt_scores(&format!("preempted, request {i}"), &long, &collect(rx), &want);
    }
    assert_eq!(e.stats().kv_blocks_used, 0);
}

/// 64 requests at once (the batch size): every one produces the same
/// greedy tokens and text as alone. The prompts are the ten above cut to
/// different lengths, so many share prefixes and take them from the cache
/// (filled by a first batch of the ten).
#[test]
fn batch_of_64_matches_each_request_alone() {
    let base = prompts(&references());
    let batch: Vec<Vec<u32>> = (0..64)
        .map(|i| {
            let p = &base[i % base.len()];
            let cut = (i / base.len()).min(p.len() - 2);
            p[..p.len() - cut].to_vec()
        })
        .collect();
    let gen = 6;
    let solo = run_solo(&batch, gen);
    let mut e = engine(EngineConfig {
        num_kv_blocks: 512,
        max_num_seqs: 64,
        ..EngineConfig::default()
    });
    // The ten full prompts first, so that the 64 find their prefixes cached
    // (requests admitted in the same step do not share blocks still being
    // computed: each computes its own).
    run_batch(&mut e, &base, gen);
    let together = run_batch(&mut e, &batch, gen);
    let stats = e.stats();
    assert!(
        stats.prefix_cache.hits > 0,
        "shared prefixes should hit the cache: {stats:?}"
    );
    for (i, (b, s)) in together.iter().zip(&solo).enumerate() {
        assert_eq!(b.tokens.len(), gen, "request {i}");
        assert_eq!(b.tokens, s.tokens, "request {i}: batch of 64 differs from alone");
        assert_eq!(b.text, s.text, "request {i}");
    }
    assert_eq!(stats.kv_blocks_used, 0);
}

/// Requests that arrive together with one long shared prefix compute it
/// once: the first computes it, the others wait for its blocks and take
/// them from the cache.
#[test]
fn shared_prefix_arriving_together_is_computed_once() {
    let tok = &fixture().tok;
    let shared = tok
        .encode(
            "You are a helpful assistant. Answer briefly and precisely, cite no sources, and \
             never invent facts that you are not sure about. Keep every answer short.",
            true,
        )
        .expect("encode");
    let bs = 16;
    let full = shared.len() / bs * bs;
    assert!(
        full >= 2 * bs,
        "the shared prefix should span blocks ({} tokens)",
        shared.len()
    );
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| {
            let mut p = shared[..full].to_vec();
            p.extend([1000 + i, 2000 + i, 3000 + i]);
            p
        })
        .collect();
    let mut e = engine(EngineConfig {
        num_kv_blocks: 128,
        ..EngineConfig::default()
    });
    let out = run_batch(&mut e, &prompts, 2);
    assert!(out.iter().all(|o| o.tokens.len() == 2));
    let stats = e.stats();
    let others = (prompts.len() - 1) as u64;
    assert_eq!(
        stats.prefix_cache.tokens_saved,
        others * full as u64,
        "every request after the first takes the shared blocks from the cache: {stats:?}"
    );
}

/// N-gram speculation checks drafted tokens in one step, yet every request
/// gets exactly plain greedy decoding's tokens, text and finish: in a batch,
/// alone with counts that end it inside a step's accepted run, and with a
/// stop string. The drafts must really run and be accepted (this model's
/// greedy text repeats itself), or the test proves nothing.
/// A stop string for `text` whose first occurrence is late: the shortest
/// one (of at least 4 bytes) starting at the latest space where a phrase
/// first occurs. In a looping text most late phrases already occurred
/// early, and drafts must have run before such a stop. Returns its offset
/// and the phrase.
fn late_first_phrase(text: &str) -> (usize, String) {
    let (cut, word) = text
        .match_indices(' ')
        .map(|(p, _)| p)
        .rev()
        .find_map(|p| {
            (p + 4..=text.len())
                .filter(|&end| text.is_char_boundary(end))
                .map(|end| &text[p..end])
                .find(|w| text.find(w) == Some(p))
                .map(|w| (p, w.to_string()))
        })
        .expect("a phrase first occurring after the text's start");
    assert!(cut > text.len() / 3, "{word:?} at {cut} of {text:?} is not late");
    (cut, word)
}

#[test]
fn speculative_decoding_keeps_greedy_output_identical() {
    let refs = references();
    let prompts: Vec<Vec<u32>> = refs.iter().map(|r| r.prompt.clone()).collect();
    let gen = 40;
    let spec = NgramSpeculation {
        tokens: 4,
        ..NgramSpeculation::default()
    };
    let cfg = |speculation| EngineConfig {
        num_kv_blocks: 128,
        speculation,
        ..EngineConfig::default()
    };
    let mut plain_e = engine(cfg(None));
    let plain = run_batch(&mut plain_e, &prompts, gen);
    let mut e = engine(cfg(Some(spec)));
    let together = run_batch(&mut e, &prompts, gen);
    let (ps, ss) = (plain_e.stats(), e.stats());
    assert_eq!(ps.speculative_steps, 0, "speculation is off by default");
    assert!(
        ss.speculative_steps > 0 && ss.accepted_tokens > 0,
        "drafts should run and some be accepted: {ss:?}"
    );
    assert!(ss.accepted_tokens <= ss.draft_tokens);
    assert!(
        ss.steps < ps.steps,
        "accepted drafts should save steps: {} with speculation, {} without",
        ss.steps,
        ps.steps
    );
    assert_eq!(ss.tokens_generated, ps.tokens_generated);
    for (i, (s, p)) in together.iter().zip(&plain).enumerate() {
        assert_eq!(s.tokens, p.tokens, "request {i}: speculative output differs");
        assert_eq!(s.text, p.text, "request {i}");
        assert_eq!(s.reason, Some(FinishReason::Length));
        assert_eq!(s.usage, p.usage, "request {i}");
    }
    assert_eq!(ss.kv_blocks_used, 0);
    e.block_manager().check_invariants().expect("pool consistent");

    // Alone, with counts that end requests mid-draft.
    for (i, p) in prompts.iter().enumerate().take(4) {
        let n = 9 + 6 * i;
        let got = run_batch(&mut e, std::slice::from_ref(p), n).remove(0);
        assert_eq!(got.tokens, plain[i].tokens[..n], "request {i} cut at {n}");
        assert_eq!(got.reason, Some(FinishReason::Length));
    }

    // A stop string late in a repeating text: the output ends right before
    // its first occurrence, as without speculation.
    let (i, text) = plain
        .iter()
        .enumerate()
        .map(|(i, p)| (i, p.text.as_str()))
        .max_by_key(|(_, t)| t.len())
        .expect("outputs");
    let (cut, word) = late_first_phrase(text);
    let stopping = SamplingParams {
        stop: vec![word.clone()],
        ..greedy(gen)
    };
    let before = e.stats().accepted_tokens;
    let (_, rx) = e.add_request(prompts[i].clone(), stopping).expect("add");
    while e.has_work() {
        e.step().expect("step");
    }
    let got = collect(&rx);
    assert_eq!(got.reason, Some(FinishReason::Stop), "stop {word:?}");
    assert_eq!(got.text, text[..cut], "text must end right before {word:?}");
    assert!(e.stats().accepted_tokens > before, "drafts ran before the stop");
    assert_eq!(e.stats().kv_blocks_used, 0);
    e.block_manager().check_invariants().expect("pool consistent");
}

/// `kestrel run` and `kestrel chat` speculate through `Session`: a step
/// checks the last token and its drafts as chained rows. Tokens, text and
/// finish are plain greedy decoding's, also where a count or a stop string
/// ends the generation mid-draft and where a later turn reuses a cache that
/// holds drafted K/V.
#[test]
fn session_speculation_keeps_greedy_output_identical() {
    let f = fixture();
    let refs = references();
    let gen = 40;
    let spec = NgramSpeculation::default();
    let run = |speculation: Option<NgramSpeculation>, prompt: &[u32], params: &SamplingParams| {
        let mut s = Session::new(&f.model, 256).expect("session");
        s.speculation = speculation;
        s.generate(&f.tok, prompt, params, |_| {}).expect("generate")
    };
    let (mut drafted, mut accepted) = (0, 0);
    let mut plain = Vec::new();
    for r in &refs {
        let p = run(None, &r.prompt, &greedy(gen));
        let s = run(Some(spec), &r.prompt, &greedy(gen));
        assert_eq!(
            (p.draft_tokens, p.accepted_tokens),
            (0, 0),
            "plain sessions do not draft"
        );
        assert_eq!(
            s.tokens, p.tokens,
            "prompt {:?}: speculative tokens differ",
            r.prompt
        );
        assert_eq!(s.text, p.text);
        assert_eq!(s.finish, p.finish);
        drafted += s.draft_tokens;
        accepted += s.accepted_tokens;
        plain.push(p);
    }
    assert!(
        accepted > 0 && accepted <= drafted,
        "drafts should run and some be accepted: {accepted} of {drafted}"
    );

    // Counts that end the generation mid-draft.
    for (i, r) in refs.iter().enumerate().take(3) {
        let n = 9 + 7 * i;
        let s = run(Some(spec), &r.prompt, &greedy(n));
        assert_eq!(s.tokens, plain[i].tokens[..n], "prompt {i} cut at {n}");
    }

    // A stop string late in the longest text.
    let i = (0..plain.len())
        .max_by_key(|&i| plain[i].text.len())
        .expect("outputs");
    let (cut, word) = late_first_phrase(&plain[i].text);
    let stopping = SamplingParams {
        stop: vec![word.clone()],
        ..greedy(gen)
    };
    let s = run(Some(spec), &refs[i].prompt, &stopping);
    assert_eq!(s.finish, FinishReason::Stop, "stop {word:?}");
    assert_eq!(
        s.text,
        plain[i].text[..cut],
        "text must end right before {word:?}"
    );
    assert!(s.accepted_tokens > 0, "drafts ran before the stop");

    // A second turn on the same session (as `kestrel chat` does): its
    // prompt extends the first turn's, and the cache may hold K/V of drafts
    // confirmed past the first turn's end.
    let mut s = Session::new(&f.model, 256).expect("session");
    s.speculation = Some(spec);
    let first = s
        .generate(&f.tok, &refs[i].prompt, &greedy(21), |_| {})
        .expect("turn 1");
    let mut prompt2 = refs[i].prompt.clone();
    prompt2.extend(&first.tokens);
    prompt2.extend(&refs[0].prompt[1..]);
    let second = s
        .generate(&f.tok, &prompt2, &greedy(gen), |_| {})
        .expect("turn 2");
    assert!(
        second.cached_tokens > refs[i].prompt.len(),
        "turn 2 reuses the cache"
    );
    let want = run(None, &prompt2, &greedy(gen));
    assert_eq!(
        second.tokens, want.tokens,
        "the second turn differs from a fresh plain session"
    );
}
