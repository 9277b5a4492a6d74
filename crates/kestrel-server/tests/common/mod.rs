//! Test harness: the default model loaded once, servers started in-process
//! on 127.0.0.1:0, and a small HTTP/1.1 client over a raw TcpStream (so the
//! tests see exactly what goes over the wire: status lines, chunked SSE).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kestrel_engine::{Engine, EngineConfig};
use kestrel_server::{AppState, ServerOptions, DEFAULT_MAX_BODY_BYTES};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use kestrel_engine::test_util::default_model as fixture;

pub const MODEL_NAME: &str = "test-model";

pub fn engine_config(num_kv_blocks: usize, max_num_seqs: usize) -> EngineConfig {
    EngineConfig {
        num_kv_blocks,
        max_num_seqs,
        max_num_batched_tokens: 512,
        ..EngineConfig::default()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    force: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// What SIGINT does: stop accepting, let requests in flight finish.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// What a second signal does: abort what is still in flight.
    pub fn force(&mut self) {
        if let Some(s) = self.force.take() {
            let _ = s.send(());
        }
    }

    /// Waits for the server to return (after `stop`).
    pub async fn join(&mut self) -> std::io::Result<()> {
        match self.served.take() {
            Some(h) => h.await.expect("the server task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        self.force();
        self.state.engine.shutdown();
    }
}

/// A server on its own engine (the model is shared).
pub async fn start(cfg: EngineConfig, edit: impl FnOnce(&mut ServerOptions)) -> TestServer {
    let f = fixture();
    let engine = Engine::new(f.model.clone(), f.tok.clone(), cfg)
        .expect("engine")
        .spawn()
        .expect("engine thread");
    let mut options = ServerOptions {
        model_name: MODEL_NAME.into(),
        api_key: None,
        max_running: cfg.max_num_seqs,
        max_waiting: 256,
        max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        identity: serde_json::json!({ "name": "kestrel-test" }),
    };
    edit(&mut options);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let state = AppState::new(engine, f.tok.clone(), options);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (force_tx, force_rx) = oneshot::channel::<()>();
    // A dropped sender (the test ended) counts as the signal.
    let stop = async {
        let _ = stop_rx.await;
    };
    let force = async {
        let _ = force_rx.await;
    };
    let served = tokio::spawn(kestrel_server::serve_with_shutdown(
        listener,
        state.clone(),
        stop,
        force,
    ));
    TestServer {
        addr,
        state,
        stop: Some(stop_tx),
        force: Some(force_tx),
        served: Some(served),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One HTTP/1.1 exchange, read incrementally (for SSE) or whole.
pub struct Conn {
    s: TcpStream,
    raw: Vec<u8>,
    decoded: Vec<u8>,
    chunked: bool,
    eof: bool,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Conn {
    pub async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Conn {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        s.write_all(&req).await.expect("send request");
        let mut c = Conn {
            s,
            raw: Vec::new(),
            decoded: Vec::new(),
            chunked: false,
            eof: false,
            status: 0,
            headers: Vec::new(),
        };
        let end = loop {
            if let Some(p) = find(&c.raw, b"\r\n\r\n") {
                break p;
            }
            assert!(c.fill().await, "connection closed before the response head");
        };
        let head = String::from_utf8_lossy(&c.raw[..end]).into_owned();
        c.raw.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        c.status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                c.headers
                    .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        c.chunked = c
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        c
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        match self.s.read(&mut buf).await {
            Ok(0) | Err(_) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                true
            }
        }
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.decoded.append(&mut self.raw);
            return;
        }
        while let Some(line) = find(&self.raw, b"\r\n") {
            let size_text = String::from_utf8_lossy(&self.raw[..line]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            if self.raw.len() < line + 2 + size + 2 {
                return;
            }
            self.decoded
                .extend_from_slice(&self.raw[line + 2..line + 2 + size]);
            self.raw.drain(..line + 2 + size + 2);
        }
    }

    /// The next SSE event's data (comment lines skipped); None at the end.
    pub async fn next_event(&mut self) -> Option<String> {
        loop {
            self.decode();
            if let Some(p) = find(&self.decoded, b"\n\n") {
                let block: Vec<u8> = self.decoded.drain(..p + 2).collect();
                let text = String::from_utf8(block).expect("SSE is UTF-8");
                let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            if self.eof || !self.fill().await {
                return None;
            }
        }
    }

    pub async fn body(mut self) -> Vec<u8> {
        while self.fill().await {}
        self.decode();
        self.decoded
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let c = Conn::open(addr, method, path, headers, body).await;
    let (status, headers) = (c.status, c.headers.clone());
    Resp {
        status,
        headers,
        body: c.body().await,
    }
}

pub async fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &[], body.to_string().as_bytes()).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"").await
}

/// A whole SSE stream: each event's JSON, and whether `[DONE]` ended it.
pub async fn stream(addr: SocketAddr, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let mut c = Conn::open(addr, "POST", path, &[], body.to_string().as_bytes()).await;
    assert_eq!(c.status, 200, "stream status");
    assert!(
        c.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "content type {:?}",
        c.header("content-type")
    );
    let mut events = Vec::new();
    while let Some(data) = c.next_event().await {
        if data == "[DONE]" {
            assert!(c.next_event().await.is_none(), "nothing may follow [DONE]");
            return (events, true);
        }
        events.push(serde_json::from_str(&data).unwrap_or_else(|e| panic!("event {data:?}: {e}")));
    }
    (events, false)
}

/// Waits until the engine holds no sequence and no KV block and the server
/// no admission slot; returns the final /v1/cache/stats.
pub async fn wait_idle(addr: SocketAddr) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = get(addr, "/v1/cache/stats").await.json();
        let idle = s["kv_blocks_used"] == 0
            && s["running"] == 0
            && s["waiting"] == 0
            && s["sequences_in_flight"] == 0;
        if idle {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never became idle: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Conn {
    /// Sends a POST and returns without reading anything (the handler may
    /// still be generating).
    pub async fn open_no_wait(addr: SocketAddr, path: &str, body: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.expect("send head");
        s.write_all(body).await.expect("send body");
        s
    }
}
