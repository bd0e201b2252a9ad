// NF4 dequantization (bitsandbytes layout), double-quantized absmax decoded in the same launch.
//
// Algorithm: one thread per 32 consecutive output elements (16 packed bytes). Because every blocksize is a
// power of two >= 32, a thread's 32 elements share one absmax block, so each thread decodes its scale once:
//     absmax = nested_code[a8[b]] * nested_absmax[b >> log2(G)] + offset    (two roundings, never an FMA)
//     w[k]   = code[q_k] * absmax                                           (fp32, then ONE cast)
// (or absmax read as fp32 without double quantization). The result is bit-identical to
// quant.nf4.dequantize_nf4_ref for fp32, fp16 and bf16 outputs.
//
// Layout: data uint8 ((n+1)/2): byte j = element 2j in the HIGH nibble, 2j+1 in the low nibble.
// A full chunk is read with one 16-byte load that skips L1 (read-once stream) and written with 16-byte
// stores (4 for fp16/bf16, 8 for fp32). The last partial chunk, and every chunk when a pointer is not
// 16-byte aligned (vec == 0), takes a scalar path. The arithmetic is written as explicit PTX
// (mul.rn/add.rn/cvt.rn) so NVRTC's fast-math flags cannot fuse, flush or reround it.
//
// Invariants: n < 2^62; blockDim.x >= 16 (the code table is staged in shared memory by the first 16 threads).
// Kernels: nf4_dequant_fp32, nf4_dequant_fp16, nf4_dequant_bf16 (extern "C"; same parameters).

#define NF4_PER_THREAD 32

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

// Two fp32 values -> one 32-bit word of two 16-bit values, `first` at the lower address (little endian).
template <int OUT>
__device__ __forceinline__ unsigned pack2(float first, float second) {
    unsigned d;
    if (OUT == 1) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(second), "f"(first));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(second), "f"(first));
    }
    return d;
}

template <int OUT>
__device__ __forceinline__ unsigned short cvt16(float x) {
    unsigned short d;
    if (OUT == 1) {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(d) : "f"(x));
    } else {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(d) : "f"(x));
    }
    return d;
}

__device__ __forceinline__ uint4 load_stream_16(const unsigned char* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void store_16(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// OUT: 0 = fp32, 1 = fp16, 2 = bf16.
template <int OUT>
__device__ __forceinline__ void nf4_dequant(const unsigned char* __restrict__ data, const void* __restrict__ absmax,
                                            const float* __restrict__ nested_absmax,
                                            const float* __restrict__ nested_code, const float* __restrict__ offset,
                                            const float* __restrict__ code, void* __restrict__ out, long long n,
                                            int log2_blocksize, int log2_nested, int double_quant, int vec) {
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const long long chunk = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long e0 = chunk * NF4_PER_THREAD;
    if (e0 >= n) return;
    const long long blk = e0 >> log2_blocksize;
    float scale;
    if (double_quant) {
        const unsigned a8 = ((const unsigned char*)absmax)[blk];
        scale = add_rn(mul_rn(__ldg(nested_code + a8), __ldg(nested_absmax + (blk >> log2_nested))), __ldg(offset));
    } else {
        scale = __ldg((const float*)absmax + blk);
    }

    if (vec && e0 + NF4_PER_THREAD <= n) {
        const uint4 p = load_stream_16(data + (e0 >> 1));
        const unsigned words[4] = {p.x, p.y, p.z, p.w};
        float v[NF4_PER_THREAD];
#pragma unroll
        for (int w = 0; w < 4; ++w) {
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const unsigned byte = (words[w] >> (8 * b)) & 0xFFu;  // byte 4w+b: elements 8w+2b, 8w+2b+1
                v[8 * w + 2 * b] = mul_rn(s_code[byte >> 4], scale);
                v[8 * w + 2 * b + 1] = mul_rn(s_code[byte & 0xFu], scale);
            }
        }
        if (OUT == 0) {
            float* o = (float*)out + e0;
#pragma unroll
            for (int i = 0; i < NF4_PER_THREAD; i += 4) {
                store_16(o + i, __float_as_uint(v[i]), __float_as_uint(v[i + 1]), __float_as_uint(v[i + 2]),
                         __float_as_uint(v[i + 3]));
            }
        } else {
            unsigned short* o = (unsigned short*)out + e0;
#pragma unroll
            for (int i = 0; i < NF4_PER_THREAD; i += 8) {
                store_16(o + i, pack2<OUT>(v[i], v[i + 1]), pack2<OUT>(v[i + 2], v[i + 3]),
                         pack2<OUT>(v[i + 4], v[i + 5]), pack2<OUT>(v[i + 6], v[i + 7]));
            }
        }
    } else {
        for (int i = 0; i < NF4_PER_THREAD; ++i) {
            const long long e = e0 + i;
            if (e >= n) break;
            const unsigned byte = data[e >> 1];
            const unsigned q = (e & 1) ? (byte & 0xFu) : (byte >> 4);
            const float x = mul_rn(s_code[q], scale);
            if (OUT == 0) {
                ((float*)out)[e] = x;
            } else {
                ((unsigned short*)out)[e] = cvt16<OUT>(x);
            }
        }
    }
}

#define NF4_DEQUANT_KERNEL(NAME, OUT)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                    \
        const unsigned char* __restrict__ data, const void* __restrict__ absmax,                               \
        const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,                        \
        const float* __restrict__ offset, const float* __restrict__ code, void* __restrict__ out, long long n, \
        int log2_blocksize, int log2_nested, int double_quant, int vec) {                                      \
        nf4_dequant<OUT>(data, absmax, nested_absmax, nested_code, offset, code, out, n, log2_blocksize,       \
                         log2_nested, double_quant, vec);                                                      \
    }

NF4_DEQUANT_KERNEL(nf4_dequant_fp32, 0)
NF4_DEQUANT_KERNEL(nf4_dequant_fp16, 1)
NF4_DEQUANT_KERNEL(nf4_dequant_bf16, 2)
