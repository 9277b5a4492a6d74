//! Fork-join over rayon's global pool in which the calling thread works too.
//!
//! Why not a plain `par_iter`: the model calls the backend from a thread
//! outside the pool, and rayon then parks that thread on a condvar until the
//! workers finish. On a decode step (one token, ~130 matmuls of 0.1-1 MB
//! each) the park/wake round trip (~10-20 µs on a VM) costs as much as the
//! work. Here the caller claims chunks from a shared counter itself, and
//! `threads - 1` helper jobs spawned on the pool claim from the same counter
//! when they get to run: a worker that is asleep simply joins late (or not
//! at all) instead of delaying the caller. The caller then waits, spinning,
//! only for helpers that are in the middle of a chunk.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

type Job<'a> = dyn Fn(usize) + Sync + 'a;

struct Shared {
    next: AtomicUsize,
    /// Helpers between "about to claim" and "done with their last chunk".
    active: AtomicUsize,
    /// Set when the caller stops early (a chunk panicked on its thread).
    stop: AtomicBool,
    n: usize,
    /// Lifetime-erased `&Job`. Only dereferenced after a successful claim
    /// (`next < n`), and the caller does not return (or unwind) before every
    /// helper that claimed has finished (see `run_chunks`).
    job: *const Job<'static>,
}

// SAFETY: `job` points to a `Sync` closure; the protocol in `run_chunks`
// guarantees it is alive whenever a helper calls it.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn help(&self) {
        self.active.fetch_add(1, SeqCst);
        loop {
            if self.stop.load(SeqCst) {
                break;
            }
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                break;
            }
            // SAFETY: the claim succeeded, so the caller is still inside
            // `run_chunks` and will wait for `active` to drop to zero.
            unsafe { (*self.job)(i) };
        }
        self.active.fetch_sub(1, SeqCst);
    }
}

/// Waits (on drop, so also while unwinding) until no helper runs a chunk.
struct WaitHelpers<'a>(&'a Shared);

impl Drop for WaitHelpers<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.store(true, SeqCst);
        }
        // Exhaust the counter so late helpers never start a chunk.
        self.0.next.fetch_add(self.0.n, SeqCst);
        while self.0.active.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }
}

/// Runs `f(i)` for every `i` in `0..n`, spread over the calling thread and
/// up to `rayon::current_num_threads() - 1` pool workers. Chunks should be
/// small (tens of microseconds): the caller may wait for one in progress.
pub fn run_chunks<F: Fn(usize) + Sync>(n: usize, f: F) {
    let helpers = rayon::current_num_threads()
        .saturating_sub(1)
        .min(n.saturating_sub(1));
    if helpers == 0 || rayon::current_thread_index().is_some() {
        // Inside the pool already (or nothing to share): rayon's own
        // work-stealing join does not park anyone.
        if n > 1 && helpers > 0 {
            use rayon::prelude::*;
            (0..n).into_par_iter().for_each(&f);
        } else {
            (0..n).for_each(f);
        }
        return;
    }
    let job: &Job<'_> = &f;
    // SAFETY: erases the borrow's lifetime. Sound because `WaitHelpers`
    // keeps this frame (and `f`) alive until no helper can call it again:
    // helpers only call `job` after claiming an index below `n`, and the
    // guard first exhausts the counter, then waits for `active == 0`. A
    // helper that claims after that sees `next >= n` and never calls it.
    let job: &'static Job<'static> = unsafe { std::mem::transmute::<&Job<'_>, &'static Job<'static>>(job) };
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        n,
        job,
    });
    for _ in 0..helpers {
        let s = Arc::clone(&shared);
        rayon::spawn(move || s.help());
    }
    let _guard = WaitHelpers(&shared);
    loop {
        let i = shared.next.fetch_add(1, SeqCst);
        if i >= n {
            break;
        }
        f(i);
    }
}

/// A raw pointer that may cross threads (the disjointness argument is made
/// where it is dereferenced).
struct SendPtr<T>(*mut T);

// SAFETY: only used by `chunks_mut`, which hands out disjoint ranges.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Runs `f(i, chunk_i)` over the `chunk`-sized pieces of `data` (the last
/// may be shorter), spread like [`run_chunks`].
pub fn chunks_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(data: &mut [T], chunk: usize, f: F) {
    let chunk = chunk.max(1);
    let len = data.len();
    let base = SendPtr(data.as_mut_ptr());
    run_chunks(len.div_ceil(chunk), |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: `run_chunks` calls every index exactly once, so the ranges
        // are disjoint, and they lie inside `data`, which stays mutably
        // borrowed until `run_chunks` returns.
        let piece = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, piece)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_mut_covers_the_slice_once() {
        let mut v = vec![0u32; 1003];
        chunks_mut(&mut v, 10, |i, c| {
            for (k, x) in c.iter_mut().enumerate() {
                *x += (i * 10 + k) as u32 + 1;
            }
        });
        assert!(v.iter().enumerate().all(|(k, &x)| x == k as u32 + 1));
    }

    #[test]
    fn every_chunk_runs_exactly_once() {
        for n in [0usize, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            run_chunks(n, |i| {
                counts[i].fetch_add(1, SeqCst);
            });
            assert!(counts.iter().all(|c| c.load(SeqCst) == 1), "n = {n}");
        }
    }

    #[test]
    fn borrowed_outputs_are_complete_when_it_returns() {
        let out: Vec<AtomicUsize> = (0..500).map(|_| AtomicUsize::new(0)).collect();
        for round in 1..50 {
            run_chunks(out.len(), |i| {
                // Uneven work so helpers and caller interleave.
                let mut x = i;
                for _ in 0..(i % 7) * 100 {
                    x = std::hint::black_box(x.wrapping_mul(3));
                }
                std::hint::black_box(x);
                out[i].store(round, SeqCst);
            });
            assert!(out.iter().all(|v| v.load(SeqCst) == round));
        }
    }
}
