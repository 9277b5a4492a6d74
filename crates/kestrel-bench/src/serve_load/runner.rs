//! Load shapes: a closed loop of N workers, or open-loop Poisson arrivals.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::client::{Client, RequestRecord, Server};
use super::config::Level;
use super::error::{Error, Result};

/// The requests of one level against one server.
#[derive(Clone, Debug)]
pub struct LevelRun {
    /// In request order.
    pub records: Vec<RequestRecord>,
    /// First send to last completion.
    pub duration_s: f64,
}

/// Sends every body once, shaped by `level`; `seed` draws the arrival times
/// of an open loop.
pub async fn run_level(
    client: &Client,
    server: &Arc<Server>,
    bodies: Arc<Vec<Bytes>>,
    level: Level,
    seed: u64,
    timeout: Duration,
) -> Result<LevelRun> {
    let start = Instant::now();
    let mut handles = Vec::new();
    match level {
        Level::Concurrency(n) => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..n.min(bodies.len()) {
                let (client, server, bodies, next) =
                    (client.clone(), server.clone(), bodies.clone(), next.clone());
                handles.push(tokio::spawn(async move {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(body) = bodies.get(i) else { break };
                        out.push(client.measure(&server, body.clone(), i, start, timeout).await);
                    }
                    out
                }));
            }
        }
        Level::Rate(rate) => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut at = 0.0f64;
            for (i, body) in bodies.iter().enumerate() {
                if rate.is_finite() {
                    // Exponential gaps of mean 1/rate: a Poisson process.
                    let u: f64 = rng.random();
                    at += -(1.0 - u).ln() / rate;
                    tokio::time::sleep_until((start + Duration::from_secs_f64(at)).into()).await;
                }
                let (client, server, body) = (client.clone(), server.clone(), body.clone());
                handles.push(tokio::spawn(async move {
                    vec![client.measure(&server, body, i, start, timeout).await]
                }));
            }
        }
    }
    let mut records = Vec::with_capacity(bodies.len());
    for h in handles {
        records.extend(h.await.map_err(|e| Error::Task(e.to_string()))?);
    }
    let duration_s = start.elapsed().as_secs_f64();
    records.sort_by_key(|r| r.index);
    Ok(LevelRun { records, duration_s })
}
