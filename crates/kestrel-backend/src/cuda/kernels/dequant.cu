// Device weight layouts (built by `cuda/weights.rs` at upload) and the plain
// element-wise dequantization that the embedding lookup, the reference
// matmul and the prefill path (dequantize to f16, then cuBLAS) share.
//
//   F32 / F16 / BF16: p0 = elements, row-major.
//   Q8_0: p0 = i8 quants [rows*cols]; p2 = f16 scale per 32.
//   Q4_0: p0 = 16 nibble bytes per 32 (byte j: element j low, j+16 high); p2 = f16 scale.
//   Q5_0: p0 as Q4_0; p1 = u32 fifth bits per 32; p2 = f16 scale.
//   Q4_K: p0 = native 144-byte super-blocks (16-byte aligned already).
//   Q5_K: p0 = native 176-byte super-blocks.
//   Q6_K: p0 = 208-byte super-blocks (ql, qh, scales; the f16 d moved out so
//         that blocks stay 16-byte aligned); p2 = f16 d per 256.

struct WeightRef {
    const u8* p0;
    const u8* p1;
    const u16* p2;
    int rows;
    int cols;
    int dtype;
};

__device__ __forceinline__ void scale_min_k4(int j, const u8* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

__device__ float dq(const WeightRef& w, long long r, int c) {
    long long e = r * (long long)w.cols + c;
    switch (w.dtype) {
    case DT_F32: return ((const float*)w.p0)[e];
    case DT_F16: return h2f(((const u16*)w.p0)[e]);
    case DT_BF16: return bf2f(((const u16*)w.p0)[e]);
    case DT_Q8_0: return h2f(w.p2[e >> 5]) * (float)((const i8*)w.p0)[e];
    case DT_Q4_0: {
        long long b = e >> 5; int j = (int)(e & 31);
        u8 byte = w.p0[b * 16 + (j & 15)];
        int q = j < 16 ? (byte & 15) : (byte >> 4);
        return h2f(w.p2[b]) * (float)(q - 8);
    }
    case DT_Q5_0: {
        long long b = e >> 5; int j = (int)(e & 31);
        u8 byte = w.p0[b * 16 + (j & 15)];
        int q = j < 16 ? (byte & 15) : (byte >> 4);
        u32 qh = ((const u32*)w.p1)[b];
        q |= ((qh >> j) & 1) << 4;
        return h2f(w.p2[b]) * (float)(q - 16);
    }
    case DT_Q4_K:
    case DT_Q5_K: {
        long long b = e >> 8; int k = (int)(e & 255);
        const u8* blk = w.p0 + b * (w.dtype == DT_Q4_K ? 144 : 176);
        float d = h2f(*(const u16*)blk), dmin = h2f(*(const u16*)(blk + 2));
        int ch = k >> 6, rr = k & 63;
        const u8* qs = blk + (w.dtype == DT_Q4_K ? 16 : 48);
        u8 byte = qs[32 * ch + (rr & 31)];
        int q = rr < 32 ? (byte & 15) : (byte >> 4);
        if (w.dtype == DT_Q5_K) q |= ((blk[16 + (rr & 31)] >> (2 * ch + (rr >> 5))) & 1) << 4;
        int sc, m;
        scale_min_k4(k >> 5, blk + 4, &sc, &m);
        return d * (float)sc * (float)q - dmin * (float)m;
    }
    case DT_Q6_K: {
        long long b = e >> 8; int k = (int)(e & 255);
        const u8* blk = w.p0 + b * 208;
        int n = k >> 7, rr = k & 127, quarter = rr >> 5, l = rr & 31;
        u8 lb = blk[64 * n + l + ((quarter & 1) ? 32 : 0)];
        int low = quarter >= 2 ? (lb >> 4) : (lb & 15);
        int high = (blk[128 + 32 * n + l] >> (2 * quarter)) & 3;
        int q = (low | (high << 4)) - 32;
        float sc = (float)((const i8*)(blk + 192))[k >> 4];
        return h2f(w.p2[b]) * sc * (float)q;
    }
    }
    return 0.0f;
}

// out[i, :] = dq(table[tokens[i]]) * scale. grid.x = rows.
extern "C" __global__ void embed(const u8* p0, const u8* p1, const u16* p2, int wrows, int cols,
                                 int dtype, const u32* tokens, float scale, float* out) { pdl_entry();
    WeightRef w = {p0, p1, p2, wrows, cols, dtype};
    long long tok = tokens[blockIdx.x];
    if (tok >= wrows) tok = 0; // guarded on the host; never read out of bounds here
    float* o = out + (long long)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = dq(w, tok, c) * scale;
}

// Reference matmul: one thread per output element, whole-row dequantized
// dot product in f32. out[t, o] = sum_i W[o, i] x[t, i].
extern "C" __global__ void matmul_ref(const u8* p0, const u8* p1, const u16* p2, int wrows,
                                      int cols, int dtype, const float* x, int xrows, float* out) { pdl_entry();
    WeightRef w = {p0, p1, p2, wrows, cols, dtype};
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)xrows * wrows) return;
    int t = (int)(idx / wrows);
    long long o = idx % wrows;
    const float* xr = x + (long long)t * cols;
    float acc = 0.0f;
    for (int i = 0; i < cols; i++) acc += dq(w, o, i) * xr[i];
    out[(long long)t * wrows + o] = acc;
}

// Dequantize rows [row0, row0 + nrows) to f16 (prefill path). grid-stride.
extern "C" __global__ void dequant_f16(const u8* p0, const u8* p1, const u16* p2, int wrows,
                                       int cols, int dtype, long long row0, int nrows, u16* out) { pdl_entry();
    WeightRef w = {p0, p1, p2, wrows, cols, dtype};
    long long n = (long long)nrows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = f2h(dq(w, row0 + i / cols, (int)(i % cols)));
    }
}

extern "C" __global__ void f32_to_f16(const float* x, long long n, u16* out) { pdl_entry();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = f2h(x[i]);
    }
}
