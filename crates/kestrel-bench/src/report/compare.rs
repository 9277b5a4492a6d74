//! Two capsules side by side: rows joined on (test, metric), the candidate's
//! median over the baseline's, and a verdict per row.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::load::Capsule;
use super::render::{cell, num, params_text};
use crate::rows::{Better, Row};

/// Changes smaller than this (in percent) are called neutral by default:
/// run-to-run noise of a quiet machine is about this size.
pub const DEFAULT_THRESHOLD_PCT: f64 = 2.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Better,
    Worse,
    /// Within the threshold.
    Neutral,
    /// Beyond the threshold on a metric that is neither better nor worse
    /// when it moves (a count, a size).
    Changed,
    /// The two sides measured the metric in different units.
    Incomparable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Better => "better",
            Verdict::Worse => "worse",
            Verdict::Neutral => "neutral",
            Verdict::Changed => "changed",
            Verdict::Incomparable => "incomparable",
        }
    }
}

/// Where a capsule came from, without its rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Side {
    pub capsule: String,
    pub kind: String,
    pub device: String,
    pub hardware: String,
    pub model: String,
    pub commit: String,
    pub command: String,
}

impl Side {
    fn of(c: &Capsule) -> Side {
        Side {
            capsule: c.name.clone(),
            kind: c.kind.clone(),
            device: c.device.clone(),
            hardware: c.hardware.clone(),
            model: c.model.clone(),
            commit: c.commit.clone(),
            command: c.command.clone(),
        }
    }
}

/// One joined row: medians of both sides and what the change means.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompareRow {
    pub test: String,
    pub metric: String,
    pub unit: String,
    pub better: Better,
    pub baseline: f64,
    pub candidate: f64,
    pub baseline_n: usize,
    pub candidate_n: usize,
    /// candidate / baseline; absent when the baseline is 0 (or units differ).
    pub ratio: Option<f64>,
    /// (ratio - 1) * 100.
    pub change_pct: Option<f64>,
    pub verdict: Verdict,
}

/// A row only one side has.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unmatched {
    pub test: String,
    pub metric: String,
    pub params: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub better: usize,
    pub worse: usize,
    pub neutral: usize,
    pub changed: usize,
    pub incomparable: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub baseline: Side,
    pub candidate: Side,
    pub threshold_pct: f64,
    pub rows: Vec<CompareRow>,
    pub only_in_baseline: Vec<Unmatched>,
    pub only_in_candidate: Vec<Unmatched>,
    pub tally: Tally,
}

/// Ratio, percent change and verdict of a candidate median against a baseline.
pub fn judge(
    better: Better,
    baseline: f64,
    candidate: f64,
    threshold_pct: f64,
) -> (Option<f64>, Option<f64>, Verdict) {
    let (ratio, change) = if baseline != 0.0 {
        let r = candidate / baseline;
        (Some(r), Some((r - 1.0) * 100.0))
    } else {
        (None, None)
    };
    let neutral = match change {
        Some(c) => c.abs() < threshold_pct,
        // From zero any move is unbounded in percent; only no move is neutral.
        None => candidate == 0.0,
    };
    let verdict = if neutral {
        Verdict::Neutral
    } else {
        let up = candidate > baseline;
        match better {
            Better::Higher if up => Verdict::Better,
            Better::Lower if !up => Verdict::Better,
            Better::Higher | Better::Lower => Verdict::Worse,
            Better::Neither => Verdict::Changed,
        }
    };
    (ratio, change, verdict)
}

/// (test, metric, k): the k-th row of that test and metric in its capsule,
/// so a capsule repeating a (test, metric) pairs its repeats in order.
type Key = (String, String, usize);

fn keyed(rows: &[Row]) -> Vec<(Key, &Row)> {
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    rows.iter()
        .map(|r| {
            let k = seen.entry((&r.test, &r.metric)).or_insert(0);
            let key = (r.test.clone(), r.metric.clone(), *k);
            *k += 1;
            (key, r)
        })
        .collect()
}

fn unmatched(r: &Row) -> Unmatched {
    Unmatched {
        test: r.test.clone(),
        metric: r.metric.clone(),
        params: params_text(&r.params),
    }
}

/// Compare `candidate` against `baseline` on the medians of matching rows.
pub fn compare(baseline: &Capsule, candidate: &Capsule, threshold_pct: f64) -> Comparison {
    let base = keyed(&baseline.rows);
    let cand = keyed(&candidate.rows);
    let cand_index: HashMap<&Key, &Row> = cand.iter().map(|(k, r)| (k, *r)).collect();
    let mut rows = Vec::new();
    let mut only_in_baseline = Vec::new();
    let mut tally = Tally::default();
    for (key, b) in &base {
        let Some(c) = cand_index.get(key) else {
            only_in_baseline.push(unmatched(b));
            continue;
        };
        let (ratio, change_pct, verdict) = if b.unit != c.unit {
            (None, None, Verdict::Incomparable)
        } else {
            judge(b.better, b.stats.median, c.stats.median, threshold_pct)
        };
        match verdict {
            Verdict::Better => tally.better += 1,
            Verdict::Worse => tally.worse += 1,
            Verdict::Neutral => tally.neutral += 1,
            Verdict::Changed => tally.changed += 1,
            Verdict::Incomparable => tally.incomparable += 1,
        }
        rows.push(CompareRow {
            test: b.test.clone(),
            metric: b.metric.clone(),
            unit: if b.unit == c.unit {
                b.unit.clone()
            } else {
                format!("{} vs {}", b.unit, c.unit)
            },
            better: b.better,
            baseline: b.stats.median,
            candidate: c.stats.median,
            baseline_n: b.stats.n,
            candidate_n: c.stats.n,
            ratio,
            change_pct,
            verdict,
        });
    }
    let base_keys: std::collections::HashSet<&Key> = base.iter().map(|(k, _)| k).collect();
    let only_in_candidate = cand
        .iter()
        .filter(|(k, _)| !base_keys.contains(k))
        .map(|(_, r)| unmatched(r))
        .collect();
    Comparison {
        baseline: Side::of(baseline),
        candidate: Side::of(candidate),
        threshold_pct,
        rows,
        only_in_baseline,
        only_in_candidate,
        tally,
    }
}

fn side_line(role: &str, s: &Side) -> String {
    format!(
        "- **{role}**: {} ({}; {}; {}; model {}; commit {}) `{}`\n",
        cell(&s.capsule),
        cell(&s.kind),
        cell(&s.device),
        cell(&s.hardware),
        cell(&s.model),
        cell(&s.commit),
        cell(&s.command.replace('`', "'"))
    )
}

fn unmatched_list(title: &str, rows: &[Unmatched]) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let mut s = format!("\n{title}:\n\n");
    for u in rows {
        let params = if u.params.is_empty() {
            String::new()
        } else {
            format!(" ({})", u.params)
        };
        s.push_str(&format!("- {} / {}{params}\n", cell(&u.test), cell(&u.metric)));
    }
    s
}

/// Markdown: both sides' provenance, the joined table, then the rows only
/// one side has.
pub fn markdown(c: &Comparison) -> String {
    let mut s = String::from("## Comparison\n\n");
    s.push_str(&side_line("baseline", &c.baseline));
    s.push_str(&side_line("candidate", &c.candidate));
    let t = &c.tally;
    s.push_str(&format!(
        "\nMedians; changes under {}% are neutral. {} better, {} worse, {} neutral",
        c.threshold_pct, t.better, t.worse, t.neutral
    ));
    if t.changed > 0 {
        s.push_str(&format!(", {} changed", t.changed));
    }
    if t.incomparable > 0 {
        s.push_str(&format!(", {} in different units", t.incomparable));
    }
    s.push_str(".\n\n");
    if !c.rows.is_empty() {
        s.push_str(
            "| test | metric | baseline | candidate | unit | ratio | change | verdict |\n\
             |---|---|---:|---:|---|---:|---:|---|\n",
        );
        for r in &c.rows {
            let ratio = r.ratio.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
            let change = r
                .change_pct
                .map(|x| format!("{x:+.1}%"))
                .unwrap_or_else(|| "-".into());
            let verdict = match r.verdict {
                Verdict::Better => "**better**",
                Verdict::Worse => "**worse**",
                v => v.as_str(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {ratio} | {change} | {verdict} |\n",
                cell(&r.test),
                cell(&r.metric),
                num(r.baseline),
                num(r.candidate),
                cell(&r.unit)
            ));
        }
    }
    s.push_str(&unmatched_list("Only in the baseline", &c.only_in_baseline));
    s.push_str(&unmatched_list("Only in the candidate", &c.only_in_candidate));
    s
}

/// CSV of the joined rows (the unmatched ones with empty numbers and a
/// verdict of `only-baseline` / `only-candidate`).
pub fn csv(c: &Comparison) -> String {
    let mut s = String::from("test,metric,unit,baseline,candidate,ratio,change_pct,verdict\n");
    let q = |x: &str| {
        if x.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", x.replace('"', "\"\""))
        } else {
            x.to_string()
        }
    };
    let opt = |x: Option<f64>| x.map(|v| v.to_string()).unwrap_or_default();
    for r in &c.rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            q(&r.test),
            q(&r.metric),
            q(&r.unit),
            r.baseline,
            r.candidate,
            opt(r.ratio),
            opt(r.change_pct),
            r.verdict.as_str()
        ));
    }
    for (side, list) in [
        ("only-baseline", &c.only_in_baseline),
        ("only-candidate", &c.only_in_candidate),
    ] {
        for u in list {
            s.push_str(&format!("{},{},,,,,,{side}\n", q(&u.test), q(&u.metric)));
        }
    }
    s
}
