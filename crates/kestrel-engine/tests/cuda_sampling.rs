//! Sampling on the GPU (`Backend::sample_rows`) against an independent
//! sort-based reference of the sampler chain. Each case samples one logits
//! row N times with the uniform draws u_j = (j + 0.5) / N: the device walks
//! the kept tokens in id order, so token i is picked N * p_i times up to
//! one, where p_i is its probability after temperature, top-k, top-p and
//! min-p. That checks the kept set and the weights exactly, not
//! statistically (rows without top-k and top-p take the chunked kernel,
//! which walks in id order too). Greedy rows with penalties must equal the host sampler's
//! choice. Skips, saying so, where no GPU is usable.

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::{Backend, DeviceSample};
use kestrel_engine::sampling::{Sampler, SamplingParams};

fn pseudo_logits(n: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * spread
        })
        .collect()
}

/// The chain by sorting: best-first order (value desc, id asc), top-k
/// prefix, top-p prefix of that (mass over the top-k set), min-p.
fn reference_probs(logits: &[f32], t: f32, top_k: usize, top_p: f32, min_p: f32) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let s: Vec<f32> = logits.iter().map(|&l| (l - max) / t).collect();
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    if top_p < 1.0 {
        let mass: f64 = order.iter().map(|&i| f64::from(s[i].exp())).sum();
        let mut cum = 0.0;
        let mut keep = order.len();
        for (n, &i) in order.iter().enumerate() {
            cum += f64::from(s[i].exp());
            if cum >= f64::from(top_p) * mass {
                keep = n + 1;
                break;
            }
        }
        order.truncate(keep);
    }
    if min_p > 0.0 {
        order.retain(|&i| s[i] >= min_p.ln());
    }
    let mut p = vec![0.0; s.len()];
    let total: f64 = order.iter().map(|&i| f64::from(s[i].exp())).sum();
    for &i in &order {
        p[i] = f64::from(s[i].exp()) / total;
    }
    p
}

fn row(t: f32, top_k: u32, top_p: f32, min_p: f32, u: f64) -> DeviceSample {
    DeviceSample {
        greedy: false,
        inv_t: 1.0 / t,
        top_k,
        top_p: if top_p < 1.0 { top_p } else { 2.0 },
        min_p_log: if min_p > 0.0 {
            min_p.ln()
        } else {
            f32::NEG_INFINITY
        },
        repetition: 1.0,
        presence: 0.0,
        frequency: 0.0,
        u,
        penalties: Vec::new(),
    }
}

fn sample(be: &CudaBackend, logits: &[f32], rows: &[DeviceSample]) -> Vec<u32> {
    let vocab = logits.len();
    let mut act = be.alloc_act(rows.len(), vocab).unwrap();
    let all: Vec<f32> = (0..rows.len()).flat_map(|_| logits.iter().copied()).collect();
    be.write_act(&mut act, &all).unwrap();
    be.sample_rows(&act, rows).unwrap()
}

#[test]
fn device_sampling_matches_the_sorted_reference_and_the_host_sampler() {
    let Some(be) = CudaBackend::for_tests(KernelSet::Fused) else {
        return;
    };
    let n = 4096usize;
    let mut failures = Vec::new();
    // (vocab, logit spread, temperature, top_k, top_p, min_p)
    let cases = [
        (1000, 8.0, 1.0, 0, 1.0, 0.0),
        (1000, 8.0, 0.7, 20, 1.0, 0.0),
        (1000, 8.0, 1.0, 0, 0.8, 0.0),
        (1000, 8.0, 1.3, 0, 1.0, 0.05),
        (1000, 8.0, 0.9, 50, 0.9, 0.02),
        (3000, 3.0, 1.0, 0, 0.95, 0.0),
        // Ties: 40 equal best logits, top-k (then top-p) cuts inside them.
        (1000, 0.0, 1.0, 7, 1.0, 0.0),
        (1000, 0.0, 1.0, 0, 0.5, 0.0),
        (1000, 0.0, 1.0, 30, 0.4, 0.0),
        // No top-k or top-p: the chunked sampler (2,048 ids per block),
        // here over several chunks, with and without min-p, and ties.
        (20000, 8.0, 1.0, 0, 1.0, 0.0),
        (20000, 8.0, 1.3, 0, 1.0, 0.05),
        (5000, 0.0, 1.0, 0, 1.0, 0.0),
    ];
    for (c, &(vocab, spread, t, k, p, mp)) in cases.iter().enumerate() {
        let mut logits = pseudo_logits(vocab, c as u64 + 1, spread);
        if spread == 0.0 {
            logits = (0..vocab).map(|i| if i % 25 == 3 { 1.0 } else { -2.0 }).collect();
        }
        let rows: Vec<DeviceSample> = (0..n)
            .map(|j| row(t, k, p, mp, (j as f64 + 0.5) / n as f64))
            .collect();
        let got = sample(&be, &logits, &rows);
        let want = reference_probs(&logits, t, k as usize, p, mp);
        let mut counts = vec![0usize; vocab];
        for &g in &got {
            counts[g as usize] += 1;
        }
        let worst = (0..vocab)
            .map(|i| (counts[i] as f64 - want[i] * n as f64).abs())
            .fold(0.0f64, f64::max);
        let kept = want.iter().filter(|&&q| q > 0.0).count();
        let outside = (0..vocab).filter(|&i| want[i] == 0.0 && counts[i] > 0).count();
        println!("case {c}: vocab {vocab} T {t} top_k {k} top_p {p} min_p {mp}: kept {kept}, max |count - N p| {worst:.2}, picks outside the kept set {outside}");
        if worst > 1.5 || outside > 0 {
            failures.push(format!(
                "case {c}: max deviation {worst:.2}, {outside} picks outside the kept set"
            ));
        }
    }

    // Non-finite logits in a draw (the chunked sampler): +inf counts as the
    // largest finite value, so it takes every draw; a row of -inf and NaN
    // answers token 0, as the host does.
    let mut inf_row = pseudo_logits(20000, 7, 8.0);
    inf_row[12345] = f32::INFINITY;
    inf_row[3] = f32::NAN;
    let rows: Vec<DeviceSample> = (0..16)
        .map(|j| row(1.0, 0, 1.0, 0.0, (j as f64 + 0.5) / 16.0))
        .collect();
    let got = sample(&be, &inf_row, &rows);
    if got.iter().any(|&g| g != 12345) {
        failures.push(format!("a +inf logit must take every draw: {got:?}"));
    }
    let dead: Vec<f32> = (0..20000)
        .map(|i| if i % 2 == 0 { f32::NEG_INFINITY } else { f32::NAN })
        .collect();
    let got = sample(&be, &dead, &rows[..4]);
    if got.iter().any(|&g| g != 0) {
        failures.push(format!("a row without a finite logit must give token 0: {got:?}"));
    }

    // Greedy with penalties, on a Gemma-sized vocabulary: the host sampler's token.
    let vocab = 262_144;
    let logits = pseudo_logits(vocab, 99, 6.0);
    let mut best: Vec<u32> = (0..vocab as u32).collect();
    best.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    let prompt: Vec<u32> = best[..3].to_vec();
    let generated: Vec<u32> = vec![best[3], best[3], best[4], best[10]];
    let mut rows = Vec::new();
    let mut host = Vec::new();
    for (rep, pres, freq) in [(1.0, 0.0, 0.0), (1.5, 0.0, 0.0), (1.0, 1.0, 0.5), (2.0, 0.5, 0.5)] {
        let params = SamplingParams {
            repetition_penalty: rep,
            presence_penalty: pres,
            frequency_penalty: freq,
            ..Default::default()
        };
        let mut s = Sampler::new(&params);
        rows.push(s.device_request(&prompt, &generated, vocab));
        let mut l = logits.clone();
        host.push(
            Sampler::new(&params)
                .sample(&mut l, &prompt, &generated)
                .unwrap()
                .token,
        );
    }
    let got = sample(&be, &logits, &rows);
    println!("greedy with penalties: device {got:?}, host {host:?}");
    if got != host {
        failures.push(format!("greedy with penalties: device {got:?}, host {host:?}"));
    }
    // Top-3 on the large vocabulary: every pick among the three best.
    let rows: Vec<DeviceSample> = (0..64)
        .map(|j| row(1.0, 3, 1.0, 0.0, (j as f64 + 0.5) / 64.0))
        .collect();
    let got = sample(&be, &logits, &rows);
    if got.iter().any(|g| !best[..3].contains(g)) {
        failures.push(format!(
            "top-3 on 262,144 tokens picked outside the best three: {got:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
