// Tensor-core product of a tall Q8_0 matrix (the tied embedding used as LM
// head: 262,144 x 640 for Gemma 3) with 5..64 activation rows.
//
// Why by hand: cuBLAS needs the weights in f16, so the LM head of a batched
// decode step read the 335 MB f16 mirror (108 us at 64 rows on an H200);
// this kernel reads the 178 MB of Q8_0 quants and scales and converts them
// in registers, to exactly the values of the mirror: f16(q * d), rounded
// once (the f32 product is exact, so one f16 multiply gives the same bits).
//
// Shape: out[t, row] = W[row, :] . x[t, :] for t < nt <= 8 * NT. Each block
// first converts x (f32) into f16 in shared memory, then every warp takes
// units of 32 weight rows (two m16 tiles) and runs mma.m16n8k16 over the
// whole K for NT n8 tiles of activation rows. Blocks are persistent (about
// two per SM) so x is converted once per block, not once per 128 rows.
//
// K is walked in spans of 64 (two Q8_0 blocks). Within a span, lane
// (g = lane / 4, t = lane % 4) loads 16 bytes of weight rows g and g + 8 at
// k = 16t .. 16t + 15 (one 16-byte load, inside one Q8_0 block) and uses
// them over four k16 steps: step s takes k = 16t + 4s + (0..3) as the
// fragment's logical k = 2t, 2t+1, 2t+8, 2t+9. The dot product does not
// depend on the order of k, so the activations are stored with the same
// permutation: element 16t + 4s + j of a span sits at 16s + 4t + j, where
// step s of the four lanes of a group reads 32 contiguous bytes. Rows of x
// are 2 * cols + 32 bytes apart (cols % 64 == 0), so the four rows of a
// half-warp fall on distinct banks.

#define MMA_WARPS 8
#define MMA_ROWS_PER_WARP 32

// Bytes of dynamic shared memory for NT activation tiles of `cols` columns
// (must match `mma_q8_smem` on the Rust side).
__device__ __forceinline__ int mma_x_stride(int cols) { return cols + 16; } // in halves

// Four signed bytes of `w` as two f16x2 pairs (bytes 0,1 and 2,3), each
// scaled by d2 (f16x2 of the block scale): 1024 + (q + 128) is exact in f16
// (exponent 10, the byte as mantissa), minus 1152 is q, times d rounds once.
__device__ __forceinline__ void q8x4_to_f16x2(u32 w, u32 d2, u32& lo, u32& hi) {
    u32 u = w ^ 0x80808080u;
    u32 a = __byte_perm(u, 0x64646464u, 0x7170); // halves (0x64, b0), (0x64, b1)
    u32 b = __byte_perm(u, 0x64646464u, 0x7372); // halves (0x64, b2), (0x64, b3)
    const u32 bias = 0x64806480u;                // 1152.0 in both halves
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(a) : "r"(bias));
    asm("sub.rn.f16x2 %0, %0, %1;" : "+r"(b) : "r"(bias));
    asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(a) : "r"(d2));
    asm("mul.rn.f16x2 %0, %0, %1;" : "+r"(b) : "r"(d2));
    lo = a;
    hi = b;
}

__device__ __forceinline__ void mma16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One span's weights of a lane: rows g, g+8, 16+g, 24+g of the unit (index
// m), 16 bytes each, and the f16x2 scale of each.
struct Q8Span {
    uint4 raw[4];
    u32 d2[4];
};

// Rows are addressed by 32-bit offsets from the unit's first row (fewer live
// registers than four 64-bit pointers: the 8-tile kernel is at the limit).
__device__ __forceinline__ void q8_span_load(Q8Span& sp, const u8* wb, const u16* sb, const int (&roff)[4], int cols,
                                             int t, int p) {
    int nb = cols >> 5;
    #pragma unroll
    for (int m = 0; m < 4; m++) {
        sp.raw[m] = *(const uint4*)(wb + roff[m] * cols + p * 64 + t * 16);
        u32 d = sb[roff[m] * nb + 2 * p + (t >> 1)];
        sp.d2[m] = d | (d << 16);
    }
}

// Tiled copy of the matrix (`KESTREL_LMHEAD_TILED`, matmul.rs): the quants
// of unit u (32 rows) and span p (64 columns) are one 2 KB tile at
// (u * nsp + p) * 2048, ordered [m][lane][16 bytes] exactly as the lanes
// load them, so each warp load reads 512 contiguous bytes and a unit is read
// front to back, instead of 32 rows x 64 bytes 640 bytes apart per span
// (DRAM pages opened for 64 bytes and opened again by the next span). The
// scales of a tile are 64 f16 at (u * nsp + p) * 64, ordered [g][block][m],
// so a lane's four scales are one 8-byte load. Rows past the end repeat the
// last row (their results are not stored).
__device__ __forceinline__ void q8_span_load_tiled(Q8Span& sp, const u8* tq, const u16* ts, int lane, int p) {
    #pragma unroll
    for (int m = 0; m < 4; m++) sp.raw[m] = *(const uint4*)(tq + (p * 4 + m) * 512 + lane * 16);
    int g = lane >> 2, t = lane & 3;
    uint2 d = *(const uint2*)(ts + p * 64 + (g * 2 + (t >> 1)) * 4);
    sp.d2[0] = (d.x & 0xffffu) * 0x10001u;
    sp.d2[1] = (d.x >> 16) * 0x10001u;
    sp.d2[2] = (d.y & 0xffffu) * 0x10001u;
    sp.d2[3] = (d.y >> 16) * 0x10001u;
}

// Builds the tiled copy from the packed quants q and scales s (grid-stride;
// one thread per 16-byte quant chunk, then per scale).
extern "C" __global__ void q8_tile_pack(const u8* q, const u16* s, int wrows, int cols, u8* tq, u16* ts) {
    int nsp = cols >> 6, nb = cols >> 5;
    long long units = (wrows + MMA_ROWS_PER_WARP - 1) / MMA_ROWS_PER_WARP;
    long long chunks = units * nsp * 128;
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < chunks; c += (long long)gridDim.x * blockDim.x) {
        int lane = (int)(c & 31), m = (int)((c >> 5) & 3);
        long long up = c >> 7;
        int p = (int)(up % nsp);
        long long u = up / nsp;
        long long row = min(u * 32 + (lane >> 2) + 8 * m, (long long)wrows - 1);
        *(uint4*)(tq + c * 16) = *(const uint4*)(q + row * cols + p * 64 + (lane & 3) * 16);
    }
    long long scales = units * nsp * 64;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < scales; i += (long long)gridDim.x * blockDim.x) {
        int m = (int)(i & 3), gb = (int)((i >> 2) & 15);
        long long up = i >> 6;
        int p = (int)(up % nsp);
        long long u = up / nsp;
        long long row = min(u * 32 + (gb >> 1) + 8 * m, (long long)wrows - 1);
        ts[i] = s[row * nb + 2 * p + (gb & 1)];
    }
}

// A lane's share of its warp's running argmax (argmax mode): lane (g, t)
// keeps, for activation rows n = 8g + 2t + j (j = 0, 1; tile q = g, so
// only lanes g < NT hold any), the best value over the weight rows seen so
// far and the first row holding it. Two pairs per lane rather than NT: the
// 8-tile kernel has no registers for 16 (ptxas: ~500 bytes of spills).
struct Q8Best {
    float v[2];
    int i[2];
};

// Better of (v, i) and (ov, oi): the larger value, the first row on ties;
// NaN never wins (as in argmax_rows).
__device__ __forceinline__ void q8_best_merge(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
}

template <int NT, bool TL>
__device__ __forceinline__ void mma_q8_unit(const u8* p0, const u16* p2, int wrows, int cols, const u16* xs,
                                            int nt, float* out, long long row0, Q8Best* best) {
    int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int stride = mma_x_stride(cols), nsp = cols >> 6;
    // The tiled copy puts unit u at the same offsets (u * nsp tiles of 2 KB
    // and of 64 scales), a permutation within each unit.
    const u8* wb = p0 + row0 * cols;
    const u16* sb = p2 + row0 * (cols >> 5);
    int last = (int)min((long long)MMA_ROWS_PER_WARP, wrows - row0) - 1;
    int roff[4];
    #pragma unroll
    for (int m = 0; m < 4; m++) roff[m] = min(g + 8 * m, last); // past the end: not stored
    float acc[2][NT][4];
    #pragma unroll
    for (int mt = 0; mt < 2; mt++)
        #pragma unroll
        for (int q = 0; q < NT; q++)
            #pragma unroll
            for (int i = 0; i < 4; i++) acc[mt][q][i] = 0.0f;
    // With up to 4 tiles the next span's loads are issued before this
    // span's products (double buffer); 8 tiles have no registers left for
    // it (ptxas: 120 bytes of spills) and rely on the other warps instead.
    const bool ahead = NT <= 4;
    Q8Span cur, nxt;
    auto load = [&](Q8Span& sp, int p) {
        if (TL) q8_span_load_tiled(sp, wb, sb, lane, p);
        else q8_span_load(sp, wb, sb, roff, cols, t, p);
    };
    load(cur, 0);
    for (int p = 0; p < nsp; p++) {
        if (ahead && p + 1 < nsp) load(nxt, p + 1);
        #pragma unroll
        for (int s = 0; s < 4; s++) {
            // A fragments of both m16 tiles: rows (g, g+8) and (16+g, 24+g).
            u32 a[2][4];
            #pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                u32 w0 = s == 0 ? cur.raw[2 * mt].x : s == 1 ? cur.raw[2 * mt].y : s == 2 ? cur.raw[2 * mt].z : cur.raw[2 * mt].w;
                u32 w1 = s == 0 ? cur.raw[2 * mt + 1].x : s == 1 ? cur.raw[2 * mt + 1].y : s == 2 ? cur.raw[2 * mt + 1].z : cur.raw[2 * mt + 1].w;
                q8x4_to_f16x2(w0, cur.d2[2 * mt], a[mt][0], a[mt][2]);
                q8x4_to_f16x2(w1, cur.d2[2 * mt + 1], a[mt][1], a[mt][3]);
            }
            const u16* xb = xs + p * 64 + s * 16 + t * 4;
            #pragma unroll
            for (int q = 0; q < NT; q++) {
                uint2 b = *(const uint2*)(xb + (q * 8 + g) * stride);
                mma16816(acc[0][q], a[0][0], a[0][1], a[0][2], a[0][3], b.x, b.y);
                mma16816(acc[1][q], a[1][0], a[1][1], a[1][2], a[1][3], b.x, b.y);
            }
        }
        if (p + 1 < nsp) {
            if (ahead) cur = nxt;
            else load(cur, p + 1);
        }
    }
    if (!best) {
        #pragma unroll
        for (int mt = 0; mt < 2; mt++)
            #pragma unroll
            for (int q = 0; q < NT; q++)
                #pragma unroll
                for (int i = 0; i < 4; i++) {
                    long long row = row0 + 16 * mt + g + (i >= 2 ? 8 : 0);
                    int n = q * 8 + 2 * t + (i & 1);
                    if (n < nt && row < wrows) out[(long long)n * wrows + row] = acc[mt][q][i];
                }
        return;
    }
    // Argmax: per (q, j) the lane's best of its four rows (visited in
    // increasing order, so `>` keeps the first), then the best over the
    // eight lanes of this t, merged into lane g = q's running pair.
    #pragma unroll
    for (int q = 0; q < NT; q++) {
        #pragma unroll
        for (int j = 0; j < 2; j++) {
            float v = -__int_as_float(0x7f800000);
            int vi = 0x7fffffff;
            if (q * 8 + 2 * t + j < nt) {
                #pragma unroll
                for (int mt = 0; mt < 2; mt++)
                    #pragma unroll
                    for (int hi = 0; hi < 2; hi++) {
                        long long row = row0 + 16 * mt + g + 8 * hi;
                        float a = acc[mt][q][2 * hi + j];
                        if (row < wrows && a > v) { v = a; vi = (int)row; }
                    }
            }
            #pragma unroll
            for (int o = 4; o < 32; o <<= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, v, o);
                int oi = __shfl_xor_sync(0xffffffffu, vi, o);
                q8_best_merge(v, vi, ov, oi);
            }
            if (g == q) q8_best_merge(best->v[j], best->i[j], v, vi);
        }
    }
}

// The block's argmax per activation row into keys (atomicMax of the key of
// argmax_rows: ordered value bits, then the complemented row, so the first
// row wins ties). `red` holds MMA_WARPS * 8 * NT floats and as many ints.
template <int NT>
__device__ __forceinline__ void mma_q8_argmax_store(const Q8Best& b, int nt, u64* keys, float* rv, int* ri) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if (g < NT) {
        #pragma unroll
        for (int j = 0; j < 2; j++) {
            int n = g * 8 + 2 * t + j;
            rv[warp * 8 * NT + n] = b.v[j];
            ri[warp * 8 * NT + n] = b.i[j];
        }
    }
    __syncthreads();
    for (int n = threadIdx.x; n < nt; n += blockDim.x) {
        float v = -__int_as_float(0x7f800000);
        int i = 0x7fffffff;
        for (int w = 0; w < MMA_WARPS; w++) q8_best_merge(v, i, rv[w * 8 * NT + n], ri[w * 8 * NT + n]);
        if (i != 0x7fffffff)
            atomicMax(keys + n, ((u64)ordered_bits(v) << 32) | (u64)(0xffffffffu - (u32)i));
    }
}

template <int NT, bool TL>
__device__ __forceinline__ void mma_q8_body(const u8* p0, const u16* p2, int wrows, int cols, const float* x, int nt,
                                            float* out, u64* keys) {
    extern __shared__ __align__(16) u16 xs[];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long long units = (wrows + MMA_ROWS_PER_WARP - 1) / MMA_ROWS_PER_WARP;
    long long first = (long long)blockIdx.x * MMA_WARPS + warp;
    // The first unit's weights do not depend on the previous kernel.
    if (first < units) {
        long long row0 = first * MMA_ROWS_PER_WARP;
        int rows = (int)min((long long)MMA_ROWS_PER_WARP, wrows - row0);
        long long bytes = TL ? (long long)MMA_ROWS_PER_WARP * cols : (long long)rows * cols;
        for (long long off = (long long)lane * 128; off < bytes; off += 32 * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(p0 + row0 * cols + off));
    }
    pdl_entry();
    // x -> f16 in the permuted layout; rows nt .. 8 NT are zero. Eight
    // loads are issued before their stores, so the fill costs a few L2
    // round trips rather than one per element group.
    int stride = mma_x_stride(cols), q4 = cols >> 2, items = 8 * NT * q4;
    for (int i0 = threadIdx.x; i0 < items; i0 += 8 * blockDim.x) {
        float4 v[8];
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            int i = i0 + j * blockDim.x, n = i / q4;
            v[j] = i < items && n < nt ? *(const float4*)(x + (long long)i * 4) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        #pragma unroll
        for (int j = 0; j < 8; j++) {
            int i = i0 + j * blockDim.x;
            if (i >= items) break;
            int n = i / q4, k4 = i - n * q4;
            int span = k4 >> 4, r4 = k4 & 15; // r4 = 4t + s within the span
            int dst = span * 64 + ((r4 & 3) * 4 + (r4 >> 2)) * 4;
            uint2 h;
            h.x = (u32)f2h(v[j].x) | ((u32)f2h(v[j].y) << 16);
            h.y = (u32)f2h(v[j].z) | ((u32)f2h(v[j].w) << 16);
            *(uint2*)(xs + n * stride + dst) = h;
        }
    }
    __syncthreads();
    if (!keys) {
        for (long long u = first; u < units; u += (long long)gridDim.x * MMA_WARPS)
            mma_q8_unit<NT, TL>(p0, p2, wrows, cols, xs, nt, out, u * MMA_ROWS_PER_WARP, nullptr);
        return;
    }
    Q8Best best;
    #pragma unroll
    for (int j = 0; j < 2; j++) { best.v[j] = -__int_as_float(0x7f800000); best.i[j] = 0x7fffffff; }
    for (long long u = first; u < units; u += (long long)gridDim.x * MMA_WARPS)
        mma_q8_unit<NT, TL>(p0, p2, wrows, cols, xs, nt, out, u * MMA_ROWS_PER_WARP, &best);
    // The reduction reuses the activations' shared memory (every warp is
    // past its last read of them after this barrier).
    __syncthreads();
    float* rv = (float*)xs;
    mma_q8_argmax_store<NT>(best, nt, keys, rv, (int*)(rv + MMA_WARPS * 8 * NT));
}

#define MMA_Q8_ENTRY(NT, SUF, TL)                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2) mma_q8_0##SUF##_##NT(                     \
        const u8* p0, const u16* p2, int wrows, int cols, const float* x, int nt, float* out) {    \
        mma_q8_body<NT, TL>(p0, p2, wrows, cols, x, nt, out, nullptr);                             \
    }                                                                                              \
    /* Argmax mode: no logits; each row's argmax key into keys (zeroed before). */                 \
    extern "C" __global__ void __launch_bounds__(256, 2) mma_q8_0##SUF##_argmax_##NT(              \
        const u8* p0, const u16* p2, int wrows, int cols, const float* x, int nt, u64* keys) {     \
        mma_q8_body<NT, TL>(p0, p2, wrows, cols, x, nt, nullptr, keys);                            \
    }

// Plain (mma_q8_0_*) and tiled (mma_q8_0t_*: p0, p2 the tiled copy) weights.
MMA_Q8_ENTRY(1, , false)
MMA_Q8_ENTRY(2, , false)
MMA_Q8_ENTRY(4, , false)
MMA_Q8_ENTRY(8, , false)
MMA_Q8_ENTRY(1, t, true)
MMA_Q8_ENTRY(2, t, true)
MMA_Q8_ENTRY(4, t, true)
MMA_Q8_ENTRY(8, t, true)
