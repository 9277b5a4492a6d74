//! What to run: the servers, the load shape and the request contents, with
//! the parsers of the list-valued command-line options.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::{Error, Result};

/// Which OpenAI route the requests go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// POST /v1/completions with `prompt`.
    Completions,
    /// POST /v1/chat/completions with one user message.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// One server under test.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:8080` (a trailing `/` or `/v1` is
    /// accepted and dropped).
    pub url: String,
    /// The `model` sent; `None`: the first id of GET /v1/models.
    pub model: Option<String>,
    #[serde(skip)]
    pub api_key: Option<String>,
}

/// One load level of a sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Level {
    /// Closed loop: this many workers, each sending its next request when
    /// its previous one finishes.
    Concurrency(usize),
    /// Open loop: Poisson arrivals at this many requests per second
    /// (`f64::INFINITY`: every request at once).
    Rate(f64),
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Level::Concurrency(n) => write!(f, "c={n}"),
            Level::Rate(r) if r.is_infinite() => f.write_str("rate=inf"),
            Level::Rate(r) => write!(f, "rate={r}"),
        }
    }
}

/// Everything a run needs.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub baseline: Target,
    /// `--compare`: the candidate, measured against `baseline` (ratios are
    /// candidate / baseline).
    pub candidate: Option<Target>,
    pub levels: Vec<Level>,
    /// Measured requests per level (per server, per round).
    pub num_prompts: usize,
    /// Words of a synthetic prompt (about one token each).
    pub input_len: usize,
    /// `max_tokens` of every request.
    pub output_len: usize,
    /// JSONL prompts (`{"prompt": ...}` per line) instead of synthetic ones.
    pub prompts_file: Option<PathBuf>,
    pub ignore_eos: bool,
    /// `temperature` sent with every request (`None`: the server's default,
    /// which is 1.0 in OpenAI's API, i.e. sampling rather than greedy).
    pub temperature: Option<f32>,
    pub endpoint: Endpoint,
    /// Unmeasured requests sent to each server first.
    pub warmup: usize,
    pub seed: u64,
    /// Repetitions of every level (with `--compare`, each round runs both
    /// servers in a freshly shuffled order).
    pub rounds: usize,
    pub asserts: Vec<Threshold>,
    /// Worker threads of the client runtime (1: a single-threaded runtime).
    pub client_threads: usize,
    /// A request still running after this long is abandoned as an error.
    pub request_timeout: Duration,
    /// Print progress lines to stderr.
    pub progress: bool,
}

/// Parses `1,8,64` (`--concurrency`).
pub fn parse_concurrency(text: &str) -> Result<Vec<Level>> {
    let bad = |reason: String| Error::BadOption {
        option: "--concurrency",
        text: text.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        let n: usize = part.parse().map_err(|_| {
            bad(format!(
                "{part:?} is not a whole number; expected a list like 1,8,64"
            ))
        })?;
        if n == 0 {
            return Err(bad("a concurrency must be at least 1".into()));
        }
        out.push(Level::Concurrency(n));
    }
    Ok(out)
}

/// Parses `0.5,4,inf` (`--request-rate`, requests per second).
pub fn parse_rates(text: &str) -> Result<Vec<Level>> {
    let bad = |reason: String| Error::BadOption {
        option: "--request-rate",
        text: text.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        let r = if part.eq_ignore_ascii_case("inf") {
            f64::INFINITY
        } else {
            part.parse::<f64>()
                .ok()
                .filter(|r| r.is_finite())
                .ok_or_else(|| bad(format!("{part:?} is not a number; expected a list like 1,4,inf")))?
        };
        if r <= 0.0 {
            return Err(bad("a request rate must be above 0".into()));
        }
        out.push(Level::Rate(r));
    }
    Ok(out)
}

/// A comparison metric (candidate / baseline) a threshold can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RatioMetric {
    TtftP50Ratio,
    TpotP50Ratio,
    ItlP50Ratio,
    E2eP50Ratio,
    /// Output-token throughput.
    ThroughputRatio,
}

impl RatioMetric {
    pub const ALL: [RatioMetric; 5] = [
        RatioMetric::TtftP50Ratio,
        RatioMetric::TpotP50Ratio,
        RatioMetric::ItlP50Ratio,
        RatioMetric::E2eP50Ratio,
        RatioMetric::ThroughputRatio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RatioMetric::TtftP50Ratio => "ttft_p50_ratio",
            RatioMetric::TpotP50Ratio => "tpot_p50_ratio",
            RatioMetric::ItlP50Ratio => "itl_p50_ratio",
            RatioMetric::E2eP50Ratio => "e2e_p50_ratio",
            RatioMetric::ThroughputRatio => "throughput_ratio",
        }
    }
}

/// The comparison of a threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Le,
    Ge,
    Lt,
    Gt,
}

impl Op {
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Le => "<=",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Gt => ">",
        }
    }

    pub fn holds(self, value: f64, limit: f64) -> bool {
        match self {
            Op::Le => value <= limit,
            Op::Ge => value >= limit,
            Op::Lt => value < limit,
            Op::Gt => value > limit,
        }
    }
}

/// One `--assert` condition, checked at every level.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    pub metric: RatioMetric,
    pub op: Op,
    pub limit: f64,
}

impl fmt::Display for Threshold {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}{}{}", self.metric.name(), self.op.symbol(), self.limit)
    }
}

/// Parses `ttft_p50_ratio<=1.2,throughput_ratio>=0.9` (`--assert`).
pub fn parse_asserts(text: &str) -> Result<Vec<Threshold>> {
    let names: Vec<&str> = RatioMetric::ALL.iter().map(|m| m.name()).collect();
    let bad = |reason: String| Error::BadOption {
        option: "--assert",
        text: text.to_string(),
        reason,
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        // Two-character operators first, so `<=` is not read as `<`.
        let found = [Op::Le, Op::Ge, Op::Lt, Op::Gt].into_iter().find_map(|op| {
            part.split_once(op.symbol())
                .map(|(l, r)| (op, l.trim(), r.trim()))
        });
        let Some((op, name, limit)) = found else {
            return Err(bad(format!(
                "{part:?} has no <=, >=, < or >; expected e.g. ttft_p50_ratio<=1.2"
            )));
        };
        let metric = RatioMetric::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                bad(format!(
                    "unknown metric {name:?}; expected one of {}",
                    names.join(", ")
                ))
            })?;
        let limit: f64 = limit
            .parse()
            .ok()
            .filter(|l: &f64| l.is_finite())
            .ok_or_else(|| bad(format!("{limit:?} in {part:?} is not a number")))?;
        out.push(Threshold { metric, op, limit });
    }
    if out.is_empty() {
        return Err(bad("no condition given".into()));
    }
    Ok(out)
}

/// The base URL without a trailing `/` or `/v1`; only `http://` is spoken.
pub fn normalize_url(option: &'static str, url: &str) -> Result<String> {
    let bad = |reason: &str| Error::BadUrl {
        option,
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    if trimmed.starts_with("https://") {
        return Err(bad(
            "https is not supported (the client speaks plain HTTP/1.1); use an http:// URL",
        ));
    }
    let rest = trimmed
        .strip_prefix("http://")
        .ok_or_else(|| bad("expected a base URL like http://127.0.0.1:8080"))?;
    if rest.is_empty() {
        return Err(bad("the URL names no host"));
    }
    let parsed: std::result::Result<hyper::Uri, _> = trimmed.parse();
    parsed.map_err(|e| bad(&format!("not a valid URL ({e})")))?;
    Ok(trimmed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels_thresholds_and_urls() {
        assert_eq!(
            parse_concurrency("1, 8,64").unwrap(),
            vec![
                Level::Concurrency(1),
                Level::Concurrency(8),
                Level::Concurrency(64)
            ]
        );
        assert!(parse_concurrency("0").is_err());
        assert!(parse_concurrency("a").is_err());
        let r = parse_rates("0.5,inf").unwrap();
        assert_eq!(r[0], Level::Rate(0.5));
        assert_eq!(r[1].to_string(), "rate=inf");
        assert!(parse_rates("-1").is_err());
        let t = parse_asserts("ttft_p50_ratio<=1.2, throughput_ratio>0.9").unwrap();
        assert_eq!(
            t,
            vec![
                Threshold {
                    metric: RatioMetric::TtftP50Ratio,
                    op: Op::Le,
                    limit: 1.2
                },
                Threshold {
                    metric: RatioMetric::ThroughputRatio,
                    op: Op::Gt,
                    limit: 0.9
                }
            ]
        );
        assert_eq!(t[0].to_string(), "ttft_p50_ratio<=1.2");
        let e = parse_asserts("latency<=2").unwrap_err().to_string();
        assert!(e.contains("unknown metric \"latency\""), "{e}");
        assert!(parse_asserts("ttft_p50_ratio=1").is_err());
        assert_eq!(normalize_url("--url", "http://h:1/v1/").unwrap(), "http://h:1");
        assert!(normalize_url("--url", "https://h").is_err());
        assert!(normalize_url("--url", "h:80").is_err());
    }
}
