// Cross-entropy row kernel with the gradient in the same launch, each logit read ONCE: the row is held on chip.
//
// What triton_ops.cross_entropy's row kernel computes when asked for loss, lse and the gradient together (the
// fused linear cross-entropy's call), for 16-bit logits without softcap:
//   lse_i  = log sum_v exp(x_iv)
//   loss_i = lse_i - x_{i,y_i}       (0 where y_i == ignore_index; NaN for any other label outside [0, V))
//   g_iv   = (exp(x_iv - lse_i) - [v == y_i]) * scale_i     (scale_i = 0 where y_i == ignore_index)
// The Triton kernel reads a row twice (pass 1: lse; pass 2: the gradient) and writes it once: 3 x 2 bytes per
// logit. Here a row (V = 128256 in bf16 is 250 KB, more than one SM holds) is split over a thread-block CLUSTER
// of CS blocks: each block loads its slice of the row into registers once, converts it to e = exp(x - m_t)
// (m_t: the thread's own max, so one exponential per logit), reduces (max, sum) over its threads, and the CS
// partial results are exchanged through distributed shared memory (mapa / ld.shared::cluster) after one cluster
// barrier. Every block then has lse and writes its slice's gradient g = e * exp(m_t - lse) * scale from the
// registers: 2 x 2 bytes per logit. In place (grad == logits) is safe: a block reads only its own slice, and
// all of it before the cluster barrier; it writes only that slice, after.
//
// Layout: blocks of THREADS threads, clusters of CS blocks (__cluster_dims__), one row per cluster at a time;
// cluster c takes rows c, c + #clusters, ... While a block finishes a row (reductions, cluster barrier, stores),
// its slice of the next row is already on its way into shared memory (cp.async, one staging buffer: each
// thread moves its vectors to registers before it stages the next row's). Slice s of a row is columns
// [s * slice, min(V, (s + 1) * slice)), `slice` a multiple of 8, at most THREADS * P * 8: P 16-byte vectors per
// thread (vector u of the slice is held by thread u % THREADS). The launcher requires V % 8 == 0, 16-byte aligned rows of logits and grad, and
// that V fits CS slices. The partial results are double-buffered by row parity, so one cluster barrier per row
// suffices; a last one keeps every block's shared memory alive until the others have read it.
//
// No CUDA headers (NVRTC compiles without the include tree): cluster registers, barriers and distributed
// shared memory are explicit PTX (sm_90).

#include "nf4_common.cuh"

typedef long long i64;

#define LOG2E 1.4426950408889634f
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ unsigned cluster_ctarank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

__device__ __forceinline__ unsigned cluster_id() {
    unsigned r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}

__device__ __forceinline__ unsigned cluster_count() {
    unsigned r;
    asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return r;
}

// Every thread of every block of the cluster: the shared-memory writes before it are visible cluster-wide after.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{\n\t.reg .u64 a;\n\tcvta.to.shared.u64 a, %1;\n\tcvt.u32.u64 %0, a;\n\t}" : "=r"(a) : "l"(p));
    return a;
}

// A float of block `rank`'s shared memory at the address of `p` in this block's.
__device__ __forceinline__ float load_remote(const float* p, unsigned rank) {
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// 16 bytes global -> shared without registers (cp.async, L1 bypassed); complete after cp_async_wait_all.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

__device__ __forceinline__ U32x4 load_shared_16(const void* p) {
    U32x4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(smem_addr(p)) : "memory");
    return v;
}

__device__ __forceinline__ void store_cs_16(void* p, U32x4 v) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}

// (m, s) <- the pair for the union: max and the sum of exp(x - max), one exponential.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    if (m2 > m) {
        s = s2 + (m == NEG_INF ? 0.0f : s * exp2f((m - m2) * LOG2E));
        m = m2;
    } else if (m2 != NEG_INF) {
        s += s2 * exp2f((m2 - m) * LOG2E);
    }
}

// The pair over the warp's 32 lanes, in every lane.
__device__ __forceinline__ void warp_merge(float& m, float& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        merge(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    }
}

template <int T, int THREADS, int P, int CS, bool RC>
__device__ __forceinline__ void ce_rows_impl(const void* __restrict__ logits, i64 stride_l, void* grad, i64 stride_g,
                                             const i64* __restrict__ labels, float* __restrict__ loss,
                                             float* __restrict__ lse_out, const float* __restrict__ scale,
                                             int scale_stride, i64 N, int V, i64 ignore_index, int slice) {
    constexpr int WARPS = THREADS / 32;
    constexpr int E = P * 8;
    __shared__ float red_m[WARPS], red_s[WARPS];
    __shared__ float part[2][3];  // per row parity: this block's (max, sum of exp(x - max), the label's logit)
    __shared__ float row_lse;
    __shared__ U32x4 stage[P * THREADS];  // the next row's slice, in flight while this row is finished

    const unsigned rank = cluster_ctarank();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int c0 = (int)rank * slice;
    const int c1 = min(V, c0 + slice);
    const i64 step = cluster_count();
    // each thread stages (and later reads) only its own vectors: no block barrier around the staging buffer
    auto prefetch = [&](i64 r) {
        if (r < N) {
            const unsigned short* src = (const unsigned short*)logits + r * stride_l;
#pragma unroll
            for (int p = 0; p < P; ++p) {
                const int col = c0 + (p * THREADS + tid) * 8;
                if (col < c1) cp_async_16(&stage[p * THREADS + tid], src + col);
            }
        }
        cp_async_commit();
    };
    int parity = 0;
    prefetch(cluster_id());
    for (i64 row = cluster_id(); row < N; row += step, parity ^= 1) {
        const unsigned short* x = (const unsigned short*)logits + row * stride_l;
        const i64 label = labels[row];
        // the label's column within this block's slice, or -1
        const int lab = label >= c0 && label < c1 ? (int)(label - c0) : -1;

        cp_async_wait_all();
        U32x4 raw[P];
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const int col = c0 + (p * THREADS + tid) * 8;
            if (col < c1) raw[p] = load_shared_16(&stage[p * THREADS + tid]);
        }
        prefetch(row + step);  // the next row's loads overlap this row's reductions, barrier and stores
        // the slice's logits as fp32 (masked columns -inf); RC: from the 16-bit registers on every use, else
        // converted once into e[], which then holds exp(x - m_t)
        auto zval = [&](int p, int k) -> float {
            const bool in = c0 + (p * THREADS + tid) * 8 < c1;
            const unsigned w = k < 2 ? raw[p].x : k < 4 ? raw[p].y : k < 6 ? raw[p].z : raw[p].w;
            return in ? half_to_f32<T>((unsigned short)(w >> (16 * (k & 1)))) : NEG_INF;
        };
        float e[RC ? 1 : E];
        float m = NEG_INF;
#pragma unroll
        for (int p = 0; p < P; ++p) {
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float z = zval(p, k);
                if (!RC) e[p * 8 + k] = z;
                m = fmaxf(m, z);
            }
        }
        if (lab >= 0 && (lab >> 3) % THREADS == tid) {  // the one thread of the cluster that holds the label
            part[parity][2] = half_to_f32<T>(x[c0 + lab]);
        }
        float s = 0.0f;
        if (m != NEG_INF) {
#pragma unroll
            for (int j = 0; j < E; ++j) {
                const float ej = exp2f(((RC ? zval(j >> 3, j & 7) : e[j]) - m) * LOG2E);  // masked: exp2(-inf) = 0
                if (!RC) e[j] = ej;
                s += ej;
            }
        }
        const float m_t = m;
        // this block's (max, sum): warps, then warp 0 over the warps
        warp_merge(m, s);
        if (lane == 0) {
            red_m[warp] = m;
            red_s[warp] = s;
        }
        __syncthreads();
        if (warp == 0) {
            m = lane < WARPS ? red_m[lane] : NEG_INF;
            s = lane < WARPS ? red_s[lane] : 0.0f;
            warp_merge(m, s);
            if (lane == 0) {
                part[parity][0] = m;
                part[parity][1] = s;
            }
        }
        cluster_sync();
        if (warp == 0) {  // the row's lse from the CS blocks' pairs
            m = NEG_INF;
            s = 0.0f;
            if (lane < CS) {
                m = load_remote(&part[parity][0], lane);
                s = load_remote(&part[parity][1], lane);
            }
            warp_merge(m, s);
            const float lse = m + log2f(s) * (1.0f / LOG2E);
            if (lane == 0) {
                row_lse = lse;
                if (rank == 0) {
                    float l = 0.0f;
                    if (label != ignore_index) {
                        l = __int_as_float(0x7fc00000);  // NaN: a label outside [0, V) that is not ignore_index
                        if (label >= 0 && label < V) l = lse - load_remote(&part[parity][2], (unsigned)(label / slice));
                    }
                    loss[row] = l;
                    lse_out[row] = lse;
                }
            }
        }
        __syncthreads();
        const float lse = row_lse;
        const float sc = label != ignore_index ? scale[row * scale_stride] : 0.0f;  // ignored rows: exact zeros
        const float f = m_t != NEG_INF ? exp2f((m_t - lse) * LOG2E) * sc : 0.0f;
        unsigned short* g = (unsigned short*)grad + row * stride_g;
#pragma unroll
        for (int p = 0; p < P; ++p) {
            const int col = c0 + (p * THREADS + tid) * 8;
            if (col < c1) {
                float v[8];
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] = (RC ? exp2f((zval(p, k) - m_t) * LOG2E) : e[p * 8 + k]) * f;
                if ((lab >> 3) == p * THREADS + tid) {
#pragma unroll
                    for (int k = 0; k < 8; ++k) v[k] -= (lab & 7) == k ? sc : 0.0f;
                }
                U32x4 out;
                out.x = pack2<T>(v[0], v[1]);
                out.y = pack2<T>(v[2], v[3]);
                out.z = pack2<T>(v[4], v[5]);
                out.w = pack2<T>(v[6], v[7]);
                store_cs_16(g + col, out);
            }
        }
    }
    cluster_sync();  // no block exits while another may still read its shared memory
}

#define CE_ROWS_KERNEL(NAME, T, THREADS, P, CS, RC, MINB)                                                         \
    extern "C" __global__ void __cluster_dims__(CS, 1, 1) __launch_bounds__(THREADS, MINB) NAME(             \
        const void* logits, i64 stride_l, void* grad, i64 stride_g, const i64* labels, float* loss,           \
        float* lse_out, const float* scale, int scale_stride, i64 N, int V, i64 ignore_index, int slice) {    \
        ce_rows_impl<T, THREADS, P, CS, RC>(logits, stride_l, grad, stride_g, labels, loss, lse_out, scale,        \
                                        scale_stride, N, V, ignore_index, slice);                             \
    }

// name: ce_rows_<dtype>_t<THREADS>_p<P>_c<CS>[_rc]; capacity per row: CS * THREADS * P * 8 logits; _rc: the
// exponentials recomputed from the 16-bit registers (fewer registers, so more blocks per SM, for twice the
// exponentials); the last argument: blocks per SM the registers must allow
CE_ROWS_KERNEL(ce_rows_f16_t512_p4_c8, 1, 512, 4, 8, false, 2)
CE_ROWS_KERNEL(ce_rows_bf16_t512_p4_c8, 2, 512, 4, 8, false, 2)
CE_ROWS_KERNEL(ce_rows_f16_t256_p8_c8, 1, 256, 8, 8, false, 2)
CE_ROWS_KERNEL(ce_rows_bf16_t256_p8_c8, 2, 256, 8, 8, false, 2)
CE_ROWS_KERNEL(ce_rows_f16_t1024_p2_c8, 1, 1024, 2, 8, false, 1)
CE_ROWS_KERNEL(ce_rows_bf16_t1024_p2_c8, 2, 1024, 2, 8, false, 1)
CE_ROWS_KERNEL(ce_rows_f16_t256_p4_c8, 1, 256, 4, 8, false, 4)
CE_ROWS_KERNEL(ce_rows_bf16_t256_p4_c8, 2, 256, 4, 8, false, 4)
CE_ROWS_KERNEL(ce_rows_f16_t256_p2_c4, 1, 256, 2, 4, false, 4)
CE_ROWS_KERNEL(ce_rows_bf16_t256_p2_c4, 2, 256, 2, 4, false, 4)
CE_ROWS_KERNEL(ce_rows_f16_t512_p4_c8_rc, 1, 512, 4, 8, true, 3)
CE_ROWS_KERNEL(ce_rows_bf16_t512_p4_c8_rc, 2, 512, 4, 8, true, 3)
CE_ROWS_KERNEL(ce_rows_f16_t256_p8_c8_rc, 1, 256, 8, 8, true, 4)
CE_ROWS_KERNEL(ce_rows_bf16_t256_p8_c8_rc, 2, 256, 8, 8, true, 4)
CE_ROWS_KERNEL(ce_rows_f16_t256_p4_c8_rc, 1, 256, 4, 8, true, 6)
CE_ROWS_KERNEL(ce_rows_bf16_t256_p4_c8_rc, 2, 256, 4, 8, true, 6)
