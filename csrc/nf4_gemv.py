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

from triton_ops.nf4_matmul import register_linear_autograd

from . import current_stream as _stream
from . import get_kernel
from . import sm_count as _sms
from .nf4_dequant import check_state, nf4_dequantize_cuda_tensors

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
    where = "nf4_gemv_cuda"
    n_out, k = int(shape[0]), int(shape[1])
    if x.dtype not in _XT:
        raise ValueError(f"{where}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x has {x.shape[-1]} features but the weight is {tuple(shape)} (N, K)")
    if x.device.type != "cuda":
        raise ValueError(f"{where}: tensors must be on a CUDA device, got x on {x.device}")
    check_state(where, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    if data.device != x.device:
        raise ValueError(f"{where}: the weight is on {data.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (n_out,) or bias.dtype != x.dtype or bias.device != x.device
                             or not bias.is_contiguous()):
        raise ValueError(f"{where}: bias must be a contiguous ({n_out},) {x.dtype} tensor on {x.device}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")


class GemvPlan:
    """One NF4 weight's kernel arguments, validated and flattened once (device pointers as np.uint64), so an eager
    call only adds x, bias and y. The plan keeps the weight's tensors alive; build a new one if they change."""

    __slots__ = ("index", "n", "k", "tensors", "wargs", "tail", "flags", "data_aligned", "sms", "launches")

    def __init__(self, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
        data = data.reshape(-1)
        double = nested_absmax is not None
        offset = offset.reshape(1) if double else None
        probe = torch.empty(0, device=data.device)
        _check(probe.new_empty(1, int(shape[1])), data, absmax, nested_absmax if double else None,
               nested_code if double else None, offset, code, shape, blocksize, nested_blocksize, None)
        self.index = data.device.index if data.device.index is not None else torch.cuda.current_device()
        self.n, self.k = int(shape[0]), int(shape[1])
        dummy = absmax  # never read without double quantization
        self.tensors = (data, absmax, nested_absmax if double else dummy, nested_code if double else dummy,
                        offset if double else dummy, code)
        self.wargs = tuple(np.uint64(t.data_ptr()) for t in self.tensors)
        self.tail = (np.int32(self.n), np.int32(self.k))
        self.flags = (np.int32(blocksize.bit_length() - 1), np.int32(nested_blocksize.bit_length() - 1),
                      np.int32(double))
        self.data_aligned = data.data_ptr() % 16 == 0 and self.k % 32 == 0
        self.sms = _sms(self.index)
        self.launches: dict = {}  # (m, x dtype, x row stride, bias?, x aligned?) -> launch configuration

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
        args = (xa,) + self.wargs + (xa if bp is None else bp, np.uint64(yp)) + tail
        if self.index == torch.cuda.current_device():
            kernel(grid, block, args, stream=_stream(self.index))
        else:
            with torch.cuda.device(self.index):
                kernel(grid, block, args, stream=_stream(self.index))


def _launch(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    """Plan and launch for one call (the op's implementation): x (..., K) -> (..., N)."""
    plan = GemvPlan(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    x2 = x.reshape(-1, plan.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], plan.n, dtype=x.dtype, device=x.device)
    return plan(x2, bias, y).view(*x.shape[:-1], plan.n)


# -- torch.library registration ---------------------------------------------------------------------------------
@torch.library.custom_op("minitrain::nf4_gemv_cuda", mutates_args=())
def _nf4_gemv_cuda_op(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                      nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                      shape: list[int], blocksize: int, nested_blocksize: int,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias)


@_nf4_gemv_cuda_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    return x.new_empty(*x.shape[:-1], shape[0])


register_linear_autograd(_nf4_gemv_cuda_op, nf4_dequantize_cuda_tensors)  # dx = dy W, W dequantized again


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
    shape = [int(shape[0]), int(shape[1])]
    data = data.reshape(-1)
    double = nested_absmax is not None
    offset = offset.reshape(1) if double else None
    _check(x, data, absmax, nested_absmax, nested_code if double else None, offset, code, shape, blocksize,
           nested_blocksize, bias)
    return torch.ops.minitrain.nf4_gemv_cuda(x, data, absmax, nested_absmax, nested_code if double else None, offset,
                                             code, shape, blocksize, nested_blocksize, bias)
