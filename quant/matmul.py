"""x @ dequant(W).T for an NF4 weight.

On CPU (and until a faster path is registered) this dequantizes to x's dtype and calls F.linear; the fast
small-M fused kernel and the buffer-reusing large-M path plug in here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .nf4 import NF4Weight


def matmul_nf4(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(q).T (+ bias).

    Args:
        x: (..., K) float tensor on q's device.
        q: NF4 weight of shape (N, K).
        bias: optional (N,).
    Returns:
        (..., N) in x's dtype.
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"matmul_nf4: x has {x.shape[-1]} features but the weight is {tuple(q.shape)} (N, K)")
    if x.device != q.device:
        raise ValueError(f"matmul_nf4: x is on {x.device} but the weight is on {q.device}")
    w = q.dequantize(dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
