"""NF4 dequantization and the small-M NF4 matmul on the GPU, against bitsandbytes and unsloth, same card, same run.

Dequantization (W (N, K) -> bf16/fp16): ours (Triton, CUDA C++), bitsandbytes ``dequantize_4bit``, unsloth
``fast_dequantize``. GB/s counts what a dequantization must move: packed codes (N*K/2) + uint8 absmax (N*K/64)
+ fp32 nested absmax read, output (2*N*K) written; % of ceiling = that over the copy bandwidth measured in this
run (bench.hw). Targets: >= 95% of copy on the three large shapes, <= 5 us on (1024, 4096).

Every row has two times, matmul rows three: "µs (1 call, L2 flushed)" = the eager call as a user makes it (public
API: quant.dequantize_nf4 / quant.matmul_nf4 or the path's function) timed by do_bench: one call per sample after an
L2 flush, a ~256 MB memset that the GPU runs while the host launches the call, so most of the host's per-call
overhead is hidden (a path with 40 µs of Python and 20 µs of GPU work reads ~25 µs); "GPU-only µs" = the device time
of the kernels that call launches (torch.profiler, L2 flushed), what a CUDA graph replay sees; and, matmul only,
"eager loop µs" = what a decode's loop of eager calls sees: the call on each weight of a ring of distinct random
weights of the shape (NF4 bytes > 2 x the L2, at most 64 weights; x fixed), back to back with no flush, after a
warm-up pass and a synchronization: CUDA events around 2 passes, µs per call, median of 5 (the larger of host and
GPU time per call, weights read from HBM as when 32 layers x 7 weights pass between two uses of one). The target
lines judge eager choices ("auto" against our other paths and the peers) by the eager loop and the CUDA-graph
choice by GPU-only time.

Each dequant shape also has a "copy (same bytes)" row: a torch copy_ whose read + write bytes equal the dequantization's, i.e. what the card
achieves at that size (small copies do not reach the big-copy ceiling), and a "write-only (output bytes)" row: a fill of
the output tensor, i.e. the output's writes with no reads (its GB/s count those bytes only; bench/dev's 16-byte-store
fill, or torch's slower fill_ without CuPy, which the target lines then say and draw no conclusion from); (1024, 4096) also has a
"one-element launch" row, the floor of both timing methods for any kernel. ``--deq-sweep`` times the dequant kernels'
launch configurations (CUDA: U x threads x grid cap; Triton: TILE x num_warps) on the five shapes and prints the
best per shape; ``--explore`` runs the older sweeps and the host-overhead breakdown (printed, not tabled).

Small-M matmul y = x @ dequant(W)^T, x (M, K) bf16, M in {1, 8, 32, 128}: ours gemv cuda (CUDA C++, M <= 8), ours
gemv triton (M <= 8), ours mma cuda (CUDA C++ tensor cores, M <= 64), ours dequant into the reused buffer + cuBLAS, ours "auto" (quant.matmul_nf4 as a user calls
it, after its one-time measurement), dequant + F.linear (fresh weight each call), bitsandbytes ``matmul_4bit``. GB/s
counts the NF4 weight bytes + x + y (of the 1-call column); "vs best peer" compares the eager loop. (The fused
Triton GEMM is left out: 5-17x slower than dequant + cuBLAS at M = 8..128 in the 2026-11-27 H200 run, and "auto" no longer considers it.) ``--matmul-only`` runs this section
alone (``--dequant-only`` the other one); ``--sweep`` times the CUDA GEMV's launch configurations (weight rows per block R x warps per block W) at
M = 1, 2, 4, 8 on the three Llama shapes and prints the best per shape, which is how its defaults are chosen;
``--mma-sweep`` does the same for the tensor-core kernel's K splits.

unsloth must run in its own process (importing it patches transformers/peft): ``python -m bench.nf4
--only-unsloth`` under PEERS_UNSLOTH=1 measures it and leaves its rows in bench/results/.nf4-unsloth-<card>.json,
which the main run (``python -m bench.nf4``) picks up; with PEERS_UNSLOTH=1 set, the main run starts that
subprocess itself. Results: bench/results/<date>-<card>-nf4.md.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench import hw

DEQ_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]
LARGE = [(14336, 4096), (4096, 14336), (128256, 4096)]
DEQ_DTYPES = [torch.bfloat16, torch.float16]
MM_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
MM_M = [1, 8, 32, 128]
US1 = "µs (1 call, L2 flushed)"  # do_bench: one call per sample after an L2 flush (host time mostly hidden)
LOOP = "eager loop µs"  # a decode-like loop of eager calls over a ring of distinct weights (matmul rows only)
COLUMNS = ["op", "shape", "dtype", "provider", US1, "GB/s", "% of ceiling", "peak MiB", LOOP, "vs best peer",
           "GPU-only µs", "GPU-only % of ceiling"]
TIME_NOTES = (f"{US1}: the eager call as a user makes it, do_bench median of one call per sample after an L2 flush; "
              "the GPU runs the ~256 MB flush while the host launches the call, so most host overhead is hidden. "
              f"{LOOP} (matmul): a decode-like loop of eager calls, each on the next of a ring of distinct weights "
              "(NF4 bytes > 2 x L2, at most 64; x fixed), back to back, no flush: CUDA events around 2 passes after "
              "a warm-up pass, median of 5; the larger of host and GPU time per call, weights from HBM. GPU-only µs: "
              "device time of the kernels the call launches (torch.profiler, L2 flushed), what a CUDA graph replay "
              "sees. Eager judgements in the target lines use the eager loop, graph judgements GPU-only.")
L2_BYTES = 50 * 2**20  # the H100/H200 L2 when the device does not say
RING_CAP = 64  # at most this many distinct weights in a ring (tiny weights would need thousands)
PEERS = ("bitsandbytes", "unsloth", "dequant + F.linear", "bitsandbytes matmul_4bit")
COPY = "copy (same bytes)"  # a reference row, neither ours nor a peer
WRITE = "write-only (output bytes)"  # reference: a fill of the output tensor, no reads (its own bytes in GB/s)
FAST_FILL = "fill-cs-u1"  # bench/dev's fill for that row: warp-contiguous 16-byte streaming stores
EMPTY = "one-element launch"  # reference: the floor of each timing method (a fill of one element)
REFS = (COPY, WRITE, EMPTY)
DT = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def deq_bytes(shape, dtype):
    n = shape[0] * shape[1]
    return n // 2 + n // 64 + 4 * (-(-n // (64 * 256))) + n * dtype.itemsize


def nf4_bytes(shape):
    """Bytes of one NF4 weight on the device: packed codes, uint8 absmax, fp32 nested absmax."""
    n = shape[0] * shape[1]
    return n // 2 + n // 64 + 4 * (-(-n // (64 * 256)))


def ring_size(shape, l2: int | None = None) -> int:
    """How many distinct weights of ``shape`` the eager-loop timing cycles through: the fewest whose NF4 bytes
    together exceed twice the L2 (``l2`` bytes; the device's, else 50 MiB), so no call finds its weight still in L2
    from the previous pass, as in a decode where 32 layers x 7 weights pass between two uses of one. At most
    RING_CAP."""
    if l2 is None:
        try:
            l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size or L2_BYTES
        except (RuntimeError, AssertionError, AttributeError):
            l2 = L2_BYTES
    return min(RING_CAP, 2 * l2 // nf4_bytes(shape) + 1)


def mm_bytes(shape, m):
    n, k = shape
    return n * k // 2 + n * k // 64 + 2 * m * k + 2 * m * n


def _quantize(shape):
    """bitsandbytes' CUDA quantization when it is installed (so it gets its own QuantState), else ours; the bytes
    are identical either way. Returns (NF4Weight, packed, bnb state or None)."""
    import quant

    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    try:
        import bitsandbytes.functional as bnbF

        packed, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        q = quant.NF4Weight(packed.reshape(-1, 1), st.absmax, shape, torch.bfloat16, 64, st.code, st.state2.absmax,
                            st.state2.code, st.offset.reshape(()).float(), st.state2.blocksize)
        return q, packed, st
    except ImportError:
        q = quant.quantize_nf4(w)
        return q, q.data, None


def _time_peak(fn):
    peak = hw.peak_mib(fn)
    return hw.bench_us(fn), peak


_FLUSH = {}


def kernel_us(fn, reps: int = 10) -> float:
    """GPU-only time per call of fn: the sum of the device durations of the kernels (and memcpy/memset) it
    launches, from torch.profiler (CUPTI), with L2 flushed before each call like do_bench; host time excluded.
    Falls back to triton's do_bench_cudagraph (launch gaps removed, no L2 flush) if the profiler fails."""
    from torch.profiler import ProfilerActivity, profile

    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device="cuda")
    flush = _FLUSH["buf"]
    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                flush.zero_()
                fn()
            torch.cuda.synchronize()
        total = 0.0
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA or "FillFunctor<int>" in e.name:
                continue
            total += e.time_range.elapsed_us()
        if total <= 0:
            raise RuntimeError("no kernel events recorded")
        return total / reps
    except Exception as e:  # noqa: BLE001 - profiler unavailable: graph replay timing instead
        print(f"kernel_us: profiler failed ({type(e).__name__}: {e}); using do_bench_cudagraph", flush=True)
        import triton.testing

        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def loop_us(fns, passes: int = 2, samples: int = 5) -> float:
    """µs per call of a loop of eager calls like a decode step's: ``fns`` are the same call on distinct weights (a
    ring larger than twice the L2), called one after the other with no flush and no synchronization, so the window
    covers the host's launches and the GPU's work together (the larger of the two per call) with the weights read
    from HBM. One warm-up pass over the ring and a device synchronization, then CUDA events around ``passes``
    passes; the median of ``samples`` such windows."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(passes):
            for fn in fns:
                fn()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / (passes * len(fns)))
    return sorted(times)[len(times) // 2]


def _run_provider(rows, key, name, make, ring=None):
    """One table row: ``make()`` gives the call on one weight, timed 1 call per sample with L2 flushed (do_bench)
    and GPU-only (profiler); ``ring()``, where given, the same call on each weight of a ring, timed as an eager
    loop (``loop_us``)."""
    row = dict(key, provider=name)
    try:
        fn = make()
        row["us"], row["peak"] = _time_peak(fn)
        if ring is not None:
            row["loop_us"] = loop_us(ring())
        row["kus"] = kernel_us(fn)
    except ImportError as e:
        row["error"] = f"not installed ({e.name or str(e).split(':')[0][:60]})"
    except Exception as e:  # noqa: BLE001 - one failing provider must not lose the table
        row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    gc.collect()
    torch.cuda.empty_cache()
    done = [f"{row[k]:.1f} us {label}" for k, label in (("us", "eager"), ("loop_us", "eager loop"), ("kus", "GPU"))
            if k in row]
    print(f"{key} {name}: " + ", ".join(done + ([row["error"]] if "error" in row else [])), flush=True)
    rows.append(row)


# ---- dequantization ---------------------------------------------------------------------------------------

def dequant_rows(unsloth_only=False):
    rows = []
    for shape in DEQ_SHAPES:
        q, packed, st = _quantized_cache(shape)
        for dtype in DEQ_DTYPES:
            key = {"op": "nf4_dequant", "shape": list(shape), "dtype": DT[dtype]}
            out = torch.empty(shape, device="cuda", dtype=dtype)

            def ours(backend):
                def make():
                    import quant

                    quant.dequantize_nf4(q, dtype, out=out, backend=backend)  # compile/measure outside the timing
                    torch.cuda.synchronize()
                    return lambda: quant.dequantize_nf4(q, dtype, out=out, backend=backend)
                return make

            def bnb():
                import bitsandbytes.functional as bnbF

                if st is None:
                    raise ImportError("bitsandbytes")
                s = copy.copy(st)
                s.dtype = dtype
                return lambda: bnbF.dequantize_4bit(packed, quant_state=s)

            def unsloth():
                from unsloth.kernels.utils import fast_dequantize

                s = copy.copy(st)
                s.dtype = dtype
                return lambda: fast_dequantize(packed, s)

            def same_bytes_copy():
                # read + write bytes equal to the dequantization's: what a copy achieves at this size
                half = deq_bytes(shape, dtype) // 2
                src = torch.empty(half, device="cuda", dtype=torch.uint8).random_(0, 256)
                dst = torch.empty_like(src)
                return lambda: dst.copy_(src)

            slow_fill = []

            def write_only():
                # the output's bytes written and nothing read: a dequantization writes these plus reads ~1/4 more.
                # bench/dev's 16-byte streaming-store fill where it runs (H200, stop 23: 26.8 us for the 117 MB that
                # torch's fill_ writes in 36.2 us, so fill_ is no write ceiling); else fill_, marked on the row
                try:
                    from bench.dev import nf4_dequant_dev as dev

                    dev.fill(out, FAST_FILL)
                    return lambda: dev.fill(out, FAST_FILL)
                except Exception:  # noqa: BLE001 - no CuPy / no compile: torch's fill_, and no ceiling claim
                    slow_fill.append(True)
                    return lambda: out.fill_(1.0)

            def one_element():
                t1 = torch.empty(1, device="cuda", dtype=dtype)
                return lambda: t1.fill_(1.0)

            if unsloth_only:
                _run_provider(rows, key, "unsloth", unsloth)
                continue
            _run_provider(rows, key, COPY, same_bytes_copy)
            _run_provider(rows, key, WRITE, write_only)
            if slow_fill:
                rows[-1]["fill"] = "torch fill_"
            if shape == (1024, 4096):
                _run_provider(rows, key, EMPTY, one_element)
            _run_provider(rows, key, "ours triton", ours("triton"))
            _run_provider(rows, key, "ours cuda", ours("cuda"))
            _run_provider(rows, key, "ours auto", ours("auto"))
            _run_provider(rows, key, "bitsandbytes", bnb)
            del out
    return rows


_QCACHE: dict = {}


def _quantized_cache(shape):
    if shape not in _QCACHE:
        _QCACHE.clear()  # one weight alive at a time (the vocab-sized one is 260 MiB packed)
        gc.collect()
        torch.cuda.empty_cache()
        _QCACHE[shape] = _quantize(shape)
    return _QCACHE[shape]


def _ring(shape):
    """``ring_size(shape)`` distinct random weights of ``shape`` for the eager-loop timing, as (NF4Weight, packed,
    bnb state or None) like ``_quantized_cache``: its weight first, the others quantized the same way on the GPU.
    Kept with it (freed when another shape is quantized), so every provider of the shape times the same ring."""
    first = _quantized_cache(shape)
    if ("ring", shape) not in _QCACHE:
        _QCACHE[("ring", shape)] = [first] + [_quantize(shape) for _ in range(ring_size(shape) - 1)]
    return _QCACHE[("ring", shape)]


# ---- small-M matmul ---------------------------------------------------------------------------------------

def _mm_providers(x):
    """The matmul table's providers for input ``x``: {name: of(weight)}, where ``of`` takes one weight as
    (NF4Weight, packed, bnb state or None, prepared args) and returns the zero-argument call timed for it, so that
    the same provider can be built for one weight (1-call and GPU-only columns) and for each weight of a ring
    (eager-loop column)."""
    import quant
    from quant.matmul import _dequant_mm, _gemv, _gemv_cuda, _mma_cuda

    def bnb_mm(w):
        import bitsandbytes as bnb

        q, packed, st, qt = w
        if st is None:
            raise ImportError("bitsandbytes")
        return lambda: bnb.matmul_4bit(x, packed.t(), quant_state=st)

    m = x.shape[0]
    ours = {}
    if m <= 8:
        ours["ours gemv cuda"] = lambda w: (lambda: _gemv_cuda(x, w[3], None, True))
        ours["ours gemv triton"] = lambda w: (lambda: _gemv(x, w[3], None, True))
    if m <= 64:
        ours["ours mma cuda"] = lambda w: (lambda: _mma_cuda(x, w[3], None, True))
    return ours | {
        "ours dequant+cuBLAS": lambda w: (lambda: _dequant_mm(x, w[3], None, True)),
        "ours auto": lambda w: (lambda: quant.matmul_nf4(x, w[0])),
        "dequant + F.linear": lambda w: (lambda: F.linear(x, quant.dequantize_nf4(w[0], torch.bfloat16))),
        "bitsandbytes matmul_4bit": bnb_mm,
    }


def matmul_rows():
    from quant.matmul import _weight, measured_choices, measured_timings

    def prepared(entry):
        q, packed, st = entry
        return q, packed, st, _weight(q.data.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1),
                                      q.code, list(q.shape), 64, 256)

    rows, picks = [], {}
    for shape in MM_SHAPES:
        one = prepared(_quantized_cache(shape))
        ring = [prepared(e) for e in _ring(shape)]  # quantized once per shape, shared by every provider and M
        print(f"nf4 matmul {shape[0]}x{shape[1]}: eager loop over a ring of {len(ring)} weights "
              f"({len(ring) * nf4_bytes(shape) / 2**20:.0f} MiB of NF4)", flush=True)
        for m in MM_M:
            key = {"op": "nf4_matmul", "shape": [m, shape[0], shape[1]], "dtype": "bf16"}
            x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
            for name, of in _mm_providers(x).items():
                _run_provider(rows, key, name, lambda of=of: of(one), ring=lambda of=of: [of(w) for w in ring])
            bucket = max(1, 1 << (m - 1).bit_length())
            choice = [v for k, v in measured_choices().items() if k[2:4] == shape and k[4] == bucket]
            picks[(m,) + shape] = choice[0] if choice else ("dequant" if m > 8 else "?")
            timed = [v for k, v in measured_timings().items() if k[2:4] == shape and k[4] == bucket]
            if timed:  # what auto saw: eager and GPU-only µs per candidate, and the CUDA-graph choice
                t = timed[0]
                picks[("graph", m) + shape] = t["graph"]
                fmt = lambda d: ", ".join(f"{p} {u:.1f}" for p, u in sorted(d.items(), key=lambda i: i[1]))  # noqa: E731
                picks[("timed", m) + shape] = (f"graph choice {t['graph']}; auto's own timings µs: eager "
                                              f"{fmt(t['eager_us'])}; GPU-only {fmt(t['gpu_us'])}")
    return rows, picks


def _launch_sweep(name: str, mod, path, ms, configs, default) -> None:
    """Kernel time of one CUDA small-M kernel (module ``mod``, matmul path ``path``) for every launch override that
    ``configs(m, shape)`` gives ({label: mod.CONFIG_OVERRIDE value}) on the Llama shapes; ``default(m, shape)`` is
    the label of what the kernel picks itself. Prints the best per shape and M; writes nf4-<name>-sweep.txt to $OUT."""
    from quant.matmul import _weight

    lines = [hw.card_name()]
    for shape in [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]:
        q, _, _ = _quantized_cache(shape)
        qt = _weight(q.data.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), q.code,
                     list(shape), 64, 256)
        for m in ms:
            x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
            results = {}
            for label, override in configs(m, shape).items():
                mod.CONFIG_OVERRIDE = override
                try:
                    results[label] = kernel_us(lambda: path(x, qt, None, True))
                except Exception as ex:  # noqa: BLE001 - one failing configuration must not end the sweep
                    print(f"{name} sweep {shape} M={m} {label}: failed {type(ex).__name__}: {ex}"[:300])
                finally:
                    mod.CONFIG_OVERRIDE = None
            if not results:
                continue
            best, dflt = min(results, key=results.get), default(m, shape)
            line = (f"{name} cuda {shape[0]}x{shape[1]} M={m}: best {best} {results[best]:.1f} us "
                    f"({mm_bytes(shape, m) / results[best] / 1e3:.0f} GB/s); default {dflt} "
                    f"{results.get(dflt, float('nan')):.1f} us; all: "
                    + " ".join(f"{label}:{t:.1f}" for label, t in results.items()))
            print(line, flush=True)
            lines.append(line)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, f"nf4-{name}-sweep.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def gemv_sweep():
    """The CUDA GEMV for every launch configuration (weight rows per block R, warps W) at M = 1, 2, 4, 8."""
    import csrc.nf4_gemv as cg
    from quant.matmul import _gemv_cuda

    def configs(m, shape):
        return {f"R={r},W={w}": {"R": r, "W": w} for r in (1, 2, 4, 8) if r * cg._mt(m) <= 32 for w in (1, 2, 4, 8)}

    def default(m, shape):
        return "R={},W={}".format(*cg.gemv_config(m, shape[0], shape[1], cg._sms(0)))

    _launch_sweep("gemv", cg, _gemv_cuda, (1, 2, 4, 8), configs, default)


def mma_sweep():
    """The CUDA tensor-core kernel for every K split S at M = 2, 8, 16, 32, 64."""
    import csrc.nf4_mma as cm
    from quant.matmul import _mma_cuda

    def split(m, shape):
        return cm.mma_config(m, shape[0], shape[1], cm._sms(0))

    def configs(m, shape):
        splits = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, split(m, shape)})
        return {f"S={s}": {"S": s} for s in splits if s <= shape[1] // cm.K_STEP}

    _launch_sweep("mma", cm, _mma_cuda, (2, 8, 16, 32, 64), configs, lambda m, shape: f"S={split(m, shape)}")


def deq_sweep():
    """GPU time of every dequantization launch configuration on the five shapes (bf16 out): the CUDA kernel's U
    (16-byte loads in flight per lane) x threads per block x grid cap (blocks per SM, 0 = one chunk per warp) and
    the Triton kernel's TILE (elements per program) x num_warps. Each configuration is timed with CUDA events
    around the bare launch with L2 flushed before each call (do_bench: the host enqueues far ahead of a 256 MB
    flush, so this is device time); the best and the default of each kernel are then re-timed with the profiler
    (kernel time only). Prints the best per shape; writes nf4-deq-sweep.txt to $OUT and bench/results/."""
    import time

    import csrc.nf4_dequant as cd
    import triton_ops.nf4_dequant as td

    t0 = time.time()
    cuda_cfgs = [{"U": u, "threads": th, "blocks_per_sm": b} for u in (1, 2, 4) for th in (128, 256)
                 for b in (0, 4, 8, 16)]
    triton_cfgs = [{"TILE": t, "BYTE_GATHER": False, "num_warps": w} for t in (2048, 4096, 8192, 16384)
                   for w in (2, 4, 8)]
    lines = [f"{hw.card_name()}: NF4 dequant launch sweep, bf16 out, GPU time (us); copy ceiling "
             f"{hw.copy_bandwidth_gbs():.0f} GB/s"]
    copy_gbs = hw.copy_bandwidth_gbs()

    def label(cfg):
        return " ".join(f"{k}={v}" for k, v in cfg.items() if k != "BYTE_GATHER")

    for shape in DEQ_SHAPES:
        q, _, _ = _quantized_cache(shape)
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        args = (q.data.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), q.code, out, 64, 256)
        nb = deq_bytes(shape, torch.bfloat16)
        defaults = {"cuda": dict(zip(("U", "blocks_per_sm", "threads"), cd._config(out.numel()))),
                    "triton": dict(zip(("TILE", "BYTE_GATHER", "num_warps"), td._config(out.numel())))}
        for name, mod, cfgs in (("cuda", cd, cuda_cfgs), ("triton", td, triton_cfgs)):
            results = {}
            for cfg in cfgs:
                mod.CONFIG_OVERRIDE = cfg
                try:
                    results[label(cfg)] = (hw.bench_us(lambda: mod._launch(*args), warmup=5, rep=20), cfg)
                except Exception as ex:  # noqa: BLE001 - one failing configuration must not end the sweep
                    print(f"deq sweep {shape} {name} {label(cfg)}: failed {type(ex).__name__}: {ex}"[:300], flush=True)
                finally:
                    mod.CONFIG_OVERRIDE = None
            if not results:
                continue
            best = min(results, key=lambda k: results[k][0])
            prof = {}
            for tag, cfg in (("best", results[best][1]), ("default", defaults[name])):
                mod.CONFIG_OVERRIDE = None if tag == "default" else cfg
                try:
                    prof[tag] = kernel_us(lambda: mod._launch(*args))
                finally:
                    mod.CONFIG_OVERRIDE = None
            line = (f"dequant {shape[0]}x{shape[1]} {name}: best {best} {results[best][0]:.1f} us events / "
                    f"{prof['best']:.1f} us profiler ({100 * nb / prof['best'] / 1e3 / copy_gbs:.0f}% of copy); "
                    f"default {label(defaults[name])} {prof['default']:.1f} us profiler "
                    f"({100 * nb / prof['default'] / 1e3 / copy_gbs:.0f}%); all: "
                    + " | ".join(f"{k}: {v[0]:.1f}" for k, v in sorted(results.items(), key=lambda kv: kv[1][0])))
            print(line, flush=True)
            lines.append(line)
        del out
    lines.append(f"sweep wall time {time.time() - t0:.0f} s")
    print(lines[-1])
    text = "\n".join(lines) + "\n"
    for d in filter(None, (os.environ.get("OUT"), str(hw.RESULTS_DIR))):
        import datetime

        path = os.path.join(d, f"{datetime.date.today().isoformat()}-{hw.card_slug()}-nf4-deq-sweep.txt")
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


# ---- tables -------------------------------------------------------------------------------------------------

def _table(rows, copy_gbs):
    """The markdown table. GB/s and % of ceiling are of the 1-call column; "vs best peer" compares the eager-loop
    column where the group has one (matmul), else the 1-call column (dequant)."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["op"], tuple(r["shape"]), r["dtype"]), []).append(r)
    for (op, shape, dt), group in groups.items():
        field = "loop_us" if any("loop_us" in r for r in group) else "us"
        peers = [r[field] for r in group if r["provider"] in PEERS and field in r]
        best = min(peers) if peers else None
        nbytes = deq_bytes(shape, torch.bfloat16 if dt == "bf16" else torch.float16) if op == "nf4_dequant" \
            else mm_bytes(shape[1:], shape[0])
        for r in group:
            row = {"op": op, "shape": "x".join(map(str, shape)) if op == "nf4_dequant" else
                   f"M={shape[0]} N={shape[1]} K={shape[2]}", "dtype": dt, "provider": r["provider"]}
            nb = {WRITE: shape[0] * shape[1] * 2, EMPTY: 2}.get(r["provider"], nbytes) if op == "nf4_dequant" \
                else nbytes
            if "us" not in r:
                row[US1] = r["error"]
            else:
                gbs = nb / r["us"] / 1e3
                ratio = (f"{best / r[field]:.2f}x" if best and r.get(field) else "no peer") \
                    if r["provider"] not in PEERS + REFS else ""
                row.update({US1: f"{r['us']:.1f}", "GB/s": f"{gbs:.0f}", "% of ceiling": f"{100 * gbs / copy_gbs:.0f}%",
                            "peak MiB": f"{r['peak']:.0f}",
                            LOOP: f"{r['loop_us']:.1f}" if "loop_us" in r else "",
                            "GPU-only µs": f"{r['kus']:.1f}" if "kus" in r else "",
                            "GPU-only % of ceiling": f"{100 * nb / r['kus'] / 1e3 / copy_gbs:.0f}%"
                            if r.get("kus") else "",
                            "vs best peer": ratio})
            out.append(row)
    return hw.markdown_table(out, COLUMNS)


def _summary(rows, copy_gbs, picks):
    lines = []
    by = {(r["op"], tuple(r["shape"]), r["dtype"], r["provider"]): r for r in rows if "us" in r}
    for shape in DEQ_SHAPES:
        for dt in DT.values():
            ours = [by[k] for k in by if k[:3] == ("nf4_dequant", shape, dt) and k[3].startswith("ours")]
            if not ours:
                continue
            nbytes = deq_bytes(shape, torch.bfloat16)
            parts = []
            for label, field in (("eager", "us"), ("GPU-only", "kus")):
                best = min(ours, key=lambda r: r.get(field) or float("inf"))
                if not best.get(field):
                    continue
                pct = 100 * nbytes / best[field] / 1e3 / copy_gbs
                met = pct >= 95 if shape in LARGE else best[field] <= 5 if shape == (1024, 4096) else None
                parts.append(f"{label} best = {best['provider']} {best[field]:.1f} µs, {pct:.0f}% of copy"
                             + ("" if met is None else f" ({'met' if met else 'NOT met'})"))
            cp = by.get(("nf4_dequant", shape, dt, COPY))
            if cp and cp.get("kus"):
                best_k = min((r["kus"] for r in ours if r.get("kus")), default=None)
                parts.append(f"copy of the same bytes: eager {cp['us']:.1f} µs, GPU-only {cp['kus']:.1f} µs "
                             f"({100 * nbytes / cp['kus'] / 1e3 / copy_gbs:.0f}% of the big copy)"
                             + (f", ours GPU-only at {100 * cp['kus'] / best_k:.0f}% of its speed" if best_k else ""))
            wr, em = by.get(("nf4_dequant", shape, dt, WRITE)), by.get(("nf4_dequant", shape, dt, EMPTY))
            if shape in LARGE and wr:
                t95 = nbytes / (0.95 * copy_gbs) / 1e3  # µs at 95% of the big copy
                side = lambda us: "longer" if us > t95 else "shorter"  # noqa: E731
                if wr.get("kus"):
                    parts.append(f"writing the output alone (no reads): eager {wr['us']:.1f} µs, GPU-only "
                                 f"{wr['kus']:.1f} µs, {side(wr['us'])} / {side(wr['kus'])} than the {t95:.1f} µs of "
                                 "95% of copy" + (" (so 95% is out of reach of any kernel that writes this output)"
                                                  if min(wr["us"], wr["kus"]) > t95 and "fill" not in wr else ""))
                if "fill" in wr:  # torch's fill_ writes slower than a plain 16-byte-store kernel: no ceiling
                    parts[-1] += f" (timed with {wr['fill']}, which is no write ceiling)"
                else:  # GPU-only time missing: no claim about that method
                    parts.append(f"writing the output alone (no reads): eager {wr['us']:.1f} µs, {side(wr['us'])} "
                                 f"than the {t95:.1f} µs of 95% of copy (GPU-only not timed)")
            if em and em.get("us"):
                parts.append(f"a one-element launch timed the same ways: eager {em['us']:.1f} µs"
                             + (f", GPU-only {em['kus']:.1f} µs" if em.get("kus") else " (GPU-only not timed)"))
            target = "≥ 95% of copy" if shape in LARGE else "≤ 5 µs" if shape == (1024, 4096) else "none"
            lines.append(f"- dequant {shape[0]}x{shape[1]} {dt} (target {target}): " + "; ".join(parts))
    for shape in MM_SHAPES:
        for m in MM_M:
            lines += _matmul_lines(by, m, shape, picks)
    return "\n".join(lines) + "\n"


_PATH_ROWS = {"gemv_cuda": "ours gemv cuda", "gemv": "ours gemv triton", "dequant": "ours dequant+cuBLAS",
              "mma_cuda": "ours mma cuda"}


def _pick_verdict(by, k, pick, field, label):
    """"picked P t µs (label) vs best other ours Q u µs (wins/LOSES)" by ``field`` of the rows; "" without data."""
    used = by.get(k + (_PATH_ROWS.get(pick, ""),))
    others = [by[k + (v,)] for p, v in _PATH_ROWS.items() if p != pick and by.get(k + (v,), {}).get(field)]
    if not (used and used.get(field) and others):
        return ""
    best = min(others, key=lambda r: r[field])
    return (f"picked {pick} {used[field]:.1f} µs ({label}) vs best other ours "
            f"{best['provider'].removeprefix('ours ')} {best[field]:.1f} µs "
            f"({'wins' if used[field] <= best[field] else 'LOSES'})")


def _matmul_lines(by, m, shape, picks):
    """The target lines of one matmul shape and M. Eager judgements (auto's eager pick against our other paths,
    auto against the peers) use the eager-loop column, what a decode's loop of eager calls over distinct weights
    sees; the graph judgement (auto's CUDA-graph pick) uses the GPU-only column, what a graph replay sees."""
    lines = []
    k = ("nf4_matmul", (m,) + shape, "bf16")
    auto, deq = by.get(k + ("ours auto",)), by.get(k + ("dequant + F.linear",))
    bnb = by.get(k + ("bitsandbytes matmul_4bit",))
    if not (auto and deq):
        return lines
    pick = picks.get((m,) + shape, "?")
    cu, fl = by.get(k + ("ours gemv cuda",)), by.get(k + ("ours dequant+cuBLAS",))
    if cu and cu.get("kus"):  # the goal: GPU time below bnb's at M = 1 and below dequant + cuBLAS at M = 8
        vs = [(name, r["kus"]) for name, r in (("bnb matmul_4bit", bnb), ("dequant+cuBLAS", fl)) if r and r.get("kus")]
        eager = f"eager loop {cu['loop_us']:.1f}" if cu.get("loop_us") else f"1 call, L2 flushed {cu['us']:.1f}"
        lines.append(f"- gemv cuda M={m} {shape[0]}x{shape[1]} GPU-only {cu['kus']:.1f} µs ({eager}); "
                     + "; ".join(f"{name} {t:.1f} µs ({'beats' if cu['kus'] < t else 'LOSES to'} it, "
                                 f"{t / cu['kus']:.2f}x)" for name, t in vs))
    a = auto.get("loop_us")
    gpu = f"; GPU-only {auto['kus']:.1f}" if auto.get("kus") else ""
    parts = [f"auto picked {pick}",
             (f"ours auto eager loop {a:.1f} µs (1 call, L2 flushed {auto['us']:.1f}{gpu})" if a else
              f"ours auto eager loop not timed (1 call, L2 flushed {auto['us']:.1f} µs{gpu})")]
    peers = []
    if deq.get("loop_us"):
        peers.append(deq["loop_us"])
        parts.append(f"dequant + F.linear eager loop {deq['loop_us']:.1f} µs"
                     + (f" (ours {deq['loop_us'] / a:.2f}x its speed)" if a else ""))
    if bnb and bnb.get("loop_us"):
        peers.append(bnb["loop_us"])
        parts.append(f"bnb matmul_4bit eager loop {bnb['loop_us']:.1f} µs ("
                     + (f"GPU-only {bnb['kus']:.1f}; " if bnb.get("kus") else "")
                     + (f"ours {bnb['loop_us'] / a:.2f}x its speed)" if a else "ours not timed)"))
    if a and peers:
        parts.append(f"vs best peer {min(peers) / a:.2f}x (eager loop)")
    eager_v = _pick_verdict(by, k, pick, "loop_us", "eager loop")
    graph_v = _pick_verdict(by, k, picks.get(("graph", m) + shape, pick), "kus", "GPU-only")
    parts += [f"eager: {eager_v}"] * bool(eager_v) + [f"graph: {graph_v}"] * bool(graph_v)
    if ("timed", m) + shape in picks:
        parts.append(picks[("timed", m) + shape])
    lines.append(f"- matmul M={m} {shape[0]}x{shape[1]}: " + "; ".join(parts))
    return lines


# ---- exploration (not part of the table): host overhead and launch-configuration sweeps ---------------------

def _host_us(fn, calls: int = 300) -> float:
    """Host time per call: calls issued back to back, one sync at the end (the GPU keeps up when it is faster)."""
    import time

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return host


def explore():
    import itertools

    import quant
    import triton_ops.nf4_dequant as td
    import triton_ops.nf4_matmul as tm
    import csrc.nf4_dequant as cd
    from quant.matmul import _dequant_mm, _gemv, _gemv_cuda, _weight

    print(f"{hw.card_name()}", flush=True)
    lines = []

    def report(what, fn):
        try:
            e, k, h = hw.bench_us(fn), kernel_us(fn), _host_us(fn)
            line = f"{what}: eager {e:.1f} us, GPU {k:.1f} us, host {h:.1f} us/call"
        except Exception as ex:  # noqa: BLE001
            line = f"{what}: failed {type(ex).__name__}: {str(ex)[:200]}"
        print(line, flush=True)
        lines.append(line)

    # 1. host overhead of the call paths on a small weight
    for shape in [(1024, 4096)]:
        q, packed, st = _quantized_cache(shape)
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        args = (q.data.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), q.code, out, 64, 256)
        for b in ("auto", "triton", "cuda"):
            report(f"dequant {shape} public backend={b}", lambda b=b: quant.dequantize_nf4(q, torch.bfloat16, out=out, backend=b))
        report(f"dequant {shape} raw triton _launch", lambda: td._launch(*args))
        report(f"dequant {shape} raw cuda _launch", lambda: cd._launch(*args))
        report(f"dequant {shape} torch.empty alone", lambda: torch.empty(shape, device="cuda", dtype=torch.bfloat16))
    # 2. dequant launch configurations (kernel time)
    tri = [(2048, False, 4), (4096, False, 4), (8192, False, 4), (8192, False, 8), (16384, False, 8),
           (4096, True, 4), (8192, True, 8)]
    cud = [(u, b) for u in (1, 2, 4) for b in (0, 8, 16)]
    for shape in DEQ_SHAPES:
        q, packed, st = _quantized_cache(shape)
        out = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
        args = (q.data.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), q.code, out, 64, 256)
        nb = deq_bytes(shape, torch.bfloat16)
        configs = [(td, "triton", {"TILE": t, "BYTE_GATHER": g, "num_warps": w}) for t, g, w in tri] + \
                  [(cd, "cuda", {"U": u, "blocks_per_sm": b}) for u, b in cud]
        for mod, name, cfg in configs:
            mod.CONFIG_OVERRIDE = cfg
            label = f"dequant {shape} {name} " + " ".join(f"{k}={v}" for k, v in cfg.items())
            try:
                k = kernel_us(lambda: mod._launch(*args))
                line = f"{label}: GPU {k:.1f} us ({nb / k / 1e3:.0f} GB/s)"
            except Exception as ex:  # noqa: BLE001
                line = f"{label}: failed {ex}"[:300]
            finally:
                mod.CONFIG_OVERRIDE = None
            print(line, flush=True)
            lines.append(line)
        del out
    # 3. GEMV configurations vs the other paths and bitsandbytes (kernel time)
    gcfg = [(bn, rb, w) for bn, rb, w in itertools.product((1, 2, 4, 8), (256, 512, 1024), (4,))] + \
        [(4, 512, 2), (4, 512, 8), (8, 256, 2)]
    for shape in MM_SHAPES:
        q, packed, st = _quantized_cache(shape)
        qt = _weight(q.data.view(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), q.code,
                     list(shape), 64, 256)
        for m in (1, 8):
            x = torch.randn(m, shape[1], device="cuda", dtype=torch.bfloat16)
            report(f"mm M={m} {shape} default gemv", lambda: _gemv(x, qt, None, True))
            report(f"mm M={m} {shape} gemv cuda", lambda: _gemv_cuda(x, qt, None, True))
            report(f"mm M={m} {shape} dequant+cuBLAS", lambda: _dequant_mm(x, qt, None, True))
            report(f"mm M={m} {shape} public auto", lambda: quant.matmul_nf4(x, q))
            if st is not None:
                import bitsandbytes as bnb

                report(f"mm M={m} {shape} bnb matmul_4bit", lambda: bnb.matmul_4bit(x, packed.t(), quant_state=st))
            for bn, rb, w in gcfg:
                tm.GEMV_CONFIG_OVERRIDE = {"BLOCK_N": bn, "ROW_BYTES": rb, "num_warps": w}
                try:
                    k = kernel_us(lambda: _gemv(x, qt, None, True))
                    line = f"mm M={m} {shape} gemv BN={bn} RB={rb} warps={w}: GPU {k:.1f} us"
                except Exception as ex:  # noqa: BLE001
                    line = f"mm M={m} {shape} gemv {bn},{rb},{w}: failed {ex}"[:300]
                print(line, flush=True)
                lines.append(line)
            tm.GEMV_CONFIG_OVERRIDE = None
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "nf4-explore.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def _cache_path():
    return hw.RESULTS_DIR / f".nf4-unsloth-{hw.card_slug()}.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only-unsloth", action="store_true", help="measure unsloth only (run under PEERS_UNSLOTH=1)")
    ap.add_argument("--explore", action="store_true", help="host-overhead and launch-configuration sweeps only")
    ap.add_argument("--sweep", action="store_true", help="the CUDA GEMV's launch-configuration sweep only")
    ap.add_argument("--mma-sweep", action="store_true", help="the CUDA tensor-core kernel's K-split sweep only")
    ap.add_argument("--deq-sweep", action="store_true",
                    help="the dequant kernels' launch-configuration sweep only (CUDA: U x threads x grid cap; "
                         "Triton: TILE x num_warps; five shapes, bf16)")
    ap.add_argument("--matmul-only", action="store_true", help="the small-M matmul table only (nf4-matmul results)")
    ap.add_argument("--dequant-only", action="store_true", help="the dequantization table only (nf4 results)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/nf4.py measures a CUDA device; none is available here")
    if args.explore:
        explore()
        return
    if args.sweep:
        gemv_sweep()
        return
    if args.mma_sweep:
        mma_sweep()
        return
    if args.deq_sweep:
        deq_sweep()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.only_unsloth:
        try:
            import unsloth  # noqa: F401  (before anything imports peft/transformers)
        except Exception as e:  # noqa: BLE001 - a missing peer is a table entry, never a crash
            print(f"unsloth not importable: {type(e).__name__}: {e}")
        rows = dequant_rows(unsloth_only=True)
        hw.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        _cache_path().write_text(json.dumps(rows))
        print(f"wrote {_cache_path()}")
        return
    copy_gbs = hw.copy_bandwidth_gbs()
    print(f"{hw.card_name()}: copy {copy_gbs:.0f} GB/s", flush=True)
    if os.environ.get("PEERS_UNSLOTH") == "1":
        try:
            subprocess.run([sys.executable, "-m", "bench.nf4", "--only-unsloth"], timeout=240, check=False)
        except subprocess.TimeoutExpired:
            print("unsloth subprocess timed out")
    if args.matmul_only:
        torch.backends.cuda.matmul.allow_tf32 = False
        mm, picks = matmul_rows()
        body = _table(mm, copy_gbs)
        notes = (f"\nGB/s: NF4 weight + x read, y written, in the 1-call time; % of ceiling: of the copy bandwidth "
                 f"measured in this run ({copy_gbs:.0f} GB/s). {TIME_NOTES} vs best peer: best peer time / ours "
                 f"(>1 = ours faster), eager loop.\n\n")
        hw.publish("nf4-matmul", "Small-M NF4 matmul", body, notes, _summary(mm, copy_gbs, picks))
        return
    rows = dequant_rows()
    try:
        uns = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        uns = []
    if not uns:
        uns = [{"op": "nf4_dequant", "shape": list(s), "dtype": DT[d], "provider": "unsloth",
                "error": "not run (python -m bench.nf4 --only-unsloth under PEERS_UNSLOTH=1)"}
               for s in DEQ_SHAPES for d in DEQ_DTYPES]
    for u in uns:  # keep the table grouped: each unsloth row after its shape's rows
        idx = max((i for i, r in enumerate(rows) if r["shape"] == u["shape"] and r["dtype"] == u["dtype"]),
                  default=len(rows) - 1)
        rows.insert(idx + 1, u)
    mm, picks = ([], {}) if args.dequant_only else matmul_rows()
    rows += mm
    from quant.dispatch import measured_choices

    body = _table(rows, copy_gbs)
    notes = (f"\nDequant GB/s: packed codes + uint8 absmax + nested absmax read, output written; matmul GB/s: NF4 "
             f"weight + x read, y written. % of ceiling: of the copy bandwidth measured in this run "
             f"({copy_gbs:.0f} GB/s). Ours dequant timed writing into a reused output (peak 0); peers allocate. "
             f"vs best peer: best peer time / ours (>1 = ours faster): matmul by the eager loop, dequant (no loop "
             f"column) by the 1-call time. {TIME_NOTES} Dequant backend auto picked: "
             f"{measured_choices() or 'not measured'}.\n\n")
    summary = _summary(rows, copy_gbs, picks)
    print(body + notes + summary)
    title = "NF4 dequantization" if args.dequant_only else "NF4 dequantization and small-M NF4 matmul"
    path = hw.write_results("nf4", title, [("Results", body + notes),
                                                                                 ("Targets", summary)])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
