//! `--self-test-throughput`: how many streamed tokens per second the client
//! itself can take in, on one core, so that a load test is known not to be
//! limited by its own client.
//!
//! A mock server on its own thread answers every request with the same
//! prebuilt SSE response (one HTTP chunk per token, in OpenAI's completion
//! chunk shape) without any delay: it costs little more than a socket write.
//! The client is the load generator's own (same request path, parser and
//! bookkeeping) on a single-threaded runtime on the calling thread, whose
//! CPU time is read around the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::client::{request_body, Client, Server};
use super::config::{Endpoint, Level};
use super::error::{Error, Result};
use super::runner::run_level;
use crate::rows::{Better, Row};

/// The shape of the self-test load.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SelfTestConfig {
    /// Concurrent streams (closed loop).
    pub streams: usize,
    pub requests: usize,
    pub tokens_per_request: usize,
}

impl Default for SelfTestConfig {
    fn default() -> Self {
        SelfTestConfig {
            streams: 8,
            requests: 96,
            tokens_per_request: 4096,
        }
    }
}

/// What the self-test measured.
#[derive(Clone, Debug, Serialize)]
pub struct SelfTestResult {
    pub config: SelfTestConfig,
    /// Chunks with generated text the client counted.
    pub tokens: u64,
    pub errors: usize,
    pub wall_s: f64,
    /// CPU time of the client's thread (None where the OS cannot say).
    pub client_cpu_s: Option<f64>,
    /// Tokens per second of wall time.
    pub tokens_per_s: f64,
    /// Tokens per second of client CPU time: the one-core capacity.
    pub tokens_per_cpu_s: Option<f64>,
}

impl SelfTestResult {
    /// The capsule's `result`.
    pub fn result_json(&self) -> Value {
        let params = |row: Row| {
            row.with_param("concurrency", self.config.streams as f64)
                .with_param("output_len", self.config.tokens_per_request as f64)
        };
        let mut rows = vec![params(Row::new(
            "self-test",
            "client_tok_s",
            "tok/s",
            Better::Higher,
            vec![self.tokens_per_s],
        ))];
        if let Some(c) = self.tokens_per_cpu_s {
            rows.push(params(Row::new(
                "self-test",
                "client_tok_per_cpu_s",
                "tok/s",
                Better::Higher,
                vec![c],
            )));
        }
        json!({
            "kind": "bench-serve",
            "mode": "self-test-throughput",
            "self_test": self,
            "rows": rows,
        })
    }
}

/// CPU time of the calling thread.
fn thread_cpu_s() -> Option<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass, which lives
    // on this stack frame for the whole call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// The one response every completion request gets: head, one chunk per
/// token, a finish chunk, a usage chunk, `[DONE]`.
fn mock_response(tokens: usize) -> Bytes {
    let mut body = Vec::new();
    let mut event = |data: &str| {
        let e = format!("data: {data}\n\n");
        body.extend_from_slice(format!("{:x}\r\n", e.len()).as_bytes());
        body.extend_from_slice(e.as_bytes());
        body.extend_from_slice(b"\r\n");
    };
    let head = r#"{"id":"cmpl-selftest","object":"text_completion","created":0,"model":"mock","choices":[{"index":0,"text":"#;
    for _ in 0..tokens {
        event(&format!(
            r#"{head}" word","logprobs":null,"finish_reason":null}}],"usage":null}}"#
        ));
    }
    event(&format!(
        r#"{head}"","logprobs":null,"finish_reason":"length"}}],"usage":null}}"#
    ));
    event(&format!(
        r#"{{"id":"cmpl-selftest","object":"text_completion","created":0,"model":"mock","choices":[],"usage":{{"prompt_tokens":8,"completion_tokens":{tokens},"total_tokens":{}}}}}"#,
        tokens + 8
    ));
    event("[DONE]");
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    out.extend_from_slice(&body);
    out.extend_from_slice(b"0\r\n\r\n");
    Bytes::from(out)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One keep-alive connection of the mock: read a request, write the answer.
async fn mock_connection(mut sock: TcpStream, stream: Bytes) {
    let mut buf = Vec::with_capacity(16 << 10);
    loop {
        let head_end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p;
            }
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        let total = head_end + 4 + content_length(&buf[..head_end]);
        while buf.len() < total {
            match sock.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        let answer = if buf.starts_with(b"GET /v1/models") {
            let body = r#"{"object":"list","data":[{"id":"mock","object":"model"}]}"#;
            Bytes::from(format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ))
        } else {
            stream.clone()
        };
        buf.drain(..total);
        if sock.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Starts the mock on its own thread; returns its base URL. The thread
/// ends with the process (the self-test is a one-shot command).
fn start_mock(tokens: usize) -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::Runtime)?;
    listener.set_nonblocking(true).map_err(Error::Runtime)?;
    let addr = listener.local_addr().map_err(Error::Runtime)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let response = mock_response(tokens);
    std::thread::Builder::new()
        .name("bench-serve-mock".into())
        .spawn(move || {
            runtime.block_on(async move {
                let Ok(listener) = TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((sock, _)) = listener.accept().await {
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(mock_connection(sock, response.clone()));
                }
            })
        })
        .map_err(Error::Runtime)?;
    Ok(format!("http://{addr}"))
}

/// Runs the self-test (a few seconds at most with the default shape).
pub fn self_test(cfg: SelfTestConfig) -> Result<SelfTestResult> {
    let url = start_mock(cfg.tokens_per_request)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let server =
        Arc::new(
            Server::new(&url, Endpoint::Completions, None).map_err(|reason| Error::BadUrl {
                option: "--self-test-throughput",
                url: url.clone(),
                reason,
            })?,
        );
    let body = request_body(
        Endpoint::Completions,
        "mock",
        "self test",
        cfg.tokens_per_request,
        true,
        None,
    );
    let bodies = Arc::new(vec![body; cfg.requests]);
    let client = Client::new();
    let cpu0 = thread_cpu_s();
    let t0 = Instant::now();
    let run = runtime.block_on(run_level(
        &client,
        &server,
        bodies,
        Level::Concurrency(cfg.streams),
        0,
        Duration::from_secs(120),
    ))?;
    let wall_s = t0.elapsed().as_secs_f64();
    let client_cpu_s = thread_cpu_s().zip(cpu0).map(|(b, a)| b - a);
    let tokens: u64 = run
        .records
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.chunks as u64)
        .sum();
    let errors = run.records.iter().filter(|r| !r.ok()).count();
    Ok(SelfTestResult {
        config: cfg,
        tokens,
        errors,
        wall_s,
        client_cpu_s,
        tokens_per_s: tokens as f64 / wall_s,
        tokens_per_cpu_s: client_cpu_s.filter(|c| *c > 0.0).map(|c| tokens as f64 / c),
    })
}
