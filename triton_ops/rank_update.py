"""In-place low-rank update y += alpha * a @ b^T in ONE pass over y: the LoRA adapter term.

Formula, y (M, N), a (M, R), b (N, R), R small (a LoRA rank, or a few ranks side by side):
    y[m, n] <- round(float(y[m, n]) + alpha * sum_r a[m, r] * b[n, r])      (fp32 sum, one rounding)
which is exactly cuBLAS's ``y.addmm_(a, b.t(), alpha=alpha)`` (beta = 1) up to the order of the R-term sum.

Why a kernel: LoRA adds its term to an output the base GEMM already wrote (y = x W^T, then y += s xa B^T;
in backward dx += s (dy B) A). The work is 2 M N R FLOPs (tiny) and one read and one write of y, so the
op is memory-bound; cuBLAS's K = 16 GEMM with beta = 1 reached 61% of copy bandwidth on the 8B MLP's
(4096, 14336) bf16 outputs on an H100 (127 µs against a 78 µs floor), this kernel 89% (87 µs; bench.rank_update).
It streams y in (BLOCK_M, BLOCK_N) tiles, each program loading its a rows and b rows (R columns, from L2 after
the first touch) and doing one tl.dot.

Layouts: y with unit column stride and any row stride (a column slice of a wider output works); a and b with
any strides (b may be a transposed view, e.g. A_cat.t() for the dx term dx += dyB @ A_cat). Bytes per
element of y: 2 * element size (read, write); a and b add (M + N) * R elements.

Precision: fp32 accumulation; fp32 inputs use IEEE products (no TF32, as torch's default matmul). Ranks above
``MAX_R``, outputs under ``MIN_NUMEL`` elements (where the launch's host cost outweighs the GPU time saved)
and CPU tensors go to addmm_ unless the caller forces the kernel (the tests, under Triton's interpreter).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nf4_dequant import cast_rtne

__all__ = ["rank_update_", "rank_update_ref", "MAX_R"]

MAX_R = 128  # above this the update is a real GEMM: cuBLAS
# The kernel is the default only for outputs of at least this many elements: its launch costs more host time
# than cuBLAS's (H100 host, 64x128 bf16: ~36 µs vs ~24 µs per call), which a host-bound eager step pays in
# full, while the GPU time it saves is 40 µs at (4096, 14336) but 12 µs at (4096, 4096) and 2 µs at
# (4096, 1024) (bench.rank_update). The rule depends on the shape only, so a CUDA graph's eager warm-up calls
# compile exactly the kernels its capture launches.
MIN_NUMEL = 2**25
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def rank_update_ref(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """fp32 reference, returns a new tensor: round(float(y) + alpha * a @ b^T) in y's dtype."""
    return (y.float() + alpha * (a.float() @ b.float().t())).to(y.dtype)


@triton.jit
def _rank_update_kernel(y_ptr, a_ptr, b_ptr, M, N, R, alpha,
                        s_ym, s_am, s_ar, s_bn, s_br,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        GROUP_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                        INTERPRET_BF16: tl.constexpr):
    # grouped tile order: GROUP_M row-tiles share their a rows while the program ids walk across N
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: row * stride can pass 2^31
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        mr = rr < R
        a = tl.load(a_ptr + rm[:, None] * s_am + rr[None, :] * s_ar, mask=mm[:, None] & mr[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * s_bn + rr[:, None] * s_br, mask=mn[None, :] & mr[:, None], other=0.0)
        if UPCAST:  # Triton's CPU interpreter multiplies 16-bit dots wrongly: fp32 there (exact products anyway)
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    ptrs = y_ptr + rm[:, None] * s_ym + rn[None, :]
    mask = mm[:, None] & mn[None, :]
    y = tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    # one rounding to nearest even (the interpreter's own fp32 -> bf16 cast truncates: biased results on the CPU,
    # which a downstream projection amplified past the tolerance rule for one random seed in CI)
    out = cast_rtne(y + alpha * acc, y_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(ptrs, out, mask=mask, eviction_policy="evict_first")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(R: int, interpreting: bool) -> dict:
    if interpreting:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16, GROUP_M=2, num_warps=1)
    # H100 sweep (bench.rank_update --sweep, bf16, M=4096): 64x128 tiles with 4 warps were fastest at N=14336
    # (87.7 µs, 89% of copy; 128x128 with 8 warps: 106 µs), N=6144 R=48 and N=4096, and within 8% at N=1024
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_R=max(16, min(64, triton.next_power_of_2(R))), GROUP_M=8,
                num_warps=4)


def _check(y, a, b, where: str) -> None:
    for name, t in (("y", y), ("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{where}: {name} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{where}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    M, N = y.shape
    if a.shape[0] != M or b.shape[0] != N or a.shape[1] != b.shape[1]:
        raise ValueError(f"{where}: expected y (M, N), a (M, R), b (N, R); got y {tuple(y.shape)}, "
                         f"a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.dtype != y.dtype or b.dtype != y.dtype:
        raise TypeError(f"{where}: y, a and b must share one dtype, got {y.dtype}, {a.dtype}, {b.dtype}")
    if not (y.device == a.device == b.device):
        raise ValueError(f"{where}: y, a and b must be on one device, got {y.device}, {a.device}, {b.device}")
    if N > 1 and y.stride(1) != 1:
        raise ValueError(f"{where}: y needs unit column stride, got strides {tuple(y.stride())}")
    if M > 1 and y.stride(0) < N:
        raise ValueError(f"{where}: y's rows overlap (row stride {y.stride(0)} < {N} columns); the update writes "
                         f"every element once")


def _launch(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, config: dict | None = None) -> None:
    M, N = y.shape
    R = a.shape[1]
    interpreting = _interpreting()
    cfg = dict(_config(R, interpreting), **(config or {}))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _rank_update_kernel[grid](y, a, b, M, N, R, float(alpha), y.stride(0), a.stride(0), a.stride(1),
                              b.stride(0), b.stride(1), UPCAST=interpreting and y.dtype != torch.float32,
                              IEEE=y.dtype == torch.float32, INTERPRET_BF16=interpreting and y.dtype == torch.bfloat16,
                              **cfg)


@torch.library.custom_op("minitrain::rank_update_", mutates_args=("y",))
def _rank_update_op(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    _launch(y, a, b, alpha)


@_rank_update_op.register_fake
def _(y, a, b, alpha):
    return None


def _plain_call(*ts: torch.Tensor) -> bool:
    """True when a direct launch is what the dispatcher would do: eager (not tracing), no autograd on the inputs,
    no dispatch mode active, plain tensors."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    return all(type(t) is torch.Tensor for t in ts)


def uses_kernel(y: torch.Tensor, R: int) -> bool:
    """Whether ``rank_update_`` takes the Triton kernel by default for this output and rank (else addmm_): on
    CUDA for 0 < R <= MAX_R and outputs of ``MIN_NUMEL`` elements or more."""
    return y.is_cuda and 0 < R <= MAX_R and y.numel() >= MIN_NUMEL


def rank_update_(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0,
                 kernel: bool | None = None) -> torch.Tensor:
    """y += alpha * a @ b^T in place, one pass over y; returns y.

    Args:
        y: (M, N) float16/bfloat16/float32, unit column stride (any row stride).
        a: (M, R), b: (N, R), y's dtype, any strides (b = A.t() gives y += alpha * a @ A).
        alpha: scale of the update (the LoRA scale s).
        kernel: None = ``uses_kernel`` decides (CUDA, 0 < R <= MAX_R, at least MIN_NUMEL outputs), addmm_
            otherwise; True forces the kernel (CPU tensors need Triton's interpreter,
            TRITON_INTERPRET=1); False forces addmm_.
    Returns:
        y, updated.
    """
    if kernel is None:
        kernel = uses_kernel(y, a.shape[1]) if isinstance(y, torch.Tensor) and isinstance(a, torch.Tensor) else False
    if not kernel:
        return y.addmm_(a, b.t(), alpha=alpha)  # validates its own inputs
    _check(y, a, b, "rank_update_")
    if y.numel() == 0 or a.shape[1] == 0:
        return y.addmm_(a, b.t(), alpha=alpha)
    if _plain_call(y, a, b):
        # the launch itself: the custom op's dispatch cost more host time than the whole GPU pass at these sizes
        # (~100 µs per eager call on an H100 machine's host); what the dispatcher would do, done by hand
        _launch(y, a, b, alpha)
        torch.autograd.graph.increment_version(y)
    else:  # compiling, autograd on an input, a dispatch mode or a tensor subclass: the registered op
        torch.ops.minitrain.rank_update_(y, a, b, float(alpha))
    return y
