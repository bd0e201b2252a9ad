"""Backend choice for NF4 dequantization: one entry point, several implementations.

``backend="auto"`` takes the reference on CPU and the fastest registered kernel on CUDA; the environment
variable ``MINITRAIN_NF4_BACKEND`` (torch | triton | cuda) overrides "auto" for a whole process.
"""
from __future__ import annotations

import os

import torch

from .nf4 import NF4Weight, dequantize_nf4_ref

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MINITRAIN_NF4_BACKEND"


def _check_out(q: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None) -> None:
    if out is None:
        return
    if out.shape != q.shape or out.dtype != dtype or out.device != q.device or not out.is_contiguous():
        raise ValueError(f"dequantize_nf4: out must be a contiguous {dtype} tensor of shape {tuple(q.shape)} on "
                         f"{q.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (non-contiguous)'}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"dequantize_nf4: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "torch" if device.type != "cuda" else _fastest_cuda_backend()
    return backend


def _fastest_cuda_backend() -> str:
    try:
        from triton_ops import nf4_dequant  # noqa: F401  (present once the kernel issue lands)
    except ImportError:
        return "torch"
    return "triton"


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Dequantize an NF4 weight to a dense (N, K) tensor.

    Args:
        q: the quantized weight.
        dtype: output dtype, float32/float16/bfloat16 (default: the weight's original dtype).
        out: optional contiguous (N, K) buffer of that dtype on q's device, reused instead of allocating.
        backend: "auto" | "torch" | "triton" | "cuda" (see module docstring).
    Returns:
        (N, K) tensor; every backend gives bit-identical values.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4: expected an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dequantize_nf4: dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_out(q, dtype, out)
    backend = resolve_backend(backend, q.device)
    if backend == "torch":
        return dequantize_nf4_ref(q, dtype, out)
    if backend == "triton":
        from triton_ops.nf4_dequant import nf4_dequantize

        return nf4_dequantize(q, dtype=dtype, out=out)
    from csrc.nf4_dequant import nf4_dequantize_cuda

    return nf4_dequantize_cuda(q, dtype=dtype, out=out)
