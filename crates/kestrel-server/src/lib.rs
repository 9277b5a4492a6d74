//! OpenAI-compatible HTTP server over the kestrel engine.
//!
//! [`router`] builds the axum application over an [`AppState`] (an engine
//! handle, the tokenizer and [`ServerOptions`]); [`serve`] runs it on a
//! listener until a shutdown future resolves. `kestrel serve` wires these to
//! the command line; the tests run them in-process.
//!
//! Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming
//! over SSE or not), GET /v1/models, GET /health, GET /metrics (Prometheus),
//! GET /v1/cache/stats, DELETE /v1/cache, POST /tokenize, POST /detokenize.
//!
//! Completions with `echo` and `logprobs` score the prompt as OpenAI's
//! legacy API does (the first token `null`, then each token given those
//! before it, with `top_logprobs` and `text_offset`); `max_tokens: 0` with
//! `echo` scores the prompt alone. Without `max_tokens`, a completion stops
//! at 16 tokens (OpenAI's default) and a chat completion fills the context.
//!
//! [`serve_with_shutdown`] bounds the drain on shutdown: after the stop
//! signal the requests in flight finish, unless a second one aborts them.
//!
//! Errors are OpenAI-shaped JSON, `{"error": {"message", "type", "param",
//! "code"}}`:
//!
//! | status | type                    | when                                              |
//! |--------|-------------------------|---------------------------------------------------|
//! | 400    | invalid_request_error   | malformed JSON, wrong types, out-of-range values, prompt + max_tokens over the context |
//! | 401    | authentication_error    | missing or wrong API key (code `invalid_api_key`)  |
//! | 404    | not_found_error         | unknown model (code `model_not_found`) or route    |
//! | 405    | invalid_request_error   | wrong method on a known route                      |
//! | 413    | invalid_request_error   | body over the limit (code `request_too_large`)     |
//! | 500    | server_error            | the engine failed on a valid request               |
//! | 503    | overloaded_error        | queue full (code `server_overloaded`) or shutting down |

pub mod admission;
pub mod error;
pub mod generate;
pub mod metrics;
pub mod params;
pub mod protocol;
pub mod render;
pub mod routes;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use kestrel_engine::EngineHandle;
use kestrel_tokenizer::Tokenizer;

pub use error::ApiError;
pub use routes::router;

/// Default request body limit: far above any prompt the context can hold,
/// far below what could hurt the server.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The name clients use in `model` (and /v1/models lists).
    pub model_name: String,
    /// When set, every /v1 route and /tokenize, /detokenize need
    /// `Authorization: Bearer <key>`; /health and /metrics stay open.
    pub api_key: Option<String>,
    /// The engine's `max_num_seqs`: sequences that run at once.
    pub max_running: usize,
    /// Sequences admitted beyond `max_running` (they wait in the engine);
    /// more get 503.
    pub max_waiting: usize,
    pub max_body_bytes: usize,
    /// What GET /health reports about this server under `"server"` (its
    /// build, model, device and settings), so that a benchmark's capsule
    /// can name the server it measured; `Value::Null`: nothing.
    pub identity: serde_json::Value,
}

/// Everything the handlers share.
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub options: ServerOptions,
    pub metrics: metrics::Metrics,
    /// Sequences admitted and not yet finished (see [`admission`]).
    pub in_flight: Arc<AtomicUsize>,
    next_id: AtomicU64,
    /// Server start (Unix seconds): the `created` of the model entry.
    pub started_at: u64,
}

impl AppState {
    pub fn new(engine: EngineHandle, tokenizer: Arc<Tokenizer>, options: ServerOptions) -> Arc<AppState> {
        Arc::new(AppState {
            engine,
            tokenizer,
            options,
            metrics: metrics::Metrics::default(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(1),
            started_at: unix_now(),
        })
    }

    /// A response id, unique for this server's life.
    pub fn response_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.started_at)
    }

    /// Most sequences admitted at once.
    pub fn capacity(&self) -> usize {
        self.options.max_running.saturating_add(self.options.max_waiting)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves `state` on `listener` until `shutdown` resolves, then waits for
/// open connections to finish (graceful shutdown).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Streams are many small writes: without TCP_NODELAY, Nagle's algorithm
    // holds a chunk back until the client's delayed ACK (up to ~40 ms),
    // which shows up directly in TTFT and inter-token latency.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("could not set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Like [`serve`], with a bound on the drain: once `stop` resolves, no new
/// connection is accepted and requests in flight go on; if `force` then
/// resolves too (a second signal, a grace period), the engine is shut
/// down, which ends every remaining stream with an error event and
/// `[DONE]` (and fails every waiting plain request with a 503), so the
/// server returns soon after. `force` is not polled before `stop` resolves.
pub async fn serve_with_shutdown(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    stop: impl Future<Output = ()> + Send + 'static,
    force: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let graceful = async move {
        stop.await;
        tracing::info!("shutting down: no new connections, finishing the requests in flight");
        let _ = stopped_tx.send(());
    };
    let engine = state.engine.clone();
    let forcer = tokio::spawn(async move {
        if stopped_rx.await.is_err() {
            return; // the server ended without a stop
        }
        force.await;
        tracing::warn!("shutting down now: aborting the requests still in flight");
        // `shutdown` joins the engine thread: keep it off the async workers.
        if let Err(e) = tokio::task::spawn_blocking(move || engine.shutdown()).await {
            tracing::error!("stopping the engine failed: {e}");
        }
    });
    let served = serve(listener, state, graceful).await;
    forcer.abort();
    served
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
