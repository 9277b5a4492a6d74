//! `kestrel validate` end to end: a profile compared with itself passes, a
//! candidate that really computes something else fails with the first
//! divergence reported, and malformed profiles are rejected by key.

mod common;

use common::{kestrel, text};

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

fn fixture(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
        .display()
        .to_string()
}

fn default_model() -> String {
    let p = kestrel_formats::default_model_path();
    assert!(
        p.exists(),
        "default model missing at {}: run scripts/fetch-model.sh",
        p.display()
    );
    p.display().to_string()
}

/// A scratch directory of this test process.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kestrel-validate-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// Index of the first differing token (the shorter length when one is a
/// prefix of the other), computed here independently of the tool.
fn first_difference(a: &[u64], b: &[u64]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(a.iter().zip(b).take_while(|(x, y)| x == y).count())
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id"))
        .collect()
}

#[test]
fn cpu_against_cpu_with_prefix_cache_passes() {
    let model = default_model();
    let dir = scratch("pass");
    let prompts = dir.join("prompts.txt");
    // The second prompt is longer than a KV block (16 tokens), so that with
    // the prefix cache on the timed run reuses cached blocks.
    std::fs::write(
        &prompts,
        "The capital of France is\nThe kestrel is a small falcon that hunts by hovering over open ground, holding its head still against the wind while its wings beat fast.\n",
    )
    .unwrap();
    let cap = dir.join("capsule.json");
    let out = kestrel(&[
        "validate",
        &model,
        "--baseline",
        "cpu",
        "--candidate",
        "cpu,prefix_cache=on",
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-tokens",
        "8",
        "--warmup",
        "1",
        "--runs",
        "1",
        "--json",
        "--out",
        cap.to_str().unwrap(),
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "validate failed: {err}");
    assert!(err.contains("verdict: PASS"), "{err}");
    let j = json_of(&out);
    assert_eq!(j["kind"], "validate");
    assert_eq!(j["verdict"], "PASS");
    assert_eq!(j["matched"], 16);
    assert_eq!(j["total"], 16);
    assert_eq!(j["identical_prompts"], 2);
    let prompts = j["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2);
    for p in prompts {
        let (b, c) = (ids(&p["baseline"]["tokens"]), ids(&p["candidate"]["tokens"]));
        assert_eq!(b.len(), 8);
        assert_eq!(b, c);
        assert!(p["divergence"].is_null());
    }
    // The long prompt's timed run found its blocks in the prefix cache on
    // the candidate side only.
    let cached = |side: &str| prompts[1][side]["timings"][0]["cached_tokens"].as_u64().unwrap();
    assert!(cached("candidate") >= 16, "{}", prompts[1]);
    assert_eq!(cached("baseline"), 0);
    assert_eq!(j["candidate"]["profile"]["prefix_cache"], true);
    for side in ["baseline", "candidate"] {
        let s = &j[side];
        assert!(s["prefill_tok_s"]["median"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["decode_tok_s"]["median"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["host_peak_mib"].as_f64().unwrap() > 50.0, "{s}");
        // The CPU backend reports no device memory: no invented numbers.
        assert!(s["device_used_mib"].is_null(), "{s}");
        assert!(s["device_memory_note"].as_str().unwrap().starts_with("n/a"));
        assert!(s["ttft_ms"]["median"].as_f64().unwrap() > 0.0, "{s}");
    }
    // The capsule carries the same result, with rows for `kestrel report`.
    let c: Value = serde_json::from_str(&std::fs::read_to_string(&cap).unwrap()).unwrap();
    assert_eq!(c["result"]["kind"], "validate");
    let rows = c["result"]["rows"].as_array().unwrap();
    let row = |test: &str, metric: &str| {
        rows.iter()
            .find(|r| r["test"] == test && r["metric"] == metric)
            .unwrap_or_else(|| panic!("no row {test}/{metric}: {rows:?}"))
    };
    assert_eq!(
        row("baseline:cpu", "decode_tok_s")["raw"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        row("candidate:cpu,prefix_cache=on", "prefill_tok_s")["stats"]["median"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(
        row("fidelity", "matched_frac")["raw"],
        serde_json::json!([1.0, 1.0])
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Greedy ids of `kestrel run` (the Session path), for a cross-check.
fn run_tokens(model: &str, prompt: &str, n: usize) -> Vec<u64> {
    let out = kestrel(&[
        "run",
        model,
        "-p",
        prompt,
        "--device",
        "cpu",
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        &n.to_string(),
        "--json",
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "run failed: {err}");
    let line = err
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let j: Value = serde_json::from_str(line).unwrap();
    ids(&j["tokens"])
}

#[test]
fn a_requantized_model_diverges_and_fails_the_gate() {
    // The same tiny llama as f32 and as Q8_0: quantization moves the
    // logits enough to change greedy choices after a few tokens.
    let f32_model = fixture("llama/model-f32.gguf");
    let q8_model = fixture("llama/model-q8_0.gguf");
    let dir = scratch("fail");
    let prompts = dir.join("prompts.txt");
    let texts = ["The kestrel hovers", "Once upon a time", "def fib(n):"];
    std::fs::write(&prompts, texts.join("\n")).unwrap();
    let candidate = format!("cpu,model={q8_model}");
    let cap = dir.join("capsule.json");
    let args = [
        "validate",
        &f32_model,
        "--baseline",
        "cpu",
        "--candidate",
        &candidate,
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-tokens",
        "24",
        "--warmup",
        "0",
        "--runs",
        "2",
        "--json",
        "--out",
        cap.to_str().unwrap(),
    ];
    let out = kestrel(&args);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a diverging candidate must fail: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("validation FAILED"), "{err}");
    assert!(err.contains("verdict: FAIL"), "{err}");
    let j = json_of(&out);
    assert_eq!(j["verdict"], "FAIL");
    assert!(j["matched"].as_u64().unwrap() < j["total"].as_u64().unwrap());
    let prompts = j["prompts"].as_array().unwrap();
    let mut late_divergences = 0;
    for (p, t) in prompts.iter().zip(texts) {
        let (b, c) = (ids(&p["baseline"]["tokens"]), ids(&p["candidate"]["tokens"]));
        // Each side's tokens are what `kestrel run` generates with that model.
        assert_eq!(b, run_tokens(&f32_model, t, 24), "baseline of {t:?}");
        assert_eq!(c, run_tokens(&q8_model, t, 24), "candidate of {t:?}");
        match first_difference(&b, &c) {
            None => assert!(p["divergence"].is_null() && p["pass"] == true, "{p}"),
            Some(i) => {
                let d = &p["divergence"];
                assert_eq!(d["index"].as_u64(), Some(i as u64), "{p}");
                assert_eq!(p["matched"].as_u64(), Some(i as u64));
                assert_eq!(d["baseline"]["id"].as_u64(), Some(b[i]));
                assert_eq!(d["candidate"]["id"].as_u64(), Some(c[i]));
                assert!(d["baseline"]["text"].is_string());
                assert_eq!(p["pass"], false);
                if i > 0 {
                    late_divergences += 1;
                    // The human table names the same point.
                    assert!(err.contains(&format!("at {i}: baseline {}", b[i])), "{err}");
                }
            }
        }
    }
    assert!(
        late_divergences >= 1,
        "expected a divergence after some agreement: {j}"
    );
    assert_eq!(j["candidate"]["model"], q8_model.as_str());

    // --allow-fail reports the same verdict but exits 0.
    let mut lenient = args.to_vec();
    lenient.push("--allow-fail");
    let out = kestrel(&lenient);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_of(&out)["verdict"], "FAIL");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn malformed_profiles_are_rejected_naming_the_key() {
    for (profile, needles) in [
        ("device=tpu", &["`device`", "tpu", "cuda:N"][..]),
        ("cpu,colour=red", &["`colour`", "prefix_cache"][..]),
        ("cpu,kv=q4", &["`kv`", "f16"][..]),
        ("cuda,graphs=sometimes", &["`graphs`", "on or off"][..]),
        ("cuda-fast", &["`cuda-fast`", "cuda-reference"][..]),
        ("kernels=fused,kernels=reference", &["`kernels`", "twice"][..]),
    ] {
        let out = kestrel(&["validate", "--baseline", "cpu", "--candidate", profile]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{profile} accepted");
        assert!(err.contains("--candidate"), "{profile}: {err}");
        for n in needles {
            assert!(err.contains(n), "{profile}: stderr lacks {n:?}: {err}");
        }
    }
    // A model path that does not exist fails before anything is loaded.
    let out = kestrel(&[
        "validate",
        &fixture("llama/model-f32.gguf"),
        "--baseline",
        "cpu",
        "--candidate",
        "cpu,model=/nonexistent/model.gguf",
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("candidate model") && err.contains("/nonexistent/model.gguf"),
        "{err}"
    );
}
