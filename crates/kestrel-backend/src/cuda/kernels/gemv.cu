// Dequant-fused matrix-vector products for decode (1..8 activation rows).
// One warp per output row, 8 rows per 256-thread block; every lane loads
// 16 bytes of weights at a time (layouts in dequant.cu keep blocks 16-byte
// aligned) and reuses them for all T activation rows, which are read as
// float4 from global memory (they are small and stay in L1/L2).
//
// Template T is the activation row capacity (1, 2, 4, 8); nt <= T rows are
// live. out[t, row] = W[row, :] . x[t, :].

#define GEMV_WARPS 8

// Byte k (0..11, run-time) of the three scale words, selected without an
// indexed array (which would live in local memory).
__device__ __forceinline__ u32 scale_byte(int k, u32 w0, u32 w1, u32 w2) {
    u32 w = k < 4 ? w0 : (k < 8 ? w1 : w2);
    return (w >> (8 * (k & 3))) & 0xffu;
}

// scale_min_k4 (dequant.cu) on the 12 scale bytes held in three registers.
__device__ __forceinline__ void scale_min_k4_regs(int j, u32 w0, u32 w1, u32 w2, int* sc, int* m) {
    if (j < 4) {
        *sc = (int)(scale_byte(j, w0, w1, w2) & 63u);
        *m = (int)(scale_byte(j + 4, w0, w1, w2) & 63u);
    } else {
        u32 a = scale_byte(j + 4, w0, w1, w2);
        *sc = (int)((a & 0x0Fu) | ((scale_byte(j - 4, w0, w1, w2) >> 6) << 4));
        *m = (int)((a >> 4) | ((scale_byte(j, w0, w1, w2) >> 6) << 4));
    }
}

__device__ __forceinline__ float dot4(float4 a, float w0, float w1, float w2, float w3) {
    return a.x * w0 + a.y * w1 + a.z * w2 + a.w * w3;
}

// Signed byte k of a 32-bit word.
__device__ __forceinline__ float sbyte(u32 v, int k) {
    return (float)(((int)(v << (24 - 8 * k))) >> 24);
}

template <int T>
__device__ __forceinline__ void gemv_finish(float (&acc)[T], int nt, int row, int wrows, float* out) {
    #pragma unroll
    for (int t = 0; t < T; t++) {
        float v = warp_sum(acc[t]);
        if ((threadIdx.x & 31) == 0 && t < nt) out[(long long)t * wrows + row] = v;
    }
}

// 16 consecutive elements of x row t starting at c (c % 4 == 0) against w[16].
template <int T>
__device__ __forceinline__ void fma16(float (&acc)[T], const float* x, int cols, int nt, int c,
                                      const float* w, float scale) {
    #pragma unroll
    for (int t = 0; t < T; t++) {
        if (t < nt) {
            long long o = (long long)t * cols + c;
            const float4* xp = (const float4*)(x + o);
            float4 a = xp[0], b = xp[1], e = xp[2], f = xp[3];
            float s = dot4(a, w[0], w[1], w[2], w[3]) + dot4(b, w[4], w[5], w[6], w[7]) +
                      dot4(e, w[8], w[9], w[10], w[11]) + dot4(f, w[12], w[13], w[14], w[15]);
            acc[t] += scale * s;
        }
    }
}

// Q8_0 with NR rows per warp (NR = 4 for tall matrices such as the tied
// embedding / LM head, most of the bytes of a decode step; 1 otherwise so
// small matrices still spread over every SM). Each lane issues the weight
// loads of two chunk rounds for all NR rows before using any, and each
// activation chunk is loaded once for the NR rows.
template <int T, int NR>
__device__ void gemv_q8_0(int bid, const u8* p0, const u16* p2, int wrows, int cols, const float* x, int nt, float* out) {
    int row0 = (bid * GEMV_WARPS + (threadIdx.x >> 5)) * NR, lane = threadIdx.x & 31;
    if (row0 >= wrows) return;
    float acc[NR][T];
    #pragma unroll
    for (int r = 0; r < NR; r++)
        #pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;
    int nch = cols / 16, nb = cols / 32;
    bool stream = NR == 4 && (kestrel_l2_hints & 1);
    for (int c0 = lane; c0 < nch; c0 += 64) {
        uint4 raw[2][NR];
        float dd[2][NR];
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            int ch = c0 + 32 * h;
            if (ch < nch) {
                #pragma unroll
                for (int r = 0; r < NR; r++) {
                    long long row = min(row0 + r, wrows - 1); // duplicates past the end are discarded
                    if (stream) {
                        raw[h][r] = ld_stream16(p0 + row * cols + ch * 16);
                        dd[h][r] = h2f(ld_stream2(p2 + row * nb + (ch >> 1)));
                    } else {
                        raw[h][r] = *(const uint4*)(p0 + row * cols + ch * 16);
                        dd[h][r] = h2f(p2[row * nb + (ch >> 1)]);
                    }
                }
            }
        }
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            int ch = c0 + 32 * h;
            if (ch < nch) {
                #pragma unroll
                for (int t = 0; t < T; t++) {
                    if (t < nt) {
                        const float4* xp = (const float4*)(x + (long long)t * cols + ch * 16);
                        float4 xv[4] = {xp[0], xp[1], xp[2], xp[3]};
                        #pragma unroll
                        for (int r = 0; r < NR; r++) {
                            u32 w4[4] = {raw[h][r].x, raw[h][r].y, raw[h][r].z, raw[h][r].w};
                            float sdot = 0.0f;
                            #pragma unroll
                            for (int v = 0; v < 4; v++)
                                sdot += dot4(xv[v], sbyte(w4[v], 0), sbyte(w4[v], 1), sbyte(w4[v], 2), sbyte(w4[v], 3));
                            acc[r][t] += dd[h][r] * sdot;
                        }
                    }
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < NR; r++) {
        #pragma unroll
        for (int t = 0; t < T; t++) {
            float v = warp_sum(acc[r][t]);
            if (lane == 0 && t < nt && row0 + r < wrows) out[(long long)t * wrows + row0 + r] = v;
        }
    }
}

// Q4_0 (fifth bits absent) and Q5_0 (p1 = fifth bits) share one loop.
// NR rows per warp: each row's block is decoded once, then every activation
// chunk is loaded once for the NR rows (NR = 2 for several activation rows,
// where activation loads from L1 would otherwise dominate).
template <int T, bool Q5, int NR>
__device__ void gemv_q45_0(int bid, const u8* p0, const u8* p1, const u16* p2, int wrows, int cols, const float* x,
                           int nt, float* out) {
    int row0 = (bid * GEMV_WARPS + (threadIdx.x >> 5)) * NR, lane = threadIdx.x & 31;
    if (row0 >= wrows) return;
    float acc[NR][T];
    #pragma unroll
    for (int r = 0; r < NR; r++)
        #pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = 0.0f;
    int nb = cols / 32;
    for (int b = lane; b < nb; b += 32) {
        float lo[NR][16], hi[NR][16], dd[NR];
        #pragma unroll
        for (int r = 0; r < NR; r++) {
            long long blk = (long long)min(row0 + r, wrows - 1) * nb + b; // past the end: discarded
            uint4 raw = *(const uint4*)(p0 + blk * 16);
            u32 qh = Q5 ? ((const u32*)p1)[blk] : 0u;
            dd[r] = h2f(p2[blk]);
            u32 w4[4] = {raw.x, raw.y, raw.z, raw.w};
            #pragma unroll
            for (int k = 0; k < 16; k++) {
                u32 byte = (w4[k >> 2] >> (8 * (k & 3))) & 0xffu;
                int ql = (int)(byte & 15u), qhh = (int)(byte >> 4);
                if (Q5) {
                    ql |= (int)((qh >> k) & 1u) << 4;
                    qhh |= (int)((qh >> (k + 16)) & 1u) << 4;
                    lo[r][k] = (float)(ql - 16);
                    hi[r][k] = (float)(qhh - 16);
                } else {
                    lo[r][k] = (float)(ql - 8);
                    hi[r][k] = (float)(qhh - 8);
                }
            }
        }
        #pragma unroll
        for (int t = 0; t < T; t++) {
            if (t < nt) {
                const float4* xp = (const float4*)(x + (long long)t * cols + b * 32);
                float4 xv[8] = {xp[0], xp[1], xp[2], xp[3], xp[4], xp[5], xp[6], xp[7]};
                #pragma unroll
                for (int r = 0; r < NR; r++) {
                    float sdot = 0.0f;
                    #pragma unroll
                    for (int v = 0; v < 4; v++) {
                        sdot += dot4(xv[v], lo[r][4 * v], lo[r][4 * v + 1], lo[r][4 * v + 2], lo[r][4 * v + 3]);
                        sdot += dot4(xv[4 + v], hi[r][4 * v], hi[r][4 * v + 1], hi[r][4 * v + 2], hi[r][4 * v + 3]);
                    }
                    acc[r][t] += dd[r] * sdot;
                }
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < NR; r++) {
        #pragma unroll
        for (int t = 0; t < T; t++) {
            float v = warp_sum(acc[r][t]);
            if (lane == 0 && t < nt && row0 + r < wrows) out[(long long)t * wrows + row0 + r] = v;
        }
    }
}

// Q4_K / Q5_K: 8 lanes per 256-element super-block; lane part s: chunk
// ch = s / 2 (64 elements), half hh = s % 2 (16 bytes of its 32 nibble bytes),
// giving 16 elements of sub-block 2ch and 16 of sub-block 2ch+1.
template <int T, bool Q5>
__device__ void gemv_q45_k(int bid, const u8* p0, int wrows, int cols, const float* x, int nt, float* out) {
    const int BB = Q5 ? 176 : 144;
    int row = bid * GEMV_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= wrows) return;
    float acc[T];
    #pragma unroll
    for (int t = 0; t < T; t++) acc[t] = 0.0f;
    int nsb = cols / 256;
    const u8* rowp = p0 + (long long)row * nsb * BB;
    int s = lane & 7, ch = s >> 1, hh = s & 1;
    for (int sb = lane >> 3; sb < nsb; sb += 4) {
        const u8* blk = rowp + (long long)sb * BB;
        uint4 head = *(const uint4*)blk;
        uint4 raw = *(const uint4*)(blk + (Q5 ? 48 : 16) + ch * 32 + hh * 16);
        uint4 hraw;
        if (Q5) hraw = *(const uint4*)(blk + 16 + hh * 16);
        else { hraw.x = 0u; hraw.y = 0u; hraw.z = 0u; hraw.w = 0u; }
        float d = h2f((u16)(head.x & 0xffffu)), dmin = h2f((u16)(head.x >> 16));
        int sc0, m0, sc1, m1;
        scale_min_k4_regs(2 * ch, head.y, head.z, head.w, &sc0, &m0);
        scale_min_k4_regs(2 * ch + 1, head.y, head.z, head.w, &sc1, &m1);
        u32 r[4] = {raw.x, raw.y, raw.z, raw.w};
        u32 hr[4] = {hraw.x, hraw.y, hraw.z, hraw.w};
        float lo[16], hi[16];
        #pragma unroll
        for (int k = 0; k < 16; k++) {
            u32 byte = (r[k >> 2] >> (8 * (k & 3))) & 0xffu;
            int ql = (int)(byte & 15u), qhh = (int)(byte >> 4);
            if (Q5) {
                u32 hb = (hr[k >> 2] >> (8 * (k & 3))) & 0xffu;
                ql |= (int)((hb >> (2 * ch)) & 1u) << 4;
                qhh |= (int)((hb >> (2 * ch + 1)) & 1u) << 4;
            }
            lo[k] = (float)ql;
            hi[k] = (float)qhh;
        }
        int c = sb * 256 + ch * 64 + hh * 16;
        float d0 = d * (float)sc0, d1 = d * (float)sc1;
        float mm0 = dmin * (float)m0, mm1 = dmin * (float)m1;
        #pragma unroll
        for (int t = 0; t < T; t++) {
            if (t < nt) {
                long long o = (long long)t * cols + c;
                float sa = 0.0f, sb2 = 0.0f, xsa = 0.0f, xsb = 0.0f;
                #pragma unroll
                for (int v = 0; v < 4; v++) {
                    float4 a = *(const float4*)(x + o + 4 * v), b = *(const float4*)(x + o + 32 + 4 * v);
                    sa += dot4(a, lo[4 * v], lo[4 * v + 1], lo[4 * v + 2], lo[4 * v + 3]);
                    sb2 += dot4(b, hi[4 * v], hi[4 * v + 1], hi[4 * v + 2], hi[4 * v + 3]);
                    xsa += a.x + a.y + a.z + a.w;
                    xsb += b.x + b.y + b.z + b.w;
                }
                acc[t] += d0 * sa - mm0 * xsa + d1 * sb2 - mm1 * xsb;
            }
        }
    }
    gemv_finish<T>(acc, nt, row, wrows, out);
}

// Q6_K: 4 lanes per super-block; lane part s: half n = s / 2, l0 = 16 * (s % 2)
// covering elements 128n + {0,32,64,96} + l0 + (0..16).
template <int T>
__device__ void gemv_q6_k(int bid, const u8* p0, const u16* p2, int wrows, int cols, const float* x, int nt, float* out) {
    int row = bid * GEMV_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= wrows) return;
    float acc[T];
    #pragma unroll
    for (int t = 0; t < T; t++) acc[t] = 0.0f;
    int nsb = cols / 256;
    long long sb0 = (long long)row * nsb;
    int s = lane & 3, n = s >> 1, l0 = (s & 1) * 16;
    for (int sb = lane >> 2; sb < nsb; sb += 8) {
        const u8* blk = p0 + (sb0 + sb) * 208;
        uint4 ra = *(const uint4*)(blk + 64 * n + l0);
        uint4 rb = *(const uint4*)(blk + 64 * n + 32 + l0);
        uint4 rh = *(const uint4*)(blk + 128 + 32 * n + l0);
        const i8* scp = (const i8*)(blk + 192 + 8 * n + (l0 >> 4));
        float d = h2f(p2[sb0 + sb]);
        float dsc[4] = {d * (float)scp[0], d * (float)scp[2], d * (float)scp[4], d * (float)scp[6]};
        u32 a[4] = {ra.x, ra.y, ra.z, ra.w}, b[4] = {rb.x, rb.y, rb.z, rb.w}, hq[4] = {rh.x, rh.y, rh.z, rh.w};
        float w0[16], w1[16], w2[16], w3[16];
        #pragma unroll
        for (int k = 0; k < 16; k++) {
            int sh = 8 * (k & 3);
            u32 ab = (a[k >> 2] >> sh) & 0xffu, bb = (b[k >> 2] >> sh) & 0xffu, hb = (hq[k >> 2] >> sh) & 0xffu;
            w0[k] = (float)((int)((ab & 15u) | ((hb & 3u) << 4)) - 32);
            w1[k] = (float)((int)((bb & 15u) | (((hb >> 2) & 3u) << 4)) - 32);
            w2[k] = (float)((int)((ab >> 4) | (((hb >> 4) & 3u) << 4)) - 32);
            w3[k] = (float)((int)((bb >> 4) | (((hb >> 6) & 3u) << 4)) - 32);
        }
        int c = sb * 256 + 128 * n + l0;
        fma16<T>(acc, x, cols, nt, c, w0, dsc[0]);
        fma16<T>(acc, x, cols, nt, c + 32, w1, dsc[1]);
        fma16<T>(acc, x, cols, nt, c + 64, w2, dsc[2]);
        fma16<T>(acc, x, cols, nt, c + 96, w3, dsc[3]);
    }
    gemv_finish<T>(acc, nt, row, wrows, out);
}

// F32 / F16 / BF16 weights: 16-byte loads when cols allows, scalar otherwise.
template <int T, int DT>
__device__ void gemv_float(int bid, const u8* p0, int wrows, int cols, const float* x, int nt, float* out) {
    int row = bid * GEMV_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= wrows) return;
    float acc[T];
    #pragma unroll
    for (int t = 0; t < T; t++) acc[t] = 0.0f;
    const int per = DT == DT_F32 ? 4 : 8; // elements per 16 bytes
    long long rbase = (long long)row * cols;
    if (cols % 8 == 0) {
        int nch = cols / per;
        for (int ch = lane; ch < nch; ch += 32) {
            float w[8];
            if (DT == DT_F32) {
                float4 v = *(const float4*)((const float*)p0 + rbase + ch * 4);
                w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
            } else {
                uint4 v = *(const uint4*)((const u16*)p0 + rbase + ch * 8);
                u32 r[4] = {v.x, v.y, v.z, v.w};
                #pragma unroll
                for (int k = 0; k < 8; k++) {
                    u16 h = (u16)((r[k >> 1] >> (16 * (k & 1))) & 0xffffu);
                    w[k] = DT == DT_F16 ? h2f(h) : bf2f(h);
                }
            }
            #pragma unroll
            for (int t = 0; t < T; t++) {
                if (t < nt) {
                    const float4* xp = (const float4*)(x + (long long)t * cols + ch * per);
                    float4 a = xp[0];
                    float sdot = dot4(a, w[0], w[1], w[2], w[3]);
                    if (per == 8) sdot += dot4(xp[1], w[4], w[5], w[6], w[7]);
                    acc[t] += sdot;
                }
            }
        }
    } else {
        for (int c = lane; c < cols; c += 32) {
            float wv = DT == DT_F32 ? ((const float*)p0)[rbase + c]
                     : DT == DT_F16 ? h2f(((const u16*)p0)[rbase + c]) : bf2f(((const u16*)p0)[rbase + c]);
            #pragma unroll
            for (int t = 0; t < T; t++) if (t < nt) acc[t] += wv * x[(long long)t * cols + c];
        }
    }
    gemv_finish<T>(acc, nt, row, wrows, out);
}

// Bytes of one row in a weight's p0 array (see dequant.cu's layouts).
__device__ __forceinline__ long long p0_row_bytes(int dt, int cols) {
    switch (dt) {
    case DT_F32: return (long long)cols * 4;
    case DT_F16:
    case DT_BF16: return (long long)cols * 2;
    case DT_Q8_0: return cols;
    case DT_Q4_0:
    case DT_Q5_0: return cols / 2;
    case DT_Q4_K: return (long long)(cols / 256) * 144;
    case DT_Q5_K: return (long long)(cols / 256) * 176;
    default: return (long long)(cols / 256) * 208;
    }
}

// Before waiting for the previous kernel (pdl_entry), pull this block's
// weight rows [row0, row0 + nrows) into L2: weights do not depend on the
// previous kernel, so under programmatic dependent launch their fetch
// overlaps the previous kernel instead of following it.
// `tall`: the rows belong to a tall Q8_0 matrix (4 rows per warp: the LM
// head), which kestrel_l2_hints bit 0 streams instead (see common.cu).
__device__ __forceinline__ void prefetch_rows(const u8* p0, int dt, int cols, long long row0, int nrows, int wrows,
                                              bool tall) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (row0 >= wrows) return;
    int hints = kestrel_l2_hints;
    if (tall && (hints & 1)) return;
    u32 keep = tall ? 0u : (u32)((hints >> 1) & 15);
    long long n = p0_row_bytes(dt, cols) * (long long)min(nrows, (int)(wrows - row0));
    const u8* base = p0 + row0 * p0_row_bytes(dt, cols);
    for (long long off = (long long)threadIdx.x * 128; off < n; off += (long long)blockDim.x * 128) {
        const u8* a = base + off;
        // Fibonacci hash of the line address: its top 3 bits pick the eighth.
        if (keep && ((u32)((unsigned long long)a >> 7) * 2654435761u) >> 29 < keep)
            asm volatile("prefetch.global.L2::evict_last [%0];" ::"l"(a));
        else
            asm volatile("prefetch.global.L2 [%0];" ::"l"(a));
    }
#endif
}

#define GEMV_ENTRY(name, T, DT, NR, body)                                                          \
    extern "C" __global__ void __launch_bounds__(256) name##_##T(                                  \
        const u8* p0, const u8* p1, const u16* p2, int wrows, int cols, const float* x, int nt,    \
        float* out) {                                                                              \
        prefetch_rows(p0, DT, cols, (long long)blockIdx.x * GEMV_WARPS * NR, GEMV_WARPS * NR, wrows, NR == 4); \
        pdl_entry();                                                                               \
        body;                                                                                      \
    }

#define GEMV_ALL(T)                                                                                \
    GEMV_ENTRY(gemv_f32, T, DT_F32, 1, (gemv_float<T, DT_F32>(blockIdx.x, p0, wrows, cols, x, nt, out)))                  \
    GEMV_ENTRY(gemv_f16, T, DT_F16, 1, (gemv_float<T, DT_F16>(blockIdx.x, p0, wrows, cols, x, nt, out)))                  \
    GEMV_ENTRY(gemv_bf16, T, DT_BF16, 1, (gemv_float<T, DT_BF16>(blockIdx.x, p0, wrows, cols, x, nt, out)))                \
    GEMV_ENTRY(gemv_q8_0, T, DT_Q8_0, 1, (gemv_q8_0<T, 1>(blockIdx.x, p0, p2, wrows, cols, x, nt, out)))                   \
    GEMV_ENTRY(gemv_q8_0r4, T, DT_Q8_0, 4, (gemv_q8_0<T, 4>(blockIdx.x, p0, p2, wrows, cols, x, nt, out)))                 \
    GEMV_ENTRY(gemv_q4_0, T, DT_Q4_0, 1, (gemv_q45_0<T, false, 1>(blockIdx.x, p0, p1, p2, wrows, cols, x, nt, out)))       \
    GEMV_ENTRY(gemv_q5_0, T, DT_Q5_0, 1, (gemv_q45_0<T, true, 1>(blockIdx.x, p0, p1, p2, wrows, cols, x, nt, out)))        \
    GEMV_ENTRY(gemv_q4_0r2, T, DT_Q4_0, 2, (gemv_q45_0<T, false, 2>(blockIdx.x, p0, p1, p2, wrows, cols, x, nt, out)))     \
    GEMV_ENTRY(gemv_q5_0r2, T, DT_Q5_0, 2, (gemv_q45_0<T, true, 2>(blockIdx.x, p0, p1, p2, wrows, cols, x, nt, out)))      \
    GEMV_ENTRY(gemv_q4_k, T, DT_Q4_K, 1, (gemv_q45_k<T, false>(blockIdx.x, p0, wrows, cols, x, nt, out)))                  \
    GEMV_ENTRY(gemv_q5_k, T, DT_Q5_K, 1, (gemv_q45_k<T, true>(blockIdx.x, p0, wrows, cols, x, nt, out)))                   \
    GEMV_ENTRY(gemv_q6_k, T, DT_Q6_K, 1, (gemv_q6_k<T>(blockIdx.x, p0, p2, wrows, cols, x, nt, out)))

GEMV_ALL(1)
GEMV_ALL(2)
GEMV_ALL(4)
GEMV_ALL(8)

// Several GEMVs over one activation in a single launch (QKV; gate + up):
// blocks [0, nb0) compute weight 0, the next nb1 weight 1, then weight 2.
// `kind` selects the kernel family (codes of `gemv_kind` on the Rust side).
template <int T>
__device__ __forceinline__ void gemv_any(int kind, int bid, const u8* p0, const u8* p1, const u16* p2, int wrows,
                                         int cols, const float* x, int nt, float* out) {
    switch (kind) {
    case 0: gemv_float<T, DT_F32>(bid, p0, wrows, cols, x, nt, out); break;
    case 1: gemv_float<T, DT_F16>(bid, p0, wrows, cols, x, nt, out); break;
    case 2: gemv_float<T, DT_BF16>(bid, p0, wrows, cols, x, nt, out); break;
    case 3: gemv_q8_0<T, 1>(bid, p0, p2, wrows, cols, x, nt, out); break;
    case 4: gemv_q8_0<T, 4>(bid, p0, p2, wrows, cols, x, nt, out); break;
    case 5: gemv_q45_0<T, false, 1>(bid, p0, p1, p2, wrows, cols, x, nt, out); break;
    case 6: gemv_q45_0<T, true, 1>(bid, p0, p1, p2, wrows, cols, x, nt, out); break;
    case 7: gemv_q45_0<T, false, 2>(bid, p0, p1, p2, wrows, cols, x, nt, out); break;
    case 8: gemv_q45_0<T, true, 2>(bid, p0, p1, p2, wrows, cols, x, nt, out); break;
    case 9: gemv_q45_k<T, false>(bid, p0, wrows, cols, x, nt, out); break;
    case 10: gemv_q45_k<T, true>(bid, p0, wrows, cols, x, nt, out); break;
    default: gemv_q6_k<T>(bid, p0, p2, wrows, cols, x, nt, out); break;
    }
}

// Weight dtype and rows per warp of a `gemv_any` kernel family code.
__device__ __forceinline__ int kind_dt(int kind) {
    const int dts[12] = {DT_F32, DT_F16, DT_BF16, DT_Q8_0, DT_Q8_0, DT_Q4_0, DT_Q5_0, DT_Q4_0, DT_Q5_0, DT_Q4_K, DT_Q5_K, DT_Q6_K};
    return dts[kind < 0 || kind > 11 ? 11 : kind];
}
__device__ __forceinline__ int kind_nr(int kind) { return kind == 4 ? 4 : (kind == 7 || kind == 8) ? 2 : 1; }

#define GEMV3_ENTRY(T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemv3_##T(                                   \
        const float* x, int nt, int cols,                                                          \
        int k0, const u8* a0, const u8* a1, const u16* a2, int r0, float* o0, int nb0,             \
        int k1, const u8* b0, const u8* b1, const u16* b2, int r1, float* o1, int nb1,             \
        int k2, const u8* c0, const u8* c1, const u16* c2, int r2, float* o2) {                    \
        int b = blockIdx.x;                                                                        \
        if (b < nb0) prefetch_rows(a0, kind_dt(k0), cols, (long long)b * GEMV_WARPS * kind_nr(k0), GEMV_WARPS * kind_nr(k0), r0, kind_nr(k0) == 4); \
        else if (b < nb0 + nb1) prefetch_rows(b0, kind_dt(k1), cols, (long long)(b - nb0) * GEMV_WARPS * kind_nr(k1), GEMV_WARPS * kind_nr(k1), r1, kind_nr(k1) == 4); \
        else prefetch_rows(c0, kind_dt(k2), cols, (long long)(b - nb0 - nb1) * GEMV_WARPS * kind_nr(k2), GEMV_WARPS * kind_nr(k2), r2, kind_nr(k2) == 4); \
        pdl_entry();                                                                               \
        if (b < nb0) { gemv_any<T>(k0, b, a0, a1, a2, r0, cols, x, nt, o0); return; }              \
        b -= nb0;                                                                                  \
        if (b < nb1) { gemv_any<T>(k1, b, b0, b1, b2, r1, cols, x, nt, o1); return; }              \
        b -= nb1;                                                                                  \
        gemv_any<T>(k2, b, c0, c1, c2, r2, cols, x, nt, o2);                                       \
    }

GEMV3_ENTRY(1)
GEMV3_ENTRY(2)
GEMV3_ENTRY(4)
GEMV3_ENTRY(8)


// ---- GEMVs whose activation is formed in the launch (decode, 1..4 rows) ---
// Every block forms the activation rows in shared memory from the previous
// kernel's outputs, then runs the GEMV families of gemv3 on them: the
// elementwise launch that would sit between two GEMVs disappears from the
// chain of dependent launches that bounds a decode step (at one sequence
// each launch costs ~3 us, its bytes ~0.2 us).
//
// mode 1 (gated): x = act(a) * b, gated_act's expression (a = gate, b = up).
// mode 2 (residual): residual_norm's step with its arithmetic and summation
//   order (logical_block_sum over nthr = its block size): x_new = res +
//   (post_w ? rms_norm(b) * post_w : b), x = rms_norm(x_new) * norm_w.
//   Every block computes the whole step; the last block to have read `res`
//   (a ticket taken from *counter once the block's reads are done, so the
//   GEMV hides the atomic's latency) writes x_new back and resets *counter.
// Shared memory: nt * cols floats (x), and with mode 2 nt * cols more (x_new).
#define GP_GATED 1
#define GP_RESIDUAL 2
// Loads per thread issued before their stores (see mk_stage in megakernel.cu).
#define GP_PASS 8

__device__ void gp_gated(const float* gate, const float* up, int act, int n, float* xs) {
    for (int base = 0; base < n; base += GP_PASS * blockDim.x) {
        float g[GP_PASS], u[GP_PASS];
        #pragma unroll
        for (int k = 0; k < GP_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            g[k] = c < n ? gate[c] : 0.0f;
            u[k] = c < n ? up[c] : 0.0f;
        }
        #pragma unroll
        for (int k = 0; k < GP_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            if (c < n) xs[c] = (act == 0 ? silu(g[k]) : gelu_tanh(g[k])) * u[k];
        }
    }
}

// One row of the residual step: h (shared) receives delta, then the
// normalized row; xn (shared) receives x_new.
__device__ void gp_residual_row(const float* res, const float* delta, const float* post_w, const float* norm_w,
                                float eps, int cols, int nthr, float* h, float* xn, float* scratch) {
    for (int base = 0; base < cols; base += GP_PASS * blockDim.x) {
        float a[GP_PASS], d[GP_PASS];
        #pragma unroll
        for (int k = 0; k < GP_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            a[k] = c < cols ? res[c] : 0.0f;
            d[k] = c < cols ? delta[c] : 0.0f;
        }
        #pragma unroll
        for (int k = 0; k < GP_PASS; k++) {
            int c = base + threadIdx.x + k * blockDim.x;
            if (c < cols) {
                xn[c] = a[k];
                h[c] = d[k];
            }
        }
    }
    float pinv = 1.0f;
    if (post_w) {
        float ps = logical_block_sum(cols, nthr, [&](int c) { return h[c] * h[c]; }, scratch);
        pinv = rsqrtf(ps / (float)cols + eps);
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float d = h[c];
        d = post_w ? __fmul_rn(__fmul_rn(d, pinv), post_w[c]) : d;
        xn[c] = __fadd_rn(xn[c], d);
    }
    float ss = logical_block_sum(cols, nthr, [&](int c) { return xn[c] * xn[c]; }, scratch);
    float inv = rsqrtf(ss / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) h[c] = xn[c] * inv * norm_w[c];
}

#define GEMVP_ENTRY(T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256) gemvp_##T(                                   \
        int mode, const float* a, const float* bsrc, const float* post_w, const float* norm_w,     \
        float eps, int nthr, float* res, u32* counter, int act, int nt, int cols,                  \
        int k0, const u8* a0, const u8* a1, const u16* a2, int r0, float* o0, int nb0,             \
        int k1, const u8* b0, const u8* b1, const u16* b2, int r1, float* o1, int nb1,             \
        int k2, const u8* c0, const u8* c1, const u16* c2, int r2, float* o2) {                    \
        extern __shared__ float4 gp_smem[];                                                        \
        __shared__ float scratch[32];                                                              \
        __shared__ int s_last;                                                                     \
        float* xs = (float*)gp_smem;                                                               \
        int b = blockIdx.x;                                                                        \
        if (b < nb0) prefetch_rows(a0, kind_dt(k0), cols, (long long)b * GEMV_WARPS * kind_nr(k0), GEMV_WARPS * kind_nr(k0), r0, kind_nr(k0) == 4); \
        else if (b < nb0 + nb1) prefetch_rows(b0, kind_dt(k1), cols, (long long)(b - nb0) * GEMV_WARPS * kind_nr(k1), GEMV_WARPS * kind_nr(k1), r1, kind_nr(k1) == 4); \
        else prefetch_rows(c0, kind_dt(k2), cols, (long long)(b - nb0 - nb1) * GEMV_WARPS * kind_nr(k2), GEMV_WARPS * kind_nr(k2), r2, kind_nr(k2) == 4); \
        pdl_entry();                                                                               \
        int n = nt * cols;                                                                         \
        if (mode == GP_GATED) gp_gated(a, bsrc, act, n, xs);                                       \
        else                                                                                       \
            for (int t = 0; t < nt; t++)                                                           \
                gp_residual_row(res + (long long)t * cols, bsrc + (long long)t * cols, post_w, norm_w, eps, \
                                cols, nthr, xs + t * cols, xs + n + t * cols, scratch);            \
        __syncthreads();                                                                           \
        u32 ticket = 0u;                                                                           \
        if (mode == GP_RESIDUAL && threadIdx.x == 0) ticket = atomicAdd(counter, 1u);              \
        if (b < nb0) gemv_any<T>(k0, b, a0, a1, a2, r0, cols, xs, nt, o0);                         \
        else if (b < nb0 + nb1) gemv_any<T>(k1, b - nb0, b0, b1, b2, r1, cols, xs, nt, o1);        \
        else gemv_any<T>(k2, b - nb0 - nb1, c0, c1, c2, r2, cols, xs, nt, o2);                     \
        if (mode != GP_RESIDUAL) return;                                                           \
        if (threadIdx.x == 0) s_last = ticket == gridDim.x - 1;                                    \
        __syncthreads();                                                                           \
        if (!s_last) return;                                                                       \
        for (int i = threadIdx.x; i < n; i += blockDim.x) res[i] = xs[n + i];                      \
        if (threadIdx.x == 0) *counter = 0u;                                                       \
    }

GEMVP_ENTRY(1)
GEMVP_ENTRY(2)
GEMVP_ENTRY(4)
