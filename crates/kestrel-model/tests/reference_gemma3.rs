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
    let failures = common::check_against_reference(&model, &path, None);
    assert!(
        failures.is_empty(),
        "disagreements with llama.cpp at robust steps:\n{}",
        failures.join("\n")
    );
}

/// The f32 oracle (`CpuBackend::with_f32_weights`: every matrix dequantized
/// at load, activations never quantized) is what backends that keep
/// activations in floating point (CUDA) are held to where llama.cpp's 8-bit
/// activation rounding decides a step (cuda_reference.rs). It must be the
/// same model: it agrees with llama.cpp wherever rounding cannot decide
/// (reference margin at least twice `ROBUST`) and on nearly all other steps;
/// and it must really skip the activation rounding: its logits differ from
/// the quantizing backend's by a few percent (the size of that rounding),
/// not by nothing.
#[test]
fn f32_weights_oracle_is_the_same_model_without_activation_rounding() {
    let path = common::shared_dir().join("reference/gemma3-270m/greedy.json");
    let q8 = common::load(&common::default_model(), CpuBackend::new());
    let exact = common::load(&common::default_model(), CpuBackend::new().with_f32_weights());
    let (mut agree, mut total, mut max_rel, mut min_rel) = (0, 0, 0f64, f64::MAX);
    let mut failures = Vec::new();
    for case in common::reference_cases(&path) {
        let rows = common::teacher_forced(&exact, &case.prompt, &case.want);
        let rows_q8 = common::teacher_forced(&q8, &case.prompt, &case.want);
        for (i, (row, row_q8)) in rows.iter().zip(&rows_q8).enumerate() {
            let (top, m) = common::top_and_margin(row);
            let rel = common::rel_l2(row_q8, row);
            (max_rel, min_rel) = (max_rel.max(rel), min_rel.min(rel));
            total += 1;
            if top == case.want[i] {
                agree += 1;
            } else {
                println!(
                    "{} step {i}: f32 oracle {top} (margin {m:.3}), llama.cpp {} (margin {:.3})",
                    case.name, case.want[i], case.margins[i]
                );
                if case.margins[i] >= 2.0 * common::ROBUST {
                    failures.push(format!("{} step {i}: margin {:.3}", case.name, case.margins[i]));
                }
            }
        }
    }
    println!("f32 oracle: teacher-forced agreement {agree}/{total}; logits rel-L2 to the 8-bit-activation backend {min_rel:.2e}..{max_rel:.2e}");
    assert!(
        failures.is_empty(),
        "f32 oracle differs at robust steps: {failures:?}"
    );
    assert!(
        agree * 100 >= total * 95,
        "f32 oracle agrees on only {agree}/{total} steps"
    );
    assert!(
        min_rel > 1e-3 && max_rel < 0.25,
        "rel-L2 to the quantizing backend {min_rel:.2e}..{max_rel:.2e}: expected the size of 8-bit activation rounding"
    );
}
