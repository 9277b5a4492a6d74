//! The HTTP routes and their handlers.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use kestrel_engine::RequestOptions;
use kestrel_tokenizer::ChatMessage;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::generate::{self, Echo, StreamSpec};
use crate::params::{self, check_model};
use crate::protocol::{
    ChatRequest, CompletionRequest, Content, DetokenizeRequest, MessageIn, PromptField, TokenizeRequest,
};
use crate::render::{self, EchoedPrompt, Endpoint, Header};
use crate::{unix_now, AppState};

type Shared = State<Arc<AppState>>;

/// `max_tokens` of a completion that gives none (OpenAI's legacy default).
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

/// The application: every route, auth on the API routes, the body limit,
/// and per-status request counting around everything.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_by_id))
        .route("/v1/cache/stats", get(cache_stats))
        .route("/v1/cache", delete(cache_clear))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.options.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_status))
        .with_state(state)
}

async fn count_status(State(state): Shared, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    state.metrics.record_status(resp.status().as_u16());
    resp
}

async fn auth(State(state): Shared, req: Request, next: Next) -> Response {
    let Some(key) = &state.options.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => ApiError::unauthorized("missing API key: send the header `Authorization: Bearer <key>`")
            .into_response(),
        // Constant time in the key's content, so timing reveals nothing of it.
        Some(g) if bool::from(g.trim().as_bytes().ct_eq(key.as_bytes())) => next.run(req).await,
        Some(_) => ApiError::unauthorized("the API key is wrong").into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// Reads a JSON body: 413 over the limit, 400 for anything malformed.
fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(limit)
        } else {
            ApiError::invalid(format!("could not read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            ApiError::invalid(format!("invalid request: {e}"))
        } else {
            ApiError::invalid(format!("the body is not valid JSON: {e}"))
        }
    })
}

fn non_negative(name: &str, value: i64, expected: &str) -> Result<usize, ApiError> {
    usize::try_from(value)
        .map_err(|_| ApiError::invalid_param(name, format!("`{name}` is {value}, expected {expected}")))
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

fn chat_messages(messages: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` is empty, expected at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid_param(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "content part of type `{}` is not supported: this server \
                                         serves text models, expected {{\"type\": \"text\", \"text\": ...}}",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(m.role.clone(), content))
        })
        .collect()
}

fn chat_prompt(
    state: &AppState,
    messages: &[MessageIn],
    add_generation_prompt: bool,
) -> Result<Vec<u32>, ApiError> {
    let msgs = chat_messages(messages)?;
    let tok = &state.tokenizer;
    let text = tok
        .apply_chat_template(&msgs, add_generation_prompt)
        .map_err(|e| {
            ApiError::invalid_param(
                "messages",
                format!("the chat template rejected the messages: {e}"),
            )
        })?;
    tok.encode_chat_prompt(&text)
        .map_err(|e| ApiError::invalid_param("messages", format!("could not tokenize the messages: {e}")))
}

fn header(state: &AppState, prefix: &str) -> Header {
    Header {
        id: state.response_id(prefix),
        created: unix_now(),
        model: state.options.model_name.clone(),
    }
}

fn sse(state: Arc<AppState>, launch: generate::Launch, spec: StreamSpec) -> Response {
    Sse::new(generate::sse_stream(state, launch, spec))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn chat(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    respond(chat_inner(state, body).await)
}

async fn chat_inner(state: Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: ChatRequest = parse_json(body, state.options.max_body_bytes)?;
    check_model(req.common.model.as_deref(), &state.options.model_name)?;
    let top = match req.top_logprobs {
        Some(v) => non_negative("top_logprobs", v, "an integer in [0, 20]")?,
        None => 0,
    };
    if top > kestrel_engine::sampling::MAX_LOGPROBS {
        return Err(ApiError::invalid_param(
            "top_logprobs",
            format!("`top_logprobs` is {top}, expected an integer in [0, 20]"),
        ));
    }
    let logprobs = match req.logprobs {
        Some(true) => Some(top),
        _ if top > 0 => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        _ => None,
    };
    let r = params::parse(
        &req.common,
        req.max_completion_tokens.or(req.common.max_tokens),
        logprobs,
    )?;
    let ids = chat_prompt(&state, &req.messages, true)?;
    let p = params::fit(&r, ids.len(), state.engine.max_model_len())?;
    let launch = generate::launch(&state, vec![(ids, p)], r.n, RequestOptions::default(), started)?;
    let header = header(&state, "chatcmpl");
    if r.stream {
        let spec = StreamSpec {
            endpoint: Endpoint::Chat,
            header,
            include_usage: r.include_usage,
            logprobs: logprobs.is_some(),
            echo: Vec::new(),
        };
        return Ok(sse(state, launch, spec));
    }
    let (results, prompt_lens) = generate::collect(&state, launch).await?;
    let tok = &state.tokenizer;
    let per_choice: Vec<_> = results
        .iter()
        .map(|c| (c.prompt_index, c.usage, c.tokens.len()))
        .collect();
    let choices: Vec<Value> = results
        .iter()
        .map(|c| {
            json!({
                "index": c.index,
                "message": { "role": "assistant", "content": c.text },
                "logprobs": if logprobs.is_some() { render::chat_logprobs(tok, &c.tokens) } else { Value::Null },
                "finish_reason": c.finish.map(render::finish_reason),
            })
        })
        .collect();
    let mut body = header.object("chat.completion", choices);
    body["usage"] = render::usage(render::totals(&prompt_lens, &per_choice));
    Ok(Json(body).into_response())
}

/// A token-id prompt, checked against the vocabulary.
fn id_prompt(state: &AppState, ids: &[i64]) -> Result<Vec<u32>, ApiError> {
    let vocab = state.tokenizer.vocab_size();
    ids.iter()
        .enumerate()
        .map(|(i, &id)| {
            u32::try_from(id)
                .ok()
                .filter(|&t| (t as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "prompt",
                        format!("prompt token {i} is {id}, expected a token id in [0, {vocab})"),
                    )
                })
        })
        .collect()
}

async fn completions(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    respond(completions_inner(state, body).await)
}

async fn completions_inner(
    state: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let req: CompletionRequest = parse_json(body, state.options.max_body_bytes)?;
    check_model(req.common.model.as_deref(), &state.options.model_name)?;
    let echo = req.echo.unwrap_or(false);
    let logprobs = req
        .logprobs
        .map(|v| non_negative("logprobs", v, "an integer in [0, 20]"))
        .transpose()?;
    // `max_tokens: 0` asks for no completion, which only makes sense as a
    // way to score the prompt (`echo`, usually with `logprobs`).
    let score_only = req.common.max_tokens == Some(0);
    if score_only && !echo {
        return Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` is 0, expected an integer >= 1 (0 is allowed only with `echo: true`, to score the prompt)",
        ));
    }
    // The engine generates at least one token; a scoring request drops it.
    let max_tokens = if score_only {
        Some(1)
    } else {
        req.common.max_tokens
    };
    let mut r = params::parse(&req.common, max_tokens, logprobs)?;
    r.default_max_tokens = Some(COMPLETIONS_DEFAULT_MAX_TOKENS);
    let tok = &state.tokenizer;
    let encode = |text: &str| {
        tok.encode(text, tok.add_bos_default())
            .map_err(|e| ApiError::invalid_param("prompt", format!("could not tokenize the prompt: {e}")))
    };
    let prompts: Vec<(Vec<u32>, Option<String>)> = match &req.prompt {
        PromptField::Text(s) => vec![(encode(s)?, Some(s.clone()))],
        PromptField::Texts(v) => v
            .iter()
            .map(|s| Ok((encode(s)?, Some(s.clone()))))
            .collect::<Result<_, ApiError>>()?,
        PromptField::Ids(ids) => vec![(id_prompt(&state, ids)?, None)],
        PromptField::IdLists(lists) => lists
            .iter()
            .map(|ids| Ok((id_prompt(&state, ids)?, None)))
            .collect::<Result<_, ApiError>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param("prompt", "`prompt` is an empty list"));
    }
    let max_len = state.engine.max_model_len();
    let mut echoes = Vec::new();
    let mut inputs = Vec::with_capacity(prompts.len());
    for (ids, text) in prompts {
        let p = params::fit(&r, ids.len(), max_len)?;
        if echo {
            let text = match text {
                Some(t) => t,
                None => tok.decode(&ids).map_err(|e| {
                    ApiError::invalid_param("prompt", format!("could not decode the prompt: {e}"))
                })?,
            };
            echoes.push(Echo {
                text,
                ids: ids.clone(),
            });
        }
        inputs.push((ids, p));
    }
    // Echoed prompts with logprobs carry the prompt's own scores.
    let opts = RequestOptions {
        prompt_logprobs: logprobs.filter(|_| echo),
    };
    let mut launch = generate::launch(&state, inputs, r.n, opts, started)?;
    launch.score_only = score_only;
    let header = header(&state, "cmpl");
    if r.stream {
        let spec = StreamSpec {
            endpoint: Endpoint::Completion,
            header,
            include_usage: r.include_usage,
            logprobs: logprobs.is_some(),
            echo: echoes,
        };
        return Ok(sse(state, launch, spec));
    }
    let (results, prompt_lens) = generate::collect(&state, launch).await?;
    let per_choice: Vec<_> = results
        .iter()
        .map(|c| (c.prompt_index, c.usage, c.tokens.len()))
        .collect();
    let choices: Vec<Value> = results
        .iter()
        .map(|c| {
            let echoed = echoes.get(c.prompt_index);
            let prefix = echoed.map_or("", |e| e.text.as_str());
            let logprobs = if logprobs.is_some() {
                let prompt = echoed.map(|e| EchoedPrompt {
                    text: &e.text,
                    ids: &e.ids,
                    scores: &c.prompt_scores,
                });
                render::completion_logprobs(tok, prompt, &c.tokens, 0)
            } else {
                Value::Null
            };
            json!({
                "index": c.index,
                "text": format!("{prefix}{}", c.text),
                "logprobs": logprobs,
                "finish_reason": c.finish.map(render::finish_reason),
            })
        })
        .collect();
    let mut body = header.object("text_completion", choices);
    body["usage"] = render::usage(render::totals(&prompt_lens, &per_choice));
    Ok(Json(body).into_response())
}

fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.options.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "kestrel",
        "max_model_len": state.engine.max_model_len(),
    })
}

async fn models(State(state): Shared) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_card(&state)] }))
}

async fn model_by_id(State(state): Shared, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    check_model(Some(&id), &state.options.model_name)?;
    Ok(Json(model_card(&state)))
}

async fn health(State(state): Shared) -> Json<Value> {
    let mut v = json!({ "status": "ok" });
    if !state.options.identity.is_null() {
        v["server"] = state.options.identity.clone();
    }
    Json(v)
}

async fn metrics(State(state): Shared) -> Response {
    let text = state.metrics.render(
        &state.engine.stats(),
        state.in_flight.load(std::sync::atomic::Ordering::Acquire),
    );
    ([(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn cache_stats(State(state): Shared) -> Json<Value> {
    let s = state.engine.stats();
    let c = s.prefix_cache;
    let lookups = c.hits + c.misses;
    Json(json!({
        "kv_blocks_total": s.kv_blocks_total,
        "kv_blocks_used": s.kv_blocks_used,
        "kv_blocks_free": s.kv_blocks_total.saturating_sub(s.kv_blocks_used),
        "kv_blocks_cached": s.kv_blocks_cached,
        "running": s.running,
        "waiting": s.waiting,
        "sequences_in_flight": state.in_flight.load(std::sync::atomic::Ordering::Acquire),
        "prefix_cache": {
            "hits": c.hits,
            "misses": c.misses,
            "hit_rate": if lookups == 0 { 0.0 } else { c.hits as f64 / lookups as f64 },
            "tokens_saved": c.tokens_saved,
            "evictions": c.evictions,
        },
    }))
}

/// Drops the prefix cache. Blocks held by running requests stay with them;
/// only their cache entries go. The engine answers between two steps, so
/// the wait happens off the async workers.
async fn cache_clear(State(state): Shared) -> Response {
    let engine = state.engine.clone();
    match tokio::task::spawn_blocking(move || engine.clear_prefix_cache()).await {
        Ok(Ok(n)) => Json(json!({"cleared_blocks": n})).into_response(),
        Ok(Err(e)) => ApiError::overloaded(e.to_string()).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

async fn tokenize(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    respond(tokenize_inner(&state, body))
}

fn tokenize_inner(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse_json(body, state.options.max_body_bytes)?;
    check_model(req.model.as_deref(), &state.options.model_name)?;
    let tok = &state.tokenizer;
    let ids = match (&req.prompt, &req.messages) {
        (Some(p), None) => tok
            .encode(p, req.add_special_tokens.unwrap_or(tok.add_bos_default()))
            .map_err(|e| ApiError::invalid_param("prompt", format!("could not tokenize: {e}")))?,
        (None, Some(m)) => chat_prompt(state, m, req.add_generation_prompt.unwrap_or(true))?,
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of `prompt` (text) and `messages` (chat)",
            ))
        }
    };
    Ok(Json(json!({
        "count": ids.len(),
        "max_model_len": state.engine.max_model_len(),
        "tokens": ids,
    }))
    .into_response())
}

async fn detokenize(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    respond(detokenize_inner(&state, body))
}

fn detokenize_inner(state: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let req: DetokenizeRequest = parse_json(body, state.options.max_body_bytes)?;
    check_model(req.model.as_deref(), &state.options.model_name)?;
    let vocab = state.tokenizer.vocab_size();
    let ids: Vec<u32> = req
        .tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            u32::try_from(id)
                .ok()
                .filter(|&t| (t as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "tokens",
                        format!("token {i} is {id}, expected a token id in [0, {vocab})"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let text = state
        .tokenizer
        .decode(&ids)
        .map_err(|e| ApiError::invalid_param("tokens", format!("could not decode: {e}")))?;
    Ok(Json(json!({ "prompt": text })).into_response())
}
