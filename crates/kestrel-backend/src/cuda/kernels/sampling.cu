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

// Fast path for rows that only scale and draw (no penalty, top-k or top-p:
// temperature, optionally min-p; OpenAI's defaults): the single-block
// kernel above walks a 262k vocabulary on one SM in several passes (tens of
// microseconds at one row); here each row's vocabulary is cut into chunks
// of `chunk` consecutive ids (a multiple of SAMPLE_FAST_THREADS; thread t
// owns chunk / SAMPLE_FAST_THREADS consecutive ids of it), one block each,
// in two launches:
// sample_chunk_max (the row's max, as argmax keys) and sample_chunk_draw
// (each chunk's kept mass; the row's last chunk block to finish finds the
// chunk holding u times the total, then the id inside it). The kept set
// and weights are the chain's (scaled s = (l - max) / T, s >= ln min_p);
// the walk order is by id, so the token for a given u may differ from the
// single-block kernel's, not its distribution.
#define SAMPLE_FAST_THREADS 256

__device__ __forceinline__ float sample_sanitize(float l) {
    if (l != l) return -__int_as_float(0x7f800000);
    if (l == __int_as_float(0x7f800000)) return 3.402823466e38f;
    return l;
}

// grid = (chunks, rows): keys[row] (zeroed before) gets the atomicMax of
// (ordered bits of the chunk's max, ~id).
extern "C" __global__ void __launch_bounds__(SAMPLE_FAST_THREADS) sample_chunk_max(const float* logits, int vocab,
                                                                                    int chunk, u64* keys) {
    pdl_entry();
    __shared__ u64 sh[SAMPLE_FAST_THREADS / 32];
    const float* x = logits + (long long)blockIdx.y * vocab;
    const int per = chunk / SAMPLE_FAST_THREADS;
    int i0 = blockIdx.x * chunk + threadIdx.x * per;
    u64 best = 0;
    for (int j = 0; j < per; j++) {
        int i = i0 + j;
        if (i < vocab) {
            u64 k = ((u64)ordered_bits(sample_sanitize(x[i])) << 32) | (u64)(0xffffffffu - (u32)i);
            best = k > best ? k : best;
        }
    }
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        u64 other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < SAMPLE_FAST_THREADS / 32; w++) best = sh[w] > best ? sh[w] : best;
        atomicMax((unsigned long long*)keys + blockIdx.y, (unsigned long long)best);
    }
}

// Weights of this thread's ids (`per` consecutive ones from i0): their
// sum, in id order.
__device__ __forceinline__ double sample_chunk_part(const float* x, int i0, int per, int vocab, float max,
                                                    float inv_t, float min_p_log) {
    const u32 neg_inf_key = s_key(-__int_as_float(0x7f800000));
    double part = 0.0;
    for (int j = 0; j < per; j++) {
        int i = i0 + j;
        if (i >= vocab) break;
        float s = (sample_sanitize(x[i]) - max) * inv_t;
        if (s_key(s) <= neg_inf_key || s < min_p_log) continue;
        part += (double)expf(s);
    }
    return part;
}

// Warp 0 of a block: the item (0 .. n) whose share of the items' summed
// mass holds goal, items in order. With `scale`, goal is u times the total.
// Each lane sums a run of consecutive items, the lanes' sums are scanned,
// and the lane whose [previous bound, own bound) holds the goal walks its
// run: every bound is one computed sum, so the intervals partition the
// total whatever the rounding. A goal that rounding left at or past the
// total takes the last item with mass. *rest: the goal minus the mass
// before the item; *total: the summed mass. All lanes return the item.
template <typename F>
__device__ int sample_pick(int n, F mass, double goal, bool scale, double* rest, double* total) {
    int lane = threadIdx.x & 31;
    int per = (n + 31) / 32, b0 = min(n, lane * per), b1 = min(n, b0 + per);
    double p = 0.0;
    for (int k = b0; k < b1; k++) p += mass(k);
    double incl = p;
    #pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0;
    double tot = __shfl_sync(0xffffffffu, incl, 31);
    *total = tot;
    if (scale) goal *= tot;
    u32 in = __ballot_sync(0xffffffffu, incl > excl && goal >= excl && goal < incl);
    u32 live = __ballot_sync(0xffffffffu, incl > excl);
    int who = in ? __ffs(in) - 1 : live ? 31 - __clz(live) : 0;
    int item = -1;
    double left = 0.0;
    if (lane == who) {
        double run = excl;
        int lastk = -1;
        double last_run = run;
        for (int k = b0; k < b1; k++) {
            double w = mass(k);
            if (w <= 0.0) continue;
            lastk = k;
            last_run = run;
            if (goal < run + w) break;
            run += w;
        }
        item = lastk < 0 ? b0 : lastk;
        left = goal - last_run;
    }
    item = __shfl_sync(0xffffffffu, item, who);
    *rest = __shfl_sync(0xffffffffu, left, who);
    return item;
}

// grid = (chunks, rows), after sample_chunk_max. sums: rows x chunks
// doubles; counters: a u32 per row (zero between launches; the last block
// resets it). The token goes to out[row] and, as an argmax-style key, to
// keys[row] (so that the overlapped-step queue can take sampled rows as it
// takes greedy ones).
extern "C" __global__ void __launch_bounds__(SAMPLE_FAST_THREADS)
    sample_chunk_draw(const float* logits, int vocab, int chunk, const SampleRow* rows, u64* keys, double* sums,
                      u32* counters, u32* out) {
    pdl_entry();
    __shared__ double shd[33];
    __shared__ double shd_m[SAMPLE_FAST_THREADS];
    __shared__ int last_block, pick_chunk, pick;
    __shared__ double goal_in;
    const int row = blockIdx.y, chunks = gridDim.x, per = chunk / SAMPLE_FAST_THREADS;
    const SampleRow r = rows[row];
    const float* x = logits + (long long)row * vocab;
    u64 key = keys[row];
    // Every logit -inf (or NaN): token 0, as the single-block kernel.
    const float max = __uint_as_float((u32)(key >> 32) & 0x80000000u ? (u32)(key >> 32) & 0x7fffffffu
                                                                       : ~(u32)(key >> 32));
    const bool dead = key == 0 || max == -__int_as_float(0x7f800000);
    // Greedy rows (no penalties) take the max's id: no mass to sum.
    double part = dead || r.greedy ? 0.0
                                   : sample_chunk_part(x, blockIdx.x * chunk + threadIdx.x * per, per, vocab, max,
                                                       r.inv_t, r.min_p_log);
    double s = block_sum_t<double>(part, shd);
    if (threadIdx.x == 0) {
        sums[(long long)row * chunks + blockIdx.x] = s;
        __threadfence();
        last_block = atomicAdd(counters + row, 1u) == (u32)(chunks - 1);
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    // The row's last block: the chunk holding u times the row's mass, then
    // the id inside it (sample_pick: warp 0).
    if (threadIdx.x < 32) {
        const double* cs = sums + (long long)row * chunks;
        double total;
        int c = sample_pick(chunks, [&](int k) { return __ldcg(cs + k); }, r.u, true, &goal_in, &total);
        if (threadIdx.x == 0) pick_chunk = dead || r.greedy || total <= 0.0 ? -1 : c;
    }
    __syncthreads();
    const int pc = pick_chunk;
    double* m = shd_m;
    if (pc >= 0) {
        m[threadIdx.x] =
            sample_chunk_part(x, pc * chunk + threadIdx.x * per, per, vocab, max, r.inv_t, r.min_p_log);
    }
    __syncthreads();
    if (pc >= 0 && threadIdx.x < 32) {
        // goal_in is the goal's offset inside the chunk's mass.
        double g = goal_in, unused;
        int t = sample_pick(SAMPLE_FAST_THREADS, [&](int k) { return m[k]; }, g, false, &g, &unused);
        if (threadIdx.x == 0) {
            // The ids of thread t, in order (the last one with weight when
            // rounding left the goal past them).
            const u32 neg_inf_key = s_key(-__int_as_float(0x7f800000));
            int i0 = pc * chunk + t * per, lastk = -1;
            double run = 0.0;
            for (int j = 0; j < per && i0 + j < vocab; j++) {
                float sv = (sample_sanitize(x[i0 + j]) - max) * r.inv_t;
                if (s_key(sv) <= neg_inf_key || sv < r.min_p_log) continue;
                double w = (double)expf(sv);
                if (w <= 0.0) continue;
                lastk = i0 + j;
                if (g < run + w) break;
                run += w;
            }
            pick = lastk;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        // Greedy, or nothing kept with weight (every weight underflowed):
        // the max's id; 0 for a row without a finite logit.
        u32 tok = pc >= 0 && pick >= 0 ? (u32)pick : dead ? 0u : 0xffffffffu - (u32)key;
        out[row] = tok;
        // As an argmax key for the step queue; the counter ready for the
        // next launch (the keys are zeroed by the host before it).
        keys[row] = ((u64)1 << 32) | (u64)(0xffffffffu - tok);
        counters[row] = 0u;
    }
}
