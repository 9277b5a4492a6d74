//! The results: the human table, the JSON document (also the capsule's
//! `result`), and the common `rows` every capsule carries.

use std::collections::BTreeMap;

use kestrel_bench::{Better, Row};
use serde_json::{json, Value};

use super::peak::Peak;
use super::run::{Outcome, Status, Timed};
use super::spec::{act_name, Compare, Op};

/// The `result.rows` of the capsule: per case and implementation, the time
/// of one run (µs) and the achieved GB/s (and TFLOP/s where the op does
/// multiply-adds), every sample kept.
pub fn rows(outcomes: &[Outcome]) -> Vec<Row> {
    let mut rows = Vec::new();
    for o in outcomes {
        let Status::Done { reference, fused, .. } = &o.status else {
            continue;
        };
        for (imp, t) in [("reference", reference), ("fused", fused)] {
            let test = format!("{}/{imp}", o.case.test_name());
            let us = t.samples_us.clone();
            let rate = |scale: f64| -> Vec<f64> { us.iter().map(|&s| scale / s.max(1e-12)).collect() };
            let with_params = |mut r: Row| {
                r = r
                    .with_param("rows", o.case.rows as f64)
                    .with_param("fused", if imp == "fused" { 1.0 } else { 0.0 })
                    .with_param("bytes", o.bytes);
                if let Some(role) = o.case.role {
                    let (out, inp) = role.shape();
                    r = r.with_param("out", out as f64).with_param("in", inp as f64);
                }
                if let Some(ctx) = o.case.ctx {
                    r = r.with_param("ctx", ctx as f64);
                }
                r
            };
            rows.push(with_params(Row::new(
                &test,
                "time_us",
                "us",
                Better::Lower,
                us.clone(),
            )));
            rows.push(with_params(Row::new(
                &test,
                "gb_s",
                "GB/s",
                Better::Higher,
                rate(o.bytes / 1e3),
            )));
            if o.flops > 0.0 {
                rows.push(with_params(Row::new(
                    &test,
                    "tflop_s",
                    "TFLOP/s",
                    Better::Higher,
                    rate(o.flops / 1e6),
                )));
            }
        }
    }
    rows
}

fn timed_json(t: &Timed) -> Value {
    json!({
        "median_us": t.median_us,
        "inner": t.inner,
        "gb_s": t.gb_s,
        "tflop_s": t.tflop_s,
        "peak_frac": t.peak_frac,
        "samples_us": t.samples_us,
    })
}

pub fn case_json(o: &Outcome) -> Value {
    let c = &o.case;
    let (ref_impl, fused_impl) = c.op.implementations();
    let mut v = json!({
        "test": c.test_name(),
        "op": c.op.name(),
        "rows": c.rows,
        "type": c.types.map(|t| t.name()),
        "weight_types": c.roles().iter().map(|&r| (r.name(), c.dtype(r).name())).collect::<BTreeMap<_, _>>(),
        "matrix": c.role.map(|r| {
            let (out, inp) = r.shape();
            json!({"name": r.name(), "out": out, "in": inp})
        }),
        "activation": c.act.map(act_name),
        "ctx": c.ctx,
        "bytes": o.bytes,
        "flops": o.flops,
        "copies": o.copies,
        "implementations": {"reference": ref_impl, "fused": fused_impl},
    });
    match &o.status {
        Status::Done {
            reference,
            fused,
            agreement,
        } => {
            v["status"] = json!("ok");
            v["reference"] = timed_json(reference);
            v["fused"] = timed_json(fused);
            v["speedup"] = json!(reference.median_us / fused.median_us.max(1e-12));
            v["agreement"] = json!(agreement);
        }
        Status::Skipped(why) => {
            v["status"] = json!("skipped");
            v["reason"] = json!(why);
        }
        Status::Failed(why) => {
            v["status"] = json!("failed");
            v["reason"] = json!(why);
        }
    }
    v
}

/// Per op: the worst relative error over its cases against the tolerance.
pub fn agreement_by_op(outcomes: &[Outcome]) -> BTreeMap<&'static str, Value> {
    let mut out = BTreeMap::new();
    for op in Op::ALL {
        let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.case.op == op).collect();
        if mine.is_empty() {
            continue;
        }
        let mut worst = 0f64;
        let (mut measured, mut bad) = (0, Vec::new());
        for o in &mine {
            if let Status::Done { agreement, .. } = &o.status {
                measured += 1;
                worst = worst.max(agreement.max_rel);
                if !agreement.ok {
                    bad.push(o.case.test_name());
                }
            }
        }
        let (tolerance, exact) = match op.compare() {
            Compare::Relative(t) => (t, false),
            Compare::Exact => (0.0, true),
        };
        out.insert(
            op.name(),
            json!({
                "cases": measured,
                "worst_max_rel": worst,
                "tolerance": tolerance,
                "exact": exact,
                "disagreeing": bad,
                "ok": measured > 0 && bad.is_empty(),
            }),
        );
    }
    out
}

fn fmt_rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The human table.
pub fn table(device: &str, backends: (&str, &str), peak: &Peak, outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    s.push_str(&format!("kestrel microbench on {device}\n"));
    s.push_str(&format!(
        "  reference: {}\n  fused:     {}\n",
        backends.0, backends.1
    ));
    s.push_str(&format!(
        "  peak bandwidth: {:.1} GB/s ({}, {} MiB)\n\n",
        peak.gb_s, peak.method, peak.buffer_mib
    ));
    let name_w = outcomes
        .iter()
        .map(|o| o.case.test_name().len())
        .max()
        .unwrap_or(4)
        .max(4);
    s.push_str(&format!(
        "{:<name_w$} {:>10} {:>10} {:>7} {:>8} {:>8} {:>6} {:>8} {:>9} {:>7}  agree\n",
        "test", "ref us", "fused us", "speedup", "ref GB/s", "GB/s", "%peak", "TFLOP/s", "max rel", "tol"
    ));
    for o in outcomes {
        let name = o.case.test_name();
        match &o.status {
            Status::Done {
                reference,
                fused,
                agreement,
            } => {
                let verdict = if agreement.ok {
                    "ok".to_string()
                } else if agreement.non_finite > 0 {
                    format!("DISAGREE ({} non-finite)", agreement.non_finite)
                } else {
                    format!("DISAGREE ({} differ)", agreement.mismatches)
                };
                s.push_str(&format!(
                    "{name:<name_w$} {:>10.2} {:>10.2} {:>6.2}x {:>8} {:>8} {:>5.1}% {:>8} {:>9.1e} {:>7.0e}  {verdict}\n",
                    reference.median_us,
                    fused.median_us,
                    reference.median_us / fused.median_us.max(1e-12),
                    fmt_rate(reference.gb_s),
                    fmt_rate(fused.gb_s),
                    100.0 * fused.peak_frac,
                    if o.flops > 0.0 { format!("{:.3}", fused.tflop_s) } else { "-".into() },
                    agreement.max_rel,
                    agreement.tolerance,
                ));
            }
            Status::Skipped(why) => s.push_str(&format!("{name:<name_w$} skipped: {why}\n")),
            Status::Failed(why) => s.push_str(&format!("{name:<name_w$} FAILED: {why}\n")),
        }
    }
    s
}
