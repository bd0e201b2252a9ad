"""RMSNorm with Hugging Face LlamaRMSNorm's exact casting, fused forward and backward.

Forward, per row x of C elements (statistics in fp32, two roundings exactly where transformers has them):

    r  = rsqrt(mean(x32^2) + eps)             fp32, saved for the backward (4 bytes per row)
    h  = (x32 * r).to(x.dtype)                rounded to the input dtype, as ``hidden.to(input_dtype)``
    y  = (w * h)                              in promote(w.dtype, x.dtype), as ``self.weight * hidden``

Backward, with x^ = x32 * r and g = dy * w (fp32, no intermediate rounding):

    dx = r * (g - x^ * mean(g * x^))          (the rounding of h is passed straight through, as autograd does)
    dw = sum over rows of dy * h              (h rounded, the exact derivative of y = w * h)

dw is accumulated in fp32 by a fixed set of persistent programs, one partial row each, then summed by a
deterministic reduction: no atomics, the same bits on every run.

Layout: x (..., C) whose rows are evenly strided with unit column stride (any contiguous tensor or a row
slice of one); weight (C,). Bytes moved per element: forward reads x and writes y (2 * elem bytes); backward
reads x and dy and writes dx (3 * elem bytes) plus one fp32 partial row of C per program for dw.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "MINITRAIN_RMS_NORM_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_C = 65536  # one row lives in registers; wider rows would spill heavily


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure torch, the specification: transformers' LlamaRMSNorm.forward, operation for operation."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, C, inv_c, sx, sy, eps,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N*C can pass 2^31
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    mask = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=1) * inv_c  # torch's mean multiplies by fp32(1/C) too
    rstd = tl.math.rsqrt(var + eps)  # the same rsqrtf torch.rsqrt uses on CUDA
    h = (x32 * rstd[:, None]).to(x.dtype)  # the rounding transformers does with hidden.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=cols < C, other=0.0)
    y = w.to(tl.float32)[None, :] * h.to(tl.float32)  # bf16*bf16 is exact in fp32: one rounding, as torch's mul
    tl.store(y_ptr + rows[:, None] * sy + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, C, inv_c, sdy, sx, sdx,
                         HAS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    # persistent: program p takes row blocks p, p + P, p + 2P, ... and keeps its dw partial in registers
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for start in range(pid * BLOCK_M, N, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = x.to(tl.float32) * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) * inv_c
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * sdx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DW:
            acc += dy * xhat.to(x.dtype).to(tl.float32)
    if HAS_DW:
        tl.store(dw_part_ptr + pid.to(tl.int64) * C + cols, tl.sum(acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x (..., C) as an (N, C) view with unit column stride, or a clear error (no hidden copies)."""
    C = x.shape[-1]
    if x.stride(-1) != 1 and C > 1:
        raise ValueError(f"rms_norm: {name} must have unit stride in its last dim, got strides {x.stride()}")
    try:
        return x.view(-1, C)
    except RuntimeError:
        raise ValueError(f"rms_norm: {name} of shape {tuple(x.shape)} and strides {x.stride()} cannot be viewed "
                         f"as (rows, {C}); pass a contiguous tensor") from None


def _fwd_config(C: int) -> tuple[int, int, int]:
    # tiles of up to 16K elements (several short rows per program), ~32 elements per thread: ~64 registers,
    # two programs per SM, 64 KB of loads in flight per SM
    block_c = triton.next_power_of_2(C)
    block_m = max(1, min(16, 16384 // block_c))
    return block_c, block_m, min(16, max(4, block_c * block_m // 1024))


def _bwd_config(C: int) -> tuple[int, int, int]:
    # ~8 elements per thread: ~64 registers with w and the dw partial held in fp32 (checked with ptxas, sm_90)
    block_c = triton.next_power_of_2(C)
    block_m = max(1, min(16, 2048 // block_c))
    return block_c, block_m, min(32, max(4, block_c * block_m // 256))


def check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("rms_norm: x and weight must be tensors")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rms_norm: x and weight must be float32/float16/bfloat16, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1] if x.dim() else '?'},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if x.shape[-1] > MAX_C:
        raise ValueError(f"rms_norm: C={x.shape[-1]} is above the kernel's limit of {MAX_C}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_inputs(x, weight)
    C = x.shape[-1]
    x2 = _rows(x, "x")
    N = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if N == 0 or C == 0:
        return y, rstd.fill_(1.0 / eps**0.5) if C == 0 else rstd
    block_c, block_m, num_warps = _fwd_config(C)
    _rms_norm_fwd_kernel[(triton.cdiv(N, block_m),)](
        x2, weight, y, rstd, N, C, 1.0 / C, x2.stride(0), C, eps, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    C = x.shape[-1]
    x2 = _rows(x, "x")
    N = x2.shape[0]
    if dy.shape != x.shape:
        raise ValueError(f"rms_norm backward: dy must be {tuple(x.shape)}, got {tuple(dy.shape)}")
    try:
        dy2 = _rows(dy, "dy")
    except ValueError:  # incoming gradients may be expanded or transposed: one copy is the cheapest fix
        dy2 = _rows(dy.contiguous(), "dy")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    block_c, block_m, num_warps = _bwd_config(C)
    n_blocks = triton.cdiv(N, block_m)
    if _interpreting() or x.device.type != "cuda":
        n_prog = max(1, min(n_blocks, 4))
    else:  # persistent: as many programs as fit on the card at ~64 registers per thread
        n_prog = max(1, min(n_blocks, _sm_count(x.device.index or 0) * max(1, 32 // num_warps)))
    part = torch.empty((n_prog, C) if need_dw else (1, 1), dtype=torch.float32, device=x.device)
    if N > 0 and C > 0:
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2, x2, weight, rstd, dx, part, N, C, 1.0 / C, dy2.stride(0), x2.stride(0), C,
            HAS_DW=need_dw, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps)
    if not need_dw:
        return dx, weight.new_empty(0)
    if N == 0:
        return dx, torch.zeros_like(weight)
    return dx, part.sum(0).to(weight.dtype)  # fixed-order reduction of the partials: deterministic


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minitrain::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minitrain::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, x, weight, rstd, need_dw)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, need_dw):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if need_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, _drstd):
    """dx = r (g - x^ mean(g x^)) with g = dy w, x^ = x r; dw = sum_rows dy * round(x^) (module docstring)."""
    x, weight, rstd = ctx.saved_tensors
    need_dw = bool(ctx.needs_input_grad[1])
    dx, dw = torch.ops.minitrain.rms_norm_backward(dy, x, weight, rstd, need_dw)
    return dx, (dw if need_dw else None), None


torch.library.register_autograd("minitrain::rms_norm", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Root-mean-square normalization, numerically as transformers' LlamaRMSNorm.

    Args:
        x: (..., C) float32/float16/bfloat16 activations with unit last-dim stride and evenly strided rows.
        weight: (C,) scale; its gradient is computed only when it requires grad.
        eps: added to the mean square before the rsqrt.
        backend: "auto" (Triton on CUDA, the reference on CPU; env MINITRAIN_RMS_NORM_BACKEND overrides),
            "torch" (the reference) or "triton" (on CPU only under TRITON_INTERPRET=1).
    Returns:
        (..., C) tensor of dtype promote(x.dtype, weight.dtype), like ``weight * hidden.to(input_dtype)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rms_norm: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" else "torch"
    check_inputs(x, weight)
    if backend == "torch":
        return rms_norm_ref(x, weight, eps)
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"rms_norm: backend 'triton' needs CUDA tensors, got {x.device} "
                         "(CPU tensors run the kernel only under TRITON_INTERPRET=1)")
    return torch.ops.minitrain.rms_norm(x, weight, float(eps))[0]
