// Causal attention over the paged KV pool. A query row at position p of
// sequence s sees keys at positions max(0, p - window + 1) ..= p, read
// through s's block table (pool slot = table[k / block_size] * block_size +
// k % block_size). Scores: (q . k) * scale, then optional softcap.

#define ATT_WARPS 4
#define ATT_MAXJ 8 // head_dim <= 32 * ATT_MAXJ
#define ATT_UNROLL 4
#define ATT_NO_SKIP 0x7fffffff // att_load_round / dec_issue_tile: load every key

__device__ __forceinline__ long long kv_slot(const u32* table, int block_size, int k) {
    return (long long)table[k / block_size] * block_size + (k % block_size);
}

// Block-table entries a decode-tile item (attention_dec_impl below) keeps
// in shared memory: the entries of its first ATT_TBL blocks (1,024 keys at
// block size 16), loaded once, so that the tile copies depend on no further
// global load; keys beyond read the table in global memory. (Tried in the
// key-per-warp kernels too: H200 decode at 64 / 128 sequences 55,623 /
// 92,370 -> 55,180 / 74,972 tok/s; those read the table through L1.)
#define ATT_TBL 64

__device__ __forceinline__ void att_load_table(u32* tbl, const u32* table, int block_size, int kbeg, int kend,
                                               int tid, int nthr) {
    int b0 = kbeg / block_size;
    int nb = kend >= kbeg ? min(kend / block_size - b0 + 1, ATT_TBL) : 0;
    for (int i = tid; i < nb; i += nthr) tbl[i] = table[b0 + i];
}

// Pool slot of key k through the shared copy (b0 = kbeg / block_size).
__device__ __forceinline__ long long att_slot(const u32* tbl, const u32* table, int block_size, int b0, int k) {
    int b = k / block_size;
    u32 id = b - b0 < ATT_TBL ? tbl[b - b0] : table[b];
    return (long long)id * block_size + (k % block_size);
}

// Keys [*kbeg, *kend] of split z: the visible keys of a query at `pos`
// (sliding window if window > 0) in `splits` equal shares. Computed from the
// position, so a captured graph stays valid as contexts grow; every fused
// kernel splits alike (the grouped kernels' bit identity with the per-head
// one depends on it).
__device__ __forceinline__ void split_keys(int pos, int window, int splits, int z, int* kbeg, int* kend) {
    int start = window > 0 ? max(0, pos - window + 1) : 0;
    int chunk = (pos - start + 1 + splits - 1) / splits;
    *kbeg = start + z * chunk;
    *kend = min(pos, *kbeg + chunk - 1);
}

// Fused: grid = (rows, n_heads, splits), block = 32 * ATT_WARPS. Split z
// takes an equal share of the row's visible keys (computed here from the
// position, so a captured graph stays valid as contexts grow); each warp
// walks every ATT_WARPS-th key of it with an online softmax and the warps
// merge at the end. With splits == 1 the result goes to `out`; otherwise
// (max, sum, unnormalised values) go to `part`, and the last split block of
// a (row, head) to finish (counted in `counters`, which it resets to 0 for
// the next launch or graph replay) merges them: no second launch.
// The KV element type is a template parameter so that every K/V load of a
// key group is one plain load the compiler can issue back to back.
// Eight consecutive pool elements from element index i (16-byte aligned).
template <int KVT>
__device__ __forceinline__ void kv_load8(const void* pool, long long i, float* dst) {
    if (KVT == KV_F32) {
        const float4* p = (const float4*)((const float*)pool + i);
        float4 a = p[0], b = p[1];
        dst[0] = a.x; dst[1] = a.y; dst[2] = a.z; dst[3] = a.w;
        dst[4] = b.x; dst[5] = b.y; dst[6] = b.z; dst[7] = b.w;
    } else {
        uint4 r = *(const uint4*)((const u16*)pool + i);
        u32 w[4] = {r.x, r.y, r.z, r.w};
        #pragma unroll
        for (int k = 0; k < 8; k++) {
            u16 h = (u16)((w[k >> 1] >> (16 * (k & 1))) & 0xffffu);
            dst[k] = KVT == KV_F16 ? h2f(h) : bf2f(h);
        }
    }
}

// VEC (head_dim % 8 == 0): lane owns dims lane*8 .. lane*8+7 and loads them
// with one 16-byte (f16/bf16) or two (f32) loads; otherwise lane owns dims
// lane + 32*j with scalar loads.
//
// One (row, head, split z) work item is run by ATT_THREADS threads (tid
// 0..ATT_THREADS) that synchronise on named barrier `bar` only, so that the
// decode megakernel (megakernel.cu) can run two items side by side in one
// 256-thread block; `sm` holds att_smem_floats(head_dim) floats. q is read
// through L2 (__ldcg): inside the megakernel it was written by other blocks
// of the same launch, whose writes L1 does not see.
#define ATT_THREADS (32 * ATT_WARPS)

__device__ __forceinline__ int att_smem_floats(int head_dim) { return 5 * head_dim + 2 * ATT_WARPS + 34; }

__device__ __forceinline__ void bar_sync(int bar, int nthr) {
    asm volatile("bar.sync %0, %1;" ::"r"(bar), "r"(nthr) : "memory");
}

// A lane's part of the K and V rows of one key (zeros when `live` is
// false): dims lane*8.. (VEC) or lane + 32j.
template <int KVT, bool VEC>
__device__ __forceinline__ void att_load_key(const void* pool, long long layer_off, long long v_off,
                                             const u32* table, int block_size, int kv_dim, int kvh, int head_dim,
                                             int lane, int key, bool live, float (&kk)[ATT_MAXJ],
                                             float (&vv)[ATT_MAXJ]) {
    long long base = live ? layer_off + kv_slot(table, block_size, key) * kv_dim + (long long)kvh * head_dim : -1;
    if (VEC) {
        if (base >= 0 && lane * 8 < head_dim) {
            kv_load8<KVT>(pool, base + lane * 8, kk);
            kv_load8<KVT>(pool, base + v_off + lane * 8, vv);
        } else {
            #pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) { kk[j] = 0.0f; vv[j] = 0.0f; }
        }
    } else {
        #pragma unroll
        for (int j = 0; j < ATT_MAXJ; j++) {
            int d = lane + 32 * j;
            bool ok = base >= 0 && d < head_dim;
            kk[j] = ok ? kv_load(pool, base + d, KVT) : 0.0f;
            vv[j] = ok ? kv_load(pool, base + v_off + d, KVT) : 0.0f;
        }
    }
}

// The K and V of ATT_UNROLL keys of one warp's round (k0, k0 + ATT_WARPS,
// ...), zeros past kend and for keys from `skip` on (this step's keys, which
// the caller loads after the PDL wait; ATT_NO_SKIP: none).
template <int KVT, bool VEC>
__device__ __forceinline__ void att_load_round(const void* pool, long long layer_off, long long v_off,
                                               const u32* table, int block_size, int kv_dim, int kvh,
                                               int head_dim, int lane, int k0, int kend, int skip,
                                               float (&kk)[ATT_UNROLL][ATT_MAXJ],
                                               float (&vv)[ATT_UNROLL][ATT_MAXJ]) {
    #pragma unroll
    for (int u = 0; u < ATT_UNROLL; u++) {
        int key = k0 + u * ATT_WARPS;
        att_load_key<KVT, VEC>(pool, layer_off, v_off, table, block_size, kv_dim, kvh, head_dim, lane, key,
                               key <= kend && key < skip, kk[u], vv[u]);
    }
}

// PRE (decode steps, standalone launch only): everything that does not
// depend on the previous kernel is read before waiting for it (pdl_entry):
// the position, the block table and the K/V of the warp's first round of
// keys, all written before the previous kernel began (the KV pool by earlier
// steps; the metadata by the host before the replay). Only the query and the
// keys this step stores (qk_norm_rope_store, just before) are read after the
// wait: the row's own position, and in a speculative step the positions of
// the same sequence's earlier rows, from `fresh[row]` on (null: the own
// position only). So the launch's critical path loses the chain positions ->
// table -> K/V. Same arithmetic, same bits as without PRE.
template <int KVT, bool VEC, bool PRE = false>
__device__ __forceinline__ void attention_impl(int row, int h, int z, int tid, int bar, float* sm,
                                     const float* q, const void* pool, long long layer_off,
                                     long long v_off, const u32* positions,
                                     const u32* token_seq, const u32* block_tables, int bt_stride,
                                     int block_size, int n_heads, int n_kv_heads, int head_dim,
                                     float scale, int window, float cap, float* out, int splits,
                                     float* part, u32* counters, u16* out16, int kps = 0, int kmin = 1,
                                     const u32* fresh = nullptr) {
    float* qs = sm;
    float* accs = sm + head_dim;
    float* ms = accs + ATT_WARPS * head_dim;
    float* ls = ms + ATT_WARPS;
    float* wz = ls + ATT_WARPS;
    float* misc = wz + 32; // [0] 1 / total weight, [1] this item merges (as int bits)
    int lane = tid & 31, warp = tid >> 5;
    int kvh = h / (n_heads / n_kv_heads);
    int kv_dim = n_kv_heads * head_dim;
    int pos = 0, kbeg = 0, kend = -1, first_new = 0;
    // Splits in use: the grid's `splits` (also the partials' stride), or
    // with kps > 0 (PRE only) one per kps visible keys, at least kmin and
    // at most `splits`: short contexts then merge few partials, and the
    // extra blocks leave at once. Decided from the position, so a captured
    // graph stays valid.
    int nsplit = splits;
    const u32* table = nullptr;
    float kk[ATT_UNROLL][ATT_MAXJ], vv[ATT_UNROLL][ATT_MAXJ];
    TRACE(long long tr0 = trace_now(); long long tr1 = tr0; long long tr2 = tr0; long long tr3 = tr0;
          bool tr_me = PRE && tid == 0 && row == 0 && h == 0 && z == 0 && kestrel_trace;)
    if (PRE) {
        pos = (int)positions[row];
        if (kps > 0) {
            int nkeys = pos + 1 - (window > 0 ? max(0, pos - window + 1) : 0);
            nsplit = min(splits, max(kmin, (nkeys + kps - 1) / kps));
            if (z >= nsplit) return;
        }
        table = block_tables + (long long)token_seq[row] * bt_stride;
        split_keys(pos, window, nsplit, z, &kbeg, &kend);
        first_new = fresh ? (int)fresh[row] : pos;
        att_load_round<KVT, VEC>(pool, layer_off, v_off, table, block_size, kv_dim, kvh, head_dim, lane,
                                 kbeg + warp, kend, first_new, kk, vv);
        pdl_entry();
        TRACE(tr1 = trace_now();)
    }
    // q null: the caller has put the scaled query head in qs already.
    if (q) {
        const float* qr = q + ((long long)row * n_heads + h) * head_dim;
        for (int d = tid; d < head_dim; d += ATT_THREADS) qs[d] = __ldcg(qr + d) * scale;
    }
    if (PRE) {
        // This step's keys (the own position, and earlier rows' in a
        // speculative step) that fall in the first round.
        #pragma unroll
        for (int r = 0; r < ATT_UNROLL; r++) {
            int key = kbeg + warp + r * ATT_WARPS;
            if (key >= first_new && key <= kend)
                att_load_key<KVT, VEC>(pool, layer_off, v_off, table, block_size, kv_dim, kvh, head_dim, lane,
                                       key, true, kk[r], vv[r]);
        }
    }
    bar_sync(bar, ATT_THREADS);
    TRACE(tr2 = trace_now();)
    if (!PRE) {
        pos = (int)positions[row];
        table = block_tables + (long long)token_seq[row] * bt_stride;
        split_keys(pos, window, splits, z, &kbeg, &kend);
    }

    float m = -__int_as_float(0x7f800000), l = 0.0f;
    float acc[ATT_MAXJ];
    float qv[ATT_MAXJ];
    #pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) {
        int d = VEC ? lane * 8 + j : lane + 32 * j;
        acc[j] = 0.0f;
        qv[j] = d < head_dim ? qs[d] : 0.0f;
    }
    // Keys in groups of ATT_UNROLL per warp: every K and V load of a group
    // is issued before the first reduction, so a group costs about one
    // memory latency instead of two per key. (8 per group measured slower:
    // H200, engine decode at 64 sequences 49,169 -> 38,757 tok/s.)
    for (int k0 = kbeg + warp; k0 <= kend; k0 += ATT_WARPS * ATT_UNROLL) {
        if (!PRE || k0 != kbeg + warp)
            att_load_round<KVT, VEC>(pool, layer_off, v_off, table, block_size, kv_dim, kvh, head_dim, lane, k0,
                                     kend, ATT_NO_SKIP, kk, vv);
        #pragma unroll
        for (int u = 0; u < ATT_UNROLL; u++) {
            if (k0 + u * ATT_WARPS > kend) break; // uniform across the warp
            float s = 0.0f;
            #pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) s += qv[j] * kk[u][j];
            s = warp_sum(s);
            if (cap > 0.0f) s = cap * tanhf(s / cap);
            float mn = fmaxf(m, s);
            float corr = expf(m - mn);
            float p = expf(s - mn);
            l = l * corr + p;
            #pragma unroll
            for (int j = 0; j < ATT_MAXJ; j++) acc[j] = acc[j] * corr + p * vv[u][j];
            m = mn;
        }
    }
    TRACE(tr3 = trace_now();)
    #pragma unroll
    for (int j = 0; j < ATT_MAXJ; j++) {
        int d = VEC ? lane * 8 + j : lane + 32 * j;
        if (d < head_dim) accs[warp * head_dim + d] = acc[j];
    }
    if (lane == 0) { ms[warp] = m; ls[warp] = l; }
    bar_sync(bar, ATT_THREADS);
    float mt = -__int_as_float(0x7f800000);
    for (int w = 0; w < ATT_WARPS; w++) mt = fmaxf(mt, ms[w]);
    float lt = 0.0f;
    for (int w = 0; w < ATT_WARPS; w++) if (ls[w] > 0.0f) lt += ls[w] * expf(ms[w] - mt);
    if (nsplit == 1) {
        float* orow = out + ((long long)row * n_heads + h) * head_dim;
        for (int d = tid; d < head_dim; d += ATT_THREADS) {
            float v = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) if (ls[w] > 0.0f) v += accs[w * head_dim + d] * expf(ms[w] - mt);
            orow[d] = lt > 0.0f ? v / lt : 0.0f;
            if (out16) out16[((long long)row * n_heads + h) * head_dim + d] = f2h(orow[d]);
        }
    } else {
        long long rh = (long long)row * n_heads + h;
        float* prow = part + (rh * splits + z) * (head_dim + 2);
        if (tid == 0) { prow[0] = mt; prow[1] = lt; }
        for (int d = tid; d < head_dim; d += ATT_THREADS) {
            float v = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++) if (ls[w] > 0.0f) v += accs[w * head_dim + d] * expf(ms[w] - mt);
            prow[2 + d] = v;
        }
        __threadfence();
        bar_sync(bar, ATT_THREADS);
        if (tid == 0) misc[1] = __int_as_float(atomicAdd(counters + rh, 1u) == (u32)(nsplit - 1));
        bar_sync(bar, ATT_THREADS);
        TRACE(if (tr_me) {
            long long t4 = trace_now(), re = *(volatile long long*)(kestrel_trace + TRACE_ROPE_END);
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_N, 1ull);
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_ENTRY_WAIT, (unsigned long long)(tr1 - tr0));
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_WAIT_Q, (unsigned long long)(tr2 - tr1));
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_KEYS, (unsigned long long)(tr3 - tr2));
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_PARTIAL, (unsigned long long)(t4 - tr3));
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_ROPE_WAIT, (unsigned long long)(tr1 - re));
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_ROPE_ENTRY, (unsigned long long)(tr0 - re));
        })
        if (!__float_as_int(misc[1])) return;
        __threadfence();
        const float* p = part + rh * splits * (head_dim + 2);
        if (warp == 0) {
            int z = lane;
            float lz = z < nsplit ? __ldcg(p + z * (head_dim + 2) + 1) : 0.0f;
            bool ok = lz > 0.0f;
            float m = ok ? __ldcg(p + z * (head_dim + 2)) : -__int_as_float(0x7f800000);
            float mx = warp_max(m);
            float w = ok ? expf(m - mx) : 0.0f;
            float lsum = warp_sum(lz * w);
            wz[z] = w;
            if (z == 0) misc[0] = lsum > 0.0f ? 1.0f / lsum : 0.0f;
        }
        bar_sync(bar, ATT_THREADS);
        float inv_l = misc[0];
        float* orow = out + rh * head_dim;
        for (int d = tid; d < head_dim; d += ATT_THREADS) {
            float v = 0.0f;
            #pragma unroll 8
            for (int z = 0; z < nsplit; z++) v += wz[z] * __ldcg(p + z * (head_dim + 2) + 2 + d);
            orow[d] = v * inv_l;
            if (out16) out16[rh * head_dim + d] = f2h(orow[d]);
        }
        if (tid == 0) counters[rh] = 0u;
        TRACE(if (PRE && tid == 0 && rh == 0 && kestrel_trace) {
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_MERGE_N, 1ull);
            atomicAdd((unsigned long long*)kestrel_trace + TRACE_MERGE, (unsigned long long)(trace_now() - tr1));
        })
    }
}

// One (row, head, split) item of fused attention, dispatched on the KV type.
template <bool PRE = false>
__device__ __forceinline__ void attention_item(int row, int h, int z, int tid, int bar, float* sm, const float* q,
                                               const void* pool, long long layer_off, long long v_off, int kvt,
                                               const u32* positions, const u32* token_seq, const u32* block_tables,
                                               int bt_stride, int block_size, int n_heads, int n_kv_heads,
                                               int head_dim, float scale, int window, float cap, float* out,
                                               int splits, float* part, u32* counters, u16* out16, int kps = 0,
                                               int kmin = 1, const u32* fresh = nullptr) {
#define ATT_ARGS row, h, z, tid, bar, sm, q, pool, layer_off, v_off, positions, token_seq, block_tables, bt_stride, \
                 block_size, n_heads, n_kv_heads, head_dim, scale, window, cap, out, splits, part, counters, out16, kps, kmin, \
                 fresh
    bool vec = head_dim % 8 == 0;
    if (kvt == KV_F32) {
        if (vec) attention_impl<KV_F32, true, PRE>(ATT_ARGS); else attention_impl<KV_F32, false, PRE>(ATT_ARGS);
    } else if (kvt == KV_F16) {
        if (vec) attention_impl<KV_F16, true, PRE>(ATT_ARGS); else attention_impl<KV_F16, false, PRE>(ATT_ARGS);
    } else {
        if (vec) attention_impl<KV_BF16, true, PRE>(ATT_ARGS); else attention_impl<KV_BF16, false, PRE>(ATT_ARGS);
    }
#undef ATT_ARGS
}

// grid = (rows, n_heads, splits), block = ATT_THREADS, dynamic shared
// memory att_smem_floats(head_dim) floats. out16 (may be null): the output
// again as f16, the operand of the GEMM that follows on batched steps.
extern "C" __global__ void attention(const float* q, const void* pool, long long layer_off,
                                     long long v_off, int kvt, const u32* positions,
                                     const u32* token_seq, const u32* block_tables, int bt_stride,
                                     int block_size, int n_heads, int n_kv_heads, int head_dim,
                                     float scale, int window, float cap, float* out, int splits,
                                     float* part, u32* counters, u16* out16) { pdl_entry();
    extern __shared__ float sm[];
    attention_item(blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, 1, sm, q, pool, layer_off, v_off, kvt,
                   positions, token_seq, block_tables, bt_stride, block_size, n_heads, n_kv_heads, head_dim,
                   scale, window, cap, out, splits, part, counters, out16);
}

// `attention` for decode steps (one query row per sequence entry), with the
// reads that do not depend on the previous kernel issued before waiting
// for it (attention_impl's PRE), and with kps > 0 one split per kps keys
// (at least kmin, at most `splits`). Same arguments plus kps, kmin and
// fresh (per row, the first position this step stores for the row's
// sequence); with kps = 0 the same bits.
extern "C" __global__ void attention_pre(const float* q, const void* pool, long long layer_off,
                                         long long v_off, int kvt, const u32* positions,
                                         const u32* token_seq, const u32* block_tables, int bt_stride,
                                         int block_size, int n_heads, int n_kv_heads, int head_dim,
                                         float scale, int window, float cap, float* out, int splits,
                                         float* part, u32* counters, u16* out16, int kps, int kmin,
                                         const u32* fresh) {
    extern __shared__ float sm[];
    attention_item<true>(blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, 1, sm, q, pool, layer_off, v_off, kvt,
                         positions, token_seq, block_tables, bt_stride, block_size, n_heads, n_kv_heads,
                         head_dim, scale, window, cap, out, splits, part, counters, out16, kps, kmin, fresh);
}

// `attention` with the layer's q/k norm + RoPE + K/V store in the same
// launch (decode steps of a few rows, one per sequence; q, k, v are the
// QKV projection's raw outputs and are left unchanged). Each (row, head,
// split) item forms its query head in shared memory by rope_store_item's
// arithmetic; the items whose keys include the row's own position first
// norm + rope that key and store it and its value into the pool (the items
// of query heads sharing a KV head store identical bytes), then read it
// back like any key. Results are the bits of qk_norm_rope_store followed
// by `attention`, one launch fewer per layer. Dynamic shared memory:
// att_smem_floats(head_dim) + head_dim floats.
extern "C" __global__ void attention_rope(const void* pool, long long layer_off, long long v_off, int kvt,
                                          const u32* positions, const u32* token_seq, const u32* block_tables,
                                          int bt_stride, int block_size, int n_heads, int n_kv_heads,
                                          int head_dim, float scale, int window, float cap, float* out,
                                          int splits, float* part, u32* counters, u16* out16, float* q,
                                          float* k, const float* v, const float* qw, const float* kw, float eps,
                                          const float* inv_freq, int n_pairs, int style, float mscale,
                                          const u32* slots) {
    pdl_entry();
    extern __shared__ float sm[];
    __shared__ float scratch[32];
    int row = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    float* hbuf = sm + att_smem_floats(head_dim);
    int pos = (int)positions[row], kbeg, kend;
    split_keys(pos, window, splits, z, &kbeg, &kend);
    if (kbeg <= pos && pos <= kend) {
        int kvh = h / (n_heads / n_kv_heads);
        rope_store_item(row, n_heads + kvh, ATT_THREADS, hbuf, scratch, q, k, v, n_heads, n_kv_heads, head_dim,
                        qw, kw, eps, inv_freq, n_pairs, style, mscale, positions, (void*)pool, layer_off, v_off,
                        kvt, slots, nullptr, 0, nullptr, false);
        __syncthreads();
    }
    rope_store_item(row, h, ATT_THREADS, hbuf, scratch, q, k, v, n_heads, n_kv_heads, head_dim, qw, kw, eps,
                    inv_freq, n_pairs, style, mscale, positions, (void*)pool, layer_off, v_off, kvt, slots,
                    nullptr, 0, nullptr, false);
    for (int d = threadIdx.x; d < head_dim; d += ATT_THREADS) sm[d] = hbuf[d] * scale;
    attention_item(row, h, z, threadIdx.x, 1, sm, nullptr, pool, layer_off, v_off, kvt, positions, token_seq,
                   block_tables, bt_stride, block_size, n_heads, n_kv_heads, head_dim, scale, window, cap, out,
                   splits, part, counters, out16);
}

// Grouped-query decode attention: one (row, KV head, split z) item serves
// the G = n_heads / n_kv_heads query heads that share the KV head, so each
// K/V element is loaded once per item instead of once per query head (the
// per-head kernel above reads a row's KV G times; at 64 sequences of 256
// tokens that was ~4x the bytes and 28% of a decode step). Per query head
// the arithmetic is exactly attention_impl's: keys visit warps in the same
// order, the same online softmax, the same warp and split merges, so the
// results are identical bit for bit whenever the split count is (the decode
// megakernel keeps the per-head item and is compared against this path).
// U keys per warp and round have their loads issued together.
// Shared memory: att_gqa_smem_floats(G, head_dim) floats.
// Main-loop shapes of attention_gqa_impl: a key per warp and round (lanes
// split the dims; decode), a key per lane (32-key tiles; prefill). A key per
// 4 lanes with 8-key rounds was tried for decode and measured slower (H200,
// 64 sequences: 39,824 vs 49,164 tok/s).
#define ATT_KEYWARP 0
#define ATT_TILE 1

__host__ __device__ constexpr int att_gqa_smem_floats(int g, int head_dim) {
    return 5 * g * head_dim + 41 * g + 1;
}

// The split merge of the grouped kernels, run by all `nthr` threads of an
// item once its partials (max, sum, unnormalised values per head) are in
// `part`: the last item of its (row, KV head) to finish (counted in
// `counter`, which it resets to 0 for the next launch or graph replay)
// combines every split's partials into `out` (and `out16` when not null).
// wz holds [G][32] floats, misc G + 1.
template <int G>
__device__ __forceinline__ void att_merge_splits(int tid, int nthr, long long rh0, int splits, int head_dim,
                                                 const float* part, u32* counter, float* wz, float* misc,
                                                 float* out, u16* out16) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    int lane = tid & 31, warp = tid >> 5;
    __threadfence();
    __syncthreads();
    if (tid == 0) misc[G] = __int_as_float(atomicAdd(counter, 1u) == (u32)(splits - 1));
    __syncthreads();
    if (!__float_as_int(misc[G])) return;
    __threadfence();
    for (int g = warp; g < G; g += nthr / 32) {
        const float* p = part + (rh0 + g) * splits * (head_dim + 2);
        int zz = lane;
        float lz = zz < splits ? __ldcg(p + zz * (head_dim + 2) + 1) : 0.0f;
        bool ok = lz > 0.0f;
        float mz = ok ? __ldcg(p + zz * (head_dim + 2)) : NEG_INF;
        float mx = warp_max(mz);
        float w = ok ? expf(mz - mx) : 0.0f;
        float lsum = warp_sum(lz * w);
        wz[g * 32 + zz] = w;
        if (zz == 0) misc[g] = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    }
    __syncthreads();
    #pragma unroll
    for (int g = 0; g < G; g++) {
        const float* p = part + (rh0 + g) * splits * (head_dim + 2);
        float* orow = out + (rh0 + g) * head_dim;
        for (int d = tid; d < head_dim; d += nthr) {
            // Eight splits' loads issued before the first is used (a plain
            // loop over a run-time count left one L2 round trip per split);
            // the sum keeps the order zz = 0, 1, ... (weights past `splits`
            // are 0 and their values are not read).
            float v = 0.0f;
            for (int z0 = 0; z0 < splits; z0 += 8) {
                float x[8];
                #pragma unroll
                for (int u = 0; u < 8; u++) x[u] = z0 + u < splits ? __ldcg(p + (z0 + u) * (head_dim + 2) + 2 + d) : 0.0f;
                #pragma unroll
                for (int u = 0; u < 8; u++)
                    if (z0 + u < splits) v += wz[g * 32 + z0 + u] * x[u];
            }
            orow[d] = v * misc[g];
            if (out16) out16[(rh0 + g) * head_dim + d] = f2h(orow[d]);
        }
    }
    if (tid == 0) *counter = 0u;
}

template <int KVT, int G, int U, int MODE>
__device__ __forceinline__ void attention_gqa_impl(int row, int kvh, int z, float* sm, const float* q,
                                                   const void* pool, long long layer_off, long long v_off,
                                                   const u32* positions, const u32* token_seq,
                                                   const u32* block_tables, int bt_stride, int block_size,
                                                   int n_heads, int n_kv_heads, int head_dim, float scale,
                                                   int window, float cap, float* out, int splits, float* part,
                                                   u32* counters, u16* out16) {
    const float NEG_INF = -__int_as_float(0x7f800000);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int kv_dim = n_kv_heads * head_dim;
    int h0 = kvh * G;
    float* qs = sm;                              // [G][head_dim]
    float* accs = qs + G * head_dim;             // [warp][G][head_dim]
    float* ms = accs + ATT_WARPS * G * head_dim; // [warp][G]
    float* ls = ms + ATT_WARPS * G;              // [warp][G]
    float* wz = ls + ATT_WARPS * G;              // [G][32]
    float* misc = wz + 32 * G;                   // [G] 1 / total weight, [G] this item merges
    const float* qr = q + ((long long)row * n_heads + h0) * head_dim;
    for (int d = tid; d < G * head_dim; d += ATT_THREADS) qs[d] = __ldcg(qr + d) * scale;
    __syncthreads();
    int pos = (int)positions[row];
    const u32* table = block_tables + (long long)token_seq[row] * bt_stride;
    int kbeg, kend;
    split_keys(pos, window, splits, z, &kbeg, &kend);

    float m[G], l[G], acc[G][8], qv[G][8];
    #pragma unroll
    for (int g = 0; g < G; g++) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            int d = lane * 8 + j;
            acc[g][j] = 0.0f;
            qv[g][j] = d < head_dim ? qs[g * head_dim + d] : 0.0f;
        }
    }
    bool lane_live = lane * 8 < head_dim;
    if (MODE == ATT_TILE) {
        // Tiles of 32 keys per warp, a key per lane: each lane streams its
        // key's K row against q (shared memory, read as broadcasts), so the
        // scores of 32 keys need no shuffle; the tile's softmax update is one
        // warp max and one warp sum per head; then lane j accumulates dims
        // j*8.. of P.V over the tile's keys, their V rows loaded coalesced
        // 8 keys at a time. Many more loads in flight per warp than one key
        // per round with a warp reduction per key and head.
        for (int t0 = kbeg + warp * 32; t0 <= kend; t0 += ATT_WARPS * 32) {
            int key = t0 + lane;
            bool live = key <= kend;
            long long base = live
                ? layer_off + kv_slot(table, block_size, key) * kv_dim + (long long)kvh * head_dim : 0;
            float s[G];
            #pragma unroll
            for (int g = 0; g < G; g++) s[g] = 0.0f;
            #pragma unroll 4
            for (int c = 0; c < head_dim; c += 8) {
                float kf[8];
                if (live) kv_load8<KVT>(pool, base + c, kf);
                else {
                    #pragma unroll
                    for (int j = 0; j < 8; j++) kf[j] = 0.0f;
                }
                #pragma unroll
                for (int g = 0; g < G; g++) {
                    float4 qa = *(const float4*)(qs + g * head_dim + c);
                    float4 qb = *(const float4*)(qs + g * head_dim + c + 4);
                    s[g] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] +
                            qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
                }
            }
            float p[G];
            #pragma unroll
            for (int g = 0; g < G; g++) {
                float sc = s[g];
                if (cap > 0.0f) sc = cap * tanhf(sc / cap);
                sc = live ? sc : NEG_INF;
                float mn = fmaxf(m[g], warp_max(sc)); // finite: key t0 is live
                float corr = expf(m[g] - mn);
                p[g] = live ? expf(sc - mn) : 0.0f;
                l[g] = l[g] * corr + warp_sum(p[g]);
                #pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] *= corr;
                m[g] = mn;
            }
            int nk = min(32, kend - t0 + 1);
            for (int k8 = 0; k8 < nk; k8 += 8) {
                float vf[8][8];
                #pragma unroll
                for (int u = 0; u < 8; u++) {
                    long long vb = __shfl_sync(0xffffffffu, base, (k8 + u) & 31);
                    if (k8 + u < nk && lane_live) kv_load8<KVT>(pool, vb + v_off + lane * 8, vf[u]);
                    else {
                        #pragma unroll
                        for (int j = 0; j < 8; j++) vf[u][j] = 0.0f;
                    }
                }
                #pragma unroll
                for (int u = 0; u < 8; u++) {
                    #pragma unroll
                    for (int g = 0; g < G; g++) {
                        float pk = __shfl_sync(0xffffffffu, p[g], (k8 + u) & 31);
                        #pragma unroll
                        for (int j = 0; j < 8; j++) acc[g][j] += pk * vf[u][j];
                    }
                }
            }
        }
    } else
    for (int k0 = kbeg + warp; k0 <= kend; k0 += ATT_WARPS * U) {
        float kk[U][8], vv[U][8];
        #pragma unroll
        for (int u = 0; u < U; u++) {
            int key = k0 + u * ATT_WARPS;
            if (key <= kend && lane_live) {
                long long base = layer_off + kv_slot(table, block_size, key) * kv_dim + (long long)kvh * head_dim;
                kv_load8<KVT>(pool, base + lane * 8, kk[u]);
                kv_load8<KVT>(pool, base + v_off + lane * 8, vv[u]);
            } else {
                #pragma unroll
                for (int j = 0; j < 8; j++) { kk[u][j] = 0.0f; vv[u][j] = 0.0f; }
            }
        }
        #pragma unroll
        for (int u = 0; u < U; u++) {
            if (k0 + u * ATT_WARPS > kend) break; // uniform across the warp
            #pragma unroll
            for (int g = 0; g < G; g++) {
                float s = 0.0f;
                #pragma unroll
                for (int j = 0; j < 8; j++) s += qv[g][j] * kk[u][j];
                s = warp_sum(s);
                if (cap > 0.0f) s = cap * tanhf(s / cap);
                float mn = fmaxf(m[g], s);
                float corr = expf(m[g] - mn);
                float p = expf(s - mn);
                l[g] = l[g] * corr + p;
                #pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] = acc[g][j] * corr + p * vv[u][j];
                m[g] = mn;
            }
        }
    }
    #pragma unroll
    for (int g = 0; g < G; g++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            int d = lane * 8 + j;
            if (d < head_dim) accs[(warp * G + g) * head_dim + d] = acc[g][j];
        }
        if (lane == 0) { ms[warp * G + g] = m[g]; ls[warp * G + g] = l[g]; }
    }
    __syncthreads();
    // The warps' merge per head (every thread computes it, as attention_impl does).
    float mt[G], lt[G];
    #pragma unroll
    for (int g = 0; g < G; g++) {
        mt[g] = NEG_INF;
        for (int w = 0; w < ATT_WARPS; w++) mt[g] = fmaxf(mt[g], ms[w * G + g]);
        lt[g] = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++)
            if (ls[w * G + g] > 0.0f) lt[g] += ls[w * G + g] * expf(ms[w * G + g] - mt[g]);
    }
    long long rh0 = (long long)row * n_heads + h0;
    if (splits == 1) {
        #pragma unroll
        for (int g = 0; g < G; g++) {
            float* orow = out + (rh0 + g) * head_dim;
            for (int d = tid; d < head_dim; d += ATT_THREADS) {
                float v = 0.0f;
                for (int w = 0; w < ATT_WARPS; w++)
                    if (ls[w * G + g] > 0.0f) v += accs[(w * G + g) * head_dim + d] * expf(ms[w * G + g] - mt[g]);
                orow[d] = lt[g] > 0.0f ? v / lt[g] : 0.0f;
                if (out16) out16[(rh0 + g) * head_dim + d] = f2h(orow[d]);
            }
        }
        return;
    }
    #pragma unroll
    for (int g = 0; g < G; g++) {
        float* prow = part + ((rh0 + g) * splits + z) * (head_dim + 2);
        if (tid == 0) { prow[0] = mt[g]; prow[1] = lt[g]; }
        for (int d = tid; d < head_dim; d += ATT_THREADS) {
            float v = 0.0f;
            for (int w = 0; w < ATT_WARPS; w++)
                if (ls[w * G + g] > 0.0f) v += accs[(w * G + g) * head_dim + d] * expf(ms[w * G + g] - mt[g]);
            prow[2 + d] = v;
        }
    }
    att_merge_splits<G>(tid, ATT_THREADS, rh0, splits, head_dim, part,
                        counters + (long long)row * n_kv_heads + kvh, wz, misc, out, out16);
}

// grid = (rows, n_kv_heads, splits), block = ATT_THREADS, dynamic shared
// memory att_gqa_smem_floats(G, head_dim) floats; head_dim % 8 == 0,
// head_dim <= 256, splits <= 32, counters hold rows * n_kv_heads entries.
#define ATT_GQA_ENTRY(NAME, G, U, MODE)                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) NAME(                                  \
        const float* q, const void* pool, long long layer_off, long long v_off, int kvt,             \
        const u32* positions, const u32* token_seq, const u32* block_tables, int bt_stride,          \
        int block_size, int n_heads, int n_kv_heads, int head_dim, float scale, int window,          \
        float cap, float* out, int splits, float* part, u32* counters, u16* out16) {                \
        pdl_entry();                                                                                 \
        extern __shared__ float sm[];                                                                \
        if (kvt == KV_F32)                                                                           \
            attention_gqa_impl<KV_F32, G, U, MODE>(GQA_ARGS);                                              \
        else if (kvt == KV_F16)                                                                      \
            attention_gqa_impl<KV_F16, G, U, MODE>(GQA_ARGS);                                              \
        else                                                                                         \
            attention_gqa_impl<KV_BF16, G, U, MODE>(GQA_ARGS);                                             \
    }
#define GQA_ARGS blockIdx.x, blockIdx.y, blockIdx.z, sm, q, pool, layer_off, v_off, positions, token_seq, \
                 block_tables, bt_stride, block_size, n_heads, n_kv_heads, head_dim, scale, window, cap, out, \
                 splits, part, counters, out16
ATT_GQA_ENTRY(attention_gqa1, 1, 4, ATT_KEYWARP)
ATT_GQA_ENTRY(attention_gqa2, 2, 4, ATT_KEYWARP)
ATT_GQA_ENTRY(attention_gqa4, 4, 4, ATT_KEYWARP)
ATT_GQA_ENTRY(attention_gqa8, 8, 2, ATT_KEYWARP)
ATT_GQA_ENTRY(attention_tile1, 1, 1, ATT_TILE)
ATT_GQA_ENTRY(attention_tile2, 2, 1, ATT_TILE)
ATT_GQA_ENTRY(attention_tile4, 4, 1, ATT_TILE)
ATT_GQA_ENTRY(attention_tile8, 8, 1, ATT_TILE)
#undef GQA_ARGS

// Reference: one thread per (row, head, dim); three plain passes (max, sum,
// weighted values), every score recomputed. No shared memory, no shuffles.
extern "C" __global__ void attention_ref(const float* q, const void* pool, long long layer_off,
                                         long long v_off, int kvt, const u32* positions,
                                         const u32* token_seq, const u32* block_tables, int bt_stride,
                                         int block_size, int rows, int n_heads, int n_kv_heads,
                                         int head_dim, float scale, int window, float cap, float* out) { pdl_entry();
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n_heads * head_dim) return;
    int d = (int)(i % head_dim);
    long long rh = i / head_dim;
    int h = (int)(rh % n_heads), row = (int)(rh / n_heads);
    int kvh = h / (n_heads / n_kv_heads);
    int kv_dim = n_kv_heads * head_dim;
    const float* qr = q + rh * head_dim;
    int pos = (int)positions[row];
    const u32* table = block_tables + (long long)token_seq[row] * bt_stride;
    int start = window > 0 ? max(0, pos - window + 1) : 0;
    float mx = -__int_as_float(0x7f800000);
    for (int pass = 0; pass < 3; pass++) {
        float sum = 0.0f, acc = 0.0f;
        for (int k = start; k <= pos; k++) {
            long long base = layer_off + kv_slot(table, block_size, k) * kv_dim + (long long)kvh * head_dim;
            float s = 0.0f;
            for (int e = 0; e < head_dim; e++) s += qr[e] * kv_load(pool, base + e, kvt);
            s *= scale;
            if (cap > 0.0f) s = cap * tanhf(s / cap);
            if (pass == 0) mx = fmaxf(mx, s);
            else {
                float p = expf(s - mx);
                sum += p;
                acc += p * kv_load(pool, base + v_off + d, kvt);
            }
        }
        if (pass == 2) out[i] = acc / sum;
        if (pass == 1 && sum == 0.0f) { out[i] = 0.0f; return; }
    }
}

// Decode attention with K/V tiles in shared memory: one (row, KV head,
// split z) item per DEC_THREADS-thread block serves the G query heads that
// share the KV head (K/V read once). Per tile of dec_tile(G) keys:
//   1. every thread issues its 16-byte cp.async copies of the tile's K and
//      V rows at once (one memory latency per tile, instead of one per
//      round of 4 keys per warp as in the key-per-warp kernels, where the
//      rounds of an item ran one after another: 23.7 us per layer at 64
//      sequences on an H200, with ~70 keys per item);
//   2. warp w scores keys w*32/G .. (32/G per warp, all G heads: 32 dot
//      products), lanes splitting the dims, and one reduce-scatter of the
//      32 partial sums (31 shuffles instead of 5 per dot product) leaves
//      dot product `lane` on lane `lane`;
//   3. warp g < G updates head g's running max and sum over the tile and
//      turns its scores into weights;
//   4. thread d accumulates dim d of every head's P.V from the V tile.
// Splits merge as in the grouped kernel (partials, the last block merges).
// 16-bit KV only (an f32 tile would need twice the shared memory).
//
// What the first tile waits for: the item's block-table entries and the
// first tile's keys other than the row's own position were stored before
// this step, so their copies are issued before the PDL wait and overlap the
// previous kernel; only the own key (stored by the q/k norm kernel just
// before) is copied after it. The G query heads (contiguous in q) come in
// once per item, one 16-byte load per thread, into shared memory. ncu of
// the first version (H100, 64 sequences, one decode layer, 30 us): 37% of
// the warp samples sat on q, which every warp read for itself with 32
// scalar loads per lane (64 times the bytes, through the L2), 16% on the
// first tile's copies, and 18% on a reduce-scatter the compiler had put in
// local memory (a 128-byte stack frame); it is unrolled by template now.
#define DEC_WARPS 8
#define DEC_THREADS (32 * DEC_WARPS)

__host__ __device__ constexpr int dec_tile(int g) { return DEC_WARPS * (32 / g); }

// Shared memory of one item in bytes (host: attention_dec_smem in mod.rs):
// K and V tiles, the G query heads, scores, per-head state, table entries.
__host__ __device__ constexpr int dec_smem_bytes(int g, int head_dim) {
    return dec_tile(g) * head_dim * 2 * 2 + g * head_dim * 4 + (dec_tile(g) * g + 36 * g + 1) * 4 + ATT_TBL * 4;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// One step of the 32-value reduce-scatter (offset O): a lane keeps the half
// of v[0 .. 2O) whose index bit O matches its lane bit and adds the other
// lane's copy of it. A template so that every index is a constant and v
// stays in registers.
template <int O>
__device__ __forceinline__ void reduce_scatter_step(float* v, int lane) {
    bool upper = lane & O;
    #pragma unroll
    for (int i = 0; i < O; i++) {
        float send = upper ? v[i] : v[i + O];
        float keep = upper ? v[i + O] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
}

// cp.async copies of keys t0 .. t0 + nk - 1 (K and V rows) into the tiles,
// all but those from key `skip` on (ATT_NO_SKIP: none).
template <int G>
__device__ __forceinline__ void dec_issue_tile(u16* Ks, u16* Vs, const u32* tbl, const u32* table, const void* pool,
                                               long long layer_off, long long v_off, int block_size, int b0,
                                               int kv_dim, int kvh, int head_dim, int t0, int nk, int skip) {
    int cpr = head_dim / 8; // 16-byte chunks per K or V row
    for (int c = threadIdx.x; c < nk * cpr; c += DEC_THREADS) {
        int kk = c / cpr, col = c - kk * cpr;
        if (t0 + kk >= skip) continue;
        long long base = layer_off + att_slot(tbl, table, block_size, b0, t0 + kk) * kv_dim +
                         (long long)kvh * head_dim + col * 8;
        cp_async16(Ks + kk * head_dim + col * 8, (const u16*)pool + base);
        cp_async16(Vs + kk * head_dim + col * 8, (const u16*)pool + base + v_off);
    }
}

template <int KVT, int G>
__device__ __forceinline__ void attention_dec_impl(int row, int kvh, int z, unsigned char* smraw, const float* q,
                                                   const void* pool, long long layer_off, long long v_off,
                                                   const u32* positions, const u32* token_seq,
                                                   const u32* block_tables, int bt_stride, int block_size,
                                                   int n_heads, int n_kv_heads, int head_dim, float scale,
                                                   int window, float cap, float* out, int splits, float* part,
                                                   u32* counters, u16* out16, const u32* fresh) {
    constexpr int T = dec_tile(G);
    constexpr int KPW = 32 / G; // keys per warp in the score stage
    const float NEG_INF = -__int_as_float(0x7f800000);
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int kv_dim = n_kv_heads * head_dim;
    int h0 = kvh * G;
    u16* Ks = (u16*)smraw;                  // [T][head_dim]
    u16* Vs = Ks + T * head_dim;            // [T][head_dim]
    float* Qs = (float*)(Vs + T * head_dim); // [G][head_dim] query heads, scaled
    float* P = Qs + G * head_dim;           // [T][G] scores, then weights
    float* cr = P + T * G;                  // [G] the tile's rescale factor
    float* ms = cr + G;                     // [G] final running max
    float* ls = ms + G;                     // [G] final running sum
    float* wz = ls + G;                     // [G][32] split merge weights
    float* misc = wz + 32 * G;              // [G] 1 / total weight, [1] this item merges
    u32* tbl = (u32*)(misc + G + 1);        // [ATT_TBL] block-table entries

    int pos = (int)positions[row];
    const u32* table = block_tables + (long long)token_seq[row] * bt_stride;
    int kbeg, kend;
    split_keys(pos, window, splits, z, &kbeg, &kend);
    int b0 = kbeg / block_size;
    att_load_table(tbl, table, block_size, kbeg, kend, tid, DEC_THREADS);
    __syncthreads();
    // Positions, block tables and the keys of earlier steps are in memory
    // before the step starts, so these copies run before waiting for the
    // previous kernel (PDL) and overlap its tail; q and this step's keys
    // (the own position, and in a speculative step the same sequence's
    // earlier rows, from fresh[row] on) are its results.
    int first_new = fresh ? (int)fresh[row] : pos;
    int nk0 = kend - kbeg + 1 < T ? kend - kbeg + 1 : T;
    dec_issue_tile<G>(Ks, Vs, tbl, table, pool, layer_off, v_off, block_size, b0, kv_dim, kvh, head_dim, kbeg, nk0,
                      first_new);
    pdl_entry();
    int t_new = max(first_new, kbeg);
    if (t_new < kbeg + nk0)
        dec_issue_tile<G>(Ks + (t_new - kbeg) * head_dim, Vs + (t_new - kbeg) * head_dim, tbl, table, pool,
                          layer_off, v_off, block_size, b0, kv_dim, kvh, head_dim, t_new, kbeg + nk0 - t_new,
                          ATT_NO_SKIP);
    {
        const float4* q4 = (const float4*)(q + ((long long)row * n_heads + h0) * head_dim);
        for (int i = tid; i < G * head_dim / 4; i += DEC_THREADS) {
            float4 x = __ldcg(q4 + i);
            ((float4*)Qs)[i] = make_float4(x.x * scale, x.y * scale, x.z * scale, x.w * scale);
        }
    }
    __syncthreads();
    bool lane_live = lane * 8 < head_dim;
    float qv[G][8];
    #pragma unroll
    for (int g = 0; g < G; g++) {
        #pragma unroll
        for (int j = 0; j < 8; j++) qv[g][j] = lane_live ? Qs[g * head_dim + lane * 8 + j] : 0.0f;
    }
    float m_run = NEG_INF, l_run = 0.0f; // head `warp`'s, in warps < G
    float acc[G];
    #pragma unroll
    for (int g = 0; g < G; g++) acc[g] = 0.0f;

    for (int t0 = kbeg; t0 <= kend; t0 += T) {
        int nk = min(T, kend - t0 + 1);
        if (t0 != kbeg)
            dec_issue_tile<G>(Ks, Vs, tbl, table, pool, layer_off, v_off, block_size, b0, kv_dim, kvh, head_dim, t0,
                              nk, ATT_NO_SKIP);
        cp_async_wait_all();
        __syncthreads();

        // 2. Partial dot products: v[kl * G + g] = q_g . k_(warp*KPW+kl) over this lane's dims.
        float v[32];
        #pragma unroll
        for (int kl = 0; kl < KPW; kl++) {
            int key = warp * KPW + kl;
            float kf[8];
            if (key < nk && lane_live) {
                uint4 r = *(const uint4*)(Ks + key * head_dim + lane * 8);
                u32 w[4] = {r.x, r.y, r.z, r.w};
                #pragma unroll
                for (int j = 0; j < 8; j++) {
                    u16 h = (u16)((w[j >> 1] >> (16 * (j & 1))) & 0xffffu);
                    kf[j] = KVT == KV_F16 ? h2f(h) : bf2f(h);
                }
            } else {
                #pragma unroll
                for (int j = 0; j < 8; j++) kf[j] = 0.0f;
            }
            #pragma unroll
            for (int g = 0; g < G; g++) {
                float s = 0.0f;
                #pragma unroll
                for (int j = 0; j < 8; j++) s += qv[g][j] * kf[j];
                v[kl * G + g] = s;
            }
        }
        // Reduce-scatter: at the end lane L holds the full sum of value L.
        reduce_scatter_step<16>(v, lane);
        reduce_scatter_step<8>(v, lane);
        reduce_scatter_step<4>(v, lane);
        reduce_scatter_step<2>(v, lane);
        reduce_scatter_step<1>(v, lane);
        {
            int key = warp * KPW + lane / G, g = lane % G;
            float sc = v[0];
            if (cap > 0.0f) sc = cap * tanhf(sc / cap);
            P[key * G + g] = key < nk ? sc : NEG_INF;
        }
        __syncthreads();

        // 3. Online softmax of head `warp` over the tile.
        if (warp < G) {
            float tmax = NEG_INF;
            for (int k = lane; k < nk; k += 32) tmax = fmaxf(tmax, P[k * G + warp]);
            tmax = warp_max(tmax); // finite: key t0 is visible
            float mn = fmaxf(m_run, tmax);
            float corr = expf(m_run - mn);
            float psum = 0.0f;
            for (int k = lane; k < nk; k += 32) {
                float p = expf(P[k * G + warp] - mn);
                P[k * G + warp] = p;
                psum += p;
            }
            l_run = l_run * corr + warp_sum(psum);
            m_run = mn;
            if (lane == 0) cr[warp] = corr;
        }
        __syncthreads();

        // 4. P.V: thread d owns dim d of every head.
        if (tid < head_dim) {
            #pragma unroll
            for (int g = 0; g < G; g++) acc[g] *= cr[g];
            const u16* vcol = Vs + tid;
            #pragma unroll 4
            for (int k = 0; k < nk; k++) {
                u16 h = vcol[k * head_dim];
                float vk = KVT == KV_F16 ? h2f(h) : bf2f(h);
                #pragma unroll
                for (int g = 0; g < G; g++) acc[g] += P[k * G + g] * vk;
            }
        }
        __syncthreads(); // the next tile overwrites Ks, Vs and P
    }
    if (warp < G && lane == 0) {
        ms[warp] = m_run;
        ls[warp] = l_run;
    }
    __syncthreads();
    long long rh0 = (long long)row * n_heads + h0;
    if (splits == 1) {
        if (tid < head_dim) {
            #pragma unroll
            for (int g = 0; g < G; g++) {
                float o = ls[g] > 0.0f ? acc[g] / ls[g] : 0.0f;
                out[(rh0 + g) * head_dim + tid] = o;
                if (out16) out16[(rh0 + g) * head_dim + tid] = f2h(o);
            }
        }
        return;
    }
    if (tid < head_dim) {
        #pragma unroll
        for (int g = 0; g < G; g++) {
            float* prow = part + ((rh0 + g) * splits + z) * (head_dim + 2);
            if (tid == 0) { prow[0] = ms[g]; prow[1] = ls[g]; }
            prow[2 + tid] = acc[g];
        }
    }
    att_merge_splits<G>(tid, DEC_THREADS, rh0, splits, head_dim, part,
                        counters + (long long)row * n_kv_heads + kvh, wz, misc, out, out16);
}

// grid = (rows, n_kv_heads, splits), block = DEC_THREADS, dynamic shared
// memory dec_smem_bytes(G, head_dim) (pdl_entry is inside the item, after
// the metadata loads); decode steps only (one query row per
// sequence), 16-bit KV, head_dim % 8 == 0, head_dim <= 256, splits <= 32.
#define ATT_DEC_ENTRY(NAME, G)                                                                       \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 2) NAME(                                \
        const float* q, const void* pool, long long layer_off, long long v_off, int kvt,             \
        const u32* positions, const u32* token_seq, const u32* block_tables, int bt_stride,          \
        int block_size, int n_heads, int n_kv_heads, int head_dim, float scale, int window,          \
        float cap, float* out, int splits, float* part, u32* counters, u16* out16,                  \
        const u32* fresh) {                                                                          \
        extern __shared__ __align__(16) unsigned char dec_sm[];                                      \
        if (kvt == KV_F16)                                                                           \
            attention_dec_impl<KV_F16, G>(DEC_ARGS);                                                 \
        else                                                                                         \
            attention_dec_impl<KV_BF16, G>(DEC_ARGS);                                                \
    }
#define DEC_ARGS blockIdx.x, blockIdx.y, blockIdx.z, dec_sm, q, pool, layer_off, v_off, positions, token_seq, \
                 block_tables, bt_stride, block_size, n_heads, n_kv_heads, head_dim, scale, window, cap, out,  \
                 splits, part, counters, out16, fresh
ATT_DEC_ENTRY(attention_dec4, 4)
ATT_DEC_ENTRY(attention_dec8, 8)
#undef DEC_ARGS
