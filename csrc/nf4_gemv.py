"""Launcher for the CUDA C++ NF4 GEMV (``csrc/nf4_gemv.cu``): y = x @ dequant(W)^T (+ bias) for M <= 8 rows of x.

Same contract as ``triton_ops.nf4_matmul.nf4_gemv``: x (..., K) fp32/fp16/bf16, the NF4 tensors of W (N, K) in
the layout of ``quant/nf4.py``, optional bias (N,) of x's dtype; returns (..., N) in x's dtype. W is read once
at 4.1 bits per weight (N*K/2 packed bytes + N*K/64 absmax bytes); x (M*K) is re-read from L1/L2 by every
block. Weight values are formed in fp32 and not rounded to x's dtype, and sums are fp32, so the result differs
from ``F.linear(x, dequant(W, x.dtype))`` only by accumulation order and that rounding (not bit-exact).
Any K works (K % 32 == 0 with 16-byte aligned pointers takes the vectorized path, anything else a scalar one).

One instantiation per (x dtype, rows MT, weight rows per block R) is compiled through CuPy/NVRTC at first use
(``-DGEMV_XT=.. -DGEMV_MT=.. -DGEMV_R=..``) and launched on torch's current stream. ``GemvPlan`` holds one
weight's validated, flattened kernel arguments so that an eager decode call does almost no Python work.
"""
from __future__ import annotations

import numpy as np
import torch

from . import get_kernel
from . import sm_count as _sms
from .nf4_linear import WeightPlan, call_plan_op, check_linear_args, register_plan_op

__all__ = ["nf4_gemv_cuda", "GemvPlan", "GEMV_MAX_M", "gemv_config"]

GEMV_MAX_M = 8
_XT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ESIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}
# Launch configuration override for experiments (bench/nf4.py --sweep): {"R": weight rows per block (1, 2, 4, 8),
# "W": warps per block splitting K (1..8)}.
CONFIG_OVERRIDE: dict | None = None


def _mt(m: int) -> int:
    return 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8


def gemv_config(m: int, n: int, k: int, sms: int) -> tuple[int, int]:
    """(R, W): R weight rows per block (R * MT <= 32 accumulators per lane), halved while there would be fewer
    than two blocks per SM; W warps per block share the 1024-element chunks of K."""
    mt = _mt(m)
    if CONFIG_OVERRIDE is not None:
        r, w = int(CONFIG_OVERRIDE["R"]), int(CONFIG_OVERRIDE["W"])
        return min(r, 32 // mt), max(1, min(w, 8))
    # From the H100 sweep (python -m bench.nf4 --sweep, 2026-11-27): M=1 fastest at R=8, W=4 on 4096x4096,
    # 14336x4096 and 4096x14336 (10.3, 23.5, 24.4 us); M=2..8 at R=4 (or 8), W=2. The old "W balanced over
    # the K chunks" rule picked W=7 for K=14336 (not measured faster).
    r = min(8 if m == 1 else 4, 32 // mt)
    while r > 1 and -(-n // r) < 2 * sms:
        r //= 2
    w = min(4 if m == 1 else 2, -(-k // 1024))
    return r, w


# Compiled kernels per (device, x dtype, M tile, rows per block), per process.
_FUNCS: dict = {}


def _kernel(index: int, xt: int, mt: int, r: int):
    key = (index, xt, mt, r)
    fn = _FUNCS.get(key)
    if fn is None:
        fn = get_kernel("nf4_gemv.cu", f"nf4_gemv_x{xt}_m{mt}_r{r}", torch.device("cuda", index),
                        extra_options=(f"-DGEMV_XT={xt}", f"-DGEMV_MT={mt}", f"-DGEMV_R={r}"))
        _FUNCS[key] = fn
    return fn


def _check(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    check_linear_args("nf4_gemv_cuda", _XT, "float32, float16 or bfloat16", x, data, absmax, nested_absmax,
                      nested_code, offset, code, shape, blocksize, nested_blocksize, bias)


class GemvPlan(WeightPlan):
    """One NF4 weight's kernel arguments for the GEMV (``WeightPlan``), plus whether its bytes allow the vectorized
    path; ``launches``: (m, x dtype, x row stride, bias?, x aligned?) -> launch configuration."""

    __slots__ = ("tail", "data_aligned")

    def __init__(self, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
        super().__init__(_check, _sms, torch.float32, data, absmax, nested_absmax, nested_code, offset, code, shape,
                         blocksize, nested_blocksize)
        self.tail = (np.int32(self.n), np.int32(self.k))
        self.data_aligned = self.tensors[0].data_ptr() % 16 == 0 and self.k % 32 == 0

    def _launch_config(self, m: int, dtype: torch.dtype, stride: int, has_bias: bool, x_aligned: bool):
        """(kernel, grid, block, the trailing scalar arguments) for one kind of call, cached."""
        key = (m, dtype, stride, has_bias, x_aligned)
        cfg = self.launches.get(key)
        if cfg is None or CONFIG_OVERRIDE is not None:
            r, w = gemv_config(m, self.n, self.k, self.sms)
            vec = self.data_aligned and x_aligned and (stride * _ESIZE[dtype]) % 16 == 0
            tail = (np.int32(m),) + self.tail + (np.int64(stride),) + self.flags + (np.int32(has_bias), np.int32(vec))
            cfg = (_kernel(self.index, _XT[dtype], _mt(m), r), (-(-self.n // r),), (32 * w,), tail)
            if CONFIG_OVERRIDE is None:
                self.launches[key] = cfg
        return cfg

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """y (M, N) = x2 (M, K) @ W^T (+ bias); x2 rows unit-stride, y contiguous; no checks here. Rows of x are
        taken GEMV_MAX_M at a time (one launch each; meant for M <= GEMV_MAX_M)."""
        m_all = x2.shape[0]
        stride = x2.stride(0)
        xp, yp = x2.data_ptr(), y.data_ptr()
        bp = None if bias is None else np.uint64(bias.data_ptr())
        if m_all <= GEMV_MAX_M:  # the decode case: one launch
            self._launch(m_all, x2.dtype, stride, xp, bp, yp)
            return y
        xrow, yrow = stride * x2.element_size(), self.n * y.element_size()
        for r0 in range(0, m_all, GEMV_MAX_M):
            self._launch(min(GEMV_MAX_M, m_all - r0), x2.dtype, stride, xp + r0 * xrow, bp, yp + r0 * yrow)
        return y

    def _launch(self, m, dtype, stride, xp, bp, yp):
        kernel, grid, block, tail = self._launch_config(m, dtype, stride, bp is not None, xp % 16 == 0)
        xa = np.uint64(xp)
        self._run(kernel, grid, block, (xa,) + self.wargs + (xa if bp is None else bp, np.uint64(yp)) + tail)


_op = register_plan_op("nf4_gemv_cuda", GemvPlan)


def nf4_gemv_cuda(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64,
                  nested_blocksize=256, bias=None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) with the CUDA C++ GEMV, for few rows of x (decode).

    Args:
        x: (..., K) fp32/fp16/bf16 on CUDA; rows are taken GEMV_MAX_M at a time (meant for M <= GEMV_MAX_M). data/absmax/nested_absmax/nested_code/
            offset/code: the NF4 tensors of W (layouts in ``quant/nf4.py``). shape: (N, K). bias: optional (N,)
            of x's dtype.
    Returns:
        (..., N) in x's dtype. Differentiable in x and bias (the backward dequantizes W once).
    """
    return call_plan_op(_op, _check, x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize,
                        nested_blocksize, bias)
