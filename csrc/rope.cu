// Rotary position embedding (Hugging Face rotate-half convention), q and k in one launch.
//
// Per token (b, t) and head h, with halves x = [x1, x2] (D/2 each) and table rows c = [c1, c2], s = [s1, s2]:
//   forward   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
//   backward  dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1   (the transpose: rotation by -theta)
// selected by the `backward` argument; fp32 math, one rounding to the output type.
//
// Layout: one thread block per token (grid.x = B*T). The block first stages the token's cos/sin row
// (both halves, any float dtype, any strides) in shared memory as fp32, then its threads sweep the
// (H + KV) heads x D/2 pairs, VEC consecutive pairs per thread: thread u handles elements j..j+VEC-1 of
// x1 and the same of x2 of one head. q, k, q_out, k_out have arbitrary element strides (b, t, h, d);
// the VEC > 1 variants require d-stride 1 and every other stride, D/2 and the base address to be
// multiples of VEC (the launcher checks), so each half is one 16-byte (or narrower) vector access.
// q_out/k_out may alias q/k (in place): each element is read before it is written, by the same thread.
// Offsets are 64-bit: B*T*H*D passes 2^31 at long contexts.
//
// No CUDA headers are needed (NVRTC and nvcc alike): 16-bit types travel as unsigned short and are
// converted with PTX cvt instructions.

typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ float bf16_to_f(u16 v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ float f16_to_f(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ u16 f_to_bf16(float f) {
    u16 v;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}
__device__ __forceinline__ u16 f_to_f16(float f) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

// element type tags: 0 = float32, 1 = float16, 2 = bfloat16
template <int DT> struct Elem;
template <> struct Elem<0> {
    typedef float S;
    static __device__ __forceinline__ float load(S v) { return v; }
    static __device__ __forceinline__ S store(float f) { return f; }
};
template <> struct Elem<1> {
    typedef u16 S;
    static __device__ __forceinline__ float load(S v) { return f16_to_f(v); }
    static __device__ __forceinline__ S store(float f) { return f_to_f16(f); }
};
template <> struct Elem<2> {
    typedef u16 S;
    static __device__ __forceinline__ float load(S v) { return bf16_to_f(v); }
    static __device__ __forceinline__ S store(float f) { return f_to_bf16(f); }
};

template <typename S, int VEC> struct alignas(sizeof(S) * VEC) Pack { S v[VEC]; };

__device__ __forceinline__ float load_table(const void* p, i64 off, int dtype) {
    if (dtype == 0) return ((const float*)p)[off];
    if (dtype == 1) return f16_to_f(((const u16*)p)[off]);
    return bf16_to_f(((const u16*)p)[off]);
}

template <int DT, int VEC>
__device__ __forceinline__ void rope_impl(
    const void* q_, const void* k_, void* qo_, void* ko_, const void* cos, const void* sin,
    i64 T, int H, int KV, int half,
    i64 sq_b, i64 sq_t, i64 sq_h, i64 sq_d, i64 sk_b, i64 sk_t, i64 sk_h, i64 sk_d,
    i64 sqo_b, i64 sqo_t, i64 sqo_h, i64 sqo_d, i64 sko_b, i64 sko_t, i64 sko_h, i64 sko_d,
    i64 sc_b, i64 sc_t, i64 sc_d, i64 ss_b, i64 ss_t, i64 ss_d, int table_dtype, int backward) {
    typedef typename Elem<DT>::S S;
    extern __shared__ float smem[];  // [c1 | c2 | s1 | s2], half floats each
    float* c1 = smem;
    float* c2 = smem + half;
    float* s1 = smem + 2 * half;
    float* s2 = smem + 3 * half;

    const i64 row = blockIdx.x;
    const i64 b = row / T, t = row - (row / T) * T;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const i64 oc = b * sc_b + t * sc_t, os = b * ss_b + t * ss_t;
        c1[i] = load_table(cos, oc + i * sc_d, table_dtype);
        c2[i] = load_table(cos, oc + (i + half) * sc_d, table_dtype);
        s1[i] = load_table(sin, os + i * ss_d, table_dtype);
        s2[i] = load_table(sin, os + (i + half) * ss_d, table_dtype);
    }
    __syncthreads();

    const S* q = (const S*)q_ + b * sq_b + t * sq_t;
    const S* k = (const S*)k_ + b * sk_b + t * sk_t;
    S* qo = (S*)qo_ + b * sqo_b + t * sqo_t;
    S* ko = (S*)ko_ + b * sko_b + t * sko_t;
    const int nvec = half / VEC;
    const int units = (H + KV) * nvec;
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        int h = u / nvec;
        const int j = (u - h * nvec) * VEC;
        const S* x;
        S* y;
        i64 sx_d, sy_d;
        if (h < H) {
            x = q + h * sq_h; y = qo + h * sqo_h; sx_d = sq_d; sy_d = sqo_d;
        } else {
            h -= H;
            x = k + h * sk_h; y = ko + h * sko_h; sx_d = sk_d; sy_d = sko_d;
        }
        float x1[VEC], x2[VEC];
        if (VEC > 1) {  // unit d-stride, aligned: one vector access per half
            const Pack<S, VEC> p1 = *(const Pack<S, VEC>*)(x + j);
            const Pack<S, VEC> p2 = *(const Pack<S, VEC>*)(x + j + half);
#pragma unroll
            for (int e = 0; e < VEC; ++e) { x1[e] = Elem<DT>::load(p1.v[e]); x2[e] = Elem<DT>::load(p2.v[e]); }
        } else {
            x1[0] = Elem<DT>::load(x[j * sx_d]);
            x2[0] = Elem<DT>::load(x[(j + half) * sx_d]);
        }
        Pack<S, VEC> o1, o2;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const int i = j + e;
            const float b1 = backward ? s2[i] : -s1[i];
            const float b2 = backward ? -s1[i] : s2[i];
            o1.v[e] = Elem<DT>::store(x1[e] * c1[i] + x2[e] * b1);
            o2.v[e] = Elem<DT>::store(x2[e] * c2[i] + x1[e] * b2);
        }
        if (VEC > 1) {
            *(Pack<S, VEC>*)(y + j) = o1;
            *(Pack<S, VEC>*)(y + j + half) = o2;
        } else {
            y[j * sy_d] = o1.v[0];
            y[(j + half) * sy_d] = o2.v[0];
        }
    }
}

#define ROPE_KERNEL(NAME, DT, VEC)                                                                          \
    extern "C" __global__ void NAME(                                                                        \
        const void* q, const void* k, void* qo, void* ko, const void* cos, const void* sin, i64 T, int H,   \
        int KV, int half, i64 sq_b, i64 sq_t, i64 sq_h, i64 sq_d, i64 sk_b, i64 sk_t, i64 sk_h, i64 sk_d,   \
        i64 sqo_b, i64 sqo_t, i64 sqo_h, i64 sqo_d, i64 sko_b, i64 sko_t, i64 sko_h, i64 sko_d, i64 sc_b,   \
        i64 sc_t, i64 sc_d, i64 ss_b, i64 ss_t, i64 ss_d, int table_dtype, int backward) {                  \
        rope_impl<DT, VEC>(q, k, qo, ko, cos, sin, T, H, KV, half, sq_b, sq_t, sq_h, sq_d, sk_b, sk_t,      \
                           sk_h, sk_d, sqo_b, sqo_t, sqo_h, sqo_d, sko_b, sko_t, sko_h, sko_d, sc_b, sc_t,  \
                           sc_d, ss_b, ss_t, ss_d, table_dtype, backward);                                  \
    }

ROPE_KERNEL(rope_f32_v1, 0, 1)
ROPE_KERNEL(rope_f32_v2, 0, 2)
ROPE_KERNEL(rope_f32_v4, 0, 4)
ROPE_KERNEL(rope_f16_v1, 1, 1)
ROPE_KERNEL(rope_f16_v2, 1, 2)
ROPE_KERNEL(rope_f16_v4, 1, 4)
ROPE_KERNEL(rope_f16_v8, 1, 8)
ROPE_KERNEL(rope_bf16_v1, 2, 1)
ROPE_KERNEL(rope_bf16_v2, 2, 2)
ROPE_KERNEL(rope_bf16_v4, 2, 4)
ROPE_KERNEL(rope_bf16_v8, 2, 8)
