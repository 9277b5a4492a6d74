//! `kestrel bench-serve`: load-test an OpenAI-compatible server (kestrel
//! serve, llama-server, vLLM), optionally against a second one, and write a
//! capsule. The work is in `kestrel_bench::serve_load`; this maps the
//! command line onto it and prints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use kestrel_bench::capsule;
use kestrel_bench::serve_load::{self, Endpoint, LoadConfig, Report, SelfTestConfig, Target};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum EndpointArg {
    /// POST /v1/completions
    Completions,
    /// POST /v1/chat/completions
    Chat,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Base URL of the server under test (the baseline with --compare), e.g. http://127.0.0.1:8080.
    #[arg(long, required_unless_present = "self_test_throughput")]
    pub url: Option<String>,
    /// Model name sent (default: the first id of GET /v1/models).
    #[arg(long)]
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key: Option<String>,
    #[arg(long, value_enum, default_value = "completions")]
    pub endpoint: EndpointArg,
    /// Closed-loop sweep: worker counts, e.g. 1,8,64 (each worker sends its next request when its previous one ends).
    #[arg(long, default_value = "1", conflicts_with = "request_rate")]
    pub concurrency: String,
    /// Open-loop sweep: Poisson arrival rates in requests/s, e.g. 2,8,inf (inf: all at once).
    #[arg(long)]
    pub request_rate: Option<String>,
    /// Measured requests per level (per server and round).
    #[arg(long, default_value_t = 64)]
    pub num_prompts: usize,
    /// Words per synthetic prompt (about one token each).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Prompts from a JSONL file, one {"prompt": "..."} per line, instead of synthetic ones.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Send ignore_eos: true so that every request generates exactly --output-len tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature sent with every request: 0 (default) is greedy,
    /// as the anchors were measured; a negative value sends none (the
    /// server's default, 1.0 in OpenAI's API).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Unmeasured requests sent to each server first.
    #[arg(long, default_value_t = 4)]
    pub warmup: usize,
    /// Seed of the prompts, the arrival times and the --compare order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Candidate server compared with --url (ratios are candidate / baseline).
    #[arg(long)]
    pub compare: Option<String>,
    /// Model name for --compare (default: its first id of GET /v1/models).
    #[arg(long, requires = "compare")]
    pub compare_model: Option<String>,
    /// API key for --compare.
    #[arg(long, requires = "compare")]
    pub compare_api_key: Option<String>,
    /// Repetitions of every level (default: 3 with --compare, 1 without); with --compare each
    /// round runs both servers in a freshly shuffled order.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Thresholds on candidate/baseline ratios checked at every level, e.g.
    /// "ttft_p50_ratio<=1.2,throughput_ratio>=0.9" (also tpot_p50_ratio, itl_p50_ratio,
    /// e2e_p50_ratio); a miss exits non-zero.
    #[arg(long, requires = "compare")]
    pub assert: Option<String>,
    /// Client runtime threads (1: single-threaded, which --self-test-throughput shows is enough).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Seconds before a request is abandoned and counted as an error.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Measure the client's own streamed-token intake on one core against an in-process mock
    /// server (no --url needed).
    #[arg(long)]
    pub self_test_throughput: bool,
    /// Write the capsule here (default: benchmarks/<time>-bench-serve-http.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as one JSON document on stdout (the tables go to stderr).
    #[arg(long)]
    pub json: bool,
}

pub fn main(a: Args) -> Result<()> {
    if a.self_test_throughput {
        return self_test(&a);
    }
    let cfg = config(&a)?;
    let outcome = serve_load::run(&cfg)?;
    let report = Report::of(&outcome);
    let result = report.result_json(&outcome);
    let text = report.text();
    if a.json {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    let out = a.out.clone().unwrap_or_else(default_out);
    let path = capsule::write(&result, None, Some(&out), "bench-serve")?;
    eprintln!("capsule: {}", path.display());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    report.assert_thresholds()?;
    Ok(())
}

/// `capsule::write`'s default name carries the local device, which says
/// nothing about a server measured over HTTP.
fn default_out() -> PathBuf {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Path::new("benchmarks").join(format!("{now}-bench-serve-http.json"))
}

fn config(a: &Args) -> Result<LoadConfig> {
    let url = a.url.clone().context("--url is required")?;
    let levels = match &a.request_rate {
        Some(r) => serve_load::parse_rates(r)?,
        None => serve_load::parse_concurrency(&a.concurrency)?,
    };
    let asserts = a
        .assert
        .as_deref()
        .map(serve_load::parse_asserts)
        .transpose()?
        .unwrap_or_default();
    let candidate = a.compare.clone().map(|url| Target {
        url,
        model: a.compare_model.clone(),
        api_key: a.compare_api_key.clone(),
    });
    let rounds = a.rounds.unwrap_or(if candidate.is_some() { 3 } else { 1 });
    Ok(LoadConfig {
        baseline: Target {
            url,
            model: a.model.clone(),
            api_key: a.api_key.clone(),
        },
        candidate,
        levels,
        num_prompts: a.num_prompts,
        input_len: a.input_len,
        output_len: a.output_len,
        prompts_file: a.prompts.clone(),
        ignore_eos: a.ignore_eos,
        temperature: (a.temperature >= 0.0).then_some(a.temperature),
        endpoint: match a.endpoint {
            EndpointArg::Completions => Endpoint::Completions,
            EndpointArg::Chat => Endpoint::Chat,
        },
        warmup: a.warmup,
        seed: a.seed,
        rounds,
        asserts,
        client_threads: a.client_threads,
        request_timeout: Duration::from_secs(a.timeout),
        progress: true,
    })
}

fn self_test(a: &Args) -> Result<()> {
    let r = serve_load::self_test(SelfTestConfig::default())?;
    let cpu = match (r.client_cpu_s, r.tokens_per_cpu_s) {
        (Some(c), Some(t)) => format!("; client CPU {c:.3} s = {t:.0} tok per CPU-second"),
        _ => String::new(),
    };
    let line = format!(
        "self-test: the client took in {} streamed tokens ({} streams x {} requests x {} tokens, {} errors) in {:.3} s on one thread: {:.0} tok/s{cpu}",
        r.tokens,
        r.config.streams,
        r.config.requests,
        r.config.tokens_per_request,
        r.errors,
        r.wall_s,
        r.tokens_per_s
    );
    if a.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
    let result = r.result_json();
    let path = capsule::write(&result, None, a.out.as_deref(), "bench-serve-selftest")?;
    eprintln!("capsule: {}", path.display());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    if r.errors > 0 {
        anyhow::bail!(
            "the self-test had {} failed requests against its own mock server",
            r.errors
        );
    }
    Ok(())
}
