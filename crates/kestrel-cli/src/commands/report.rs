//! `kestrel report CAPSULE...`: render capsules of any tool as one table
//! (Markdown, the body of RESULTS.md; CSV; JSON), compare two capsules with
//! `--compare`, and draw SVG charts with `--plot DIR`. The work is in
//! `kestrel_bench::report`; this file is the command line.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use kestrel_bench::report::{compare, plot, render, Capsule, ReportError, DEFAULT_THRESHOLD_PCT};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[value(name = "md", alias = "markdown")]
    Markdown,
    Csv,
    Json,
}

#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    /// Capsule files written by kestrel's tools (bench, bench-serve, validate,
    /// microbench, bench-detok).
    #[arg(required = true)]
    pub capsules: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "md")]
    pub format: Format,
    /// Same as `--format json`: one JSON document on stdout.
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Compare exactly two capsules, baseline first then candidate: rows
    /// joined on (test, metric), ratio of medians and a verdict per row.
    /// Never implied, so that the shape of the output does not depend on
    /// how many capsules a glob happens to match.
    #[arg(long)]
    pub compare: bool,
    /// Percent change below which a compared row is "neutral".
    #[arg(long, default_value_t = DEFAULT_THRESHOLD_PCT, value_name = "PCT")]
    pub threshold: f64,
    /// Write SVG charts here: throughput against concurrency (rows with a
    /// `concurrency` param) and the distribution of each latency metric.
    /// The file names go to stderr (and into the JSON document).
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}

pub fn main(a: ReportArgs) -> Result<()> {
    let format = if a.json { Format::Json } else { a.format };
    if !a.threshold.is_finite() || a.threshold < 0.0 {
        return Err(ReportError::Threshold { got: a.threshold }.into());
    }
    if a.compare && a.capsules.len() != 2 {
        return Err(ReportError::CompareCount {
            got: a.capsules.len(),
        }
        .into());
    }
    let capsules = a
        .capsules
        .iter()
        .map(|p| Capsule::read(p))
        .collect::<Result<Vec<_>, _>>()?;

    let plots = match &a.plot {
        Some(dir) => {
            let written = plot::write_plots(&capsules, dir)?;
            if written.is_empty() {
                eprintln!("no plots: no row has a concurrency param or latency samples");
            }
            for p in &written {
                eprintln!("wrote {}", p.display());
            }
            Some(written)
        }
        None => None,
    };

    let comparison = match capsules.as_slice() {
        [base, cand] if a.compare => {
            if base.kind != cand.kind {
                eprintln!(
                    "note: comparing a {} capsule with a {} capsule; only rows with the same test and metric are joined",
                    base.kind, cand.kind
                );
            }
            Some(compare::compare(base, cand, a.threshold))
        }
        _ => None,
    };

    match format {
        Format::Markdown => match &comparison {
            Some(c) => print!("{}", compare::markdown(c)),
            None => print!("{}", render::markdown(&capsules)),
        },
        Format::Csv => match &comparison {
            Some(c) => print!("{}", compare::csv(c)),
            None => print!("{}", render::csv(&capsules)),
        },
        Format::Json => {
            let mut doc: Value = match &comparison {
                Some(c) => json!({ "comparison": c }),
                None => render::json(&capsules),
            };
            if let (Some(written), Some(obj)) = (&plots, doc.as_object_mut()) {
                let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                obj.insert("plots".into(), json!(names));
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
    }
    Ok(())
}
