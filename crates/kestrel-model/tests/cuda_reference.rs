//! The default model on CUDA: greedy tokens of the fused kernels against
//! llama.cpp's reference (greedy.json), the CPU backend and the CUDA
//! reference kernels. Skips, saying so, where no GPU is usable.
//!
//! Rules: fused and reference CUDA kernels must produce the same 32 greedy
//! tokens for every prompt. Against the f32 oracle (the CPU backend with
//! every matrix dequantized, `CpuBackend::with_f32_weights`: the arithmetic
//! CUDA does, f32 activations): teacher-forced logits within
//! `ORACLE_REL_L2` and the same top token wherever the oracle's margin is no
//! near-tie. Against llama.cpp, the rule of reference_gemma3.rs (agreement
//! at every teacher-forced step whose reference margin is robust), except at
//! steps where the f32 oracle itself disagrees with llama.cpp: those are
//! decided by llama.cpp's 8-bit activation rounding (docs/REFERENCE-NUMERICS.md),
//! and CUDA must follow the oracle there. Against the CPU backend (8-bit
//! activations, as llama.cpp) the matched length is printed.
//! `KESTREL_GREEDY_JSON` overrides the location of greedy.json (the GPU
//! machine has no ../shared).

mod common;

use std::sync::Arc;

use kestrel_backend::cpu::CpuBackend;
use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::Backend;
use kestrel_model::Model;

/// Bound on the teacher-forced logits' relative L2 distance from the f32
/// oracle: f32 activations with f16 GEMM operands in prefill. Measured
/// 1.6e-3 on an H100 (session 19); 8-bit activations alone move the logits
/// by 1.2e-2 to 1.3e-1 (reference_gemma3.rs), so the bound separates the two.
const ORACLE_REL_L2: f64 = 5e-3;

fn greedy_json() -> std::path::PathBuf {
    std::env::var_os("KESTREL_GREEDY_JSON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::shared_dir().join("reference/gemma3-270m/greedy.json"))
}

fn matched(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn run_all<B: Backend>(model: &Model<B>, cases: &[common::RefCase]) -> Vec<(Vec<u32>, Vec<f32>)> {
    cases
        .iter()
        .map(|c| common::greedy(model, &c.prompt, c.want.len()))
        .collect()
}

#[test]
fn cuda_greedy_matches_cpu_reference_kernels_and_llama_cpp() {
    let Some(fused) = CudaBackend::for_tests(KernelSet::Fused) else {
        return;
    };
    println!("device: {}", fused.describe());
    let path = common::default_model();
    let cases = common::reference_cases(&greedy_json());
    let fused_model = Model::load(&path, Arc::new(fused)).unwrap();
    let t0 = std::time::Instant::now();
    let got_fused = run_all(&fused_model, &cases);
    println!("fused: {:.2} s", t0.elapsed().as_secs_f64());
    // The f32 oracle decides the steps that llama.cpp's 8-bit activation
    // rounding decides (check_against_reference), and holds every
    // teacher-forced step to the arithmetic CUDA does: the same top token
    // wherever the oracle's margin is no near-tie, and logits within
    // `ORACLE_REL_L2` (8-bit activations alone move them by 5-13%).
    let exact = Model::load(&path, Arc::new(CpuBackend::new().with_f32_weights())).unwrap();
    let mut failures = Vec::new();
    let mut oracle_tops = Vec::new();
    let (mut agree, mut total, mut max_rel) = (0, 0, 0f64);
    for c in &cases {
        let want = common::teacher_forced(&exact, &c.prompt, &c.want);
        let got = common::teacher_forced(&fused_model, &c.prompt, &c.want);
        let mut tops = Vec::new();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let ((wt, wm), (gt, gm)) = (common::top_and_margin(w), common::top_and_margin(g));
            max_rel = max_rel.max(common::rel_l2(g, w));
            total += 1;
            if wt == gt {
                agree += 1;
            } else {
                println!(
                    "{} step {i}: cuda {gt} (margin {gm:.3}), f32 oracle {wt} (margin {wm:.3})",
                    c.name
                );
                if wm >= common::EXACT_TIE {
                    failures.push(format!(
                        "{} step {i}: cuda {gt}, f32 oracle {wt} with margin {wm:.3}",
                        c.name
                    ));
                }
            }
            tops.push((wt, wm));
        }
        oracle_tops.push(tops);
    }
    drop(exact);
    println!("teacher-forced against the f32 oracle: {agree}/{total} same top token, max logits rel-L2 {max_rel:.2e}");
    if max_rel > ORACLE_REL_L2 {
        failures.push(format!(
            "logits rel-L2 to the f32 oracle {max_rel:.2e} > {ORACLE_REL_L2:.0e}"
        ));
    }
    failures.extend(common::check_against_reference(
        &fused_model,
        &greedy_json(),
        Some(&oracle_tops),
    ));
    drop(fused_model);
    let reference = CudaBackend::with_kernels(0, KernelSet::Reference).unwrap();
    let ref_model = Model::load(&path, Arc::new(reference)).unwrap();
    let got_ref = run_all(&ref_model, &cases);
    drop(ref_model);
    let cpu_model = Model::load(&path, Arc::new(CpuBackend::new())).unwrap();
    let got_cpu = run_all(&cpu_model, &cases);

    for (i, c) in cases.iter().enumerate() {
        let (f, fl) = &got_fused[i];
        let (r, _) = &got_ref[i];
        let (p, pl) = &got_cpu[i];
        let (m_ll, m_ref, m_cpu) = (matched(f, &c.want), matched(f, r), matched(f, p));
        // First-step logits, fused CUDA against the CPU backend.
        let rel = common::rel_l2(fl, pl);
        println!(
            "{:<45} llama.cpp {m_ll:>2}/{n} cuda-ref {m_ref:>2}/{n} cpu {m_cpu:>2}/{n} (README rule {req}) first-logits rel-L2 vs cpu {rel:.2e}",
            c.name,
            n = c.want.len(),
            req = common::readme_required(&c.margins)
        );
        if m_ref < c.want.len() {
            failures.push(format!(
                "{}: fused vs CUDA reference kernels: matched {m_ref}; fused {f:?}",
                c.name
            ));
        }
        // Printed, not bounded: the CPU backend quantizes activations to
        // int8 (as llama.cpp does) and CUDA keeps them f32, so first-step
        // logits differ by a few percent; tokens are what must agree.
        if !rel.is_finite() {
            failures.push(format!("{}: first logits are not finite (rel-L2 {rel})", c.name));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}
