// Sampling on the device: the engine's sampler chain (kestrel-engine's
// sampling.rs) over each logits row, so that only token ids cross to the
// host. One 1024-thread block per row; thread t owns the contiguous chunk
// [t * C, (t + 1) * C) of the vocabulary, so per-thread partial results
// combined in thread order are in vocabulary order, and every reduction has
// a fixed shape: the same inputs give the same token on every run.
//
// Chain (as on the host): repetition, presence and frequency penalties on
// the listed tokens; NaN -> -inf, +inf -> f32 max; greedy (argmax, lowest
// id on ties) when flagged; else scaled s = (l - max) / T, top-k, top-p
// over what top-k kept, min-p, then a draw with the host's uniform `u`
// (the host's seeded RNG stays the only source of randomness).
// Thresholds are found by bisection on an order-preserving integer key of s
// (counts for top-k, f64 mass for top-p), ties at a threshold are kept in
// ascending id order, as the host's best-first order does. The draw walks
// the kept tokens in id order (the host walks its candidate order: the
// distribution is the same, the token for a given `u` may differ).

#define SAMPLE_THREADS 1024

// Mirrored by `SampleRow` in sampling.rs (48 bytes).
struct SampleRow {
    double u;         // uniform in [0, 1)
    float inv_t;      // 1 / temperature
    float top_p;      // >= 1: off
    float min_p_log;  // ln(min_p); -inf: off
    float rep;        // repetition penalty; 1: off
    float presence;
    float frequency;
    u32 top_k;        // 0: off
    u32 pen_off;      // first (id, count) pair in the penalty list
    u32 pen_n;
    u32 greedy;       // 1: argmax after the penalties
};

__device__ __forceinline__ u32 s_key(float s) {
    u32 u = __float_as_uint(s);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Block reductions in a fixed order (warp trees, then warp 0 over the 32
// warp results).
__device__ u32 block_sum_u32(u32 v, u32* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0u;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ double block_sum_f64(double v, double* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive prefix over threads in thread order (u32 / f64); `sh` holds
// SAMPLE_THREADS values.
__device__ u32 block_exclusive_u32(u32 v, u32* sh) {
    __syncthreads();
    sh[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 run = 0;
        for (int i = 0; i < (int)blockDim.x; i++) { u32 x = sh[i]; sh[i] = run; run += x; }
    }
    __syncthreads();
    return sh[threadIdx.x];
}

__device__ double block_exclusive_f64(double v, double* sh) {
    __syncthreads();
    sh[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double run = 0.0;
        for (int i = 0; i < (int)blockDim.x; i++) { double x = sh[i]; sh[i] = run; run += x; }
    }
    __syncthreads();
    return sh[threadIdx.x];
}

// A threshold: tokens with key > k are in, and the first `n_eq` tokens with
// key == k (ascending id); `rank0` is the number of key == k tokens in the
// chunks of lower threads. `all`: no threshold.
struct Cut {
    u32 k;
    u32 n_eq;
    u32 rank0;
    bool all;
};

__device__ __forceinline__ bool cut_keeps(const Cut& c, u32 key, u32* eq_seen) {
    if (c.all || key > c.k) return true;
    if (key < c.k) return false;
    bool in = c.rank0 + *eq_seen < c.n_eq;
    (*eq_seen)++;
    return in;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(float* logits, int vocab,
                                                                          const SampleRow* rows, const u32* pens,
                                                                          u32* out) {
    pdl_entry();
    __shared__ double shd[SAMPLE_THREADS];
    __shared__ u32 shu[SAMPLE_THREADS];
    __shared__ float shf[32];
    __shared__ int shi[32];
    const SampleRow r = rows[blockIdx.x];
    float* x = logits + (long long)blockIdx.x * vocab;
    int chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    int c0 = min(vocab, (int)threadIdx.x * chunk), c1 = min(vocab, c0 + chunk);

    // Penalties: each listed token once (the host lists distinct ids).
    for (u32 e = threadIdx.x; e < r.pen_n; e += blockDim.x) {
        u32 id = pens[2 * (r.pen_off + e)], count = pens[2 * (r.pen_off + e) + 1];
        if ((int)id >= vocab) continue;
        float l = x[id];
        if (r.rep != 1.0f) l = l > 0.0f ? l / r.rep : l * r.rep;
        if (count > 0 && (r.presence != 0.0f || r.frequency != 0.0f)) l -= r.presence + r.frequency * (float)count;
        x[id] = l;
    }
    __syncthreads();

    // Sanitize; argmax with the lowest id on ties.
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (int i = c0; i < c1; i++) {
        float l = x[i];
        if (l != l) l = -__int_as_float(0x7f800000);
        else if (l == __int_as_float(0x7f800000)) l = 3.402823466e38f;
        x[i] = l;
        if (l > best) { best = l; bi = i; }
    }
    {
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (lane == 0) { shf[warp] = best; shi[warp] = bi; }
        __syncthreads();
        best = lane < (int)(blockDim.x >> 5) ? shf[lane] : -__int_as_float(0x7f800000);
        bi = lane < (int)(blockDim.x >> 5) ? shi[lane] : 0x7fffffff;
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, best, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        __syncthreads();
    }
    if (bi == 0x7fffffff) bi = 0; // every logit -inf
    const float max = best;
    if (r.greedy || max == -__int_as_float(0x7f800000)) {
        if (threadIdx.x == 0) out[blockIdx.x] = (u32)bi;
        return;
    }
    const float inv_t = r.inv_t;
    const u32 neg_inf_key = s_key(-__int_as_float(0x7f800000));
#define SCALED(i) ((x[i] - max) * inv_t)

    // Top-k: the largest key K with count(key >= K) >= k.
    Cut ck = {0u, 0u, 0u, true};
    if (r.top_k > 0) {
        u32 lo = neg_inf_key + 1, hi = 0xffffffffu; // answer in [lo, hi]
        while (lo < hi) {
            u32 mid = lo + (hi - lo + 1) / 2;
            u32 n = 0;
            for (int i = c0; i < c1; i++) n += s_key(SCALED(i)) >= mid;
            n = block_sum_u32(n, shu);
            if (n >= r.top_k) lo = mid; else hi = mid - 1;
        }
        u32 gt = 0, eq = 0;
        for (int i = c0; i < c1; i++) { u32 k = s_key(SCALED(i)); gt += k > lo; eq += k == lo; }
        u32 gt_all = block_sum_u32(gt, shu);
        ck.k = lo;
        ck.n_eq = r.top_k > gt_all ? r.top_k - gt_all : 0u;
        ck.rank0 = block_exclusive_u32(eq, shu);
        ck.all = false;
    }

    // Top-p over what top-k kept: the largest key K whose kept mass
    // (key >= K) reaches p times the kept total.
    Cut cp = {0u, 0u, 0u, true};
    if (r.top_p < 1.0f) {
        double m = 0.0;
        u32 seen = 0;
        for (int i = c0; i < c1; i++) {
            float s = SCALED(i);
            u32 k = s_key(s);
            if (k > neg_inf_key && cut_keeps(ck, k, &seen)) m += (double)expf(s);
        }
        double target = (double)r.top_p * block_sum_f64(m, shd);
        u32 lo = neg_inf_key + 1, hi = 0xffffffffu;
        while (lo < hi) {
            u32 mid = lo + (hi - lo + 1) / 2;
            double mm = 0.0;
            seen = 0;
            for (int i = c0; i < c1; i++) {
                float s = SCALED(i);
                u32 k = s_key(s);
                bool in = k > neg_inf_key && cut_keeps(ck, k, &seen);
                if (in && k >= mid) mm += (double)expf(s);
            }
            mm = block_sum_f64(mm, shd);
            if (mm >= target) lo = mid; else hi = mid - 1;
        }
        // Ties at the cut: as many as the remaining mass needs, by id.
        double gt = 0.0;
        u32 eq = 0;
        float s_eq = 0.0f;
        seen = 0;
        for (int i = c0; i < c1; i++) {
            float s = SCALED(i);
            u32 k = s_key(s);
            if (!(k > neg_inf_key && cut_keeps(ck, k, &seen))) continue;
            if (k > lo) gt += (double)expf(s);
            else if (k == lo) { eq++; s_eq = s; }
        }
        double gt_all = block_sum_f64(gt, shd);
        u32 eq_all = block_sum_u32(eq, shu);
        // Every thread with a tied token holds the same s_eq; find one.
        __syncthreads();
        if (eq > 0) shf[0] = s_eq;
        __syncthreads();
        double w = (double)expf(shf[0]);
        u32 need = 1;
        if (target > gt_all && w > 0.0) {
            double n = ceil((target - gt_all) / w);
            need = (u32)fmin(n, (double)eq_all);
        } else if (target <= gt_all) {
            need = 0;
        }
        cp.k = lo;
        cp.n_eq = need > 0 ? need : 0u;
        cp.rank0 = block_exclusive_u32(eq, shu);
        cp.all = false;
        // A cut that keeps nothing at key > lo and no tie keeps the best.
        if (gt_all == 0.0 && cp.n_eq == 0) cp.n_eq = 1;
    }

    // Draw: kept weights in id order, the host's u times their total.
    double part = 0.0;
    {
        u32 sk = 0, sp = 0;
        for (int i = c0; i < c1; i++) {
            float s = SCALED(i);
            u32 k = s_key(s);
            if (k <= neg_inf_key || s < r.min_p_log) continue;
            bool a = cut_keeps(ck, k, &sk);
            bool b = a && cut_keeps(cp, k, &sp);
            if (b) part += (double)expf(s);
        }
    }
    double total = block_sum_f64(part, shd);
    double before = block_exclusive_f64(part, shd);
    double goal = r.u * total;
    __shared__ int pick;
    if (threadIdx.x == 0) pick = bi;
    __syncthreads();
    if (goal >= before && goal < before + part) {
        u32 sk = 0, sp = 0;
        double run = before;
        int last = -1;
        for (int i = c0; i < c1; i++) {
            float s = SCALED(i);
            u32 k = s_key(s);
            if (k <= neg_inf_key || s < r.min_p_log) continue;
            bool a = cut_keeps(ck, k, &sk);
            bool b = a && cut_keeps(cp, k, &sp);
            if (!b) continue;
            double w = (double)expf(s);
            if (w > 0.0) last = i;
            if (goal < run + w) { pick = i; last = -2; break; }
            run += w;
        }
        if (last >= 0) pick = last; // rounding left goal past this chunk's last weight
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = (u32)pick;
#undef SCALED
}
