//! Repro capsules: every benchmark run is written as one JSON document with
//! the machine, the exact command, the model (path, size, sha256, tensor
//! types), every raw number and the summary, so that a result can be traced
//! and compared later.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Summary statistics of a sample.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    pub n: usize,
    pub mean: f64,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub stddev: f64,
}

impl Stats {
    /// Percentiles by linear interpolation between closest ranks.
    pub fn of(v: &[f64]) -> Stats {
        let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n == 0 {
            return Stats {
                n,
                mean: 0.0,
                median: 0.0,
                p95: 0.0,
                p99: 0.0,
                min: 0.0,
                max: 0.0,
                stddev: 0.0,
            };
        }
        let pct = |p: f64| {
            let r = p / 100.0 * (n - 1) as f64;
            let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (r - lo as f64)
        };
        let mean = s.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Stats {
            n,
            mean,
            median: pct(50.0),
            p95: pct(95.0),
            p99: pct(99.0),
            min: s[0],
            max: s[n - 1],
            stddev: var.sqrt(),
        }
    }
}

fn read_first(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_string())
}

/// The machine: CPU model, cores, memory, OS; GPUs as nvidia-smi reports them.
pub fn hardware() -> Value {
    let gpus = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,driver_version,compute_cap",
            "--format=csv,noheader",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    json!({
        "cpu": read_first("/proc/cpuinfo", "model name"),
        "logical_cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": read_first("/proc/meminfo", "MemTotal"),
        "os": std::fs::read_to_string("/etc/os-release").ok().and_then(|t| t.lines().find(|l| l.starts_with("PRETTY_NAME=")).map(|l| l[12..].trim_matches('"').to_string())),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "gpus": gpus,
    })
}

/// The commit the binary was built from (see build.rs); a binary built
/// outside a checkout asks git in the working directory instead.
pub fn git_commit() -> Option<String> {
    if let Some(c) = option_env!("KESTREL_BUILD_COMMIT") {
        return Some(c.to_string());
    }
    let o = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Path, size, sha256 and tensor types of the model file.
pub fn model_info(path: &Path) -> Value {
    let sha = if path.is_file() {
        std::fs::File::open(path).ok().and_then(|mut f| {
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h).ok()?;
            Some(format!("{:x}", h.finalize()))
        })
    } else {
        None
    };
    let types = kestrel_formats::ModelFile::open(path).ok().map(|f| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        let infos = match &f {
            kestrel_formats::ModelFile::Gguf(g) => g.tensor_infos().to_vec(),
            kestrel_formats::ModelFile::Safetensors(s) => s.tensor_infos(),
        };
        for t in infos {
            *counts.entry(t.dtype.name().to_string()).or_default() += 1;
        }
        counts
    });
    json!({
        "path": path.display().to_string(),
        "bytes": std::fs::metadata(path).map(|m| m.len()).ok(),
        "sha256": sha,
        "tensor_types": types,
    })
}

/// The `KESTREL_*` variables of the run (tuning knobs change what a number
/// measures, and the command line does not show them), sorted by name.
fn tuning_env(vars: impl Iterator<Item = (String, String)>) -> std::collections::BTreeMap<String, String> {
    vars.filter(|(k, _)| k.starts_with("KESTREL_")).collect()
}

/// Wrap `result` with the run's provenance and write it; returns the path.
///
/// `model` is the local model file when there is one (a load test against a
/// remote server has none); `kind` names the tool in the default file name.
pub fn write(result: &Value, model: Option<&Path>, out: Option<&Path>, kind: &str) -> Result<PathBuf> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let capsule = json!({
        "capsule_version": 1,
        "kestrel_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git_commit(),
        "unix_time": now,
        "command": std::env::args().collect::<Vec<_>>(),
        "env": tuning_env(std::env::vars()),
        "hardware": hardware(),
        "model": model.map(model_info),
        "result": result,
    });
    let path = match out {
        Some(p) => p.to_path_buf(),
        None => {
            let dev = if result["device"].as_str().unwrap_or("").starts_with("cuda") {
                "cuda"
            } else {
                "cpu"
            };
            PathBuf::from("benchmarks").join(format!("{now}-{kind}-{dev}.json"))
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&capsule)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_env_keeps_only_kestrel_variables() {
        let vars = [
            ("PATH", "/bin"),
            ("KESTREL_L2", "1"),
            ("KESTREL_ATTN_KPS", "0"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let env = tuning_env(vars.into_iter());
        let got: Vec<_> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(got, ["KESTREL_ATTN_KPS=0", "KESTREL_L2=1"]);
    }

    #[test]
    fn stats_match_hand_computed_values() {
        let s = Stats::of(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(s.median, 3.0);
        assert_eq!(s.mean, 3.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert!((s.p95 - 4.8).abs() < 1e-12);
        assert!((s.stddev - 2.5f64.sqrt()).abs() < 1e-12);
        let one = Stats::of(&[7.0]);
        assert_eq!((one.median, one.p99, one.stddev), (7.0, 7.0, 0.0));
        assert_eq!(Stats::of(&[]).n, 0);
    }
}
