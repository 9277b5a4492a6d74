//! Runs every prompt under one profile: load the model on the profile's
//! backend, build an `Engine` with the profile's KV dtype and prefix-cache
//! setting, then decode each prompt greedily, one request at a time, timing
//! prefill (until the first token) and decode (the tokens after it).
//!
//! The engine is driven step by step on this thread (no engine thread), so
//! the timings contain the model steps and the engine's own bookkeeping,
//! and nothing else.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kestrel_backend::Backend;
use kestrel_engine::{Engine, EngineConfig, Event, EventReceiver, SamplingParams};
use serde::Serialize;

use super::profile::Profile;
use super::prompts::Prompt;
use crate::device::BackendTask;
use crate::{loading, memory};

/// Repetitions and length of the decoding.
#[derive(Clone, Copy, Debug)]
pub struct RunPlan {
    pub max_tokens: usize,
    pub warmup: usize,
    pub runs: usize,
}

/// One request's timing.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache (not computed).
    pub cached_tokens: usize,
    pub generated: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

/// One prompt under one profile.
#[derive(Clone, Debug, Serialize)]
pub struct PromptRun {
    pub prompt_ids: Vec<u32>,
    /// Generated ids of the first timed run (the ones compared).
    pub tokens: Vec<u32>,
    /// Each generated token as text (for divergence reports).
    pub token_texts: Vec<String>,
    pub text: String,
    /// Timed runs (after the first) whose ids differ from the first's.
    pub unstable_runs: usize,
    /// Every timed run, in order.
    pub timings: Vec<Timing>,
}

/// Everything one profile produced.
#[derive(Clone, Debug, Serialize)]
pub struct ProfileRun {
    /// The backend as it describes itself.
    pub device: String,
    pub model: PathBuf,
    pub load_secs: f64,
    pub weight_bytes: u64,
    pub kv_pool_bytes: u64,
    /// Peak resident host memory (VmHWM) during this profile, in KiB.
    pub host_peak_kib: Option<u64>,
    /// Whether the peak was reset before this profile (otherwise it also
    /// covers whatever ran earlier in the process).
    pub host_peak_reset: bool,
    /// Highest device memory in use (bytes, the whole device as the driver
    /// reports it, all processes) over samples taken after loading and
    /// after each pass; None when the backend has no memory report.
    pub device_used_bytes: Option<u64>,
    pub device_total_bytes: Option<u64>,
    pub prompts: Vec<PromptRun>,
    /// Prefill tok/s of each timed run over all prompts (computed tokens
    /// over prefill time).
    pub prefill_tok_s: Vec<f64>,
    /// Decode tok/s of each timed run over all prompts (tokens after the
    /// first over decode time).
    pub decode_tok_s: Vec<f64>,
    /// Mean time to the first token of each timed run, in ms (with the
    /// prefix cache this falls while prefill tok/s over the few computed
    /// tokens may not).
    pub ttft_ms: Vec<f64>,
}

/// The `BackendTask` of one profile.
pub struct ProfileTask {
    pub profile: Profile,
    pub model: PathBuf,
    pub prompts: Vec<Prompt>,
    pub plan: RunPlan,
}

/// Tokens per KV block (the engine's usual size).
const BLOCK_SIZE: usize = 16;

impl BackendTask for ProfileTask {
    type Output = ProfileRun;
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<ProfileRun> {
        let host_peak_reset = memory::reset_host_peak();
        let device = backend.describe();
        let be = backend.clone();
        let mut device_mem = DeviceMemory::default();
        let t0 = Instant::now();
        let (model, tok) = loading::load(&self.model, backend)?;
        device_mem.sample(be.as_ref());
        let load_secs = t0.elapsed().as_secs_f64();
        model.set_graphs(self.profile.graphs);
        let add_bos = tok.add_bos_default();
        let mut ids = Vec::with_capacity(self.prompts.len());
        for p in &self.prompts {
            let v = tok
                .encode(&p.text, add_bos)
                .with_context(|| format!("tokenizing prompt `{}`", p.name))?;
            if v.is_empty() {
                bail!("prompt `{}` encodes to no tokens", p.name);
            }
            let ctx = model.config.context_len;
            if v.len() >= ctx {
                bail!(
                    "prompt `{}` is {} tokens but the context of {} is {ctx} tokens (none left to generate); \
                     choose prompts with --prompts or --num-prompts",
                    p.name,
                    v.len(),
                    self.model.display()
                );
            }
            ids.push(v);
        }
        // Room for every prompt's blocks at once, so that with the prefix
        // cache on no prompt evicts another's cached blocks between runs.
        let num_kv_blocks: usize = ids
            .iter()
            .map(|v| (v.len() + self.plan.max_tokens + 1).div_ceil(BLOCK_SIZE))
            .sum::<usize>()
            + 1;
        let config = EngineConfig {
            num_kv_blocks,
            block_size: BLOCK_SIZE,
            max_num_seqs: 1,
            enable_prefix_caching: self.profile.prefix_cache,
            kv_dtype: self.profile.kv,
            ..EngineConfig::default()
        };
        let weight_bytes = model.weight_bytes;
        let kv_pool_bytes = model.kv_spec(num_kv_blocks, BLOCK_SIZE, self.profile.kv).bytes() as u64;
        let tok = Arc::new(tok);
        let mut engine = Engine::new(Arc::new(model), tok.clone(), config)?;
        device_mem.sample(be.as_ref());
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: self.plan.max_tokens,
            // Both sides generate the full length, so there are as many
            // tokens to compare (and to time) whatever the model predicts.
            ignore_eos: true,
            seed: Some(0),
            ..SamplingParams::default()
        };

        let mut prompts: Vec<Option<PromptRun>> = vec![None; ids.len()];
        let mut prefill_tok_s = Vec::new();
        let mut decode_tok_s = Vec::new();
        let mut ttft_ms = Vec::new();
        let total = self.plan.warmup + self.plan.runs;
        // Round-robin over prompts: each round is one run of the whole set.
        for round in 0..total {
            let timed = round >= self.plan.warmup;
            let (mut computed, mut prefill_secs, mut decoded, mut decode_secs) = (0usize, 0.0, 0usize, 0.0);
            for (i, prompt) in ids.iter().enumerate() {
                let name = &self.prompts[i].name;
                let out = generate(&mut engine, prompt, &params)
                    .with_context(|| format!("prompt `{name}` on {}", self.profile.spec))?;
                if !timed {
                    continue;
                }
                computed += out.timing.prompt_tokens - out.timing.cached_tokens;
                prefill_secs += out.timing.prefill_secs;
                decoded += out.timing.generated.saturating_sub(1);
                decode_secs += out.timing.decode_secs;
                match &mut prompts[i] {
                    None => {
                        prompts[i] = Some(PromptRun {
                            prompt_ids: prompt.clone(),
                            token_texts: out
                                .tokens
                                .iter()
                                .map(|&t| tok.token_text(t).unwrap_or_default())
                                .collect(),
                            tokens: out.tokens,
                            text: out.text,
                            unstable_runs: 0,
                            timings: vec![out.timing],
                        })
                    }
                    Some(run) => {
                        if run.tokens != out.tokens {
                            run.unstable_runs += 1;
                        }
                        run.timings.push(out.timing);
                    }
                }
            }
            // Sampled between passes, not inside the timed steps.
            device_mem.sample(be.as_ref());
            if timed {
                prefill_tok_s.push(rate(computed, prefill_secs));
                decode_tok_s.push(rate(decoded, decode_secs));
                ttft_ms.push(prefill_secs * 1e3 / ids.len() as f64);
            }
        }
        let prompts = prompts
            .into_iter()
            .map(|p| p.context("no timed run (--runs must be at least 1)"))
            .collect::<Result<Vec<_>>>()?;
        Ok(ProfileRun {
            device,
            model: self.model,
            load_secs,
            weight_bytes,
            kv_pool_bytes,
            host_peak_kib: memory::host_peak_kib(),
            host_peak_reset,
            device_used_bytes: device_mem.peak_used,
            device_total_bytes: device_mem.total,
            prompts,
            prefill_tok_s,
            decode_tok_s,
            ttft_ms,
        })
    }
}

/// The highest device memory use seen.
#[derive(Default)]
struct DeviceMemory {
    peak_used: Option<u64>,
    total: Option<u64>,
}

impl DeviceMemory {
    fn sample<B: Backend>(&mut self, be: &B) {
        if let Some((free, total)) = be.device_memory() {
            let used = total.saturating_sub(free);
            self.peak_used = Some(self.peak_used.map_or(used, |p| p.max(used)));
            self.total = Some(total);
        }
    }
}

fn rate(tokens: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        tokens as f64 / secs
    } else {
        0.0
    }
}

struct Output {
    tokens: Vec<u32>,
    text: String,
    timing: Timing,
}

/// Runs one request to its end and times it.
fn generate<B: Backend>(engine: &mut Engine<B>, prompt: &[u32], params: &SamplingParams) -> Result<Output> {
    let (_, rx) = engine.add_request(prompt.to_vec(), params.clone())?;
    let mut out = Output {
        tokens: Vec::new(),
        text: String::new(),
        timing: Timing {
            prompt_tokens: prompt.len(),
            cached_tokens: 0,
            generated: 0,
            prefill_secs: 0.0,
            decode_secs: 0.0,
        },
    };
    let t0 = Instant::now();
    let mut first_token_at = None;
    loop {
        if !engine.has_work() {
            bail!("the engine went idle before the request finished");
        }
        engine.step()?;
        let now = Instant::now();
        if drain(&rx, &mut out, &mut first_token_at, now)? {
            break;
        }
    }
    let end = Instant::now();
    let first = first_token_at.unwrap_or(end);
    out.timing.prefill_secs = first.duration_since(t0).as_secs_f64();
    out.timing.decode_secs = end.duration_since(first).as_secs_f64();
    out.timing.generated = out.tokens.len();
    Ok(out)
}

/// Takes the events a step produced; true once the request has finished.
fn drain(
    rx: &EventReceiver,
    out: &mut Output,
    first_token_at: &mut Option<Instant>,
    now: Instant,
) -> Result<bool> {
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, text, .. } => {
                first_token_at.get_or_insert(now);
                out.tokens.push(id);
                out.text.push_str(&text);
            }
            Event::Finished { usage, .. } => {
                out.timing.cached_tokens = usage.cached_tokens;
                return Ok(true);
            }
            Event::Error { message } => bail!("the engine failed the request: {message}"),
            // Other events (prompt scores) are not requested here.
            _ => {}
        }
    }
    Ok(false)
}
