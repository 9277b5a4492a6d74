//! Turning an [`Outcome`] into summaries, candidate/baseline ratios,
//! threshold checks, the human table, capsule rows and the JSON result.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{json, Value};

use super::config::{Level, RatioMetric};
use super::error::{Error, Result};
use super::run::{Outcome, Role};
use super::summary::{LevelSummary, RoundRates, Samples};
use crate::rows::{Better, Row};

/// One round of one level on one server.
#[derive(Clone, Debug, Serialize)]
pub struct RoundInfo {
    pub round: usize,
    /// Place in the round's shuffled order (0: ran first).
    pub position: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_throughput: f64,
    pub errors: usize,
}

/// One level on one server, pooled over rounds.
#[derive(Clone, Debug, Serialize)]
pub struct LevelReport {
    #[serde(skip)]
    pub level: Level,
    pub label: String,
    pub role: Role,
    pub url: String,
    pub model: String,
    pub summary: LevelSummary,
    pub rounds: Vec<RoundInfo>,
    #[serde(skip)]
    pub samples: Samples,
}

/// A candidate / baseline ratio of one metric at one level.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub metric: RatioMetric,
    pub unit: &'static str,
    pub baseline: f64,
    pub candidate: f64,
    /// None when the baseline value is 0 (nothing measured).
    pub ratio: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub label: String,
    pub ratios: Vec<Ratio>,
}

/// One `--assert` threshold at one level.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub threshold: String,
    pub level: String,
    pub ratio: Option<f64>,
    pub baseline: f64,
    pub candidate: f64,
    pub unit: &'static str,
    pub passed: bool,
}

/// Everything derived from an outcome.
#[derive(Clone, Debug)]
pub struct Report {
    pub levels: Vec<LevelReport>,
    pub comparisons: Vec<Comparison>,
    pub checks: Vec<Check>,
}

fn metric_value(s: &LevelSummary, m: RatioMetric) -> (f64, &'static str) {
    match m {
        RatioMetric::TtftP50Ratio => (s.ttft_ms.median, "ms"),
        RatioMetric::TpotP50Ratio => (s.tpot_ms.median, "ms"),
        RatioMetric::ItlP50Ratio => (s.itl_ms.median, "ms"),
        RatioMetric::E2eP50Ratio => (s.e2e_ms.median, "ms"),
        RatioMetric::ThroughputRatio => (s.output_throughput, "tok/s"),
    }
}

fn level_params(level: Level) -> Vec<(&'static str, f64)> {
    match level {
        Level::Concurrency(n) => vec![("concurrency", n as f64)],
        // JSON has no infinity: an all-at-once level carries no rate.
        Level::Rate(r) if r.is_finite() => vec![("request_rate", r)],
        Level::Rate(_) => Vec::new(),
    }
}

fn level_json(level: Level) -> Value {
    match level {
        Level::Concurrency(n) => json!({ "label": level.to_string(), "concurrency": n }),
        Level::Rate(r) if r.is_finite() => json!({ "label": level.to_string(), "request_rate": r }),
        Level::Rate(_) => json!({ "label": level.to_string(), "request_rate": "inf" }),
    }
}

impl Report {
    pub fn of(o: &Outcome) -> Report {
        let mut levels = Vec::new();
        for (li, &level) in o.config.levels.iter().enumerate() {
            for (ti, t) in o.targets.iter().enumerate() {
                let runs: Vec<_> = o
                    .runs
                    .iter()
                    .filter(|m| m.level_index == li && m.target == ti)
                    .collect();
                let lr: Vec<_> = runs.iter().map(|m| &m.run).collect();
                let rounds = runs
                    .iter()
                    .map(|m| {
                        let r = RoundRates::of(&m.run);
                        RoundInfo {
                            round: m.round,
                            position: m.position,
                            duration_s: m.run.duration_s,
                            request_throughput: r.request_throughput,
                            output_throughput: r.output_throughput,
                            total_throughput: r.total_throughput,
                            errors: r.errors,
                        }
                    })
                    .collect();
                levels.push(LevelReport {
                    level,
                    label: level.to_string(),
                    role: t.role,
                    url: t.url.clone(),
                    model: t.model.clone(),
                    summary: LevelSummary::of(&lr),
                    rounds,
                    samples: Samples::of(lr.iter().flat_map(|r| r.records.iter())),
                });
            }
        }
        let mut comparisons = Vec::new();
        let mut checks = Vec::new();
        if o.targets.len() == 2 {
            for pair in levels.chunks(2) {
                let (base, cand) = (&pair[0].summary, &pair[1].summary);
                let ratios: Vec<Ratio> = RatioMetric::ALL
                    .into_iter()
                    .map(|m| {
                        let (b, unit) = metric_value(base, m);
                        let (c, _) = metric_value(cand, m);
                        let ratio = (b > 0.0 && c.is_finite()).then(|| c / b);
                        Ratio {
                            metric: m,
                            unit,
                            baseline: b,
                            candidate: c,
                            ratio,
                        }
                    })
                    .collect();
                for t in &o.config.asserts {
                    if let Some(r) = ratios.iter().find(|r| r.metric == t.metric) {
                        checks.push(Check {
                            threshold: t.to_string(),
                            level: pair[0].label.clone(),
                            ratio: r.ratio,
                            baseline: r.baseline,
                            candidate: r.candidate,
                            unit: r.unit,
                            passed: r.ratio.is_some_and(|v| t.op.holds(v, t.limit)),
                        });
                    }
                }
                comparisons.push(Comparison {
                    label: pair[0].label.clone(),
                    ratios,
                });
            }
        }
        Report {
            levels,
            comparisons,
            checks,
        }
    }

    /// One line per missed threshold, naming it and both measured values.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| {
                let ratio = c
                    .ratio
                    .map_or("not computable".to_string(), |r| format!("{r:.3}"));
                format!(
                    "threshold {} missed at {}: ratio {ratio} = candidate {:.3} {} / baseline {:.3} {}",
                    c.threshold, c.level, c.candidate, c.unit, c.baseline, c.unit
                )
            })
            .collect()
    }

    /// Err naming every missed `--assert` threshold.
    pub fn assert_thresholds(&self) -> Result<()> {
        let f = self.failures();
        if f.is_empty() {
            Ok(())
        } else {
            Err(Error::AssertMissed(f))
        }
    }

    /// The human-readable tables.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for l in &self.levels {
            let m = &l.summary;
            let _ = writeln!(
                s,
                "== {} | {} {} (model {}) ==",
                l.label,
                l.role.name(),
                l.url,
                l.model
            );
            let _ = writeln!(
                s,
                "requests {} ok, {} errors in {:.2} s | {:.2} req/s | output {:.1} tok/s | total {:.1} tok/s | prompt {} tok, output {} tok",
                m.succeeded,
                m.errors,
                m.duration_s,
                m.request_throughput,
                m.output_throughput,
                m.total_throughput,
                m.prompt_tokens,
                m.output_tokens
            );
            let _ = writeln!(
                s,
                "{:<9}{:>10}{:>10}{:>10}{:>10}",
                "ms", "mean", "p50", "p95", "p99"
            );
            for (name, st) in [
                ("TTFT", &m.ttft_ms),
                ("TPOT", &m.tpot_ms),
                ("ITL", &m.itl_ms),
                ("E2E", &m.e2e_ms),
            ] {
                let _ = writeln!(
                    s,
                    "{name:<9}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
                    st.mean, st.median, st.p95, st.p99
                );
            }
            for e in &m.error_examples {
                let _ = writeln!(s, "error: {e}");
            }
            s.push('\n');
        }
        if !self.comparisons.is_empty() {
            let _ = writeln!(
                s,
                "candidate / baseline (candidate = --compare, baseline = --url)"
            );
            let _ = writeln!(
                s,
                "{:<12}{:>28}{:>28}{:>32}",
                "level", "TTFT p50 ms", "TPOT p50 ms", "output tok/s"
            );
            for c in &self.comparisons {
                let cell = |m: RatioMetric| {
                    c.ratios
                        .iter()
                        .find(|r| r.metric == m)
                        .map_or(String::new(), |r| {
                            let ratio = r.ratio.map_or("-".to_string(), |v| format!("{v:.3}"));
                            format!("{ratio} ({:.2}/{:.2})", r.candidate, r.baseline)
                        })
                };
                let _ = writeln!(
                    s,
                    "{:<12}{:>28}{:>28}{:>32}",
                    c.label,
                    cell(RatioMetric::TtftP50Ratio),
                    cell(RatioMetric::TpotP50Ratio),
                    cell(RatioMetric::ThroughputRatio)
                );
            }
        }
        for c in &self.checks {
            let ratio = c.ratio.map_or("-".to_string(), |v| format!("{v:.3}"));
            let verdict = if c.passed { "ok" } else { "MISSED" };
            let _ = writeln!(s, "assert {} at {}: {ratio} {verdict}", c.threshold, c.level);
        }
        s
    }

    /// One row per (level, server, metric) with every raw sample; with two
    /// servers, ratio rows per level too.
    pub fn rows(&self, o: &Outcome) -> Vec<Row> {
        let cfg = &o.config;
        let compare = o.targets.len() == 2;
        let mut rows = Vec::new();
        let with_params = |mut row: Row, level: Level| {
            for (k, v) in level_params(level) {
                row = row.with_param(k, v);
            }
            row.with_param("input_len", cfg.input_len as f64)
                .with_param("output_len", cfg.output_len as f64)
        };
        for l in &self.levels {
            let test = if compare {
                format!("{} {}", l.label, l.role.name())
            } else {
                l.label.clone()
            };
            let per_round = |f: fn(&RoundInfo) -> f64| l.rounds.iter().map(f).collect::<Vec<f64>>();
            let s = &l.samples;
            let metrics: Vec<(&str, &str, Better, Vec<f64>)> = vec![
                ("ttft_ms", "ms", Better::Lower, s.ttft_ms.clone()),
                ("tpot_ms", "ms", Better::Lower, s.tpot_ms.clone()),
                ("itl_ms", "ms", Better::Lower, s.itl_ms.clone()),
                ("e2e_ms", "ms", Better::Lower, s.e2e_ms.clone()),
                (
                    "output_tokens",
                    "tokens",
                    Better::Neither,
                    s.output_tokens.clone(),
                ),
                (
                    "prompt_tokens",
                    "tokens",
                    Better::Neither,
                    s.prompt_tokens.clone(),
                ),
                (
                    "request_throughput",
                    "req/s",
                    Better::Higher,
                    per_round(|r| r.request_throughput),
                ),
                (
                    "output_throughput",
                    "tok/s",
                    Better::Higher,
                    per_round(|r| r.output_throughput),
                ),
                (
                    "total_throughput",
                    "tok/s",
                    Better::Higher,
                    per_round(|r| r.total_throughput),
                ),
                (
                    "errors",
                    "requests",
                    Better::Lower,
                    per_round(|r| r.errors as f64),
                ),
            ];
            for (metric, unit, better, raw) in metrics {
                let mut row = with_params(Row::new(&test, metric, unit, better, raw), l.level);
                if compare {
                    row = row.with_param("candidate", f64::from(u8::from(l.role == Role::Candidate)));
                }
                rows.push(row);
            }
        }
        for (c, pair) in self.comparisons.iter().zip(self.levels.chunks(2)) {
            for r in &c.ratios {
                let better = match r.metric {
                    RatioMetric::ThroughputRatio => Better::Higher,
                    _ => Better::Lower,
                };
                let raw: Vec<f64> = r.ratio.into_iter().collect();
                rows.push(with_params(
                    Row::new(&c.label, r.metric.name(), "x", better, raw),
                    pair[0].level,
                ));
            }
        }
        rows
    }

    /// The capsule's `result` (and the `--json` document).
    pub fn result_json(&self, o: &Outcome) -> Value {
        let cfg = &o.config;
        let requests: Vec<Value> = o
            .runs
            .iter()
            .flat_map(|m| {
                let role = o.targets[m.target].role;
                m.run.records.iter().map(move |r| {
                    let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                    v["role"] = json!(role);
                    v["level"] = json!(m.level.to_string());
                    v["round"] = json!(m.round);
                    v
                })
            })
            .collect();
        let levels: Vec<Value> = self
            .levels
            .iter()
            .map(|l| {
                let mut v = serde_json::to_value(l).unwrap_or(Value::Null);
                v["level"] = level_json(l.level);
                v
            })
            .collect();
        let candidate = o.targets.iter().find(|t| t.role == Role::Candidate);
        json!({
            "kind": "bench-serve",
            "mode": "load",
            "baseline": o.targets.first(),
            "candidate": candidate,
            "ratios": "candidate / baseline (candidate = --compare, baseline = --url)",
            "options": {
                "endpoint": cfg.endpoint,
                "levels": cfg.levels.iter().map(|l| level_json(*l)).collect::<Vec<_>>(),
                "num_prompts": cfg.num_prompts,
                "input_len": cfg.input_len,
                "output_len": cfg.output_len,
                "prompts_file": cfg.prompts_file.as_ref().map(|p| p.display().to_string()),
                "ignore_eos": cfg.ignore_eos,
                "temperature": cfg.temperature,
                "warmup": cfg.warmup,
                "seed": cfg.seed,
                "rounds": cfg.rounds,
                "asserts": cfg.asserts.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "client_threads": cfg.client_threads,
                "request_timeout_s": cfg.request_timeout.as_secs_f64(),
                "baseline": cfg.baseline,
                "candidate": cfg.candidate,
                "api_key_sent": {
                    "baseline": cfg.baseline.api_key.is_some(),
                    "candidate": cfg.candidate.as_ref().is_some_and(|c| c.api_key.is_some()),
                },
            },
            "warmup": o.warmup,
            "levels": levels,
            "comparisons": self.comparisons,
            "asserts": self.checks,
            "rows": self.rows(o),
            "requests": requests,
        })
    }
}
