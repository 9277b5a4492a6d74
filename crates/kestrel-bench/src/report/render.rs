//! Tables of capsules: one line per (capsule, test, metric) as Markdown
//! (grouped by kind; the body of RESULTS.md), CSV or JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::load::Capsule;
use crate::capsule::Stats;
use crate::rows::Better;

/// One line of the table: a row of a capsule with the capsule's provenance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    pub capsule: String,
    pub kind: String,
    pub test: String,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub stats: Stats,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, f64>,
    pub device: String,
    pub hardware: String,
    pub model: String,
    pub commit: String,
    pub command: String,
}

/// Every row of every capsule, in capsule order then row order.
pub fn report_rows(capsules: &[Capsule]) -> Vec<ReportRow> {
    capsules
        .iter()
        .flat_map(|c| {
            c.rows.iter().map(move |r| ReportRow {
                capsule: c.name.clone(),
                kind: c.kind.clone(),
                test: r.test.clone(),
                metric: r.metric.clone(),
                unit: r.unit.clone(),
                better: r.better,
                stats: r.stats.clone(),
                params: r.params.clone(),
                device: c.device.clone(),
                hardware: c.hardware.clone(),
                model: c.model.clone(),
                commit: c.commit.clone(),
                command: c.command.clone(),
            })
        })
        .collect()
}

/// Whether the `p`th percentile of `n` samples says more than the maximum:
/// only when at least one sample lies above it (p95 needs 20 samples, p99 100).
pub fn percentile_meaningful(n: usize, p: f64) -> bool {
    n as f64 * (1.0 - p / 100.0) >= 1.0 - 1e-9
}

/// A number for a table: one decimal from 100 up, two from 1, else three
/// significant digits (latencies of microseconds in ms, ratios).
pub fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        format!("{v}")
    } else if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        let decimals = (2 - a.log10().floor() as i32).clamp(0, 12) as usize;
        format!("{v:.decimals$}")
    }
}

/// `name=value` pairs of a row's numeric axes.
pub fn params_text(params: &BTreeMap<String, f64>) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", trim_num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Integers without a fraction (concurrency 64, not 64.0).
fn trim_num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A Markdown table cell: pipes escaped, line breaks flattened.
pub fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// What each known tool measures, under its heading.
fn kind_description(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "bench" => "`kestrel bench`: prefill and decode speed of one model on one device.",
        "bench-serve" => "`kestrel bench-serve`: load test of an OpenAI-compatible server.",
        "validate" => "`kestrel validate`: greedy token fidelity and speed of a profile against a baseline.",
        "microbench" => "`kestrel microbench`: each fused operation against its reference.",
        "bench-detok" => "`kestrel bench-detok`: streaming detokenizer against per-token decoding.",
        _ => return None,
    })
}

/// Capsules grouped by kind, kinds in order of first appearance.
fn by_kind(capsules: &[Capsule]) -> Vec<(&str, Vec<&Capsule>)> {
    let mut groups: Vec<(&str, Vec<&Capsule>)> = Vec::new();
    for c in capsules {
        match groups.iter_mut().find(|(k, _)| *k == c.kind) {
            Some((_, g)) => g.push(c),
            None => groups.push((&c.kind, vec![c])),
        }
    }
    groups
}

/// Markdown: a `## kind` section per tool, each with one table. Columns that
/// would be empty for the whole section (p95/p99 of a few runs, params) are
/// left out.
pub fn markdown(capsules: &[Capsule]) -> String {
    let mut out = String::new();
    for (i, (kind, group)) in by_kind(capsules).into_iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("## {kind}\n\n"));
        if let Some(d) = kind_description(kind) {
            out.push_str(d);
            out.push_str("\n\n");
        }
        let rows = report_rows(&group.into_iter().cloned().collect::<Vec<_>>());
        if rows.is_empty() {
            out.push_str("(no rows)\n");
            continue;
        }
        let show_p95 = rows.iter().any(|r| percentile_meaningful(r.stats.n, 95.0));
        let show_p99 = rows.iter().any(|r| percentile_meaningful(r.stats.n, 99.0));
        let show_params = rows.iter().any(|r| !r.params.is_empty());
        let mut head = vec!["test", "metric"];
        let mut align = vec!["---", "---"];
        if show_params {
            head.push("params");
            align.push("---");
        }
        head.push("median");
        align.push("---:");
        if show_p95 {
            head.push("p95");
            align.push("---:");
        }
        if show_p99 {
            head.push("p99");
            align.push("---:");
        }
        head.extend([
            "min .. max",
            "n",
            "unit",
            "device",
            "hardware",
            "model",
            "commit",
            "command",
            "capsule",
        ]);
        align.extend(["---", "---:", "---", "---", "---", "---", "---", "---", "---"]);
        out.push_str(&format!("| {} |\n|{}|\n", head.join(" | "), align.join("|")));
        for r in &rows {
            let mut cells = vec![cell(&r.test), cell(&r.metric)];
            if show_params {
                cells.push(params_text(&r.params));
            }
            cells.push(num(r.stats.median));
            let pct = |p: f64, v: f64| {
                if percentile_meaningful(r.stats.n, p) {
                    num(v)
                } else {
                    "-".into()
                }
            };
            if show_p95 {
                cells.push(pct(95.0, r.stats.p95));
            }
            if show_p99 {
                cells.push(pct(99.0, r.stats.p99));
            }
            cells.extend([
                format!("{} .. {}", num(r.stats.min), num(r.stats.max)),
                r.stats.n.to_string(),
                cell(&r.unit),
                cell(&r.device),
                cell(&r.hardware),
                cell(&r.model),
                cell(&r.commit),
                format!("`{}`", cell(&r.command.replace('`', "'"))),
                cell(&r.capsule),
            ]);
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
    }
    out
}

/// A CSV field, quoted when it holds a separator, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV with a header line and every statistic at full precision.
pub fn csv(capsules: &[Capsule]) -> String {
    let mut out = String::from(
        "capsule,kind,test,metric,unit,better,n,mean,median,p95,p99,min,max,stddev,params,\
         device,hardware,model,commit,command\n",
    );
    for r in report_rows(capsules) {
        let s = &r.stats;
        let better = match r.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Neither => "neither",
        };
        let fields = [
            csv_field(&r.capsule),
            csv_field(&r.kind),
            csv_field(&r.test),
            csv_field(&r.metric),
            csv_field(&r.unit),
            better.to_string(),
            s.n.to_string(),
            s.mean.to_string(),
            s.median.to_string(),
            s.p95.to_string(),
            s.p99.to_string(),
            s.min.to_string(),
            s.max.to_string(),
            s.stddev.to_string(),
            csv_field(&params_text(&r.params)),
            csv_field(&r.device),
            csv_field(&r.hardware),
            csv_field(&r.model),
            csv_field(&r.commit),
            csv_field(&r.command),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// The JSON document: `{"rows": [ReportRow...]}` (raw samples stay in the capsules).
pub fn json(capsules: &[Capsule]) -> serde_json::Value {
    serde_json::json!({ "rows": report_rows(capsules) })
}
