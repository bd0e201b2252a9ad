"""Rows of a table in pinned host memory gathered straight into a device tensor: the input embedding kept off the
device (``minitrain.model.offload_input_embeddings``).

out[i, :] = table[ids[i], :] for a (V, C) table and ids of any shape; the output is (*ids.shape, C) on the ids'
device. On CUDA the table is pinned host memory, which the kernel reads over PCIe through its mapped (unified)
address: one launch, no host synchronization, so a CUDA graph captures it like any kernel. Each token's row is
C contiguous elements (8 KB for C = 4096 in bf16), copied as raw bits (an integer view), so any 2- or 4-byte
dtype round-trips exactly. An id outside [0, V) gives a row of NaN (the kernel cannot raise; nn.Embedding's
device-side assert would stop the process instead) for floating tables, checked by the caller's loss.
Bytes moved per token: C * element size over PCIe (read) and into device memory (write).
On the CPU (the tests, under TRITON_INTERPRET=1) the same kernel runs on host tensors.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["gather_rows"]

_BITS = {2: torch.int16, 4: torch.int32}


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, V, C, stride_t, nan_bits, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.load(ids_ptr + row).to(tl.int64)
    ok = (idx >= 0) & (idx < V)
    src = table_ptr + tl.where(ok, idx, 0) * stride_t
    dst = out_ptr + row * C
    for c0 in range(0, C, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < C
        v = tl.load(src + offs, mask=m)  # (row 0 for a bad id: a valid address, replaced below)
        tl.store(dst + offs, tl.where(ok, v, nan_bits.to(v.dtype)), mask=m)


@functools.lru_cache(maxsize=None)
def _nan_bits(dtype: torch.dtype) -> int:
    """The bit pattern of NaN in ``dtype`` as the integer the kernel stores (0 for integer tables)."""
    if not dtype.is_floating_point:
        return 0
    return torch.tensor(float("nan"), dtype=dtype).view(_BITS[dtype.itemsize]).item()


def gather_rows(table: torch.Tensor, ids: torch.Tensor, out_device: torch.device | None = None) -> torch.Tensor:
    """table (V, C) on the host (pinned when the ids are on CUDA), unit stride along C; ids int64/int32 on the
    device that gets the output (or the CPU). Returns (*ids.shape, C) in table's dtype."""
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"gather_rows: expected a (V, C) table with unit stride along C, got shape "
                         f"{tuple(table.shape)} strides {table.stride()}")
    if table.element_size() not in _BITS:
        raise TypeError(f"gather_rows: the table's dtype must be 2 or 4 bytes wide, got {table.dtype}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"gather_rows: ids must be int64 or int32, got {ids.dtype}")
    dev = ids.device if out_device is None else torch.device(out_device)
    if dev.type == "cuda" and not table.is_pinned():
        raise ValueError("gather_rows: a host table read from CUDA must be in pinned memory (tensor.pin_memory())")
    V, C = table.shape
    out = torch.empty(*ids.shape, C, dtype=table.dtype, device=dev)
    n = ids.numel()
    if n == 0 or C == 0:
        return out
    bits = _BITS[table.element_size()]
    nan = _nan_bits(table.dtype)
    flat = ids.reshape(-1).contiguous()
    block = min(triton.next_power_of_2(C), 2048)
    with torch.cuda.device(dev) if dev.type == "cuda" else torch.device("cpu"):
        _gather_rows_kernel[(n,)](table.view(bits), flat, out.view(bits), V, C, table.stride(0), nan,
                                  BLOCK=block, num_warps=4)
    return out
