//! `kestrel report CAPSULE...`: render benchmark capsules as a Markdown
//! table (the source of RESULTS.md), or CSV / JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Markdown,
    Csv,
    Json,
}

#[derive(Args, Clone, Debug)]
pub struct ReportArgs {
    /// Capsule files written by `kestrel bench`.
    #[arg(required = true)]
    pub capsules: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "markdown")]
    pub format: Format,
}

/// One row of the report: a test of one capsule.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub capsule: String,
    pub device: String,
    pub hardware: String,
    pub model: String,
    pub test: String,
    pub median_tok_s: f64,
    pub min_tok_s: f64,
    pub max_tok_s: f64,
    pub runs: u64,
    pub command: String,
    pub commit: String,
}

/// The rows of one capsule (a `bench` capsule holds one row per test).
pub fn rows(name: &str, c: &Value) -> Vec<Row> {
    let hw = &c["hardware"];
    let gpus = hw["gpus"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "));
    let hardware = match gpus.filter(|g| !g.is_empty()) {
        Some(g) => g,
        None => format!(
            "{} ({} threads)",
            hw["cpu"].as_str().unwrap_or("?"),
            hw["logical_cores"].as_u64().unwrap_or(0)
        ),
    };
    let model = c["model"]["path"]
        .as_str()
        .unwrap_or("?")
        .rsplit('/')
        .next()
        .unwrap_or("?")
        .to_string();
    let command = c["command"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .enumerate()
                .map(|(i, s)| if i == 0 { "kestrel" } else { s })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let commit: String = c["git_commit"].as_str().unwrap_or("?").chars().take(10).collect();
    let r = &c["result"];
    r["tests"]
        .as_array()
        .map(|tests| {
            tests
                .iter()
                .map(|t| Row {
                    capsule: name.to_string(),
                    device: r["device"].as_str().unwrap_or("?").to_string(),
                    hardware: hardware.clone(),
                    model: model.clone(),
                    test: t["test"].as_str().unwrap_or("?").to_string(),
                    median_tok_s: t["summary"]["median"].as_f64().unwrap_or(0.0),
                    min_tok_s: t["summary"]["min"].as_f64().unwrap_or(0.0),
                    max_tok_s: t["summary"]["max"].as_f64().unwrap_or(0.0),
                    runs: t["summary"]["n"].as_u64().unwrap_or(0),
                    command: command.clone(),
                    commit: commit.clone(),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| test | tok/s (median) | min .. max | runs | device | hardware | model | commit | command | capsule |\n|---|---:|---|---:|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} .. {:.1} | {} | {} | {} | {} | {} | `{}` | {} |\n",
            r.test,
            r.median_tok_s,
            r.min_tok_s,
            r.max_tok_s,
            r.runs,
            r.device,
            r.hardware,
            r.model,
            r.commit,
            r.command,
            r.capsule
        ));
    }
    s
}

pub fn main(a: ReportArgs) -> Result<()> {
    let mut all = Vec::new();
    for p in &a.capsules {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let c: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not a JSON capsule", p.display()))?;
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        all.extend(rows(&name, &c));
    }
    match a.format {
        Format::Markdown => print!("{}", markdown(&all)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&all)?),
        Format::Csv => {
            println!("capsule,test,median_tok_s,min_tok_s,max_tok_s,runs,device,hardware,model,commit");
            for r in &all {
                println!(
                    "{},{},{:.3},{:.3},{:.3},{},\"{}\",\"{}\",{},{}",
                    r.capsule,
                    r.test,
                    r.median_tok_s,
                    r.min_tok_s,
                    r.max_tok_s,
                    r.runs,
                    r.device,
                    r.hardware,
                    r.model,
                    r.commit
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn capsule_rows_render() {
        let c = json!({
            "git_commit": "0123456789abcdef",
            "command": ["/x/kestrel", "bench", "--device", "cpu"],
            "hardware": {"cpu": "Xeon", "logical_cores": 2, "gpus": []},
            "model": {"path": "/m/gemma.gguf"},
            "result": {"device": "cpu (avx2)", "tests": [
                {"test": "pp512", "summary": {"median": 400.0, "min": 390.0, "max": 410.0, "n": 3}},
                {"test": "tg128", "summary": {"median": 50.5, "min": 49.0, "max": 51.0, "n": 3}}
            ]}
        });
        let r = rows("a.json", &c);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].test, "tg128");
        assert_eq!(r[1].median_tok_s, 50.5);
        assert_eq!(r[0].hardware, "Xeon (2 threads)");
        assert_eq!(r[0].commit, "0123456789");
        let md = markdown(&r);
        assert!(
            md.contains("| pp512 | 400.0 | 390.0 .. 410.0 | 3 | cpu (avx2) |"),
            "{md}"
        );
        assert!(md.contains("`kestrel bench --device cpu`"), "{md}");
    }
}
