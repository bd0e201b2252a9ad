"""SwiGLU: h = silu(g) * u, with a fused forward and an in-place backward.

Formula (elementwise, fp32 math, one cast of each result):
    h  = silu(g) * u = g * sigmoid(g) * u
    du = dh * silu(g)
    dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

Layouts: gate g and up u are (..., F), any leading shape; each is viewed as rows of F with its own row
stride (the last dimension must be contiguous), so a slice of a fused gate|up projection works without a
copy. dh has the shape of h.

Bytes moved per element (16-bit): forward reads g, u and writes h: 6 bytes. Backward reads dh, g, u and
writes dg, du (and h when asked, for the down projection's adapter gradients): 10 or 12 bytes.

The in-place backward (``swiglu_backward_``) overwrites its three inputs: dh <- h (optional),
g <- dg, u <- du. ``lora_mlp`` uses it on the pre-activations it saved itself, so the backward of a whole
SwiGLU MLP allocates no (tokens x F) buffer beyond the one holding dh. The standalone ``swiglu`` op's
autograd formula writes fresh dg/du buffers with the same kernel: the gate and up tensors it received
belong to the caller, who may still read them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["swiglu", "swiglu_ref", "swiglu_backward_ref", "swiglu_backward",
           "swiglu_backward_"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in fp32, cast once to gate's dtype: the specification."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def swiglu_backward_ref(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(dg, du, h) in fp32 math, each cast once to gate's dtype."""
    g, u, d = gate.float(), up.float(), dh.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    dg = d * u * sig * (1.0 + g * (1.0 - sig))
    return dg.to(gate.dtype), (d * silu).to(gate.dtype), (silu * u).to(gate.dtype)


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, h_ptr, dh_ptr, dg_ptr, du_ptr, n_rows, n_cols,
                   stride_g, stride_u, stride_h, stride_dh, stride_dg, stride_du,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr, IS_BACKWARD: tl.constexpr, STORE_H: tl.constexpr):
    # One program = a (ROWS, BLOCK) tile. Rows times strides can pass 2^31 elements: int64 offsets.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    r = rows[:, None]
    c = cols[None, :]
    g = tl.load(g_ptr + r * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_u + c, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    if IS_BACKWARD:
        # Every load of this tile happens before any store, so the outputs may alias the inputs.
        dh = tl.load(dh_ptr + r * stride_dh + c, mask=mask, other=0.0).to(tl.float32)
        du = dh * silu
        dg = dh * u * sig * (1.0 + g * (1.0 - sig))
        if STORE_H:
            tl.store(h_ptr + r * stride_h + c, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(dg_ptr + r * stride_dg + c, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + r * stride_du + c, du.to(du_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(h_ptr + r * stride_h + c, (silu * u).to(h_ptr.dtype.element_ty), mask=mask)


def _tile(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(ROWS, BLOCK): 4 rows of up to 1024 columns per program on the GPU; under the interpreter, which pays
    per program, few wide tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(64, triton.next_power_of_2(n_rows)), min(512, triton.next_power_of_2(n_cols))
    return 4, min(1024, triton.next_power_of_2(n_cols))


def _rows(t: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """(..., F) -> (rows, F) view with a unit column stride, or an error saying what was expected."""
    if t.dtype not in _FLOAT:
        raise TypeError(f"{where}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{where}: {name} must have at least one dimension (..., F)")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{where}: {name} must be contiguous in its last dimension, got strides {t.stride()}")
    if t.dim() == 2 or t.numel() == 0:
        return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(f"{where}: {name} of shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed "
                         "as rows of its last dimension; pass a tensor whose leading dimensions are contiguous") from None


def _check_pair(gate, up, where):
    if gate.shape != up.shape:
        raise ValueError(f"{where}: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"{where}: gate and up must share dtype and device, got {gate.dtype} on {gate.device} "
                         f"and {up.dtype} on {up.device}")


def _launch(g2, u2, h2, dh2, dg2, du2, backward: bool, store_h: bool):
    n_rows, n_cols = g2.shape
    if n_rows == 0 or n_cols == 0:
        return
    rows, block = _tile(n_rows, n_cols)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block))
    dummy = g2  # unused pointer slots get any valid tensor; the constexpr flags keep them untouched
    h2 = dummy if h2 is None else h2
    dh2, dg2, du2 = (dummy if t is None else t for t in (dh2, dg2, du2))
    _swiglu_kernel[grid](g2, u2, h2, dh2, dg2, du2, n_rows, n_cols,
                         g2.stride(0), u2.stride(0), h2.stride(0), dh2.stride(0), dg2.stride(0), du2.stride(0),
                         ROWS=rows, BLOCK=block, IS_BACKWARD=backward, STORE_H=store_h,
                         num_warps=4 if rows * block <= 1024 else 8)


def swiglu_forward_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    where = "swiglu"
    _check_pair(gate, up, where)
    g2, u2 = _rows(gate, "gate", where), _rows(up, "up", where)
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _launch(g2, u2, h.reshape(-1, h.shape[-1]), None, None, None, backward=False, store_h=True)
    return h


def swiglu_backward_triton(dh, gate, up, dg, du, h, store_h: bool) -> None:
    """One kernel: reads dh, gate, up; writes dg, du (and h when store_h). Outputs may alias the inputs."""
    where = "swiglu backward"
    _check_pair(gate, up, where)
    for name, t in (("dh", dh), ("dg", dg), ("du", du)) + ((("h", h),) if store_h else ()):
        if t.shape != gate.shape or t.dtype != gate.dtype or t.device != gate.device:
            raise ValueError(f"{where}: {name} must be {gate.dtype} {tuple(gate.shape)} on {gate.device} like gate, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    rows = [_rows(t, n, where) for n, t in (("gate", gate), ("up", up), ("dh", dh), ("dg", dg), ("du", du))]
    h2 = _rows(h, "h", where) if store_h else None
    _launch(rows[0], rows[1], h2, rows[2], rows[3], rows[4], backward=True, store_h=store_h)


# ---- torch.library registration ----------------------------------------------------------------------

@torch.library.custom_op("minitrain::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        return swiglu_forward_triton(gate, up)
    _check_pair(gate, up, "swiglu")
    return swiglu_ref(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up, backend):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("minitrain::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty_like(dg)
        swiglu_backward_triton(dh.contiguous() if dh.stride(-1) != 1 else dh, gate, up, dg, du, None, False)
        return dg, du
    dg, du, _ = swiglu_backward_ref(dh, gate, up)
    return dg, du


@_swiglu_bwd_op.register_fake
def _(dh, gate, up, backend):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


@torch.library.custom_op("minitrain::swiglu_bwd_", mutates_args=("dh", "gate", "up"))
def _swiglu_bwd_inplace_op(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, store_h: bool,
                           backend: str) -> None:
    if backend == "triton":
        swiglu_backward_triton(dh, gate, up, gate, up, dh, store_h)
        return
    dg, du, h = swiglu_backward_ref(dh, gate, up)
    gate.copy_(dg)
    up.copy_(du)
    if store_h:
        dh.copy_(h)


@_swiglu_bwd_inplace_op.register_fake
def _(dh, gate, up, store_h, backend):
    return None


def _setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, dh):
    gate, up = ctx.saved_tensors
    dg, du = _swiglu_bwd_op(dh, gate, up, ctx.backend)
    return dg, du, None


_swiglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _resolve(backend: str, t: torch.Tensor, where: str) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"{where}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if t.is_cuda else "torch"
    return backend


# ---- public functions ---------------------------------------------------------------------------------

def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """h = silu(gate) * up, differentiable.

    Args:
        gate, up: (..., F) float16/bfloat16/float32, same shape, dtype and device; the last dimension must
            be contiguous (row strides are free, e.g. halves of a fused gate|up projection).
        backend: "auto" (Triton on CUDA, the reference on CPU) | "triton" | "torch".
    Returns:
        h (..., F), contiguous, gate's dtype. Backward: one fused kernel giving (dgate, dup).
    """
    return _swiglu_fwd_op(gate, up, _resolve(backend, gate, "swiglu"))


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str = "auto"):
    """(dgate, dup) in fresh buffers, from dh, gate, up (all (..., F))."""
    return _swiglu_bwd_op(dh, gate, up, _resolve(backend, gate, "swiglu backward"))


def swiglu_backward_(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, store_h: bool = True,
                     backend: str = "auto") -> None:
    """In-place SwiGLU backward, one kernel: gate <- dgate, up <- dup, and dh <- h = silu(gate)*up when
    ``store_h`` (else dh is left as it was). All three must be (..., F) of one dtype with a contiguous last
    dimension. Use only on buffers nobody else reads afterwards.
    """
    _swiglu_bwd_inplace_op(dh, gate, up, store_h, _resolve(backend, gate, "swiglu_backward_"))
