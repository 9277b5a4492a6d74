//! Memory a run used: peak resident host memory (the kernel's high-water
//! mark, so it covers every allocation and mapped weight page touched) and
//! device memory in use as the driver reports it.

use std::path::Path;

use kestrel_backend::{Backend, DeviceAllocations};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// Peak resident set of this process (VmHWM).
    pub peak_host_mib: f64,
    /// Device memory in use (all processes on the device: the driver does
    /// not split it), when running on a GPU.
    pub device_used_mib: Option<f64>,
    pub device_total_mib: Option<f64>,
    /// Size of the model file, for scale.
    pub model_file_mib: f64,
    /// This process's device buffers by what they hold (the backend's
    /// ledger), when running on a GPU; the rest of `device_used_mib` is the
    /// CUDA context, libraries and other processes.
    pub device_buffers: Option<DeviceBuffersMib>,
}

/// `kestrel_backend::DeviceAllocations` in MiB.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceBuffersMib {
    pub weights: f64,
    pub weight_copies: f64,
    pub kv: f64,
    pub workspace: f64,
}

/// Peak resident set size (`VmHWM` of /proc/self/status) in KiB; None where
/// /proc is not available.
pub fn host_peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resets the peak to the current RSS (writing 5 to clear_refs, Linux 4.0+),
/// so that each measured pass has its own peak; false when that is refused.
pub fn reset_host_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// VmHWM in MiB (0 where /proc is unavailable).
pub fn peak_host_mib() -> f64 {
    host_peak_kib().map_or(0.0, |kb| kb as f64 / 1024.0)
}

/// The report for a run on `be` of the model file at `model`.
pub fn report<B: Backend + ?Sized>(be: &B, model: &Path) -> MemoryReport {
    let file_bytes = std::fs::metadata(model).map_or(0, |m| m.len());
    report_from(be.device_memory(), be.device_allocations(), file_bytes)
}

fn report_from(
    device: Option<(u64, u64)>,
    buffers: Option<DeviceAllocations>,
    model_file_bytes: u64,
) -> MemoryReport {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    MemoryReport {
        peak_host_mib: peak_host_mib(),
        device_used_mib: device.map(|(free, total)| mib(total.saturating_sub(free))),
        device_total_mib: device.map(|(_, total)| mib(total)),
        model_file_mib: mib(model_file_bytes),
        device_buffers: buffers.map(|a| DeviceBuffersMib {
            weights: mib(a.weights),
            weight_copies: mib(a.weight_copies),
            kv: mib(a.kv),
            workspace: mib(a.workspace),
        }),
    }
}

pub fn describe(m: &MemoryReport) -> String {
    let mut s = format!("memory: peak host {:.0} MiB", m.peak_host_mib);
    if let (Some(u), Some(t)) = (m.device_used_mib, m.device_total_mib) {
        s += &format!(", device {u:.0} of {t:.0} MiB in use");
        if let Some(b) = &m.device_buffers {
            s += &format!(
                " (weights {:.0}, weight copies {:.0}, KV {:.0}, workspace {:.0} MiB; the rest is the CUDA context and libraries)",
                b.weights, b.weight_copies, b.kv, b.workspace
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_buffers_are_named_in_the_description() {
        let a = DeviceAllocations {
            weights: 247 << 20,
            weight_copies: 900 << 20,
            kv: 18 << 20,
            workspace: 60 << 20,
        };
        let m = report_from(Some((78_000 << 20, 80_000 << 20)), Some(a), 253 << 20);
        let d = describe(&m);
        assert!(
            d.contains(
                "device 2000 of 80000 MiB in use (weights 247, weight copies 900, KV 18, workspace 60 MiB"
            ),
            "{d}"
        );
        let cpu = describe(&report_from(None, None, 253 << 20));
        assert!(!cpu.contains("device") && !cpu.contains("weights"), "{cpu}");
    }

    #[test]
    fn vm_hwm_is_read_from_status_text() {
        let s = "Name:\tkestrel\nVmPeak:\t  999 kB\nVmHWM:\t   123456 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(s), Some(123_456));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
    }

    #[test]
    fn peak_host_memory_is_read_from_proc() {
        // This test process has touched at least a few MiB.
        let v = peak_host_mib();
        assert!(v > 1.0, "VmHWM {v} MiB");
        let r = report_from(Some((1 << 30, 4 << 30)), None, 0);
        assert_eq!(r.device_used_mib, Some(3072.0));
    }
}
