"""x @ dequant(W).T for an NF4 weight, by the fastest path for the shape.

Paths (``backend=``):
* "torch": the reference (``dequantize_nf4_ref`` to x's dtype, then ``F.linear``); always used on CPU.
* "fused": ``triton_ops.nf4_matmul`` dequantizes W tile by tile in registers inside the GEMM/GEMV, so W is
  read once at 4.1 bits per weight and never written out: the fast path for small M (decode, short
  sequences), where dequant + GEMM is bound by writing and re-reading the N*K 16-bit weight.
* "gemv": ``triton_ops.nf4_matmul.nf4_gemv`` for M <= 8 (decode): each program streams a few weight rows once
  with 16-byte loads and reduces in fp32; x is re-read from L1/L2, the weight from DRAM exactly once.
* "dequant": dequantize W into a reused scratch buffer (the measured-fastest dequant kernel) and call cuBLAS
  through ``F.linear``: the fast path for large M, where the GEMM dominates.
* "auto" (default): on CUDA, M > FUSED_MAX_M or a shape the kernels cannot tile -> "dequant"; otherwise the
  first call for a (card, x dtype, N, K, M rounded up to a power of two) times "gemv" (M <= 8) or "fused"
  (M <= FUSED_MAX_M) against "dequant" on the real inputs (CUDA events, median of a few runs) and keeps the
  faster for the rest of the process, so a fused kernel is only used where it measured faster.
  In eager mode with nothing to differentiate, the chosen path is launched directly on the weight's cached,
  validated arguments (no torch.library dispatch); otherwise through the op below. ``MINITRAIN_NF4_MATMUL`` (torch | fused | dequant) overrides.

On CUDA the whole thing is one ``torch.library`` op (``minitrain::nf4_linear``) with a registered autograd
formula: dx = dy @ W, with W dequantized again in the backward rather than saved (the scratch buffer is
reused, so nothing of size N*K outlives the call), and dbias = sum of dy.

The scratch buffer is one flat tensor per (device, dtype), grown to the largest weight seen. Work on one
stream is ordered, so the next dequantization cannot overwrite it before the previous GEMM has read it;
callers running NF4 layers concurrently on several streams should use backend="fused" or "torch".
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .dispatch import _time_us
from .nf4 import NF4Weight, dequantize_nf4_ref

__all__ = ["matmul_nf4", "FUSED_MAX_M", "measured_choices"]

BACKENDS = ("auto", "torch", "gemv", "fused", "dequant")
ENV_VAR = "MINITRAIN_NF4_MATMUL"
FUSED_MAX_M = 256  # beyond this the fused kernel re-dequantizes W for every M tile; cuBLAS wins

# Measurement cache (like functools.lru_cache; results are the same either way, only the speed differs):
# (device index, x dtype, N, K, M bucket) -> "fused" | "dequant".
_MEASURED: dict[tuple, str] = {}
# Reused dequantization buffers: (device index, dtype) -> flat tensor.
_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def measured_choices() -> dict[tuple, str]:
    """What "auto" measured so far: {(device index, dtype, N, K, M bucket): "fused" | "dequant"}."""
    return dict(_MEASURED)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if _capturing(device):
        return torch.empty(numel, device=device, dtype=dtype)  # a graph owns its own memory
    key = (device.index, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the old one before allocating the larger one
        buf = torch.empty(numel, device=device, dtype=dtype)
        _SCRATCH[key] = buf
    return buf[:numel]


def _weight(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
    return SimpleNamespace(data=data, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code,
                           offset=offset, code=code, shape=torch.Size(shape), blocksize=blocksize,
                           nested_blocksize=nested_blocksize, dtype=torch.bfloat16)


def _dequant_into_scratch(qt, dtype: torch.dtype, fast: bool = False) -> torch.Tensor:
    from .dispatch import _launch_into, _run, resolve_backend

    n, k = qt.shape
    out = _scratch(qt.data.device, dtype, n * k).view(n, k)
    backend = resolve_backend("auto", qt.data.device, dtype, n * k)
    if fast and backend != "torch":  # validated arguments, eager: launch the kernel directly
        return _launch_into(backend, (qt.data, qt.absmax, qt.nested_absmax, qt.nested_code, qt.offset, qt.code,
                                      qt.blocksize, qt.nested_blocksize), out)
    if backend == "torch":  # no kernel could run: the reference needs a full NF4Weight
        qt = NF4Weight(qt.data.view(-1, 1), qt.absmax, qt.shape, dtype, qt.blocksize, qt.code, qt.nested_absmax,
                       qt.nested_code, None if qt.offset is None else qt.offset.reshape(()), qt.nested_blocksize)
    return _run(backend, qt, dtype, out)


def _qargs(qt):
    return (qt.data, qt.absmax, qt.nested_absmax, qt.nested_code, qt.offset, qt.code, list(qt.shape), qt.blocksize,
            qt.nested_blocksize)


def _fused(x, qt, bias, fast: bool = False):
    if fast:
        from triton_ops.nf4_matmul import fused_impl

        return fused_impl(x, *_qargs(qt), bias)
    from triton_ops.nf4_matmul import nf4_matmul

    return nf4_matmul(x, *_qargs(qt), bias)


def _gemv(x, qt, bias, fast: bool = False):
    if fast:
        from triton_ops.nf4_matmul import gemv_impl

        return gemv_impl(x, *_qargs(qt), bias)
    from triton_ops.nf4_matmul import nf4_gemv

    return nf4_gemv(x, *_qargs(qt), bias)


def _dequant_mm(x, qt, bias, fast: bool = False):
    return F.linear(x, _dequant_into_scratch(qt, x.dtype, fast), bias)


_PATHS = {"fused": _fused, "gemv": _gemv, "dequant": _dequant_mm}


def candidates(m: int, shape, blocksize: int) -> tuple[str, ...]:
    """The paths "auto" chooses among for m rows of x: GEMV (m <= GEMV_MAX_M) or the fused GEMM
    (m <= FUSED_MAX_M) when the weight's blocks do not straddle rows, and always dequant + cuBLAS."""
    from triton_ops.nf4_matmul import GEMV_MAX_M, fused_supported

    if not fused_supported(shape, blocksize) or m > FUSED_MAX_M:
        return ("dequant",)
    return ("gemv", "dequant") if m <= GEMV_MAX_M else ("fused", "dequant")


def _choose_path(x, qt, m: int) -> str:
    bucket = 1 << max(m - 1, 0).bit_length()
    key = (x.device.index, x.dtype, qt.shape[0], qt.shape[1], bucket)
    choice = _MEASURED.get(key)
    if choice is not None:
        return choice
    cands = candidates(m, qt.shape, qt.blocksize)
    if len(cands) == 1:
        return cands[0]
    if _capturing(x.device) or torch.compiler.is_compiling():
        return cands[0] if m <= 8 else "dequant"  # no timing inside a capture; the bandwidth-bound guess
    x2 = x.reshape(-1, qt.shape[1]).detach()
    timings = {}
    for name in cands:
        try:
            timings[name] = _time_us(lambda name=name: _PATHS[name](x2, qt, None, True), reps=7)
        except Exception:  # noqa: BLE001 - a kernel that cannot compile here is simply not a candidate
            pass
    choice = min(timings, key=timings.get) if timings else "dequant"
    _MEASURED[key] = choice
    return choice


def _forward(x, qt, bias, path: str, fast: bool = False):
    if path == "auto":
        path = _choose_path(x, qt, x.numel() // qt.shape[1])
    return _PATHS[path](x, qt, bias, fast)


# -- torch.library op (CUDA path) -----------------------------------------------------------------------------
@torch.library.custom_op("minitrain::nf4_linear", mutates_args=())
def _nf4_linear_op(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                   shape: list[int], blocksize: int, nested_blocksize: int, bias: torch.Tensor | None,
                   path: str) -> torch.Tensor:
    qt = _weight(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    return _forward(x, qt, bias, path)


@_nf4_linear_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias, path):
    return x.new_empty(*x.shape[:-1], shape[0])


def _setup_context(ctx, inputs, output):
    x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias, _ = inputs
    ctx.q = (data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """y = x W^T + b  =>  dx = dy W (W dequantized again into the scratch buffer), db = sum over rows of dy."""
    qt = _weight(*ctx.q)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ _dequant_into_scratch(qt, grad_y.dtype)
    grad_b = grad_y.reshape(-1, qt.shape[0]).sum(0) if ctx.has_bias and ctx.needs_input_grad[10] else None
    return (grad_x,) + (None,) * 9 + (grad_b, None)


_nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)


def matmul_nf4(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """y = x @ dequant(q).T (+ bias).

    Args:
        x: (..., K) float tensor on q's device.
        q: NF4 weight of shape (N, K).
        bias: optional (N,).
        backend: "auto" | "torch" | "fused" | "dequant" (see the module docstring).
    Returns:
        (..., N) in x's dtype; differentiable in x and bias.
    """
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"matmul_nf4: x has {x.shape[-1]} features but the weight is {tuple(q.shape)} (N, K)")
    if x.device != q.device:
        raise ValueError(f"matmul_nf4: x is on {x.device} but the weight is on {q.device}")
    if backend not in BACKENDS:
        raise ValueError(f"matmul_nf4: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"matmul_nf4: x must be float32, float16 or bfloat16, got {x.dtype}")
    if bias is not None:
        if bias.shape != (q.shape[0],):
            raise ValueError(f"matmul_nf4: bias must have shape ({q.shape[0]},), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype)
    if backend == "torch" or (x.device.type != "cuda" and backend == "auto"):
        return F.linear(x, dequantize_nf4_ref(q, x.dtype), bias)
    if (x.is_cuda and type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))):
        # Eager, nothing to differentiate: the same forward without the torch.library op, on the weight's cached
        # validated arguments (the op's dispatch and per-call checks cost more than a decode GEMV takes).
        from .dispatch import prepared_args

        a = prepared_args(q)
        qt = _weight(*a[:6], list(q.shape), a[6], a[7])
        return _forward(x, qt, bias, backend, fast=True)
    double = q.double_quant
    offset = q.offset.reshape(1) if double else None
    # One op for every path; on CPU (explicit kernel paths) the Triton kernels run under the interpreter.
    return torch.ops.minitrain.nf4_linear(x, q.data.reshape(-1), q.absmax, q.nested_absmax if double else None,
                                          q.nested_code if double else None, offset, q.code, list(q.shape),
                                          q.blocksize, q.nested_blocksize, bias, backend)
