//! Device memory on CUDA: the backend's ledger says what its buffers hold
//! (the model's weights, copies made for speed, KV, workspace), and many
//! generations in one process leave nothing behind. Its own test binary:
//! the ledger counts every buffer of the process, so no other test may
//! allocate beside it. Skips where no GPU is present.

mod common;

use std::sync::Arc;

use kestrel_backend::cuda::{CudaBackend, KernelSet};
use kestrel_backend::{Backend, DeviceAllocations};
use kestrel_model::Model;

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn show(what: &str, a: &DeviceAllocations, used: u64) {
    println!(
        "{what}: weights {:.1} MiB, weight copies {:.1}, KV {:.1}, workspace {:.1}; driver: {:.1} MiB in use",
        mib(a.weights),
        mib(a.weight_copies),
        mib(a.kv),
        mib(a.workspace),
        mib(used)
    );
}

fn used<B: Backend>(be: &B) -> u64 {
    let (free, total) = be.device_memory().expect("a CUDA backend reports device memory");
    total - free
}

#[test]
fn generations_leave_no_device_memory_behind() {
    let Some(be) = CudaBackend::for_tests(KernelSet::Fused) else {
        return;
    };
    let file_bytes = std::fs::metadata(common::default_model()).unwrap().len();
    let model = Model::load(&common::default_model(), Arc::new(be)).unwrap();
    let be = &model.backend;
    let loaded = be.device_allocations().expect("CUDA keeps a ledger");
    show("loaded", &loaded, used(be.as_ref()));
    // The stored tensors are the file's bytes less its header and padding.
    assert!(
        loaded.weights > file_bytes * 9 / 10 && loaded.weights < file_bytes * 11 / 10,
        "weights {} bytes for a {file_bytes}-byte file",
        loaded.weights
    );
    assert_eq!(loaded.kv, 0, "no KV pool before a generation");
    // Prompts of several lengths, so that prefill scratch is sized by the
    // longest before the baseline; each generation allocates and drops its
    // own KV pool, captures or replays decode graphs.
    let prompts: Vec<Vec<u32>> = [9u32, 40, 97, 17]
        .iter()
        .map(|&n| (0..n).map(|i| 2 + (i * 7919 + n) % 200_000).collect())
        .collect();
    for p in &prompts {
        common::greedy(&model, p, 24);
    }
    let warm = be.device_allocations().unwrap();
    let warm_used = used(be.as_ref());
    show("after warm-up", &warm, warm_used);
    assert_eq!(warm.kv, 0, "every generation's KV pool is released");
    for round in 0..6 {
        for p in &prompts {
            common::greedy(&model, p, 24);
        }
        let now = be.device_allocations().unwrap();
        assert_eq!(now, warm, "round {round}: the ledger changed across generations");
    }
    let end_used = used(be.as_ref());
    show(
        "after 24 more generations",
        &be.device_allocations().unwrap(),
        end_used,
    );
    // The driver's count also covers graphs and library state outside the
    // ledger; a leak of one generation's buffers would show as MiBs each
    // round.
    assert!(
        end_used <= warm_used + (8 << 20),
        "device memory in use grew from {:.1} to {:.1} MiB over 24 generations",
        mib(warm_used),
        mib(end_used)
    );
}
