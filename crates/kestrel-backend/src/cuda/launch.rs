//! Kernel arguments and launches through the driver API directly (cudarc's
//! builder would allocate and track events on every launch).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaModule, CudaStream};

use crate::error::BackendError;

/// One kernel parameter. Pointers are raw device addresses.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// The value's bytes, little-endian, in the low bytes of a u64: the
    /// driver copies exactly the parameter's size from this address.
    fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::I64(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

pub(crate) fn i32_of(v: usize, what: &str) -> Result<Arg, BackendError> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| BackendError::Other(format!("{what} = {v} exceeds the 32-bit kernel index range")))
}

/// Every kernel entry point of the module, looked up once.
pub(crate) struct Kernels {
    funcs: HashMap<String, CudaFunction>,
    /// Launch with programmatic stream serialization (PDL, sm_90+): see
    /// `pdl_entry` in common.cu. `KESTREL_PDL=0` turns it off.
    pdl: bool,
}

const PLAIN: [&str; 47] = [
    "hgemm_1c8",
    "tokens_from_keys",
    "sample_rows",
    "sample_chunk_max",
    "sample_chunk_draw",
    "decode_program",
    "decode_program_x2",
    "residual_norm",
    "qk_norm_rope_store",
    "copy_f32",
    "embed",
    "matmul_ref",
    "dequant_f16",
    "f32_to_f16",
    "rms_norm",
    "add_rms_norm",
    "add_inplace",
    "add_bias",
    "softcap",
    "gated_act",
    "gated_act_ld",
    "gather_rows",
    "argmax_rows",
    "qk_norm_rope",
    "head_norm_ref",
    "rope_ref",
    "write_kv",
    "attention",
    "attention_ref",
    "attention_gqa1",
    "attention_gqa2",
    "attention_gqa4",
    "attention_gqa8",
    "attention_tile1",
    "attention_tile2",
    "attention_tile4",
    "attention_tile8",
    "attention_dec4",
    "attention_dec8",
    "attention_rope",
    "attention_pre",
    "residual_norm_pre",
    "qk_norm_rope_store_pre",
    "zero_u64",
    "q8_tile_pack",
    "chain_pdl",
    "chain_flag",
];

impl Kernels {
    pub fn load(module: &Arc<CudaModule>, cc: (i32, i32)) -> Result<Kernels, BackendError> {
        let mut names: Vec<String> = PLAIN.iter().map(|s| s.to_string()).collect();
        for g in super::fused::GEMV_FAMILIES {
            for t in [1, 2, 4, 8] {
                names.push(format!("{g}_{t}"));
            }
        }
        for t in [1, 2, 4, 8] {
            names.push(format!("gemv3_{t}"));
            names.push(format!("mma_q8_0_{t}"));
            names.push(format!("mma_q8_0_argmax_{t}"));
            names.push(format!("mma_q8_0t_{t}"));
            names.push(format!("mma_q8_0t_argmax_{t}"));
            names.push(format!("hgemm_{t}"));
        }
        for t in [1, 2, 4] {
            names.push(format!("gemvp_{t}"));
        }
        let mut funcs = HashMap::new();
        for n in names {
            let f = module
                .load_function(&n)
                .map_err(|e| BackendError::Cuda(format!("kernel '{n}' missing from the module: {e}")))?;
            funcs.insert(n, f);
        }
        let pdl = cc.0 >= 9 && super::knobs::on_unless_zero("KESTREL_PDL");
        Ok(Kernels { funcs, pdl })
    }

    fn set_attribute(
        &self,
        name: &str,
        attr: cudarc::driver::sys::CUfunction_attribute,
        value: i32,
    ) -> Result<(), BackendError> {
        let f = self.func(name)?;
        // SAFETY: a plain attribute set on a loaded function.
        let r = unsafe { cudarc::driver::sys::cuFuncSetAttribute(f.cu_function(), attr, value) };
        r.result()
            .map_err(|e| BackendError::Unsupported(format!("'{name}': attribute {attr:?} = {value}: {e}")))
    }

    fn func(&self, name: &str) -> Result<&CudaFunction, BackendError> {
        self.funcs
            .get(name)
            .ok_or_else(|| BackendError::Cuda(format!("unknown kernel '{name}'")))
    }

    /// Allows `name` up to `bytes` of dynamic shared memory (above the
    /// default 48 KiB needs this opt-in).
    pub fn set_max_dynamic_smem(&self, name: &str, bytes: u32) -> Result<(), BackendError> {
        self.set_attribute(
            name,
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
    }

    /// Registers and local-memory bytes per thread of `name`.
    pub fn resources(&self, name: &str) -> Result<(i32, i32), BackendError> {
        use cudarc::driver::sys;
        let f = self.func(name)?;
        let get = |a: sys::CUfunction_attribute| {
            let mut v = 0i32;
            // SAFETY: `v` outlives the call; the function is loaded.
            let r = unsafe { sys::cuFuncGetAttribute(&mut v, a, f.cu_function()) };
            r.result()
                .map(|_| v)
                .map_err(|e| BackendError::Cuda(format!("attributes of '{name}': {e}")))
        };
        Ok((
            get(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
            get(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
        ))
    }

    /// Blocks of `name` that fit on one multiprocessor at once.
    pub fn occupancy(&self, name: &str, block: u32, smem: u32) -> Result<u32, BackendError> {
        use cudarc::driver::sys;
        let f = self.func(name)?;
        let mut n = 0i32;
        // SAFETY: `n` outlives the call; the function is loaded.
        let r = unsafe {
            sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut n,
                f.cu_function(),
                block as i32,
                smem as usize,
            )
        };
        r.result()
            .map_err(|e| BackendError::Cuda(format!("occupancy of '{name}': {e}")))?;
        Ok(n.max(0) as u32)
    }

    /// Whether launches use programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    pub fn launch(
        &self,
        stream: &CudaStream,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<(), BackendError> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to do (empty batch)
        }
        let f = self.func(name)?;
        let mut vals: Vec<u64> = args.iter().map(|a| a.bits()).collect();
        let mut params: Vec<*mut c_void> = vals.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
        let err =
            |e: String| BackendError::Cuda(format!("launching '{name}' grid {grid:?} block {block}: {e}"));
        if self.pdl {
            use cudarc::driver::sys;
            // SAFETY: an all-zero attribute is valid plain data; the id and
            // value are set next.
            let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: as for `launch_kernel` below; `cfg` and `attr` live
            // through the call.
            let r = unsafe {
                sys::cuLaunchKernelEx(&cfg, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut())
            };
            return r.result().map_err(|e| err(e.to_string()));
        }
        // SAFETY: `params` points at one properly sized value per kernel
        // parameter (callers mirror the .cu signatures); `vals` outlives the call.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| err(e.to_string()))
    }
}

/// Blocks for a grid-stride elementwise kernel over `n` elements.
pub(crate) fn grid_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65_535 * 8) as u32
}
