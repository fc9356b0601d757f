// Per-group scaled codecs: quant (minmax / absmax, 1-8 bits), fp8 (e4m3 / e5m2) and the
// bucketed sign+level codecs (QSGD uniform levels, natural dithering pow2 levels).
// Payload layouts: kernels/torch_ops.py. One `mode` switch selects the codec; it is uniform
// over the grid, so the branches cost nothing measurable.
//
// Encoding paths
// * grouped_fused_*: quant and fp8 in ONE pass over x. A block owns a tile of whole groups
//   whose start is also a multiple of 8 elements (tile = a multiple of lcm(group, 8), at most
//   4096 elements): each thread keeps 2 chunks of 8 values in registers, per-group min/max
//   (or abs-max) are combined with shared-memory atomics (order-independent, so exact and
//   deterministic), then each thread quantises its chunks and writes whole packed bytes
//   (8 codes = `bits` bytes), so no byte is shared between threads for any bit width.
// * grouped_stats_* + grouped_encode_*: any group size (used when group < 8, when
//   lcm(group, 8) > 4096, and for the level codecs whose L2 norm needs a second, ordered
//   reduction): one block per group reduces with a fixed tree, then one thread per 8-element
//   chunk encodes and packs.
#include "common.cuh"

#define M_QMINMAX 0
#define M_QABSMAX 1
#define M_E4M3 2
#define M_E5M2 3
#define M_LUNIFORM 4
#define M_LPOW2 5

#define FUSED_THREADS 256
#define FUSED_CH 2
#define FUSED_TILE (FUSED_THREADS * 8 * FUSED_CH)
#define FUSED_MAXG (FUSED_TILE / 8)

__device__ __forceinline__ int is_fp8(int mode) { return mode == M_E4M3 || mode == M_E5M2; }
__device__ __forceinline__ int fp8_mbits(int mode) { return mode == M_E4M3 ? 3 : 2; }
__device__ __forceinline__ int fp8_emin(int mode) { return mode == M_E4M3 ? -6 : -14; }
__device__ __forceinline__ float fp8_fmax(int mode) { return mode == M_E4M3 ? 448.f : 57344.f; }
__device__ __forceinline__ int rec_bytes(int mode) { return mode == M_QMINMAX ? 8 : 4; }

// fp32 -> fp8 bits, round to nearest even, for finite |y| <= FMAX (the encoder clamps first,
// so the e4m3fn NaN code 0x7f and e5m2 inf are never produced). Sign of zero is kept, as in
// torch's cast.
__device__ __forceinline__ u32 f32_to_fp8(float y, int mode) {
    const int mb = fp8_mbits(mode), emin = fp8_emin(mode);
    u32 sign = (__float_as_uint(y) >> 31) << 7;
    float a = fabsf(y);
    if (a == 0.f) return sign;
    int e = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;  // floor(log2 a) for normal a
    int ee = max(e, emin);
    float q = rintf(a * __uint_as_float((u32)(127 - (ee - mb)) << 23));  // a / 2^(ee-mb), exact
    u32 qi = (u32)q;
    if (qi == (2u << mb)) {  // rounded up into the next binade
        qi = 1u << mb;
        ee += 1;
    }
    if (qi < (1u << mb)) return sign | qi;  // subnormal (ee == emin)
    return sign | ((u32)(ee - emin + 1) << mb) | (qi - (1u << mb));
}

__device__ __forceinline__ float fp8_to_f32(u32 c, int mode) {
    const int mb = fp8_mbits(mode), emin = fp8_emin(mode);
    const u32 emask = mode == M_E4M3 ? 0xfu : 0x1fu, mmask = (1u << mb) - 1u;
    u32 ef = (c >> mb) & emask, m = c & mmask;
    float v;
    if (mode == M_E4M3 && ef == 15u && m == 7u) v = CT_NAN;
    else if (mode == M_E5M2 && ef == 31u) v = m ? CT_NAN : CT_INF;
    else if (ef == 0u) v = ldexpf((float)m, emin - mb);
    else v = ldexpf((float)((1u << mb) + m), (int)ef - 1 + emin - mb);
    return (c & 0x80u) ? -v : v;
}

// fp8_stochastic_round of torch_ops, step for step.
__device__ __forceinline__ float fp8_sr(float y, float u, int mode) {
    const int mb = fp8_mbits(mode), emin = fp8_emin(mode);
    float a = fabsf(y);
    int e1;
    frexpf(a, &e1);
    int e = e1 - 1;
    float ulp = exp2f((float)(max(e, emin) - mb));
    float lower = __fmul_rn(floorf(__fdiv_rn(a, ulp)), ulp);
    float up = (u < __fdiv_rn(__fsub_rn(a, lower), ulp)) ? 1.f : 0.f;
    float r = fminf(__fadd_rn(lower, __fmul_rn(ulp, up)), fp8_fmax(mode));
    return copysignf(r, y);
}

__device__ __forceinline__ float inv_levels(int bits) { return __fdiv_rn(1.f, (float)((1 << bits) - 1)); }
// absmax grid -h..h with an exact zero: h = 2^(bits-1) - 1 (bits >= 2; cupy_ops refuses 1).
__device__ __forceinline__ float half_levels(int bits) { return (float)((1 << (bits - 1)) - 1); }
__device__ __forceinline__ float inv_half_levels(int bits) { return __fdiv_rn(1.f, half_levels(bits)); }

// Per-group reduction results -> encode parameters (p0, p1) and the payload record.
//   quant:  minmax p0 = lo, p1 = step    record (lo, step)
//           absmax p0 = scale = amax / h  record (scale)
//   fp8:    p0 = scale (NaN: bad group)  record scale
//   level:  p0 = amax (NaN: bad group), p1 = r (L2 of |x|/amax, or 1)   record norm
__device__ __forceinline__ void finalize(int mode, int aux, int norm2, int finite, float mn, float mx, float amax,
                                         float r, float* p0, float* p1, float* rec) {
    if (mode == M_QMINMAX) {
        float lo = finite ? mn : CT_NAN;
        float step = finite ? __fmul_rn(__fsub_rn(mx, lo), inv_levels(aux)) : CT_NAN;
        *p0 = lo; *p1 = step; rec[0] = lo; rec[1] = step;
    } else if (mode == M_QABSMAX) {
        float scale = finite ? __fmul_rn(amax, inv_half_levels(aux)) : CT_NAN;
        *p0 = scale; *p1 = 0.f; rec[0] = scale;
    } else if (is_fp8(mode)) {
        float scale = __fmul_rn(amax, __fdiv_rn(1.f, fp8_fmax(mode)));
        *p0 = finite ? scale : CT_NAN; *p1 = 0.f; rec[0] = *p0;
    } else {
        *p0 = finite ? amax : CT_NAN; *p1 = r;
        rec[0] = finite ? (norm2 ? __fmul_rn(amax, r) : amax) : CT_NAN;
    }
}

// One element's code (the torch reference's formulas, same fp32 operations in the same order).
__device__ __forceinline__ u32 encode_one(int mode, int aux, int norm2, int stoch, float x, float p0, float p1,
                                          float u) {
    if (mode == M_QMINMAX) {
        const float L = (float)((1 << aux) - 1);
        float v = (p1 > 0.f) ? __fdiv_rn(__fsub_rn(x, p0), p1) : 0.f;  // ok = finite & step > 0
        v = stoch ? floorf(__fadd_rn(v, u)) : rintf(v);
        return (u32)fminf(fmaxf(v, 0.f), L);
    }
    if (mode == M_QABSMAX) {
        const float h = half_levels(aux);
        float v = (p0 > 0.f) ? __fdiv_rn(x, p0) : 0.f;  // ok = finite & scale > 0
        v = stoch ? floorf(__fadd_rn(v, u)) : rintf(v);
        return (u32)__fadd_rn(fminf(fmaxf(v, -h), h), h);  // code = q + h in 0..2h
    }
    if (is_fp8(mode)) {
        const float fmax = fp8_fmax(mode);
        float y = (p0 > 0.f) ? __fdiv_rn(x, p0) : 0.f;
        y = fminf(fmaxf(y, -fmax), fmax);
        if (stoch) y = fp8_sr(y, u, mode);
        return f32_to_fp8(y, mode);
    }
    // level codecs: aux = s levels, w = bit_length(s) level bits, sign above them
    const int s = aux, w = 32 - __clz(s);
    int ok = p0 > 0.f;
    float y = __fdiv_rn(fabsf(x), ok ? p0 : 1.f);
    if (norm2) y = __fdiv_rn(y, ok ? p1 : 1.f);
    y = fminf(ok ? y : 0.f, 1.f);
    float level;
    if (mode == M_LUNIFORM) {
        level = floorf(__fadd_rn(__fmul_rn(y, (float)s), u));
    } else {
        int e;
        float m = frexpf(y, &e);
        int below = (e <= 1 - s) || (y == 0.f);
        float p_up = below ? __fmul_rn(y, ldexpf(1.f, s - 1)) : __fsub_rn(__fmul_rn(2.f, m), 1.f);
        level = (below ? 0.f : (float)(e + s - 1)) + ((u < p_up) ? 1.f : 0.f);
    }
    u32 j = (u32)fminf(fmaxf(level, 0.f), (float)s);
    return j | ((x < 0.f ? 1u : 0u) << w);
}

// ---- generic path: per-group statistics ---------------------------------------------------
template <int DT>
__device__ __forceinline__ void grouped_stats(const typename In<DT>::T* x, i64 n, i64 group, int mode, int aux,
                                              int norm2, float2* params, u8* payload, i64 nb) {
    __shared__ float sh[32];
    i64 g = blockIdx.x;
    i64 start = g * group, end = min(start + group, n);
    float mn = CT_INF, mx = -CT_INF, am = 0.f;
    int bad = 0;
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float v = In<DT>::cvt(x[i]);
        if (isfinite(v)) {
            mn = fminf(mn, v); mx = fmaxf(mx, v); am = fmaxf(am, fabsf(v));
        } else {
            bad = 1;
        }
    }
    bad = __syncthreads_or(bad);
    mn = block_reduce(mn, 1, sh);
    mx = block_reduce(mx, 0, sh);
    am = block_reduce(am, 0, sh);
    float r = 1.f;
    if (norm2) {
        float ss = 0.f;
        if (!bad && am > 0.f) {
            for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
                float y = __fdiv_rn(fabsf(In<DT>::cvt(x[i])), am);
                ss = __fadd_rn(ss, __fmul_rn(y, y));
            }
        }
        r = __fsqrt_rn(block_reduce(ss, 2, sh));  // 0 for an all-zero bucket: norm = 0 * 0
        // Cap the L2 norm below the fp32 maximum (torch_ops.level_encode: NORM_CAP); am = 0
        // gives inf here, which leaves r alone.
        r = fminf(r, __fdiv_rn(__uint_as_float(0x7f7ffffeu), am));
    }
    if (threadIdx.x == 0) {
        float p0, p1, rec[2];
        finalize(mode, aux, norm2, !bad, mn, mx, am, r, &p0, &p1, rec);
        params[g] = make_float2(p0, p1);
        const int rb = rec_bytes(mode);
        st_f32(payload + nb + g * rb, rec[0]);
        if (rb == 8) st_f32(payload + nb + g * rb + 4, rec[1]);
    }
}

// ---- generic path: encode + pack, one thread per 8-element chunk -------------------------
template <int DT>
__device__ __forceinline__ void grouped_encode(const typename In<DT>::T* x, i64 n, i64 group, int mode, int aux,
                                               int norm2, int stoch, int bits, const float2* params,
                                               const i64* seed, u8* payload, i64 nb, int vec) {
    i64 chunk = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 e = chunk * 8;
    if (e >= n) return;
    float v[8], u[8];
    load8<DT>(x, e, n, vec, v);
    if (stoch) uniform8(seed, e, u);
    i64 g = e / group, r = e - g * group;
    float2 p = params[g];
    u64 acc = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (e + j < n) {
            acc |= (u64)encode_one(mode, aux, norm2, stoch, v[j], p.x, p.y, stoch ? u[j] : 0.f) << (j * bits);
            if (++r == group && e + j + 1 < n) { r = 0; p = params[++g]; }
        }
    }
    store_chunk(payload, chunk, bits, nb, acc);
}

// ---- fused path (quant / fp8; group >= 8, tile a multiple of lcm(group, 8), <= FUSED_TILE)
template <int DT>
__device__ __forceinline__ void grouped_fused(const typename In<DT>::T* x, i64 n, i64 group, i64 tile, int mode,
                                              int aux, int stoch, int bits, const i64* seed, u8* payload, i64 nb,
                                              int vec) {
    __shared__ u32 kmin[FUSED_MAXG], kmax[FUSED_MAXG];
    __shared__ int kbad[FUSED_MAXG];
    const i64 t0 = (i64)blockIdx.x * tile;
    const i64 tn = min(tile, n - t0);
    const i64 g0 = t0 / group;
    const int ng = (int)((tn + group - 1) / group);
    const int minmax = mode == M_QMINMAX;
    for (int j = threadIdx.x; j < ng; j += blockDim.x) { kmin[j] = 0xffffffffu; kmax[j] = 0u; kbad[j] = 0; }
    __syncthreads();

    float v[FUSED_CH][8];
#pragma unroll
    for (int c = 0; c < FUSED_CH; ++c) {
        i64 off = 8 * (i64)(threadIdx.x + c * blockDim.x);
        if (off >= tn) continue;
        i64 e = t0 + off;
        load8<DT>(x, e, n, vec, v[c]);
        // group >= 8: a chunk touches at most two groups, A and B = A + 1.
        i64 ga = e / group, bnd = (ga + 1) * group;
        u32 mnA = 0xffffffffu, mxA = 0u, mnB = 0xffffffffu, mxB = 0u;
        int badA = 0, badB = 0, hasB = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (e + j >= n) break;
            int inB = e + j >= bnd;
            hasB |= inB;
            float f = v[c][j];
            if (!isfinite(f)) {
                if (inB) badB = 1; else badA = 1;
                continue;
            }
            u32 kx = minmax ? fkey(f) : __float_as_uint(fabsf(f));
            if (inB) { mnB = min(mnB, kx); mxB = max(mxB, kx); }
            else { mnA = min(mnA, kx); mxA = max(mxA, kx); }
        }
        int la = (int)(ga - g0);
        if (minmax) atomicMin(&kmin[la], mnA);
        atomicMax(&kmax[la], mxA);
        if (badA) kbad[la] = 1;
        if (hasB) {
            if (minmax) atomicMin(&kmin[la + 1], mnB);
            atomicMax(&kmax[la + 1], mxB);
            if (badB) kbad[la + 1] = 1;
        }
    }
    __syncthreads();
    const int rb = rec_bytes(mode);
    for (int j = threadIdx.x; j < ng; j += blockDim.x) {
        float mn = funkey(kmin[j]), mx = funkey(kmax[j]), am = __uint_as_float(kmax[j]);
        float p0, p1, rec[2];
        finalize(mode, aux, 0, !kbad[j], mn, mx, am, 1.f, &p0, &p1, rec);
        u8* pr = payload + nb + (g0 + j) * rb;
        st_f32(pr, rec[0]);
        if (rb == 8) st_f32(pr + 4, rec[1]);
        kmin[j] = __float_as_uint(p0);  // each slot is read and rewritten by one thread only
        kmax[j] = __float_as_uint(p1);
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < FUSED_CH; ++c) {
        i64 off = 8 * (i64)(threadIdx.x + c * blockDim.x);
        if (off >= tn) continue;
        i64 e = t0 + off;
        float u[8];
        if (stoch) uniform8(seed, e, u);
        i64 ga = e / group, r = e - ga * group;
        int lg = (int)(ga - g0);
        u64 acc = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (e + j < n) {
                u32 code = encode_one(mode, aux, 0, stoch, v[c][j], __uint_as_float(kmin[lg]),
                                      __uint_as_float(kmax[lg]), stoch ? u[j] : 0.f);
                acc |= (u64)code << (j * bits);
                if (++r == group) { r = 0; ++lg; }
            }
        }
        store_chunk(payload, e >> 3, bits, nb, acc);
    }
}

// ---- decode (+ add into an fp32 accumulator), one thread per 8-element chunk ----------------
__device__ __forceinline__ void dec_params(int mode, int aux, const u8* rec, float* a, float* b) {
    if (mode == M_QMINMAX) { *a = ld_f32(rec); *b = ld_f32(rec + 4); }
    else { *a = ld_f32(rec); *b = 0.f; }  // absmax: scale; fp8: scale; level codecs: norm
}

__device__ __forceinline__ float decode_one(int mode, int aux, u32 code, float a, float b) {
    if (mode == M_QMINMAX) return __fadd_rn(a, __fmul_rn(b, (float)code));
    if (mode == M_QABSMAX) return __fmul_rn(__fsub_rn((float)code, half_levels(aux)), a);
    if (is_fp8(mode)) return __fmul_rn(fp8_to_f32(code, mode), a);
    const int s = aux, w = 32 - __clz(s);
    u32 j = code & ((1u << w) - 1u);
    float t = mode == M_LUNIFORM ? (float)((double)j / (double)s) : (j == 0u ? 0.f : ldexpf(1.f, (int)j - s));
    float val = __fmul_rn(a, t);
    return (code >> w) ? -val : val;
}

extern "C" __global__ void grouped_decode(const u8* payload, i64 n, i64 group, int mode, int aux, int bits, i64 nb,
                                          float* out, int add, int vec) {
    i64 chunk = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 e = chunk * 8;
    if (e >= n) return;
    u64 acc = load_chunk(payload, chunk, bits, nb);
    const u32 mask = (1u << bits) - 1u;
    const int rb = rec_bytes(mode);
    i64 g = e / group, r = e - g * group;
    float a, b, o[8];
    dec_params(mode, aux, payload + nb + g * rb, &a, &b);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        o[j] = 0.f;
        if (e + j < n) {
            o[j] = decode_one(mode, aux, (u32)(acc >> (j * bits)) & mask, a, b);
            if (++r == group && e + j + 1 < n) { r = 0; ++g; dec_params(mode, aux, payload + nb + g * rb, &a, &b); }
        }
    }
    if (vec && e + 8 <= n) {
        float4* p = reinterpret_cast<float4*>(out + e);
        float4 A = make_float4(o[0], o[1], o[2], o[3]), B = make_float4(o[4], o[5], o[6], o[7]);
        if (add) {
            float4 X = p[0], Y = p[1];
            A = make_float4(__fadd_rn(X.x, A.x), __fadd_rn(X.y, A.y), __fadd_rn(X.z, A.z), __fadd_rn(X.w, A.w));
            B = make_float4(__fadd_rn(Y.x, B.x), __fadd_rn(Y.y, B.y), __fadd_rn(Y.z, B.z), __fadd_rn(Y.w, B.w));
        }
        p[0] = A; p[1] = B;
        return;
    }
    for (int j = 0; j < 8 && e + j < n; ++j) out[e + j] = add ? __fadd_rn(out[e + j], o[j]) : o[j];
}

// ---- extern "C" entry points, one per input dtype (f32 / f16 / bf16) ----------------------
#define GROUPED_ENTRIES(SUF, DT)                                                                                   \
    extern "C" __global__ void grouped_stats_##SUF(const In<DT>::T* x, i64 n, i64 group, int mode, int aux,       \
                                                   int norm2, float2* params, u8* payload, i64 nb) {              \
        grouped_stats<DT>(x, n, group, mode, aux, norm2, params, payload, nb);                                     \
    }                                                                                                              \
    extern "C" __global__ void grouped_encode_##SUF(const In<DT>::T* x, i64 n, i64 group, int mode, int aux,      \
                                                    int norm2, int stoch, int bits, const float2* params,         \
                                                    const i64* seed, u8* payload, i64 nb, int vec) {              \
        grouped_encode<DT>(x, n, group, mode, aux, norm2, stoch, bits, params, seed, payload, nb, vec);           \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FUSED_THREADS)                                                   \
        grouped_fused_##SUF(const In<DT>::T* x, i64 n, i64 group, i64 tile, int mode, int aux, int stoch,         \
                            int bits, const i64* seed, u8* payload, i64 nb, int vec) {                            \
        grouped_fused<DT>(x, n, group, tile, mode, aux, stoch, bits, seed, payload, nb, vec);                      \
    }

GROUPED_ENTRIES(f32, 0)
GROUPED_ENTRIES(f16, 1)
GROUPED_ENTRIES(bf16, 2)
