//! `kestrel`: load a model file, generate, chat, inspect, tokenize.

mod commands;
mod device;
mod loading;
mod memory;
mod model_path;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kestrel",
    version,
    about = "Fast, trustworthy LLM inference on NVIDIA GPUs and CPUs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt; the text goes to stdout, statistics to stderr.
    Run(commands::run::RunArgs),
    /// Chat interactively with the model's chat template and conversation history.
    Chat(commands::chat::ChatArgs),
    /// Show a model's architecture, hyperparameters, tensors, tokenizer and memory needs.
    Inspect(commands::inspect::InspectArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(commands::tokenize::TokenizeArgs),
    /// Measure prefill and decode speed (llama-bench style) and write a capsule.
    Bench(commands::bench::BenchArgs),
    /// Render benchmark capsules as Markdown (RESULTS.md), CSV or JSON.
    Report(commands::report::ReportArgs),
    /// Perplexity of a text file with llama-perplexity's protocol.
    Perplexity(commands::perplexity::PerplexityArgs),
    /// Serve the model over an OpenAI-compatible HTTP API.
    Serve(commands::serve::ServeArgs),
    /// Load-test any OpenAI-compatible server (sweeps, Poisson arrivals, A/B comparison).
    BenchServe(commands::bench_serve::Args),
    /// Greedy token-ID fidelity and speed of a candidate profile against a baseline.
    Validate(commands::validate::Args),
    /// Each fused operation against its reference: agreement and achieved bandwidth.
    Microbench(commands::microbench::Args),
    /// The streaming detokenizer against naive per-token decoding.
    BenchDetok(commands::bench_detok::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KESTREL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => commands::run::main(a),
        Command::Chat(a) => commands::chat::main(a),
        Command::Inspect(a) => commands::inspect::main(a),
        Command::Tokenize(a) => commands::tokenize::main(a),
        Command::Bench(a) => commands::bench::main(a),
        Command::Report(a) => commands::report::main(a),
        Command::Perplexity(a) => commands::perplexity::main(a),
        Command::Serve(a) => commands::serve::main(a),
        Command::BenchServe(a) => commands::bench_serve::main(a),
        Command::Validate(a) => commands::validate::main(a),
        Command::Microbench(a) => commands::microbench::main(a),
        Command::BenchDetok(a) => commands::bench_detok::main(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
