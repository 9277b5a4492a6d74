// Shared helpers of every kestrel kernel. Deliberately free of toolkit
// headers (cuda_fp16.h, cuda_bf16.h): NVRTC on the target machine may have
// no include path, so half and bfloat16 are handled as raw 16-bit patterns.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Weight dtype codes; must match `WeightFormat::code` on the Rust side.
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_Q8_0 3
#define DT_Q4_0 4
#define DT_Q5_0 5
#define DT_Q4_K 6
#define DT_Q5_K 7
#define DT_Q6_K 8

// KV pool element codes; must match `KvDType` order on the Rust side.
#define KV_F32 0
#define KV_F16 1
#define KV_BF16 2

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}

// Round to nearest even, NaN kept quiet (same as half::bf16::from_f32).
__device__ __forceinline__ u16 f2bf(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((x >> 16) | 0x40u);
    }
    u32 round = 0x7fffu + ((x >> 16) & 1u);
    return (u16)((x + round) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024 threads).
// `scratch` must hold 32 floats; the result is returned to every thread.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f; // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ float silu(float x) {
    return x / (1.0f + expf(-x));
}

__device__ __forceinline__ float kv_load(const void* base, u64 i, int kvt) {
    if (kvt == KV_F32) return ((const float*)base)[i];
    if (kvt == KV_F16) return h2f(((const u16*)base)[i]);
    return bf2f(((const u16*)base)[i]);
}

__device__ __forceinline__ void kv_store(void* base, u64 i, int kvt, float v) {
    if (kvt == KV_F32) ((float*)base)[i] = v;
    else if (kvt == KV_F16) ((u16*)base)[i] = f2h(v);
    else ((u16*)base)[i] = f2bf(v);
}

// L2 residency hints, written once by the host after loading the module
// (tuning knob KESTREL_L2; 0 = none, the default). Bit 0: the tall Q8_0
// GEMV (the LM head: 178 MB per decode step of the default model, more than
// the L2) streams its weights with evict-first loads and no prefetch, so it
// stops flushing the layer weights out of the L2. Bits 1-4: eighths of the
// other weights' 128-byte lines (chosen by a hash of the address, so the same
// lines every step) that the GEMVs' pre-wait prefetch marks evict-last, kept
// in the L2 across steps (at one sequence a step's layer weights, ~69 MB,
// do not all fit in it).
extern "C" {
__device__ int kestrel_l2_hints = 0;
}

// 16 bytes of a weight the L2 should not keep (`ld.global.cs`: evict-first).
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
    uint4 v;
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ u16 ld_stream2(const u16* p) {
    u16 v;
    asm("ld.global.cs.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

// Programmatic dependent launch (Hopper): kernels are launched so that the
// next one in the stream may start while this one drains. Every kernel first
// waits for its predecessor's results (griddepcontrol.wait returns once the
// previous grid has finished and its writes are visible), then lets its own
// successor begin launching: the successor's launch latency and block
// scheduling overlap this kernel's run instead of following it. Both are
// no-ops when the launch did not ask for it and below sm_90.
__device__ __forceinline__ void pdl_entry() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Phase stamps of decode attention (diagnostic; compiled in only when the
// host sets KESTREL_TRACE=1, which prefixes the source with
// `#define KESTREL_TRACE 1`, so the default module is unchanged). Slots of
// kestrel_trace (i64, summed over launches, in ns of %globaltimer; the host
// allocates and reads it, cuda/trace.rs): see TRACE_* below.
#ifdef KESTREL_TRACE
extern "C" {
__device__ long long* kestrel_trace = 0;
}
__device__ __forceinline__ long long trace_now() {
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
#define TRACE_N 0          // attention launches stamped (block (0, 0, 0))
#define TRACE_ENTRY_WAIT 1 // kernel entry -> PDL wait returned
#define TRACE_WAIT_Q 2     // wait returned -> query loaded (first barrier)
#define TRACE_KEYS 3       // the split's keys
#define TRACE_PARTIAL 4    // warp merge, partial written, fence, counter
#define TRACE_MERGE_N 5    // merges stamped (the (0, 0) row/head's last split)
#define TRACE_MERGE 6      // that block: wait returned -> merged output written
#define TRACE_ROPE_END 7   // latest end of a qk_norm_rope_store_pre block (absolute)
#define TRACE_ROPE_WAIT 8  // rope end -> attention's wait returned (block (0, 0, 0))
#define TRACE_ROPE_ENTRY 9 // rope end -> attention's entry (negative: resident before)
#define TRACE_SLOTS 10
#define TRACE(...) __VA_ARGS__
#else
#define TRACE(...)
#endif
