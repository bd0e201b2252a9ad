"""CUDA C++ cross-entropy row kernel: loss, lse and the gradient in one launch, each logit read once
(csrc/ce_rows.cu: the row split over a thread-block cluster, held in registers, partial sums exchanged through
distributed shared memory).

What ``triton_ops.cross_entropy.ce_launch`` runs for a loss-and-gradient launch (the fused linear
cross-entropy's chunk) with ``rows="cuda"`` (``fused_linear_cross_entropy(..., backend="cuda")`` or
$MINITRAIN_CE_ROWS=cuda): a Hopper-or-newer card (clusters, sm_90), CuPy present, float16/bfloat16 logits without
softcap, V a multiple of 8 and at most ``MAX_VOCAB``, 16-byte aligned rows; :func:`unsupported` says why not
otherwise. The Triton kernel (each logit read twice) stays the default: see ``triton_ops.cross_entropy.rows_backend``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from csrc import cupy_available, get_kernel, launch

_DT = {torch.float16: "f16", torch.bfloat16: "bf16"}


class Variant(NamedTuple):
    threads: int  # per block
    vectors: int  # 16-byte vectors (8 logits) per thread
    cluster: int  # blocks per cluster: one row's slices
    recompute: bool = False  # exponentials recomputed in the gradient pass (fewer registers)

    @property
    def capacity(self) -> int:
        """Logits per row it holds."""
        return self.threads * self.vectors * 8 * self.cluster

    @property
    def name(self) -> str:
        return f"t{self.threads}_p{self.vectors}_c{self.cluster}" + ("_rc" if self.recompute else "")


# Every variant csrc/ce_rows.cu instantiates. The default pick is the first in DEFAULT_ORDER that holds the row.
VARIANTS = {v.name: v for v in (Variant(256, 2, 4), Variant(256, 4, 8), Variant(512, 4, 8), Variant(1024, 2, 8),
                                Variant(256, 8, 8), Variant(512, 4, 8, True), Variant(256, 8, 8, True),
                                Variant(256, 4, 8, True))}
# the fastest per row length on an H200 (bench.dev.ce_rows_sweep, 2048 rows bf16, against the Triton kernel's
# 426.8 µs at V = 128256 and 215.0 µs at 65536): t256_p8_c8_rc 335.9 µs, t256_p4_c8_rc 182.4 µs. Below that the
# Triton kernel is faster: 115.4 vs 145.3 µs at V = 32000 (bench/results/2026-11-28-h200-cross_entropy.md)
DEFAULT_ORDER = ("t256_p2_c4", "t256_p4_c8_rc", "t256_p8_c8_rc")
MAX_VOCAB = max(v.capacity for v in VARIANTS.values())
ROWS_PER_CLUSTER = 4  # rows each cluster walks (grid = ceil(N / 4) clusters)


def pick(V: int, variant: str | None = None) -> Variant:
    """The variant for rows of V logits: ``variant`` by name, else the first of DEFAULT_ORDER that holds V."""
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"ce_rows: unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        v = VARIANTS[variant]
        if v.capacity < V:
            raise ValueError(f"ce_rows: variant {variant} holds {v.capacity} logits per row, V = {V}")
        return v
    for name in DEFAULT_ORDER:
        if VARIANTS[name].capacity >= V:
            return VARIANTS[name]
    raise ValueError(f"ce_rows: V = {V} exceeds the largest row the kernel holds ({MAX_VOCAB})")


def slice_width(V: int, cluster: int) -> int:
    """Columns per block: V over the cluster's blocks, rounded up to whole 16-byte vectors."""
    return -(-(-(-V // cluster)) // 8) * 8


def unsupported(logits: torch.Tensor, grad: torch.Tensor, softcap: float) -> str | None:
    """Why the kernel cannot take this launch, or None when it can."""
    if logits.dtype not in _DT:
        return f"takes float16 or bfloat16 logits, got {logits.dtype}"
    if softcap != 0.0:
        return "has no softcap"
    V = logits.shape[1]
    if V % 8 or V > MAX_VOCAB:
        return f"needs V a multiple of 8 and at most {MAX_VOCAB}, got {V}"
    for name, t in (("logits", logits), ("grad", grad)):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"needs 16-byte aligned rows of {name}"
    if not logits.is_cuda:
        return "needs CUDA tensors"
    if torch.cuda.get_device_capability(logits.device)[0] < 9:
        return "needs thread-block clusters (compute capability 9.0 or newer)"
    if not cupy_available():
        return "needs CuPy (pip install 'minitrain[cuda]')"
    return None


def launch_ce_rows(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, loss: torch.Tensor,
                   lse: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, variant: str | None = None,
                   rows_per_cluster: int = ROWS_PER_CLUSTER) -> None:
    """Loss and lse per row into ``loss``/``lse`` (fp32, N), the gradient times ``scale`` (fp32, 0-d or (N,))
    into ``grad`` (may be ``logits``). The caller checks shapes; :func:`unsupported` must have returned None."""
    N, V = logits.shape
    if N == 0:
        return
    v = pick(V, variant)
    kernel = get_kernel("ce_rows.cu", f"ce_rows_{_DT[logits.dtype]}_{v.name}", logits.device)
    clusters = -(-N // max(1, rows_per_cluster))
    scale = scale.to(torch.float32).contiguous()
    args = (logits, np.int64(logits.stride(0)), grad, np.int64(grad.stride(0)), labels, loss, lse, scale,
            np.int32(0 if scale.dim() == 0 else 1), np.int64(N), np.int32(V), np.int64(ignore_index),
            np.int32(slice_width(V, v.cluster)))
    with torch.cuda.device(logits.device):
        launch(kernel, (clusters * v.cluster,), (v.threads,), args)
