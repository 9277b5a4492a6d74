//! Which charts a set of capsules yields, and writing them as SVG files:
//! throughput against concurrency (sweeps), and the empirical CDF of each
//! latency metric's raw samples; one series per capsule so that two servers
//! or two versions overlay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::ReportError;
use super::load::Capsule;
use super::render::params_text;
use super::svg::{render, Chart, Scale, Series};
use crate::rows::{Better, Row};

/// The param that makes a row part of a concurrency sweep.
pub const CONCURRENCY: &str = "concurrency";

/// The unit of the request latencies charted as distributions (ttft, tpot,
/// itl, e2e); kernel and tokenizer timings in ns/us are tables' business.
const LATENCY_UNIT: &str = "ms";

/// Fewer samples than this draw a staircase that says nothing the table's
/// median and min..max do not (a `bench` capsule's 3 to 5 runs).
const MIN_CDF_SAMPLES: usize = 10;

/// A CDF of more samples than this is drawn through this many quantiles:
/// the curve looks the same and the file stays small.
const CDF_POINTS: usize = 400;

/// A chart and the file name it is written under.
#[derive(Clone, Debug, PartialEq)]
pub struct Plot {
    pub file_name: String,
    pub chart: Chart,
}

/// `s` reduced to characters safe in a file name.
fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Items in order of first appearance, without repeats.
fn first_seen<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The row's params other than `skip`, for telling apart series of one
/// capsule (e.g. two input lengths swept over the same concurrencies).
fn other_params(r: &Row, skip: &str) -> String {
    let mut p: BTreeMap<String, f64> = r.params.clone();
    p.remove(skip);
    params_text(&p)
}

fn series_label(capsule: &Capsule, extra: &str) -> String {
    if extra.is_empty() {
        capsule.label().to_string()
    } else {
        format!("{} ({extra})", capsule.label())
    }
}

/// One chart per higher-is-better metric that has rows with a
/// `concurrency` param: median against concurrency, a line per capsule.
pub fn throughput_plots(capsules: &[Capsule]) -> Vec<Plot> {
    let swept = |r: &Row| r.better == Better::Higher && r.params.contains_key(CONCURRENCY);
    let metrics = first_seen(
        capsules
            .iter()
            .flat_map(|c| c.rows.iter())
            .filter(|r| swept(r))
            .map(|r| (r.metric.clone(), r.unit.clone())),
    );
    metrics
        .into_iter()
        .map(|(metric, unit)| {
            let mut series = Vec::new();
            for c in capsules {
                let rows: Vec<&Row> = c
                    .rows
                    .iter()
                    .filter(|r| swept(r) && r.metric == metric && r.unit == unit)
                    .collect();
                for extra in first_seen(rows.iter().map(|r| other_params(r, CONCURRENCY))) {
                    let mut points: Vec<(f64, f64)> = rows
                        .iter()
                        .filter(|r| other_params(r, CONCURRENCY) == extra)
                        .filter_map(|r| r.params.get(CONCURRENCY).map(|x| (*x, r.stats.median)))
                        .collect();
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    series.push(Series {
                        label: series_label(c, &extra),
                        points,
                    });
                }
            }
            let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
            let (lo, hi) = xs.fold((f64::INFINITY, 0f64), |(a, b), x| (a.min(x), b.max(x)));
            // A sweep of powers of two reads best on a log axis; a short or
            // zero-based one does not.
            let x_scale = if lo > 0.0 && hi / lo >= 4.0 {
                Scale::Log2
            } else {
                Scale::Linear
            };
            Plot {
                file_name: format!("{}-vs-concurrency.svg", file_safe(&metric)),
                chart: Chart {
                    title: format!("{metric} against concurrency"),
                    x_label: "concurrency (requests in flight)".into(),
                    y_label: format!("{metric} ({unit}), median"),
                    x_scale,
                    markers: true,
                    series,
                },
            }
        })
        .collect()
}

/// Points of the empirical CDF of `raw`: a step at every sample, or the
/// curve through `CDF_POINTS` quantiles when there are more samples.
pub fn ecdf_points(raw: &[f64]) -> Vec<(f64, f64)> {
    let mut s: Vec<f64> = raw.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return Vec::new();
    }
    if n <= CDF_POINTS {
        let mut pts = Vec::with_capacity(2 * n);
        for (i, &x) in s.iter().enumerate() {
            pts.push((x, i as f64 / n as f64));
            pts.push((x, (i + 1) as f64 / n as f64));
        }
        return pts;
    }
    (0..=CDF_POINTS)
        .map(|k| {
            let i = ((k as f64 / CDF_POINTS as f64) * (n - 1) as f64).round() as usize;
            (s[i], (i + 1) as f64 / n as f64)
        })
        .collect()
}

/// One chart per (test, metric) of a latency (lower-is-better, in ms, with
/// at least `MIN_CDF_SAMPLES` raw samples): the CDF of its samples, a curve
/// per capsule.
pub fn latency_plots(capsules: &[Capsule]) -> Vec<Plot> {
    let latency =
        |r: &Row| r.better == Better::Lower && r.unit == LATENCY_UNIT && r.raw.len() >= MIN_CDF_SAMPLES;
    let keys = first_seen(
        capsules
            .iter()
            .flat_map(|c| c.rows.iter())
            .filter(|r| latency(r))
            .map(|r| (r.test.clone(), r.metric.clone(), r.unit.clone())),
    );
    keys.into_iter()
        .map(|(test, metric, unit)| {
            let mut series = Vec::new();
            for c in capsules {
                let rows = c
                    .rows
                    .iter()
                    .filter(|r| latency(r) && r.test == test && r.metric == metric && r.unit == unit);
                for (k, r) in rows.enumerate() {
                    // A capsule repeating this test and metric gets a curve per repeat.
                    let extra = if k == 0 {
                        String::new()
                    } else {
                        format!("#{}", k + 1)
                    };
                    series.push(Series {
                        label: series_label(c, &extra),
                        points: ecdf_points(&r.raw),
                    });
                }
            }
            Plot {
                file_name: format!("cdf-{}-{}.svg", file_safe(&metric), file_safe(&test)),
                chart: Chart {
                    title: format!("{metric}, {test}: empirical CDF"),
                    x_label: format!("{metric} ({unit})"),
                    y_label: "fraction of samples at or below".into(),
                    x_scale: Scale::Linear,
                    markers: false,
                    series,
                },
            }
        })
        .collect()
}

/// Every chart the capsules have data for, with distinct file names.
pub fn plots(capsules: &[Capsule]) -> Vec<Plot> {
    let mut all = throughput_plots(capsules);
    all.extend(latency_plots(capsules));
    // Distinct tests can map to one file name ("c=64" and "c_64"): number repeats.
    let mut taken: Vec<String> = Vec::new();
    for p in &mut all {
        let stem = p.file_name.trim_end_matches(".svg").to_string();
        let mut k = 2;
        while taken.contains(&p.file_name) {
            p.file_name = format!("{stem}-{k}.svg");
            k += 1;
        }
        taken.push(p.file_name.clone());
    }
    all
}

/// Write every chart under `dir` (created when there is at least one);
/// returns the paths written.
pub fn write_plots(capsules: &[Capsule], dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    let all = plots(capsules);
    if all.is_empty() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).map_err(|source| ReportError::WritePlot {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for p in all {
        let path = dir.join(&p.file_name);
        std::fs::write(&path, render(&p.chart)).map_err(|source| ReportError::WritePlot {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}
