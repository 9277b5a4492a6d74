// What one kernel boundary costs on the device (`kestrel microbench
// --boundaries`, cuda/boundary.rs): a chain of kernels that do almost
// nothing, each block reading one value another block of the previous
// kernel wrote, so the time per kernel is the handoff itself. Handoffs:
//
// - chain_pdl: the decode graph's (pdl_entry: griddepcontrol.wait, which
//   returns once the previous grid has completed and its writes are
//   visible, then launch_dependents);
// - chain_flag: a counter per kernel instead of the grid-completion wait:
//   each block adds to it with release semantics after its write, and the
//   next kernel's blocks poll it with acquire loads. The last block to pass
//   a counter resets it for the next replay. Polling is bounded (a flag is
//   raised instead of hanging). With `early`, every kernel calls
//   launch_dependents first, so all later kernels become resident and poll
//   at once; without, only after its own poll passed, so that (as with PDL)
//   only the next kernel waits while one runs.
//
// buf holds one float per (kernel, block): kernel i writes row i + 1 as
// one more than a value of row `src` (i, or for the first kernel the last
// row, which the previous replay wrote), so after r replays of n kernels
// the last row holds r * n everywhere, and any read that came too early
// leaves it short.

__device__ __forceinline__ void chain_step(float* buf, int src, int i) {
    unsigned g = gridDim.x, b = blockIdx.x;
    float v = __ldcg(buf + (u64)src * g + (b + 1) % g);
    buf[(u64)(i + 1) * g + b] = v + 1.0f;
}

extern "C" __global__ void chain_pdl(float* buf, int src, int i) {
    pdl_entry();
    if (threadIdx.x == 0) chain_step(buf, src, i);
}

#define CHAIN_SPIN_MAX (1 << 24)

__device__ __forceinline__ void chain_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

extern "C" __global__ void chain_flag(float* buf, int src, int i, int last, int early, unsigned* count,
                                      unsigned* pass, unsigned* failed) {
    if (early) chain_trigger();
    if (threadIdx.x != 0) return;
    unsigned g = gridDim.x;
    if (i == 0) {
        // The chain's first kernel follows whatever came before it in the
        // stream (the previous replay) the ordinary way.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    } else {
        const unsigned* c = count + i - 1;
        unsigned now = 0;
        for (int s = 0; s < CHAIN_SPIN_MAX; s++) {
            asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(now) : "l"(c) : "memory");
            if (now >= g) break;
        }
        if (now < g) atomicExch(failed, 1u);
        // Every block of this kernel has seen the counter once the last one
        // passes: that one resets it for the next replay.
        if (atomicAdd(pass + i - 1, 1u) == g - 1) {
            pass[i - 1] = 0;
            count[i - 1] = 0;
        }
    }
    if (!early) chain_trigger();
    chain_step(buf, src, i);
    if (!last) {
        unsigned old;
        asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;" : "=r"(old) : "l"(count + i), "r"(1u) : "memory");
    }
}
