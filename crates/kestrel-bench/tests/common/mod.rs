//! An in-process OpenAI-style mock server with known timing: the first
//! token `ttft` after the request arrives, then one every `itl`; every
//! `fail_every`-th request gets HTTP 500, every `truncate_every`-th stream
//! breaks off before `[DONE]`.

#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use kestrel_bench::serve_load::{Endpoint, Level, LoadConfig, Target};
use serde_json::{json, Value};

pub const MOCK_MODEL: &str = "mock-model";

#[derive(Clone, Copy, Debug)]
pub struct MockSpec {
    pub ttft: Duration,
    pub itl: Duration,
    pub tokens: usize,
    /// Every n-th request (1-based) fails with 500; 0: none.
    pub fail_every: usize,
    /// Every n-th request (1-based, unless it failed) streams its tokens
    /// but ends without usage and `[DONE]`; 0: none.
    pub truncate_every: usize,
}

pub struct Mock {
    pub spec: MockSpec,
    pub count: AtomicUsize,
    /// Every request body received, parsed.
    pub bodies: Mutex<Vec<Value>>,
}

pub struct MockServer {
    pub url: String,
    pub mock: Arc<Mock>,
}

async fn models() -> Json<Value> {
    Json(json!({ "object": "list", "data": [{ "id": MOCK_MODEL, "object": "model" }] }))
}

async fn completions(State(m): State<Arc<Mock>>, body: Bytes) -> Response {
    let n = m.count.fetch_add(1, Ordering::SeqCst) + 1;
    if let Ok(mut b) = m.bodies.lock() {
        b.push(serde_json::from_slice(&body).unwrap_or(Value::Null));
    }
    let spec = m.spec;
    if spec.fail_every > 0 && n % spec.fail_every == 0 {
        let err = json!({ "error": { "message": "mock failure", "type": "server_error" } });
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(err)).into_response();
    }
    let truncate = spec.truncate_every > 0 && n % spec.truncate_every == 0;
    let start = tokio::time::Instant::now();
    // Absolute deadlines, so timer lateness does not accumulate.
    let events = futures_util::stream::unfold(0usize, move |i| async move {
        let data = if i < spec.tokens {
            tokio::time::sleep_until(start + spec.ttft + spec.itl * i as u32).await;
            format!("data: {{\"choices\":[{{\"index\":0,\"text\":\" t{i}\",\"finish_reason\":null}}],\"usage\":null}}\n\n")
        } else if truncate {
            return None;
        } else if i == spec.tokens {
            format!(
                "data: {{\"choices\":[{{\"index\":0,\"text\":\"\",\"finish_reason\":\"length\"}}],\"usage\":null}}\n\n\
                 data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\n",
                spec.tokens,
                spec.tokens + 7
            )
        } else if i == spec.tokens + 1 {
            "data: [DONE]\n\n".to_string()
        } else {
            return None;
        };
        Some((Ok::<_, Infallible>(Bytes::from(data)), i + 1))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(events))
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}

/// Starts a mock on its own thread and runtime (it lives until the test
/// process ends).
pub fn start(spec: MockSpec) -> MockServer {
    let mock = Arc::new(Mock {
        spec,
        count: AtomicUsize::new(0),
        bodies: Mutex::new(Vec::new()),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the mock");
    listener.set_nonblocking(true).expect("non-blocking listener");
    let url = format!("http://{}", listener.local_addr().expect("mock address"));
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .with_state(mock.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("mock runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("mock listener");
            // Without TCP_NODELAY a chunk written while the previous one is
            // unacknowledged waits for the client's delayed ACK (up to 40 ms),
            // which would blur the timing the tests check.
            let l = l.tap_io(|s| {
                let _ = s.set_nodelay(true);
            });
            axum::serve(l, app).await.expect("mock server");
        });
    });
    MockServer { url, mock }
}

/// A small run against `url`.
pub fn config(url: &str, level: Level, num_prompts: usize) -> LoadConfig {
    LoadConfig {
        baseline: Target {
            url: url.to_string(),
            model: None,
            api_key: None,
        },
        candidate: None,
        levels: vec![level],
        num_prompts,
        input_len: 12,
        output_len: 16,
        prompts_file: None,
        ignore_eos: true,
        temperature: Some(0.0),
        endpoint: Endpoint::Completions,
        warmup: 0,
        seed: 0,
        rounds: 1,
        asserts: Vec::new(),
        client_threads: 1,
        request_timeout: Duration::from_secs(30),
        progress: false,
    }
}
