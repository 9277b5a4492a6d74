//! Device memory a backend holds, by what it is for. The driver's free/total
//! pair (`Backend::device_memory`) counts everything on the device, the
//! CUDA context and libraries and other processes included; this ledger
//! counts only the buffers this process allocated, so a report can say how
//! much is weights, weight copies made for speed, KV cache and workspace,
//! and a test can check that generations do not leave buffers behind.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a device buffer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemClass {
    /// The model's tensors as uploaded (stored formats, norm vectors, RoPE
    /// tables).
    Weights = 0,
    /// Copies of weights kept for speed: f16 mirrors, stacked mirrors, the
    /// LM head's tiled copy.
    WeightCopies = 1,
    /// KV cache pools.
    Kv = 2,
    /// Activations, scratch, batch metadata, library workspaces.
    Workspace = 3,
}

/// Bytes held per class (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceAllocations {
    pub weights: u64,
    pub weight_copies: u64,
    pub kv: u64,
    pub workspace: u64,
}

impl DeviceAllocations {
    pub fn total(&self) -> u64 {
        self.weights + self.weight_copies + self.kv + self.workspace
    }
}

/// Live bytes per class; add on allocation, subtract on release.
#[derive(Debug, Default)]
pub struct Ledger {
    bytes: [AtomicU64; 4],
}

impl Ledger {
    pub const fn new() -> Ledger {
        Ledger {
            bytes: [
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
        }
    }

    pub fn add(&self, class: MemClass, bytes: u64) {
        self.bytes[class as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn sub(&self, class: MemClass, bytes: u64) {
        // Saturating: a release never drives a class below zero.
        let _ = self.bytes[class as usize].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            Some(b.saturating_sub(bytes))
        });
    }

    pub fn snapshot(&self) -> DeviceAllocations {
        let b = |c: MemClass| self.bytes[c as usize].load(Ordering::Relaxed);
        DeviceAllocations {
            weights: b(MemClass::Weights),
            weight_copies: b(MemClass::WeightCopies),
            kv: b(MemClass::Kv),
            workspace: b(MemClass::Workspace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_each_class_and_returns_to_zero() {
        let l = Ledger::new();
        l.add(MemClass::Weights, 100);
        l.add(MemClass::Kv, 30);
        l.add(MemClass::Workspace, 7);
        l.add(MemClass::WeightCopies, 50);
        let s = l.snapshot();
        assert_eq!((s.weights, s.weight_copies, s.kv, s.workspace), (100, 50, 30, 7));
        assert_eq!(s.total(), 187);
        l.sub(MemClass::Kv, 30);
        l.sub(MemClass::Workspace, 7);
        assert_eq!(l.snapshot().kv, 0);
        // An unbalanced release stops at zero instead of wrapping.
        l.sub(MemClass::Workspace, 1);
        assert_eq!(l.snapshot().workspace, 0);
        assert_eq!(l.snapshot().weights, 100);
    }
}
