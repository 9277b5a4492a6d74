//! `--device auto|cpu|cuda[:N]`: pick a backend and run a command on it.
//!
//! Commands are generic over the backend; `dispatch` builds the chosen one
//! and calls the command's `run::<B>`.

use std::sync::Arc;

use anyhow::{bail, Result};
use kestrel_backend::cpu::CpuBackend;
use kestrel_backend::{Backend, KvDType};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => Err(format!("'{s}' is not a device: use auto, cpu, cuda or cuda:N")),
            },
        }
    }
}

/// `--kernels fused|reference`: the CUDA kernel set (the CPU has one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernels {
    #[default]
    Fused,
    Reference,
}

/// `--kv auto|f32|f16`: the KV cache element type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvArg {
    /// f16 on a GPU (half the memory and bandwidth of attention, llama.cpp's
    /// default too), f32 on the CPU (whose f16 cache path is slower).
    #[default]
    Auto,
    F32,
    F16,
}

impl KvArg {
    pub fn dtype<B: Backend>(self, backend: &B) -> KvDType {
        match self {
            KvArg::F32 => KvDType::F32,
            KvArg::F16 => KvDType::F16,
            KvArg::Auto if backend.device_memory().is_some() => KvDType::F16,
            KvArg::Auto => KvDType::F32,
        }
    }
}

/// A command that can run on any backend.
pub trait BackendTask {
    type Output;
    fn run<B: Backend + 'static>(self, backend: Arc<B>) -> Result<Self::Output>;
}

/// Build the backend for `device` and run `task` on it. `auto` takes the
/// GPU when one is usable and otherwise says in one line why it runs on the CPU.
pub fn dispatch<T: BackendTask>(device: Device, task: T) -> Result<T::Output> {
    dispatch_with(device, Kernels::Fused, task)
}

/// `dispatch` with a choice of CUDA kernel set.
pub fn dispatch_with<T: BackendTask>(device: Device, kernels: Kernels, task: T) -> Result<T::Output> {
    match device {
        Device::Cpu => task.run(Arc::new(CpuBackend::new())),
        Device::Cuda(n) => match open_cuda(n, kernels) {
            Ok(run) => run(task),
            Err(why) => bail!("--device cuda:{n}: no usable GPU: {why}"),
        },
        Device::Auto => match open_cuda(0, kernels) {
            Ok(run) => run(task),
            Err(why) => {
                eprintln!("device: cpu (no usable GPU: {why})");
                task.run(Arc::new(CpuBackend::new()))
            }
        },
    }
}

type Runner<T> = Box<dyn FnOnce(T) -> Result<<T as BackendTask>::Output>>;

#[cfg(feature = "cuda")]
fn open_cuda<T: BackendTask>(ordinal: usize, kernels: Kernels) -> std::result::Result<Runner<T>, String> {
    use kestrel_backend::cuda::{CudaBackend, KernelSet};
    let set = match kernels {
        Kernels::Fused => KernelSet::Fused,
        Kernels::Reference => KernelSet::Reference,
    };
    let be = CudaBackend::with_kernels(ordinal, set).map_err(|e| e.to_string())?;
    // Tuning knob for benchmarks: the most key splits of decode attention.
    if let Some(n) = std::env::var("KESTREL_ATTN_SPLITS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        be.set_max_attention_splits(n);
    }
    Ok(Box::new(move |task: T| task.run(Arc::new(be))))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda<T: BackendTask>(_ordinal: usize, _kernels: Kernels) -> std::result::Result<Runner<T>, String> {
    Err("this kestrel was built without the `cuda` feature".into())
}
