//! The validation result: one JSON document (printed by `--json` and kept in
//! the capsule) and its human rendering.

use kestrel_bench::{Better, Row, Stats};
use serde_json::{json, Value};

use super::fidelity::{PromptFidelity, Verdict};
use super::profile::Profile;
use super::prompts::Prompt;
use super::runner::{ProfileRun, RunPlan};

/// Said where the backend reports no device memory (the CPU backend).
const DEVICE_NA: &str = "n/a (the backend has no device memory report)";
/// What the device figure is, where there is one.
const DEVICE_NOTE: &str = "memory in use on the whole device (all processes), highest of samples \
     taken after loading and after each pass";

/// Inputs of the report.
pub struct Outcome<'a> {
    pub plan: RunPlan,
    pub prompts: &'a [Prompt],
    pub baseline: (&'a Profile, &'a ProfileRun),
    pub candidate: (&'a Profile, &'a ProfileRun),
    pub fidelity: &'a [PromptFidelity],
    pub verdict: &'a Verdict,
}

fn median(v: &[f64]) -> f64 {
    Stats::of(v).median
}

fn ratio(candidate: f64, baseline: f64) -> Option<f64> {
    (baseline > 0.0 && candidate > 0.0).then(|| candidate / baseline)
}

fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

fn mib_bytes(b: Option<u64>) -> Option<f64> {
    b.map(|b| b as f64 / (1024.0 * 1024.0))
}

fn side_json(profile: &Profile, run: &ProfileRun) -> Value {
    json!({
        "profile": profile.to_json(),
        "device": run.device,
        "model": run.model.display().to_string(),
        "load_secs": run.load_secs,
        "weight_bytes": run.weight_bytes,
        "kv_pool_bytes": run.kv_pool_bytes,
        "host_peak_mib": mib(run.host_peak_kib),
        "host_peak_reset": run.host_peak_reset,
        "device_used_mib": mib_bytes(run.device_used_bytes),
        "device_total_mib": mib_bytes(run.device_total_bytes),
        "device_memory_note": if run.device_used_bytes.is_some() { DEVICE_NOTE } else { DEVICE_NA },
        "prefill_tok_s": {"median": median(&run.prefill_tok_s), "raw": run.prefill_tok_s},
        "decode_tok_s": {"median": median(&run.decode_tok_s), "raw": run.decode_tok_s},
        "ttft_ms": {"median": median(&run.ttft_ms), "raw": run.ttft_ms},
    })
}

/// The rows `kestrel report` reads: speed per side (raw = one value per
/// timed run), peak host memory, speedups, and fidelity.
fn rows(o: &Outcome<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for (role, (profile, run)) in [("baseline", o.baseline), ("candidate", o.candidate)] {
        let test = format!("{role}:{}", profile.spec);
        rows.push(Row::new(
            &test,
            "prefill_tok_s",
            "tok/s",
            Better::Higher,
            run.prefill_tok_s.clone(),
        ));
        rows.push(Row::new(
            &test,
            "decode_tok_s",
            "tok/s",
            Better::Higher,
            run.decode_tok_s.clone(),
        ));
        rows.push(Row::new(
            &test,
            "ttft_ms",
            "ms",
            Better::Lower,
            run.ttft_ms.clone(),
        ));
        if let Some(m) = mib(run.host_peak_kib) {
            rows.push(Row::new(&test, "host_peak_mib", "MiB", Better::Lower, vec![m]));
        }
        if let Some(m) = mib_bytes(run.device_used_bytes) {
            rows.push(Row::new(&test, "device_used_mib", "MiB", Better::Lower, vec![m]));
        }
    }
    let (b, c) = (o.baseline.1, o.candidate.1);
    for (metric, cand, base) in [
        ("prefill_speedup", &c.prefill_tok_s, &b.prefill_tok_s),
        ("decode_speedup", &c.decode_tok_s, &b.decode_tok_s),
    ] {
        if let Some(r) = ratio(median(cand), median(base)) {
            rows.push(Row::new(
                "candidate/baseline",
                metric,
                "x",
                Better::Higher,
                vec![r],
            ));
        }
    }
    let fractions: Vec<f64> = o
        .fidelity
        .iter()
        .map(|f| {
            if f.total == 0 {
                1.0
            } else {
                f.matched as f64 / f.total as f64
            }
        })
        .collect();
    rows.push(
        Row::new("fidelity", "matched_frac", "fraction", Better::Higher, fractions)
            .with_param("prompts", o.verdict.prompts as f64)
            .with_param("identical_prompts", o.verdict.identical_prompts as f64)
            .with_param("max_tokens", o.plan.max_tokens as f64),
    );
    rows
}

/// The `result` document.
pub fn result_json(o: &Outcome<'_>) -> Value {
    let (b, c) = (o.baseline.1, o.candidate.1);
    let prompts: Vec<Value> = o
        .prompts
        .iter()
        .zip(o.fidelity)
        .zip(b.prompts.iter().zip(&c.prompts))
        .map(|((p, f), (pb, pc))| {
            json!({
                "name": p.name,
                "text": p.text,
                "pass": f.pass(),
                "identical": f.identical,
                "matched": f.matched,
                "total": f.total,
                "divergence": f.divergence,
                "prompt_ids_differ": f.prompt_ids_differ,
                "baseline_unstable_runs": f.baseline_unstable_runs,
                "candidate_unstable_runs": f.candidate_unstable_runs,
                "baseline": {"prompt_ids": pb.prompt_ids, "tokens": pb.tokens, "text": pb.text, "timings": pb.timings},
                "candidate": {"prompt_ids": pc.prompt_ids, "tokens": pc.tokens, "text": pc.text, "timings": pc.timings},
            })
        })
        .collect();
    // The capsule's file name says cuda when either side ran on a GPU.
    let device = if c.device.starts_with("cuda") {
        &c.device
    } else {
        &b.device
    };
    json!({
        "kind": "validate",
        "device": device,
        "verdict": if o.verdict.pass { "PASS" } else { "FAIL" },
        "pass": o.verdict.pass,
        "prompts_total": o.verdict.prompts,
        "identical_prompts": o.verdict.identical_prompts,
        "matched": o.verdict.matched_tokens,
        "total": o.verdict.total_tokens,
        "settings": {
            "greedy": true,
            "ignore_eos": true,
            "max_tokens": o.plan.max_tokens,
            "warmup": o.plan.warmup,
            "runs": o.plan.runs,
        },
        "baseline": side_json(o.baseline.0, b),
        "candidate": side_json(o.candidate.0, c),
        "speedup": {
            "prefill": ratio(median(&c.prefill_tok_s), median(&b.prefill_tok_s)),
            "decode": ratio(median(&c.decode_tok_s), median(&b.decode_tok_s)),
        },
        "prompts": prompts,
        "rows": rows(o),
    })
}

fn clip(s: &str, n: usize) -> String {
    let mut out: String = s.chars().take(n).collect();
    if s.chars().count() > n {
        out.push('…');
    }
    out
}

fn token_desc(t: &Option<super::fidelity::TokenAt>) -> String {
    match t {
        Some(t) => format!("{} {:?}", t.id, t.text),
        None => "(ended)".into(),
    }
}

fn num(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "n/a".into())
}

/// The human rendering.
pub fn text(o: &Outcome<'_>) -> String {
    let (b, c) = (o.baseline.1, o.candidate.1);
    let mut s = String::new();
    s.push_str(&format!(
        "validate: {} prompts, greedy, {} tokens each, {} warmup + {} timed runs\n",
        o.prompts.len(),
        o.plan.max_tokens,
        o.plan.warmup,
        o.plan.runs
    ));
    for (role, (p, r)) in [("baseline ", o.baseline), ("candidate", o.candidate)] {
        s.push_str(&format!(
            "  {role}: {} [{}] on {}, model {}\n",
            p.spec,
            p.canonical(),
            r.device,
            r.model.display()
        ));
    }
    let w = o
        .prompts
        .iter()
        .map(|p| p.name.chars().count())
        .max()
        .unwrap_or(6)
        .max(6);
    s.push_str(&format!(
        "\n{:<w$}  {:>9}  {:<6} first divergence\n",
        "prompt", "matched", "result"
    ));
    for (p, f) in o.prompts.iter().zip(o.fidelity) {
        let mut note = String::new();
        if let Some(d) = &f.divergence {
            note = format!(
                "at {}: baseline {} vs candidate {}",
                d.index,
                token_desc(&d.baseline),
                token_desc(&d.candidate)
            );
        }
        for (who, n) in [
            ("baseline", f.baseline_unstable_runs),
            ("candidate", f.candidate_unstable_runs),
        ] {
            if n > 0 {
                note.push_str(&format!(" ({who} differed from itself in {n} run(s))"));
            }
        }
        if f.prompt_ids_differ {
            note.push_str(" (the prompt tokenizes differently on the two sides)");
        }
        s.push_str(&format!(
            "{:<w$}  {:>9}  {:<6} {}\n",
            clip(&p.name, w),
            format!("{}/{}", f.matched, f.total),
            if f.pass() { "PASS" } else { "FAIL" },
            note
        ));
    }
    let v = o.verdict;
    let pct = if v.total_tokens > 0 {
        100.0 * v.matched_tokens as f64 / v.total_tokens as f64
    } else {
        100.0
    };
    s.push_str(&format!(
        "\nfidelity: {}/{} prompts identical, {}/{} tokens matched before the first divergence ({pct:.1}%)\n\n",
        v.identical_prompts, v.prompts, v.matched_tokens, v.total_tokens
    ));
    let (bp, cp) = (median(&b.prefill_tok_s), median(&c.prefill_tok_s));
    let (bd, cd) = (median(&b.decode_tok_s), median(&c.decode_tok_s));
    s.push_str(&format!(
        "{:<22} {:>12} {:>12} {:>9}\n",
        "", "baseline", "candidate", "speedup"
    ));
    s.push_str(&format!(
        "{:<22} {:>12.1} {:>12.1} {:>9}\n",
        "prefill tok/s (median)",
        bp,
        cp,
        num(ratio(cp, bp), 2) + "x"
    ));
    s.push_str(&format!(
        "{:<22} {:>12.1} {:>12.1} {:>9}\n",
        "decode tok/s (median)",
        bd,
        cd,
        num(ratio(cd, bd), 2) + "x"
    ));
    let (bt, ct) = (median(&b.ttft_ms), median(&c.ttft_ms));
    s.push_str(&format!(
        "{:<22} {:>12.1} {:>12.1} {:>9}\n",
        "first token ms (mean)",
        bt,
        ct,
        num(ratio(bt, ct), 2) + "x"
    ));
    let peak = |r: &ProfileRun| {
        let v = num(mib(r.host_peak_kib), 1);
        if r.host_peak_reset {
            v
        } else {
            v + "*"
        }
    };
    s.push_str(&format!(
        "{:<22} {:>12} {:>12}\n",
        "host peak MiB",
        peak(b),
        peak(c)
    ));
    let dev = |r: &ProfileRun| num(mib_bytes(r.device_used_bytes), 1);
    s.push_str(&format!(
        "{:<22} {:>12} {:>12}\n",
        "device used MiB",
        dev(b),
        dev(c)
    ));
    s.push_str(&format!(
        "{:<22} {:>12.1} {:>12.1}\n",
        "weights + KV pool MB",
        (b.weight_bytes + b.kv_pool_bytes) as f64 / 1e6,
        (c.weight_bytes + c.kv_pool_bytes) as f64 / 1e6
    ));
    if b.device_used_bytes.is_some() || c.device_used_bytes.is_some() {
        s.push_str(&format!("  device used: {DEVICE_NOTE}\n"));
    }
    if !b.host_peak_reset || !c.host_peak_reset {
        s.push_str("  * the peak could not be reset, so it includes what ran before in this process\n");
    }
    s.push_str(&format!(
        "\nverdict: {}",
        if v.pass {
            "PASS".to_string()
        } else {
            format!(
                "FAIL ({} of {} prompts differ)",
                v.prompts - fidelity_passes(o.fidelity),
                v.prompts
            )
        }
    ));
    s.push('\n');
    s
}

fn fidelity_passes(rows: &[PromptFidelity]) -> usize {
    rows.iter().filter(|f| f.pass()).count()
}
