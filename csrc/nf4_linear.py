"""What the CUDA C++ small-M NF4 matmuls (``csrc.nf4_gemv``, ``csrc.nf4_mma``) share.

Both compute y = x @ dequant(W)^T (+ bias) for an NF4 weight W (N, K) in the layout of ``quant/nf4.py`` and keep
the same contract: x (..., K) on CUDA, optional bias (N,) of x's dtype, result (..., N) in x's dtype,
differentiable in x and bias. Shared here:

* ``check_linear_args``: the argument checks (each kernel adds its own limits on top);
* ``WeightPlan``: one weight's validated kernel arguments, flattened once to device pointers (np.uint64) so that an
  eager call only adds x, bias and y; the launch on torch's current stream of the weight's device;
* ``run_plan``: x (..., K) -> (..., N) through a plan (rows made unit-stride, y allocated);
* ``register_plan_op`` / ``call_plan_op``: the ``torch.library`` op around a plan (autograd from
  ``triton_ops.nf4_matmul.register_linear_op``: the backward dequantizes W once) and its checked entry point.
"""
from __future__ import annotations

import numpy as np
import torch

from triton_ops.nf4_matmul import register_linear_op

from . import current_stream as _stream
from .nf4_dequant import check_state, nf4_dequantize_cuda_tensors

__all__ = ["check_linear_args", "WeightPlan", "run_plan", "register_plan_op", "call_plan_op"]


def check_linear_args(where, dtypes, dtype_text, x, data, absmax, nested_absmax, nested_code, offset, code, shape,
                      blocksize, nested_blocksize, bias) -> None:
    """x's dtype in ``dtypes`` (``dtype_text`` says which), features, device; the NF4 tensors; the bias."""
    n_out, k = int(shape[0]), int(shape[1])
    if x.dtype not in dtypes:
        raise ValueError(f"{where}: x must be {dtype_text}, got {x.dtype}")
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


class WeightPlan:
    """One NF4 weight's kernel arguments, validated (by ``check``, the kernel's own checks, with a one-row probe x of
    ``probe_dtype``) and flattened once: ``wargs`` (data, absmax, nested absmax, nested code, offset, code pointers;
    absmax stands in for the nested tensors without double quantization, which the kernels then never read) and
    ``flags`` (log2 blocksize, log2 nested blocksize, double quantization). ``launches`` caches each subclass's
    launch configurations. The plan keeps the weight's tensors alive; build a new one if they change."""

    __slots__ = ("index", "n", "k", "tensors", "wargs", "flags", "sms", "launches")

    def __init__(self, check, sm_count, probe_dtype, data, absmax, nested_absmax, nested_code, offset, code, shape,
                 blocksize, nested_blocksize):
        data = data.reshape(-1)
        double = nested_absmax is not None
        offset = offset.reshape(1) if double else None
        probe = torch.empty(0, device=data.device, dtype=probe_dtype)
        check(probe.new_empty(1, int(shape[1])), data, absmax, nested_absmax if double else None,
              nested_code if double else None, offset, code, shape, blocksize, nested_blocksize, None)
        self.index = data.device.index if data.device.index is not None else torch.cuda.current_device()
        self.n, self.k = int(shape[0]), int(shape[1])
        dummy = absmax
        self.tensors = (data, absmax, nested_absmax if double else dummy, nested_code if double else dummy,
                        offset if double else dummy, code)
        self.wargs = tuple(np.uint64(t.data_ptr()) for t in self.tensors)
        self.flags = (np.int32(blocksize.bit_length() - 1), np.int32(nested_blocksize.bit_length() - 1),
                      np.int32(double))
        self.sms = sm_count(self.index)
        self.launches: dict = {}

    def _run(self, kernel, grid, block, args) -> None:
        """Launch on torch's current stream of the weight's device."""
        if self.index == torch.cuda.current_device():
            kernel(grid, block, args, stream=_stream(self.index))
        else:
            with torch.cuda.device(self.index):
                kernel(grid, block, args, stream=_stream(self.index))


def run_plan(plan, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) -> (..., N) through ``plan(x2, bias, y)`` (rows of x2 unit-stride, y contiguous); no checks."""
    x2 = x if x.dim() == 2 else x.reshape(-1, plan.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], plan.n, dtype=x.dtype, device=x.device)
    plan(x2, bias, y)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], plan.n)


def register_plan_op(name: str, plan_cls):
    """``minitrain::<name>``: a fresh ``plan_cls`` per call (the op path; eager callers keep their plans), run."""

    def impl(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
        plan = plan_cls(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
        return run_plan(plan, x, bias)

    return register_linear_op(name, impl, nf4_dequantize_cuda_tensors)  # dx = dy W, W dequantized again


def call_plan_op(op, check, x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize,
                 nested_blocksize, bias) -> torch.Tensor:
    """The checked entry point: the arguments normalized (shape as ints, flat data, offset (1,) with double
    quantization, no nested code without it), checked by ``check``, then the op."""
    shape = [int(shape[0]), int(shape[1])]
    data = data.reshape(-1)
    double = nested_absmax is not None
    offset = offset.reshape(1) if double else None
    nested_code = nested_code if double else None
    check(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias)
    return op(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias)
