// NF4 matmul on tensor cores for small M (M <= 16 * MT, short sequences and batched decode):
//     y[m, n] = sum_k x[m, k] * W[n, k]  (+ bias[n]),   W[n, k] = cast_x(code[q(n, k)] * scale(n, k))
// W is rounded to x's dtype exactly as dequantize_nf4_ref(q, x.dtype) rounds it (fp32 product, one RNE cast), so the
// result is F.linear(x, dequant(W, x.dtype)) up to the order of the fp32 accumulation. W is read once, 4.1 bits per
// weight, and never written out; x (M x K) is re-read from L2 by every block (cp.async.cg into shared memory).
//
// Layout (quant/nf4.py): element e = n*K + k of the flattened weight is the HIGH nibble of byte e/2 when e is even,
// the low nibble when odd; its scale is absmax[e >> log2_bs], with double quantization
//     nested_code[a8] * nested_absmax[blk >> log2_nested] + offset      (two roundings, as the reference).
//
// MMA: mma.sync m16n8k16 (A = x rows, B = W^T, fp32 accumulators). The reduction index k may be permuted freely as
// long as A and B use the same permutation, so each lane feeds the fragment from its OWN 32 contiguous elements of a
// weight row: lane (g = lane/4, t = lane%4) of a warp owns row n = n_w + 8j + g (j < NT) and elements
// [k0 + 32t, k0 + 32t + 32) of every 128-element step k0: one 16-byte streaming load per row per step, one scale
// (blocksize >= 32: 32 aligned elements never straddle a block). Sub-step s (0..7) uses elements 4s..4s+3 of those
// 32: fragment positions (2t, 2t+1) <- elements (4s, 4s+1), (2t+8, 2t+9) <- (4s+2, 4s+3); the A fragment takes the
// same elements of x, which are 8 bytes of the lane's own 64-byte slice of an x row. So W needs no shared memory and
// no exchange between lanes; x comes through shared memory (below), the 16-entry code table (16 distinct banks:
// conflict-free) and the 256-entry nested map too. The next step's weight bytes, scale inputs and x tile are loaded
// before the current step is multiplied (two stages: registers for W, cp.async into shared memory for x).
//
// Work split: a block of WARPS warps covers BLOCK_N = 8 * NT * WARPS output features (warps side by side along N share
// each x tile); gridDim.y splits K into contiguous ranges of whole steps. With splits > 1 each block writes its
// fp32 partial tile to ws[split][m][n], then (barrier, one acq_rel atomic per block on a per-tile counter) the last
// block of a tile to arrive sums the splits in split order (deterministic), adds the bias, casts once and stores y,
// then resets the counter to 0 for the next launch that uses the same counters.
//
// Requirements (host-checked): x fp16/bf16 with 16-byte aligned rows; K % 128 == 0; blocksize a power of two >= 32;
// data 16-byte aligned; M <= 16 * MT. Bytes read: N*K/2 + N*K/blocksize (+ nested) + M*K*2 per block column; written:
// M*N*2 (+ 8*splits*M*N through L2 for the partial sums).
// Kernels: nf4_mma_x{XT}_m{MT} (XT 1 fp16, 2 bf16), one instantiation per module through -DMMA_XT=.. -DMMA_MT=..;
// without those defines a representative set is compiled (the nvcc check).

#include "nf4_common.cuh"

constexpr int MMA_NT = 4;                               // n8 tiles per warp: 32 output features
constexpr int MMA_WARPS = 4;                            // warps per block, side by side along N
constexpr int MMA_BLOCK_N = 8 * MMA_NT * MMA_WARPS;     // 128 output features per block
constexpr int MMA_K_STEP = 128;                         // elements of K per step: 4 lanes x 32

// x goes through shared memory: each step's (16 * MT rows) x 128 elements are copied in with cp.async (16-byte
// chunks, zero-filled past M), two stages, laid out so that a lane's 16-byte fragment read is conflict-free: chunk
// (t, v) of a row (elements 32t + 8v .. +8 of the step) sits at unit row * X_ROW + 4v + t (X_ROW = 20 units: the
// 4-unit pad puts rows g and g + 1 in different bank groups).
constexpr int X_ROW = 20;  // 16-byte units per x row in shared memory (16 + 4 pad)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned)a;
}

__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int bytes) {  // bytes 0: zero fill
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ float ld_cg_f32(const float* p) {  // L2 only: partial sums written by other blocks
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ unsigned word4(const U32x4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <int XT>
__device__ __forceinline__ void mma_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
    if (XT == 2) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// y[i] = v (+ bias[n]) rounded once to x's type.
template <int XT>
__device__ __forceinline__ void mma_store_y(unsigned short* __restrict__ y, const unsigned short* __restrict__ bias,
                                            int has_bias, long long i, long long n, float v) {
    if (has_bias) v += half_to_f32<XT>(bias[n]);
    y[i] = cvt16<XT>(v);
}

// One step's weight words and raw scale inputs for the lane's NT rows.
struct MmaStage {
    U32x4 w[MMA_NT];
    unsigned a8[MMA_NT];
    float s2[MMA_NT];  // nested absmax (double quantization) or the fp32 absmax itself
};

__device__ __forceinline__ void mma_load_stage(MmaStage& st, const unsigned char* __restrict__ data,
                                               const void* __restrict__ absmax,
                                               const float* __restrict__ nested_absmax, long long row0, int N,
                                               int K, int k, int log2_bs, int log2_nested, int double_quant) {
#pragma unroll
    for (int j = 0; j < MMA_NT; ++j) {
        const long long n = row0 + 8 * j;
        st.w[j] = U32x4{0u, 0u, 0u, 0u};
        st.a8[j] = 0u;
        st.s2[j] = 0.f;
        if (n < N) {
            const long long e = n * (long long)K + k;
            const long long blk = e >> log2_bs;
            st.w[j] = load_stream_16(data + (e >> 1));
            if (double_quant) {
                st.a8[j] = ((const unsigned char*)absmax)[blk];
                st.s2[j] = nested_absmax[blk >> log2_nested];
            } else {
                st.s2[j] = ((const float*)absmax)[blk];
            }
        }
    }
}

// One step's x tile into shared memory: (16 * MT) rows x 16 chunks of 16 bytes, the block's threads side by side.
template <int MT>
__device__ __forceinline__ void mma_load_x(U32x4* xs, const unsigned short* __restrict__ x, int M, long long stride_xm,
                                           int k0, int tid) {
#pragma unroll
    for (int u = tid; u < 16 * MT * 16; u += 32 * MMA_WARPS) {
        const int row = u >> 4, c = u & 15;  // chunk c = 4t + v: elements 8c .. 8c + 8 of the step
        const bool ok = row < M;
        const unsigned short* src = x + (long long)(ok ? row : 0) * stride_xm + k0 + 8 * c;
        cp_async_16(smem_addr(xs + row * X_ROW + 4 * (c & 3) + (c >> 2)), src, ok ? 16 : 0);
    }
}

template <int XT, int MT>
__device__ __forceinline__ void nf4_mma(const unsigned short* __restrict__ x, const unsigned char* __restrict__ data,
                                        const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                                        const float* __restrict__ nested_code, const float* __restrict__ offset,
                                        const float* __restrict__ code, const unsigned short* __restrict__ bias,
                                        unsigned short* __restrict__ y, float* __restrict__ ws,
                                        int* __restrict__ counters, int M, int N, int K, long long stride_xm,
                                        int log2_bs, int log2_nested, int double_quant, int has_bias) {
    __shared__ float s_code[16];
    __shared__ float s_ncode[256];
    __shared__ int s_last;
    __shared__ U32x4 s_x[2][16 * MT * X_ROW];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    if (tid < 16) s_code[tid] = code[tid];
    if (double_quant)
        for (int i = tid; i < 256; i += blockDim.x) s_ncode[i] = nested_code[i];
    const float off = double_quant ? *offset : 0.f;
    __syncthreads();

    const int splits = gridDim.y, z = blockIdx.y;
    const int steps = K / MMA_K_STEP;
    const int s_begin = (int)((long long)steps * z / splits);
    const int s_end = (int)((long long)steps * (z + 1) / splits);
    const long long n_warp = (long long)blockIdx.x * MMA_BLOCK_N + warp * (8 * MMA_NT);
    const long long row0 = n_warp + g;  // this lane's weight rows: row0 + 8j

    float acc[MT][MMA_NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < MMA_NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    MmaStage cur, nxt;
    if (s_begin < s_end) {
        mma_load_x<MT>(s_x[0], x, M, stride_xm, s_begin * MMA_K_STEP, tid);
        cp_async_commit();
        mma_load_stage(cur, data, absmax, nested_absmax, row0, N, K, s_begin * MMA_K_STEP + 32 * t, log2_bs,
                       log2_nested, double_quant);
    }
    for (int st = s_begin; st < s_end; ++st) {
        const int k = st * MMA_K_STEP + 32 * t;  // this lane's 32 elements: [k, k + 32)
        const U32x4* xs = s_x[(st - s_begin) & 1];
        if (st + 1 < s_end) {
            mma_load_x<MT>(s_x[(st + 1 - s_begin) & 1], x, M, stride_xm, (st + 1) * MMA_K_STEP, tid);
            cp_async_commit();
            mma_load_stage(nxt, data, absmax, nested_absmax, row0, N, K, k + MMA_K_STEP, log2_bs, log2_nested,
                           double_quant);
            cp_async_wait<1>();  // this step's x tile has landed (the next one may still be in flight)
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        float sc[MMA_NT];
#pragma unroll
        for (int j = 0; j < MMA_NT; ++j)
            sc[j] = double_quant ? add_rn(mul_rn(s_ncode[cur.a8[j]], cur.s2[j]), off) : cur.s2[j];
#pragma unroll
        for (int v = 0; v < 4; ++v) {  // x elements k + 8v .. k + 8v + 8: sub-steps s = 2v, 2v + 1
            U32x4 xa[MT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int r = 0; r < 2; ++r) xa[i][r] = xs[(16 * i + g + 8 * r) * X_ROW + 4 * v + t];
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // sub-step s = 2v + h: elements 4s .. 4s + 3 = bytes 2s, 2s + 1
#pragma unroll
                for (int j = 0; j < MMA_NT; ++j) {
                    const unsigned hw = (word4(cur.w[j], v) >> (16 * h)) & 0xFFFFu;
                    const float w0 = mul_rn(s_code[(hw >> 4) & 0xFu], sc[j]);   // element 4s   (byte 2s, high)
                    const float w1 = mul_rn(s_code[hw & 0xFu], sc[j]);          // element 4s+1 (byte 2s, low)
                    const float w2 = mul_rn(s_code[(hw >> 12) & 0xFu], sc[j]);  // element 4s+2 (byte 2s+1, high)
                    const float w3 = mul_rn(s_code[(hw >> 8) & 0xFu], sc[j]);   // element 4s+3 (byte 2s+1, low)
                    const unsigned b0 = pack2<XT>(w0, w1), b1 = pack2<XT>(w2, w3);
#pragma unroll
                    for (int i = 0; i < MT; ++i)
                        mma_16816<XT>(acc[i][j], word4(xa[i][0], 2 * h), word4(xa[i][1], 2 * h),
                                      word4(xa[i][0], 2 * h + 1), word4(xa[i][1], 2 * h + 1), b0, b1);
                }
            }
        }
        __syncthreads();  // every warp is done with this x tile before the step after next overwrites it
        cur = nxt;
    }

    // acc[i][j][e]: row m = 16i + g + 8 * (e >> 1), feature n = n_warp + 8j + 2t + (e & 1). One split: the result;
    // several: this split's partial sums, reduced below by the tile's last block.
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < MMA_NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 16 * i + g + 8 * (e >> 1);
                const long long n = n_warp + 8 * j + 2 * t + (e & 1);
                if (m >= M || n >= N) continue;
                if (splits == 1) {
                    mma_store_y<XT>(y, bias, has_bias, (long long)m * N + n, n, acc[i][j][e]);
                } else {
                    ws[((long long)z * M + m) * N + n] = acc[i][j][e];
                }
            }
    if (splits == 1) return;
    __threadfence();  // this block's partial sums are visible device-wide before the counter says so
    __syncthreads();
    if (tid == 0) {  // release this block's partial sums (the barrier orders the other threads' stores before it),
        int prev;    // acquire everyone else's when this block arrives last
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;"
                     : "=r"(prev) : "l"(counters + blockIdx.x) : "memory");
        s_last = prev == splits - 1;
    }
    __syncthreads();
    if (!s_last) return;
    const long long n_block = (long long)blockIdx.x * MMA_BLOCK_N;
    for (int idx = tid; idx < M * MMA_BLOCK_N; idx += blockDim.x) {
        const int m = idx / MMA_BLOCK_N;
        const long long n = n_block + idx % MMA_BLOCK_N;
        if (n >= N) continue;
        float v = 0.f;
        for (int s = 0; s < splits; ++s) v += ld_cg_f32(ws + ((long long)s * M + m) * N + n);
        mma_store_y<XT>(y, bias, has_bias, (long long)m * N + n, n, v);
    }
    if (tid == 0) counters[blockIdx.x] = 0;  // ready for the next launch on this stream
}

#define NF4_MMA_KERNEL(XT, MT)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * MMA_WARPS) nf4_mma_x##XT##_m##MT(                             \
        const unsigned short* __restrict__ x, const unsigned char* __restrict__ data,                              \
        const void* __restrict__ absmax, const float* __restrict__ nested_absmax,                                  \
        const float* __restrict__ nested_code, const float* __restrict__ offset, const float* __restrict__ code,   \
        const unsigned short* __restrict__ bias, unsigned short* __restrict__ y, float* __restrict__ ws,           \
        int* __restrict__ counters, int M, int N, int K, long long stride_xm, int log2_bs, int log2_nested,        \
        int double_quant, int has_bias) {                                                                          \
        nf4_mma<XT, MT>(x, data, absmax, nested_absmax, nested_code, offset, code, bias, y, ws, counters, M, N, K, \
                        stride_xm, log2_bs, log2_nested, double_quant, has_bias);                                  \
    }
#define NF4_MMA_KERNEL_EXPAND(XT, MT) NF4_MMA_KERNEL(XT, MT)

#if defined(MMA_XT) && defined(MMA_MT)
NF4_MMA_KERNEL_EXPAND(MMA_XT, MMA_MT)
#else  // the nvcc compile check: both dtypes, 1, 2 and 4 row tiles
NF4_MMA_KERNEL(2, 1)
NF4_MMA_KERNEL(2, 2)
NF4_MMA_KERNEL(1, 4)
#endif
