"""Fused LoRA ops: LoRA linear (= the O projection), QKV, and the SwiGLU MLP, with hand-written backward.

Formula for one adapted projection (PEFT's layout: A = lora_A.weight (R, K), B = lora_B.weight (N, R)):
    y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ           s = alpha/R, or alpha/sqrt(R) with rsLoRA
    drop(x) = x·keep/(1-p)                      keep: a bool mask of x's shape (LoRA dropout p)
Backward (W and b frozen), small matrices first, B·A never formed:
    dyB = dy·B                                   (M, R)
    dx  = dy·W + s·(dyB·A)·keep/(1-p)            dx accumulates into ONE buffer (in-place adds)
    dA  = s·dyBᵀ·drop(x)                         (R, K)
    dB  = s·dyᵀ·xa,  xa = drop(x)·Aᵀ             (N, R); xa (M, R) is the forward's, saved (SAVE_XA)
The MLP: y = down(silu(gate(x)) · up(x)); its backward runs
    dh = dy·Wdᵀ-side as above; one in-place SwiGLU kernel turns (dh, g, u) into (h, dg, du);
    down's dA uses the recomputed h; dx = dg·Wg + du·Wu + the adapter terms, all into one buffer.
Where a base and an adapter term land in one buffer (y, dx, dh), the base GEMM writes it and the adapter term
is added in one read+write pass (``triton_ops.rank_update`` on CUDA: cuBLAS's K=R addmm_ moved the same bytes
at ~60% of copy bandwidth; the order "adapter first, base GEMM accumulating with beta=1" measured slower:
bench/results/2026-11-28-h100-80gb-hbm3-lora-passes.md) — except in the MLP on CUDA with NF4 bases and no
dropout, where the adapter is folded into the base GEMM instead (``FOLD_ADAPTERS``): g = [xa_g | x]·[s·B_g | W_g]ᵀ,
u = [x | xa_u]·[W_u | s·B_u]ᵀ and dh = [dy | dy·B_d]·[W_d ; s·A_d], one GEMM over K + R each, the dense weight
dequantized straight into the wider buffer (the extra pass over the output becomes one copy of x or dy).

Layouts: x (..., K) with any leading shape (flattened to M = tokens rows); base W (N, K) is a tensor of any
float dtype or any object with ``dequantize(dtype=None, out=None)`` (e.g. an NF4 weight); bias (N,) frozen.

What is kept for backward: x (and for the MLP the two pre-activations g = gate(x), u = up(x)), the adapters,
each adapter's xa = drop(x)·Aᵀ (M, R; 128 KiB at M=4096, R=16, bf16), and the dropout keep-masks as bool
(1 byte per element of the dropped input). The dequantized base weight exists only while one matmul uses it
and is dequantized again in backward: never saved. A bool mask was chosen over regenerating from a seed
because it costs one byte per element only when dropout is on, needs no custom RNG kernel, and gives the
caller the mask (tests apply it to the references).

Recomputation whose output nobody reads (``output_unused(base)``): inside that context the hand-written
Functions do not compute the forward output of a projection whose base weight is ``base`` (an MLP whose down
projection it is: neither h nor y) and return an uninitialized tensor of the output's shape instead; what
they save for backward is computed exactly as always, so the gradients are bit-identical. The trainer uses it
while gradient checkpointing recomputes a decoder layer, where the down projection's output only feeds the
residual add whose result the recomputation discards (see minitrain.trainer.CheckpointedLayer).

Bytes and FLOPs per projection (M tokens, bf16): forward 2·M·N·K (+ 2·M·R·(N+K) adapter) FLOPs; backward
2·M·N·K (dx) + 6·M·R·(N+K) (adapter); the base GEMMs dominate for R ≪ K, N.

Backends: "triton" = the hand-written path (torch/cuBLAS GEMMs, the Triton SwiGLU kernels); "torch" = the
reference composition with torch's autograd (fp32 math); "auto" = triton on CUDA, torch on CPU.
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from typing import Any, NamedTuple, Optional

import torch

from quant.nf4 import NF4Weight

from .copy2d import copy2d_
from .rank_update import rank_update_
from .swiglu import _swiglu_bwd_inplace_op, _swiglu_fwd_op, swiglu_ref

__all__ = ["LoRAWeights", "lora_scale", "dropout_keep_mask", "lora_linear", "lora_o", "lora_qkv", "lora_mlp",
           "lora_linear_ref", "lora_mlp_ref", "output_unused"]

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


# ---- outputs nobody reads (checkpoint recomputation) -----------------------------------------------------
# Per thread: the autograd engine recomputes checkpointed layers on its own (device) thread, and the flag must
# be seen only by the code that the recomputation runs there.
_unused = threading.local()


@contextmanager
def output_unused(*bases):
    """Within the block, ``lora_linear`` / ``lora_qkv`` / ``lora_mlp`` (the hand-written backend) skip computing
    the forward output of any projection whose base weight *is* one of ``bases`` (identity, not equality) and
    of any MLP whose down projection's base it is, returning ``torch.empty`` of the output's shape, dtype and
    device; the tensors they save for backward are computed exactly as without the block. Only for callers that
    can prove nothing reads those outputs (a checkpoint recomputation). Nestable (the innermost block's bases
    count); restored on every exit."""
    prev = getattr(_unused, "bases", ())
    _unused.bases = tuple(b for b in bases if b is not None)
    try:
        yield
    finally:
        _unused.bases = prev


def _output_unused(base) -> bool:
    if torch.compiler.is_compiling():  # never inside a traced graph: the flag is host state of one eager call
        return False
    return any(marked is base for marked in getattr(_unused, "bases", ()))


# ---- references (the specification; the CPU path) ------------------------------------------------------

def _dense(base, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(base, torch.Tensor):
        return base if base.dtype == dtype else base.to(dtype)
    return base.dequantize(dtype=dtype)


_cache = threading.local()


@contextmanager
def weight_cache():
    """Within the block, the hand-written backend dequantizes (or casts) each base weight once per dtype and
    reuses the dense copy: for callers that run the same projections several times in a row (a tiled MLP's
    tiles, forward and backward). Memory: the dense copies until the block exits. Nestable (the outermost
    block's cache is used); restored on every exit."""
    prev = getattr(_cache, "d", None)
    _cache.d = {} if prev is None else prev
    try:
        yield
    finally:
        _cache.d = prev


def _weight(base, dtype: torch.dtype) -> torch.Tensor:
    """_dense(base, dtype), from the cache of an enclosing ``weight_cache`` block when there is one."""
    d = getattr(_cache, "d", None)
    if d is None or isinstance(base, torch.Tensor) and base.dtype == dtype:
        return _dense(base, dtype)
    hit = d.get((id(base), dtype))
    if hit is not None and hit[0] is base:
        return hit[1]
    w = _dense(base, dtype)
    d[(id(base), dtype)] = (base, w)
    return w


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
# as direct arguments, so autograd sees the adapters as inputs.

# Keep xa = drop(x)·Aᵀ (M, R) from the forward for dB instead of recomputing it in backward, which re-reads the
# whole (dropped) input x (on the 8B shape: 32 MiB per attention group, 112 MiB for down's h) for an (M, 16)
# product. Bit-identical either way (the same GEMM of the same tensors); the switch exists for the tests that
# prove it. Costs M·R elements per adapter (128 KiB at M=4096, R=16, bf16).
SAVE_XA = True

# Add the adapter terms with triton_ops.rank_update's one-pass kernel on CUDA (True) or with cuBLAS's K=R
# addmm_ (False). The same formula up to the order of the R-term sum; env MINITRAIN_LORA_RANK_UPDATE=0 (read at
# import) turns the kernel off, e.g. for an A/B run of bench.train.
RANK_UPDATE_KERNEL = os.environ.get("MINITRAIN_LORA_RANK_UPDATE", "1") != "0"


def _add_update(y, a, b, alpha):
    """y += alpha·a·bᵀ in place (the adapter term); the kernel per ``RANK_UPDATE_KERNEL``."""
    return rank_update_(y, a, b, alpha, kernel=None if RANK_UPDATE_KERNEL else False)


class _Proj(NamedTuple):
    base: Any          # tensor or object with dequantize()
    scale: float
    bias: Optional[torch.Tensor]
    p: float           # dropout probability (0 when off)
    has_adapter: bool


def _drop(x2: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    return x2 if keep is None else torch.where(keep, x2 * (1.0 / (1.0 - p)), 0).to(x2.dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)  # adapters cast once per Function call (no copy when equal)


def _proj_out(x2, pr: _Proj, xa, B_):
    """(M, K) -> (M, N): x·Wᵀ (+ bias), then + s·xa·Bᵀ in one pass over y (xa None: no adapter term). The
    dequantized weight lives for its one GEMM."""
    dtype = x2.dtype
    bias = _cast(pr.bias, dtype)
    W = _weight(pr.base, dtype)
    y = x2 @ W.t() if bias is None else torch.addmm(bias, x2, W.t())
    del W
    if xa is not None:
        _add_update(y, xa, B_, pr.scale)
    return y


def _proj_forward(x2, pr: _Proj, A_, B_, keep):
    """One projection: returns (y (M, N), xa = drop(x)·Aᵀ (M, R) or None without an adapter)."""
    xa = _drop(x2, keep, pr.p) @ A_.t() if pr.has_adapter else None
    return _proj_out(x2, pr, xa, B_), xa


# Fold the gate and up adapters' up-projection into their base GEMMs on CUDA ("extended K"): with NF4 bases the
# dense weight is written by the dequantize kernel anyway, so it is written into [W | s·B] (one more R columns)
# and x into [xa_g | x | xa_u]; then g = [xa_g | x]·[s_g·B_g | W_g]ᵀ and u = [x | xa_u]·[W_u | s_u·B_u]ᵀ are
# ONE GEMM each over K + R, instead of the base GEMM plus a read+write pass over the (M, F) output for the
# adapter term (triton_ops.rank_update): on the 8B shape that pass moves 2·112 MiB per projection, the fold
# adds one (M, K + 2R) copy of x (shared by both) and R/K more GEMM work. Same formula; the adapter term is
# summed in the GEMM's fp32 accumulator with the base term (one rounding of y instead of two) and uses s·B
# rounded to the compute dtype (exact when s is a power of two). Env MINITRAIN_LORA_FOLD=0 (read at import)
# turns it off, e.g. for an A/B run of bench.lora_passes or bench.train.
FOLD_ADAPTERS = os.environ.get("MINITRAIN_LORA_FOLD", "1") != "0"
FOLD_ON_CPU = False  # the tests' switch: the same folded math on CPU tensors (fp32/bf16 GEMMs of torch)


def _fold_on(t: torch.Tensor) -> bool:
    """Whether folding may run on operand ``t`` at all: switched on, CUDA and 16-bit (or the tests' CPU switch),
    outside a weight_cache block (the tiled MLP reuses plain dense weights) and outside torch.compile's tracing
    (the traced graph keeps the plain ops)."""
    return (FOLD_ADAPTERS and (t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) or FOLD_ON_CPU)
            and getattr(_cache, "d", None) is None and not torch.compiler.is_compiling())


def _fold_proj(pr: _Proj, B, keep) -> bool:
    """Whether projection ``pr`` can be folded: adapted without dropout, an NF4 base whose K is whole
    quantization blocks, a rank that is a multiple of 8 (16-byte aligned column offsets for cuBLAS)."""
    return (pr.has_adapter and keep is None and isinstance(pr.base, NF4Weight)
            and pr.base.shape[1] % pr.base.blocksize == 0 and B.shape[1] % 8 == 0)


def _dense_into(base, out: torch.Tensor) -> torch.Tensor:
    """NF4 base weight dequantized into ``out`` (rows apart allowed): the folds' counterpart of _dense."""
    return base.dequantize(dtype=out.dtype, out=out)


def _gate_up_folded(x2, gate: _Proj, up: _Proj, Ag, Bg, Au, Bu):
    """(g, u, xa_g, xa_u) as two _proj_forward calls give them, each output ONE GEMM over K + R columns (see
    FOLD_ADAPTERS); xa_g, xa_u are column slices of one (M, Rg + Ru) GEMM."""
    dtype, dev = x2.dtype, x2.device
    M, K = x2.shape
    Rg, Ru = Bg.shape[1], Bu.shape[1]
    xa = x2 @ torch.cat([Ag.to(dtype), Au.to(dtype)]).t()                       # (M, Rg + Ru)
    xa_g, xa_u = xa[:, :Rg], xa[:, Rg:]
    xe = torch.empty(M, Rg + K + Ru, dtype=dtype, device=dev)                 # [xa_g | x | xa_u]
    copy2d_(xe[:, :Rg], xa_g)
    copy2d_(xe[:, Rg:Rg + K], x2)
    copy2d_(xe[:, Rg + K:], xa_u)
    We = torch.empty(gate.base.shape[0], Rg + K, dtype=dtype, device=dev)     # [s_g·B_g | W_g]
    copy2d_(We[:, :Rg], Bg, gate.scale)
    _dense_into(gate.base, We[:, Rg:])
    g = xe[:, :Rg + K] @ We.t()
    del We  # freed before up's buffer is allocated: one dense weight at a time, as the unfolded path
    We = torch.empty(up.base.shape[0], K + Ru, dtype=dtype, device=dev)       # [W_u | s_u·B_u]
    _dense_into(up.base, We[:, :K])
    copy2d_(We[:, K:], Bu, up.scale)
    u = xe[:, Rg:] @ We.t()
    return g, u, xa_g, xa_u


def _dh_folded(dy2, Bd_, down: _Proj, Ad):
    """(dh, dyB): dh = dy·W + s·dyB·A (no dropout) as ONE GEMM over N + R, [dy | dyB]·[W ; s·A] (see
    FOLD_ADAPTERS; W's rows are contiguous, so the dense weight is dequantized into the first N rows of the
    buffer); dyB = dy·B (M, R) is written into the last R columns of [dy | dyB] by its GEMM."""
    M, N = dy2.shape
    R = Bd_.shape[1]
    de = torch.empty(M, N + R, dtype=dy2.dtype, device=dy2.device)
    dyB = torch.mm(dy2, Bd_, out=de[:, N:])
    copy2d_(de[:, :N], dy2)
    We = torch.empty(N + R, down.base.shape[1], dtype=dy2.dtype, device=dy2.device)
    _dense_into(down.base, We[:N])
    copy2d_(We[N:], Ad, down.scale)
    return de @ We, dyB


def _dx_base(dx, dy2, pr: _Proj):
    """dx += dy·W (dx None: a fresh buffer); W re-dequantized, the forward did not keep it."""
    W = _weight(pr.base, dy2.dtype)
    return dy2 @ W if dx is None else dx.addmm_(dy2, W)


def _dx_adapter(dx, dyB, A_, keep, p: float, scale: float):
    """dx += s·(dyB·A)⊙keep/(1-p); with dx None the GEMM writes a fresh buffer (beta=0, the scale as alpha)."""
    if dx is None:
        dx = torch.empty(dyB.shape[0], A_.shape[1], dtype=dyB.dtype, device=dyB.device)
        dx.addmm_(dyB, A_, beta=0, alpha=scale if keep is None else scale / (1.0 - p))
        return dx if keep is None else dx.mul_(keep)
    if keep is None:
        return _add_update(dx, dyB, A_.t(), scale)
    return dx.add_(torch.where(keep, dyB @ A_, 0), alpha=scale / (1.0 - p))


def _adapter_grads(dy2, dyB, x2, pr: _Proj, A_, keep, xa):
    """dA = s·dyBᵀ·drop(x) (R, K), dB = s·dyᵀ·xa (N, R); xa = drop(x)·Aᵀ recomputed only when not given."""
    xd = _drop(x2, keep, pr.p)
    dA = torch.mm(dyB.t(), xd).mul_(pr.scale)
    if xa is None:
        xa = xd @ A_.t()
    return dA, torch.mm(dy2.t(), xa).mul_(pr.scale)


def _absent(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Stands in for a saved (rows, cols) tensor that was not computed: same shape, dtype and device (what
    torch.utils.checkpoint compares between the forward and the recomputation), strides (0, 0) over one
    element, which no GEMM output has; ``_present`` tells them apart. A non-tensor flag would not do: under a
    non-reentrant checkpoint backward sees the forward's ctx but the recomputation's saved tensors."""
    return like.new_empty(1).as_strided((rows, cols), (0, 0))


def _present(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or (t.dim() == 2 and t.stride() == (0, 0)) else t


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(-1, n)


class _LoRAGroupFn(torch.autograd.Function):
    """Several adapted projections of one input x (one for lora_linear, three for QKV).

    Saves x, the adapters, the keep-masks and each xa = drop(x)·Aᵀ (M, R) of the forward (``SAVE_XA``);
    backward re-dequantizes each base weight and accumulates every dx term into a single (M, K) buffer (see
    the module docstring for the math).
    Adapters without dropout see the same x, so they are batched: one GEMM x·[A_q; A_k; A_v]ᵀ (M, ΣR) in
    forward (saved whole), and in backward one GEMM each for dx += [s·dy_i·B_i]·[A_i] and
    [dA_i] = [s·dy_i·B_i]ᵀ·x, so x and dx are read once for all adapters rather than once per adapter.

    Under ``output_unused(base)`` the projection with that base computes no output (no dequantize, base GEMM or
    adapter term; torch.empty is returned for it); its xa is still computed and saved (backward needs it; the
    same read of x as recomputing it there, and checkpointing requires the same saved tensors). Exact:
    backward reads only x, the adapters, the masks and xa, all saved as without the flag, and the other
    projections' outputs are computed as without it.
    """

    @staticmethod
    def forward(ctx, x, projs, *tensors):
        K = x.shape[-1]
        x2 = _flat(x, K)
        dtype = x2.dtype
        n = len(projs)
        batched = _batched(projs, tensors)
        As = [_cast(tensors[3 * i], dtype) for i in range(n)]
        Bs = [_cast(tensors[3 * i + 1], dtype) for i in range(n)]
        # Under output_unused(base): that projection's output is not computed (None here, torch.empty below);
        # the batching of the others is unchanged, so their outputs are the same bits.
        skip = [_output_unused(pr.base) for pr in projs]
        # xa is computed even for a skipped projection: backward needs it, and computing it here costs the same
        # read of x as recomputing it there (and keeps the saved tensors the same under checkpointing).
        xa_cat = x2 @ torch.cat([As[i] for i in batched]).t() if batched else None  # (M, ΣR)
        offs = _offsets(batched, tensors)
        ys, xas = [], [None] * n
        for i, pr in enumerate(projs):
            keep = tensors[3 * i + 2]
            if i in offs:
                xa = xa_cat[:, offs[i][0]:offs[i][1]]
            elif pr.has_adapter:
                xa = xas[i] = _drop(x2, None if keep is None else _flat(keep, K), pr.p) @ As[i].t()   # (M, R)
            else:
                xa = None
            ys.append(None if skip[i] else _proj_out(x2, pr, xa, Bs[i]))
        ctx.projs = projs
        if not SAVE_XA:
            xas, xa_cat = [None] * n, None
        ctx.save_for_backward(x, *tensors, *xas, xa_cat)
        return tuple(torch.empty(*x.shape[:-1], pr.base.shape[0], dtype=dtype, device=x.device) if y is None
                     else y.view(*x.shape[:-1], y.shape[-1]) for pr, y in zip(projs, ys))

    @staticmethod
    def backward(ctx, *dys):
        projs = ctx.projs
        n = len(projs)
        x, *rest = ctx.saved_tensors
        tensors, xas, xa_cat = rest[:3 * n], rest[3 * n:4 * n], rest[4 * n]
        need_dx = ctx.needs_input_grad[0]
        K = x.shape[-1]
        x2 = _flat(x, K)
        dtype = x2.dtype
        dy2s = [None if dy is None else _flat(dy, dy.shape[-1]) for dy in dys]
        dy2s = [None if d is None else (d if d.stride(-1) == 1 else d.contiguous()) for d in dy2s]
        fwd_batched = _batched(projs, tensors)
        fwd_offs = _offsets(fwd_batched, tensors)
        batched = [i for i in fwd_batched if dy2s[i] is not None]
        if len(batched) < 2:
            batched = []
        As = [_cast(tensors[3 * i], dtype) for i in range(n)]
        Bs = [_cast(tensors[3 * i + 1], dtype) for i in range(n)]
        keeps = [None if tensors[3 * i + 2] is None else _flat(tensors[3 * i + 2], K) for i in range(n)]
        live = [i for i in range(n) if dy2s[i] is not None]
        solo = [i for i in live if projs[i].has_adapter and i not in batched]
        dyBs = {i: dy2s[i] @ Bs[i] for i in solo}                                    # (M, R) each
        if batched:
            # s_i·dy_i·B_i side by side: (M, ΣR), small.
            dyB_cat = torch.cat([dy2s[i] @ Bs[i] * projs[i].scale for i in batched], dim=1)
            A_cat = torch.cat([As[i] for i in batched])                               # (ΣR, K)
        dx = None
        if need_dx:
            for i in live:
                dx = _dx_base(dx, dy2s[i], projs[i])
                if i in dyBs:
                    dx = _dx_adapter(dx, dyBs[i], As[i], keeps[i], projs[i].p, projs[i].scale)
            if batched:
                dx = _dx_adapter(dx, dyB_cat, A_cat, None, 0.0, 1.0)
        grads = [None] * (3 * n)
        for i in solo:
            # an adapter batched in forward but alone here (another output got no gradient) reads its slice
            xa = xas[i] if xa_cat is None or i not in fwd_offs else xa_cat[:, fwd_offs[i][0]:fwd_offs[i][1]]
            dA, dB = _adapter_grads(dy2s[i], dyBs[i], x2, projs[i], As[i], keeps[i], xa)
            grads[3 * i: 3 * i + 2] = [dA.to(tensors[3 * i].dtype), dB.to(tensors[3 * i + 1].dtype)]
        if batched:
            dA_cat = dyB_cat.t() @ x2                                                 # (ΣR, K), scales included
            if xa_cat is None or len(batched) != len(fwd_batched):
                xa_cat = x2 @ A_cat.t()                                               # (M, ΣR) recomputed
            off = 0
            for i in batched:
                A, B = tensors[3 * i], tensors[3 * i + 1]
                r = B.shape[1]
                dB = torch.mm(dy2s[i].t(), xa_cat[:, off:off + r]).mul_(projs[i].scale)
                grads[3 * i: 3 * i + 2] = [dA_cat[off:off + r].to(A.dtype), dB.to(B.dtype)]
                off += r
        dx = None if dx is None else dx.view(x.shape)
        return (dx, None, *grads)


def _batched(projs, tensors) -> list[int]:
    """Projections whose adapters can share one GEMM with x: adapter present, no dropout; only if 2 or more."""
    idx = [i for i, pr in enumerate(projs) if pr.has_adapter and tensors[3 * i + 2] is None]
    return idx if len(idx) >= 2 else []


def _offsets(batched, tensors) -> dict[int, tuple[int, int]]:
    """Column range of each batched projection in the (M, ΣR) xa."""
    offs, off = {}, 0
    for i in batched:
        r = tensors[3 * i + 1].shape[1]
        offs[i] = (off, off + r)
        off += r
    return offs


class _LoRAMLPFn(torch.autograd.Function):
    """down(silu(gate(x)) · up(x)) with adapters on any of the three projections.

    Forward keeps x, g = gate(x), u = up(x) (not h) and the adapters' xa = drop(·)·Aᵀ (M, R each, ``SAVE_XA``);
    gate and up with their adapters folded into one GEMM each where ``_fold_on``/``_fold_proj`` allow (``_gate_up_folded``),
    dh likewise in backward (``_dh_folded``).
    Backward:
        dh = dy·Wd + s_d·(dy·B_d)·A_d ⊙ keep_d/(1-p_d)
        one in-place kernel: dh <- h = silu(g)·u, g <- dg, u <- du   (g, u are this Function's own buffers)
        dA_d = s_d·(dy·B_d)ᵀ·drop(h),  dB_d = s_d·dyᵀ·xa_d
        dx = dg·Wg + du·Wu + adapter terms (one buffer); dA/dB of gate and up as in lora_linear with dg, du.
    The in-place kernel makes backward single-use (autograd's version counter refuses a second run).

    Under ``output_unused(down's base)`` (a checkpoint recomputation that discards the output) forward stops
    after g and u: no swiglu, no down dequantize/GEMM/adapter; it returns torch.empty of y's shape, and xa_d
    does not exist (``_absent`` saves a stand-in of its shape, told apart by its strides: this relies on the
    saved tensor coming back as saved, as autograd and torch.utils.checkpoint give it). Backward then computes
    xa_d = drop(h)·A_dᵀ from the h the in-place kernel writes. Exact: the forward and backward kernels compute
    h = silu(g)·u with the same fp32 operations from the same g, u,
    so xa_d is the same GEMM of the same bits either way, and everything else backward reads (x, g, u, the
    adapters, masks and the other xa) is computed by the same ops.
    """

    @staticmethod
    def forward(ctx, x, projs, backend, *tensors):
        gate, up, down = projs
        K = x.shape[-1]
        x2 = _flat(x, K)
        dtype = x2.dtype
        kg, ku, kd = (None if t is None else _flat(t, t.shape[-1]) for t in (tensors[2], tensors[5], tensors[8]))
        if _fold_on(x2) and all(pr.bias is None and _fold_proj(pr, tensors[3 * i + 1], tensors[3 * i + 2])
                                for i, pr in enumerate((gate, up))):
            g, u, xa_g, xa_u = _gate_up_folded(x2, gate, up, tensors[0], tensors[1], tensors[3], tensors[4])
        else:
            g, xa_g = _proj_forward(x2, gate, _cast(tensors[0], dtype), _cast(tensors[1], dtype), kg)   # (M, F)
            u, xa_u = _proj_forward(x2, up, _cast(tensors[3], dtype), _cast(tensors[4], dtype), ku)     # (M, F)
        if _output_unused(down.base):
            y = torch.empty(x2.shape[0], down.base.shape[0], dtype=dtype, device=x.device)
            xa_d = _absent(x2.shape[0], tensors[6].shape[0], x2) if down.has_adapter else None
        else:
            h = _swiglu_fwd_op(g, u, backend)                        # (M, F), freed after down
            y, xa_d = _proj_forward(h, down, _cast(tensors[6], dtype), _cast(tensors[7], dtype), kd)  # (M, C)
            del h
        ctx.projs, ctx.backend = projs, backend
        xas = (xa_g, xa_u, xa_d) if SAVE_XA else (None, None, None)
        ctx.save_for_backward(x, g, u, *tensors, *xas)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, g, u, Ag, Bg, kg, Au, Bu, ku, Ad, Bd, kd, xa_g, xa_u, xa_d = ctx.saved_tensors
        gate, up, down = ctx.projs
        K = x.shape[-1]
        x2 = _flat(x, K)
        dy2 = _flat(dy, dy.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        kg, ku, kd = (None if t is None else _flat(t, t.shape[-1]) for t in (kg, ku, kd))
        dtype = dy2.dtype
        xa_d = _present(xa_d)
        Ag_, Bg_, Au_, Bu_, Ad_, Bd_ = (_cast(t, dtype) for t in (Ag, Bg, Au, Bu, Ad, Bd))

        # dh = dy·Wd (+ adapter); the base part is the dx of down's projection.
        # [dy | dyB] puts dyB's columns at offset C: a whole 16 bytes (C % 8 == 0) keeps cuBLAS's aligned kernels
        if _fold_on(dy2) and dy2.shape[1] % 8 == 0 and _fold_proj(down, Bd, kd):
            dh, dyB = _dh_folded(dy2, Bd_, down, Ad)                  # (M, F), one GEMM over C + R; (M, R)
        else:
            dyB = dy2 @ Bd_ if down.has_adapter else None            # (M, R)
            dh = _dx_base(None, dy2, down)                           # (M, F)
            if down.has_adapter:
                dh = _dx_adapter(dh, dyB, Ad_, kd, down.p, down.scale)
        # One kernel: dh <- h (needed only for down's adapter grads), g <- dg, u <- du.
        _swiglu_bwd_inplace_op(dh, g, u, down.has_adapter, ctx.backend)
        dAd = dBd = None
        if down.has_adapter:
            # xa_d is None when the forward ran under output_unused: recomputed from this h (same bits)
            dAd, dBd = _adapter_grads(dy2, dyB, dh, down, Ad_, kd, xa_d)
            dAd, dBd = dAd.to(Ad.dtype), dBd.to(Bd.dtype)
        # dyB of the fold is a view of its (M, C + R) [dy | dyB]: freed here, not held through the dx GEMMs
        del dh, dyB
        # dx = dg·Wg + du·Wu + the adapter terms, one buffer.
        terms = [(g, gate, Ag_, Bg_, kg), (u, up, Au_, Bu_, ku)]
        dyBs = [dd @ B_ if pr.has_adapter else None for dd, pr, _, B_, _ in terms]
        dx = None
        for (dd, pr, A_, _, k), dyB_ in zip(terms, dyBs):
            dx = _dx_base(dx, dd, pr)
            if dyB_ is not None:
                dx = _dx_adapter(dx, dyB_, A_, k, pr.p, pr.scale)
        grads = []
        for (dd, pr, A_, _, k), dyB_, xa, A, B in zip(terms, dyBs, (xa_g, xa_u), (Ag, Au), (Bg, Bu)):
            if dyB_ is None:
                grads += [None, None, None]
                continue
            dA, dB = _adapter_grads(dd, dyB_, x2, pr, A_, k, xa)
            grads += [dA.to(A.dtype), dB.to(B.dtype), None]
        return (dx.view(x.shape), None, None, *grads, dAd, dBd, None)


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
                backend="auto"):
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
    Returns:
        y (..., N) in x's dtype.
    """
    return lora_qkv(x, LoRAWeights(base, A, B, scale, bias, dropout, dropout_mask),
                    training=training, backend=backend, _where="lora_linear")[0]


lora_o = lora_linear  # the attention output projection is one LoRA linear


def lora_qkv(x, q: LoRAWeights, k: LoRAWeights | None = None, v: LoRAWeights | None = None, training=True,
             backend="auto", _where="lora_qkv"):
    """The projections of one input: returns (Q, K, V) (as many outputs as specs given).

    Each of q, k, v is a ``LoRAWeights`` (base (N_i, K), optional adapter, bias, dropout). Backward sums the
    three dx terms into one (..., K) buffer. Shapes: x (..., K) -> Q (..., H·D), K and V (..., KV·D).
    """
    x = _check_x(x, _where)
    ws = [w for w in (q, k, v) if w is not None]
    backend = _resolve(backend, x, _where)
    specs = [_spec(w, tuple(x.shape), x.device, training, f"{_where} (projection {i})") for i, w in enumerate(ws)]
    if backend == "torch":
        return tuple(lora_linear_ref(x, pr.base, A, B, pr.scale, pr.bias, pr.p, keep) for pr, A, B, keep in specs)
    tensors = [t for _, A, B, keep in specs for t in (A, B, keep)]
    return _LoRAGroupFn.apply(x, tuple(s[0] for s in specs), *tensors)


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
