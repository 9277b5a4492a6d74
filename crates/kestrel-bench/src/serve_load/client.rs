//! The HTTP side: one hyper client (HTTP/1.1, pooled keep-alive connections)
//! and one streamed request measured from send to `[DONE]`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as Legacy;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::Serialize;
use serde_json::json;

use super::chunk;
use super::config::Endpoint;
use super::sse::SseParser;

/// Longest error body kept in a record.
const ERROR_SNIPPET: usize = 300;

/// How long the end of a body is awaited after `[DONE]`.
const DRAIN_AFTER_DONE: Duration = Duration::from_secs(1);

/// What one request measured. Times are milliseconds except `start_s`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RequestRecord {
    /// Position in the level's request list.
    pub index: usize,
    /// When it was sent, in seconds after the level started.
    pub start_s: f64,
    /// Send to the first chunk with generated text.
    pub ttft_ms: Option<f64>,
    /// Send to `[DONE]` (or to the end of the body when it broke off).
    pub e2e_ms: f64,
    /// Gaps between successive chunks with generated text.
    #[serde(skip)]
    pub itl_ms: Vec<f64>,
    /// Chunks with generated text.
    pub chunks: usize,
    /// The server's `usage.completion_tokens`, or `chunks` without usage.
    pub output_tokens: u64,
    /// The server's `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    pub usage_reported: bool,
    pub status: Option<u16>,
    /// Why the request failed (HTTP status, broken stream, timeout).
    pub error: Option<String>,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// Time per output token after the first: (e2e - ttft) / (tokens - 1).
    pub fn tpot_ms(&self) -> Option<f64> {
        let ttft = self.ttft_ms?;
        (self.output_tokens > 1).then(|| (self.e2e_ms - ttft) / (self.output_tokens - 1) as f64)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn snippet(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(ERROR_SNIPPET)]);
    s.trim().to_string()
}

/// One server's address and credentials, with its request URI prebuilt.
#[derive(Clone, Debug)]
pub struct Server {
    pub base: String,
    uri: Uri,
    auth: Option<HeaderValue>,
}

impl Server {
    pub fn new(base: &str, endpoint: Endpoint, api_key: Option<&str>) -> Result<Server, String> {
        let uri: Uri = format!("{base}{}", endpoint.path())
            .parse()
            .map_err(|e| format!("{base}: not a valid URL ({e})"))?;
        let auth = api_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .map_err(|_| "the API key holds characters an HTTP header cannot carry".to_string())?;
        Ok(Server {
            base: base.to_string(),
            uri,
            auth,
        })
    }
}

/// The JSON body of one streamed request.
pub fn request_body(
    endpoint: Endpoint,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    ignore_eos: bool,
    temperature: Option<f32>,
) -> Bytes {
    let mut body = match endpoint {
        Endpoint::Completions => json!({ "model": model, "prompt": prompt }),
        Endpoint::Chat => json!({
            "model": model,
            "messages": [{ "role": "user", "content": prompt }],
        }),
    };
    body["max_tokens"] = json!(max_tokens);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    if ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Some(t) = temperature {
        body["temperature"] = json!(t);
    }
    Bytes::from(body.to_string())
}

/// The pooled HTTP/1.1 client every request goes through.
#[derive(Clone)]
pub struct Client {
    http: Legacy<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    pub fn new() -> Client {
        let mut connector = HttpConnector::new();
        // Small request bodies and per-token responses: Nagle only adds delay.
        connector.set_nodelay(true);
        let http = Legacy::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .build(connector);
        Client { http }
    }

    /// The first model id of GET /v1/models.
    pub async fn first_model(&self, base: &str, api_key: Option<&str>) -> Result<String, String> {
        let (v, body) = self.get_json(base, "/v1/models", api_key).await?;
        v["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("expected {{\"data\": [{{\"id\": ...}}]}}, got {}", snippet(&body)))
    }

    /// What GET /health says about the server (kestrel names its build,
    /// model, device and settings there), for the capsule; `Null` where the
    /// server has no such route, answers something else than JSON or takes
    /// more than 5 s: the answer only labels the run.
    pub async fn health(&self, base: &str, api_key: Option<&str>) -> serde_json::Value {
        let ask = self.get_json(base, "/health", api_key);
        match tokio::time::timeout(std::time::Duration::from_secs(5), ask).await {
            Ok(Ok((v, _))) => v,
            _ => serde_json::Value::Null,
        }
    }

    /// GET `base` + `path` as JSON (and the raw body, for messages).
    async fn get_json(
        &self,
        base: &str,
        path: &str,
        api_key: Option<&str>,
    ) -> Result<(serde_json::Value, Bytes), String> {
        let uri: Uri = format!("{base}{path}")
            .parse()
            .map_err(|e| format!("not a valid URL ({e})"))?;
        let mut req = Request::builder().method(Method::GET).uri(uri);
        if let Some(k) = api_key {
            req = req.header(AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("building the request: {e}"))?;
        let resp = self.http.request(req).await.map_err(|e| format!("{e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}: {}", snippet(&body)));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON ({e})"))?;
        Ok((v, body))
    }

    /// Sends one streamed request and measures it; failures are recorded in
    /// the record, never returned.
    pub async fn measure(
        &self,
        server: &Server,
        body: Bytes,
        index: usize,
        level_start: Instant,
        timeout: Duration,
    ) -> RequestRecord {
        let sent = Instant::now();
        let mut rec = RequestRecord {
            index,
            start_s: sent.duration_since(level_start).as_secs_f64(),
            ..RequestRecord::default()
        };
        let mut stream = StreamState::default();
        let outcome = tokio::time::timeout(timeout, self.exchange(server, body, &mut rec, &mut stream)).await;
        let end = stream.done_at.unwrap_or_else(Instant::now);
        rec.e2e_ms = ms(end.duration_since(sent));
        rec.ttft_ms = stream.first.map(|t| ms(t.duration_since(sent)));
        rec.itl_ms = stream.itl;
        rec.chunks = stream.chunks;
        rec.usage_reported = stream.usage.is_some();
        rec.prompt_tokens = stream.usage.and_then(|u| u.prompt_tokens);
        rec.output_tokens = stream
            .usage
            .and_then(|u| u.completion_tokens)
            .unwrap_or(stream.chunks as u64);
        match outcome {
            Err(_) => rec.error = Some(format!("timed out after {:.0} s", timeout.as_secs_f64())),
            Ok(Err(e)) => rec.error = Some(e),
            Ok(Ok(())) => {}
        }
        rec
    }

    async fn exchange(
        &self,
        server: &Server,
        body: Bytes,
        rec: &mut RequestRecord,
        st: &mut StreamState,
    ) -> Result<(), String> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(server.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream");
        if let Some(a) = &server.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| format!("building the request: {e}"))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| format!("connection: {}", error_chain(&e)))?;
        let status = resp.status();
        rec.status = Some(status.as_u16());
        let mut body = resp.into_body();
        if !status.is_success() {
            let mut text = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Ok(d) = frame.into_data() {
                    text.extend_from_slice(&d);
                }
                if text.len() >= ERROR_SNIPPET {
                    break;
                }
            }
            return Err(format!("HTTP {}: {}", status.as_u16(), snippet(&text)));
        }
        let mut parser = SseParser::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the stream broke: {}", error_chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                parser.feed(&data, |event| st.on_event(event));
            }
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            if st.done_at.is_some() {
                // Read the body's end so the connection goes back to the
                // pool, but never wait long on a server that keeps it open.
                let drain = async { while let Some(Ok(_)) = body.frame().await {} };
                let _ = tokio::time::timeout(DRAIN_AFTER_DONE, drain).await;
                return Ok(());
            }
        }
        Err("the stream ended without data: [DONE]".into())
    }
}

/// The error and its causes on one line (hyper's own message is terse).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Per-request bookkeeping while the stream is read.
#[derive(Default)]
struct StreamState {
    first: Option<Instant>,
    last: Option<Instant>,
    itl: Vec<f64>,
    chunks: usize,
    usage: Option<chunk::Usage>,
    done_at: Option<Instant>,
    error: Option<String>,
}

impl StreamState {
    fn on_event(&mut self, data: &[u8]) {
        if self.done_at.is_some() || self.error.is_some() {
            return;
        }
        if data == b"[DONE]" {
            self.done_at = Some(Instant::now());
            return;
        }
        match chunk::parse(data) {
            Err(e) => self.error = Some(format!("malformed chunk ({e}): {}", snippet(data))),
            Ok(c) if c.error => self.error = Some(format!("error event: {}", snippet(data))),
            Ok(c) => {
                if c.content_bytes > 0 {
                    let now = Instant::now();
                    match self.last {
                        None => self.first = Some(now),
                        Some(prev) => self.itl.push(ms(now.duration_since(prev))),
                    }
                    self.last = Some(now);
                    self.chunks += 1;
                }
                if c.usage.is_some() {
                    self.usage = c.usage;
                }
            }
        }
    }
}
