//! The server end to end over real HTTP on loopback, with the default model
//! on the CPU backend. Generation lengths are kept small so the whole file
//! runs in well under a minute on two cores.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kestrel_engine::{SamplingParams, Session};
use kestrel_tokenizer::ChatMessage;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROMPT: &str = "The capital of France is";

/// What `kestrel run --temperature 0` produces: the single-sequence Session.
fn session_greedy(ids: &[u32], max_tokens: usize) -> (String, usize) {
    let (text, tokens) = session_greedy_tokens(ids, max_tokens);
    (text, tokens.len())
}

fn session_greedy_tokens(ids: &[u32], max_tokens: usize) -> (String, Vec<u32>) {
    let f = fixture();
    let params = SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    };
    let mut s = Session::new(&f.model, ids.len() + max_tokens + 1).expect("session");
    let g = s.generate(&f.tok, ids, &params, |_| {}).expect("generate");
    (g.text, g.tokens)
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

    // Every metric the issue lists, with the values these requests imply.
    let m = get(srv.addr, "/metrics").await.text();
    for needle in [
        "# TYPE kestrel_time_to_first_token_seconds histogram",
        "kestrel_time_to_first_token_seconds_count 6",
        "# TYPE kestrel_time_per_output_token_seconds histogram",
        "# TYPE kestrel_e2e_request_latency_seconds histogram",
        "kestrel_e2e_request_latency_seconds_count 6",
        "kestrel_num_requests_running 0",
        "kestrel_num_requests_waiting 0",
        "kestrel_kv_blocks_used 0",
        "kestrel_kv_blocks_total 128",
        "# TYPE kestrel_prefix_cache_tokens_saved_total counter",
    ] {
        assert!(m.contains(needle), "metrics lack {needle:?}:\n{m}");
    }
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    let prompt_tokens = 2 * ids.len() + 2 * cids.len() + 2 * prompt as usize;
    assert_eq!(value("kestrel_prompt_tokens_total"), prompt_tokens as f64);
    // Six completions, and at least one poll of /v1/cache/stats.
    assert!(value("kestrel_requests_total{status=\"200\"}") >= 7.0);
    assert!(value("kestrel_generation_tokens_total") >= 6.0);
    assert!(value("kestrel_time_per_output_token_seconds_count") >= 1.0);
    let hit_rate = value("kestrel_prefix_cache_hit_rate");
    assert!(hit_rate > 0.0 && hit_rate < 1.0, "hit rate {hit_rate}");
    // The long prompt's hit at least (the repeated chat prompt may hit too).
    assert!(value("kestrel_prefix_cache_tokens_saved_total") >= cached as f64);
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
            json!({"prompt": "x", "max_tokens": 0}).to_string(),
            400,
            "invalid_request_error",
            Some("max_tokens"),
        ),
        (
            cmpl,
            json!({"prompt": "x", "echo": true, "logprobs": -1}).to_string(),
            400,
            "invalid_request_error",
            Some("logprobs"),
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
    let health = get(a, "/health").await;
    assert_eq!(health.status, 200);
    // It names the server (ServerOptions::identity), for benchmark capsules.
    assert_eq!(
        health.json(),
        json!({"status": "ok", "server": {"name": "kestrel-test"}})
    );
    assert_eq!(get(a, "/metrics").await.status, 200);

    // 413 over the body limit (with a valid key).
    let big = json!({"prompt": "x".repeat(4000)}).to_string();
    let r = request(a, "POST", "/v1/completions", &auth, big.as_bytes()).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    // Also when the body comes in chunks with no length announced.
    let mut s = TcpStream::connect(a).await.expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nAuthorization: Bearer s3cret\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    for piece in big.as_bytes().chunks(500) {
        let chunk = [format!("{:x}\r\n", piece.len()).as_bytes(), piece, b"\r\n"].concat();
        // The server may answer and close before the last chunk.
        if s.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("request_too_large"), "{reply}");

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
        "kestrel_requests_total{status=\"413\"} 2",
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

/// The legacy logprobs lists of a completion choice (or of several stream
/// chunks, concatenated).
#[derive(Debug, Default, PartialEq)]
struct Legacy {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f64>>,
    top: Vec<Option<Vec<(String, f64)>>>,
    text_offset: Vec<u64>,
}

impl Legacy {
    fn extend(&mut self, lp: &Value) {
        let list = |k: &str| {
            lp[k]
                .as_array()
                .unwrap_or_else(|| panic!("logprobs.{k} is a list: {lp}"))
                .clone()
        };
        for t in list("tokens") {
            self.tokens.push(t.as_str().expect("token text").to_string());
        }
        for l in list("token_logprobs") {
            self.token_logprobs.push(l.as_f64());
        }
        for t in list("top_logprobs") {
            self.top.push(t.as_object().map(|m| {
                let mut v: Vec<(String, f64)> = m
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().expect("top logprob")))
                    .collect();
                v.sort_by(|a, b| b.1.total_cmp(&a.1));
                v
            }));
        }
        for o in list("text_offset") {
            self.text_offset.push(o.as_u64().expect("text offset"));
        }
        assert_eq!(self.tokens.len(), self.token_logprobs.len());
        assert_eq!(self.tokens.len(), self.top.len());
        assert_eq!(self.tokens.len(), self.text_offset.len());
    }

    fn close_to(&self, other: &Legacy, tol: f64) -> bool {
        let near = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= tol,
            (a, b) => a == b,
        };
        self.tokens == other.tokens
            && self.text_offset == other.text_offset
            && self.token_logprobs.len() == other.token_logprobs.len()
            && self
                .token_logprobs
                .iter()
                .zip(&other.token_logprobs)
                .all(|(&a, &b)| near(a, b))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_logprobs_scores_the_prompt() {
    let srv = start(engine_config(128, 8), |_| {}).await;
    let tok = &fixture().tok;
    let ids = raw_ids(PROMPT);
    let gen = 3;
    let body = json!({"prompt": PROMPT, "max_tokens": gen, "temperature": 0, "logprobs": 2,
                      "echo": true, "ignore_eos": true});
    let v = post(srv.addr, "/v1/completions", &body).await.json();
    let c = &v["choices"][0];
    let text = c["text"].as_str().expect("text").to_string();
    assert!(text.starts_with(PROMPT), "{text:?}");
    let mut lp = Legacy::default();
    lp.extend(&c["logprobs"]);
    assert_eq!(
        lp.tokens.len(),
        ids.len() + gen,
        "prompt and generated tokens: {lp:?}"
    );
    // The first prompt token has nothing to be scored against.
    assert_eq!((lp.token_logprobs[0], &lp.top[0]), (None, &None));
    let chars: Vec<char> = text.chars().collect();
    for i in 1..lp.tokens.len() {
        let l = lp.token_logprobs[i].unwrap_or_else(|| panic!("token {i} unscored"));
        let top = lp.top[i].as_ref().expect("top_logprobs");
        assert!(l <= 0.0 && top.len() == 2, "token {i}: {l} {top:?}");
        assert!(
            top[0].1 >= l - 1e-6,
            "token {i}: the best alternative is at least as likely"
        );
        if i < ids.len() {
            assert_eq!(
                Some(lp.tokens[i].clone()),
                tok.token_text(ids[i]),
                "prompt token {i}"
            );
        }
        // Each token's text sits at its offset in the choice's text.
        let at: String = chars[lp.text_offset[i] as usize..].iter().collect();
        assert!(
            at.starts_with(&lp.tokens[i]),
            "token {i} {:?} not at {}: {at:?}",
            lp.tokens[i],
            lp.text_offset[i]
        );
    }
    assert_eq!(lp.text_offset[0], 0);
    assert_eq!(lp.text_offset[ids.len()] as usize, PROMPT.chars().count());
    // A scored prompt is recomputed: no cached tokens, even the second time.
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], gen);
    let again = post(srv.addr, "/v1/completions", &body).await.json();
    assert_eq!(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let mut lp2 = Legacy::default();
    lp2.extend(&again["choices"][0]["logprobs"]);
    assert!(
        lp2.close_to(&lp, 1e-5),
        "a repeat scores differently:\n{lp2:?}\n{lp:?}"
    );

    // Without echo, the same generated tokens and logprobs.
    let mut plain = body.clone();
    plain["echo"] = json!(false);
    let p = post(srv.addr, "/v1/completions", &plain).await.json();
    let mut tail = Legacy::default();
    tail.extend(&p["choices"][0]["logprobs"]);
    assert_eq!(tail.tokens, lp.tokens[ids.len()..]);
    for (a, b) in tail.token_logprobs.iter().zip(&lp.token_logprobs[ids.len()..]) {
        assert!((a.expect("lp") - b.expect("lp")).abs() < 1e-5);
    }

    // Streamed: the echo chunk carries the prompt's scores, then one chunk
    // per token; together they are the plain response's lists.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let (events, done) = stream(srv.addr, "/v1/completions", &sbody).await;
    assert!(done);
    assert_eq!(events[0]["choices"][0]["text"], PROMPT);
    let mut streamed = Legacy::default();
    let mut stext = String::new();
    for e in &events {
        let ch = &e["choices"][0];
        stext.push_str(ch["text"].as_str().unwrap_or(""));
        if !ch["logprobs"].is_null() {
            streamed.extend(&ch["logprobs"]);
        }
    }
    assert_eq!(stext, text);
    assert!(
        streamed.close_to(&lp, 1e-5),
        "stream differs:\n{streamed:?}\n{lp:?}"
    );

    // `max_tokens: 0` scores the prompt alone, streaming or not.
    let mut score = body.clone();
    score["max_tokens"] = json!(0);
    let s0 = post(srv.addr, "/v1/completions", &score).await.json();
    assert_eq!(s0["choices"][0]["text"], PROMPT);
    assert_eq!(s0["choices"][0]["finish_reason"], "length");
    assert_eq!(s0["usage"]["completion_tokens"], 0);
    let mut only = Legacy::default();
    only.extend(&s0["choices"][0]["logprobs"]);
    assert_eq!(only.tokens, lp.tokens[..ids.len()]);
    for (a, b) in only.token_logprobs.iter().zip(&lp.token_logprobs) {
        assert!(a.zip(*b).is_none_or(|(a, b)| (a - b).abs() < 1e-5) && a.is_some() == b.is_some());
    }
    score["stream"] = json!(true);
    let (events, done) = stream(srv.addr, "/v1/completions", &score).await;
    assert!(done);
    let (stext, finishes) = stream_text(&events, false);
    assert_eq!((stext.as_str(), finishes), (PROMPT, vec!["length".to_string()]));

    // The score of a prompt token equals the logprob of that same token when
    // generated: the prompt plus its greedy continuation's first token.
    let (_, greedy) = session_greedy_tokens(&ids, 1);
    let mut extended: Vec<u32> = ids.clone();
    extended.push(greedy[0]);
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": extended, "max_tokens": 0, "echo": true, "logprobs": 0}),
    )
    .await
    .json();
    let mut ext = Legacy::default();
    ext.extend(&v["choices"][0]["logprobs"]);
    let scored = ext.token_logprobs[ids.len()].expect("scored");
    let generated = lp.token_logprobs[ids.len()].expect("generated");
    assert!(
        (scored - generated).abs() < 1e-4,
        "prompt score {scored} vs generated {generated}"
    );
    wait_idle(srv.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_parameters_take_effect() {
    let srv = start(engine_config(128, 8), |_| {}).await;
    let base = json!({"prompt": PROMPT, "max_tokens": 6, "ignore_eos": true});
    let text = |v: &Value| v["choices"][0]["text"].as_str().expect("text").to_string();
    let mut greedy = base.clone();
    greedy["temperature"] = json!(0);
    let want = text(&post(srv.addr, "/v1/completions", &greedy).await.json());
    // Truncations that keep only the best token make sampling greedy.
    for (k, v) in [("top_k", json!(1)), ("min_p", json!(1.0)), ("top_p", json!(1e-6))] {
        let mut b = base.clone();
        b["temperature"] = json!(1.5);
        b["seed"] = json!(11);
        b[k] = v;
        let r = post(srv.addr, "/v1/completions", &b).await;
        assert_eq!(r.status, 200, "{k}: {}", r.text());
        assert_eq!(text(&r.json()), want, "{k}");
    }
    // Penalties on a prompt that invites repetition: reported logprobs are
    // those of the penalised distribution, so even where the greedy tokens
    // stay the same, the repeated ones become less likely.
    let rep = json!({"prompt": "1 1 1 1 1 1 1 1 1 1 1 1", "max_tokens": 8, "temperature": 0,
                     "ignore_eos": true, "logprobs": 0});
    let scored = |v: Value| {
        let mut l = Legacy::default();
        l.extend(&v["choices"][0]["logprobs"]);
        (text(&v), l.token_logprobs)
    };
    let (plain_text, plain_lps) = scored(post(srv.addr, "/v1/completions", &rep).await.json());
    for (k, v) in [
        ("repetition_penalty", 1.8),
        ("presence_penalty", 2.0),
        ("frequency_penalty", 2.0),
    ] {
        let mut b = rep.clone();
        b[k] = json!(v);
        let (got_text, got_lps) = scored(post(srv.addr, "/v1/completions", &b).await.json());
        let less_likely = got_text == plain_text
            && got_lps
                .iter()
                .zip(&plain_lps)
                .skip(1)
                .any(|(g, p)| g.zip(*p).is_some_and(|(g, p)| g < p - 0.1));
        assert!(
            got_text != plain_text || less_likely,
            "{k} had no effect on {plain_text:?} ({got_lps:?} vs {plain_lps:?})"
        );
    }
    // Chat: `max_completion_tokens` wins over `max_tokens`; `stop_token_ids`
    // ends the output at the listed token.
    let chat = json!({"messages": [{"role": "user", "content": "Count to ten."}], "temperature": 0,
                      "ignore_eos": true, "max_tokens": 6, "max_completion_tokens": 2});
    let v = post(srv.addr, "/v1/chat/completions", &chat).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
    let (_, tokens) = session_greedy_tokens(&raw_ids(PROMPT), 6);
    let mut b = greedy.clone();
    b["stop_token_ids"] = json!([tokens[2]]);
    let v = post(srv.addr, "/v1/completions", &b).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    // Completions without `max_tokens` stop at OpenAI's default of 16.
    let v = post(
        srv.addr,
        "/v1/completions",
        &json!({"prompt": PROMPT, "temperature": 0, "ignore_eos": true}),
    )
    .await
    .json();
    assert_eq!(v["usage"]["completion_tokens"], 16, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    wait_idle(srv.addr).await;
}

/// Reads a stream to its end: its events and whether `[DONE]` closed it.
async fn drain(c: &mut Conn) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    while let Some(data) = c.next_event().await {
        if data == "[DONE]" {
            return (events, true);
        }
        events.push(serde_json::from_str(&data).unwrap_or_else(|e| panic!("event {data:?}: {e}")));
    }
    (events, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight_then_aborts_the_rest_when_forced() {
    let mut srv = start(engine_config(64, 4), |_| {}).await;
    let body = |max: usize| {
        json!({"prompt": PROMPT, "max_tokens": max, "temperature": 0, "ignore_eos": true, "stream": true})
            .to_string()
    };
    let mut short = Conn::open(srv.addr, "POST", "/v1/completions", &[], body(6).as_bytes()).await;
    let mut long = Conn::open(srv.addr, "POST", "/v1/completions", &[], body(400).as_bytes()).await;
    assert!(short.next_event().await.is_some() && long.next_event().await.is_some());

    // SIGINT: no new connection, but the streams go on.
    srv.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(srv.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting connections after the stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (events, done) = drain(&mut short).await;
    assert!(done, "the short stream must complete");
    assert_eq!(stream_text(&events, false).1, vec!["length".to_string()]);
    assert!(long.next_event().await.is_some(), "the long stream goes on");

    // A second signal: the long stream ends at once, with an error and [DONE].
    let t0 = Instant::now();
    srv.force();
    let (events, done) = drain(&mut long).await;
    assert!(done, "an aborted stream still ends with [DONE]");
    let last = events.last().expect("events");
    assert_eq!(last["error"]["type"], "overloaded_error", "{last}");
    assert!(
        events.iter().all(|e| e["choices"][0]["finish_reason"].is_null()),
        "an aborted stream has no finish reason"
    );
    tokio::time::timeout(Duration::from_secs(10), srv.join())
        .await
        .expect("the server returns once its streams end")
        .expect("served");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(srv
        .state
        .engine
        .add_request(raw_ids(PROMPT), SamplingParams::default())
        .is_err());
}

/// `streams` concurrent streaming completions (`ignore_eos`, so each has
/// exactly `max_tokens` tokens); a seeded random quarter hang up after
/// `cancel_after` chunks. Every other stream must complete with the right
/// number of tokens and `[DONE]`, the cancelled ones must stop early in the
/// engine too, and the KV pool must come back to full. Returns the time
/// the streams took.
async fn load_with_cancellations(
    streams: usize,
    max_tokens: usize,
    cancel_after: usize,
    seed: u64,
) -> Duration {
    let blocks = streams * 3;
    let srv = start(
        kestrel_engine::EngineConfig {
            num_kv_blocks: blocks,
            max_num_seqs: streams,
            max_num_batched_tokens: 4096,
            ..kestrel_engine::EngineConfig::default()
        },
        |o| o.max_waiting = streams,
    )
    .await;
    let total = get(srv.addr, "/v1/cache/stats").await.json()["kv_blocks_total"].clone();
    assert_eq!(total, blocks);
    let mut order: Vec<usize> = (0..streams).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let cancel: Vec<bool> = (0..streams).map(|i| order[..streams / 4].contains(&i)).collect();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, &cancel_me) in cancel.iter().enumerate() {
        let addr = srv.addr;
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("Story number {i}: once upon a time"),
                              "max_tokens": max_tokens, "temperature": 0,
                              "ignore_eos": true, "stream": true,
                              "stream_options": {"include_usage": true}});
            let mut c = Conn::open(addr, "POST", "/v1/completions", &[], body.to_string().as_bytes()).await;
            assert_eq!(c.status, 200, "stream {i}");
            let (mut chunks, mut finishes) = (0, Vec::new());
            let mut usage = Value::Null;
            while let Some(data) = c.next_event().await {
                if data == "[DONE]" {
                    assert!(!cancel_me, "stream {i} ended before it could be cancelled");
                    assert!(c.next_event().await.is_none(), "stream {i}: data after [DONE]");
                    return Some((chunks, finishes, usage));
                }
                let v: Value = serde_json::from_str(&data).expect("chunk");
                assert!(v.get("error").is_none(), "stream {i}: {v}");
                if let Some(choice) = v["choices"].as_array().and_then(|c| c.first()) {
                    match choice["finish_reason"].as_str() {
                        Some(f) => finishes.push(f.to_string()),
                        None => chunks += 1,
                    }
                    if cancel_me && chunks == cancel_after {
                        return None; // hang up midway
                    }
                }
                if !v["usage"].is_null() {
                    usage = v["usage"].clone();
                }
            }
            panic!("stream {i} ended without [DONE]");
        }));
    }
    let results = tokio::time::timeout(Duration::from_secs(300), futures_util::future::join_all(tasks))
        .await
        .expect("the load test took over 5 minutes");
    let elapsed = t0.elapsed();
    let mut completed = 0;
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("stream task {i}: {e}"));
        if cancel[i] {
            assert!(r.is_none(), "stream {i}");
            continue;
        }
        let (chunks, finishes, usage) =
            r.unwrap_or_else(|| panic!("stream {i} was not meant to be cancelled"));
        assert!(
            (1..=max_tokens).contains(&chunks),
            "stream {i}: {chunks} text chunks"
        );
        assert_eq!(finishes, vec!["length".to_string()], "stream {i}");
        assert_eq!(usage["completion_tokens"], max_tokens, "stream {i}");
        completed += 1;
    }
    assert_eq!(completed, streams - streams / 4);
    let s = wait_idle(srv.addr).await;
    assert_eq!(s["kv_blocks_free"], total, "pool back to full: {s}");
    // The cancelled ones stopped in the engine, not only on the wire.
    let generated = srv.state.engine.stats().tokens_generated;
    assert!(
        generated < (streams * max_tokens) as u64,
        "{generated} tokens generated: cancelled streams ran to the end"
    );
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_256_streams_with_a_random_quarter_cancelled() {
    let took = load_with_cancellations(256, 8, 3, 0x6b65_7374).await;
    eprintln!(
        "256 streams of 8 tokens, 64 cancelled: {:.1} s",
        took.as_secs_f64()
    );
}

/// A server started with n-gram speculation (`kestrel serve --spec-tokens`)
/// answers greedy requests, streamed and not, with the text of a server
/// without it, and `/metrics` counts the drafts it checked and kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_serves_the_same_greedy_text_and_counts_its_drafts() {
    let body = json!({"prompt": "The three primary colors are", "max_tokens": 40,
                      "temperature": 0, "ignore_eos": true});
    let plain = start(engine_config(128, 8), |_| {}).await;
    let want = post(plain.addr, "/v1/completions", &body).await.json();
    let want = want["choices"][0]["text"].as_str().expect("text").to_string();
    let m = get(plain.addr, "/metrics").await.text();
    assert!(m.contains("kestrel_spec_draft_tokens_total 0"), "{m}");

    let cfg = kestrel_engine::EngineConfig {
        speculation: Some(kestrel_engine::NgramSpeculation::default()),
        ..engine_config(128, 8)
    };
    let spec = start(cfg, |_| {}).await;
    let got = post(spec.addr, "/v1/completions", &body).await.json();
    assert_eq!(got["choices"][0]["text"].as_str(), Some(want.as_str()));
    assert_eq!(got["usage"]["completion_tokens"], 40);
    // Streamed: the same text in pieces (a step may bring several tokens).
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let events = post(spec.addr, "/v1/completions", &streamed).await.text();
    let text: String = events
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).expect("SSE data is JSON");
            v["choices"][0]["text"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(text, want);
    wait_idle(spec.addr).await;
    let m = get(spec.addr, "/metrics").await.text();
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{m}"))
    };
    let (drafted, accepted) = (
        value("kestrel_spec_draft_tokens_total"),
        value("kestrel_spec_accepted_tokens_total"),
    );
    assert!(
        accepted > 0.0 && accepted <= drafted,
        "drafted {drafted}, accepted {accepted}"
    );
}
