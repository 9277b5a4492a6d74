//! The default model (Gemma 3 270M Q4_K_M) against llama.cpp's greedy
//! continuations in ../shared/reference/gemma3-270m/greedy.json.
//!
//! Two views, both printed:
//!
//! - Free-running: kestrel generates 32 tokens from each prompt on its own;
//!   the matched length per prompt is reported against the reference README's
//!   rule (match up to the first near-tie, llama.cpp margin < 0.05, within the
//!   first 16 tokens).
//! - Teacher-forced: kestrel is fed the reference's own tokens, so that one
//!   early near-tie does not decide all later steps, and its top token is
//!   compared with llama.cpp's at every one of the 256 steps.
//!
//! What is asserted, and why: docs/REFERENCE-NUMERICS.md shows (with
//! llama.cpp built from the same ggml version) that this model's greedy
//! margins move by 0.05-0.3 under rounding-level changes, and that llama.cpp
//! itself fails the README's free-running rule in 4 of 7 of its own
//! configurations (e.g. the whole prompt in one call instead of
//! llama-server's split; flash attention off; weight repacking off). A
//! correct implementation can therefore only be held to agreement where the
//! decision is robust: every teacher-forced step whose reference margin is at
//! least `ROBUST` must pick llama.cpp's token. A real defect (a wrong norm,
//! RoPE, mask or quantized kernel) changes tokens at high-margin steps and
//! fails this. The free-running rule is asserted for the prompts whose first
//! 16 reference margins are all robust.

mod common;

use kestrel_backend::cpu::CpuBackend;

#[test]
fn greedy_matches_llama_cpp_reference() {
    let path = common::shared_dir().join("reference/gemma3-270m/greedy.json");
    let model = common::load(&common::default_model(), CpuBackend::new());
    let failures = common::check_against_reference(&model, &path);
    assert!(
        failures.is_empty(),
        "disagreements with llama.cpp at robust steps:\n{}",
        failures.join("\n")
    );
}
