//! Backends: the `Backend` trait of fused operations, and its CPU and CUDA
//! implementations.

pub mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod layout;
pub mod memory;

pub use backend::{Activation, Backend, BlockInput, Graph, QkvRows, ResidualNorm, Result};
pub use error::BackendError;
pub use layout::{AttnParams, BatchLayout, DeviceSample, KvDType, KvSpec, RopeParams, RopeStyle, SeqLayout};
pub use memory::{DeviceAllocations, MemClass};
