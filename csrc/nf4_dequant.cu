// NF4 dequantization (bitsandbytes layout), double-quantized absmax decoded in the same launch.
//
// Algorithm: one warp per chunk of U x 1024 consecutive output elements (U x 512 packed bytes, U 16-byte loads
// per lane in flight), chunks walked grid-stride; details at nf4_dequant below. Every blocksize is a power of two >= 32, so 8 or 32 consecutive elements never straddle
// a block, and each block's scale is decoded once per warp:
//     absmax = nested_code[a8[b]] * nested_absmax[b >> log2(G)] + offset    (two roundings, never an FMA)
//     w[k]   = code[q_k] * absmax                                           (fp32, then ONE cast)
// (or absmax read as fp32 without double quantization). The result is bit-identical to
// quant.nf4.dequantize_nf4_ref for fp32, fp16 and bf16 outputs.
//
// Layout: data uint8 ((n+1)/2): byte j = element 2j in the HIGH nibble, 2j+1 in the low nibble.
// A full warp range is read with one 16-byte load per lane that skips L1 (read-once stream) and written with
// warp-contiguous 16-byte stores (4 per lane for fp16/bf16, 8 for fp32). The last partial range, and every
// range when a pointer is not 16-byte aligned (vec == 0), takes a scalar path. The arithmetic is written as explicit PTX
// (mul.rn/add.rn/cvt.rn) so NVRTC's fast-math flags cannot fuse, flush or reround it.
//
// Invariants: n < 2^62; 32 <= blockDim.x <= 256, a multiple of 32 (the code table is staged by the first 16
// threads; the transpose buffer holds 8 warps).
// Kernels: nf4_dequant_{fp32,fp16,bf16}_u{1,2,4} (extern "C"; same parameters; U = loads in flight per lane).

#include "nf4_common.cuh"

__device__ __forceinline__ void store_16(void* p, unsigned a, unsigned b, unsigned c, unsigned d) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// 8 elements (one packed 32-bit word, bytes in memory order) -> 16 or 32 output bytes at `o`.
template <int OUT>
__device__ __forceinline__ void store8(void* o, unsigned word, float scale, const float* s_code) {
    float v[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const unsigned byte = (word >> (8 * b)) & 0xFFu;  // byte b: element 2b (high nibble), 2b+1 (low)
        v[2 * b] = mul_rn(s_code[byte >> 4], scale);
        v[2 * b + 1] = mul_rn(s_code[byte & 0xFu], scale);
    }
    if (OUT == 0) {
        store_16(o, f32_bits(v[0]), f32_bits(v[1]), f32_bits(v[2]), f32_bits(v[3]));
        store_16((float*)o + 4, f32_bits(v[4]), f32_bits(v[5]), f32_bits(v[6]),
                 f32_bits(v[7]));
    } else {
        store_16(o, pack2<OUT>(v[0], v[1]), pack2<OUT>(v[2], v[3]), pack2<OUT>(v[4], v[5]), pack2<OUT>(v[6], v[7]));
    }
}

// OUT: 0 = fp32, 1 = fp16, 2 = bf16. U: 1024-element ranges a warp loads before decoding any (bytes in flight).
// Work split: a warp's chunk is U * WARP_ELEMS consecutive elements (U * 512 packed bytes); warps walk the chunks
// grid-stride, so the launcher may size the grid to the card. When a whole chunk is inside n and the pointers
// are 16-byte aligned (warp-uniform), lane t issues U 16-byte loads (range u: packed bytes [16t, 16t+16) of
// that range) before anything else, the warp transposes them through shared memory, and at step s lane t
// decodes word 32s+t of each range (8 elements) and stores it with one 16-byte store (fp16/bf16): every load
// and store instruction of the warp then covers one contiguous span. The absmax of the blocks in each range is
// decoded once by the first lanes and handed around with shuffles. Chunks that are not whole (the tail) and
// unaligned pointers take a scalar path.
#define WARP_ELEMS 1024
template <int OUT, int U>
__device__ __forceinline__ void nf4_dequant(const unsigned char* __restrict__ data, const void* __restrict__ absmax,
                                            const float* __restrict__ nested_absmax,
                                            const float* __restrict__ nested_code, const float* __restrict__ offset,
                                            const float* __restrict__ code, void* __restrict__ out, long long n,
                                            int log2_blocksize, int log2_nested, int double_quant, int vec) {
    __shared__ float s_code[16];
    __shared__ U32x4 s_packed[8][32 * U];  // per warp: its U * 512 packed bytes (blockDim.x <= 256)
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long chunk_elems = (long long)U * WARP_ELEMS;
    const long long warps_total = (long long)gridDim.x * (blockDim.x >> 5);
    const long long nblocks = (n + (1LL << log2_blocksize) - 1) >> log2_blocksize;
    // Lane l holds the scale of the l-th block of each range (1024 / blocksize of them, at least 1).
    const int range_blocks = log2_blocksize >= 10 ? 1 : (WARP_ELEMS >> log2_blocksize);

    for (long long chunk = (long long)blockIdx.x * (blockDim.x >> 5) + warp; chunk * chunk_elems < n;
         chunk += warps_total) {
        const long long base = chunk * chunk_elems;
        if (vec && base + chunk_elems <= n) {
            U32x4 p[U];
#pragma unroll
            for (int u = 0; u < U; ++u) p[u] = load_stream_16(data + (base >> 1) + 512 * u + 16 * lane);
            float my_scale[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const long long my_blk = ((base + (long long)WARP_ELEMS * u) >> log2_blocksize) + lane;
                my_scale[u] = (lane < range_blocks && my_blk < nblocks)
                                  ? decode_scale(absmax, nested_absmax, nested_code, offset, my_blk, log2_nested,
                                                 double_quant)
                                  : 0.f;
            }
            __syncwarp();  // the previous chunk's reads of s_packed are done
#pragma unroll
            for (int u = 0; u < U; ++u) s_packed[warp][32 * u + lane] = p[u];
            __syncwarp();
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const int c = 32 * s + lane;                // word within the range: elements 8c..8c+7
                    const int src = (8 * c) >> log2_blocksize;  // which of the range's blocks (0 if blocksize >= 1024)
                    const float scale = __shfl_sync(0xFFFFFFFFu, my_scale[u], src);
                    const unsigned word = ((const unsigned*)&s_packed[warp][32 * u])[c];
                    char* o = (char*)out + (base + (long long)WARP_ELEMS * u + 8LL * c) * (OUT == 0 ? 4 : 2);
                    store8<OUT>(o, word, scale, s_code);
                }
            }
            continue;
        }

        // Scalar path: in range u, lane t handles elements [base + 1024u + 32t, +32) one by one.
#pragma unroll 1
        for (int u = 0; u < U; ++u) {
            const long long e0 = base + (long long)WARP_ELEMS * u + 32LL * lane;
            if (e0 >= n) break;
            const float scale = decode_scale(absmax, nested_absmax, nested_code, offset, e0 >> log2_blocksize,
                                             log2_nested, double_quant);  // 32 | blocksize: one block per lane
            for (int i = 0; i < 32; ++i) {
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
}

#define NF4_DEQUANT_KERNEL(NAME, OUT, U)                                                                       \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                    \
        const unsigned char* __restrict__ data, const void* __restrict__ absmax,                               \
        const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,                        \
        const float* __restrict__ offset, const float* __restrict__ code, void* __restrict__ out, long long n, \
        int log2_blocksize, int log2_nested, int double_quant, int vec) {                                      \
        nf4_dequant<OUT, U>(data, absmax, nested_absmax, nested_code, offset, code, out, n, log2_blocksize,    \
                            log2_nested, double_quant, vec);                                                   \
    }

NF4_DEQUANT_KERNEL(nf4_dequant_fp32_u1, 0, 1)
NF4_DEQUANT_KERNEL(nf4_dequant_fp16_u1, 1, 1)
NF4_DEQUANT_KERNEL(nf4_dequant_bf16_u1, 2, 1)
NF4_DEQUANT_KERNEL(nf4_dequant_fp32_u2, 0, 2)
NF4_DEQUANT_KERNEL(nf4_dequant_fp16_u2, 1, 2)
NF4_DEQUANT_KERNEL(nf4_dequant_bf16_u2, 2, 2)
NF4_DEQUANT_KERNEL(nf4_dequant_fp32_u4, 0, 4)
NF4_DEQUANT_KERNEL(nf4_dequant_fp16_u4, 1, 4)
NF4_DEQUANT_KERNEL(nf4_dequant_bf16_u4, 2, 4)
