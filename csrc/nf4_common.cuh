// Shared by the NF4 kernels (inlined by csrc.source at each `#include "nf4_common.cuh"`). No headers: NVRTC
// compiles without the CUDA include tree, so the vector type and the conversions are spelled out (explicit PTX,
// which NVRTC's fast-math flags cannot fuse, flush or reround).

struct alignas(16) U32x4 {
    unsigned x, y, z, w;
};

__device__ __forceinline__ unsigned f32_bits(float x) {
    unsigned d;
    asm("mov.b32 %0, %1;" : "=r"(d) : "f"(x));
    return d;
}

__device__ __forceinline__ float bits_f32(unsigned u) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(u));
    return f;
}

__device__ __forceinline__ float mul_rn(float a, float b) {
    float d;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

__device__ __forceinline__ float add_rn(float a, float b) {
    float d;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
    return d;
}

// 16-bit float types by tag, as every NF4 kernel numbers them: 1 = float16, 2 = bfloat16 (0 = float32 where a
// kernel also takes that). Conversions are explicit PTX: round to nearest even, no flush.

// Two fp32 values -> one 32-bit word of two 16-bit values, `first` at the lower address (little endian).
template <int T>
__device__ __forceinline__ unsigned pack2(float first, float second) {
    unsigned d;
    if (T == 1) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(second), "f"(first));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(second), "f"(first));
    }
    return d;
}

template <int T>
__device__ __forceinline__ unsigned short cvt16(float x) {
    unsigned short d;
    if (T == 1) {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(d) : "f"(x));
    } else {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(x));
    }
    return d;
}

template <int T>
__device__ __forceinline__ float half_to_f32(unsigned short h) {
    if (T == 2) return bits_f32((unsigned)h << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// 16 bytes of a read-once stream (the packed codes): skips L1.
__device__ __forceinline__ U32x4 load_stream_16(const unsigned char* p) {
    U32x4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// The fp32 scale of quantization block `blk`: decoded from the double quantization (absmax as uint8 codes,
// nested_code[a8] * nested_absmax[blk >> log2_nested] + offset, two roundings, never an FMA), or read as fp32.
__device__ __forceinline__ float decode_scale(const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                                              const float* __restrict__ nested_code, const float* __restrict__ offset,
                                              long long blk, int log2_nested, int double_quant) {
    if (double_quant) {
        const unsigned a8 = ((const unsigned char*)absmax)[blk];
        return add_rn(mul_rn(nested_code[a8], nested_absmax[blk >> log2_nested]), *offset);
    }
    return ((const float*)absmax)[blk];
}
