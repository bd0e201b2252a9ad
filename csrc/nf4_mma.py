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

from triton_ops.nf4_matmul import register_linear_autograd

from . import _raw_stream
from . import current_stream as _stream
from . import get_kernel
from . import sm_count as _sms
from .nf4_dequant import check_state, nf4_dequantize_cuda_tensors

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
    n_out, k = int(shape[0]), int(shape[1])
    if x.dtype not in _XT:
        raise ValueError(f"{where}: x must be float16 or bfloat16 (tensor cores), got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x has {x.shape[-1]} features but the weight is {tuple(shape)} (N, K)")
    if x.device.type != "cuda":
        raise ValueError(f"{where}: tensors must be on a CUDA device, got x on {x.device}")
    check_state(where, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    why = supported(shape, blocksize)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    if data.data_ptr() % 16:
        raise ValueError(f"{where}: the packed weight bytes must be 16-byte aligned (got an offset view)")
    if data.device != x.device:
        raise ValueError(f"{where}: the weight is on {data.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (n_out,) or bias.dtype != x.dtype or bias.device != x.device
                             or not bias.is_contiguous()):
        raise ValueError(f"{where}: bias must be a contiguous ({n_out},) {x.dtype} tensor on {x.device}, got "
                         f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")


class MmaPlan:
    """One NF4 weight's kernel arguments, validated and flattened once (device pointers as np.uint64), so an eager
    call only adds x, bias, y and the workspace. The plan keeps the weight's tensors alive."""

    __slots__ = ("index", "n", "k", "tensors", "wargs", "flags", "sms", "launches")

    def __init__(self, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
        data = data.reshape(-1)
        double = nested_absmax is not None
        offset = offset.reshape(1) if double else None
        probe = torch.empty(0, device=data.device, dtype=torch.bfloat16)
        _check(probe.new_empty(1, int(shape[1])), data, absmax, nested_absmax if double else None,
               nested_code if double else None, offset, code, shape, blocksize, nested_blocksize, None)
        self.index = data.device.index if data.device.index is not None else torch.cuda.current_device()
        self.n, self.k = int(shape[0]), int(shape[1])
        dummy = absmax  # never read without double quantization
        self.tensors = (data, absmax, nested_absmax if double else dummy, nested_code if double else dummy,
                        offset if double else dummy, code)
        self.wargs = tuple(np.uint64(t.data_ptr()) for t in self.tensors)
        self.flags = (np.int32(blocksize.bit_length() - 1), np.int32(nested_blocksize.bit_length() - 1),
                      np.int32(double))
        self.sms = _sms(self.index)
        self.launches: dict = {}  # (m, x dtype) -> (kernel, grid, splits)

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
        args = ((xa,) + self.wargs + (xa if bp is None else bp, np.uint64(yp), wsp, cp, np.int32(m), np.int32(self.n),
                np.int32(self.k), np.int64(stride)) + self.flags + (np.int32(bp is not None),))
        if self.index == torch.cuda.current_device():
            kernel(grid, (128,), args, stream=_stream(self.index))
        else:
            with torch.cuda.device(self.index):
                kernel(grid, (128,), args, stream=_stream(self.index))
        del ws, counters  # the caching allocator reuses them only after this stream's kernel (stream-ordered)


def _launch(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    plan = MmaPlan(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    x2 = x.reshape(-1, plan.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], plan.n, dtype=x.dtype, device=x.device)
    return plan(x2, bias, y).view(*x.shape[:-1], plan.n)


# -- torch.library registration ---------------------------------------------------------------------------------
@torch.library.custom_op("minitrain::nf4_mma_cuda", mutates_args=())
def _nf4_mma_cuda_op(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                     nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                     shape: list[int], blocksize: int, nested_blocksize: int,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return _launch(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias)


@_nf4_mma_cuda_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    return x.new_empty(*x.shape[:-1], shape[0])


register_linear_autograd(_nf4_mma_cuda_op, nf4_dequantize_cuda_tensors)  # dx = dy W, W dequantized again


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
    shape = [int(shape[0]), int(shape[1])]
    data = data.reshape(-1)
    double = nested_absmax is not None
    offset = offset.reshape(1) if double else None
    _check(x, data, absmax, nested_absmax, nested_code if double else None, offset, code, shape, blocksize,
           nested_blocksize, bias)
    return torch.ops.minitrain.nf4_mma_cuda(x, data, absmax, nested_absmax, nested_code if double else None, offset,
                                            code, shape, blocksize, nested_blocksize, bias)
