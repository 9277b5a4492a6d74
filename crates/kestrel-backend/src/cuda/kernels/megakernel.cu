// The decode megakernel: one persistent launch runs a whole single-row
// decode step (embedding to logits) as a program of ops recorded from the
// step's ordinary kernel launches (megakernel.rs builds it).
//
// Why: a batch-1 step of a small model is ~165 tiny dependent kernels, each
// latency-bound (launch, ramp, tail: ~4 us) while its weights take ~1 us at
// memory bandwidth. Here every block stays resident for the whole step and
// the kernels' bodies run as phases separated by grid barriers.
//
// Two kinds of ops:
// - distributed phases (GEMV, q/k norm + RoPE + KV store, attention): work
//   items spread over all blocks, exactly the items the standalone kernels'
//   blocks compute, through the same device functions;
// - replicated ops (embedding, norms, residual steps, gated activation,
//   activation staging): single-row element-wise work that every block
//   computes for itself into its own shared memory. Their results feed the
//   next GEMV from shared memory, so they cost no barrier; the residual
//   stream lives in shared memory for the whole step.
// Reductions keep the standalone kernels' grouping (logical_block_sum), so
// the logits equal the graph path's bit for bit.
//
// Pointers with the top bit set name shared-memory slots (float offset in
// the low 32 bits). Activations written by other blocks of this launch are
// read with __ldcg (L2): L1 is not coherent between SMs within a launch.

#define MK_BARRIER 0
#define MK_EMBED 1   // i: dtype, wrows, cols; f: scale; p: p0, p1, p2, tokens, out
#define MK_NORM 2    // i: cols, nthr; f: eps; p: x, w, out
#define MK_RESNORM 3 // i: cols, nthr; f: eps; p: x (in place), delta, post_w (0: none), w, out
#define MK_GATED 4   // i: act, n; p: gate, up, out
#define MK_LOAD 5    // i: n; p: src, dst
#define MK_GEMV 6    // i: nw, cols, then (kind, rows, vblocks) per weight; p: x, then (p0, p1, p2, out) per weight
#define MK_ROPE 7    // i: n_heads, n_kv_heads, head_dim, n_pairs, style, kvt, nthr; f: eps, mscale;
                     // p: q, k, v, qw, kw, inv_freq, positions, pool, slots, layer_off, v_off
#define MK_STORE 9   // i: n; p: src (slot), dst (global)
#define MK_ATTN 8    // i: kvt, bt_stride, block_size, n_heads, n_kv_heads, head_dim, window, splits;
                     // f: scale, cap; p: q, pool, positions, token_seq, block_tables, out, part, counters,
                     // layer_off, v_off

// Mirrored by `MkOp` in megakernel.rs (repr(C), 208 bytes).
struct MkOp {
    u32 code;
    u32 i[15];
    float f[4];
    u64 p[16];
};

#define MK_SHARED (1ull << 63)

__device__ __forceinline__ float* mk_ptr(u64 p, float* sm) {
    return (p & MK_SHARED) ? sm + (u32)p : (float*)p;
}

// Activation reads: shared slots directly, global memory through L2.
__device__ __forceinline__ float mk_ld(const float* p, u64 tag, long long i) {
    return (tag & MK_SHARED) ? p[i] : __ldcg(p + i);
}

// Grid-wide barrier of a resident grid on one 32-bit word: block 0 adds
// 0x80000000 - (blocks - 1), every other block 1, so the top bit flips
// once all have arrived and the low bits come back to where they were (no
// reset, no wrap-around). Release on arrival and acquire while polling
// order the blocks' writes around it: no full fences.
__device__ __forceinline__ void mk_grid_sync(u32* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        u32 old, now;
        asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;" : "=r"(old) : "l"(bar), "r"(add) : "memory");
        do {
            asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(now) : "l"(bar) : "memory");
        } while (((old ^ now) & 0x80000000u) == 0);
    }
    __syncthreads();
}

// GEMV work item `vb` of an MK_GEMV op: which weight, and its local block.
__device__ __forceinline__ int mk_gemv_item(const MkOp& op, int vb, int* local) {
    int nw = (int)op.i[0];
    for (int j = 0; j < nw; j++) {
        int nb = (int)op.i[4 + 3 * j];
        if (vb < nb) { *local = vb; return j; }
        vb -= nb;
    }
    *local = -1;
    return -1;
}

__device__ __forceinline__ int mk_gemv_items(const MkOp& op) {
    int n = 0;
    for (int j = 0; j < (int)op.i[0]; j++) n += (int)op.i[4 + 3 * j];
    return n;
}

// Bytes [a, a + n) into L2, fire and forget: one bulk (TMA) prefetch on
// sm_90, else one prefetch per 128-byte line from this thread.
__device__ __forceinline__ void mk_prefetch_range(const void* a, long long n) {
    if (n <= 0) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    u64 lo = (u64)a & ~15ull, hi = ((u64)a + (u64)n + 15ull) & ~15ull;
    for (u64 p = lo; p < hi; p += (1u << 20)) {
        u32 len = (u32)min(hi - p, (u64)(1u << 20));
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(len) : "memory");
    }
#else
    for (long long off = 0; off < n; off += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"((const u8*)a + off));
#endif
}

// Weight bytes of work item `vb` of a GEMV op (quants, and the fifth-bit
// and scale arrays the kernels read beside them) into L2.
__device__ void mk_prefetch_item(const MkOp& op, int vb) {
    int local, j = mk_gemv_item(op, vb, &local);
    if (j < 0) return;
    int kind = (int)op.i[2 + 3 * j], rows = (int)op.i[3 + 3 * j], cols = (int)op.i[1];
    int dt = kind_dt(kind), nr = GEMV_WARPS * kind_nr(kind);
    long long r0 = (long long)local * nr;
    int n = (int)min((long long)nr, rows - r0);
    if (n <= 0) return;
    long long rb = p0_row_bytes(dt, cols);
    mk_prefetch_range((const u8*)op.p[1 + 4 * j] + r0 * rb, rb * n);
    long long b1 = 0, b2 = 0; // bytes per row of p1 and p2 (dequant.cu layouts)
    if (dt == DT_Q8_0 || dt == DT_Q4_0 || dt == DT_Q5_0) b2 = cols / 32 * 2;
    if (dt == DT_Q5_0) b1 = cols / 32 * 4;
    if (dt == DT_Q6_K) b2 = cols / 256 * 2;
    if (b1) mk_prefetch_range((const u8*)op.p[2 + 4 * j] + r0 * b1, b1 * n);
    if (b2) mk_prefetch_range((const u8*)op.p[3 + 4 * j] + r0 * b2, b2 * n);
}

// This block's work items of rounds [r0, r1) of a GEMV op, one per thread.
__device__ __forceinline__ void mk_prefetch_rounds(const MkOp& op, int r0, int r1) {
    int total = mk_gemv_items(op);
    for (int r = r0 + (int)threadIdx.x; r < r1; r += blockDim.x) {
        int vb = blockIdx.x + r * gridDim.x;
        if (vb < total) mk_prefetch_item(op, vb);
    }
}


// dst[0..n) = src[0..n) (dst in shared memory). Each thread issues all of
// its loads of a pass before its first store: written as one loop, the
// compiler would order every load after the previous store (the generic
// pointers may alias) and pay one L2 latency per element.
#define MK_PASS 8
__device__ __forceinline__ void mk_stage(const float* src, u64 tag, int n, float* dst) {
    for (int base = 0; base < n; base += MK_PASS * blockDim.x) {
        float v[MK_PASS];
        #pragma unroll
        for (int k = 0; k < MK_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            v[k] = c < n ? mk_ld(src, tag, c) : 0.0f;
        }
        #pragma unroll
        for (int k = 0; k < MK_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            if (c < n) dst[c] = v[k];
        }
    }
}

__device__ void mk_embed(const MkOp& op, float* sm) {
    WeightRef w = {(const u8*)op.p[0], (const u8*)op.p[1], (const u16*)op.p[2], (int)op.i[1], (int)op.i[2],
                   (int)op.i[0]};
    long long tok = ((const u32*)op.p[3])[0];
    if (tok >= w.rows) tok = 0; // guarded on the host
    float* o = mk_ptr(op.p[4], sm);
    for (int c = threadIdx.x; c < w.cols; c += blockDim.x) o[c] = dq(w, tok, c) * op.f[0];
}

// rms_norm's arithmetic (elementwise.cu) on one row.
__device__ void mk_norm(const MkOp& op, float* sm, float* scratch) {
    int cols = (int)op.i[0], nthr = (int)op.i[1];
    const float* x = mk_ptr(op.p[0], sm);
    const float* w = (const float*)op.p[1];
    float* o = mk_ptr(op.p[2], sm);
    u64 xt = op.p[0];
    float ss = logical_block_sum(cols, nthr, [&](int c) { float v = mk_ld(x, xt, c); return v * v; }, scratch);
    float inv = rsqrtf(ss / (float)cols + op.f[0]);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = mk_ld(x, xt, c) * inv * w[c];
}

// residual_norm's arithmetic (elementwise.cu) on one row; x is a shared slot.
__device__ void mk_resnorm(const MkOp& op, float* sm, float* scratch) {
    int cols = (int)op.i[0], nthr = (int)op.i[1];
    float eps = op.f[0];
    float* x = mk_ptr(op.p[0], sm);
    // delta, post_w and w staged side by side (all loads of a pass issued
    // before its stores; see mk_stage).
    float* dr = scratch + 32;
    float* post_w = op.p[2] ? dr + cols : nullptr;
    float* w = dr + 2 * cols;
    {
        const float* src = mk_ptr(op.p[1], sm);
        const float* pw = (const float*)op.p[2];
        const float* nw = (const float*)op.p[3];
        for (int base = 0; base < cols; base += MK_PASS * blockDim.x) {
            float a[MK_PASS], b[MK_PASS], e[MK_PASS];
            #pragma unroll
            for (int k = 0; k < MK_PASS; k++) {
                int c = base + threadIdx.x + k * blockDim.x;
                bool in = c < cols;
                a[k] = in ? mk_ld(src, op.p[1], c) : 0.0f;
                b[k] = in && pw ? pw[c] : 0.0f;
                e[k] = in ? nw[c] : 0.0f;
            }
            #pragma unroll
            for (int k = 0; k < MK_PASS; k++) {
                int c = base + threadIdx.x + k * blockDim.x;
                if (c < cols) {
                    dr[c] = a[k];
                    dr[cols + c] = b[k];
                    w[c] = e[k];
                }
            }
        }
    }
    float* o = mk_ptr(op.p[4], sm);
    float pinv = 1.0f;
    if (post_w) {
        float ps = logical_block_sum(cols, nthr, [&](int c) { return dr[c] * dr[c]; }, scratch);
        pinv = rsqrtf(ps / (float)cols + eps);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = dr[c];
        d = post_w ? __fmul_rn(__fmul_rn(d, pinv), post_w[c]) : d;
        x[c] = __fadd_rn(x[c], d);
    }
    float ss = logical_block_sum(cols, nthr, [&](int c) { return x[c] * x[c]; }, scratch);
    float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = x[c] * inv * w[c];
}

__device__ void mk_gated(const MkOp& op, float* sm) {
    int act = (int)op.i[0], n = (int)op.i[1];
    const float* gate = mk_ptr(op.p[0], sm);
    const float* up = mk_ptr(op.p[1], sm);
    float* o = mk_ptr(op.p[2], sm);
    for (int base = 0; base < n; base += MK_PASS * blockDim.x) {
        float g[MK_PASS], u[MK_PASS];
        #pragma unroll
        for (int k = 0; k < MK_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            g[k] = c < n ? mk_ld(gate, op.p[0], c) : 0.0f;
            u[k] = c < n ? mk_ld(up, op.p[1], c) : 0.0f;
        }
        #pragma unroll
        for (int k = 0; k < MK_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            if (c < n) o[c] = (act == 0 ? silu(g[k]) : gelu_tanh(g[k])) * u[k];
        }
    }
}

// `next` (may be null): the program's next GEMV, whose first rounds are
// requested once this one's are computed (its weights then arrive while
// the phases in between run).
// `ahead`: rounds of work items a block keeps requested (into L2) ahead of
// the one it computes: the megakernel has few warps per SM, so weight loads
// that miss L2 would leave the memory system idle between rounds.
__device__ void mk_gemv(const MkOp& op, const MkOp* next, float* sm, int ahead) {
    const float* x = mk_ptr(op.p[0], sm);
    int cols = (int)op.i[1], total = mk_gemv_items(op);
    mk_prefetch_rounds(op, 0, ahead);
    int round = 0;
    for (int vb = blockIdx.x; vb < total; vb += gridDim.x, round++) {
        if (threadIdx.x == 0 && ahead > 0) {
            int a = blockIdx.x + (round + ahead) * gridDim.x;
            if (a < total) mk_prefetch_item(op, a);
        }
        int local, j = mk_gemv_item(op, vb, &local);
        gemv_any<1>((int)op.i[2 + 3 * j], local, (const u8*)op.p[1 + 4 * j], (const u8*)op.p[2 + 4 * j],
                    (const u16*)op.p[3 + 4 * j], (int)op.i[3 + 3 * j], cols, x, 1, (float*)op.p[4 + 4 * j]);
    }
    if (next) mk_prefetch_rounds(*next, 0, ahead);
}

__device__ void mk_rope(const MkOp& op, float* scratch) {
    int n_heads = (int)op.i[0], n_kv_heads = (int)op.i[1], head_dim = (int)op.i[2];
    for (int y = blockIdx.x; y < n_heads + n_kv_heads; y += gridDim.x) {
        rope_store_item(0, y, (int)op.i[6], scratch + 32, scratch, (float*)op.p[0], (float*)op.p[1],
                        (const float*)op.p[2], n_heads, n_kv_heads, head_dim, (const float*)op.p[3],
                        (const float*)op.p[4], op.f[0], (const float*)op.p[5], (int)op.i[3], (int)op.i[4],
                        op.f[1], (const u32*)op.p[6], (void*)op.p[7], (long long)op.p[9], (long long)op.p[10],
                        (int)op.i[5], (const u32*)op.p[8], nullptr, 0, nullptr);
        __syncthreads();
    }
}

// Two attention items side by side per block (threads 0-127 and 128-255,
// each on its own named barrier and shared area).
__device__ void mk_attn(const MkOp& op, float* scratch) {
    int head_dim = (int)op.i[5], splits = (int)op.i[7], n_heads = (int)op.i[3];
    int half = threadIdx.x / ATT_THREADS;
    if (half > 1) return;
    float* sm = scratch + half * att_smem_floats(head_dim);
    int items = n_heads * splits;
    for (int it = 2 * blockIdx.x + half; it < items; it += 2 * gridDim.x) {
        attention_item(0, it / splits, it % splits, threadIdx.x - half * ATT_THREADS, 1 + half, sm,
                       (const float*)op.p[0], (const void*)op.p[1], (long long)op.p[8], (long long)op.p[9],
                       (int)op.i[0], (const u32*)op.p[2], (const u32*)op.p[3], (const u32*)op.p[4], (int)op.i[1],
                       (int)op.i[2], n_heads, (int)op.i[4], head_dim, op.f[0], (int)op.i[6], op.f[1],
                       (float*)op.p[5], splits, (float*)op.p[6], (u32*)op.p[7], nullptr);
        bar_sync(1 + half, ATT_THREADS);
    }
}

// block = 256 threads; grid = every block resident at once (the host sizes
// it from the occupancy); dynamic shared memory = slots, then `scratch_off`
// onwards the per-phase scratch.
// 16 bytes global -> shared without waiting (cp.async); mk_copy_wait
// waits for this thread's copies.
__device__ __forceinline__ void mk_copy16(void* dst, const void* src) {
    u32 d;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(d) : "l"(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}
__device__ __forceinline__ void mk_copy_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

__device__ __forceinline__ u64 mk_clock() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// `trace` (may be null; diagnostics): block 0 stores the time at which it
// starts each op, then the end time at trace[nops]. `ahead`: see mk_gemv.
__device__ __forceinline__ void mk_run(const MkOp* ops, int nops, u32* bar, int scratch_off, u64* trace,
                                       int ahead) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // Wait for the previous kernel, but never let the next one start early:
    // its blocks could take the places this grid's barriers wait for.
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
    extern __shared__ float4 mk_sm4[];
    float* sm = (float*)mk_sm4;
    float* scratch = sm + scratch_off;
    // The op being run and the next one, copied into shared memory
    // asynchronously while the previous op runs: op fields are read many
    // times and a global read after each barrier would miss L1.
    __shared__ __align__(16) MkOp opbuf[2];
    if (threadIdx.x < 13) mk_copy16((char*)&opbuf[0] + 16 * threadIdx.x, (const char*)ops + 16 * threadIdx.x);
    mk_copy_wait();
    __syncthreads();
    for (int n = 0; n < nops; n++) {
        const MkOp& op = opbuf[n & 1];
        if (n + 1 < nops && threadIdx.x < 13)
            mk_copy16((char*)&opbuf[(n + 1) & 1] + 16 * threadIdx.x, (const char*)(ops + n + 1) + 16 * threadIdx.x);
        if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[n] = mk_clock();
        switch (op.code) {
        case MK_BARRIER:
            // The next segment's GEMV (after its replicated prologue).
            if (ahead > 0) {
                for (int k = n + 1; k < nops && ops[k].code != MK_BARRIER; k++) {
                    if (ops[k].code == MK_GEMV) { mk_prefetch_rounds(ops[k], 0, 1); break; }
                }
            }
            mk_grid_sync(bar);
            break;
        case MK_EMBED: mk_embed(op, sm); break;
        case MK_NORM: mk_norm(op, sm, scratch); break;
        case MK_RESNORM: mk_resnorm(op, sm, scratch); break;
        case MK_GATED: mk_gated(op, sm); break;
        case MK_LOAD: mk_stage((const float*)op.p[0], op.p[0], (int)op.i[0], mk_ptr(op.p[1], sm)); break;
        case MK_GEMV: {
            const MkOp* next = nullptr;
            if (ahead > 0)
                for (int k = n + 1; k < nops && !next; k++) if (ops[k].code == MK_GEMV) next = &ops[k];
            mk_gemv(op, next, sm, ahead);
            break;
        }
        case MK_ROPE: mk_rope(op, scratch); break;
        case MK_ATTN: mk_attn(op, scratch); break;
        case MK_STORE: {
            // Block 0 writes a shared slot back to global memory (for a
            // kernel launched after the program).
            if (blockIdx.x == 0) {
                const float* src = mk_ptr(op.p[0], sm);
                for (int c = threadIdx.x; c < (int)op.i[0]; c += blockDim.x) ((float*)op.p[1])[c] = src[c];
            }
            break;
        }
        default: break;
        }
        mk_copy_wait();
        __syncthreads();
    }
    if (trace && blockIdx.x == 0 && threadIdx.x == 0) trace[nops] = mk_clock();
}

// Two builds of the same program runner: registers for one block per SM,
// or at most 128 registers so that two blocks (16 warps) share an SM.
extern "C" __global__ void __launch_bounds__(256, 1) decode_program(const MkOp* ops, int nops, u32* bar,
                                                                    int scratch_off, u64* trace, int ahead) {
    mk_run(ops, nops, bar, scratch_off, trace, ahead);
}

extern "C" __global__ void __launch_bounds__(256, 2) decode_program_x2(const MkOp* ops, int nops, u32* bar,
                                                                       int scratch_off, u64* trace, int ahead) {
    mk_run(ops, nops, bar, scratch_off, trace, ahead);
}
