// NF4 GEMV for few rows of x (decode, M <= 8): y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), W never written out.
//
// W (N, K) is NF4 in bitsandbytes' layout (quant/nf4.py): element e = n*K + k of the flattened weight is the HIGH
// nibble of byte e/2 when e is even, the low nibble when odd; its scale is absmax[e >> log2(blocksize)], decoded
// from the double quantization as  nested_code[a8] * nested_absmax[blk >> log2(nested)] + offset  (two roundings).
// W[n, k] = code[q] * scale in fp32 (NOT rounded to x's dtype: the product is formed in fp32, so the result is
// at least as close to x @ dequant_fp32(W)^T as F.linear(x, dequant(W, x.dtype)) is); accumulation is fp32.
//
// Work split: block b owns the R output features n0 = b*R .. n0+R-1 for all M rows of x; its W warps split K.
// K is cut into 1024-element chunks (512 packed bytes per weight row); chunk c goes to warp c % W, and within a
// chunk lane t owns elements [32t, 32t+32): one 16-byte streaming load (L1::no_allocate: read once) per weight
// row, one scale per row (32 | blocksize, so 32 elements aligned to 32 never straddle a block), and 8 x values per
// row of x at a time through L1 (x is re-read by every block, so it should stay in L1 while the weight streams
// past). The next chunk's weight bytes and absmax are loaded before the current chunk is multiplied (two stages).
// Per 8 elements: p = sum code[q] * x (FMA), then acc = scale * p + acc, so the scale costs one FMA per 8.
// The code table and the 256-entry nested map live in shared memory (16 distinct words: conflict-free lookups).
// At the end each lane holds R*MT partial sums; a reduce-scatter butterfly over the warp (R*MT/2 + ... + 1
// shuffles rather than 5 * R*MT) leaves one total per lane group, the W warps' totals are summed through shared
// memory, and R*MT threads add the bias, cast once and store.
//
// vec = 1 (host-checked): K % 32 == 0 and the data, x rows and x row stride 16-byte aligned. Otherwise a scalar
// path reads every element on its own (any K, any alignment, blocks straddling rows) -- correct, not fast.
//
// Template parameters: XT = x / y / bias dtype (0 fp32, 1 fp16, 2 bf16); MT = rows of x handled (M <= MT; rows
// past M read as zero and are not stored); R = weight rows per block. R * MT <= 32 and both powers of two.
// Invariants: blockDim.x = 32 * W with W <= 8; n*K < 2^62.
// Kernels: nf4_gemv_x{XT}_m{MT}_r{R} (extern "C"). The loader compiles one instantiation per module with
// -DGEMV_XT=.. -DGEMV_MT=.. -DGEMV_R=..; without those defines a representative set is compiled (nvcc check).

#include "nf4_common.cuh"

__device__ __forceinline__ U32x4 ld_cached_16(const void* p) {
    U32x4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// One 32-bit word of two 16-bit values (lower address = low half) -> two floats.
template <int XT>
__device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
    if (XT == 2) {  // bf16: the upper 16 bits of an fp32
        lo = bits_f32(w << 16);
        hi = bits_f32(w & 0xFFFF0000u);
    } else {
        asm("{ .reg .b16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
            : "=f"(lo), "=f"(hi) : "r"(w));
    }
}

// x[k .. k+8) of one row as fp32 (16-byte aligned loads: one for 16-bit dtypes, two for fp32).
template <int XT>
__device__ __forceinline__ void load_x8(const void* row, long long k, float (&f)[8]) {
    if (XT == 0) {
        const U32x4 a = ld_cached_16((const float*)row + k);
        const U32x4 b = ld_cached_16((const float*)row + k + 4);
        f[0] = bits_f32(a.x); f[1] = bits_f32(a.y); f[2] = bits_f32(a.z); f[3] = bits_f32(a.w);
        f[4] = bits_f32(b.x); f[5] = bits_f32(b.y); f[6] = bits_f32(b.z); f[7] = bits_f32(b.w);
    } else {
        const U32x4 a = ld_cached_16((const unsigned short*)row + k);
        unpack2<XT>(a.x, f[0], f[1]);
        unpack2<XT>(a.y, f[2], f[3]);
        unpack2<XT>(a.z, f[4], f[5]);
        unpack2<XT>(a.w, f[6], f[7]);
    }
}

template <int XT>
__device__ __forceinline__ float load1(const void* p, long long i) {
    if (XT == 0) return ((const float*)p)[i];
    return half_to_f32<XT>(((const unsigned short*)p)[i]);
}

template <int XT>
__device__ __forceinline__ void store1(void* p, long long i, float v) {
    if (XT == 0) {
        ((float*)p)[i] = v;
    } else {
        ((unsigned short*)p)[i] = cvt16<XT>(v);
    }
}

__device__ __forceinline__ unsigned word_of(const U32x4& v, int s) {
    return s == 0 ? v.x : s == 1 ? v.y : s == 2 ? v.z : v.w;
}

// One reduce-scatter step over V values per lane, S of them kept: lanes whose bit (32 * S / V) is set keep (and
// receive the partner's copy of) the upper half v[S..2S), the others the lower half; the kept half lands in v[0..S).
template <int V, int S>
__device__ __forceinline__ void halve(float (&v)[V], int lane) {
    constexpr int mask = 32 * S / V;
    const bool upper = (lane & mask) != 0;
#pragma unroll
    for (int i = 0; i < S; ++i) {
        const float send = upper ? v[i] : v[i + S];
        const float keep = upper ? v[i + S] : v[i];
        v[i] = keep + __shfl_xor_sync(0xFFFFFFFFu, send, mask);
    }
}

// Sum v[i] over the warp for every i, leaving the total of value (lane / (32 / V)) in v[0]: V-1 shuffles for the
// halving steps (all indices compile-time, so v stays in registers), then 5 - log2(V) for the rest.
template <int V>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[V], int lane) {
    if constexpr (V >= 32) halve<V, 16>(v, lane);
    if constexpr (V >= 16) halve<V, 8>(v, lane);
    if constexpr (V >= 8) halve<V, 4>(v, lane);
    if constexpr (V >= 4) halve<V, 2>(v, lane);
    if constexpr (V >= 2) halve<V, 1>(v, lane);
#pragma unroll
    for (int mk = 16 / V; mk >= 1; mk >>= 1) v[0] += __shfl_xor_sync(0xFFFFFFFFu, v[0], mk);
    return v[0];
}

// What one lane loads for one chunk before it multiplies: R 16-byte weight words and the raw scale inputs.
template <int R>
struct Stage {
    U32x4 w[R];
    unsigned a8[R];
    float s2[R];  // nested absmax (double quantization) or the fp32 absmax itself
};

template <int R>
__device__ __forceinline__ void load_stage(Stage<R>& st, const unsigned char* __restrict__ data,
                                           const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                                           long long n0, int N, int K, int k, int log2_bs, int log2_nested,
                                           int double_quant) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        st.w[r] = U32x4{0u, 0u, 0u, 0u};
        st.a8[r] = 0u;
        st.s2[r] = 0.f;
        if (n0 + r < N && k < K) {
            const long long e = (n0 + r) * (long long)K + k;
            const long long blk = e >> log2_bs;
            st.w[r] = load_stream_16(data + (e >> 1));
            if (double_quant) {
                st.a8[r] = ((const unsigned char*)absmax)[blk];
                st.s2[r] = nested_absmax[blk >> log2_nested];
            } else {
                st.s2[r] = ((const float*)absmax)[blk];
            }
        }
    }
}

template <int XT, int MT, int R>
__device__ __forceinline__ void nf4_gemv(const void* __restrict__ x, const unsigned char* __restrict__ data,
                                         const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                                         const float* __restrict__ nested_code, const float* __restrict__ offset,
                                         const float* __restrict__ code, const void* __restrict__ bias,
                                         void* __restrict__ y, int M, int N, int K, long long stride_xm, int log2_bs,
                                         int log2_nested, int double_quant, int has_bias, int vec) {
    constexpr int V = R * MT;
    static_assert(V <= 32 && (V & (V - 1)) == 0, "R * MT must be a power of two <= 32");
    __shared__ float s_code[16];
    __shared__ float s_ncode[256];
    __shared__ float s_red[8][V];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    if (tid < 16) s_code[tid] = code[tid];
    if (double_quant)
        for (int i = tid; i < 256; i += blockDim.x) s_ncode[i] = nested_code[i];
    const float off = double_quant ? *offset : 0.f;
    __syncthreads();

    const long long n0 = (long long)blockIdx.x * R;
    const int nchunks = (K + 1023) >> 10;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;

    if (vec) {
        Stage<R> cur, nxt;
        int c = warp;
        if (c < nchunks)
            load_stage<R>(cur, data, absmax, nested_absmax, n0, N, K, (c << 10) + (lane << 5), log2_bs, log2_nested,
                          double_quant);
        for (; c < nchunks; c += nwarps) {
            const int k = (c << 10) + (lane << 5);  // this lane's 32 elements: [k, k + 32)
            if (c + nwarps < nchunks)                // two stages: the next chunk's bytes are in flight meanwhile
                load_stage<R>(nxt, data, absmax, nested_absmax, n0, N, K, k + (nwarps << 10), log2_bs, log2_nested,
                              double_quant);
            if (k < K) {
                float sc[R];
#pragma unroll
                for (int r = 0; r < R; ++r)
                    sc[r] = double_quant ? add_rn(mul_rn(s_ncode[cur.a8[r]], cur.s2[r]), off) : cur.s2[r];
#pragma unroll
                for (int s = 0; s < 4; ++s) {  // 8 elements per step: one 32-bit word of each weight row
                    float xv[MT][8];
#pragma unroll
                    for (int m = 0; m < MT; ++m) {
                        if (m < M) {
                            load_x8<XT>((const char*)x + (long long)m * stride_xm * (XT == 0 ? 4 : 2), k + 8 * s,
                                        xv[m]);
                        } else {
#pragma unroll
                            for (int j = 0; j < 8; ++j) xv[m][j] = 0.f;
                        }
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const unsigned word = word_of(cur.w[r], s);
                        float p[MT];
#pragma unroll
                        for (int b = 0; b < 4; ++b) {  // byte b: element 2b (high nibble), 2b+1 (low nibble)
                            const float w0 = s_code[(word >> (8 * b + 4)) & 0xFu];
                            const float w1 = s_code[(word >> (8 * b)) & 0xFu];
#pragma unroll
                            for (int m = 0; m < MT; ++m) {
                                p[m] = b == 0 ? w0 * xv[m][0] : fmaf(w0, xv[m][2 * b], p[m]);
                                p[m] = fmaf(w1, xv[m][2 * b + 1], p[m]);
                            }
                        }
#pragma unroll
                        for (int m = 0; m < MT; ++m) acc[r][m] = fmaf(sc[r], p[m], acc[r][m]);
                    }
                }
            }
            cur = nxt;
        }
    } else {
        // Scalar path: lane t takes elements k = 1024c + t + 32i of each row, decoding each one on its own.
        for (int c = warp; c < nchunks; c += nwarps) {
            for (int i = 0; i < 32; ++i) {
                const int k = (c << 10) + lane + 32 * i;
                if (k >= K) break;
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (n0 + r >= N) continue;
                    const long long e = (n0 + r) * (long long)K + k;
                    const long long blk = e >> log2_bs;
                    const float scale =
                        double_quant
                            ? add_rn(mul_rn(s_ncode[((const unsigned char*)absmax)[blk]], nested_absmax[blk >> log2_nested]),
                                     off)
                            : ((const float*)absmax)[blk];
                    const unsigned byte = data[e >> 1];
                    const float w = s_code[(e & 1) ? (byte & 0xFu) : (byte >> 4)] * scale;
#pragma unroll
                    for (int m = 0; m < MT; ++m)
                        if (m < M) acc[r][m] = fmaf(w, load1<XT>(x, (long long)m * stride_xm + k), acc[r][m]);
                }
            }
        }
    }

    float v[V];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) v[r * MT + m] = acc[r][m];
    const float total = warp_reduce_scatter<V>(v, lane);
    constexpr int GROUP = 32 / V;  // lanes holding the same total
    if ((lane & (GROUP - 1)) == 0) s_red[warp][lane / GROUP] = total;
    __syncthreads();
    if (tid < V) {
        float sum = 0.f;
        for (int w = 0; w < nwarps; ++w) sum += s_red[w][tid];
        const int r = tid / MT, m = tid % MT;
        const long long n = n0 + r;
        if (m < M && n < N) {
            if (has_bias) sum += load1<XT>(bias, n);
            store1<XT>(y, (long long)m * N + n, sum);
        }
    }
}

#define NF4_GEMV_KERNEL(XT, MT, R)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) nf4_gemv_x##XT##_m##MT##_r##R(                                \
        const void* __restrict__ x, const unsigned char* __restrict__ data, const void* __restrict__ absmax,       \
        const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,                            \
        const float* __restrict__ offset, const float* __restrict__ code, const void* __restrict__ bias,           \
        void* __restrict__ y, int M, int N, int K, long long stride_xm, int log2_bs, int log2_nested,              \
        int double_quant, int has_bias, int vec) {                                                                 \
        nf4_gemv<XT, MT, R>(x, data, absmax, nested_absmax, nested_code, offset, code, bias, y, M, N, K, stride_xm, \
                            log2_bs, log2_nested, double_quant, has_bias, vec);                                    \
    }
#define NF4_GEMV_KERNEL_EXPAND(XT, MT, R) NF4_GEMV_KERNEL(XT, MT, R)

#if defined(GEMV_XT) && defined(GEMV_MT) && defined(GEMV_R)
NF4_GEMV_KERNEL_EXPAND(GEMV_XT, GEMV_MT, GEMV_R)
#else  // the nvcc compile check: every dtype, and 4, 16 and 32 accumulators per lane
NF4_GEMV_KERNEL(2, 1, 4)
NF4_GEMV_KERNEL(1, 8, 2)
NF4_GEMV_KERNEL(0, 4, 8)
#endif
