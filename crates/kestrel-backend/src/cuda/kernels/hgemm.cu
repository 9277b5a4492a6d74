// Tensor-core product of an f16 weight matrix (a dense mirror) with 1..64
// f16 activation rows: the layer GEMMs of batched decode steps.
//
// Why by hand: at 64 rows the cuBLAS kernels took 5.3-6.5 us each (ncu,
// H100, default model: QKV, Wo, gate/up, down; 4 per layer, 24.6 us of a
// 62 us layer) for 1.3-5.2 MB of weights, 0.4-1.6 us of DRAM time, and
// they take no part in programmatic dependent launch: the kernel after
// them cannot start its prologue early, and they cannot load weights
// before the previous kernel ends. Here the weights (which no kernel of
// the step writes) are loaded before the PDL wait.
//
// Shape: out[n * ldc + r] = sum_k W[r, k] * X[n, k] for r < m, n < t <=
// 8 * NT; W is [m, k] row-major, X [t, k] row-major, k % 32 == 0. A block
// of HG_WARPS warps takes 16 weight rows (one m16 tile) and all t
// activation rows (NT n8 tiles); its warps split k in spans of 32 (warp w
// takes spans w, w + HG_WARPS, ...), each holding HG_CHUNK spans of
// weights in registers at once, and the warps' partial tiles are summed in
// shared memory in warp order, so every output's summation order is the
// same for every t (a row's result does not depend on the batch).
//
// Within a span, lane (g = lane / 4, t = lane % 4) loads 16 bytes of
// weight rows g and g + 8 and of activation rows 8q + g at k = 8t .. 8t + 7
// and uses them in two k16 steps: step s takes k = 8t + 4s + (0..3) as the
// fragment's logical k = 2t, 2t+1, 2t+8, 2t+9 of both operands (the dot
// product does not depend on the order of k).

#define HG_WARPS 8
#define HG_THREADS (32 * HG_WARPS)
#define HG_CHUNK 4

// Shared memory of the warps' partial tiles: [HG_WARPS][NT][32 lanes][4].
__host__ __device__ constexpr int hgemm_smem_floats(int nt) { return HG_WARPS * nt * 32 * 4; }

// The block's 16 weight rows times the t activation rows, left as the warps'
// partial tiles in `red` (hgemm_smem_floats(NT) floats; read them with
// hgemm_sum). Calls pdl_entry after issuing its first weight loads.
template <int NT>
__device__ __forceinline__ void hgemm_partials(const u16* __restrict__ w, int m, int k, const u16* __restrict__ x,
                                               int t, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    int r0 = blockIdx.x * 16;
    // Rows past the end read the last row (not stored).
    const u16* wa = w + (long long)min(r0 + g, m - 1) * k + 8 * tq;
    const u16* wb = w + (long long)min(r0 + g + 8, m - 1) * k + 8 * tq;
    int nsp = k >> 5;
    int mine = nsp > warp ? (nsp - warp + HG_WARPS - 1) / HG_WARPS : 0;
    uint4 A[HG_CHUNK][2];
    #pragma unroll
    for (int c = 0; c < HG_CHUNK; c++) {
        if (c < mine) {
            int p = warp + HG_WARPS * c;
            A[c][0] = *(const uint4*)(wa + p * 32);
            A[c][1] = *(const uint4*)(wb + p * 32);
        }
    }
    // The warp's later spans into L2 meanwhile: one lane per 64-byte half line.
    if (tq == 0) {
        for (int c = HG_CHUNK; c < mine; c++) {
            int p = warp + HG_WARPS * c;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wa + p * 32));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(wb + p * 32));
        }
    }
    pdl_entry();
    const u16* xr[NT];
    #pragma unroll
    for (int q = 0; q < NT; q++) xr[q] = x + (long long)min(8 * q + g, t - 1) * k + 8 * tq;
    float acc[NT][4];
    #pragma unroll
    for (int q = 0; q < NT; q++)
        #pragma unroll
        for (int i = 0; i < 4; i++) acc[q][i] = 0.0f;
    for (int c0 = 0; c0 < mine; c0 += HG_CHUNK) {
        if (c0 > 0) {
            #pragma unroll
            for (int c = 0; c < HG_CHUNK; c++) {
                if (c0 + c < mine) {
                    int p = warp + HG_WARPS * (c0 + c);
                    A[c][0] = *(const uint4*)(wa + p * 32);
                    A[c][1] = *(const uint4*)(wb + p * 32);
                }
            }
        }
        #pragma unroll
        for (int c = 0; c < HG_CHUNK; c++) {
            if (c0 + c < mine) {
                int p = warp + HG_WARPS * (c0 + c);
                uint4 b[NT];
                #pragma unroll
                for (int q = 0; q < NT; q++) b[q] = __ldcg((const uint4*)(xr[q] + p * 32));
                #pragma unroll
                for (int q = 0; q < NT; q++) {
                    mma16816(acc[q], A[c][0].x, A[c][1].x, A[c][0].y, A[c][1].y, b[q].x, b[q].y);
                    mma16816(acc[q], A[c][0].z, A[c][1].z, A[c][0].w, A[c][1].w, b[q].z, b[q].w);
                }
            }
        }
    }
    #pragma unroll
    for (int q = 0; q < NT; q++)
        *(float4*)(red + ((warp * NT + q) * 32 + lane) * 4) = make_float4(acc[q][0], acc[q][1], acc[q][2], acc[q][3]);
    __syncthreads();
}

// Output (n, r) of the block's tile (activation row n, weight row r0 + r):
// tile q = n / 8 holds it on lane (g = r % 8, t = (n % 8) / 2) as element
// (r >= 8 ? 2 : 0) + n % 2 (the m16n8 accumulator layout); the warps'
// partials are summed in warp order.
template <int NT>
__device__ __forceinline__ float hgemm_sum(const float* red, int n, int r) {
    int q = n >> 3, cn = n & 7;
    int idx = (q * 32 + (r & 7) * 4 + (cn >> 1)) * 4 + (r >> 3) * 2 + (cn & 1);
    float s = 0.0f;
    #pragma unroll
    for (int v = 0; v < HG_WARPS; v++) s += red[v * NT * 128 + idx];
    return s;
}

template <int NT>
__device__ __forceinline__ void hgemm_impl(const u16* __restrict__ w, int m, int k, const u16* __restrict__ x, int t,
                                           float* __restrict__ out, int ldc) {
    __shared__ __align__(16) float red[hgemm_smem_floats(NT)];
    hgemm_partials<NT>(w, m, k, x, t, red);
    int r0 = blockIdx.x * 16;
    for (int o = threadIdx.x; o < NT * 128; o += HG_THREADS) {
        int n = o >> 4, r = o & 15;
        if (n < t && r0 + r < m) out[(long long)n * ldc + r0 + r] = hgemm_sum<NT>(red, n, r);
    }
}

// grid = ceil(m / 16), block = HG_THREADS, static shared memory.
#define HGEMM_ENTRY(NT)                                                                                 \
    extern "C" __global__ void __launch_bounds__(HG_THREADS) hgemm_##NT(                               \
        const u16* w, int m, int k, const u16* x, int t, float* out, int ldc) {                         \
        hgemm_impl<NT>(w, m, k, x, t, out, ldc);                                                        \
    }
HGEMM_ENTRY(1)
HGEMM_ENTRY(2)
HGEMM_ENTRY(4)
HGEMM_ENTRY(8)

// The gate/up GEMM with the gated activation as its epilogue: w is the
// stacked gate/up mirror interleaved in groups of 8 rows (weight rows 16b ..
// 16b + 7 are gate rows 8b .., 16b + 8 .. 16b + 15 the up rows of the same
// features), so a block's tile holds gate and up of 8 features and writes
// act(gate) * up, gated_act's expression, on the f32 sums hgemm would have
// stored: the same bits as hgemm + gated_act_ld, without the second launch
// or the round trip of the f32 product through memory. out is [t, ldo]
// (f32), out16 (may be null) its f16 copy; m = 2 * features.
template <int NT>
__device__ __forceinline__ void hgemm_glu_impl(const u16* __restrict__ w, int m, int k, const u16* __restrict__ x,
                                               int t, int act, float* __restrict__ out, u16* __restrict__ out16,
                                               int ldo) {
    __shared__ __align__(16) float red[hgemm_smem_floats(NT)];
    hgemm_partials<NT>(w, m, k, x, t, red);
    int f0 = blockIdx.x * 8;
    for (int o = threadIdx.x; o < NT * 64; o += HG_THREADS) {
        int n = o >> 3, r = o & 7;
        if (n >= t || 2 * (f0 + r) >= m) continue;
        float g = hgemm_sum<NT>(red, n, r);
        float v = (act == 0 ? silu(g) : gelu_tanh(g)) * hgemm_sum<NT>(red, n, r + 8);
        long long i = (long long)n * ldo + f0 + r;
        out[i] = v;
        if (out16) out16[i] = f2h(v);
    }
}

// grid = ceil(m / 16), block = HG_THREADS.
#define HGEMM_GLU_ENTRY(NT)                                                                             \
    extern "C" __global__ void __launch_bounds__(HG_THREADS) hgemm_glu_##NT(                           \
        const u16* w, int m, int k, const u16* x, int t, int act, float* out, u16* out16, int ldo) {    \
        hgemm_glu_impl<NT>(w, m, k, x, t, act, out, out16, ldo);                                        \
    }
HGEMM_GLU_ENTRY(1)
HGEMM_GLU_ENTRY(2)
HGEMM_GLU_ENTRY(4)
HGEMM_GLU_ENTRY(8)

// Distributed shared memory of a thread block cluster (sm_90).
__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// `p` (a shared-memory variable of this block) in the block of cluster rank `rank`.
__device__ __forceinline__ float cluster_ld(const float* p, u32 rank) {
    float v = 0.0f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    u32 a, r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
#endif
    return v;
}

// The stacked Q/K/V GEMM with qk_norm_rope_store as its epilogue, launched in
// clusters of head_dim / 16 blocks (one cluster per head of the stacked
// output: query heads, then KV heads' K, then their V). Each block computes
// its 16 rows as hgemm does and keeps them in shared memory; after a cluster
// barrier, the block of rank j gathers the whole head of activation rows j,
// j + cs, ... from its cluster's shared memory and runs rope_store_item's work
// on it (rope_item_finish, 128 logical threads as the standalone launch):
// q to `q`, K to `k` and the pool; a V cluster stores V to the pool and
// `vdst`. The same bits as hgemm + qk_norm_rope_store_pre on the stacked
// output, without the second launch or the f32 product's round trip
// through memory. A second barrier keeps every block's shared memory alive
// until its cluster has read it.
template <int NT>
__device__ __forceinline__ void hgemm_rope_impl(const u16* __restrict__ w, int m, int k, const u16* __restrict__ x,
                                                int t, float* q, float* kout, float* vdst, int n_heads,
                                                int n_kv_heads, int head_dim, const float* qw, const float* kw,
                                                float eps, const float* inv_freq, int n_pairs, int style,
                                                float mscale, const u32* positions, void* pool, long long layer_off,
                                                long long v_off, int kvt, const u32* slots) {
    __shared__ __align__(16) float red[hgemm_smem_floats(NT)];
    __shared__ float tile[NT * 8][16];
    __shared__ float hbuf[ROPE_PER * 128];
    __shared__ float scratch[32];
    const int nthr = 128;
    int cs = head_dim >> 4;
    int y = blockIdx.x / cs;
    u32 rank = (u32)(blockIdx.x % cs);
    bool is_q = y < n_heads, is_k = !is_q && y < n_heads + n_kv_heads;
    int kvh = is_q ? 0 : (is_k ? y - n_heads : y - n_heads - n_kv_heads);
    const float* nw = is_q ? qw : (is_k ? kw : nullptr);
    // The constants of this block's first row, before the PDL wait.
    int tid = threadIdx.x;
    float wv[ROPE_PER], fr[ROPE_PER];
    #pragma unroll
    for (int j = 0; j < ROPE_PER; j++) {
        int d = tid + j * nthr;
        bool in = tid < nthr && d < head_dim;
        wv[j] = in && nw ? nw[d] : 0.0f;
        fr[j] = tid < nthr && d < n_pairs ? inv_freq[d] : 0.0f;
    }
    hgemm_partials<NT>(w, m, k, x, t, red);
    for (int o = threadIdx.x; o < NT * 128; o += HG_THREADS) {
        int n = o >> 4, r = o & 15;
        if (n < t) tile[n][r] = hgemm_sum<NT>(red, n, r);
    }
    cluster_sync_all();
    int kv_dim = n_kv_heads * head_dim;
    for (int n = (int)rank; n < t; n += cs) {
        for (int d = tid; d < head_dim; d += HG_THREADS) hbuf[d] = cluster_ld(&tile[n][d & 15], (u32)(d >> 4));
        u32 pos = positions[n];
        long long slot = is_q ? 0 : (long long)slots[n];
        long long base = layer_off + slot * kv_dim + (long long)kvh * head_dim;
        if (is_q || is_k) {
            float* out = is_q ? q + ((long long)n * n_heads + y) * head_dim
                              : kout + ((long long)n * n_kv_heads + kvh) * head_dim;
            // rope_item_finish's first barrier (in logical_block_sum, or its
            // own when there is no norm) orders the gather before the reads.
            // (wv stands in for the V values, which has_v = false ignores.)
            rope_item_finish(nthr, hbuf, scratch, out, nw, wv, fr, wv, false, head_dim, eps, n_pairs, style,
                             mscale, pos, is_q ? nullptr : pool, base, v_off, kvt, nullptr);
        } else {
            __syncthreads();
            for (int d = tid; d < head_dim; d += HG_THREADS) {
                kv_store(pool, base + v_off + d, kvt, hbuf[d]);
                if (vdst) vdst[((long long)n * n_kv_heads + kvh) * head_dim + d] = hbuf[d];
            }
        }
        __syncthreads();
    }
    cluster_sync_all();
}

// grid = ceil(m / 16) in clusters of head_dim / 16 blocks, block = HG_THREADS.
#define HGEMM_ROPE_ENTRY(NT)                                                                               \
    extern "C" __global__ void __launch_bounds__(HG_THREADS) hgemm_rope_##NT(                             \
        const u16* w, int m, int k, const u16* x, int t, float* q, float* kout, float* vdst, int n_heads,  \
        int n_kv_heads, int head_dim, const float* qw, const float* kw, float eps, const float* inv_freq,  \
        int n_pairs, int style, float mscale, const u32* positions, void* pool, long long layer_off,        \
        long long v_off, int kvt, const u32* slots) {                                                      \
        hgemm_rope_impl<NT>(w, m, k, x, t, q, kout, vdst, n_heads, n_kv_heads, head_dim, qw, kw, eps,      \
                            inv_freq, n_pairs, style, mscale, positions, pool, layer_off, v_off, kvt, slots); \
    }
HGEMM_ROPE_ENTRY(1)
HGEMM_ROPE_ENTRY(2)
HGEMM_ROPE_ENTRY(4)
HGEMM_ROPE_ENTRY(8)
