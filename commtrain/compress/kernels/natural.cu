// Natural compression (sign + power-of-two exponent in one byte); layout in torch_ops.py.
// Two passes: a grid-wide max of the finite |x| (atomicMax on the fp32 bits, which order
// like unsigned integers for non-negative values, so the result is exact and
// deterministic), then one thread per 8 elements writes 8 code bytes.
#include "common.cuh"

#define NATURAL_WINDOW 126

template <int DT>
__device__ __forceinline__ void natural_amax(const typename In<DT>::T* x, i64 n, u32* amax_bits) {
    __shared__ float sh[32];
    float m = 0.f;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        float a = fabsf(In<DT>::cvt(x[i]));
        if (isfinite(a)) m = fmaxf(m, a);
    }
    m = block_reduce(m, 0, sh);
    if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

__device__ __forceinline__ u32 natural_code(float x, int top, float u) {
    if (isnan(x)) return 0x80u;
    if (isinf(x)) return x > 0.f ? 0x7fu : 0xffu;
    float a = fabsf(x);
    if (a == 0.f) return 0u;
    const int e_lo = top - (NATURAL_WINDOW - 1);
    int e;
    float m = frexpf(a, &e);  // a = m 2^e, m in [0.5, 1)
    int below = (e - 1) < e_lo;
    float p_up = below ? __fmul_rn(m, exp2f((float)max(e - e_lo, -200))) : __fsub_rn(__fmul_rn(2.f, m), 1.f);
    int k = (below ? 0 : e - e_lo) + (u < p_up ? 1 : 0);
    k = min(k, NATURAL_WINDOW);
    return k > 0 ? ((u32)k | ((x < 0.f ? 1u : 0u) << 7)) : 0u;
}

template <int DT>
__device__ __forceinline__ void natural_encode(const typename In<DT>::T* x, i64 n, const u32* amax_bits,
                                               const i64* seed, u8* payload, int vec) {
    int top;
    frexpf(__uint_as_float(*amax_bits), &top);  // floor(log2 amax) + 1; 0 for amax == 0
    top = min(top, 127);
    i64 chunk = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (chunk == 0) st_u32(payload + n, (u32)top);
    i64 e = chunk * 8;
    if (e >= n) return;
    float v[8], u[8];
    load8<DT>(x, e, n, vec, v);
    uniform8(seed, e, u);
    u64 acc = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j)
        if (e + j < n) acc |= (u64)natural_code(v[j], top, u[j]) << (8 * j);
    store_chunk(payload, chunk, 8, n, acc);
}

extern "C" __global__ void natural_decode(const u8* payload, i64 n, float* out, int vec) {
    i64 chunk = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 e = chunk * 8;
    if (e >= n) return;
    const u8* tp = payload + n;
    int top = (int)((u32)tp[0] | ((u32)tp[1] << 8) | ((u32)tp[2] << 16) | ((u32)tp[3] << 24));
    u64 acc = load_chunk(payload, chunk, 8, n);
    float o[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        u32 c = (u32)(acc >> (8 * j)) & 0xffu, k = c & 0x7fu;
        float mag = k == 0u ? 0.f : k == 127u ? CT_INF : exp2f((float)(top - NATURAL_WINDOW + (int)k));
        o[j] = c == 0x80u ? CT_NAN : (c & 0x80u) ? -mag : mag;
    }
    if (vec && e + 8 <= n) {
        float4* p = reinterpret_cast<float4*>(out + e);
        p[0] = make_float4(o[0], o[1], o[2], o[3]);
        p[1] = make_float4(o[4], o[5], o[6], o[7]);
        return;
    }
    for (int j = 0; j < 8 && e + j < n; ++j) out[e + j] = o[j];
}

#define NATURAL_ENTRIES(SUF, DT)                                                                                 \
    extern "C" __global__ void natural_amax_##SUF(const In<DT>::T* x, i64 n, u32* amax_bits) {                  \
        natural_amax<DT>(x, n, amax_bits);                                                                       \
    }                                                                                                            \
    extern "C" __global__ void natural_encode_##SUF(const In<DT>::T* x, i64 n, const u32* amax_bits,            \
                                                    const i64* seed, u8* payload, int vec) {                    \
        natural_encode<DT>(x, n, amax_bits, seed, payload, vec);                                                 \
    }

NATURAL_ENTRIES(f32, 0)
NATURAL_ENTRIES(f16, 1)
NATURAL_ENTRIES(bf16, 2)
