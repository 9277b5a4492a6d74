//! bench-serve against a real kestrel server on loopback: the default model
//! on the CPU backend, a small closed-loop run on both endpoints.

use std::sync::Arc;
use std::time::Duration;

use kestrel_backend::cpu::CpuBackend;
use kestrel_bench::serve_load::{self, Endpoint, Level, LoadConfig, Report, Target};
use kestrel_engine::{Engine, EngineConfig};
use kestrel_formats::ModelFile;
use kestrel_model::Model;
use kestrel_server::{AppState, ServerOptions, DEFAULT_MAX_BODY_BYTES};
use kestrel_tokenizer::Tokenizer;

const SERVED_NAME: &str = "bench-test-model";

/// Starts `kestrel_server` on 127.0.0.1:0 on a thread of its own; returns
/// its base URL. The server lives until the test process ends.
fn start_kestrel() -> String {
    let path = kestrel_formats::default_model_path();
    assert!(
        path.exists(),
        "default model not found at {}: run scripts/fetch-model.sh (or set KESTREL_MODEL)",
        path.display()
    );
    let model = Model::load(&path, Arc::new(CpuBackend::new()))
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    let tok = match model.file() {
        ModelFile::Gguf(g) => Tokenizer::from_gguf(g).expect("tokenizer from the GGUF"),
        _ => panic!("{} is not a GGUF file", path.display()),
    };
    let tok = Arc::new(tok);
    let config = EngineConfig {
        num_kv_blocks: 64,
        max_num_seqs: 4,
        max_num_batched_tokens: 512,
        ..EngineConfig::default()
    };
    let engine = Engine::new(Arc::new(model), tok.clone(), config)
        .expect("engine")
        .spawn()
        .expect("engine thread");
    let options = ServerOptions {
        model_name: SERVED_NAME.into(),
        api_key: None,
        max_running: 4,
        max_waiting: 64,
        max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        identity: serde_json::json!({ "name": "kestrel", "commit": "test-build" }),
    };
    let state = AppState::new(engine, tok, options);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("non-blocking listener");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).expect("listener");
            kestrel_server::serve(l, state, std::future::pending())
                .await
                .expect("server");
        });
    });
    url
}

fn config(url: &str, endpoint: Endpoint, num_prompts: usize) -> LoadConfig {
    LoadConfig {
        baseline: Target {
            url: url.to_string(),
            model: None,
            api_key: None,
        },
        candidate: None,
        levels: vec![Level::Concurrency(2)],
        num_prompts,
        input_len: 16,
        output_len: 8,
        prompts_file: None,
        ignore_eos: true,
        temperature: Some(0.0),
        endpoint,
        warmup: 1,
        seed: 1,
        rounds: 1,
        asserts: Vec::new(),
        client_threads: 1,
        request_timeout: Duration::from_secs(120),
        progress: false,
    }
}

#[test]
fn small_bench_against_kestrel_serve_gets_every_token() {
    let url = start_kestrel();
    let outcome = serve_load::run(&config(&url, Endpoint::Completions, 4)).expect("completions run");
    assert_eq!(outcome.targets[0].model, SERVED_NAME, "model from GET /v1/models");
    // The capsule names the server it measured (GET /health's identity).
    let result = Report::of(&outcome).result_json(&outcome);
    assert_eq!(
        result["baseline"]["server"]["status"], "ok",
        "{}",
        result["baseline"]
    );
    assert_eq!(result["baseline"]["server"]["server"]["commit"], "test-build");
    assert_eq!(outcome.warmup[0].errors, 0, "{:?}", outcome.warmup[0].first_error);
    let recs = &outcome.runs[0].run.records;
    assert_eq!(recs.len(), 4);
    for r in recs {
        assert!(r.ok(), "request {} failed: {:?}", r.index, r.error);
        assert!(r.usage_reported, "request {}: no usage chunk", r.index);
        assert_eq!(
            r.output_tokens, 8,
            "request {}: ignore_eos with max_tokens 8",
            r.index
        );
        // 16 one-token words plus BOS; tokenisation may merge or split a few.
        let p = r.prompt_tokens.expect("prompt_tokens");
        assert!((12..=40).contains(&p), "request {}: {p} prompt tokens", r.index);
        assert!(
            r.chunks >= 1 && r.chunks <= 8,
            "request {}: {} text chunks",
            r.index,
            r.chunks
        );
        let ttft = r.ttft_ms.expect("ttft");
        assert!(ttft > 0.0 && ttft <= r.e2e_ms, "ttft {ttft} e2e {}", r.e2e_ms);
    }
    let s = &Report::of(&outcome).levels[0].summary;
    assert_eq!((s.succeeded, s.errors, s.output_tokens), (4, 0, 32));
    assert!(s.output_throughput > 0.0);

    let chat = serve_load::run(&config(&url, Endpoint::Chat, 2)).expect("chat run");
    for r in &chat.runs[0].run.records {
        assert!(r.ok(), "chat request {} failed: {:?}", r.index, r.error);
        assert_eq!(r.output_tokens, 8);
        // The chat template wraps the prompt: more tokens than the words.
        assert!(r.prompt_tokens.expect("prompt_tokens") > 16);
    }
}
