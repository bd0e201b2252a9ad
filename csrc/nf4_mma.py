"""Launcher for the CUDA C++ NF4 tensor-core matmul (``csrc/nf4_mma.cu``): y = x @ dequant(W, x.dtype)^T (+ bias)
for fp16/bf16 x with up to MMA_MAX_M rows per launch (short sequences, batched decode).

Same contract as ``csrc.nf4_gemv.nf4_gemv_cuda``: x (..., K), the NF4 tensors of W (N, K) in the layout of
``quant/nf4.py``, optional bias (N,) of x's dtype; returns (..., N) in x's dtype. The weight is rounded to x's
dtype exactly as ``dequantize_nf4_ref(q, x.dtype)`` rounds it, so the result is ``F.linear(x, dequant(W))`` up to
the order of the fp32 accumulation. W is read once (N*K/2 packed bytes + N*K/blocksize absmax bytes) and never
written out; that is what beats dequantize + cuBLAS (which writes and re-reads N*K*2 bytes) for small M.

Needs K % 128 == 0, a power-of-two blocksize >= 32 and 16-byte aligned packed bytes (``supported``); x rows that
are not 16-byte aligned are copied first. Rows of x are taken MMA_MAX_M at a time.

Launch: blocks of 128 threads cover 128 output features each; ``mma_config`` splits K over a power-of-two number of
blocks per feature tile (2 to 4 blocks per SM in all, by M). With splits > 1 the partial sums go through an fp32
workspace (allocated per call from torch's caching allocator) and a per-tile arrival counter: in eager mode one int32
array per (device, stream), zeroed once and left zeroed by every launch, so launches on one stream reuse it safely; inside
a CUDA graph capture each launch gets its own zeroed array (a memset node in the graph), so graphs never share
counters with each other or with eager launches, and nothing a graph holds is ever replaced or freed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _raw_stream
from . import get_kernel
from . import sm_count as _sms
from .nf4_linear import WeightPlan, call_plan_op, check_linear_args, register_plan_op

__all__ = ["nf4_mma_cuda", "MmaPlan", "MMA_MAX_M", "mma_config", "supported"]

MMA_MAX_M = 64
BLOCK_N = 128  # output features per block (4 warps x 4 n8-tiles)
K_STEP = 128   # elements of K per step (4 lanes x 32)
_XT = {torch.float16: 1, torch.bfloat16: 2}
# Launch override for experiments (bench/nf4.py --mma-sweep): {"S": K splits per feature tile}.
CONFIG_OVERRIDE: dict | None = None


def _mt(m: int) -> int:
    return 1 if m <= 16 else 2 if m <= 32 else 4


def supported(shape, blocksize: int) -> str | None:
    """None when the kernel handles this weight, else the reason it does not."""
    k = int(shape[1])
    if k % K_STEP:
        return f"K must be a multiple of {K_STEP}, got K={k}"
    if blocksize < 32 or blocksize & (blocksize - 1):
        return f"blocksize must be a power of two >= 32, got {blocksize}"
    return None


def mma_config(m: int, n: int, k: int, sms: int) -> int:
    """K splits per feature tile, a power of two (uneven splits leave blocks idle: S = 6 and 12 measured slower
    than 4, 8 and 16 everywhere) nearest to a block count of 4 per SM for M <= 8, 3 for M <= 32 and 2 above (more
    rows of x: more work per block), at least two 128-element steps per split. From the H100 sweep
    (``python -m bench.nf4 --mma-sweep``, 2026-11-27): within 5% of the best split on 4096x4096, 14336x4096,
    4096x14336 and 1024x4096 at M = 2, 8, 16, 32 (M = 64: within 8%)."""
    if CONFIG_OVERRIDE is not None:
        return max(1, min(int(CONFIG_OVERRIDE["S"]), k // K_STEP))
    tiles = max(1, -(-n // BLOCK_N))
    steps = k // K_STEP
    per_sm = 4 if m <= 8 else 3 if m <= 32 else 2
    s = 1 << max(0, round(math.log2(max(per_sm * sms / tiles, 1.0))))
    while s > 1 and s > steps // 2:
        s //= 2
    return s


_FUNCS: dict = {}
_COUNTERS: dict = {}  # (device index, stream handle) -> zeroed int32 arrival counters


def _kernel(index: int, xt: int, mt: int):
    key = (index, xt, mt)
    fn = _FUNCS.get(key)
    if fn is None:
        fn = get_kernel("nf4_mma.cu", f"nf4_mma_x{xt}_m{mt}", torch.device("cuda", index),
                        extra_options=(f"-DMMA_XT={xt}", f"-DMMA_MT={mt}"))
        _FUNCS[key] = fn
    return fn


def _counters(index: int, tiles: int) -> torch.Tensor:
    if torch.cuda.is_current_stream_capturing():  # per launch, owned by the graph's pool (see the module docstring)
        return torch.zeros(tiles, dtype=torch.int32, device=torch.device("cuda", index))
    key = (index, _raw_stream(index))
    c = _COUNTERS.get(key)
    if c is None or c.numel() < tiles:
        c = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=torch.device("cuda", index))
        if len(_COUNTERS) > 64:  # streams come and go (graph capture, side streams)
            _COUNTERS.clear()
        _COUNTERS[key] = c
    return c


def _check(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    where = "nf4_mma_cuda"
    check_linear_args(where, _XT, "float16 or bfloat16 (tensor cores)", x, data, absmax, nested_absmax, nested_code,
                      offset, code, shape, blocksize, nested_blocksize, bias)
    why = supported(shape, blocksize)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    if data.data_ptr() % 16:
        raise ValueError(f"{where}: the packed weight bytes must be 16-byte aligned (got an offset view)")


class MmaPlan(WeightPlan):
    """One NF4 weight's kernel arguments for the tensor-core kernel (``WeightPlan``); ``launches``: (m, x dtype) ->
    (kernel, grid, splits)."""

    __slots__ = ()

    def __init__(self, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
        super().__init__(_check, _sms, torch.bfloat16, data, absmax, nested_absmax, nested_code, offset, code, shape,
                         blocksize, nested_blocksize)

    def __call__(self, x2: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """y (M, N) = x2 (M, K) @ W^T (+ bias); x2 rows unit-stride, y contiguous; no checks here."""
        if self.n == 0 or x2.shape[0] == 0:
            return y
        esize = x2.element_size()
        if x2.data_ptr() % 16 or (x2.stride(0) * esize) % 16:
            x2 = x2.clone(memory_format=torch.contiguous_format)  # fresh storage: 16-byte aligned rows (K % 128 == 0)
        m_all, stride = x2.shape[0], x2.stride(0)
        bp = None if bias is None else np.uint64(bias.data_ptr())
        for r0 in range(0, m_all, MMA_MAX_M):
            m = min(MMA_MAX_M, m_all - r0)
            self._launch(m, x2.dtype, stride, x2.data_ptr() + r0 * stride * esize, bp,
                         y.data_ptr() + r0 * self.n * y.element_size(), x2.device)
        return y

    def _launch(self, m, dtype, stride, xp, bp, yp, device):
        key = (m, dtype)
        cfg = self.launches.get(key)
        if cfg is None or CONFIG_OVERRIDE is not None:
            if dtype not in _XT:  # the plan is validated for the weight only; x's dtype is checked here, once
                raise ValueError(f"nf4_mma_cuda: x must be float16 or bfloat16 (tensor cores), got {dtype}")
            splits = mma_config(m, self.n, self.k, self.sms)
            tiles = -(-self.n // BLOCK_N)
            cfg = (_kernel(self.index, _XT[dtype], _mt(m)), (tiles, splits), splits)
            if CONFIG_OVERRIDE is None:
                self.launches[key] = cfg
        kernel, grid, splits = cfg
        if splits > 1:
            ws = torch.empty(splits * m * self.n, dtype=torch.float32, device=device)
            counters = _counters(self.index, grid[0])
            wsp, cp = np.uint64(ws.data_ptr()), np.uint64(counters.data_ptr())
        else:
            ws = counters = None
            wsp = cp = np.uint64(0)
        xa = np.uint64(xp)
        self._run(kernel, grid, (128,), (xa,) + self.wargs + (xa if bp is None else bp, np.uint64(yp), wsp, cp,
                  np.int32(m), np.int32(self.n), np.int32(self.k), np.int64(stride)) + self.flags
                  + (np.int32(bp is not None),))
        del ws, counters  # the caching allocator reuses them only after this stream's kernel (stream-ordered)


_op = register_plan_op("nf4_mma_cuda", MmaPlan)


def nf4_mma_cuda(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64,
                 nested_blocksize=256, bias=None) -> torch.Tensor:
    """y = x @ dequant(W, x.dtype)^T (+ bias) on tensor cores, W decoded in registers (small M).

    Args:
        x: (..., K) fp16/bf16 on CUDA (MMA_MAX_M rows per launch). data/absmax/nested_absmax/nested_code/offset/
            code: the NF4 tensors of W (layouts in ``quant/nf4.py``). shape: (N, K), K % 128 == 0. bias: optional
            (N,) of x's dtype.
    Returns:
        (..., N) in x's dtype. Differentiable in x and bias (the backward dequantizes W once).
    """
    return call_plan_op(_op, _check, x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize,
                        nested_blocksize, bias)
