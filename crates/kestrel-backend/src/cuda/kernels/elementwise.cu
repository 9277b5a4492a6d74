// Norms, residual adds, activations, RoPE, KV writes, row gathers, argmax.

// out = x / rms(x) * w, one block per row.
extern "C" __global__ void rms_norm(const float* x, const float* w, float eps, int cols, float* out) { pdl_entry();
    __shared__ float scratch[32];
    const float* xr = x + (long long)blockIdx.x * cols;
    float* o = out + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = xr[c] * inv * w[c];
}

// x += delta; out = rms_norm(x) * w, one block per row (one pass over x).
extern "C" __global__ void add_rms_norm(float* x, const float* delta, const float* w, float eps,
                                        int cols, float* out) { pdl_entry();
    __shared__ float scratch[32];
    float* xr = x + (long long)blockIdx.x * cols;
    const float* dr = delta + (long long)blockIdx.x * cols;
    float* o = out + (long long)blockIdx.x * cols;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = xr[c] + dr[c];
        xr[c] = v;
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = xr[c] * inv * w[c];
}

extern "C" __global__ void add_inplace(float* x, const float* y, long long n) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) x[i] += y[i];
}

extern "C" __global__ void add_bias(float* x, const float* b, int cols, long long n) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) x[i] += b[i % cols];
}

extern "C" __global__ void softcap(float* x, float cap, long long n) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) x[i] = cap * tanhf(x[i] / cap);
}

// act: 0 = SiLU, 1 = GELU (tanh).
// out16 (may be null): the same values as f16, the operand of the GEMM that
// follows on batched steps (saves its separate conversion launch).
extern "C" __global__ void gated_act(const float* gate, const float* up, int act, long long n, float* out,
                                     u16* out16) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        float v = (act == 0 ? silu(g) : gelu_tanh(g)) * up[i];
        out[i] = v;
        if (out16) out16[i] = f2h(v);
    }
}

// gated_act on one GEMM's [rows, ld] output holding gate in columns
// [0, cols) and up in [cols, 2 cols) of each row; out is [rows, cols].
extern "C" __global__ void gated_act_ld(const float* gu, long long ld, int cols, int act, long long n, float* out,
                                        u16* out16) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / cols, c = i % cols;
        float g = gu[r * ld + c];
        float v = (act == 0 ? silu(g) : gelu_tanh(g)) * gu[r * ld + cols + c];
        out[i] = v;
        if (out16) out16[i] = f2h(v);
    }
}

extern "C" __global__ void gather_rows(const float* x, const u32* idx, int cols, float* out) { pdl_entry();
    const float* src = x + (long long)idx[blockIdx.x] * cols;
    float* dst = out + (long long)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Index of the largest value of each row, first one on ties; NaN never wins
// (same as layout::argmax). grid = (blocks per row, rows); each block
// reduces its share and folds it into keys[row] (zeroed before the launch)
// with a 64-bit atomicMax on (order-preserving bits of the value, ~index),
// so equal values resolve to the smallest index. The host decodes keys.
__device__ __forceinline__ u32 ordered_bits(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

extern "C" __global__ void argmax_rows(const float* x, int cols, u64* keys) { pdl_entry();
    __shared__ float sv[32];
    __shared__ int si[32];
    const float* xr = x + (long long)blockIdx.y * cols;
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    int stride = gridDim.x * blockDim.x;
    if ((cols & 3) == 0) {
        // 16-byte loads, several in flight per thread (rows are 16-byte
        // aligned when cols % 4 == 0); a thread visits its indices in
        // increasing order, so `>` keeps the first of equal values.
        const float4* x4 = (const float4*)xr;
        #pragma unroll 8
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < (cols >> 2); c += stride) {
            float4 v = x4[c];
            if (v.x > best) { best = v.x; bi = 4 * c; }
            if (v.y > best) { best = v.y; bi = 4 * c + 1; }
            if (v.z > best) { best = v.z; bi = 4 * c + 2; }
            if (v.w > best) { best = v.w; bi = 4 * c + 3; }
        }
    } else {
        #pragma unroll 4
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += stride) {
            float v = xr[c];
            if (v > best) { best = v; bi = c; }
        }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = best; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        best = lane < nw ? sv[lane] : -__int_as_float(0x7f800000);
        bi = lane < nw ? si[lane] : 0x7fffffff;
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0 && bi != 0x7fffffff) {
            u64 key = ((u64)ordered_bits(best) << 32) | (u64)(0xffffffffu - (u32)bi);
            atomicMax(keys + blockIdx.y, key);
        }
    }
}

// p[0 .. n) = 0: the argmax keys before an LM head that folds the argmax in
// (mma_q8_0_argmax_*). A kernel rather than a memset so that it stays in the
// step's chain of programmatic dependent launches.
extern "C" __global__ void zero_u64(u64* p, int n) { pdl_entry();
    for (int i = threadIdx.x; i < n; i += blockDim.x) p[i] = 0ull;
}

// Input tokens of an overlapped decode step from the previous step's argmax
// keys (row i feeds token i): the same decoding as the host's id_of_key.
extern "C" __global__ void tokens_from_keys(const u64* keys, int rows, u32* tokens) { pdl_entry();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows) {
        u64 k = keys[i];
        tokens[i] = k == 0 ? 0u : 0xffffffffu - (u32)k;
    }
}

// Rotation of one pair by position `pos` of pair index `i`.
// The angle is formed and evaluated in f64 (as the CPU backend does): at
// long contexts pos * inv_freq reaches 1e4..1e5 rad, where f32 loses ~1e-3.
__device__ __forceinline__ void rope_pair(float* a, float* b, u32 pos, float inv_freq, float mscale) {
    double sd, cd;
    sincos((double)pos * (double)inv_freq, &sd, &cd);
    float c = (float)cd * mscale, s = (float)sd * mscale;
    float x0 = *a, x1 = *b;
    *a = x0 * c - x1 * s;
    *b = x0 * s + x1 * c;
}

// Per-head RMSNorm (when w != 0) then RoPE, in place. grid = (rows, n_heads).
// style: 0 = interleaved pairs (2i, 2i+1), 1 = NeoX halves (i, i + n_pairs).
extern "C" __global__ void qk_norm_rope(float* x, int n_heads, int head_dim, const float* w, float eps,
                                        const float* inv_freq, int n_pairs, int style, float mscale,
                                        const u32* positions) { pdl_entry();
    extern __shared__ float hbuf[];
    __shared__ float scratch[32];
    float* h = x + ((long long)blockIdx.x * n_heads + blockIdx.y) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) hbuf[d] = h[d];
    if (w) {
        float ss = 0.0f;
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) ss += hbuf[d] * hbuf[d];
        ss = block_sum(ss, scratch);
        float inv = rsqrtf(ss / (float)head_dim + eps);
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) hbuf[d] = hbuf[d] * inv * w[d];
    }
    __syncthreads();
    u32 pos = positions[blockIdx.x];
    for (int i = threadIdx.x; i < n_pairs; i += blockDim.x) {
        int ia = style == 0 ? 2 * i : i;
        int ib = style == 0 ? 2 * i + 1 : i + n_pairs;
        rope_pair(&hbuf[ia], &hbuf[ib], pos, inv_freq[i], mscale);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) h[d] = hbuf[d];
}

// Reference path, unfused: per-head RMSNorm, one thread per (row, head).
extern "C" __global__ void head_norm_ref(float* x, int total_heads, int head_dim, const float* w, float eps) { pdl_entry();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total_heads) return;
    float* h = x + (long long)i * head_dim;
    float ss = 0.0f;
    for (int d = 0; d < head_dim; d++) ss += h[d] * h[d];
    float inv = 1.0f / sqrtf(ss / (float)head_dim + eps);
    for (int d = 0; d < head_dim; d++) h[d] = h[d] * inv * w[d];
}

// Reference path: RoPE, one thread per (row, head, pair).
extern "C" __global__ void rope_ref(float* x, int rows, int n_heads, int head_dim, const float* inv_freq,
                                    int n_pairs, int style, float mscale, const u32* positions) { pdl_entry();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n_heads * n_pairs) return;
    int p = (int)(i % n_pairs);
    long long rh = i / n_pairs;
    int row = (int)(rh / n_heads);
    float* h = x + rh * head_dim;
    int ia = style == 0 ? 2 * p : p;
    int ib = style == 0 ? 2 * p + 1 : p + n_pairs;
    rope_pair(&h[ia], &h[ib], positions[row], inv_freq[p], mscale);
}

// Store K and V rows into the pool at their slots. Pool layout per layer:
// K block-major [num_blocks*block_size slots][kv_dim], then V likewise.
// grid.x = rows.
extern "C" __global__ void write_kv(void* pool, long long layer_off, long long v_off, int kvt,
                                    const float* k, const float* v, const u32* slots, int kv_dim) { pdl_entry();
    long long slot = slots[blockIdx.x];
    const float* kr = k + (long long)blockIdx.x * kv_dim;
    const float* vr = v + (long long)blockIdx.x * kv_dim;
    long long base = layer_off + slot * kv_dim;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) {
        kv_store(pool, base + c, kvt, kr[c]);
        kv_store(pool, base + v_off + c, kvt, vr[c]);
    }
}

// Residual step of a block, one block per row: delta' = post_w ? rms_norm(delta) * post_w : delta;
// x += delta'; out = rms_norm(x) * w. Replaces rms_norm + add_rms_norm (two launches, two
// passes over x) with one; the arithmetic per element is the same as theirs.
// out16 (may be null): `out` again as f16, for the GEMMs of batched steps.
#define RN_MAXE 4 // elements per thread held in registers (cols <= 4 * blockDim.x)

// PRE: the norm weights (constants) are read before waiting for the
// previous kernel (pdl_entry), x and delta after; same bits. They are the
// loads likely to miss L2 (a decode step's LM head streams the cache), so
// their latency overlaps the previous kernel instead of following it.
template <bool PRE>
__device__ __forceinline__ void residual_norm_body(float* x, const float* delta, const float* post_w,
                                                   const float* w, float eps, int cols, float* out, u16* out16) {
    __shared__ float scratch[32];
    float* xr = x + (long long)blockIdx.x * cols;
    const float* dr = delta + (long long)blockIdx.x * cols;
    float* o = out + (long long)blockIdx.x * cols;
    u16* o16 = out16 ? out16 + (long long)blockIdx.x * cols : nullptr;
    if (cols <= RN_MAXE * (int)blockDim.x) {
        // Every operand loaded once, all loads issued together: one memory
        // latency per launch instead of one per pass (three). Same
        // arithmetic in the same order as the loop below.
        float d[RN_MAXE], xv[RN_MAXE], pw[RN_MAXE], wv[RN_MAXE];
        #pragma unroll
        for (int k = 0; k < RN_MAXE; k++) {
            int c = threadIdx.x + k * blockDim.x;
            bool in = c < cols;
            pw[k] = in && post_w ? post_w[c] : 0.0f;
            wv[k] = in ? w[c] : 0.0f;
        }
        if (PRE) pdl_entry();
        #pragma unroll
        for (int k = 0; k < RN_MAXE; k++) {
            int c = threadIdx.x + k * blockDim.x;
            bool in = c < cols;
            d[k] = in ? dr[c] : 0.0f;
            xv[k] = in ? xr[c] : 0.0f;
        }
        float pinv = 1.0f;
        if (post_w) {
            float ps = 0.0f;
            #pragma unroll
            for (int k = 0; k < RN_MAXE; k++)
                if (threadIdx.x + k * blockDim.x < cols) ps += d[k] * d[k];
            ps = block_sum(ps, scratch);
            pinv = rsqrtf(ps / (float)cols + eps);
        }
        float ss = 0.0f;
        #pragma unroll
        for (int k = 0; k < RN_MAXE; k++) {
            int c = threadIdx.x + k * blockDim.x;
            if (c < cols) {
                float dd = post_w ? __fmul_rn(__fmul_rn(d[k], pinv), pw[k]) : d[k];
                float v = __fadd_rn(xv[k], dd);
                xr[c] = v;
                xv[k] = v;
                ss += v * v;
            }
        }
        ss = block_sum(ss, scratch);
        float inv = rsqrtf(ss / (float)cols + eps);
        #pragma unroll
        for (int k = 0; k < RN_MAXE; k++) {
            int c = threadIdx.x + k * blockDim.x;
            if (c < cols) {
                float v = xv[k] * inv * wv[k];
                o[c] = v;
                if (o16) o16[c] = f2h(v);
            }
        }
        return;
    }
    if (PRE) pdl_entry();
    float pinv = 1.0f;
    if (post_w) {
        float ps = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) ps += dr[c] * dr[c];
        ps = block_sum(ps, scratch);
        pinv = rsqrtf(ps / (float)cols + eps);
    }
    float ss = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        // Explicit roundings (never fused into an FMA): the decode
        // megakernel repeats this step and must get the same bits.
        float d = post_w ? __fmul_rn(__fmul_rn(dr[c], pinv), post_w[c]) : dr[c];
        float v = __fadd_rn(xr[c], d);
        xr[c] = v;
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = xr[c] * inv * w[c];
        o[c] = v;
        if (o16) o16[c] = f2h(v);
    }
}

extern "C" __global__ void residual_norm(float* x, const float* delta, const float* post_w, const float* w,
                                         float eps, int cols, float* out, u16* out16) {
    pdl_entry();
    residual_norm_body<false>(x, delta, post_w, w, eps, cols, out, out16);
}

extern "C" __global__ void residual_norm_pre(float* x, const float* delta, const float* post_w, const float* w,
                                             float eps, int cols, float* out, u16* out16) {
    residual_norm_body<true>(x, delta, post_w, w, eps, cols, out, out16);
}

// Sum over a block of `nthr` logical threads where logical thread t holds
// the sum of f(c) for c = t, t + nthr, ... < n: grouped exactly as
// block_sum groups it in a block of nthr threads (same warp trees, same
// order), whatever the physical block size. The decode megakernel runs the
// norms with 256 threads and gets the bits of the standalone kernels.
// `scratch` holds 32 floats; every thread of the block must call it.
template <typename F>
__device__ float logical_block_sum(int n, int nthr, F f, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, lwarps = nthr >> 5;
    __syncthreads();
    for (int lw = warp; lw < lwarps; lw += nw) {
        int t = lw * 32 + lane;
        float v = 0.0f;
        for (int c = t; c < n; c += nthr) v += f(c);
        v = warp_sum(v);
        if (lane == 0) scratch[lw] = v;
    }
    __syncthreads();
    float t = lane < lwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// q/k per-head RMSNorm + RoPE and the K/V store of one head (query head y,
// or KV head y - n_heads: norm + RoPE of K in place, then K and V of that
// head go to the pool at the row's slot). Without write_back the result
// stays in hbuf (q and k are left as they were; K/V still go to the pool). Loops stride over `nthr` logical
// threads (extra physical threads idle but take part in the barriers);
// hbuf holds head_dim floats. q, k, v are read through L2 (see attention.cu).
#define ROPE_PER 4 // elements per logical thread: head_dim <= ROPE_PER * nthr

__device__ void rope_store_item(int row, int y, int nthr, float* hbuf, float* scratch, float* q, float* k,
                                const float* v, int n_heads, int n_kv_heads, int head_dim, const float* qw,
                                const float* kw, float eps, const float* inv_freq, int n_pairs, int style,
                                float mscale, const u32* positions, void* pool, long long layer_off,
                                long long v_off, int kvt, const u32* slots, const float* src, int ld,
                                float* vdst, bool write_back = true, bool pre_wait = false) {
    int tid = threadIdx.x;
    bool live = tid < nthr;
    bool is_q = y < n_heads;
    int kvh = y - n_heads;
    int kv_dim = n_kv_heads * head_dim;
    int q_dim = n_heads * head_dim;
    float* h = is_q ? q + ((long long)row * n_heads + y) * head_dim
                    : k + ((long long)row * n_kv_heads + kvh) * head_dim;
    // With `src` (one GEMM's [rows, ld] output: q | k | v per row) the
    // inputs come from there and q, k (and v into vdst) are written out;
    // otherwise q and k are updated in place and v is only read.
    const float* hin = h;
    const float* vr = v + (long long)row * kv_dim + (long long)kvh * head_dim;
    if (src) {
        const float* r = src + (long long)row * ld;
        hin = is_q ? r + y * head_dim : r + q_dim + kvh * head_dim;
        vr = r + q_dim + kv_dim + kvh * head_dim;
    }
    const float* w = is_q ? qw : kw;
    // Every global load of the item first, then the work: in one loop with
    // the stores, each load would wait for the store before it (the
    // pointers may alias) and the item would cost several memory latencies.
    // With pre_wait (a standalone launch), the constants and the step's
    // metadata are read before waiting for the previous kernel, the QKV
    // outputs after (see residual_norm_body's PRE).
    float hv[ROPE_PER], wv[ROPE_PER], vv[ROPE_PER], fr[ROPE_PER];
    #pragma unroll
    for (int j = 0; j < ROPE_PER; j++) {
        int d = tid + j * nthr;
        bool in = live && d < head_dim;
        wv[j] = in && w ? w[d] : 0.0f;
        fr[j] = live && d < n_pairs ? inv_freq[d] : 0.0f;
    }
    u32 pos = positions[row];
    long long slot = is_q ? 0 : (long long)slots[row];
    if (pre_wait) pdl_entry();
    #pragma unroll
    for (int j = 0; j < ROPE_PER; j++) {
        int d = tid + j * nthr;
        bool in = live && d < head_dim;
        hv[j] = in ? __ldcg(hin + d) : 0.0f;
        vv[j] = in && !is_q ? __ldcg(vr + d) : 0.0f;
    }
    #pragma unroll
    for (int j = 0; j < ROPE_PER; j++) {
        int d = tid + j * nthr;
        if (live && d < head_dim) hbuf[d] = hv[j];
    }
    if (w) {
        float ss = logical_block_sum(head_dim, nthr, [&](int d) { return hbuf[d] * hbuf[d]; }, scratch);
        float inv = rsqrtf(ss / (float)head_dim + eps);
        #pragma unroll
        for (int j = 0; j < ROPE_PER; j++) {
            int d = tid + j * nthr;
            if (live && d < head_dim) hbuf[d] = hbuf[d] * inv * wv[j];
        }
    }
    __syncthreads();
    #pragma unroll
    for (int j = 0; j < ROPE_PER; j++) {
        int i = tid + j * nthr;
        if (live && i < n_pairs) {
            int ia = style == 0 ? 2 * i : i;
            int ib = style == 0 ? 2 * i + 1 : i + n_pairs;
            rope_pair(&hbuf[ia], &hbuf[ib], pos, fr[j], mscale);
        }
    }
    __syncthreads();
    if (!live) return;
    long long base = layer_off + slot * kv_dim + (long long)kvh * head_dim;
    #pragma unroll
    for (int j = 0; j < ROPE_PER; j++) {
        int d = tid + j * nthr;
        if (d >= head_dim) continue;
        if (write_back) h[d] = hbuf[d];
        if (!is_q) {
            kv_store(pool, base + d, kvt, hbuf[d]);
            kv_store(pool, base + v_off + d, kvt, vv[j]);
            if (vdst) vdst[((long long)row * n_kv_heads + kvh) * head_dim + d] = vv[j];
        }
    }
}

// One layer's q/k norm + RoPE + K/V store in a single launch.
// grid = (rows, n_heads + n_kv_heads); dynamic shared memory head_dim floats.
extern "C" __global__ void qk_norm_rope_store(float* q, float* k, const float* v, int n_heads, int n_kv_heads,
                                              int head_dim, const float* qw, const float* kw, float eps,
                                              const float* inv_freq, int n_pairs, int style, float mscale,
                                              const u32* positions, void* pool, long long layer_off,
                                              long long v_off, int kvt, const u32* slots, const float* src,
                                              int ld, float* vdst) { pdl_entry();
    extern __shared__ float hbuf[];
    __shared__ float scratch[32];
    rope_store_item(blockIdx.x, blockIdx.y, blockDim.x, hbuf, scratch, q, k, v, n_heads, n_kv_heads, head_dim, qw,
                    kw, eps, inv_freq, n_pairs, style, mscale, positions, pool, layer_off, v_off, kvt, slots, src,
                    ld, vdst);
}

// qk_norm_rope_store with the constants and metadata read before the wait
// for the previous kernel (rope_store_item's pre_wait); same results.
extern "C" __global__ void qk_norm_rope_store_pre(float* q, float* k, const float* v, int n_heads, int n_kv_heads,
                                                  int head_dim, const float* qw, const float* kw, float eps,
                                                  const float* inv_freq, int n_pairs, int style, float mscale,
                                                  const u32* positions, void* pool, long long layer_off,
                                                  long long v_off, int kvt, const u32* slots, const float* src,
                                                  int ld, float* vdst) {
    extern __shared__ float hbuf[];
    __shared__ float scratch[32];
    rope_store_item(blockIdx.x, blockIdx.y, blockDim.x, hbuf, scratch, q, k, v, n_heads, n_kv_heads, head_dim, qw,
                    kw, eps, inv_freq, n_pairs, style, mscale, positions, pool, layer_off, v_off, kvt, slots, src,
                    ld, vdst, true, true);
    TRACE(if (threadIdx.x == 0 && kestrel_trace)
              atomicMax((unsigned long long*)kestrel_trace + TRACE_ROPE_END, (unsigned long long)trace_now());)
}

// dst = src (n floats); for copying an activation inside a captured graph.
extern "C" __global__ void copy_f32(const float* src, long long n, float* dst) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
