//! Reading capsules into one shape: a capsule's provenance plus its
//! [`Row`]s. New capsules carry `result.rows` already; `kestrel bench`
//! capsules written before rows existed (`result.tests[]` with `tok_s` and
//! `summary`) are converted here so every capsule renders, compares and plots
//! the same way.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ReportError;
use crate::capsule::Stats;
use crate::rows::{Better, Row};

/// One capsule as the report sees it: who/where/what produced it, and its rows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capsule {
    /// File name of the capsule (how tables and legends refer to it).
    pub name: String,
    /// `result.kind`: the tool that wrote it ("bench", "bench-serve", ...).
    pub kind: String,
    /// `result.device` as the tool described it, or "-".
    pub device: String,
    /// GPUs when the machine had any, else the CPU and its thread count.
    pub hardware: String,
    /// File name of the model, or "-" when the capsule has none (a load test
    /// against a URL).
    pub model: String,
    /// First 10 hex digits of the commit, "?" when it was not recorded.
    pub commit: String,
    /// The command line, with the program path shortened to `kestrel`.
    pub command: String,
    pub unix_time: Option<u64>,
    pub rows: Vec<Row>,
}

impl Capsule {
    /// Read and convert the capsule at `path`.
    pub fn read(path: &Path) -> Result<Capsule, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ReportError::NotJson {
            path: path.to_path_buf(),
            source,
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Capsule::from_json(&name, &value)
    }

    /// Convert a parsed capsule; `name` is how errors and tables refer to it.
    pub fn from_json(name: &str, c: &Value) -> Result<Capsule, ReportError> {
        let result = c
            .get("result")
            .filter(|r| r.is_object())
            .ok_or_else(|| ReportError::Field {
                capsule: name.to_string(),
                field: "result".into(),
                expected: "an object",
            })?;
        let rows = if let Some(rows) = result.get("rows") {
            rows_of(name, rows)?
        } else if let Some(tests) = result.get("tests") {
            bench_tests_to_rows(name, tests)?
        } else {
            return Err(ReportError::Field {
                capsule: name.to_string(),
                field: "result.rows".into(),
                expected: "an array of rows (or result.tests of an older `kestrel bench` capsule)",
            });
        };
        // Capsules of `kestrel bench` predating `result.kind` only ever held `tests`.
        let kind = result["kind"].as_str().unwrap_or("bench").to_string();
        Ok(Capsule {
            name: name.to_string(),
            kind,
            device: result["device"].as_str().unwrap_or("-").to_string(),
            hardware: hardware_summary(&c["hardware"]),
            model: model_name(c),
            commit: c["git_commit"]
                .as_str()
                .map(|s| s.chars().take(10).collect())
                .unwrap_or_else(|| "?".into()),
            command: with_env(&c["env"], command_line(&c["command"])),
            unix_time: c["unix_time"].as_u64(),
            rows,
        })
    }

    /// The name without its `.json` extension, for legends and file names.
    pub fn label(&self) -> &str {
        self.name.strip_suffix(".json").unwrap_or(&self.name)
    }
}

fn rows_of(name: &str, rows: &Value) -> Result<Vec<Row>, ReportError> {
    let items = rows.as_array().ok_or_else(|| ReportError::Field {
        capsule: name.to_string(),
        field: "result.rows".into(),
        expected: "an array",
    })?;
    items
        .iter()
        .enumerate()
        .map(|(index, r)| {
            Row::deserialize(r).map_err(|source| ReportError::BadRow {
                capsule: name.to_string(),
                index,
                source,
            })
        })
        .collect()
}

/// The metric an old `bench` test measured: its name says prefill (`pp512`)
/// or decode (`tg128`); the names match what rows-writing tools use so an old
/// capsule joins a new one in a comparison.
fn bench_metric(test: &str) -> &'static str {
    if test.starts_with("pp") {
        "prefill_tok_s"
    } else if test.starts_with("tg") {
        "decode_tok_s"
    } else {
        "tok_s"
    }
}

/// `result.tests[]` of a `kestrel bench` capsule: one tokens-per-second row
/// per test, keeping the summary as it was written.
fn bench_tests_to_rows(name: &str, tests: &Value) -> Result<Vec<Row>, ReportError> {
    let field = |f: String, expected| ReportError::Field {
        capsule: name.to_string(),
        field: f,
        expected,
    };
    let items = tests
        .as_array()
        .ok_or_else(|| field("result.tests".into(), "an array"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let test = t["test"]
                .as_str()
                .ok_or_else(|| field(format!("result.tests[{i}].test"), "a string"))?;
            let raw: Vec<f64> = match t.get("tok_s") {
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| field(format!("result.tests[{i}].tok_s"), "an array of numbers"))?,
                None => Vec::new(),
            };
            let stats = match t.get("summary") {
                Some(s) => Stats::deserialize(s).map_err(|_| {
                    field(
                        format!("result.tests[{i}].summary"),
                        "statistics {n, mean, median, p95, p99, min, max, stddev}",
                    )
                })?,
                None if !raw.is_empty() => Stats::of(&raw),
                None => {
                    return Err(field(
                        format!("result.tests[{i}].summary"),
                        "present (or tok_s samples to summarise)",
                    ))
                }
            };
            let mut row = Row::new(test, bench_metric(test), "tok/s", Better::Higher, raw);
            row.stats = stats;
            Ok(row)
        })
        .collect()
}

/// GPUs ("NVIDIA H200, 143771 MiB", "2x ..." when several alike), else the
/// CPU with its thread count.
fn hardware_summary(hw: &Value) -> String {
    let mut gpus: Vec<(String, usize)> = Vec::new();
    for g in hw["gpus"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        // nvidia-smi's line is name, memory, driver, compute capability: the
        // first two say what the card is.
        let short = g.split(',').take(2).map(str::trim).collect::<Vec<_>>().join(", ");
        match gpus.iter_mut().find(|(n, _)| *n == short) {
            Some((_, count)) => *count += 1,
            None => gpus.push((short, 1)),
        }
    }
    if gpus.is_empty() {
        return format!(
            "{} ({} threads)",
            hw["cpu"].as_str().unwrap_or("?"),
            hw["logical_cores"].as_u64().unwrap_or(0)
        );
    }
    gpus.iter()
        .map(|(n, c)| if *c > 1 { format!("{c}x {n}") } else { n.clone() })
        .collect::<Vec<_>>()
        .join("; ")
}

fn model_name(c: &Value) -> String {
    if let Some(path) = c["model"]["path"].as_str() {
        return path.rsplit('/').next().unwrap_or(path).to_string();
    }
    // A load test against a server has no local file but may name the model.
    c["result"]["model"].as_str().unwrap_or("-").to_string()
}

/// The run's tuning variables (capsule field `env`, absent before it
/// existed) written before the command, as a shell would take them.
fn with_env(env: &Value, command: String) -> String {
    let Some(vars) = env.as_object() else {
        return command;
    };
    let mut parts: Vec<String> = vars
        .iter()
        .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={}", shell_word(v))))
        .collect();
    parts.push(command);
    parts.join(" ")
}

/// The command as one shell-like line: the program as `kestrel`, arguments
/// with spaces or quotes single-quoted so the line can be pasted back.
fn command_line(cmd: &Value) -> String {
    let Some(args) = cmd.as_array() else {
        return String::new();
    };
    args.iter()
        .filter_map(Value::as_str)
        .enumerate()
        .map(|(i, s)| {
            if i == 0 {
                "kestrel".to_string()
            } else {
                shell_word(s)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `s` as one shell word: single-quoted when it is empty or holds spaces,
/// quotes or shell metacharacters.
fn shell_word(s: &str) -> String {
    if s.is_empty()
        || s.chars()
            .any(|ch| ch.is_whitespace() || "'\"$`\\|;&<>*?".contains(ch))
    {
        format!("'{}'", s.replace('\'', r"'\''"))
    } else {
        s.to_string()
    }
}
