"""Fused LoRA ops: LoRA linear (= the O projection), QKV, and the SwiGLU MLP, with hand-written backward.

Formula for one adapted projection (PEFT's layout: A = lora_A.weight (R, K), B = lora_B.weight (N, R)):
    y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ           s = alpha/R, or alpha/sqrt(R) with rsLoRA
    drop(x) = x·keep/(1-p)                      keep: a bool mask of x's shape (LoRA dropout p)
Backward (W and b frozen), small matrices first, B·A never formed:
    dyB = dy·B                                   (M, R)
    dx  = dy·W + s·(dyB·A)·keep/(1-p)            dx accumulates into ONE buffer with addmm_
    dA  = s·dyBᵀ·drop(x)                         (R, K)
    dB  = s·dyᵀ·(drop(x)·Aᵀ)                      (N, R)
The MLP: y = down(silu(gate(x)) · up(x)); its backward runs
    dh = dy·Wdᵀ-side as above; one in-place SwiGLU kernel turns (dh, g, u) into (h, dg, du);
    down's dA/dB use the recomputed h; dx = dg·Wg + du·Wu + the adapter terms, all into one buffer.

Layouts: x (..., K) with any leading shape (flattened to M = tokens rows); base W (N, K) is a tensor of any
float dtype or any object with ``dequantize(dtype=None, out=None)`` (e.g. an NF4 weight); bias (N,) frozen.

What is kept for backward: x (and for the MLP the two pre-activations g = gate(x), u = up(x)), the adapters,
the dropout keep-masks as bool (1 byte per element of the dropped input), and the rank-R products
drop(x)·Aᵀ (M, R) with the concatenated [A_i] (ΣR, K) (tiny; they spare backward a GEMM that re-reads x).
The dequantized base weight exists only while one matmul uses it and is dequantized again in backward:
never saved. With ``overwrite_x=True`` (QKV / linear) backward computes every adapter gradient first, then
writes dx into x's storage, so its peak is the held outputs and dys plus one dequantized weight.

Host work per call (eager; a CUDA-graph replay has none): QKV with three adapters issues 8 launching ops
forward (one x·[A_i]ᵀ GEMM, three base GEMMs, three adapter addmm_, one cat) and 11 backward (three
s_i·dy_i·B_i into one (M, ΣR) buffer, one Gᵀ·x for all dA, three dB, one G·[A_i], three base dx GEMMs
accumulating into one buffer), plus one dequantization per NF4 base per pass; scales ride on GEMM alphas.

A bool keep-mask was chosen over regenerating from a seed because it costs one byte per element only when
dropout is on, needs no custom RNG kernel, and gives the caller the mask (tests apply it to the references).

Bytes and FLOPs per projection (M tokens, bf16): forward 2·M·N·K (+ 2·M·R·(N+K) adapter) FLOPs; backward
2·M·N·K (dx) + 6·M·R·(N+K) (adapter); the base GEMMs dominate for R ≪ K, N.

Backends: "triton" = the hand-written path (torch/cuBLAS GEMMs, the Triton SwiGLU kernels); "torch" = the
reference composition with torch's autograd (fp32 math); "auto" = triton on CUDA, torch on CPU.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as Fn

from .swiglu import (_swiglu_bwd_inplace_op, _swiglu_fwd_op, swiglu_backward_triton, swiglu_forward_triton,
                     swiglu_ref)

__all__ = ["LoRAWeights", "lora_scale", "dropout_keep_mask", "lora_linear", "lora_o", "lora_qkv", "lora_mlp",
           "lora_linear_ref", "lora_mlp_ref"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


class LoRAWeights(NamedTuple):
    """One projection: frozen base (N, K) (+ frozen bias (N,)) and an optional adapter A (R, K), B (N, R).

    ``dropout`` is the LoRA dropout probability; ``dropout_mask`` optionally fixes the keep-mask (bool, the
    shape of this projection's input); when None and dropout > 0 in training, one is drawn with torch's RNG.
    """
    base: Any
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    scale: float = 1.0
    bias: Optional[torch.Tensor] = None
    dropout: float = 0.0
    dropout_mask: Optional[torch.Tensor] = None


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """The adapter scale s: alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFT computes it)."""
    if r <= 0:
        raise ValueError(f"lora_scale: rank r must be positive, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dropout_keep_mask(shape, p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool keep-mask (True = kept, probability 1-p) for LoRA dropout, drawn with torch's RNG."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_keep_mask: p must be in [0, 1), got {p}")
    return torch.rand(shape, device=device, generator=generator) >= p


# ---- references (the specification; the CPU path) ------------------------------------------------------

def _dense(base, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(base, torch.Tensor):
        return base if base.dtype == dtype else base.to(dtype)
    return base.dequantize(dtype=dtype)


def _drop_ref(x: torch.Tensor, p: float, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x * keep.to(x.dtype) / (1.0 - p)


def lora_linear_ref(x, base, A=None, B=None, scale=1.0, bias=None, dropout=0.0, dropout_mask=None):
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ in fp32 math, cast once to x's dtype (differentiable by torch)."""
    xf = x.float()
    y = xf @ _dense(base, torch.float32).t()
    if bias is not None:
        y = y + bias.float()
    if A is not None:
        y = y + scale * ((_drop_ref(xf, dropout, dropout_mask) @ A.float().t()) @ B.float().t())
    return y.to(x.dtype)


def lora_mlp_ref(x, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights):
    """down(silu(gate(x)) · up(x)) in fp32 math, cast once to x's dtype."""
    xf = x.float()

    def proj(t, w):
        return lora_linear_ref(t, w.base, w.A, w.B, w.scale, w.bias, w.dropout, w.dropout_mask)

    h = swiglu_ref(proj(xf, gate), proj(xf, up))
    return proj(h, down).to(x.dtype)


# ---- the hand-written path ------------------------------------------------------------------------------
# Per projection the autograd Functions receive a _Proj (frozen, non-tensor parts) and the tensors A, B, keep
# as direct arguments, so autograd sees the adapters as inputs. Work per call is kept to the GEMMs themselves:
# one x·[A_i]ᵀ GEMM for all adapters without dropout (their (M, ΣR) product is saved, so backward never
# re-reads x for it), scales folded into the GEMMs (alpha / beta=0), dx accumulated in one buffer.

class _Proj(NamedTuple):
    base: Any          # tensor or object with dequantize()
    scale: float
    bias: Optional[torch.Tensor]
    p: float           # dropout probability (0 when off)
    has_adapter: bool


def _drop(x2: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return x2 if keep is None else torch.where(keep, x2 * (1.0 / (1.0 - p)), 0).to(x2.dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; the attribute test is cheaper than a no-op .to() call (host time counts at small T)."""
    return t if t.dtype == dtype else t.to(dtype)


def _mm_s(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """s·(a @ b) in one GEMM: the scale rides on cuBLAS's alpha (beta=0 ignores the uninitialized buffer)."""
    if s == 1.0:
        return torch.mm(a, b)
    return a.new_empty(a.shape[0], b.shape[1]).addmm_(a, b, beta=0, alpha=s)


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1, n)


def _batched(projs, tensors) -> list[int]:
    """Projections whose adapters share x: adapter present and no dropout (one GEMM against [A_i])."""
    return [i for i, pr in enumerate(projs) if pr.has_adapter and tensors[3 * i + 2] is None]


def _a_cat(projs, tensors, batched, dtype):
    if not batched:
        return None
    if len(batched) == 1:
        return _as(tensors[3 * batched[0]], dtype)
    return torch.cat([_as(tensors[3 * i], dtype) for i in batched])                    # (ΣR, K)


def _adapter_inputs(x2, projs, tensors, batched, A_cat):
    """Per projection the (M, R) product drop(x)·Aᵀ (None without adapter): column views of one
    x·A_catᵀ GEMM for the batched adapters, a GEMM of the dropped input for each adapter with dropout."""
    xas = [None] * len(projs)
    if A_cat is not None:
        xa = torch.mm(x2, A_cat.t())                                                 # (M, ΣR)
        off = 0
        for i in batched:
            r = A_cat.shape[0] if len(batched) == 1 else tensors[3 * i].shape[0]
            xas[i] = xa if len(batched) == 1 else xa[:, off:off + r]
            off += r
    for i, pr in enumerate(projs):
        keep = tensors[3 * i + 2]
        if keep is not None:
            xas[i] = torch.mm(_drop(x2, keep, pr.p), _as(tensors[3 * i], x2.dtype).t())
    return xas


def _group_forward(x2, projs, tensors):
    """y_i = x·W_iᵀ (+ b_i) + s_i·xa_i·B_iᵀ for every projection of one input; returns (ys, xas, A_cat).
    Each dequantized W_i lives for its one GEMM (the allocator hands the freed block to the next)."""
    dtype = x2.dtype
    batched = _batched(projs, tensors)
    A_cat = _a_cat(projs, tensors, batched, dtype)
    xas = _adapter_inputs(x2, projs, tensors, batched, A_cat)
    ys = []
    for i, pr in enumerate(projs):
        bias = None if pr.bias is None else _as(pr.bias, dtype)
        W = _dense(pr.base, dtype)
        if pr.has_adapter:
            # The rank-R term first (b + s·xa·Bᵀ, one skinny GEMM writing y), then the base GEMM accumulates
            # onto it (beta=1): that GEMM is compute-bound, so reading y in its epilogue is almost free, where
            # an addmm_ after it would be a memory-bound pass reading and writing y again.
            Bt = _as(tensors[3 * i + 1], dtype).t()
            y = _mm_s(xas[i], Bt, pr.scale) if bias is None else torch.addmm(bias, xas[i], Bt, alpha=pr.scale)
            y.addmm_(x2, W.t())
        else:
            y = Fn.linear(x2, W, bias)
        del W
        ys.append(y)
    return ys, xas, A_cat


def _group_backward(x2, dys, projs, tensors, xas, A_cat, need_dx, out=None):
    """dx and the adapter grads of several projections of one input x2 (M, K); dys[i] (M, N_i) or None.

    Phase 1 reads x (adapter grads), phase 2 writes dx, optionally into ``out`` (which may be x's own
    storage: nothing reads x after phase 1). With G = [s_i·dy_i·B_i] (M, ΣR) over the batched adapters:
        dx = G·A_cat + Σ dy_i·W_i + Σ_dropout (s_i/(1-p_i))·((dy_i·B_i)·A_i ⊙ keep_i)
        [dA_i] = Gᵀ·x (one GEMM),  dB_i = s_i·dy_iᵀ·xa_i (xa saved from forward, or recomputed when None)
    """
    dtype = x2.dtype
    batched = _batched(projs, tensors)
    if xas is None:
        xas = _adapter_inputs(x2, projs, tensors, batched, A_cat)
    grads = [None] * (3 * len(projs))
    G = None
    if any(dys[i] is not None for i in batched):
        if len(batched) == 1:
            i = batched[0]
            G = _mm_s(dys[i], _as(tensors[3 * i + 1], dtype), projs[i].scale)         # (M, R)
        else:
            G = x2.new_empty(x2.shape[0], A_cat.shape[0])                             # (M, ΣR)
            off = 0
            for i in batched:
                r = tensors[3 * i].shape[0]
                if dys[i] is None:
                    G[:, off:off + r].zero_()
                else:
                    G[:, off:off + r].addmm_(dys[i], _as(tensors[3 * i + 1], dtype), beta=0, alpha=projs[i].scale)
                off += r
        dA_cat = torch.mm(G.t(), x2)                                                  # (ΣR, K)
        off = 0
        for i in batched:
            A, B = tensors[3 * i], tensors[3 * i + 1]
            r = A.shape[0]
            if dys[i] is not None:
                grads[3 * i] = _as(dA_cat if len(batched) == 1 else dA_cat[off:off + r], A.dtype)
                grads[3 * i + 1] = _as(_mm_s(dys[i].t(), xas[i], projs[i].scale), B.dtype)
            off += r
    dropped = []
    for i, pr in enumerate(projs):
        A, B, keep = tensors[3 * i: 3 * i + 3]
        if keep is None or dys[i] is None:
            continue
        dyB = _mm_s(dys[i], _as(B, dtype), pr.scale / (1.0 - pr.p))                 # (M, R), s/(1-p) folded
        grads[3 * i] = _as(torch.mm(dyB.t(), torch.where(keep, x2, 0)), A.dtype)   # dyBᵀ·(x ⊙ keep)
        grads[3 * i + 1] = _as(_mm_s(dys[i].t(), xas[i], pr.scale), B.dtype)
        dropped.append((i, dyB))
    xas = None  # when recomputed here (overwrite_x), freed before any dequantized weight is allocated
    if not need_dx:
        return None, grads
    dx = None
    if G is not None:
        dx = torch.mm(G, A_cat, out=out)
        del G
    for i, pr in enumerate(projs):
        if dys[i] is None:
            continue
        W = _dense(pr.base, dtype)  # re-dequantized: the forward did not keep it
        dx = torch.mm(dys[i], W, out=out) if dx is None else dx.addmm_(dys[i], W)
        del W
    for i, dyB in dropped:
        dx.add_(torch.mm(dyB, _as(tensors[3 * i], dtype)).mul_(tensors[3 * i + 2]))
    return dx, grads


def _swiglu_fwd(g, u, backend):
    """h = silu(g)·u. Eager calls launch the kernel directly: the torch.library op (what torch.compile traces)
    costs a Python dispatcher round trip per call and nothing else here (autograd is off inside Functions)."""
    if backend == "triton" and not torch.compiler.is_compiling():
        return swiglu_forward_triton(g, u)
    return _swiglu_fwd_op(g, u, backend)


def _swiglu_bwd_(dh, g, u, store_h, backend):
    """In place: dh <- h (when store_h), g <- dg, u <- du (see ``_swiglu_fwd`` for the eager shortcut)."""
    if backend == "triton" and not torch.compiler.is_compiling():
        swiglu_backward_triton(dh, g, u, g, u, dh, store_h)
        # the kernel writes through pointers: tell autograd, so a second backward refuses the overwritten g, u
        for t in (dh, g, u):
            torch.autograd.graph.increment_version(t)
    else:
        _swiglu_bwd_inplace_op(dh, g, u, store_h, backend)


def _contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _flat_keeps(tensors) -> tuple:
    """(A, B, keep) triples with each keep-mask viewed as rows (M, K) like its input."""
    return tuple(t if (j % 3 != 2 or t is None) else _flat(t, t.shape[-1]) for j, t in enumerate(tensors))


class _LoRAGroupFn(torch.autograd.Function):
    """Several adapted projections of one input x (one for lora_linear, three for QKV).

    Saves x, the adapters, the keep-masks and the (M, R) products drop(x)·A_iᵀ (not when dx overwrites x:
    then they are recomputed before x is overwritten). Backward: see ``_group_backward``; each base weight
    is dequantized again for its one dx GEMM, and every dx term lands in one (M, K) buffer.
    """

    @staticmethod
    def forward(ctx, x, projs, overwrite_x, *tensors):
        K = x.shape[-1]
        x2 = _flat(x, K)
        tensors = _flat_keeps(tensors)
        ys, xas, A_cat = _group_forward(x2, projs, tensors)
        ctx.projs, ctx.overwrite = projs, overwrite_x
        ctx.save_for_backward(x, A_cat, *tensors, *([None] * len(projs) if overwrite_x else xas))
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *dys):
        projs = ctx.projs
        n = 3 * len(projs)
        x, A_cat, *rest = ctx.saved_tensors
        tensors, xas = rest[:n], rest[n:]
        K = x.shape[-1]
        x2 = _flat(x, K)
        dy2s = [None if dy is None else _contig(_flat(dy, dy.shape[-1])) for dy in dys]
        need_dx = ctx.needs_input_grad[0]
        out = x2 if (need_dx and ctx.overwrite) else None
        dx, grads = _group_backward(x2, dy2s, projs, tensors, None if ctx.overwrite else xas, A_cat, need_dx, out)
        return (None if dx is None else dx.view(x.shape), None, None, *grads)


class _LoRAMLPFn(torch.autograd.Function):
    """down(silu(gate(x)) · up(x)) with adapters on any of the three projections.

    Forward keeps x, g = gate(x), u = up(x) (not h) and the (M, R) adapter products. Backward, in row chunks
    of C/2 tokens for the (tokens x F) terms (so only a chunk of dh exists at a time):
        dh = dy·Wd + (s_d/(1-p_d))·(dy·B_d)·A_d ⊙ keep_d
        one in-place kernel: dh <- h = silu(g)·u, g <- dg, u <- du   (g, u are this Function's own buffers)
        dA_d = (s_d/(1-p_d))·(dy·B_d)ᵀ·(h ⊙ keep_d),  dB_d = s_d·dyᵀ·(drop(h)·A_dᵀ) (that product saved)
        dx, dA/dB of gate and up: ``_group_backward`` of the two projections of x with dys (dg, du).
    The in-place kernel makes backward single-use (autograd's version counter refuses a second run).
    """

    @staticmethod
    def forward(ctx, x, projs, backend, *tensors):
        gate, up, down = projs
        K = x.shape[-1]
        x2 = _flat(x, K)
        tensors = _flat_keeps(tensors)
        (g, u), xas, A_cat = _group_forward(x2, (gate, up), tensors[:6])            # (M, F) each
        h = _swiglu_fwd(g, u, backend)                                               # (M, F), freed after down
        (y,), (xa_d,), _ = _group_forward(h, (down,), tensors[6:])                    # (M, C)
        del h
        ctx.projs, ctx.backend = projs, backend
        ctx.save_for_backward(x, g, u, A_cat, *tensors, *xas, xa_d)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, g, u, A_cat, *tensors, xa_g, xa_u, xa_d = ctx.saved_tensors
        Ad, Bd, kd = tensors[6:]
        gate, up, down = ctx.projs
        x2 = _flat(x, x.shape[-1])
        dy2 = _contig(_flat(dy, dy.shape[-1]))
        dtype = dy2.dtype

        # dh = dy·Wd (+ adapter), the dx of down's projection, is made in row chunks of at most C/2 tokens,
        # each turned at once by the in-place SwiGLU kernel into (h, dg, du) and folded into dA_d: a chunk of dh
        # (rows x F) is the only (tokens x F) buffer besides the saved g, u, so the backward's peak is the
        # saved activations + half a dequantized weight's worth of dh + Wd instead of a whole (M, F) dh.
        # Per chunk the rank-R term is written first and the base GEMM accumulates onto it (_group_forward).
        M, C_ = dy2.shape
        step = max(16, C_ // 2)
        Wd = _dense(down.base, dtype)                                                # (C, F), for all chunks
        dyB = Ad_ = None
        if down.has_adapter:
            Ad_ = _as(Ad, dtype)
            dyB = _mm_s(dy2, _as(Bd, dtype), down.scale / (1.0 - down.p))           # (M, R)
        dAd = None
        # Under torch.compile one chunk of all rows, unsliced: torch 2.11's Dynamo fails on the sliced loop over
        # symbolic rows ("Argument ... does not belong to this Graph", test_compile_gpu on an H100).
        whole = torch.compiler.is_compiling()
        for r0 in ((0,) if whole else range(0, M, step)):
            rows = slice(None) if whole else slice(r0, min(M, r0 + step))
            if down.has_adapter:
                dh = torch.mm(dyB[rows], Ad_)                                       # (rows, F)
                if kd is not None:
                    dh.mul_(kd[rows])
                dh.addmm_(dy2[rows], Wd)
            else:
                dh = torch.mm(dy2[rows], Wd)
            # One kernel: dh <- h (needed only for down's adapter grads), g <- dg, u <- du (these rows).
            _swiglu_bwd_(dh, g if whole else g[rows], u if whole else u[rows], down.has_adapter, ctx.backend)
            if down.has_adapter:
                h = dh if kd is None else dh.mul_(kd[rows])                         # h ⊙ keep
                dAd = torch.mm(dyB[rows].t(), h) if dAd is None else dAd.addmm_(dyB[rows].t(), h)
            del dh
        del Wd
        dBd = None
        if down.has_adapter:
            dAd = _as(dAd, Ad.dtype)
            dBd = _as(_mm_s(dy2.t(), xa_d, down.scale), Bd.dtype)
        dx, grads = _group_backward(x2, (g, u), (gate, up), tensors[:6], [xa_g, xa_u], A_cat,
                                    ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(x.shape), None, None, *grads[:2], None, *grads[3:5], None,
                dAd, dBd, None)


# ---- validation and public functions --------------------------------------------------------------------

def _resolve(backend: str, x: torch.Tensor, where: str) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"{where}: backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def _check_x(x: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT:
        raise TypeError(f"{where}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{where}: x must be (..., K), got a 0-d tensor")
    # Under autocast the whole op computes in the autocast dtype (the cast is differentiable), so forward
    # and backward see one dtype.
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return x


def _spec(w: LoRAWeights, x_shape, device, training: bool, where: str):
    """Validate one projection for an input of shape x_shape; returns (_Proj, A, B, keep-mask or None)."""
    if not isinstance(w, LoRAWeights):
        raise TypeError(f"{where}: expected a LoRAWeights, got {type(w).__name__}")
    base = w.base
    if not (isinstance(base, torch.Tensor) or hasattr(base, "dequantize")):
        raise TypeError(f"{where}: base must be a tensor or have a dequantize(dtype=None, out=None) method, "
                        f"got {type(base).__name__}")
    shape = tuple(base.shape)
    if len(shape) != 2:
        raise ValueError(f"{where}: base weight must be 2-D (N, K), got {shape}")
    N, K = shape
    if x_shape[-1] != K:
        raise ValueError(f"{where}: input has {x_shape[-1]} features but the base weight is (N, K) = {shape}")
    if base.device != device:
        raise ValueError(f"{where}: base weight is on {base.device} but the input is on {device}")
    if (w.A is None) != (w.B is None):
        raise ValueError(f"{where}: give both A and B or neither")
    has = w.A is not None
    if has:
        if w.A.dim() != 2 or w.B.dim() != 2 or w.A.shape[1] != K or w.B.shape[0] != N or w.A.shape[0] != w.B.shape[1]:
            raise ValueError(f"{where}: adapters must be A (R, K={K}) and B (N={N}, R) (PEFT's lora_A/lora_B "
                             f"weights), got A {tuple(w.A.shape)} and B {tuple(w.B.shape)}")
        for name, t in (("A", w.A), ("B", w.B)):
            if t.device != device or t.dtype not in _FLOAT:
                raise ValueError(f"{where}: {name} must be a float tensor on {device}, got {t.dtype} on {t.device}")
    if w.bias is not None and (w.bias.shape != (N,) or w.bias.device != device):
        raise ValueError(f"{where}: bias must be ({N},) on {device}, got {tuple(w.bias.shape)} on {w.bias.device}")
    if not 0.0 <= w.dropout < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {w.dropout}")
    p = w.dropout if (has and training and w.dropout > 0.0) else 0.0
    keep = None
    if p > 0.0:
        keep = w.dropout_mask
        if keep is None:
            keep = dropout_keep_mask(x_shape, p, device)
        elif keep.dtype != torch.bool or tuple(keep.shape) != tuple(x_shape) or keep.device != device:
            raise ValueError(f"{where}: dropout_mask must be a bool tensor of the input's shape {tuple(x_shape)} "
                             f"on {device}, got {keep.dtype} {tuple(keep.shape)} on {keep.device}")
    return _Proj(base, float(w.scale), w.bias, p, has), w.A, w.B, keep


def lora_linear(x, base, A=None, B=None, scale=1.0, bias=None, dropout=0.0, training=True, dropout_mask=None,
                backend="auto", overwrite_x=False):
    """y = x·Wᵀ + bias + scale·(drop(x)·Aᵀ)·Bᵀ with a hand-written backward (dx, dA, dB; W and bias frozen).

    Args:
        x: (..., K) float16/bfloat16/float32.
        base: W (N, K) tensor, or an object with ``dequantize(dtype=None, out=None)`` (e.g. an NF4 weight);
            dequantized to x's dtype for each use, never kept.
        A: (R, K) = PEFT's lora_A.weight; B: (N, R) = lora_B.weight (both or neither); any float dtype,
            computed in x's dtype, grads returned in their own dtype.
        scale: alpha / R (see ``lora_scale``; rsLoRA: alpha / sqrt(R)).
        bias: optional frozen (N,).
        dropout: LoRA dropout probability on the adapter's input (active when ``training``).
        dropout_mask: optional bool keep-mask of x's shape (drawn when None).
        backend: "auto" | "triton" (hand-written path) | "torch" (fp32 reference through torch autograd).
        overwrite_x: see ``lora_qkv``.
    Returns:
        y (..., N) in x's dtype.
    """
    return lora_qkv(x, LoRAWeights(base, A, B, scale, bias, dropout, dropout_mask),
                    training=training, backend=backend, overwrite_x=overwrite_x, _where="lora_linear")[0]


lora_o = lora_linear  # the attention output projection is one LoRA linear


def lora_qkv(x, q: LoRAWeights, k: LoRAWeights | None = None, v: LoRAWeights | None = None, training=True,
             backend="auto", overwrite_x=False, _where="lora_qkv"):
    """The projections of one input: returns (Q, K, V) (as many outputs as specs given).

    Each of q, k, v is a ``LoRAWeights`` (base (N_i, K), optional adapter, bias, dropout). Backward sums the
    three dx terms into one (..., K) buffer. Shapes: x (..., K) -> Q (..., H·D), K and V (..., KV·D).

    overwrite_x=True: backward writes dx into x's own storage instead of a new (..., K) buffer (what
    unsloth's fused QKV does by default), saving one activation-sized buffer at the backward's peak. x's
    values are garbage after this op's backward: use it only when nothing reads x afterwards (e.g. the output
    of the pre-attention RMSNorm when that norm saves its input, not its output). Autograd raises
    ("modified by an inplace operation") if another op saved x for a later backward, and a second backward
    through this op. Applies to a contiguous x in eager mode on the hand-written path; otherwise ignored.
    """
    x = _check_x(x, _where)
    ws = [w for w in (q, k, v) if w is not None]
    backend = _resolve(backend, x, _where)
    shape, device = tuple(x.shape), x.device
    specs = [_spec(w, shape, device, training, f"{_where} (projection {i})") for i, w in enumerate(ws)]
    if backend == "torch":
        return tuple(lora_linear_ref(x, pr.base, A, B, pr.scale, pr.bias, pr.p, keep) for pr, A, B, keep in specs)
    overwrite_x = bool(overwrite_x) and x.is_contiguous() and not torch.compiler.is_compiling()
    tensors = [t for _, A, B, keep in specs for t in (A, B, keep)]
    return _LoRAGroupFn.apply(x, tuple(s[0] for s in specs), overwrite_x, *tensors)


def lora_mlp(x, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, training=True, backend="auto"):
    """SwiGLU MLP with LoRA on any projection: down(silu(gate(x)) · up(x)).

    Args:
        x: (..., C). gate, up: ``LoRAWeights`` with base (F, C); down: base (C, F). A down dropout mask, when
            given, has the shape of the hidden activation (..., F).
        training: LoRA dropout on or off. backend: "auto" | "triton" | "torch".
    Returns:
        (..., C) in x's dtype. Forward keeps x and the two (..., F) pre-activations; the backward reuses
        those buffers in place (one fused SwiGLU kernel) and runs once.
    """
    where = "lora_mlp"
    x = _check_x(x, where)
    backend = _resolve(backend, x, where)
    sg = _spec(gate, tuple(x.shape), x.device, training, f"{where} (gate)")
    su = _spec(up, tuple(x.shape), x.device, training, f"{where} (up)")
    F = tuple(gate.base.shape)[0]
    if tuple(up.base.shape)[0] != F:
        raise ValueError(f"{where}: gate and up must have the same out features, got {tuple(gate.base.shape)} "
                         f"and {tuple(up.base.shape)}")
    sd = _spec(down, tuple(x.shape[:-1]) + (F,), x.device, training, f"{where} (down)")
    if backend == "torch":
        def w(s):
            pr, A, B, keep = s
            return LoRAWeights(pr.base, A, B, pr.scale, pr.bias, pr.p, keep)
        return lora_mlp_ref(x, w(sg), w(su), w(sd))
    tensors = [t for _, A, B, keep in (sg, su, sd) for t in (A, B, keep)]
    return _LoRAMLPFn.apply(x, (sg[0], su[0], sd[0]), backend, *tensors)
