//! `kestrel validate`: a fidelity gate. Decodes a fixed set of prompts
//! greedily under a baseline profile and a candidate profile (device, CUDA
//! kernel set, decode graphs, KV dtype, prefix cache, model file), checks
//! that the generated token ids are identical, and compares speed.
//! Exits non-zero when any prompt differs (unless `--allow-fail`), so CI can
//! gate on it. See docs/validate.md.

mod fidelity;
mod profile;
mod prompts;
mod report;
mod runner;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;

use crate::device::dispatch_with;
use crate::model_path;
use fidelity::Side;
use profile::Profile;
use runner::{ProfileRun, ProfileTask, RunPlan};

#[derive(ClapArgs, Clone, Debug)]
pub struct Args {
    /// Model: a .gguf file or a Hugging Face directory (default: the default
    /// model); a profile's `model=PATH` replaces it for that side.
    pub model: Option<PathBuf>,
    /// The reference side: a preset (cpu, auto, cuda, cuda-reference,
    /// cuda-nograph, cuda-f16kv, cpu-f16kv) and/or key=value pairs among
    /// device, kernels, graphs, kv, prefix_cache, model
    /// (e.g. `device=cuda,kernels=reference,graphs=off`).
    #[arg(long, value_parser = Profile::parse)]
    pub baseline: Profile,
    /// The side under test, in the same syntax as --baseline.
    #[arg(long, value_parser = Profile::parse)]
    pub candidate: Profile,
    /// Prompts, one per line, instead of the built-in set of 8.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use only the first N prompts.
    #[arg(long)]
    pub num_prompts: Option<usize>,
    /// Tokens generated per prompt (EOS does not stop generation).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Untimed passes over the prompts before the timed ones (with the
    /// prefix cache on, these fill it).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed passes over the prompts; the first one's ids are compared, and
    /// every later one must repeat them.
    #[arg(long, short = 'r', default_value_t = 3)]
    pub runs: usize,
    /// Report a failed comparison but exit with status 0.
    #[arg(long)]
    pub allow_fail: bool,
    /// Write the capsule here (default: benchmarks/<time>-validate-<device>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as one JSON document on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The comparable part of one side's run of prompt `i`.
fn side(r: &ProfileRun, i: usize) -> Side<'_> {
    let p = &r.prompts[i];
    Side {
        prompt_ids: &p.prompt_ids,
        tokens: &p.tokens,
        texts: &p.token_texts,
        unstable_runs: p.unstable_runs,
    }
}

/// Loads the profile's model on its backend and runs every prompt.
fn run_side(
    role: &str,
    profile: &Profile,
    model: PathBuf,
    task: (&[prompts::Prompt], RunPlan),
) -> Result<ProfileRun> {
    eprintln!("{role}: {} [{}]", profile.spec, profile.canonical());
    let t = ProfileTask {
        profile: profile.clone(),
        model,
        prompts: task.0.to_vec(),
        plan: task.1,
    };
    dispatch_with(profile.device, profile.kernels, t)
        .with_context(|| format!("{role} profile `{}`", profile.spec))
}

pub fn main(a: Args) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs is 0, expected at least 1 (the first timed run is the one compared)");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens is 0, expected at least 1");
    }
    let prompts = prompts::select(a.prompts.as_deref(), a.num_prompts)?;
    let plan = RunPlan {
        max_tokens: a.max_tokens,
        warmup: a.warmup,
        runs: a.runs,
    };
    // Resolve both models before the first (slow) side runs, so that a
    // mistyped path fails at once.
    let model_of = |p: &Profile| model_path::resolve(p.model.clone().or_else(|| a.model.clone()));
    let base_model = model_of(&a.baseline).context("baseline model")?;
    let cand_model = model_of(&a.candidate).context("candidate model")?;

    let base = run_side("baseline", &a.baseline, base_model.clone(), (&prompts, plan))?;
    let cand = run_side("candidate", &a.candidate, cand_model, (&prompts, plan))?;

    let fidelity: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| fidelity::compare(&p.name, &side(&base, i), &side(&cand, i)))
        .collect();
    let verdict = fidelity::verdict(&fidelity);
    let outcome = report::Outcome {
        plan,
        prompts: &prompts,
        baseline: (&a.baseline, &base),
        candidate: (&a.candidate, &cand),
        fidelity: &fidelity,
        verdict: &verdict,
    };
    let result = report::result_json(&outcome);
    let text = report::text(&outcome);
    if a.json {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    let cap = kestrel_bench::capsule::write(&result, Some(&base_model), a.out.as_deref(), "validate")?;
    eprintln!("capsule: {}", cap.display());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    if !verdict.pass && !a.allow_fail {
        bail!(
            "validation FAILED: {} of {} prompts differ between `{}` and `{}` (--allow-fail to only report)",
            fidelity.iter().filter(|f| !f.pass()).count(),
            verdict.prompts,
            a.baseline.spec,
            a.candidate.spec
        );
    }
    Ok(())
}
