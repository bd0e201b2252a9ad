"""dst = alpha · src for (M, N) matrices with rows apart: the assembly copies of triton_ops.lora's adapter fold.

Formula: dst[m, n] = round(alpha · float(src[m, n])) (fp32 product, one rounding to dst's dtype, nearest even), or a
plain copy when alpha == 1 and the dtypes match. dst has unit column stride and any row stride (a column slice of a
wider buffer); src any strides.

Why a kernel: the fold writes x into the middle columns of [xa_g | x | xa_u] and s·B, s·A into a slice of the
buffer the dense weight is dequantized into. torch's copy_ into a column slice (no vectorized path for it) took
44.6 µs for the (4096, 4096) bf16 x on an H200 and torch.cat of the three pieces 70 µs, against 21.6 µs for a
contiguous clone; this kernel's 2-D tiles with 16-byte accesses took 23 µs (.scratch-style measurement, one
CUDA-graph replay, same machine). Bytes: M·N elements read and written.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nf4_dequant import cast_rtne

__all__ = ["copy2d_"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _copy2d_kernel(src_ptr, dst_ptr, M, N, s_sm, s_sn, s_dm, alpha,
                   BM: tl.constexpr, BN: tl.constexpr, CONVERT: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    rm = rm.to(tl.int64)
    # int64 column term too: a transposed source's rn·s_sn passes 2^31 past 2^31 elements (with s_sn == 1,
    # specialized by Triton, there is no product)
    v = tl.load(src_ptr + rm[:, None] * s_sm + rn.to(tl.int64)[None, :] * s_sn, mask=mask,
                eviction_policy="evict_first")
    if CONVERT:
        v = cast_rtne(v.to(tl.float32) * alpha, dst_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(dst_ptr + rm[:, None] * s_dm + rn[None, :], v, mask=mask)


def copy2d_(dst: torch.Tensor, src: torch.Tensor, alpha: float = 1.0, kernel: bool | None = None) -> torch.Tensor:
    """dst <- alpha·src in place (see the module docstring); returns dst.

    Args:
        dst: (M, N) float tensor with unit column stride (any row stride).
        src: (M, N) float tensor, any strides, on dst's device.
        alpha: scale, applied in fp32 (1.0 with equal dtypes: a bit-exact copy).
        kernel: None = the Triton kernel on CUDA, torch elsewhere; True forces the kernel (the tests, under
            Triton's interpreter), False forces torch.
    """
    if dst.dim() != 2 or src.shape != dst.shape or dst.stride(1) != 1 or src.device != dst.device:
        raise ValueError(f"copy2d_: dst must be 2-D with unit column stride and src of its shape on its device, got "
                         f"dst {tuple(dst.shape)} strides {tuple(dst.stride())} on {dst.device}, src "
                         f"{tuple(src.shape)} on {src.device}")
    convert = alpha != 1.0 or src.dtype != dst.dtype
    if kernel is None:
        kernel = dst.is_cuda
    if not kernel or dst.numel() == 0:
        return torch.mul(src.float(), alpha, out=dst) if convert else dst.copy_(src)  # .float(): fp32 product
    M, N = dst.shape
    BN = min(1024, triton.next_power_of_2(N))
    BM = max(1, min(512, 8192 // BN))
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _copy2d_kernel[grid](src, dst, M, N, src.stride(0), src.stride(1), dst.stride(0), float(alpha), BM=BM, BN=BN,
                         CONVERT=convert, INTERPRET_BF16=_INTERPRET and dst.dtype == torch.bfloat16, num_warps=4)
    return dst
