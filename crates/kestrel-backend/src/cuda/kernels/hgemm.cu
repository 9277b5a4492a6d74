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

// CH: spans of weights a warp holds in registers at once (HG_CHUNK, or 8 for
// hgemm_1c8: at k = 2048, the down projection, a warp's eight spans are then
// all loaded before the PDL wait instead of four). Same products, same order.
template <int NT, int CH = HG_CHUNK>
__device__ __forceinline__ void hgemm_impl(const u16* __restrict__ w, int m, int k, const u16* __restrict__ x, int t,
                                           float* __restrict__ out, int ldc) {
    __shared__ __align__(16) float red[hgemm_smem_floats(NT)];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
    int r0 = blockIdx.x * 16;
    // Rows past the end read the last row (not stored).
    const u16* wa = w + (long long)min(r0 + g, m - 1) * k + 8 * tq;
    const u16* wb = w + (long long)min(r0 + g + 8, m - 1) * k + 8 * tq;
    int nsp = k >> 5;
    int mine = nsp > warp ? (nsp - warp + HG_WARPS - 1) / HG_WARPS : 0;
    uint4 A[CH][2];
    #pragma unroll
    for (int c = 0; c < CH; c++) {
        if (c < mine) {
            int p = warp + HG_WARPS * c;
            A[c][0] = *(const uint4*)(wa + p * 32);
            A[c][1] = *(const uint4*)(wb + p * 32);
        }
    }
    // The warp's later spans into L2 meanwhile: one lane per 64-byte half line.
    if (tq == 0) {
        for (int c = CH; c < mine; c++) {
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
    for (int c0 = 0; c0 < mine; c0 += CH) {
        if (c0 > 0) {
            #pragma unroll
            for (int c = 0; c < CH; c++) {
                if (c0 + c < mine) {
                    int p = warp + HG_WARPS * (c0 + c);
                    A[c][0] = *(const uint4*)(wa + p * 32);
                    A[c][1] = *(const uint4*)(wb + p * 32);
                }
            }
        }
        #pragma unroll
        for (int c = 0; c < CH; c++) {
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
    // Output (n, r): tile q = n / 8 holds it on lane (g = r % 8, t = (n % 8) / 2)
    // as element (r >= 8 ? 2 : 0) + n % 2 (the m16n8 accumulator layout).
    for (int o = threadIdx.x; o < NT * 128; o += HG_THREADS) {
        int n = o >> 4, r = o & 15;
        int q = n >> 3, cn = n & 7;
        int idx = (q * 32 + (r & 7) * 4 + (cn >> 1)) * 4 + (r >> 3) * 2 + (cn & 1);
        float s = 0.0f;
        #pragma unroll
        for (int v = 0; v < HG_WARPS; v++) s += red[v * NT * 128 + idx];
        if (n < t && r0 + r < m) out[(long long)n * ldc + r0 + r] = s;
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

extern "C" __global__ void __launch_bounds__(HG_THREADS) hgemm_1c8(const u16* w, int m, int k, const u16* x, int t,
                                                                   float* out, int ldc) {
    hgemm_impl<1, 8>(w, m, k, x, t, out, ldc);
}
