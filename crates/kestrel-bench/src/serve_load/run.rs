//! The whole run: resolve the servers' models, warm each server up, then
//! every level (and round) against one server or, with `--compare`, against
//! both in a shuffled order per round so that drift on the machine (thermal,
//! other load) falls on both alike.

use std::sync::Arc;

use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::client::{request_body, Client, Server};
use super::config::{normalize_url, Level, LoadConfig, Target};
use super::error::{Error, Result};
use super::prompts;
use super::runner::{run_level, LevelRun};

/// Which side of a comparison a server is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `--url`: the denominator of every ratio.
    Baseline,
    /// `--compare`: the numerator of every ratio.
    Candidate,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Baseline => "baseline",
            Role::Candidate => "candidate",
        }
    }
}

/// A server as measured: its normalised URL and the model id sent to it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetInfo {
    pub role: Role,
    pub url: String,
    pub model: String,
    /// GET /health's answer before the run (kestrel's names its build,
    /// model, device and settings); `Null` where there is none.
    pub server: serde_json::Value,
}

/// The unmeasured warmup requests of one server.
#[derive(Clone, Debug, Serialize)]
pub struct WarmupInfo {
    pub role: Role,
    pub requests: usize,
    pub errors: usize,
    pub first_error: Option<String>,
}

/// One level, one round, one server.
#[derive(Clone, Debug)]
pub struct Measured {
    pub level_index: usize,
    pub level: Level,
    pub round: usize,
    /// Index into [`Outcome::targets`].
    pub target: usize,
    /// Place in the round's (shuffled) order, from 0.
    pub position: usize,
    pub run: LevelRun,
}

/// Everything measured, in the order it ran.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub config: LoadConfig,
    pub targets: Vec<TargetInfo>,
    pub warmup: Vec<WarmupInfo>,
    pub runs: Vec<Measured>,
}

/// What a derived random stream is for (so the streams differ).
const STREAM_PROMPTS: u64 = 1;
const STREAM_ORDER: u64 = 2;
const STREAM_ARRIVALS: u64 = 3;

/// SplitMix64 of the seed and two indices: independent, reproducible
/// streams per (level, round).
fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Prompt sets are drawn per (level, round) and shared by both servers:
/// synthetic ones from the seed and `slot`, file ones from `pool_start` on.
fn prompt_set(
    cfg: &LoadConfig,
    pool: Option<&[String]>,
    n: usize,
    slot: u64,
    pool_start: usize,
) -> Vec<String> {
    match pool {
        Some(pool) => prompts::cycle(pool, pool_start, n),
        None => prompts::synthetic(n, cfg.input_len, mix(cfg.seed, STREAM_PROMPTS, slot)),
    }
}

fn bodies(cfg: &LoadConfig, model: &str, prompts: &[String]) -> Arc<Vec<Bytes>> {
    Arc::new(
        prompts
            .iter()
            .map(|p| {
                request_body(
                    cfg.endpoint,
                    model,
                    p,
                    cfg.output_len,
                    cfg.ignore_eos,
                    cfg.temperature,
                )
            })
            .collect(),
    )
}

fn validate(cfg: &LoadConfig) -> Result<()> {
    let bad = |option: &'static str, text: String, reason: &str| {
        Err(Error::BadOption {
            option,
            text,
            reason: reason.to_string(),
        })
    };
    if cfg.levels.is_empty() {
        return bad("--concurrency", String::new(), "no load level given");
    }
    if cfg.num_prompts == 0 {
        return bad(
            "--num-prompts",
            "0".into(),
            "at least one request per level is needed",
        );
    }
    if cfg.rounds == 0 {
        return bad("--rounds", "0".into(), "at least one round is needed");
    }
    if cfg.output_len == 0 {
        return bad("--output-len", "0".into(), "at least one output token is needed");
    }
    if cfg.prompts_file.is_none() && cfg.input_len == 0 {
        return bad(
            "--input-len",
            "0".into(),
            "a synthetic prompt needs at least one word",
        );
    }
    if !cfg.asserts.is_empty() && cfg.candidate.is_none() {
        let text: Vec<String> = cfg.asserts.iter().map(|t| t.to_string()).collect();
        return bad(
            "--assert",
            text.join(","),
            "thresholds compare two servers: add --compare URL2",
        );
    }
    Ok(())
}

/// Runs the configured load on a runtime of its own (single-threaded unless
/// `client_threads` > 1) and returns every measurement.
pub fn run(cfg: &LoadConfig) -> Result<Outcome> {
    validate(cfg)?;
    let mut cfg = cfg.clone();
    cfg.baseline.url = normalize_url("--url", &cfg.baseline.url)?;
    if let Some(c) = cfg.candidate.as_mut() {
        c.url = normalize_url("--compare", &c.url)?;
    }
    let pool = cfg.prompts_file.as_deref().map(prompts::load_jsonl).transpose()?;
    let runtime = if cfg.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.client_threads)
            .enable_all()
            .build()
    }
    .map_err(Error::Runtime)?;
    runtime.block_on(run_async(cfg, pool))
}

async fn resolve(client: &Client, role: Role, t: &Target, option: &'static str) -> Result<TargetInfo> {
    let model = match &t.model {
        Some(m) => m.clone(),
        None => client
            .first_model(&t.url, t.api_key.as_deref())
            .await
            .map_err(|reason| Error::Models {
                url: format!("{}/v1/models ({option})", t.url),
                reason,
            })?,
    };
    let server = client.health(&t.url, t.api_key.as_deref()).await;
    Ok(TargetInfo {
        role,
        url: t.url.clone(),
        model,
        server,
    })
}

async fn run_async(cfg: LoadConfig, pool: Option<Vec<String>>) -> Result<Outcome> {
    let client = Client::new();
    let mut targets = vec![resolve(&client, Role::Baseline, &cfg.baseline, "--url").await?];
    let mut configs = vec![cfg.baseline.clone()];
    if let Some(c) = &cfg.candidate {
        targets.push(resolve(&client, Role::Candidate, c, "--compare").await?);
        configs.push(c.clone());
    }
    let mut servers = Vec::new();
    for (t, c) in targets.iter().zip(&configs) {
        let server =
            Server::new(&t.url, cfg.endpoint, c.api_key.as_deref()).map_err(|reason| Error::BadUrl {
                option: match t.role {
                    Role::Baseline => "--url",
                    Role::Candidate => "--compare",
                },
                url: t.url.clone(),
                reason,
            })?;
        servers.push(Arc::new(server));
    }
    let progress = |msg: String| {
        if cfg.progress {
            eprintln!("bench-serve: {msg}");
        }
    };

    let mut warmup = Vec::new();
    if cfg.warmup > 0 {
        let width = match cfg.levels[0] {
            Level::Concurrency(n) => n.min(cfg.warmup),
            Level::Rate(_) => cfg.warmup,
        };
        let prompts = prompt_set(&cfg, pool.as_deref(), cfg.warmup, u64::MAX, 0);
        for (t, server) in targets.iter().zip(&servers) {
            progress(format!(
                "warmup: {} requests to {} ({})",
                cfg.warmup,
                t.url,
                t.role.name()
            ));
            let run = run_level(
                &client,
                server,
                bodies(&cfg, &t.model, &prompts),
                Level::Concurrency(width.max(1)),
                0,
                cfg.request_timeout,
            )
            .await?;
            let errors: Vec<&String> = run.records.iter().filter_map(|r| r.error.as_ref()).collect();
            if let Some(e) = errors.first() {
                progress(format!(
                    "warmup: {} of {} requests failed, e.g. {e}",
                    errors.len(),
                    cfg.warmup
                ));
            }
            warmup.push(WarmupInfo {
                role: t.role,
                requests: cfg.warmup,
                errors: errors.len(),
                first_error: errors.first().map(|e| e.to_string()),
            });
        }
    }

    let mut runs = Vec::new();
    for (li, &level) in cfg.levels.iter().enumerate() {
        for round in 0..cfg.rounds {
            let slot = (li * cfg.rounds + round) as u64;
            let start = (li * cfg.rounds + round).saturating_mul(cfg.num_prompts);
            let prompts = prompt_set(&cfg, pool.as_deref(), cfg.num_prompts, slot, start);
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(cfg.seed, STREAM_ORDER, slot)));
            for (position, &ti) in order.iter().enumerate() {
                let t = &targets[ti];
                progress(format!(
                    "{level} round {}/{}: {} requests to {} ({})",
                    round + 1,
                    cfg.rounds,
                    cfg.num_prompts,
                    t.url,
                    t.role.name()
                ));
                let run = run_level(
                    &client,
                    &servers[ti],
                    bodies(&cfg, &t.model, &prompts),
                    level,
                    mix(cfg.seed, STREAM_ARRIVALS, slot),
                    cfg.request_timeout,
                )
                .await?;
                runs.push(Measured {
                    level_index: li,
                    level,
                    round,
                    target: ti,
                    position,
                    run,
                });
            }
        }
    }
    Ok(Outcome {
        config: cfg,
        targets,
        warmup,
        runs,
    })
}
