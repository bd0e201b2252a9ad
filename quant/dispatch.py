"""Backend choice for NF4 dequantization: one entry point, several implementations.

``backend="auto"`` takes the reference on CPU and, on CUDA, the backend measured fastest on this card: the
first time a (card, output dtype, size class) is needed, the Triton and the CUDA C++ kernels each dequantize
a representative weight of that size class (1024 x 4096 or 4096 x 4096) a few times under CUDA events and the
faster one is kept for the rest of the process (``measured_choices()`` shows what was picked). A backend that
cannot run (no CuPy for "cuda") is simply not a candidate. While ``torch.compile`` traces, nothing is timed:
a choice measured earlier is used, else "triton". The environment variable ``MINITRAIN_NF4_BACKEND``
(torch | triton | cuda) overrides "auto" for a whole process.
"""
from __future__ import annotations

import os
import weakref

import torch

from .nf4 import NF4Weight, dequantize_nf4_ref

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MINITRAIN_NF4_BACKEND"


def _check_out(q: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None, backend: str = "auto") -> None:
    if out is None:
        return
    from triton_ops.nf4_dequant import out_layout_ok

    if out.shape != q.shape or out.dtype != dtype or out.device != q.device or not out_layout_ok(out, q.blocksize):
        raise ValueError(f"dequantize_nf4: out must be a {dtype} tensor of shape {tuple(q.shape)} on {q.device}, "
                         f"contiguous or with rows apart (unit column stride, K a multiple of the blocksize "
                         f"{q.blocksize}), got {out.dtype} {tuple(out.shape)} on {out.device} with strides "
                         f"{tuple(out.stride())}")
    if backend == "cuda" and not out.is_contiguous():
        raise ValueError("dequantize_nf4: the CUDA C++ kernel writes contiguous outputs only; for an out with rows "
                         f"apart (strides {tuple(out.stride())}) use backend='triton' or 'auto'")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                    numel: int = 4096 * 4096) -> str:
    """The concrete backend ("torch" | "triton" | "cuda") that ``backend`` means for a weight of ``numel``
    elements dequantized to ``dtype`` on ``device``."""
    if backend == "auto" and device.type == "cuda" and ENV_VAR not in os.environ:  # the common case, short
        choice = _MEASURED.get((device.index or 0, dtype, _size_class(numel)))
        if choice is not None:
            return choice
    if backend not in BACKENDS:
        raise ValueError(f"dequantize_nf4: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "torch" if device.type != "cuda" else _fastest_cuda_backend(device, dtype, numel)
    return backend


# (device index, output dtype, size class) -> measured fastest backend. A measurement cache like
# functools.lru_cache: filled once per process and card, never changes a result (all backends are bit-identical).
_MEASURED: dict[tuple[int, torch.dtype, str], str] = {}
_SIZE_CLASSES = {"small": (1024, 4096), "large": (4096, 4096)}


def measured_choices() -> dict[tuple[int, torch.dtype, str], str]:
    """What "auto" measured so far in this process: {(device index, dtype, size class): backend}."""
    return dict(_MEASURED)


def _size_class(numel: int) -> str:
    return "small" if numel < 8 * 2**20 else "large"


def _fastest_cuda_backend(device: torch.device, dtype: torch.dtype, numel: int) -> str:
    index = device.index if device.index is not None else 0
    key = (index, dtype, _size_class(numel))
    choice = _MEASURED.get(key)
    if choice is not None:
        return choice
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return "triton"  # never time inside a trace or a CUDA graph capture
    choice = _measure(torch.device("cuda", index), dtype, _SIZE_CLASSES[key[2]])
    _MEASURED[key] = choice
    return choice


def _time_us(fn, reps: int = 10) -> float:
    """Median microseconds of fn() on the current stream (CUDA events), after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _measure(device: torch.device, dtype: torch.dtype, shape: tuple[int, int]) -> str:
    """Time each available CUDA backend on a representative weight; the fastest wins (ties: Triton)."""
    from .nf4 import quantize_nf4

    with torch.cuda.device(device):
        gen = torch.Generator(device).manual_seed(0)  # a private generator: the caller's RNG stream is untouched
        q = quantize_nf4(torch.randn(shape, device=device, dtype=torch.float32, generator=gen), double_quant=True)
        out = torch.empty(shape, device=device, dtype=dtype)
        timings = {}
        for name in ("triton", "cuda"):
            try:
                timings[name] = _time_us(lambda name=name: _run(name, q, dtype, out))
            except Exception:  # noqa: BLE001 - a backend that cannot run here (e.g. no CuPy) is not a candidate
                continue
    if not timings:
        return "torch"
    return min(timings, key=lambda k: (timings[k], k != "triton"))


# -- the eager fast path ----------------------------------------------------------------------------------------
# A 1024 x 4096 weight dequantizes in ~3-5 us on an H100/H200, so per-call Python work is what an eager caller sees.
# Each NF4Weight is validated once (contiguity, devices, sizes: the kernels' own checks); its flattened kernel
# arguments and one launch plan per kernel backend (device pointers converted once, launch configuration cached)
# are kept while the weight lives (a weakref callback drops them). Later calls compare the tensor objects by
# identity and launch the kernel directly, without the torch.library op (which is what torch.compile traces; in
# eager it only adds a dispatcher round trip). Nothing on this path synchronizes with the device.
class _Entry:
    __slots__ = ("ref", "fields", "args", "plans", "device", "shape", "rows", "cols", "numel")


_PREPARED: dict[int, _Entry] = {}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _fields(q) -> tuple:
    return (id(q.data), id(q.absmax), id(q.nested_absmax), id(q.nested_code), id(q.offset), id(q.code),
            q.shape, q.blocksize, q.nested_blocksize)


def _entry(q) -> _Entry:
    """The cached, validated entry of weight object ``q`` (made and validated on first use or when one of its
    tensors was replaced)."""
    e = _PREPARED.get(id(q))
    if e is not None and e.ref() is q and e.fields == _fields(q):
        return e
    from triton_ops.nf4_dequant import _check

    double = q.nested_absmax is not None
    args = (q.data.reshape(-1), q.absmax, q.nested_absmax if double else None, q.nested_code if double else None,
            q.offset.reshape(1) if double else None, q.code)
    _check(*args, [int(q.shape[0]), int(q.shape[1])], q.blocksize, q.nested_blocksize, q.dtype,
           where="dequantize_nf4")
    e = _Entry()
    e.fields, e.args, e.plans = _fields(q), args + (q.blocksize, q.nested_blocksize), {}
    e.device, e.shape, e.rows, e.cols = q.data.device, q.shape, int(q.shape[0]), int(q.shape[1])
    e.numel = e.rows * e.cols
    return keep_per_weight(_PREPARED, q, e)


def keep_per_weight(cache: dict, q, value):
    """Keep ``value`` in ``cache`` under id(q) until weight object q is garbage collected (``value.ref()`` is q
    while valid, so a recycled id never matches); a weight that cannot be weakly referenced is not kept
    (``value.ref()`` is None: prepared again on the next call). Returns value."""
    key = id(q)
    try:
        value.ref = weakref.ref(q, lambda _, key=key: cache.pop(key, None))
    except TypeError:
        value.ref = lambda: None
        return value
    if len(cache) > 4096:
        cache.clear()
    cache[key] = value
    return value


def prepared_args(q) -> tuple:
    """(data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize) of a validated weight,
    flattened as the kernels take them (validation cached per weight object)."""
    return _entry(q).args


def _plan(backend: str, args: tuple, plans: dict | None = None):
    """The launch plan of kernel ``backend`` ("triton" | "cuda") for prepared ``args``, kept in ``plans``."""
    plan = None if plans is None else plans.get(backend)
    if plan is None:
        if backend == "triton":
            from triton_ops.nf4_dequant import DequantPlan
        else:
            from csrc.nf4_dequant import DequantPlan
        plan = DequantPlan(*args)
        if plans is not None:
            plans[backend] = plan
    return plan


def _eager(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _launch_into(backend: str, args: tuple, out: torch.Tensor, plans: dict | None = None) -> torch.Tensor:
    """Run a kernel backend on prepared arguments into ``out`` (eager, plain CUDA tensors)."""
    return _plan(backend, args, plans)(out)


def _run(backend: str, q: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if backend == "torch":
        return dequantize_nf4_ref(q, dtype, out)
    if backend == "triton":
        from triton_ops.nf4_dequant import nf4_dequantize

        return nf4_dequantize(q, dtype=dtype, out=out)
    from csrc.nf4_dequant import nf4_dequantize_cuda

    return nf4_dequantize_cuda(q, dtype=dtype, out=out)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """Dequantize an NF4 weight to a dense (N, K) tensor.

    Args:
        q: the quantized weight.
        dtype: output dtype, float32/float16/bfloat16 (default: the weight's original dtype).
        out: optional (N, K) buffer of that dtype on q's device, reused instead of allocating: contiguous, or
            rows apart with unit column stride and K a multiple of the blocksize (a column slice of a wider
            matrix, e.g. [W | B] for one GEMM with an adapter's columns appended; "triton" and "torch" only).
        backend: "auto" | "torch" | "triton" | "cuda" (see module docstring).
    Returns:
        (N, K) tensor; every backend gives bit-identical values.
    """
    if not isinstance(q, NF4Weight):
        raise TypeError(f"dequantize_nf4: expected an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in _FLOATS:
        raise ValueError(f"dequantize_nf4: dtype must be float32, float16 or bfloat16, got {dtype}")
    data = q.data
    if backend != "torch" and data.is_cuda and _eager(data):  # the eager fast path (see above)
        e = _entry(q)
        if out is None:
            out = torch.empty(e.rows, e.cols, dtype=dtype, device=e.device)
        elif not (out.dtype == dtype and out.is_contiguous() and out.shape == e.shape and out.device == e.device):
            _check_out(q, dtype, out, backend)
            if not out.is_contiguous() and backend == "auto":
                backend = "triton"  # rows apart: only the Triton kernel writes them
        backend = resolve_backend(backend, e.device, dtype, e.numel)
        if backend != "torch":
            return _plan(backend, e.args, e.plans)(out)
        return dequantize_nf4_ref(q, dtype, out)
    _check_out(q, dtype, out, backend)
    if out is not None and not out.is_contiguous() and backend == "auto" and data.is_cuda:
        backend = "triton"
    return _run(resolve_backend(backend, data.device, dtype, q.numel), q, dtype, out)
