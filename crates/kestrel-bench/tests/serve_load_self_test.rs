//! The client self-test: its mock stream is consumed completely and counted
//! exactly.

use kestrel_bench::serve_load::{self_test, SelfTestConfig};

#[test]
fn self_test_counts_every_streamed_token() {
    let cfg = SelfTestConfig {
        streams: 4,
        requests: 8,
        tokens_per_request: 2000,
    };
    let r = self_test(cfg).expect("self-test");
    assert_eq!(r.errors, 0);
    assert_eq!(r.tokens, 16_000);
    assert!(r.wall_s > 0.0);
    assert!((r.tokens_per_s - 16_000.0 / r.wall_s).abs() < 1e-6);
    // Far below the target (100k/s on one core): only a gross regression
    // (or a stalled client) fails this on a busy shared machine.
    assert!(r.tokens_per_s > 10_000.0, "{:.0} tok/s", r.tokens_per_s);
    let v = r.result_json();
    assert_eq!(v["kind"], "bench-serve");
    assert_eq!(v["rows"][0]["metric"], "client_tok_s");
    assert_eq!(v["rows"][0]["raw"][0], r.tokens_per_s);
}
