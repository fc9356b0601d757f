// Shared device helpers for the codec kernels (compiled by NVRTC through cupy.RawModule,
// and by nvcc in CPU CI to catch syntax errors). No #include of system or CUDA headers:
// fp16/bf16 are read as raw 16-bit words and converted here, Philox is written out, so the
// same text compiles under NVRTC without include paths.
//
// Numerics contract: the kernels must give bit-identical payloads to the torch reference
// (kernels/torch_ops.py) *running on CUDA*. Every floating-point step therefore uses the
// _rn intrinsics (never contracted into an FMA), and a division of a tensor by a Python
// scalar is written as a multiplication by the fp32 reciprocal, because that is what
// PyTorch's CUDA div kernel does for a CPU-scalar divisor (BinaryDivTrueKernel.cu).
#pragma once

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define CT_NAN __int_as_float(0x7fc00000)  // Python float("nan") as fp32: same payload bits
#define CT_INF __int_as_float(0x7f800000)

// ---- input element types ---------------------------------------------------------------
// DT 0 = float32, 1 = float16, 2 = bfloat16. The 16-bit types arrive as raw words.
template <int DT> struct In;
template <> struct In<0> {
    typedef float T;
    static __device__ __forceinline__ float cvt(float v) { return v; }
};
template <> struct In<1> {
    typedef unsigned short T;
    static __device__ __forceinline__ float cvt(unsigned short h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));  // exact widening, NaN/Inf kept
        return f;
    }
};
template <> struct In<2> {
    typedef unsigned short T;
    static __device__ __forceinline__ float cvt(unsigned short h) {
        return __uint_as_float(((u32)h) << 16);  // exact widening
    }
};

// Load 8 consecutive elements starting at e (e % 8 == 0). Elements at or past n read as 0.
// vec: the base pointer is 16-byte aligned, so full chunks use 16-byte loads.
template <int DT>
__device__ __forceinline__ void load8(const typename In<DT>::T* x, i64 e, i64 n, int vec, float v[8]) {
    if (vec && e + 8 <= n) {
        if (DT == 0) {
            const float4* p = reinterpret_cast<const float4*>(x + e);
            float4 a = p[0], b = p[1];
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
            uint4 a = *reinterpret_cast<const uint4*>(x + e);
            u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                v[2 * j] = In<DT>::cvt((unsigned short)(w[j] & 0xffffu));
                v[2 * j + 1] = In<DT>::cvt((unsigned short)(w[j] >> 16));
            }
        }
        return;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = (e + j < n) ? In<DT>::cvt(x[e + j]) : 0.f;
}

// ---- counter-based random numbers: Philox4x32-10 (Salmon et al., SC'11) -----------------
// Uniform u for element i: key = the 64-bit per-call seed, counter = (i / 4, 0, 0), word
// i % 4; u = (word >> 8) * 2^-24 in [0, 1) (24 bits, like torch.rand for float32).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, u32 k0, u32 k1) {
    const u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        u32 hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        u32 hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
        k0 += W0;
        k1 += W1;
    }
    return c;
}

__device__ __forceinline__ float u24(u32 w) { return (float)(w >> 8) * 5.9604644775390625e-08f; }

// Eight uniforms for elements e .. e+7 (e % 8 == 0): two Philox blocks.
__device__ __forceinline__ void uniform8(const i64* seed, i64 e, float u[8]) {
    u64 s = (u64)seed[0];
    u32 k0 = (u32)s, k1 = (u32)(s >> 32);
    u64 q = (u64)e >> 2;
    uint4 a = philox4x32_10(make_uint4((u32)q, (u32)(q >> 32), 0u, 0u), k0, k1);
    uint4 b = philox4x32_10(make_uint4((u32)(q + 1), (u32)((q + 1) >> 32), 0u, 0u), k0, k1);
    u[0] = u24(a.x); u[1] = u24(a.y); u[2] = u24(a.z); u[3] = u24(a.w);
    u[4] = u24(b.x); u[5] = u24(b.y); u[6] = u24(b.z); u[7] = u24(b.w);
}

// Test hook: raw Philox output, so a GPU test can check the Random123 known-answer vectors.
extern "C" __global__ void philox_kat(const u32* ctr_key, u32* out) {
    uint4 c = make_uint4(ctr_key[0], ctr_key[1], ctr_key[2], ctr_key[3]);
    uint4 r = philox4x32_10(c, ctr_key[4], ctr_key[5]);
    out[0] = r.x; out[1] = r.y; out[2] = r.z; out[3] = r.w;
}

// ---- unaligned little-endian scalars inside a byte payload ------------------------------
__device__ __forceinline__ float ld_f32(const u8* p) {
    if ((((u64)p) & 3u) == 0) return *reinterpret_cast<const float*>(p);
    return __uint_as_float((u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24));
}
__device__ __forceinline__ void st_u32(u8* p, u32 v) {
    if ((((u64)p) & 3u) == 0) {
        *reinterpret_cast<u32*>(p) = v;
        return;
    }
    p[0] = (u8)v; p[1] = (u8)(v >> 8); p[2] = (u8)(v >> 16); p[3] = (u8)(v >> 24);
}
__device__ __forceinline__ void st_f32(u8* p, float v) { st_u32(p, __float_as_uint(v)); }

// ---- packed code streams (layout of torch_ops.pack_bits) --------------------------------
// 8 consecutive codes starting at element e (e % 8 == 0) occupy exactly `bits` bytes at
// byte offset (e / 8) * bits, so a thread owning such a chunk writes whole bytes and no two
// threads ever touch the same byte, for any bit width. Bytes at or past nb are not written.
__device__ __forceinline__ void store_chunk(u8* out, i64 chunk, int bits, i64 nb, u64 acc) {
    i64 off = chunk * bits;
    if (off + bits <= nb) {
        if (bits == 8) { *reinterpret_cast<uint2*>(out + off) = make_uint2((u32)acc, (u32)(acc >> 32)); return; }
        if (bits == 4) { *reinterpret_cast<u32*>(out + off) = (u32)acc; return; }
        if (bits == 2) { *reinterpret_cast<unsigned short*>(out + off) = (unsigned short)acc; return; }
    }
    for (int k = 0; k < bits && off + k < nb; ++k) out[off + k] = (u8)(acc >> (8 * k));
}

__device__ __forceinline__ u64 load_chunk(const u8* in, i64 chunk, int bits, i64 nb) {
    i64 off = chunk * bits;
    if (off + bits <= nb && ((((u64)in) & 7u) == 0)) {
        if (bits == 8) { uint2 w = *reinterpret_cast<const uint2*>(in + off); return (u64)w.x | ((u64)w.y << 32); }
        if (bits == 4) return *reinterpret_cast<const u32*>(in + off);
        if (bits == 2) return *reinterpret_cast<const unsigned short*>(in + off);
    }
    u64 acc = 0;
    for (int k = 0; k < bits && off + k < nb; ++k) acc |= (u64)in[off + k] << (8 * k);
    return acc;
}

// ---- deterministic block reductions (fixed tree: same bits on every run) -----------------
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// op: 0 max, 1 min, 2 sum. blockDim.x must be a multiple of 32 (<= 1024). All threads get
// the result. `sh` is 32 floats of shared memory, reusable after the call returns.
__device__ __forceinline__ float block_reduce(float v, int op, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = op == 0 ? warp_max(v) : op == 1 ? warp_min(v) : warp_sum(v);
    __syncthreads();  // `sh` may still be read by a previous call
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float id = op == 0 ? -CT_INF : op == 1 ? CT_INF : 0.f;
    v = lane < nw ? sh[lane] : id;
    return op == 0 ? warp_max(v) : op == 1 ? warp_min(v) : warp_sum(v);
}

// Monotone map fp32 -> u32 (for shared-memory atomicMin/atomicMax on finite floats).
__device__ __forceinline__ u32 fkey(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float funkey(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}
