"""x @ dequant(W).T for an NF4 weight, by the fastest path for the shape.

Paths (``backend=``):
* "torch": the reference (``dequantize_nf4_ref`` to x's dtype, then ``F.linear``); always used on CPU.
* "gemv_cuda": ``csrc.nf4_gemv`` (CUDA C++) for M <= 8 (decode): each block streams a few weight rows once with
  16-byte loads, its warps split K, all M rows of x are accumulated in fp32 from one pass over the weight. Any K.
* "mma_cuda": ``csrc.nf4_mma`` (CUDA C++) for fp16/bf16 x and M <= 64 (short sequences, batched decode): tensor-core
  MMAs fed by lanes that decode their own 32 weight elements in registers; W read once at 4.1 bits per weight and
  rounded to x's dtype exactly as the dequantization rounds it. K % 128 == 0 and a power-of-two blocksize >= 32.
* "gemv": ``triton_ops.nf4_matmul.nf4_gemv`` (Triton) for M <= 8; K % blocksize == 0 only.
* "fused": ``triton_ops.nf4_matmul`` dequantizes W tile by tile in registers inside a Triton GEMM (M <= 256).
  Measured 5-17x slower than "dequant" at M = 8..128 on an H200 (bench/results/2026-11-27-h200-nf4.md), so
  "auto" never considers it; it stays available by name.
* "dequant": dequantize W into a reused scratch buffer (the measured-fastest dequant kernel) and call cuBLAS
  through ``F.linear``: the path for every M > 64.
* "auto" (default): on CUDA, M > 64 -> "dequant"; otherwise the first eager call for a key (card, x dtype, N, K,
  M rounded up to a power of two) times the candidates on the real inputs: "gemv_cuda" (with CuPy; M <= 16, two
  passes over W above 8), "mma_cuda" (with CuPy; 2 <= M <= 64), "gemv" (M <= 8, when the Triton kernel can tile the
  weight) and "dequant". Each runs twice, then the device is synchronized (first-use costs and the caller's queued
  work stay out of every window); a kernel that raises or whose output disagrees with dequant + cuBLAS (warning)
  is dropped. Then 3 interleaved rounds (order rotated) time each path twice, after a warm-up call and a device
  synchronization each: eager, 16 back-to-back calls between CUDA events (the window covers host launches and GPU
  work: the larger of the two per call, what a loop of eager calls sees); GPU only, 32 calls queued behind a
  ``torch.cuda._sleep`` that outlasts their launches (1.5x the host time just measured, retried 4x longer when the
  start event had already passed), so the events see the kernels back to back as a graph replays them. Each path
  keeps its best round; its eager time is max(eager batch, GPU time). Two choices are kept per key: eager (by eager
  time) and graph (by GPU time), each the fastest, except that a kernel replaces "dequant" only when it is faster
  by more than 5% and 0.5 us (a tie within noise stays with dequant + cuBLAS). Calls inside a CUDA-graph capture
  take the graph choice of a key timed eagerly before (the trainer and generate warm up eagerly first), else the
  bandwidth-bound guess (the first candidate for M <= 8, "dequant" above); torch.compile tracing takes the eager
  choice, else the same guess; neither times anything. One-time cost per new key, estimated for an H100 host at
  ~20 us per eager call: 2-3 ms per candidate and round for a 4096x4096 weight (mostly the sleep and 48 calls), so
  ~15-20 ms with 2 candidates (M 17..64) and ~25-35 ms with 4 (M <= 8), ~50 ms for 14336x4096 at M <= 8; the
  compilation of a kernel's first use comes on top (any path pays it). ``measured_choices()`` returns the eager
  choices, ``measured_timings()`` both choices and the us per path behind them; ``MINITRAIN_NF4_MATMUL_VERBOSE=1``
  prints one line per timed key to stderr. The GPU time is of eager launches: inside a graph a split "mma_cuda"
  launch also zeroes fresh counters (a memset node), which the graph choice does not count.
  ``MINITRAIN_NF4_MATMUL`` (one of the path names) overrides "auto".

Eager calls take a short path: the weight's validated kernel arguments are prepared once per NF4Weight object
(dropped with it) and each call only checks x, looks the path up and launches; no torch.library dispatch (with
something to differentiate, a torch.autograd.Function with the op's backward formula). Everything else (tracing,
odd inputs, errors) goes through one ``torch.library`` op
(``minitrain::nf4_linear``) with a registered autograd formula: dx = dy @ W, with W dequantized again in the
backward rather than saved (the scratch buffer is reused, so nothing of size N*K outlives the call), and
dbias = sum of dy. ``torch.compile(fullgraph=True)`` traces that op without graph breaks.

The scratch buffer is one flat tensor per (device, dtype), grown to the largest weight seen. Work on one
stream is ordered, so the next dequantization cannot overwrite it before the previous GEMM has read it;
callers running NF4 layers concurrently on several streams should use a GEMV path or "torch".
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .dispatch import _launch_into, _run, keep_per_weight, prepared_args, resolve_backend
from .nf4 import NF4Weight, dequantize_nf4_ref

__all__ = ["matmul_nf4", "FUSED_MAX_M", "GEMV_MAX_M", "measured_choices", "measured_timings", "candidates"]

BACKENDS = ("auto", "torch", "gemv_cuda", "mma_cuda", "gemv", "fused", "dequant")
ENV_VAR = "MINITRAIN_NF4_MATMUL"
FUSED_MAX_M = 256  # the fused Triton GEMM's limit (by name only; "auto" uses dequant + cuBLAS above GEMV_MAX_M)
GEMV_MAX_M = 8     # both GEMV kernels accumulate at most 8 rows of x per pass over the weight
MMA_MAX_M = 64     # the tensor-core kernel's rows of x per launch ("auto" measures it up to here)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# What "auto" measured (a cache like functools.lru_cache: the paths agree up to rounding, only the speed differs),
# keyed by (device index, x dtype, N, K, M bucket): the eager choice, the CUDA-graph choice, and the timings.
_MEASURED: dict[tuple, str] = {}
_GRAPH_CHOICES: dict[tuple, str] = {}
_TIMINGS: dict[tuple, dict] = {}
# Reused dequantization buffers: (device index, dtype) -> flat tensor.
_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}
# (device index, dtype) -> {(N, K): (N, K) view of that buffer}, for the eager path.
_SCRATCH_VIEWS: dict[tuple[int, torch.dtype], dict] = {}

VERBOSE_VAR = "MINITRAIN_NF4_MATMUL_VERBOSE"
ROUNDS = 3          # interleaved rounds per measurement; each path keeps its best
EAGER_CALLS = 16    # calls per eager batch: >= ~100 us even for the fastest path (an eager call costs >= ~6 us of host)
GPU_CALLS = 32      # calls per GPU-time batch: >= ~100 us for a 3 us kernel
NOISE_REL, NOISE_US = 0.05, 0.5  # a kernel replaces dequant + cuBLAS only if faster by more than both
SLEEP_CYCLES_PER_US = 2000  # torch.cuda._sleep cycles per us: H100/H200 clocks are <= 1.98 GHz, so never too short
_now = time.perf_counter  # the host clock of _batch_us (tests put a simulated one here)


def measured_choices() -> dict[tuple, str]:
    """The eager choices of "auto" so far: {(device index, x dtype, N, K, M bucket): path}, the path a call outside a
    CUDA-graph capture takes (keys with a single candidate included). The CUDA-graph choices and the timings behind
    both are in ``measured_timings()``."""
    return dict(_MEASURED)


def measured_timings() -> dict[tuple, dict]:
    """Why "auto" chose what it chose: {(device index, x dtype, N, K, M bucket): {"eager": path, "graph": path,
    "eager_us": {path: us}, "gpu_us": {path: us}, "host_us": {path: us}}} for every key it timed (keys with a single
    candidate are not timed and not listed). "eager_us" is what a loop of eager calls sees per call (the larger of
    the host's and the GPU's time), "gpu_us" the GPU time alone (what a CUDA graph replay sees), "host_us" the
    Python + launch time; each the best of the interleaved rounds. Paths that failed or disagreed are absent."""
    return {k: {f: (dict(v) if isinstance(v, dict) else v) for f, v in t.items()} for k, t in _TIMINGS.items()}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    if _capturing(device):
        return torch.empty(numel, device=device, dtype=dtype)  # a graph owns its own memory
    key = (device.index, dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)  # free the old one (and views of it) before allocating the larger one
        _SCRATCH_VIEWS.pop(key, None)
        buf = torch.empty(numel, device=device, dtype=dtype)
        _SCRATCH[key] = buf
    return buf[:numel]


def _weight(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
    return SimpleNamespace(data=data, absmax=absmax, nested_absmax=nested_absmax, nested_code=nested_code,
                           offset=offset, code=code, shape=torch.Size(shape), blocksize=blocksize,
                           nested_blocksize=nested_blocksize, dtype=torch.bfloat16)


def _scratch_view(qt, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) view of the scratch buffer for weight ``qt``. Views are kept per buffer and shape (dropped when the
    buffer grows), so an eager call neither slices nor reshapes."""
    n, k = qt.shape
    device = qt.data.device
    if _capturing(device):
        return _scratch(device, dtype, n * k).view(n, k)
    key = (device.index, dtype)
    views = _SCRATCH_VIEWS.get(key)
    view = None if views is None else views.get((n, k))
    if view is None:
        view = _scratch(device, dtype, n * k).view(n, k)  # may replace the buffer, which drops its views
        _SCRATCH_VIEWS.setdefault(key, {})[(n, k)] = view
    return view


def _dequant_into_scratch(qt, dtype: torch.dtype, fast: bool = False) -> torch.Tensor:
    n, k = qt.shape
    out = _scratch_view(qt, dtype) if fast else _scratch(qt.data.device, dtype, n * k).view(n, k)
    backend = resolve_backend("auto", qt.data.device, dtype, n * k)
    if fast and backend != "torch":  # validated arguments, eager: launch the kernel directly (plans kept on qt)
        return _launch_into(backend, (qt.data, qt.absmax, qt.nested_absmax, qt.nested_code, qt.offset, qt.code,
                                      qt.blocksize, qt.nested_blocksize), out, getattr(qt, "plans", None))
    if backend == "torch":  # no kernel could run: the reference needs a full NF4Weight
        qt = NF4Weight(qt.data.view(-1, 1), qt.absmax, qt.shape, dtype, qt.blocksize, qt.code, qt.nested_absmax,
                       qt.nested_code, None if qt.offset is None else qt.offset.reshape(()), qt.nested_blocksize)
    return _run(backend, qt, dtype, out)


def _qargs(qt):
    return (qt.data, qt.absmax, qt.nested_absmax, qt.nested_code, qt.offset, qt.code, list(qt.shape), qt.blocksize,
            qt.nested_blocksize)


def _fused(x, qt, bias, fast: bool = False):
    if fast:
        from triton_ops.nf4_matmul import fused_impl

        return fused_impl(x, *_qargs(qt), bias)
    from triton_ops.nf4_matmul import nf4_matmul

    return nf4_matmul(x, *_qargs(qt), bias)


def _gemv(x, qt, bias, fast: bool = False):
    if fast:
        from triton_ops.nf4_matmul import gemv_impl

        return gemv_impl(x, *_qargs(qt), bias)
    from triton_ops.nf4_matmul import nf4_gemv

    return nf4_gemv(x, *_qargs(qt), bias)


def _cuda_path(kind: str):
    """The CUDA C++ path ``<kind>_cuda`` (``csrc.nf4_<kind>``, imported at first use): eager calls keep the
    kernel's plan (validated flattened arguments) on the prepared weight; other calls go through the checked op."""
    fns = {}

    def load():
        import importlib

        from csrc.nf4_linear import run_plan

        mod = importlib.import_module(f"csrc.nf4_{kind}")
        fns.update(entry=getattr(mod, f"nf4_{kind}_cuda"), plan=getattr(mod, f"{kind.capitalize()}Plan"), run=run_plan)
        return fns

    def path(x, qt, bias, fast: bool = False):
        if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
            bias = bias.to(x.dtype).contiguous()  # the kernels' checks ask for both
        f = fns or load()
        if not fast:
            return f["entry"](x, *_qargs(qt), bias)
        plans = getattr(qt, "cuda_plans", None)
        if plans is None:
            plans = qt.cuda_plans = {}
        plan = plans.get(kind)
        if plan is None:
            plan = plans[kind] = f["plan"](*_qargs(qt))
        return f["run"](plan, x, bias)

    return path


_gemv_cuda, _mma_cuda = _cuda_path("gemv"), _cuda_path("mma")


def _dequant_mm(x, qt, bias, fast: bool = False):
    return F.linear(x, _dequant_into_scratch(qt, x.dtype, fast), bias)


_PATHS = {"gemv_cuda": _gemv_cuda, "mma_cuda": _mma_cuda, "gemv": _gemv, "fused": _fused, "dequant": _dequant_mm}


def _cuda_gemv_available() -> bool:
    from csrc import cupy_available

    return cupy_available()


def candidates(m: int, shape, blocksize: int) -> tuple[str, ...]:
    """The paths "auto" chooses among for m rows of x: the CUDA C++ GEMV (with CuPy) for m <= 2 * GEMV_MAX_M (two
    passes over the weight above GEMV_MAX_M), the CUDA C++ tensor-core kernel (with CuPy) for m <= MMA_MAX_M when it
    supports the weight and m >= 2, the Triton GEMV for m <= GEMV_MAX_M when the weight's blocks do not straddle rows, and
    always dequant + cuBLAS (the only one for larger m)."""
    from triton_ops.nf4_matmul import fused_supported

    cuda = _cuda_gemv_available()
    cands = ("gemv_cuda",) if m <= 2 * GEMV_MAX_M and cuda else ()
    if 2 <= m <= MMA_MAX_M and cuda:  # M = 1: the GEMV (1.5-1.7x faster on the H100's Llama shapes) is the path
        from csrc.nf4_mma import supported

        if supported(shape, blocksize) is None:
            cands += ("mma_cuda",)
    if m <= GEMV_MAX_M and fused_supported(shape, blocksize):
        cands += ("gemv",)
    return cands + ("dequant",)


def _choose_path(x, qt, m: int, index: int | None = None) -> str:
    bucket = 1 << max(m - 1, 0).bit_length()
    key = (x.device.index if index is None else index, x.dtype, qt.shape[0], qt.shape[1], bucket)
    choice = _MEASURED.get(key)
    if choice is not None:  # every eager call: the capture check (a call into the runtime) only where choices differ
        graph = _GRAPH_CHOICES.get(key, choice)
        return choice if graph == choice or not _capturing(x.device) else graph
    capturing = _capturing(x.device)
    cands = candidates(m, qt.shape, qt.blocksize)
    if len(cands) == 1:  # nothing to measure (M > 64, or no CuPy): remembered like a measurement (later calls skip it)
        _MEASURED[key] = _GRAPH_CHOICES[key] = cands[0]
        return cands[0]
    if capturing or torch.compiler.is_compiling():
        # No timing inside a capture or a trace of a key never called eagerly (the trainer and generate warm up
        # eagerly first): the bandwidth-bound guess, not remembered.
        return cands[0] if m <= GEMV_MAX_M else "dequant"
    x2 = x.reshape(-1, qt.shape[1]).detach()
    device = x.device if x.device.type == "cuda" else None
    with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
        timings = _measure({name: (lambda name=name: _PATHS[name](x2, qt, None, True)) for name in cands},
                           f"a {tuple(qt.shape)} weight, M={m}, {x.dtype}")
    eager, graph = _pick(timings["eager_us"]), _pick(timings["gpu_us"])
    _MEASURED[key], _GRAPH_CHOICES[key] = eager, graph
    _TIMINGS[key] = dict(timings, eager=eager, graph=graph)
    if os.environ.get(VERBOSE_VAR) == "1":
        def fmt(d):
            return ", ".join(f"{n} {t:.1f}" for n, t in sorted(d.items(), key=lambda kv: kv[1]))

        print(f"matmul_nf4 auto: {x.device.type}:{key[0]} {str(x.dtype).replace('torch.', '')} N={key[2]} K={key[3]} "
              f"M<={key[4]}: eager {eager} ({fmt(timings['eager_us'])} us), graph {graph} "
              f"(GPU {fmt(timings['gpu_us'])} us)", file=sys.stderr, flush=True)
    return eager


def _pick(us: dict[str, float]) -> str:
    """The fastest path of ``us`` ({path: microseconds}), except that a kernel must beat dequant + cuBLAS by more than
    the noise of the measurement (NOISE_REL of dequant's time and at least NOISE_US) to replace it: dequant is the
    general path, and a tie must not go to whichever kernel was lucky in the last round."""
    if not us:
        return "dequant"
    best = min(us, key=us.get)
    ref = us.get("dequant")
    if best != "dequant" and ref is not None and us[best] >= ref - max(NOISE_REL * ref, NOISE_US):
        return "dequant"
    return best


def _measure(fns: dict, what: str) -> dict[str, dict[str, float]]:
    """Times every path of ``fns`` ({path: zero-argument call}) and returns {"eager_us": {path: us per call},
    "gpu_us": {...}, "host_us": {...}} for the paths that ran and agree with dequant + cuBLAS.

    First every path runs twice and the device is synchronized, so that first-use costs (compilation, launch plans,
    the scratch buffer's growth, cuBLAS's heuristics, the dequant kernel's own backend measurement) and whatever the
    caller had queued fall in no timed window; a path that raises is dropped, one whose output disagrees with
    dequant + cuBLAS is dropped with a warning. Then ROUNDS interleaved rounds (the order rotated each round) time
    every path with ``_batch_us`` (eager) and ``_gpu_us`` (GPU only); each keeps its best round, and a path that
    raises in a round is dropped. The eager time is the larger of the eager batch and the GPU time."""
    outs = {}
    for name, fn in fns.items():
        try:
            outs[name] = fn()
            fn()
        except Exception:  # noqa: BLE001 - a kernel that cannot compile or run here is simply not a candidate
            outs.pop(name, None)
    torch.cuda.synchronize()
    ref = outs.get("dequant")
    if ref is not None:
        for name in [n for n in outs if n != "dequant"]:
            if not _agrees(outs[name], ref):  # a safety net: never pick a kernel that disagrees with cuBLAS here
                warnings.warn(f"matmul_nf4: path {name!r} disagrees with dequant + cuBLAS for {what}; not used")
                outs.pop(name)
    alive = list(outs)
    del outs, ref
    eager, gpu, host = {}, {}, {}
    for r in range(ROUNDS):
        order = alive[r % len(alive):] + alive[:r % len(alive)] if alive else []
        for name in order:
            try:
                e, h = _batch_us(fns[name], EAGER_CALLS)
                g = _gpu_us(fns[name], GPU_CALLS, h)
            except Exception:  # noqa: BLE001 - it ran before; if it fails now it is not a candidate either
                alive.remove(name)
                for d in (eager, gpu, host):
                    d.pop(name, None)
                continue
            g = e if g is None else g
            eager[name], gpu[name] = min(e, eager.get(name, e)), min(g, gpu.get(name, g))
            host[name] = min(h, host.get(name, h))
    return {"eager_us": {n: max(eager[n], gpu[n]) for n in eager}, "gpu_us": gpu, "host_us": host}


def _batch_us(fn, calls: int = EAGER_CALLS) -> tuple[float, float]:
    """(µs per call between two CUDA events around ``calls`` back-to-back calls, µs of host time per call). One
    warm-up call (this path's kernels and plans hot again after the other candidates ran), then a device
    synchronization, so that no earlier work (the caller's, the previous candidate's) is still queued when the
    start event is recorded: the window then covers the host's launches and the GPU's work together, the larger of
    the two per call, which is what a loop of eager calls sees. Timing single synchronized calls instead charges each
    path its launch latency from an idle GPU and favoured one launch over two even where the two were twice as fast
    on the GPU."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = _now()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host = (_now() - t0) * 1e6 / calls
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / calls, host


def _gpu_us(fn, calls: int = GPU_CALLS, host_us: float = 50.0) -> float | None:
    """µs of GPU time per call, the host's launch overhead hidden: ``torch.cuda._sleep`` first keeps the GPU busy
    for 1.5x the time the host needs to queue the calls (``host_us`` per call, measured by ``_batch_us``), so the
    events around the calls see only the kernels back to back, as a CUDA graph replays them. If the start event had
    already passed when the host finished queuing (the sleep too short: a slow moment of the host, a call that
    synchronizes), it retries with a 4x longer sleep (at most 0.1 s), twice at most. None where torch has no
    ``_sleep``."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return None
    fn()
    budget = 1.5 * host_us * calls + 50.0
    for _ in range(3):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep(int(budget * SLEEP_CYCLES_PER_US))
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        hidden = not start.query()
        end.synchronize()
        us = 1e3 * start.elapsed_time(end) / calls
        if hidden:
            break
        budget = min(4 * budget, 1e5)  # at most 0.1 s of sleep, whatever the host did
    return us


def _agrees(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """Same numbers up to accumulation order and one rounding to a 16-bit dtype (2% of the largest output)."""
    y, ref = y.float(), ref.float()
    scale = ref.abs().max()
    return bool(torch.isfinite(y).all() and ((y - ref).abs().max() <= 0.02 * scale + 1e-3))


def _forward(x, qt, bias, path: str, fast: bool = False):
    if path == "auto":
        path = _choose_path(x, qt, x.numel() // qt.shape[1])
    return _PATHS[path](x, qt, bias, fast)


# -- torch.library op (CUDA path) -----------------------------------------------------------------------------
@torch.library.custom_op("minitrain::nf4_linear", mutates_args=())
def _nf4_linear_op(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                   nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                   shape: list[int], blocksize: int, nested_blocksize: int, bias: torch.Tensor | None,
                   path: str) -> torch.Tensor:
    qt = _weight(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    return _forward(x, qt, bias, path)


@_nf4_linear_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias, path):
    return x.new_empty(*x.shape[:-1], shape[0])


def _setup_context(ctx, inputs, output):
    x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias, _ = inputs
    ctx.q = (data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    """y = x W^T + b  =>  dx = dy W (W dequantized again into the scratch buffer), db = sum over rows of dy."""
    qt = _weight(*ctx.q)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ _dequant_into_scratch(qt, grad_y.dtype)
    grad_b = grad_y.reshape(-1, qt.shape[0]).sum(0) if ctx.has_bias and ctx.needs_input_grad[10] else None
    return (grad_x,) + (None,) * 9 + (grad_b, None)


_nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)


# -- the eager fast path ----------------------------------------------------------------------------------------
# A decode GEMV takes 5-20 us on the GPU, so the Python work of a call is what an eager caller sees. Per NF4Weight
# object (weakly referenced: dropped with the weight) the validated flattened arguments and the GEMV plan are kept;
# a call then checks x and bias against cached sizes, looks the path up, allocates y and launches.
_PREPARED: dict[int, "_Prepared"] = {}


class _Prepared:
    __slots__ = ("ref", "data", "absmax", "qt", "index", "n", "k")


def _prepare(q) -> "_Prepared":
    a = prepared_args(q)  # validates the weight (contiguity, sizes, devices) once
    p = _Prepared()
    p.data, p.absmax = q.data, q.absmax
    p.qt = _weight(*a[:6], list(q.shape), a[6], a[7])
    p.qt.plans = {}  # dequant launch plans, kept with the prepared weight
    p.index = q.data.device.index if q.data.device.index is not None else torch.cuda.current_device()
    p.n, p.k = int(q.shape[0]), int(q.shape[1])
    return keep_per_weight(_PREPARED, q, p)


def _eager_call(x, q, bias, backend, needs_grad=False):
    """The short path (see above), or None when the call needs the checked path (errors, odd devices/dtypes).
    With ``needs_grad`` the launch goes through ``_EagerLinear`` (autograd without the op's dispatch)."""
    p = _PREPARED.get(id(q))
    if p is None or p.ref() is not q or p.data is not q.data or p.absmax is not q.absmax:
        if not isinstance(q, NF4Weight) or q.data.device.type != "cuda":
            return None
        p = _prepare(q)
    k = p.k
    if x.shape[-1] != k or x.dtype not in _FLOATS or x.get_device() != p.index:
        return None
    if bias is not None:
        if bias.shape != (p.n,) or bias.get_device() != p.index:
            return None
        if bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS or backend == "torch":
            return None
    if backend == "auto":
        backend = _choose_path(x, p.qt, x.numel() // k, p.index)
    fn = _PATHS.get(backend)
    if fn is None:
        return None
    if needs_grad:
        return _EagerLinear.apply(x, bias, p, fn)
    return fn(x, p.qt, bias, True)


class _EagerLinear(torch.autograd.Function):
    """The eager path with autograd (training: x or bias requires grad), without the torch.library op's dispatch:
    the same formula as the op's registered backward, dx = dy @ W with W dequantized again into the scratch buffer
    (nothing of size N*K saved), dbias = sum of dy over rows. torch.compile never sees this (it traces the op)."""

    @staticmethod
    def forward(ctx, x, bias, p, fn):
        ctx.p, ctx.has_bias = p, bias is not None
        return fn(x, p.qt, bias, True)

    @staticmethod
    def backward(ctx, grad_y):
        p = ctx.p
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ _dequant_into_scratch(p.qt, grad_y.dtype, True)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad_y.reshape(-1, p.n).sum(0)
        return grad_x, grad_b, None, None


def matmul_nf4(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """y = x @ dequant(q).T (+ bias).

    Args:
        x: (..., K) float tensor on q's device.
        q: NF4 weight of shape (N, K).
        bias: optional (N,).
        backend: "auto" | "torch" | "gemv_cuda" | "mma_cuda" | "gemv" | "fused" | "dequant" (see the module
            docstring).
    Returns:
        (..., N) in x's dtype; differentiable in x and bias.
    """
    if type(x) is torch.Tensor and x.is_cuda and backend != "torch" and not torch.compiler.is_compiling():
        y = _eager_call(x, q, bias, backend, torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad)))
        if y is not None:
            return y
    if not isinstance(q, NF4Weight):
        raise TypeError(f"matmul_nf4: expected an NF4Weight, got {type(q).__name__}")
    if x.dim() == 0:
        raise ValueError(f"matmul_nf4: x must be (..., K) with K = {q.shape[1]}, got a 0-d tensor")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"matmul_nf4: x of shape {tuple(x.shape)} has {x.shape[-1]} features but the weight is "
                         f"{tuple(q.shape)} (N, K)")
    if x.device != q.device:
        raise ValueError(f"matmul_nf4: x is on {x.device} but the weight is on {q.device}")
    if backend not in BACKENDS:
        raise ValueError(f"matmul_nf4: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"matmul_nf4: x must be float32, float16 or bfloat16, got {x.dtype}")
    if bias is not None:
        if bias.shape != (q.shape[0],):
            raise ValueError(f"matmul_nf4: bias must have shape ({q.shape[0]},), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype)
    if backend == "torch" or (x.device.type != "cuda" and backend == "auto"):
        return F.linear(x, dequantize_nf4_ref(q, x.dtype), bias)
    double = q.double_quant
    offset = q.offset.reshape(1) if double else None
    # One op for every path; on CPU (explicit kernel paths) the Triton kernels run under the interpreter.
    return torch.ops.minitrain.nf4_linear(x, q.data.reshape(-1), q.absmax, q.nested_absmax if double else None,
                                          q.nested_code if double else None, offset, q.code, list(q.shape),
                                          q.blocksize, q.nested_blocksize, bias, backend)
