//! Server metrics in the Prometheus text format, written by hand: a few
//! counters and three latency histograms are all we need, and the engine's
//! own state (running, waiting, KV blocks, prefix cache) is read from its
//! stats snapshot at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kestrel_engine::EngineStats;

/// Bucket upper bounds in seconds, shared by the three histograms: from a
/// GPU's few milliseconds per token to a CPU's seconds per request.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
struct HistogramData {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
pub struct Histogram {
    data: Mutex<HistogramData>,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let mut h = self.data.lock().unwrap_or_else(|e| e.into_inner());
        // Per-bucket counts here; made cumulative when rendered.
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            h.counts[i] += 1;
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn count(&self) -> u64 {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let h = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(h.counts.iter()) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    requests_by_status: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Time to first token, per sequence.
    pub ttft: Histogram,
    /// Time per output token after the first, per sequence.
    pub tpot: Histogram,
    /// Request arrival to last token, per sequence.
    pub e2e: Histogram,
}

impl Metrics {
    pub fn record_status(&self, status: u16) {
        let mut m = self.requests_by_status.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(status).or_insert(0) += 1;
    }

    /// Records one finished sequence's latencies.
    pub fn record_sequence(&self, first_token: Option<Duration>, total: Duration, tokens: usize) {
        self.e2e.observe(total);
        if let Some(ttft) = first_token {
            self.ttft.observe(ttft);
            if tokens > 1 {
                let decode = total.saturating_sub(ttft);
                self.tpot.observe(decode / (tokens as u32 - 1).max(1));
            }
        }
    }

    /// The whole exposition: server counters, histograms and engine gauges.
    pub fn render(&self, engine: &EngineStats, in_flight: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP kestrel_requests_total HTTP responses by status code."
        );
        let _ = writeln!(out, "# TYPE kestrel_requests_total counter");
        for (status, n) in self
            .requests_by_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "kestrel_requests_total{{status=\"{status}\"}} {n}");
        }
        counter(
            &mut out,
            "kestrel_prompt_tokens_total",
            "Prompt tokens of accepted requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "kestrel_generation_tokens_total",
            "Tokens generated and sent to clients.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        self.ttft.render(
            &mut out,
            "kestrel_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
        );
        self.tpot.render(
            &mut out,
            "kestrel_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per sequence.",
        );
        self.e2e.render(
            &mut out,
            "kestrel_e2e_request_latency_seconds",
            "Time from request arrival to its last token, per sequence.",
        );
        let hits = engine.prefix_cache.hits;
        let lookups = hits + engine.prefix_cache.misses;
        let hit_rate = if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        };
        counter(
            &mut out,
            "kestrel_prefix_cache_tokens_saved_total",
            "Prompt tokens served from the prefix cache since start.",
            engine.prefix_cache.tokens_saved,
        );
        counter(
            &mut out,
            "kestrel_spec_draft_tokens_total",
            "Tokens drafted by n-gram speculation and checked by the model since start.",
            engine.draft_tokens,
        );
        counter(
            &mut out,
            "kestrel_spec_accepted_tokens_total",
            "Drafted tokens the model confirmed (each one a decode step saved) since start.",
            engine.accepted_tokens,
        );
        let gauges: [(&str, &str, f64); 6] = [
            (
                "kestrel_num_requests_running",
                "Sequences the engine is running.",
                engine.running as f64,
            ),
            (
                "kestrel_num_requests_waiting",
                "Sequences queued in the engine.",
                engine.waiting as f64,
            ),
            (
                "kestrel_server_sequences_in_flight",
                "Sequences admitted by the server and not yet finished.",
                in_flight as f64,
            ),
            (
                "kestrel_kv_blocks_used",
                "KV cache blocks held by sequences.",
                engine.kv_blocks_used as f64,
            ),
            (
                "kestrel_kv_blocks_total",
                "KV cache blocks in the pool.",
                engine.kv_blocks_total as f64,
            ),
            (
                "kestrel_prefix_cache_hit_rate",
                "Prefix-cache block hits over lookups since start.",
                hit_rate,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {value}");
        }
        out
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.record_sequence(Some(Duration::from_millis(3)), Duration::from_millis(203), 3);
        m.record_status(200);
        m.record_status(200);
        m.record_status(400);
        let text = m.render(&EngineStats::default(), 0);
        assert!(
            text.contains("kestrel_requests_total{status=\"200\"} 2"),
            "{text}"
        );
        assert!(text.contains("kestrel_requests_total{status=\"400\"} 1"));
        // TTFT 3 ms: not in the 2.5 ms bucket, in the 5 ms one and above.
        assert!(text.contains("kestrel_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("kestrel_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("kestrel_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1"));
        // TPOT: 200 ms over 2 tokens = 100 ms.
        assert!(text.contains("kestrel_time_per_output_token_seconds_bucket{le=\"0.05\"} 0"));
        assert!(text.contains("kestrel_time_per_output_token_seconds_bucket{le=\"0.1\"} 1"));
        assert!(text.contains("kestrel_e2e_request_latency_seconds_count 1"));
    }
}
