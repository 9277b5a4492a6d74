//! The default model (Gemma 3 270M Q4_K_M) against llama.cpp's greedy
//! continuations in ../shared/reference/gemma3-270m/greedy.json.
//!
//! Rule (from the reference's README): tokens must match up to the first
//! near-tie (margin < 0.05 between llama.cpp's best and second-best token)
//! within the first 16; the matched length of all 32 is reported.

mod common;

use kestrel_backend::cpu::CpuBackend;
use serde_json::Value;

const NEAR_TIE: f64 = 0.05;

#[test]
fn greedy_matches_llama_cpp_reference() {
    let path = common::shared_dir().join("reference/gemma3-270m/greedy.json");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let model = common::load(&common::default_model(), CpuBackend::new());
    let mut failures = Vec::new();
    let mut total_matched = 0;
    let mut total = 0;
    for case in refs.as_array().unwrap() {
        let prompt: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["tokens"].clone()).unwrap();
        let margins: Vec<f64> = case["steps"].as_array().unwrap().iter().map(|s| s["margin"].as_f64().unwrap()).collect();
        let (got, _) = common::greedy(&model, &prompt, want.len());
        let matched = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let required = margins.iter().take(16).position(|&m| m < NEAR_TIE).unwrap_or(16);
        println!(
            "{:<55} matched {matched:>2}/{} (required {required})",
            format!("{:?}", case["prompt"].as_str().unwrap()),
            want.len()
        );
        total_matched += matched;
        total += want.len();
        if matched < required {
            failures.push(format!(
                "{:?}: matched {matched} < required {required}; got {:?} want {:?}",
                case["prompt"], &got[..required.min(got.len())], &want[..required]
            ));
        }
    }
    println!("total matched {total_matched}/{total}");
    assert!(failures.is_empty(), "greedy mismatches:\n{}", failures.join("\n"));
}
