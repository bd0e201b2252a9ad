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

// 16 bytes of a read-once stream (the packed codes): skips L1.
__device__ __forceinline__ U32x4 load_stream_16(const unsigned char* p) {
    U32x4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
