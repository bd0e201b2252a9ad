"""Cross-entropy of hidden @ weight.T (+ bias) without ever holding the (N x V) logits.

Formula: logits = h W^T (+ b), h (N, C), W (V, C); loss as in ``triton_ops.cross_entropy`` (ignore_index,
mean/sum/none, n_items, softcap). Gradients, with G = dloss/dlogits (N, V):
    grad_h = G W        grad_W = G^T h        grad_b = sum_rows G

Algorithm: loop over chunks of ``chunk`` tokens. Per chunk: one cuBLAS matmul writes the chunk's logits
(chunk, V) into a reused buffer; the Triton row kernel computes loss and lse (pass 1, online logsumexp)
and overwrites the buffer in place with G (pass 2); then grad_h[chunk] = G W (written once) and
grad_W += G^T h_chunk (cuBLAS addmm, accumulated in W's dtype; the first chunk writes it). With reduction
mean/sum the gradients are computed during the forward, scaled by the known normalizer (1/#tokens,
1/n_items or 1), and the backward only multiplies them by the upstream scalar (a kernel that exits at once
when it is 1, the usual case). So the whole step costs three matmuls, no recompute. With reduction="none"
the upstream grad is per row and unknown in the forward: the forward computes losses only and the backward
recomputes each chunk's logits (four matmuls).

Memory beyond inputs and their gradients (b = element size of h and W):
    chunk * V * b          the logits/gradient buffer of one chunk (reused, gradient in place)
  + 8 * N                  fp32 loss and lse per token
  (+ 4 * V                 fp32 bias-gradient accumulator, only with a trainable bias)
The gradients themselves are N*C*b (grad_h) and V*C*b (grad_W). The default chunk is chosen so the buffer is
just under half a GiB: chunk = 0.49 GiB / (V * b), a multiple of 128 when that is at least 128, at most N
(V=128256 bf16: 2048 tokens, 501 MiB beyond the inputs and their 1.13 GiB of gradients at 16,384 tokens and
C=4096). Larger chunks are faster: every chunk's grad_W GEMM reads and rewrites the whole V x C gradient, and
measured on an H200 at 16,384 tokens the chunk loop took 82.9 ms at 1024 tokens per chunk, 80.7 ms at 2048
(the three GEMMs alone, unchunked: 75.5 ms; the row kernel: ~3.5 ms).
Bytes moved per chunk in the row kernel: 3 * chunk * V * b (read, read, write); matmul FLOPs 6 * N * V * C.

Call backward once per forward (the saved gradients are scaled in place by the upstream gradient).
Precision: G is written in the inputs' dtype already multiplied by the normalizer (as an unfused lm_head's
autograd would cast it). In bf16 that is harmless; in fp16, entries below fp16's smallest subnormal (6e-8)
flush to zero before a GradScaler's factor arrives in the backward (the unfused path applies that factor
first); prefer bf16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy import _DTYPES, _check_options, ce_launch, cross_entropy_ref, resolve_backend

CHUNK_BUDGET_BYTES = int(0.49 * 2**30)  # under the 0.5 GiB that the issue allows beyond grads
# With a frozen weight (the LoRA case: no grad_W, whose per-chunk re-read makes small chunks slow) half that: the
# chunk buffer is part of a training step's peak device memory (1024 tokens at V=128256 in bf16)
FROZEN_CHUNK_BUDGET_BYTES = CHUNK_BUDGET_BYTES // 2


def default_chunk_size(n_tokens: int, vocab: int, element_size: int,
                       budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Tokens per chunk so that the chunk's logits buffer (chunk * V * element_size) is about budget_bytes."""
    rows = max(1, budget_bytes // (vocab * element_size))
    if rows >= 128:
        rows -= rows % 128  # whole tiles for the matmuls
    return max(1, min(rows, n_tokens))


def fused_linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", n_items=None,
                                   softcap: float | None = None) -> torch.Tensor:
    """Pure-torch fp32 reference: materializes fp32 logits (N, V). Returns fp32."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return cross_entropy_ref(logits, labels, ignore_index, reduction, n_items, softcap)


# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _scale_kernel(x_ptr, n, g_ptr, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:  # the usual upstream grad of a loss is exactly 1: then every program exits at once
        # grid-stride loop over the tensor: a few hundred programs, not n / BLOCK of them to launch and retire
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


def _scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    if x.numel() == 0:
        return
    block = 4096
    _scale_kernel[(min(triton.cdiv(x.numel(), block), 1024),)](x, x.numel(), g, BLOCK=block, num_warps=4)


def _check_inputs(hidden, weight, labels, bias) -> None:
    if hidden.dtype not in _DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"fused_linear_cross_entropy: hidden and weight must share one dtype among float32, "
                        f"float16, bfloat16; got {hidden.dtype} and {weight.dtype}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: expected hidden (N, C) and weight (V, C), got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if not hidden.is_contiguous() or not weight.is_contiguous():
        raise ValueError("fused_linear_cross_entropy: hidden and weight must be contiguous")
    if labels.dtype != torch.int64 or labels.shape != hidden.shape[:1] or not labels.is_contiguous():
        raise ValueError(f"fused_linear_cross_entropy: expected contiguous int64 labels ({hidden.shape[0]},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"fused_linear_cross_entropy: bias must be ({weight.shape[0]},) {weight.dtype}, got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    devs = {t.device for t in (hidden, weight, labels) + (() if bias is None else (bias,))}
    if len(devs) != 1:
        raise ValueError(f"fused_linear_cross_entropy: all tensors must be on one device, got {devs}")


def _run_chunks(hidden, weight, bias, labels, ignore_index, softcap, chunk, scale, lse_in,
                need_gh, need_gw, need_gb, rows="auto"):
    """The chunk loop. scale None: losses only (returns loss rows, lse). Otherwise writes gradients scaled
    by ``scale`` (0-d, or (N,) per row); lse_in given -> skip pass 1 (the backward of reduction='none').
    ``rows``: the row kernel of a loss-and-gradient chunk (``cross_entropy.rows_backend``)."""
    N, C = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    grads = scale is not None
    loss = None if lse_in is not None else torch.empty(N, device=dev, dtype=torch.float32)
    lse = lse_in if lse_in is not None else torch.empty(N, device=dev, dtype=torch.float32)
    gh = torch.empty_like(hidden) if grads and need_gh else None
    gw = (torch.zeros_like(weight) if N == 0 else torch.empty_like(weight)) if grads and need_gw else None
    gb = torch.zeros(V, device=dev, dtype=torch.float32) if grads and need_gb else None
    per_row = grads and scale.dim() == 1
    buf = torch.empty(min(chunk, N), V, device=dev, dtype=hidden.dtype)  # (chunk, V), reused
    wt = weight.t()
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        h, z = hidden[s:e], buf[: e - s]
        if bias is None:
            torch.mm(h, wt, out=z)
        else:
            torch.addmm(bias, h, wt, out=z)
        ce_launch(z, labels[s:e], ignore_index, softcap, None if loss is None else loss[s:e], lse[s:e],
                  grad=z if grads else None, scale=(scale[s:e] if per_row else scale) if grads else None,
                  rows=rows)
        if not grads:
            continue
        if gh is not None:
            torch.mm(z, weight, out=gh[s:e])
        if gw is not None:
            if s == 0:
                torch.mm(z.t(), h, out=gw)
            else:
                gw.addmm_(z.t(), h)
        if gb is not None:
            gb += z.sum(0, dtype=torch.float32)
    empty = lambda: hidden.new_empty(0)  # noqa: E731  (distinct tensors: custom-op outputs may not alias)
    return (loss, lse, empty() if gh is None else gh, empty() if gw is None else gw,
            empty() if gb is None else gb.to(hidden.dtype))


# ---- reduction mean/sum: gradients in the forward, scaled in the backward ---------------------------------

@torch.library.custom_op("minitrain::fused_linear_cross_entropy", mutates_args=())
def _flce(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
          scale: torch.Tensor, ignore_index: int, softcap: float, chunk: int, need_gh: bool, need_gw: bool,
          need_gb: bool, rows: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs(hidden, weight, labels, bias)
    need = need_gh or need_gw or need_gb
    loss, _, gh, gw, gb = _run_chunks(hidden, weight, bias, labels, ignore_index, softcap, chunk,
                                      scale if need else None, None, need_gh, need_gw, need_gb, rows)
    return (loss.sum() * scale).to(torch.float32), gh, gw, gb


@_flce.register_fake
def _(hidden, weight, labels, bias, scale, ignore_index, softcap, chunk, need_gh, need_gw, need_gb, rows="auto"):
    return (hidden.new_empty((), dtype=torch.float32),
            torch.empty_like(hidden) if need_gh else hidden.new_empty(0),
            torch.empty_like(weight) if need_gw else hidden.new_empty(0),
            hidden.new_empty(weight.shape[0]) if need_gb else hidden.new_empty(0))


@torch.library.custom_op("minitrain::fused_linear_cross_entropy_scale_", mutates_args=("gh", "gw", "gb"))
def _flce_scale_(gh: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor, g: torch.Tensor) -> None:
    g = g.to(torch.float32).contiguous()
    for t in (gh, gw, gb):
        _scale_(t, g)


@_flce_scale_.register_fake
def _(gh, gw, gb, g):
    return None


def _flce_setup_context(ctx, inputs, output):
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    # without this, autograd hands the backward zero tensors for the three unused outputs: a grad_W-sized
    # (V x C) and a grad_h-sized buffer allocated and zero-filled at every step (found with the CUDA memory
    # snapshot: 1.0 GiB at C=4096, V=128256)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(gh, gw, gb)
    ctx.has_bias = inputs[3] is not None


def _flce_backward(ctx, grad_loss, _gh, _gw, _gb):
    """loss = scale * sum_i loss_i, so d/dh = grad_loss * (scale * G W) etc.: the forward already holds the
    bracket; multiply in place by grad_loss (skipped on the device when grad_loss == 1)."""
    if getattr(ctx, "backward_done", False):  # a second backward would scale the saved grads twice
        raise RuntimeError("fused_linear_cross_entropy: backward may run once per forward (retain_graph=True "
                           "and a second backward are not supported); recompute the loss instead")
    ctx.backward_done = True
    gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:  # not materialized (set_materialize_grads(False)): no gradient reaches the loss
        return (None,) * 12
    torch.ops.minitrain.fused_linear_cross_entropy_scale_(gh, gw, gb, grad_loss)
    none = lambda t: None if t.numel() == 0 else t  # noqa: E731
    return (none(gh), none(gw), None, none(gb) if ctx.has_bias else None, None, None, None, None, None, None,
            None, None)


_flce.register_autograd(_flce_backward, setup_context=_flce_setup_context)


# ---- reduction none: losses in the forward, recompute in the backward -------------------------------------

@torch.library.custom_op("minitrain::fused_linear_cross_entropy_rows", mutates_args=())
def _flce_rows(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
               ignore_index: int, softcap: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(hidden, weight, labels, bias)
    loss, lse, *_ = _run_chunks(hidden, weight, bias, labels, ignore_index, softcap, chunk, None, None,
                                False, False, False)
    return loss, lse


@_flce_rows.register_fake
def _(hidden, weight, labels, bias, ignore_index, softcap, chunk):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("minitrain::fused_linear_cross_entropy_rows_backward", mutates_args=())
def _flce_rows_backward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        bias: torch.Tensor | None, lse: torch.Tensor, grad_rows: torch.Tensor, ignore_index: int,
                        softcap: float, chunk: int, need_gh: bool, need_gw: bool, need_gb: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, _, gh, gw, gb = _run_chunks(hidden, weight, bias, labels, ignore_index, softcap, chunk,
                                   grad_rows.to(torch.float32).contiguous(), lse, need_gh, need_gw, need_gb)
    return gh, gw, gb


@_flce_rows_backward.register_fake
def _(hidden, weight, labels, bias, lse, grad_rows, ignore_index, softcap, chunk, need_gh, need_gw, need_gb):
    return (torch.empty_like(hidden) if need_gh else hidden.new_empty(0),
            torch.empty_like(weight) if need_gw else hidden.new_empty(0),
            hidden.new_empty(weight.shape[0]) if need_gb else hidden.new_empty(0))


def _flce_rows_setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, ignore_index, softcap, chunk = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused lse output
    ctx.save_for_backward(hidden, weight, labels, bias, output[1])
    ctx.args = (ignore_index, softcap, chunk)


def _flce_rows_backward_fn(ctx, grad_loss, _grad_lse):
    """Per-row upstream grads: recompute each chunk's logits, write G scaled per row, accumulate."""
    hidden, weight, labels, bias, lse = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 7
    need_gh, need_gw, _, need_gb = ctx.needs_input_grad[:4]
    gh, gw, gb = torch.ops.minitrain.fused_linear_cross_entropy_rows_backward(
        hidden, weight, labels, bias, lse, grad_loss, *ctx.args, need_gh, need_gw, need_gb and bias is not None)
    none = lambda t: None if t.numel() == 0 else t  # noqa: E731
    return none(gh), none(gw), None, (none(gb) if bias is not None else None), None, None, None


_flce_rows.register_autograd(_flce_rows_backward_fn, setup_context=_flce_rows_setup_context)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                               n_items=None, softcap: float | None = None, chunk_size: int | None = None,
                               backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against labels, never materializing the logits.

    Args:
        hidden: (..., C) float32/float16/bfloat16 (e.g. the last hidden states (B, T, C)); a strided view
            such as hidden[:, :-1] is copied once.
        weight: (V, C), same dtype (the lm_head weight); gets a gradient when it requires grad.
        labels: (...) int64, ``ignore_index`` entries contribute nothing.
        bias: optional (V,).
        reduction, n_items, softcap: as in ``triton_ops.cross_entropy.cross_entropy``.
        chunk_size: tokens per chunk; default keeps the chunk's logits buffer just under 0.5 GiB (module docstring),
            half that when ``weight`` gets no gradient.
        backend: "auto" (kernels on CUDA, the fp32 reference on CPU; $MINITRAIN_CE_BACKEND overrides),
            "triton", "cuda" or "torch". On CUDA each chunk's loss and gradient come from one row kernel:
            the Triton one (each logit read twice; "auto" and "triton"), or with "cuda" the CUDA C++ one that
            reads each logit once (``csrc.ce_rows``: Hopper or newer, CuPy, 16-bit logits, no softcap, V a
            multiple of 8 up to 131072; an error elsewhere; reduction="none" runs the Triton kernels either
            way). $MINITRAIN_CE_ROWS=cuda makes "auto" take the CUDA one.
    Returns:
        fp32 loss: a scalar, or the shape of labels for reduction="none".
    """
    if backend not in ("auto", "triton", "cuda", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton', 'cuda' or 'torch', got {backend!r}")
    rows = {"cuda": "cuda", "triton": "triton"}.get(backend, "auto")
    _check_options(reduction, n_items, "triton" if backend == "cuda" else backend)
    backend = resolve_backend("triton" if backend == "cuda" else backend, hidden.is_cuda)
    if backend == "torch":
        return fused_linear_cross_entropy_ref(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                              bias, ignore_index, reduction, n_items, softcap
                                              ).reshape(labels.shape if reduction == "none" else ())
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_linear_cross_entropy: labels shape {tuple(labels.shape)} must equal hidden's "
                         f"leading shape {tuple(hidden.shape[:-1])}")
    h = hidden.reshape(-1, hidden.shape[-1]).contiguous()  # a no-op for the usual (B, T, C) activations
    y = labels.reshape(-1).contiguous()
    grad_on = torch.is_grad_enabled()
    if chunk_size is None:
        frozen = not (grad_on and weight.requires_grad)
        chunk_size = default_chunk_size(h.shape[0], weight.shape[0], weight.element_size(),
                                        FROZEN_CHUNK_BUDGET_BYTES if frozen else CHUNK_BUDGET_BYTES)
    if chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    cap = 0.0 if softcap is None else float(softcap)
    if reduction == "none":
        loss, _ = torch.ops.minitrain.fused_linear_cross_entropy_rows(h, weight, y, bias, ignore_index, cap,
                                                                      chunk_size)
        return loss.reshape(labels.shape)
    if n_items is not None:
        scale = 1.0 / torch.as_tensor(n_items, dtype=torch.float32, device=h.device)
    elif reduction == "sum":
        scale = torch.ones((), dtype=torch.float32, device=h.device)
    else:  # mean over non-ignored tokens; 1/max(count, 1) so an all-ignored batch gives 0, not NaN
        scale = 1.0 / (y != ignore_index).sum().clamp(min=1).to(torch.float32)
    need = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    loss, *_ = torch.ops.minitrain.fused_linear_cross_entropy(h, weight, y, bias, scale, ignore_index, cap,
                                                              chunk_size, *need, rows)
    return loss
