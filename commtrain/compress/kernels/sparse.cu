// Top-k / random-k payload packing: [values: k x value dtype][indices: k x index dtype], the
// gather x[idx], the value cast and the index narrowing fused into one pass (one thread per
// kept element). Casts match torch on CUDA: fp16 and bf16 round to nearest even through the
// same PTX conversions torch's __float2half / __float2bfloat16 use.
#include "common.cuh"

__device__ __forceinline__ unsigned short f32_to_f16_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));  // sm_80+
    return h;
}

// vcode: 0 fp32, 1 fp16, 2 bf16 values; isize: 2 (uint16) or 4 (int32) byte indices.
template <int DT>
__device__ __forceinline__ void sparse_pack(const typename In<DT>::T* x, const i64* idx, i64 k, int vcode, int isize,
                                            u8* payload) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= k) return;
    i64 j = idx[i];
    float v = In<DT>::cvt(x[j]);
    const int vsize = vcode == 0 ? 4 : 2;
    if (vcode == 0) reinterpret_cast<float*>(payload)[i] = v;
    else reinterpret_cast<unsigned short*>(payload)[i] = vcode == 1 ? f32_to_f16_bits(v) : f32_to_bf16_bits(v);
    u8* ip = payload + k * vsize + i * isize;  // may be unaligned (k odd, 2-byte values)
    u32 jj = (u32)j;
    if (isize == 4) st_u32(ip, jj);
    else { ip[0] = (u8)jj; ip[1] = (u8)(jj >> 8); }
}

#define SPARSE_ENTRIES(SUF, DT)                                                                                \
    extern "C" __global__ void sparse_pack_##SUF(const In<DT>::T* x, const i64* idx, i64 k, int vcode,         \
                                                 int isize, u8* payload) {                                     \
        sparse_pack<DT>(x, idx, k, vcode, isize, payload);                                                     \
    }

SPARSE_ENTRIES(f32, 0)
SPARSE_ENTRIES(f16, 1)
SPARSE_ENTRIES(bf16, 2)
