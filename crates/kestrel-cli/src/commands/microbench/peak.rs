//! The device's peak memory bandwidth, measured at startup, against which
//! every op's achieved GB/s is rated.
//!
//! On any backend, through the trait (so CUDA needs nothing of its own):
//! a row copy (`gather_rows` of every row: read + write), `add` (two reads,
//! one write), `softcap` (read + write) and `argmax_rows` (read only, as a
//! GEMV's weights) over a buffer of `--peak-mib`. The trait has no raw
//! device-to-device memcpy; these are the plainest streaming kernels it
//! offers. On the CPU those ops run on one thread
//! (all but softcap), so the host is also measured directly: a read (sum)
//! and a copy split over every logical core. The peak is the best of all.

use std::time::Instant;

use anyhow::Result;
use kestrel_backend::Backend;
use serde::Serialize;

/// Repetitions of each probe; the best is kept (a peak, not a typical figure).
const REPEATS: usize = 5;

#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    pub name: String,
    /// Bytes read plus bytes written by one pass.
    pub bytes: f64,
    pub gb_s: f64,
    /// Why the probe could not run (then `gb_s` is 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    pub gb_s: f64,
    /// The probe that gave the peak.
    pub method: String,
    pub buffer_mib: usize,
    pub probes: Vec<Probe>,
}

fn best_of(bytes: f64, pass: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    // One untimed pass: page faults, first-touch and lazy allocations.
    pass()?;
    let mut best = f64::INFINITY;
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        pass()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(bytes / best.max(1e-12) / 1e9)
}

/// Runs one probe into `out`; a failure is kept with its error.
fn probe(out: &mut Vec<Probe>, name: &str, bytes: f64, pass: &mut dyn FnMut() -> Result<()>) {
    let (gb_s, error) = match best_of(bytes, pass) {
        Ok(v) => (v, None),
        Err(e) => (0.0, Some(format!("{e:#}"))),
    };
    out.push(Probe {
        name: name.into(),
        bytes,
        gb_s,
        error,
    });
}

/// Streaming probes through the trait over `mib` MiB of f32. A probe that
/// fails is reported with its error and left out of the peak (the rest of
/// the run does not depend on it).
pub fn backend_probes<B: Backend>(be: &B, mib: usize) -> Result<Vec<Probe>> {
    // Rows of 64 KiB: enough rows for one block per row to fill a GPU.
    let cols = 16 * 1024;
    let rows = (mib * 1024 * 1024 / 4 / cols).max(1);
    let n = (rows * cols * 4) as f64;
    let mut x = be.alloc_act(rows, cols)?;
    let y = be.alloc_act(rows, cols)?;
    let mut out = be.alloc_act(rows, cols)?;
    let all: Vec<u32> = (0..rows as u32).collect();
    let mut probes = Vec::new();
    probe(&mut probes, "gather_rows (copy)", 2.0 * n, &mut || {
        be.gather_rows(&x, &all, &mut out)?;
        Ok(be.synchronize()?)
    });
    probe(&mut probes, "add (2 reads, 1 write)", 3.0 * n, &mut || {
        be.add(&mut x, &y)?;
        Ok(be.synchronize()?)
    });
    probe(&mut probes, "softcap (read + write)", 2.0 * n, &mut || {
        be.softcap(&mut out, 30.0)?;
        Ok(be.synchronize()?)
    });
    // Read-only, as a GEMV's weights: the whole buffer in, one id per row
    // out (and a small copy back to the host, which the size dwarfs).
    probe(&mut probes, "argmax_rows (read)", n, &mut || {
        be.argmax_rows(&y)?;
        Ok(())
    });
    Ok(probes)
}

/// Host memory read and copy over `mib` MiB, split over every logical core.
pub fn host_probes(mib: usize) -> Result<Vec<Probe>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let len = (mib * 1024 * 1024 / 8).max(threads);
    // Written first, so that every page is backed before the timed passes.
    let src: Vec<u64> = (0..len as u64).collect();
    let mut dst = vec![0u64; len];
    let chunk = len.div_ceil(threads);
    let n = (len * 8) as f64;
    let mut sink = 0u64;
    let read = best_of(n, &mut || {
        let sums: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = src
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &v| a.wrapping_add(v))))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).collect()
        });
        sink = sink.wrapping_add(sums.iter().fold(0, |a, &v| a.wrapping_add(v)));
        Ok(())
    })?;
    let copy = best_of(2.0 * n, &mut || {
        std::thread::scope(|s| {
            for (d, c) in dst.chunks_mut(chunk).zip(src.chunks(chunk)) {
                s.spawn(move || d.copy_from_slice(c));
            }
        });
        Ok(())
    })?;
    // Keeps the sums observable so the read pass cannot be optimised away.
    std::hint::black_box(sink);
    std::hint::black_box(&dst);
    Ok(vec![
        Probe {
            name: format!("host read ({threads} threads)"),
            bytes: n,
            gb_s: read,
            error: None,
        },
        Probe {
            name: format!("host copy ({threads} threads)"),
            bytes: 2.0 * n,
            gb_s: copy,
            error: None,
        },
    ])
}

/// The best of `probes`.
pub fn peak(probes: Vec<Probe>, mib: usize) -> Peak {
    let best = probes
        .iter()
        .max_by(|a, b| a.gb_s.total_cmp(&b.gb_s))
        .map(|p| (p.gb_s, p.name.clone()))
        .unwrap_or((0.0, "none".into()));
    Peak {
        gb_s: best.0,
        method: best.1,
        buffer_mib: mib,
        probes,
    }
}
