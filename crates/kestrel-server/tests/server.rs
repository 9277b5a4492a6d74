//! The server end to end over real HTTP on loopback, with the default model
//! on the CPU backend. Generation lengths are kept small so the whole file
//! runs in well under a minute on two cores.

mod common;

use std::time::Duration;

use common::*;
use kestrel_engine::{SamplingParams, Session};
use kestrel_tokenizer::ChatMessage;
use serde_json::{json, Value};

const PROMPT: &str = "The capital of France is";

/// What `kestrel run --temperature 0` produces: the single-sequence Session.
fn session_greedy(ids: &[u32], max_tokens: usize) -> (String, usize) {
    let f = fixture();
    let params = SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    };
    let mut s = Session::new(&f.model, ids.len() + max_tokens + 1).expect("session");
    let g = s.generate(&f.tok, ids, &params, |_| {}).expect("generate");
    (g.text, g.tokens.len())
}

fn raw_ids(text: &str) -> Vec<u32> {
    let tok = &fixture().tok;
    tok.encode(text, tok.add_bos_default()).expect("encode")
}

fn chat_ids(user: &str) -> Vec<u32> {
    let tok = &fixture().tok;
    let text = tok
        .apply_chat_template(&[ChatMessage::user(user)], true)
        .expect("template");
    tok.encode_chat_prompt(&text).expect("encode")
}

/// Concatenated text and the finish reasons of a stream's chunks.
fn stream_text(events: &[Value], chat: bool) -> (String, Vec<String>) {
    let mut text = String::new();
    let mut finishes = Vec::new();
    for e in events {
        for c in e["choices"].as_array().expect("choices") {
            let piece = if chat { &c["delta"]["content"] } else { &c["text"] };
            text.push_str(piece.as_str().unwrap_or(""));
            if let Some(f) = c["finish_reason"].as_str() {
                finishes.push(f.to_string());
            }
        }
    }
    (text, finishes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_matches_the_session_streaming_or_not() {
    let srv = start(engine_config(128, 8), |_| {}).await;
    let max = 10;

    let ids = raw_ids(PROMPT);
    let (want, want_n) = session_greedy(&ids, max);
    let body = json!({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": max, "temperature": 0});
    let r = post(srv.addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    let finish = if want_n == max { "length" } else { "stop" };
    assert_eq!(v["choices"][0]["finish_reason"], finish);
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], want_n);
    assert_eq!(v["usage"]["total_tokens"], ids.len() + want_n);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (events, done) = stream(srv.addr, "/v1/completions", &sbody).await;
    assert!(done, "stream must end with [DONE]");
    let (text, finishes) = stream_text(&events, false);
    assert_eq!(text, want);
    assert_eq!(finishes, vec![finish.to_string()]);
    let last = events.last().expect("events");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], want_n);

    let user = "Name one planet of the solar system.";
    let cids = chat_ids(user);
    let (want, want_n) = session_greedy(&cids, max);
    let body = json!({"messages": [{"role": "user", "content": user}], "max_tokens": max, "temperature": 0});
    let v = post(srv.addr, "/v1/chat/completions", &body).await.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["usage"]["prompt_tokens"], cids.len());
    assert_eq!(v["usage"]["completion_tokens"], want_n);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (events, done) = stream(srv.addr, "/v1/chat/completions", &sbody).await;
    assert!(done);
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        events.iter().all(|e| e.get("usage").is_none()),
        "no usage unless asked"
    );
    let (text, finishes) = stream_text(&events, true);
    assert_eq!(text, want);
    assert_eq!(finishes.len(), 1);

    // The same long prompt again: its full blocks come from the prefix cache.
    let long = "Once upon a time, in a small village by the sea, there lived an old fisherman \
                who every morning rowed out past the rocks to cast his nets into the cold water.";
    let body = json!({"prompt": long, "max_tokens": 2, "temperature": 0});
    let first = post(srv.addr, "/v1/completions", &body).await.json();
    let second = post(srv.addr, "/v1/completions", &body).await.json();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    let prompt = second["usage"]["prompt_tokens"].as_u64().expect("prompt");
    assert!(cached >= 16 && cached < prompt, "cached {cached} of {prompt}");
    wait_idle(srv.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_n_choices_and_logprobs() {
    let srv = start(engine_config(128, 8), |_| {}).await;
    let base = json!({"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let full = post(srv.addr, "/v1/completions", &base).await.json();
    let text = full["choices"][0]["text"].as_str().expect("text").to_string();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    assert!(chars.len() > 8, "need a longer greedy text than {text:?}");
    // A stop string from the middle: the output ends just before its first occurrence.
    let (a, b) = (chars[4].0, chars[7].0);
    let stop = &text[a..b];
    let cut = text.find(stop).expect("stop occurs");
    for stop_field in [json!(stop), json!(["never-generated-xyz", stop])] {
        let mut body = base.clone();
        body["stop"] = stop_field;
        let v = post(srv.addr, "/v1/completions", &body).await.json();
        assert_eq!(v["choices"][0]["text"], &text[..cut], "stop {stop:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // n = 2 with sampling: two choices, usage summed, prompt counted once.
    let body =
        json!({"prompt": PROMPT, "max_tokens": 5, "temperature": 0.9, "seed": 3, "n": 2, "ignore_eos": true});
    let v = post(srv.addr, "/v1/completions", &body).await.json();
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(
        (choices[0]["index"].as_u64(), choices[1]["index"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(v["usage"]["prompt_tokens"], raw_ids(PROMPT).len());
    // A fixed seed replays.
    let again = post(srv.addr, "/v1/completions", &body).await.json();
    assert_eq!(again["choices"], v["choices"]);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (events, done) = stream(srv.addr, "/v1/completions", &sbody).await;
    assert!(done);
    for i in 0..2u64 {
        let mine: Vec<&Value> = events
            .iter()
            .flat_map(|e| e["choices"].as_array().into_iter().flatten())
            .filter(|c| c["index"] == i)
            .collect();
        let text: String = mine.iter().map(|c| c["text"].as_str().unwrap_or("")).collect();
        assert_eq!(
            text,
            choices[i as usize]["text"].as_str().expect("text"),
            "choice {i}"
        );
        assert_eq!(mine.iter().filter(|c| c["finish_reason"] == "length").count(), 1);
    }

    // Chat logprobs: one entry per token, the greedy token is the top one.
    let body = json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3, "ignore_eos": true});
    let v = post(srv.addr, "/v1/chat/completions", &body).await.json();
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content");
    assert_eq!(content.len(), 4);
    for e in content {
        let top = e["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], e["token"]);
        assert_eq!(top[0]["logprob"], e["logprob"]);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().expect("lp")).collect();
        assert!(lps[0] <= 0.0 && lps[0] >= lps[1] && lps[1] >= lps[2], "{lps:?}");
    }
    // Completions logprobs (legacy shape), streamed: each token chunk carries one.
    let body = json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "logprobs": 2,
                      "ignore_eos": true, "stream": true});
    let (events, _) = stream(srv.addr, "/v1/completions", &body).await;
    let lp: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0]["logprobs"])
        .filter(|l| !l.is_null())
        .collect();
    assert_eq!(lp.len(), 3);
    for l in lp {
        assert_eq!(l["tokens"].as_array().map(Vec::len), Some(1));
        assert!(l["token_logprobs"][0].as_f64().expect("lp") <= 0.0);
        assert_eq!(l["top_logprobs"][0].as_object().map(|m| m.len()), Some(2));
    }
    wait_idle(srv.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_their_documented_errors() {
    let srv = start(engine_config(16, 4), |_| {}).await;
    let max_len = srv.state.engine.max_model_len();
    assert_eq!(max_len, 256, "16 blocks of 16 tokens");
    let long_prompt = "word ".repeat(400);
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // (path, body, status, error type, param)
    let cases: Vec<(&str, String, u16, &str, Option<&str>)> = vec![
        (chat, "{".into(), 400, "invalid_request_error", None),
        (chat, "[1, 2]".into(), 400, "invalid_request_error", None),
        (chat, "".into(), 400, "invalid_request_error", None),
        (chat, json!({}).to_string(), 400, "invalid_request_error", None),
        (
            chat,
            json!({"messages": "hi"}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"messages": []}).to_string(),
            400,
            "invalid_request_error",
            Some("messages"),
        ),
        (
            chat,
            json!({"messages": msgs, "temperature": "hot"}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"messages": msgs, "temperature": 3}).to_string(),
            400,
            "invalid_request_error",
            Some("temperature"),
        ),
        (
            chat,
            json!({"messages": msgs, "top_p": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("top_p"),
        ),
        (
            chat,
            json!({"messages": msgs, "max_tokens": -1}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            chat,
            json!({"messages": msgs, "max_tokens": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            chat,
            json!({"messages": msgs, "n": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("n"),
        ),
        (
            chat,
            json!({"messages": msgs, "presence_penalty": 5}).to_string(),
            400,
            "invalid_request_error",
            Some("presence_penalty"),
        ),
        (
            chat,
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}).to_string(),
            400,
            "invalid_request_error",
            Some("top_logprobs"),
        ),
        (
            chat,
            json!({"messages": msgs, "stop": [""]}).to_string(),
            400,
            "invalid_request_error",
            Some("stop"),
        ),
        (
            chat,
            json!({"messages": msgs, "stop": 5}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            chat,
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).to_string(),
            400,
            "invalid_request_error",
            Some("messages[0].content[0]"),
        ),
        (
            chat,
            json!({"messages": msgs, "model": "gpt-4"}).to_string(),
            404,
            "not_found_error",
            Some("model"),
        ),
        (
            chat,
            json!({"messages": msgs, "max_tokens": 1000}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            cmpl,
            json!({"prompt": long_prompt}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            cmpl,
            json!({"prompt": []}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            cmpl,
            json!({"prompt": [999999999]}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            cmpl,
            json!({"prompt": [-1]}).to_string(),
            400,
            "invalid_request_error",
            Some("prompt"),
        ),
        (
            cmpl,
            json!({"prompt": {"a": 1}}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            cmpl,
            json!({"prompt": "x", "echo": true, "logprobs": 1}).to_string(),
            400,
            "invalid_request_error",
            Some("echo"),
        ),
        (
            cmpl,
            json!({"prompt": "x", "logprobs": 21}).to_string(),
            400,
            "invalid_request_error",
            Some("logprobs"),
        ),
        (
            cmpl,
            json!({"prompt": "x", "top_k": -5}).to_string(),
            400,
            "invalid_request_error",
            Some("top_k"),
        ),
        (
            cmpl,
            json!({"prompt": "x", "n": 100}).to_string(),
            400,
            "invalid_request_error",
            Some("n"),
        ),
        (
            cmpl,
            json!({"prompt": "x", "seed": "abc"}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        (
            "/detokenize",
            json!({"tokens": [1, 999999999]}).to_string(),
            400,
            "invalid_request_error",
            Some("tokens"),
        ),
        (
            "/tokenize",
            json!({}).to_string(),
            400,
            "invalid_request_error",
            None,
        ),
        ("/v1/nothing", json!({}).to_string(), 404, "not_found_error", None),
    ];
    for (path, body, status, kind, param) in &cases {
        let r = request(srv.addr, "POST", path, &[], body.as_bytes()).await;
        let what = format!("POST {path} {body}: {}", r.text());
        assert_eq!(r.status, *status, "{what}");
        let v = r.json();
        assert_eq!(v["error"]["type"], *kind, "{what}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty(), "{what}");
        assert_eq!(v["error"]["param"].as_str(), *param, "{what}");
    }
    // Context overflow names both numbers.
    let r = post(srv.addr, chat, &json!({"messages": msgs, "max_tokens": 1000})).await;
    let msg = r.json()["error"]["message"].as_str().unwrap_or("").to_string();
    assert!(
        msg.contains(&max_len.to_string()) && msg.contains("1000"),
        "{msg}"
    );
    // Wrong method on a known route.
    let r = get(srv.addr, chat).await;
    assert_eq!(r.status, 405, "{}", r.text());
    // Nothing leaked and the server still works.
    wait_idle(srv.addr).await;
    let ok = post(
        srv.addr,
        cmpl,
        &json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let m = get(srv.addr, "/metrics").await.text();
    assert!(m.contains("kestrel_requests_total{status=\"400\"}"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_body_limit_and_info_routes() {
    let srv = start(engine_config(32, 4), |o| {
        o.api_key = Some("s3cret".into());
        o.max_body_bytes = 1024;
    })
    .await;
    let a = srv.addr;
    let body = json!({"prompt": "Hi", "max_tokens": 1, "temperature": 0}).to_string();
    let r = request(a, "POST", "/v1/completions", &[], body.as_bytes()).await;
    assert_eq!(
        (r.status, r.json()["error"]["type"].clone()),
        (401, json!("authentication_error"))
    );
    let r = request(
        a,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer s3cre")],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    let r = request(a, "GET", "/v1/models", &[("Authorization", "s3cret")], b"").await;
    assert_eq!(r.status, 401);
    let auth = [("Authorization", "Bearer s3cret")];
    let r = request(a, "POST", "/v1/completions", &auth, body.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Open routes.
    assert_eq!(get(a, "/health").await.status, 200);
    assert_eq!(get(a, "/metrics").await.status, 200);

    // 413 over the body limit (with a valid key).
    let big = json!({"prompt": "x".repeat(4000)}).to_string();
    let r = request(a, "POST", "/v1/completions", &auth, big.as_bytes()).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_too_large");

    let r = request(a, "GET", "/v1/models", &auth, b"").await.json();
    assert_eq!(r["data"][0]["id"], MODEL_NAME);
    let r = request(a, "GET", &format!("/v1/models/{MODEL_NAME}"), &auth, b"").await;
    assert_eq!(r.status, 200);
    let r = request(a, "GET", "/v1/models/other", &auth, b"").await;
    assert_eq!(r.status, 404);

    // tokenize / detokenize round trip, raw and chat.
    let t = request(
        a,
        "POST",
        "/tokenize",
        &auth,
        json!({"prompt": PROMPT}).to_string().as_bytes(),
    )
    .await
    .json();
    let ids: Vec<u32> = serde_json::from_value(t["tokens"].clone()).expect("ids");
    assert_eq!(ids, raw_ids(PROMPT));
    assert_eq!(t["count"], ids.len());
    let d = request(
        a,
        "POST",
        "/detokenize",
        &auth,
        json!({"tokens": ids}).to_string().as_bytes(),
    )
    .await
    .json();
    assert!(d["prompt"].as_str().expect("text").ends_with(PROMPT), "{d}");
    let t = request(
        a,
        "POST",
        "/tokenize",
        &auth,
        json!({"messages": [{"role": "user", "content": "Hey"}]})
            .to_string()
            .as_bytes(),
    )
    .await
    .json();
    assert_eq!(
        serde_json::from_value::<Vec<u32>>(t["tokens"].clone()).expect("ids"),
        chat_ids("Hey")
    );

    // The "Hey" request above left cached blocks; DELETE drops them all.
    let before = request(a, "GET", "/v1/cache/stats", &auth, b"").await.json();
    let r = request(a, "DELETE", "/v1/cache", &auth, b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["cleared_blocks"], before["kv_blocks_cached"]);
    let after = request(a, "GET", "/v1/cache/stats", &auth, b"").await.json();
    assert_eq!(after["kv_blocks_cached"], json!(0));
    assert_eq!(after["kv_blocks_free"], before["kv_blocks_free"]);

    let m = get(a, "/metrics").await.text();
    for needle in [
        "kestrel_requests_total{status=\"200\"}",
        "kestrel_requests_total{status=\"401\"} 3",
        "kestrel_requests_total{status=\"413\"} 1",
        "kestrel_time_to_first_token_seconds_count 1",
        "kestrel_e2e_request_latency_seconds_count 1",
        "kestrel_generation_tokens_total 1",
        "kestrel_kv_blocks_total 32",
        "kestrel_prefix_cache_hit_rate",
        "kestrel_num_requests_waiting 0",
    ] {
        assert!(m.contains(needle), "metrics lack {needle:?}:\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_recovers() {
    let srv = start(engine_config(64, 1), |o| o.max_waiting = 1).await;
    let body =
        json!({"prompt": PROMPT, "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true})
            .to_string();
    // One runs, one waits: both admitted (the status line proves it).
    let mut running = Conn::open(srv.addr, "POST", "/v1/completions", &[], body.as_bytes()).await;
    assert_eq!(running.status, 200);
    assert!(running.next_event().await.is_some());
    let waiting = Conn::open(srv.addr, "POST", "/v1/completions", &[], body.as_bytes()).await;
    assert_eq!(waiting.status, 200);
    let r = request(srv.addr, "POST", "/v1/completions", &[], body.as_bytes()).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    // Hanging up frees everything; then requests are admitted again.
    drop(running);
    drop(waiting);
    wait_idle(srv.addr).await;
    let ok = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_request_is_cancelled_when_its_client_hangs_up() {
    let srv = start(engine_config(64, 4), |_| {}).await;
    let body = json!({"prompt": PROMPT, "max_tokens": 500, "temperature": 0, "ignore_eos": true}).to_string();
    let c = Conn::open_no_wait(srv.addr, "/v1/completions", body.as_bytes()).await;
    // Wait until the engine runs it, then hang up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = get(srv.addr, "/v1/cache/stats").await.json();
        if s["running"] == 1 && s["kv_blocks_used"].as_u64() > Some(0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ran: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    let t0 = tokio::time::Instant::now();
    wait_idle(srv.addr).await;
    // 500 tokens would take far longer on the CPU than this.
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_64_streams_with_a_quarter_cancelled() {
    const STREAMS: usize = 64;
    const MAX_TOKENS: usize = 8;
    let srv = start(engine_config(256, 64), |_| {}).await;
    let total = get(srv.addr, "/v1/cache/stats").await.json()["kv_blocks_total"].clone();
    // A fixed pseudo-random quarter to cancel.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut order: Vec<usize> = (0..STREAMS).collect();
    for i in (1..STREAMS).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let cancel: Vec<bool> = (0..STREAMS).map(|i| order[..STREAMS / 4].contains(&i)).collect();
    let mut tasks = Vec::new();
    for (i, &cancel_me) in cancel.iter().enumerate() {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("Story number {i}: once upon a time"),
                              "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i,
                              "ignore_eos": true, "stream": true,
                              "stream_options": {"include_usage": true}});
            let mut c = Conn::open(addr, "POST", "/v1/completions", &[], body.to_string().as_bytes()).await;
            assert_eq!(c.status, 200);
            let mut tokens = 0;
            let mut usage = Value::Null;
            while let Some(data) = c.next_event().await {
                if data == "[DONE]" {
                    return Some((tokens, usage));
                }
                let v: Value = serde_json::from_str(&data).expect("chunk");
                if v["choices"].as_array().is_some_and(|c| !c.is_empty())
                    && v["choices"][0]["finish_reason"].is_null()
                {
                    tokens += 1;
                    if cancel_me {
                        // Midway: after the first token, hang up.
                        return None;
                    }
                }
                if !v["usage"].is_null() {
                    usage = v["usage"].clone();
                }
            }
            panic!("stream {i} ended without [DONE]");
        }));
    }
    let results = tokio::time::timeout(Duration::from_secs(120), futures_util::future::join_all(tasks))
        .await
        .expect("the load test took over 2 minutes");
    let mut completed = 0;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.expect("stream task");
        if cancel[i] {
            assert!(r.is_none());
            continue;
        }
        let (tokens, usage) = r.unwrap_or_else(|| panic!("stream {i} was not meant to be cancelled"));
        assert!(
            (1..=MAX_TOKENS).contains(&tokens),
            "stream {i}: {tokens} text chunks"
        );
        assert_eq!(usage["completion_tokens"], MAX_TOKENS, "stream {i}");
        completed += 1;
    }
    assert_eq!(completed, STREAMS - STREAMS / 4);
    let s = wait_idle(srv.addr).await;
    assert_eq!(s["kv_blocks_free"], total, "pool back to full: {s}");
}
