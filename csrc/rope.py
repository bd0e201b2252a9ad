"""CUDA C++ RoPE (csrc/rope.cu), registered as ``minitrain::rope_cuda`` / ``minitrain::rope_cuda_``.

Same semantics, layouts and autograd as the Triton op in :mod:`triton_ops.rope` (which holds the reference,
the input checks and the public ``rope(..., backend="cuda")``); this file only picks the kernel variant and
launches it through the shared CuPy/NVRTC loader on torch's current stream.
"""
from __future__ import annotations

import numpy as np
import torch

from csrc import get_kernel, launch
from triton_ops.rope import check_rope_inputs, make_rope_backward, rope_setup_context

_DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_TABLE_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
THREADS = 128


def _vec_width(tensors, half: int) -> int:
    """Widest vector (16 bytes at most) that every tensor supports: unit d-stride, and D/2, each used
    stride and the base address all multiples of it."""
    elem = tensors[0].element_size()
    for vec in (8, 4, 2):
        if vec * elem > 16 or half % vec:
            continue
        ok = True
        for x in tensors:
            used = [s for s, n in zip(x.stride()[:3], x.shape[:3]) if n > 1]
            if x.stride(3) != 1 or any(s % vec for s in used) or x.data_ptr() % (vec * elem):
                ok = False
                break
        if ok:
            return vec
    return 1


def launch_rope_cuda(q, k, cos, sin, q_out, k_out, backward: bool) -> None:
    cos3, sin3 = check_rope_inputs(q, k, cos, sin, where="rope_cuda")
    if q.device.type != "cuda":
        raise ValueError(f"rope_cuda: needs CUDA tensors, got {q.device}")
    if cos3.dtype != sin3.dtype:
        raise ValueError(f"rope_cuda: cos and sin must share a dtype, got {cos3.dtype} and {sin3.dtype}")
    B, T, H, D = q.shape
    KV = k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        return
    half = D // 2
    vec = _vec_width((q, k, q_out, k_out), half)
    kernel = get_kernel("rope.cu", f"rope_{_DT[q.dtype]}_v{vec}", q.device)
    i64 = np.int64
    strides = [i64(s) for x in (q, k, q_out, k_out) for s in x.stride()]
    sc = [i64(0 if cos3.shape[0] == 1 else cos3.stride(0)), i64(cos3.stride(1)), i64(cos3.stride(2))]
    ss = [i64(0 if sin3.shape[0] == 1 else sin3.stride(0)), i64(sin3.stride(1)), i64(sin3.stride(2))]
    args = (q, k, q_out, k_out, cos3, sin3, i64(T), np.int32(H), np.int32(KV), np.int32(half), *strides, *sc, *ss,
            np.int32(_TABLE_DT[cos3.dtype]), np.int32(1 if backward else 0))
    with torch.cuda.device(q.device):
        launch(kernel, (B * T,), (THREADS,), args, shared_mem=4 * half * 4)


@torch.library.custom_op("minitrain::rope_cuda", mutates_args=())
def rope_cuda_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    launch_rope_cuda(q, k, cos, sin, q_out, k_out, backward)
    return q_out, k_out


@rope_cuda_op.register_fake
def _(q, k, cos, sin, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("minitrain::rope_cuda_", mutates_args=("q", "k"))
def rope_cuda_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         backward: bool) -> None:
    launch_rope_cuda(q, k, cos, sin, q, k, backward)


@rope_cuda_inplace_op.register_fake
def _(q, k, cos, sin, backward):
    return None


torch.library.register_autograd("minitrain::rope_cuda", make_rope_backward(torch.ops.minitrain.rope_cuda),
                                setup_context=rope_setup_context)
