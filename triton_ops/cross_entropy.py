"""Cross-entropy over given logits, any vocabulary size, fp32 accumulation.

Formula, per row i of logits x (N, V) with label y_i:
    z      = softcap * tanh(x / softcap)          (only when softcap is given; else z = x)
    lse_i  = log sum_v exp(z_iv)                   (online over V in chunks of BLOCK_V: running max m, sum d)
    loss_i = lse_i - z_{i,y_i}                     (0 where y_i == ignore_index)
    dloss_i/dx_iv = (softmax(z_i)_v - [v == y_i]) * (1 - (z_iv/softcap)^2)   (last factor only with softcap)
Reductions: "none" -> loss_i (shape of labels); "sum" -> sum_i loss_i; "mean" -> sum / max(#non-ignored, 1)
(so an all-ignored batch gives 0, not NaN); n_items given -> sum / n_items (the caller's token count over
all micro-batches of an accumulation step, for a correctly normalized gradient).

Layouts: logits (..., V) with unit stride along V (any row stride); labels (...) int64; loss fp32.
Bytes moved per logit element (b = element size): forward reads b (one pass, online logsumexp);
backward reads b and writes b (one pass, lse saved from the forward). Total 3b per element.

Memory: forward saves the logits (a reference, no copy) and the fp32 lse (N floats). The backward writes
the gradient into a new (N, V) tensor, or with ``inplace_backward=True`` into the logits buffer itself,
saving N*V*b bytes. In-place is only correct when nothing else reads those logits after the loss is
computed (e.g. logits = lm_head(h) feeding only this loss: matmul's backward saves h and W, not the
logits); after backward the caller's logits tensor holds the gradient.
"""
from __future__ import annotations


import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from csrc import sm_count as _sm_count

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reduce(loss_rows: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str,
            n_items) -> torch.Tensor:
    """Shared reduction of per-row fp32 losses (reference and kernel paths use the same formula)."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if n_items is not None:
        return total / n_items
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum()
    # clamp: mean over zero tokens is 0/1 = 0, not 0/0 = NaN
    return total / count.clamp(min=1).to(total.dtype)


BACKEND_ENV = "MINITRAIN_CE_BACKEND"


def resolve_backend(backend: str, is_cuda: bool) -> str:
    """"auto" -> $MINITRAIN_CE_BACKEND if set (triton | torch), else Triton on CUDA and the reference on CPU."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV, "auto")
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"{BACKEND_ENV}={backend!r}: expected triton or torch")
    if backend == "auto":
        backend = "triton" if is_cuda else "torch"
    return backend


def _check_options(reduction: str, n_items, backend: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if n_items is not None and reduction == "none":
        raise ValueError("n_items divides a summed loss; it cannot be combined with reduction='none'")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def cross_entropy_ref(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                      reduction: str = "mean", n_items=None, softcap: float | None = None) -> torch.Tensor:
    """Pure-torch fp32 reference (the specification and the CPU path). Returns fp32."""
    _check_options(reduction, n_items, "torch")
    x = logits.float()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    rows = F.cross_entropy(x.reshape(-1, x.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="none").reshape(labels.shape)
    return _reduce(rows, labels, ignore_index, reduction, n_items)


# ----------------------------------------------------------------------------------------------------------
# Kernel. One program per row. COMPUTE_LOSS: pass 1 (online logsumexp over V) -> loss, lse.
# WRITE_GRAD: pass 2 -> (softmax - onehot) * dz/dx * scale, written to grad_ptr (may equal logits_ptr:
# each program reads a logit before it overwrites it, and rows never overlap).
# scale = scale_ptr[row * scale_stride]: stride 0 for one scalar (fused op), 1 for per-row grads (backward).

@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1), with u clamped to +-15 where tanh is +-1 in fp32 (no inf, no NaN).
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)
    return 1.0 - 2.0 / (tl.exp2(u * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _sech2(u):
    # 1 - tanh(u)^2 = 4 e / (e + 1)^2 with e = exp(2u): accurate to a few ulps relative everywhere, where 1 - t * t
    # loses all digits as t nears +-1 (extreme softcapped logits; at u = 15, e^30 squared is still finite in fp32)
    u = tl.minimum(tl.maximum(u, -15.0), 15.0)
    e = tl.exp2(u * (2.0 * 1.4426950408889634))
    return 4.0 * e / ((e + 1.0) * (e + 1.0))


@triton.jit
def _ce_kernel(logits_ptr, stride_l, grad_ptr, stride_g, labels_ptr, loss_ptr, lse_ptr, scale_ptr,
               scale_stride, N, V, ignore_index, softcap,
               HAS_SOFTCAP: tl.constexpr, COMPUTE_LOSS: tl.constexpr, WRITE_GRAD: tl.constexpr,
               BLOCK_V: tl.constexpr):
    # Persistent: a grid of a few programs per SM, each walking rows pid, pid + nprog, ...; so few rows are in
    # flight (2 x 132 x 256 KB at V=128256 bf16 on an H100) that the gradient pass's re-read of a row mostly
    # hits L2, helped by the eviction hints (pass 1 keeps the row, pass 2 streams it) and by walking pass 2
    # backwards (the blocks pass 1 read last are the likeliest still cached). Measured on an H100 at 16384 x
    # 128256 bf16, forward + gradient in place: 3.6 ms, was 4.3 ms (one program per row, no hints); 3 passes
    # at copy speed would take 4.2 ms.
    LOG2E: tl.constexpr = 1.4426950408889634
    nblk = tl.cdiv(V, BLOCK_V)
    cols = tl.arange(0, BLOCK_V)
    for row in range(tl.program_id(0).to(tl.int64), N, tl.num_programs(0)):  # int64: row * stride > 2^31
        x_row = logits_ptr + row * stride_l
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index

        if COMPUTE_LOSS:
            m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), 0)  # running max (scalar)
            d = tl.sum(tl.zeros([BLOCK_V], tl.float32), 0)  # running sum of exp(z - m)
            for b in range(0, nblk):
                offs = b * BLOCK_V + cols
                mask = offs < V
                z = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
                if HAS_SOFTCAP:
                    z = softcap * _tanh(z / softcap)
                z = tl.where(mask, z, float("-inf"))
                m_new = tl.maximum(m, tl.max(z, 0))
                d = d * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new) * LOG2E), 0)
                m = m_new
            lse = m + tl.log2(d) / LOG2E
            in_range = (label >= 0) & (label < V)
            z_y = tl.load(x_row + tl.where(in_range, label, 0)).to(tl.float32)
            if HAS_SOFTCAP:
                z_y = softcap * _tanh(z_y / softcap)
            # a label outside [0, V) that is not ignore_index gives a NaN loss (no out-of-bounds read)
            loss = tl.where(valid, tl.where(in_range, lse - z_y, float("nan")), 0.0)
            tl.store(loss_ptr + row, loss)
            tl.store(lse_ptr + row, lse)
        else:
            lse = tl.load(lse_ptr + row)

        if WRITE_GRAD:
            if COMPUTE_LOSS:
                # every thread has read the label's logit (z_y) before any thread overwrites the row with the
                # gradient (grad may be the logits themselves): without this barrier a warp that ran ahead
                # stored g[label] first and a slower one took it for z_y, giving a wrong loss for that row
                # (seen on an H100 in fp32, a few rows in 1024)
                tl.debug_barrier()
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
            scale = tl.where(valid, scale, 0.0)  # ignored rows get an exact zero gradient
            g_row = grad_ptr + row * stride_g
            for bb in range(0, nblk):
                offs = (nblk - 1 - bb) * BLOCK_V + cols
                mask = offs < V
                x = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
                if HAS_SOFTCAP:
                    t = _tanh(x / softcap)
                    p = tl.exp2((softcap * t - lse) * LOG2E)
                    g = (p - tl.where(offs == label, 1.0, 0.0)) * _sech2(x / softcap)
                else:
                    p = tl.exp2((x - lse) * LOG2E)
                    g = p - tl.where(offs == label, 1.0, 0.0)
                tl.store(g_row + offs, (g * scale).to(g_row.dtype.element_ty), mask=mask,
                         eviction_policy="evict_first")


PROGRAMS_PER_SM = 2  # persistent grid of the row kernel (H100 sweep in _ce_kernel's comment: 2 beat 1 and N)



def _programs(N: int, logits: torch.Tensor) -> int:
    """Programs of the persistent row kernel: PROGRAMS_PER_SM per SM on CUDA, one per row otherwise."""
    return min(N, PROGRAMS_PER_SM * _sm_count(logits.device.index or 0)) if logits.is_cuda else N


def _launch_config(V: int, softcap: bool = False) -> tuple[int, int]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(triton.next_power_of_2(V), 1024), 1
    # 16384-wide blocks for large vocabularies (3.6 vs 4.0 ms with 8192 at V=128256 on an H100); the softcap's
    # tanh needs more registers per element, so it keeps 8192
    block = min(triton.next_power_of_2(V), 8192 if softcap or V < 32768 else 16384)
    return block, 16 if block >= 8192 else max(1, min(8, block // 512))


def _check_logits(name: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dtype not in _DTYPES:
        raise TypeError(f"{name}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"{name}: expected 2-D logits (N, V) with unit stride along V, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if labels.dtype != torch.int64 or labels.shape != logits.shape[:1] or not labels.is_contiguous():
        raise ValueError(f"{name}: expected contiguous int64 labels of shape ({logits.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{name}: logits on {logits.device} but labels on {labels.device}")


ROWS_ENV = "MINITRAIN_CE_ROWS"


def rows_backend(rows: str = "auto") -> str:
    """Which kernel takes a loss-and-gradient launch: "triton" (the row kernel below, each logit read twice),
    "cuda" (csrc/ce_rows.cu, each logit read once; an error where it does not apply), or "auto":
    $MINITRAIN_CE_ROWS if set, else "triton". The CUDA kernel is the faster row kernel alone (H200, 2048 x
    128256 bf16: 336 vs 427 µs; slower below V = 65536), but the fused linear cross-entropy at 16,384 tokens was
    not measurably faster with it (79.2 vs 79.5 ms in one run, 80.0 vs 79.5 in another: within the runs' spread;
    bench/results/2026-11-28-h200-cross_entropy.md), so it is not the default. Asked for through
    $MINITRAIN_CE_ROWS, a launch the kernel cannot take (softcap, fp32, ...) runs the Triton kernel."""
    if rows == "auto":
        rows = os.environ.get(ROWS_ENV, "").strip() or "triton"
        if rows not in ("cuda", "triton"):
            raise ValueError(f"{ROWS_ENV}={rows!r}: expected cuda or triton")
    if rows not in ("cuda", "triton"):
        raise ValueError(f"rows backend must be 'auto', 'cuda' or 'triton', got {rows!r}")
    return rows


def ce_launch(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float,
              loss: torch.Tensor | None, lse: torch.Tensor, grad: torch.Tensor | None = None,
              scale: torch.Tensor | None = None, rows: str = "auto") -> None:
    """Launch the row kernel. loss given -> compute loss and lse (pass 1); grad given -> write the
    gradient scaled by ``scale`` (0-d: one factor for all rows; (N,): per row) into grad (pass 2).
    grad may be ``logits`` itself (in place). softcap 0 means off. With both loss and grad, ``rows``
    (see :func:`rows_backend`) picks this module's Triton kernel or the CUDA C++ kernel that reads each logit
    once (``csrc.ce_rows``)."""
    N, V = logits.shape
    if N == 0:
        return
    write = grad is not None
    if write:
        if grad.shape != logits.shape or grad.stride(1) != 1 or grad.dtype != logits.dtype:
            raise ValueError("ce_launch: grad must match logits in shape and dtype with unit stride along V")
        asked = rows == "cuda"  # by the caller; from the environment, a launch it cannot take stays on Triton
        rows = rows_backend(rows) if loss is not None else "triton"
        if rows == "cuda":
            from csrc import ce_rows

            why = ce_rows.unsupported(logits, grad, softcap)
            if why is None:
                ce_rows.launch_ce_rows(logits, labels, ignore_index, loss, lse, grad, scale)
                return
            if asked:
                raise ValueError(f"cross-entropy rows backend 'cuda': the kernel {why}")
    block, warps = _launch_config(V, softcap != 0.0)
    grid = _programs(N, logits)
    if write:
        scale = scale.to(torch.float32).contiguous()
        scale_stride = 0 if scale.dim() == 0 else 1
    else:
        grad, scale, scale_stride = logits, lse, 0  # unused pointers
    _ce_kernel[(grid,)](logits, logits.stride(0), grad, grad.stride(0), labels,
                        loss if loss is not None else lse, lse, scale, scale_stride, N, V, ignore_index,
                        float(softcap), HAS_SOFTCAP=softcap != 0.0, COMPUTE_LOSS=loss is not None,
                        WRITE_GRAD=write, BLOCK_V=block, num_warps=warps)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration: per-row losses are the op's output; reduction is plain torch outside it.

@torch.library.custom_op("minitrain::cross_entropy_rows", mutates_args=())
def _ce_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, softcap: float,
             inplace_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_logits("cross_entropy", logits, labels)
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    ce_launch(logits, labels, ignore_index, softcap, loss, lse)
    return loss, lse


@_ce_rows.register_fake
def _(logits, labels, ignore_index, softcap, inplace_backward):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("minitrain::cross_entropy_rows_backward", mutates_args=())
def _ce_rows_backward(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                      ignore_index: int, softcap: float) -> torch.Tensor:
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    ce_launch(logits, labels, ignore_index, softcap, None, lse, grad, grad_rows)
    return grad


@_ce_rows_backward.register_fake
def _(logits, labels, lse, grad_rows, ignore_index, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("minitrain::cross_entropy_rows_backward_", mutates_args=("logits",))
def _ce_rows_backward_(logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                       ignore_index: int, softcap: float) -> None:
    ce_launch(logits, labels, ignore_index, softcap, None, lse, logits, grad_rows)


@_ce_rows_backward_.register_fake
def _(logits, labels, lse, grad_rows, ignore_index, softcap):
    return None


def _ce_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, softcap, inplace_backward = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index, ctx.softcap, ctx.inplace = ignore_index, softcap, inplace_backward


def _ce_backward(ctx, grad_loss, grad_lse):
    """d loss_i / d x_iv = grad_loss_i * (softmax(z_i)_v - [v == y_i]) * dz_iv/dx_iv, with
    dz/dx = 1 - tanh(x/softcap)^2 under softcap (1 otherwise); lse is not differentiated (an auxiliary
    output). One pass: read x, write the gradient (into x itself when inplace_backward)."""
    logits, labels, lse = ctx.saved_tensors
    grad_loss = grad_loss.contiguous()
    if ctx.inplace:
        torch.ops.minitrain.cross_entropy_rows_backward_(logits, labels, lse, grad_loss, ctx.ignore_index,
                                                         ctx.softcap)
        return logits, None, None, None, None
    grad = torch.ops.minitrain.cross_entropy_rows_backward(logits, labels, lse, grad_loss, ctx.ignore_index,
                                                           ctx.softcap)
    return grad, None, None, None, None


_ce_rows.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  n_items=None, softcap: float | None = None, inplace_backward: bool = False,
                  backend: str = "auto") -> torch.Tensor:
    """Cross-entropy of logits against integer labels, fp32 math, any vocabulary size.

    Args:
        logits: (..., V) float32/float16/bfloat16, unit stride along V.
        labels: (...) int64; entries equal to ``ignore_index`` contribute no loss and no gradient; any other
            entry outside [0, V) gives a NaN loss (checked without a host sync).
        reduction: "mean" (over non-ignored tokens; 0 when there are none), "sum" or "none".
        n_items: int or 0-d tensor; when given the loss is sum / n_items (gradient accumulation across
            micro-batches normalized by the true token count of the whole step).
        softcap: when given, logits pass through softcap * tanh(logits / softcap) first (Gemma-2 style).
        inplace_backward: write the gradient into the logits buffer instead of a new tensor (saves N*V
            elements). Only when nothing else needs these logits after the loss (see the module docstring).
        backend: "auto" (Triton on CUDA, the reference on CPU; $MINITRAIN_CE_BACKEND overrides), "triton" or
            "torch".
    Returns:
        fp32 loss: a scalar, or shape of labels for reduction="none".
    """
    _check_options(reduction, n_items, backend)
    backend = resolve_backend(backend, logits.is_cuda)
    if backend == "torch":
        return cross_entropy_ref(logits, labels, ignore_index, reduction, n_items, softcap)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: labels shape {tuple(labels.shape)} must equal logits shape without "
                         f"V {tuple(logits.shape[:-1])}")
    x = logits.reshape(-1, logits.shape[-1])
    if inplace_backward and logits.dim() != 2 and not logits.is_contiguous():
        raise ValueError("cross_entropy: inplace_backward needs 2-D or contiguous logits (a (N, V) view, no copy)")
    if inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError("cross_entropy: inplace_backward would overwrite a leaf tensor with its own gradient; "
                         "use it on logits computed by the model (e.g. lm_head output)")
    rows, _ = torch.ops.minitrain.cross_entropy_rows(x, labels.reshape(-1).contiguous(), ignore_index,
                                                     0.0 if softcap is None else float(softcap),
                                                     inplace_backward)
    return _reduce(rows.reshape(labels.shape), labels, ignore_index, reduction, n_items)
