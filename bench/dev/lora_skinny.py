"""Exploratory Triton kernels for the rank-R ("skinny") GEMMs of a LoRA step (bench/dev: not used by the library).

Why: on the 8B QLoRA step (2 x 2048 tokens, r=16, all seven projections; bench/results/2026-11-28-h200-train.md,
stop 23 profile) the products with one side of width R take about 15 ms of the 301 ms step in cuBLAS tiles such
as 8x64 and 32x64 (cuBLAS runs without a workspace under minitrain, so without split-K). Each reads one operand of
M x K elements (33.5 MB at K=4096, 117 MB at K=14336) and little else, so at the card's copy rate each would take
8-30 us; they take 14-37 us.

Two shapes cover them (M = tokens):
    x_wt:  out (M, R)  = X (M, K) @ W (K, R)           xa = x·Aᵀ (W = Aᵀ, a view), dyB = dy·B (W = B)
    gt_x:  out (R, K)  = scale · Gᵀ (R, M) @ X (M, K)  dA = s·dyBᵀ·x ;  dBᵀ = s·xaᵀ·dy (out transposed = dB)
x_wt splits K over SPLIT_K programs per row block (fp32 atomics into a zeroed buffer when SPLIT_K > 1);
gt_x splits M (the reduction) over SPLIT_M programs per column block (fp32 atomics likewise), so both launch a few
hundred programs for M = 4096 instead of the 32-128 an unsplit tiling of a width-16 output gives.

Math: fp32 accumulation of the products of the inputs' dtype (bf16/fp16 on the GPU; fp32 inputs use IEEE fp32
products, for the CPU interpreter tests); the atomics make the summation order, and so the last bits, vary
between runs when a split is > 1. ``python -m bench.dev.lora_sweep`` times them against torch.mm on the 8B shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _x_wt_kernel(x_ptr, w_ptr, out_ptr, M, K, R, sxm, sxk, swk, swr, som, sor,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_K: tl.constexpr,
                 PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k0 = pid_k * k_per
    k_end = tl.minimum(k0 + k_per, K)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k in range(k0, k_end, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < k_end),
                    other=0.0)
        w = tl.load(w_ptr + rk[:, None] * swk + rr[None, :] * swr, mask=(rk[:, None] < k_end) & (rr[None, :] < R),
                    other=0.0)
        acc += tl.dot(x, w, input_precision=PREC)
    o = out_ptr + rm[:, None] * som + rr[None, :] * sor
    mask = (rm[:, None] < M) & (rr[None, :] < R)
    if SPLIT_K == 1:
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(o, acc, mask=mask)


@triton.jit
def _gt_x_kernel(g_ptr, x_ptr, out_ptr, M, K, R, sgm, sgr, sxm, sxk, sor, sok, scale,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT_M: tl.constexpr,
                 PREC: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_per = tl.cdiv(tl.cdiv(M, SPLIT_M), BLOCK_M) * BLOCK_M
    m0 = pid_s * m_per
    m_end = tl.minimum(m0 + m_per, M)
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for m in range(m0, m_end, BLOCK_M):
        rm = m + tl.arange(0, BLOCK_M)
        gt = tl.load(g_ptr + rr[:, None] * sgr + rm[None, :] * sgm, mask=(rr[:, None] < R) & (rm[None, :] < m_end),
                     other=0.0)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=(rm[:, None] < m_end) & (rk[None, :] < K),
                    other=0.0)
        acc += tl.dot(gt, x, input_precision=PREC)
    acc = acc * scale
    o = out_ptr + rr[:, None] * sor + rk[None, :] * sok
    mask = (rr[:, None] < R) & (rk[None, :] < K)
    if SPLIT_M == 1:
        tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(o, acc, mask=mask)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))  # tl.dot needs every dimension >= 16


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _check(name, a, b):
    if a.dim() != 2 or b.dim() != 2 or a.device != b.device or a.dtype != b.dtype:
        raise ValueError(f"{name}: expected two 2-D tensors of one dtype on one device, got {tuple(a.shape)} "
                         f"{a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}")


def x_wt(x: torch.Tensor, w: torch.Tensor, *, block_m: int = 32, block_k: int = 128, split_k: int = 1,
         num_warps: int = 4, num_stages: int = 3, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(M, R) = x (M, K) @ w (K, R), any strides (w = A.t() for xa = x·Aᵀ). split_k > 1: fp32 atomics."""
    _check("x_wt", x, w)
    M, K = x.shape
    if w.shape[0] != K:
        raise ValueError(f"x_wt: w must be (K={K}, R), got {tuple(w.shape)}")
    R = w.shape[1]
    out_dtype = x.dtype if out_dtype is None else out_dtype
    out = torch.zeros(M, R, device=x.device, dtype=torch.float32) if split_k > 1 else \
        torch.empty(M, R, device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(M, block_m), split_k)
    _x_wt_kernel[grid](x, w, out, M, K, R, *x.stride(), *w.stride(), *out.stride(), BLOCK_M=block_m,
                       BLOCK_K=block_k, BLOCK_R=_block_r(R), SPLIT_K=split_k, PREC=_prec(x), num_warps=num_warps,
                       num_stages=num_stages)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def gt_x(g: torch.Tensor, x: torch.Tensor, scale: float = 1.0, *, block_m: int = 64, block_k: int = 64,
         split_m: int = 4, num_warps: int = 4, num_stages: int = 3,
         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(R, K) = scale · g (M, R)ᵀ @ x (M, K), any strides; fp32 out by default (a LoRA A's gradient dtype).
    split_m > 1: the M reduction split over programs, fp32 atomics into a zeroed buffer."""
    _check("gt_x", g, x)
    M, R = g.shape
    if x.shape[0] != M:
        raise ValueError(f"gt_x: x must be (M={M}, K), got {tuple(x.shape)}")
    K = x.shape[1]
    out = torch.zeros(R, K, device=x.device, dtype=torch.float32) if split_m > 1 else \
        torch.empty(R, K, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(K, block_k), split_m)
    _gt_x_kernel[grid](g, x, out, M, K, R, *g.stride(), *x.stride(), *out.stride(), float(scale), BLOCK_M=block_m,
                       BLOCK_K=block_k, BLOCK_R=_block_r(R), SPLIT_M=split_m, PREC=_prec(x), num_warps=num_warps,
                       num_stages=num_stages)
    return out if out.dtype == out_dtype else out.to(out_dtype)
