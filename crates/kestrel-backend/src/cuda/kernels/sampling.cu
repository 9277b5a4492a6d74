// Sampling on the device: the engine's sampler chain (kestrel-engine's
// sampling.rs) over each logits row, so that only token ids cross to the
// host. One 1024-thread block per row; thread t owns ids t, t + 1024, ...
// (coalesced passes), and every reduction has a fixed shape: the same
// inputs give the same token on every run.
//
// Chain (as on the host): repetition, presence and frequency penalties on
// the listed tokens; NaN -> -inf, +inf -> f32 max; greedy (argmax, lowest
// id on ties) when flagged; else scaled s = (l - max) / T, top-k, top-p
// over what top-k kept, min-p, then a draw with the host's uniform `u`
// (the host's seeded RNG stays the only source of randomness).
// Thresholds are found by bisection on an order-preserving integer key of s
// (counts for top-k, f64 mass for top-p), ties at a threshold are kept in
// ascending id order, as the host's best-first order does. The draw walks
// the kept tokens in a fixed order, thread by thread (the host walks its
// candidate order: the distribution is the same, the token for a given `u`
// may differ).

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

// Block sum in a fixed order (warp trees, then warp 0 over the warp sums).
template <typename T>
__device__ T block_sum_t(T v, T* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? sh[lane] : (T)0;
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive prefix over threads in thread order, and the block total
// (warp shuffle scans, then a scan of the warp totals).
template <typename T>
__device__ T block_exclusive(T v, T* sh, T* total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    T inc = v;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    __syncthreads();
    if (lane == 31) sh[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        T w = lane < nw ? sh[lane] : (T)0;
        T wi = w;
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(0xffffffffu, wi, o);
            if (lane >= o) wi += y;
        }
        if (lane < nw) sh[lane] = wi - w; // exclusive prefix of warp totals
        if (lane == 31) sh[32] = wi;
    }
    __syncthreads();
    T r = sh[warp] + inc - v;
    *total = sh[32];
    return r;
}

// A threshold on the key: tokens with key > k are in; tokens with key == k
// are all in (`split` false), or, when the cut falls inside a group of
// equal tokens, the lowest ids of them: bit j of `bits` says whether this
// thread's j-th token (id = threadIdx.x + j * blockDim.x) is in. `all`: no
// threshold.
#define SAMPLE_MAXJ 256 // tokens per thread: vocab <= 256 * 1024
struct Cut {
    u32 k;
    bool all;
    bool split;
    u32 bits[SAMPLE_MAXJ / 32];
};

__device__ __forceinline__ bool cut_keeps(const Cut& c, u32 key, int j) {
    if (c.all || key > c.k) return true;
    if (key < c.k) return false;
    return !c.split || ((c.bits[j >> 5] >> (j & 31)) & 1u);
}

// Marks, in id order, the first `need` tokens with key == c.k that `pre`
// keeps (ranks by a ballot per warp and a scan over warps, one round of
// blockDim.x ids at a time: only when a cut splits a group of ties).
template <typename F>
__device__ void cut_split(Cut& c, u32 need, int vocab, F key_of, const Cut* pre, u32* sh) {
    c.split = true;
    for (int w = 0; w < SAMPLE_MAXJ / 32; w++) c.bits[w] = 0u;
    u32 base = 0;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int j = 0; j * (int)blockDim.x < vocab; j++) {
        int id = threadIdx.x + j * blockDim.x;
        bool eq = false;
        if (id < vocab) {
            u32 k = key_of(id);
            eq = k == c.k && (!pre || cut_keeps(*pre, k, j));
        }
        u32 ball = __ballot_sync(0xffffffffu, eq);
        u32 below = __popc(ball & ((1u << lane) - 1u));
        __syncthreads();
        if (lane == 0) sh[warp] = __popc(ball);
        __syncthreads();
        u32 before = base;
        for (int w = 0; w < warp; w++) before += sh[w];
        u32 round = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) round += sh[w];
        if (eq && before + below < need) c.bits[j >> 5] |= 1u << (j & 31);
        base += round;
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(float* logits, int vocab,
                                                                          const SampleRow* rows, const u32* pens,
                                                                          u32* out) {
    pdl_entry();
    __shared__ double shd[33];
    __shared__ u32 shu[33];
    __shared__ float shf[32];
    __shared__ int shi[32];
    const SampleRow r = rows[blockIdx.x];
    float* x = logits + (long long)blockIdx.x * vocab;
    const int T = blockDim.x;
    // Thread t owns ids t, t + T, t + 2T, ...: every pass reads the row
    // coalesced.

    // Penalties: each listed token once (the host lists distinct ids).
    for (u32 e = threadIdx.x; e < r.pen_n; e += T) {
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
    for (int i = threadIdx.x; i < vocab; i += T) {
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
        best = lane < (T >> 5) ? shf[lane] : -__int_as_float(0x7f800000);
        bi = lane < (T >> 5) ? shi[lane] : 0x7fffffff;
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
    auto key_of = [&](int i) { return s_key((x[i] - max) * inv_t); };

    // Top-k: the largest key K with count(key >= K) >= k.
    Cut ck;
    ck.all = true;
    ck.split = false;
    ck.k = 0u;
    if (r.top_k > 0) {
        u32 lo = neg_inf_key + 1, hi = 0xffffffffu; // answer in [lo, hi]
        while (lo < hi) {
            u32 mid = lo + (hi - lo + 1) / 2;
            u32 n = 0;
            for (int i = threadIdx.x; i < vocab; i += T) n += key_of(i) >= mid;
            n = block_sum_t<u32>(n, shu);
            if (n >= r.top_k) lo = mid; else hi = mid - 1;
        }
        u32 gt = 0, eq = 0;
        for (int i = threadIdx.x; i < vocab; i += T) { u32 k = key_of(i); gt += k > lo; eq += k == lo; }
        u32 gt_all = block_sum_t<u32>(gt, shu);
        u32 eq_all = block_sum_t<u32>(eq, shu);
        ck.k = lo;
        ck.all = false;
        u32 need = r.top_k > gt_all ? r.top_k - gt_all : 0u;
        if (need < eq_all) cut_split(ck, need, vocab, key_of, (const Cut*)nullptr, shu);
    }

    // Top-p over what top-k kept: the largest key K whose kept mass
    // (key >= K) reaches p times the kept total.
    Cut cp;
    cp.all = true;
    cp.split = false;
    cp.k = 0u;
    if (r.top_p < 1.0f) {
        double m = 0.0;
        for (int i = threadIdx.x, j = 0; i < vocab; i += T, j++) {
            u32 k = key_of(i);
            if (k > neg_inf_key && cut_keeps(ck, k, j)) m += (double)expf((x[i] - max) * inv_t);
        }
        double target = (double)r.top_p * block_sum_t<double>(m, shd);
        u32 lo = neg_inf_key + 1, hi = 0xffffffffu;
        while (lo < hi) {
            u32 mid = lo + (hi - lo + 1) / 2;
            double mm = 0.0;
            for (int i = threadIdx.x, j = 0; i < vocab; i += T, j++) {
                u32 k = key_of(i);
                if (k >= mid && k > neg_inf_key && cut_keeps(ck, k, j)) mm += (double)expf((x[i] - max) * inv_t);
            }
            mm = block_sum_t<double>(mm, shd);
            if (mm >= target) lo = mid; else hi = mid - 1;
        }
        // Ties at the cut: as many as the remaining mass needs, by id.
        double gt = 0.0;
        u32 eq = 0;
        float s_eq = 0.0f;
        for (int i = threadIdx.x, j = 0; i < vocab; i += T, j++) {
            u32 k = key_of(i);
            if (!(k > neg_inf_key && cut_keeps(ck, k, j))) continue;
            float s = (x[i] - max) * inv_t;
            if (k > lo) gt += (double)expf(s);
            else if (k == lo) { eq++; s_eq = s; }
        }
        double gt_all = block_sum_t<double>(gt, shd);
        u32 eq_all = block_sum_t<u32>(eq, shu);
        __syncthreads();
        if (eq > 0) shf[0] = s_eq; // every tied token has the same s
        __syncthreads();
        double w = (double)expf(shf[0]);
        u32 need = eq_all;
        if (w > 0.0 && target > gt_all) need = (u32)fmin(ceil((target - gt_all) / w), (double)eq_all);
        if (need == 0) need = 1;
        cp.k = lo;
        cp.all = false;
        if (need < eq_all) cut_split(cp, need, vocab, key_of, &ck, shu);
    }

    // Draw: the kept weights in a fixed order (thread by thread, each
    // thread's ids ascending), the host's u times their total.
    double part = 0.0;
    for (int i = threadIdx.x, j = 0; i < vocab; i += T, j++) {
        float s = (x[i] - max) * inv_t;
        u32 k = s_key(s);
        if (k <= neg_inf_key || s < r.min_p_log) continue;
        if (cut_keeps(ck, k, j) && cut_keeps(cp, k, j)) part += (double)expf(s);
    }
    double total;
    double before = block_exclusive<double>(part, shd, &total);
    double goal = r.u * total;
    __shared__ int pick;
    if (threadIdx.x == 0) pick = bi;
    __syncthreads();
    if (part > 0.0 && goal >= before && goal < before + part) {
        double run = before;
        int last = -1;
        for (int i = threadIdx.x, j = 0; i < vocab; i += T, j++) {
            float s = (x[i] - max) * inv_t;
            u32 k = s_key(s);
            if (k <= neg_inf_key || s < r.min_p_log) continue;
            if (!(cut_keeps(ck, k, j) && cut_keeps(cp, k, j))) continue;
            double w = (double)expf(s);
            if (w > 0.0) last = i;
            if (goal < run + w) { last = -2; pick = i; break; }
            run += w;
        }
        if (last >= 0) pick = last; // rounding left goal past this thread's last weight
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = (u32)pick;
}
