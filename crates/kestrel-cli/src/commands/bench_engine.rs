//! Engine-level benchmarks of `kestrel bench`: what continuous batching, the
//! prefix cache and chunked prefill buy, measured through the same `Engine`
//! the server runs (not a special path).
//!
//! - `--batch 1,8,64`: N greedy sequences with distinct prompts decoding
//!   together; decode throughput counts only steps where all N sequences
//!   decode (like llama-batched-bench's S_TG), so prefill does not dilute it.
//! - `--shared-prefix LEN`: requests sharing a LEN-token prefix, run with the
//!   prefix cache on and off: tokens computed, tokens saved, time.
//! - `--interference LEN`: time per output token of running streams before and
//!   while a LEN-token prompt is prefilled beside them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kestrel_backend::{Backend, KvDType};
use kestrel_bench::{Better, Row};
use kestrel_engine::engine::StepReport;
use kestrel_engine::{Engine, EngineConfig, EventReceiver, SamplingParams};
use kestrel_model::Model;
use kestrel_tokenizer::Tokenizer;
use serde_json::{json, Value};

/// Options shared by the engine benchmarks.
#[derive(Clone, Debug)]
pub struct EngineBenchOpts {
    pub kv: KvDType,
    pub block_size: usize,
    pub max_num_batched_tokens: usize,
    pub long_prefill: kestrel_engine::LongPrefill,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub speculation: Option<kestrel_engine::NgramSpeculation>,
}

/// Distinct pseudo-random prompt tokens for sequence `seq`.
fn prompt(seq: usize, len: usize, vocab: usize) -> Vec<u32> {
    // The lowest ids (special and control tokens in most vocabularies) are
    // skipped: the first 1,000, or a quarter of a small test vocabulary.
    let skip = 1000.min(vocab as u64 / 4);
    let span = (vocab as u64).saturating_sub(skip).max(1);
    (0..len)
        .map(|i| {
            let h = (seq as u64 + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64 * 2_654_435_761);
            ((h >> 17) % span + skip) as u32
        })
        .collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

/// A fresh engine with room for `seqs` sequences of `tokens` tokens each.
fn engine<B: Backend>(
    model: &Arc<Model<B>>,
    tok: &Arc<Tokenizer>,
    o: &EngineBenchOpts,
    seqs: usize,
    tokens: usize,
    prefix_cache: bool,
) -> Result<Engine<B>> {
    let blocks = seqs * tokens.div_ceil(o.block_size) + 16;
    let cfg = EngineConfig {
        num_kv_blocks: blocks,
        block_size: o.block_size,
        max_num_seqs: seqs,
        max_num_batched_tokens: o.max_num_batched_tokens,
        long_prefill: o.long_prefill,
        enable_prefix_caching: prefix_cache,
        kv_dtype: o.kv,
        speculation: o.speculation,
    };
    Engine::new(model.clone(), tok.clone(), cfg).context("creating the engine")
}

/// Steps until no work is left, timing each step.
fn drain<B: Backend>(e: &mut Engine<B>, timeline: &mut Vec<(StepReport, Duration)>) -> Result<()> {
    while e.has_work() {
        let t0 = Instant::now();
        let r = e.step().context("engine step")?;
        timeline.push((r, t0.elapsed()));
    }
    Ok(())
}

/// Counts the tokens each receiver got (and checks nothing failed).
fn count_tokens(rxs: &[EventReceiver]) -> Result<Vec<usize>> {
    let mut counts = Vec::with_capacity(rxs.len());
    for (i, rx) in rxs.iter().enumerate() {
        let mut n = 0;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                kestrel_engine::Event::Token { .. } => n += 1,
                kestrel_engine::Event::Error { message } => bail!("request {i} failed: {message}"),
                _ => {}
            }
        }
        counts.push(n);
    }
    Ok(counts)
}

/// Mean microseconds of each step phase (schedule, forward, pick, emit).
fn phase_means_us(steps: &[&(StepReport, Duration)]) -> [f64; 4] {
    let mut sum = [0.0f64; 4];
    for (r, _) in steps {
        let t = &r.times;
        for (acc, d) in sum.iter_mut().zip([t.schedule, t.forward, t.pick, t.emit]) {
            *acc += d.as_secs_f64() * 1e6;
        }
    }
    sum.map(|v| v / steps.len().max(1) as f64)
}

/// One batch-curve run: decode tok/s, end-to-end tok/s, step ms, step
/// phases (us), and the speculation counts (drafted, accepted).
type RunResult = (f64, f64, f64, [f64; 4], (u64, u64));

/// Decode throughput at each batch size in `sizes`; `runs` runs each.
pub fn batch_curve<B: Backend>(
    model: &Arc<Model<B>>,
    tok: &Arc<Tokenizer>,
    o: &EngineBenchOpts,
    sizes: &[usize],
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<Value> {
    let mut out = Vec::new();
    for &n in sizes {
        let once = || -> Result<RunResult> {
            let mut e = engine(model, tok, o, n, o.prompt_len + o.gen_len, false)?;
            let mut rxs = Vec::with_capacity(n);
            for s in 0..n {
                let p = prompt(s, o.prompt_len, model.config.vocab_size);
                rxs.push(e.add_request(p, greedy(o.gen_len))?.1);
            }
            let t0 = Instant::now();
            let mut tl = Vec::new();
            drain(&mut e, &mut tl)?;
            let wall = t0.elapsed().as_secs_f64();
            let counts = count_tokens(&rxs)?;
            if let Some((i, c)) = counts.iter().enumerate().find(|(_, &c)| c != o.gen_len) {
                bail!(
                    "batch {n}: request {i} produced {c} tokens, expected {}",
                    o.gen_len
                );
            }
            // Steps in which every sequence decoded (one token, or with
            // speculation its drafts too).
            let full: Vec<&(StepReport, Duration)> = tl
                .iter()
                .filter(|(r, _)| r.num_seqs == n && r.num_tokens == n + r.num_drafted)
                .collect();
            let toks: usize = full.iter().map(|(r, _)| r.num_sampled).sum();
            let secs: f64 = full.iter().map(|(_, d)| d.as_secs_f64()).sum();
            let decode = if secs > 0.0 { toks as f64 / secs } else { 0.0 };
            let total = (n * o.gen_len) as f64 / wall;
            let step_ms = if full.is_empty() {
                0.0
            } else {
                secs * 1e3 / full.len() as f64
            };
            let st = e.stats();
            Ok((
                decode,
                total,
                step_ms,
                phase_means_us(&full),
                (st.draft_tokens, st.accepted_tokens),
            ))
        };
        once().with_context(|| format!("warmup of batch {n}"))?;
        let (mut dec, mut tot, mut step, mut phases) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut drafts = Vec::new();
        for _ in 0..runs.max(1) {
            let (d, t, s, p, dr) = once()?;
            dec.push(d);
            tot.push(t);
            step.push(s);
            phases.push(p);
            drafts.push(dr);
        }
        let name = format!("batch{n}");
        let r_dec =
            Row::new(&name, "decode_tok_s", "tok/s", Better::Higher, dec).with_param("concurrency", n as f64);
        let r_tot = Row::new(&name, "end_to_end_tok_s", "tok/s", Better::Higher, tot)
            .with_param("concurrency", n as f64);
        // With speculation a step yields several tokens per sequence: its
        // time is a step's, not a token's.
        let step_metric = if o.speculation.is_some() {
            "step_ms"
        } else {
            "tpot_ms"
        };
        let r_step =
            Row::new(&name, step_metric, "ms", Better::Lower, step).with_param("concurrency", n as f64);
        let p = phases.last().copied().unwrap_or_default();
        eprintln!(
            "{name:>9}: decode {:>10.1} tok/s  (step {:.3} ms; with prefill {:.1} tok/s)\n           \
             step phases (last run, us): schedule {:.1}, forward {:.1}, pick {:.1}, emit {:.1}",
            r_dec.stats.median, r_step.stats.median, r_tot.stats.median, p[0], p[1], p[2], p[3]
        );
        if let Some(&(drafted, accepted)) = drafts.last().filter(|_| o.speculation.is_some()) {
            eprintln!(
                "           speculation (last run): {accepted} of {drafted} drafted tokens accepted ({:.0}%), \
                 {} of {} tokens came from drafts",
                100.0 * accepted as f64 / drafted.max(1) as f64,
                accepted,
                n * o.gen_len
            );
        }
        let phases: Vec<Value> = phases
            .iter()
            .map(|p| json!({"schedule_us": p[0], "forward_us": p[1], "pick_us": p[2], "emit_us": p[3]}))
            .collect();
        out.push(
            json!({"sequences": n, "decode_tok_s": r_dec.raw, "end_to_end_tok_s": r_tot.raw,
            "step_ms": r_step.raw, "step_phases": phases,
            "speculation": o.speculation.map(|s| {
                let mut v = json!(s);
                v["drafted"] = json!(drafts.iter().map(|d| d.0).collect::<Vec<_>>());
                v["accepted"] = json!(drafts.iter().map(|d| d.1).collect::<Vec<_>>());
                v
            })}),
        );
        rows.extend([r_dec, r_tot, r_step]);
    }
    Ok(json!(out))
}

/// `requests` requests sharing a `prefix_len`-token prefix (each with its
/// own 16-token question): with the prefix cache, arriving together and
/// with the first alone; then without the cache.
pub fn shared_prefix<B: Backend>(
    model: &Arc<Model<B>>,
    tok: &Arc<Tokenizer>,
    o: &EngineBenchOpts,
    prefix_len: usize,
    requests: usize,
    rows: &mut Vec<Row>,
) -> Result<Value> {
    let vocab = model.config.vocab_size;
    let shared = prompt(usize::MAX / 2, prefix_len, vocab);
    let gen = 16;
    let mut out = serde_json::Map::new();
    // With the cache: all requests arriving at once, and the first alone
    // (a system prompt's first user) before the others; without the cache.
    for (cache, first_alone, label) in [
        (true, false, "prefix_cache_on"),
        (true, true, "prefix_cache_on_first_alone"),
        (false, false, "prefix_cache_off"),
    ] {
        let mut e = engine(model, tok, o, requests, prefix_len + 16 + gen, cache)?;
        let mut rxs = Vec::new();
        let t0 = Instant::now();
        for s in 0..requests {
            let mut p = shared.clone();
            p.extend(prompt(s, 16, vocab));
            rxs.push(e.add_request(p, greedy(gen))?.1);
            if s == 0 && first_alone {
                while e.stats().tokens_generated == 0 {
                    e.step().context("engine step")?;
                }
            }
        }
        let mut tl = Vec::new();
        drain(&mut e, &mut tl)?;
        let secs = t0.elapsed().as_secs_f64();
        count_tokens(&rxs)?;
        let st = e.stats();
        eprintln!(
            "shared prefix {prefix_len} x {requests} requests, {label}: {:.3} s, {} tokens computed, {} prompt tokens from the cache (hits {}, misses {})",
            secs, st.tokens_computed, st.prefix_cache.tokens_saved, st.prefix_cache.hits, st.prefix_cache.misses
        );
        let name = format!("shared_prefix{prefix_len}x{requests}/{label}");
        rows.push(Row::new(&name, "seconds", "s", Better::Lower, vec![secs]));
        rows.push(Row::new(
            &name,
            "tokens_computed",
            "tokens",
            Better::Lower,
            vec![st.tokens_computed as f64],
        ));
        rows.push(Row::new(
            &name,
            "tokens_saved",
            "tokens",
            Better::Neither,
            vec![st.prefix_cache.tokens_saved as f64],
        ));
        out.insert(
            label.to_string(),
            json!({"seconds": secs, "tokens_computed": st.tokens_computed, "prefix_cache": st.prefix_cache}),
        );
    }
    Ok(Value::Object(out))
}

/// TPOT of `streams` decoding sequences before and while a `long_len`-token
/// prompt is prefilled beside them (chunked by the step's token budget).
pub fn interference<B: Backend>(
    model: &Arc<Model<B>>,
    tok: &Arc<Tokenizer>,
    o: &EngineBenchOpts,
    streams: usize,
    long_len: usize,
    rows: &mut Vec<Row>,
) -> Result<Value> {
    let vocab = model.config.vocab_size;
    // Enough tokens for the streams to outlast the prefill, whose chunks
    // are the step budget, or the long-prefill chunk beside decodes.
    let lp = o.long_prefill;
    let chunk = if lp.chunk > 0 && long_len > lp.threshold {
        lp.chunk.min(o.max_num_batched_tokens)
    } else {
        o.max_num_batched_tokens
    };
    let gen = 64 + 2 * long_len.div_ceil(chunk.max(1)) + 64;
    let mut e = engine(
        model,
        tok,
        o,
        streams + 1,
        (o.prompt_len + gen).max(long_len + 2),
        false,
    )?;
    let mut rxs = Vec::new();
    for s in 0..streams {
        rxs.push(e.add_request(prompt(s, o.prompt_len, vocab), greedy(gen))?.1);
    }
    let step = |e: &mut Engine<B>| -> Result<(StepReport, f64)> {
        let t0 = Instant::now();
        let r = e.step().context("engine step")?;
        Ok((r, t0.elapsed().as_secs_f64() * 1e3))
    };
    // A sample is the wall time between two steps that hand every stream a
    // token: what a stream sees as its time per output token. On CUDA a
    // greedy step's tokens are read by the next call (overlapped steps),
    // and while a prompt is being prefilled the next step is not launched
    // ahead, so a chunk's step and the call that reads its tokens make one
    // sample together; on the CPU each call is one sample.
    // Let every stream reach steady decoding, then time 32 token intervals.
    while e.stats().running < streams || e.stats().tokens_generated < (streams * 4) as u64 {
        step(&mut e)?;
    }
    let mut before = Vec::new();
    let mut acc = 0.0;
    while before.len() < 32 {
        let (r, ms) = step(&mut e)?;
        acc += ms;
        // A stream still prefilling: not steady decoding yet.
        if r.num_tokens > streams {
            acc = 0.0;
            continue;
        }
        if r.num_sampled >= streams {
            before.push(std::mem::take(&mut acc));
        }
    }
    let long = e.add_request(prompt(streams + 7, long_len, vocab), greedy(1))?.1;
    let mut during = Vec::new();
    let mut chunks = Vec::new();
    // The prefill may start a step or two after the request arrives (the
    // step already launched runs without it): intervals before its first
    // chunk are not counted; the last one counted is the one that hands
    // out the tokens of the step with the last chunk.
    const MAX_WAIT: usize = 8;
    let mut idle = 0;
    let mut unread_chunk = false;
    acc = 0.0;
    while chunks.iter().sum::<usize>() < long_len || unread_chunk {
        let (r, ms) = step(&mut e)?;
        acc += ms;
        let chunk = r.num_tokens.saturating_sub(streams);
        if chunk > 0 {
            chunks.push(chunk);
            unread_chunk = true;
        }
        // Tokens handed out in the call that ran a chunk (the CPU) or in
        // the call after it (overlapped steps) are that chunk's step's.
        if r.num_sampled >= streams {
            let interval = std::mem::take(&mut acc);
            if !chunks.is_empty() {
                during.push(interval);
                unread_chunk = false;
            }
        }
        idle = if chunk > 0 || r.num_sampled > 0 {
            0
        } else {
            idle + 1
        };
        if idle > MAX_WAIT {
            bail!(
                "the {long_len}-token prompt made no progress in {MAX_WAIT} steps ({} of its tokens prefilled)",
                chunks.iter().sum::<usize>()
            );
        }
    }
    count_tokens(&[long])?;
    e.abort_all();
    let b = Row::new("interference/before", "tpot_ms", "ms", Better::Lower, before);
    let d = Row::new(
        &format!("interference/during_prefill{long_len}"),
        "tpot_ms",
        "ms",
        Better::Lower,
        during,
    );
    let ratio = if b.stats.median > 0.0 {
        d.stats.median / b.stats.median
    } else {
        0.0
    };
    let sizes: std::collections::BTreeSet<usize> = chunks.iter().copied().collect();
    eprintln!(
        "{streams} streams: TPOT {:.3} ms before, {:.3} ms while a {long_len}-token prompt is prefilled in {} chunks of {sizes:?} tokens: {ratio:.2}x",
        b.stats.median,
        d.stats.median,
        chunks.len()
    );
    let v = json!({"streams": streams, "long_prompt": long_len, "tpot_before_ms": b.raw, "tpot_during_ms": d.raw, "prefill_chunks": chunks, "ratio": ratio});
    rows.push(b);
    rows.push(d);
    rows.push(Row::new(
        "interference/ratio",
        "tpot_ratio",
        "x",
        Better::Lower,
        vec![ratio],
    ));
    Ok(v)
}
