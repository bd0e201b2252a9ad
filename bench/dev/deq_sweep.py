"""NF4 dequant latency-hiding sweep (GPU; < 80 s on an H200 with the NVRTC compile): every variant of
bench/dev/nf4_dequant_dev.cu, the library's CUDA default (csrc.nf4_dequant), the Triton default
(triton_ops.nf4_dequant), torch fill_ of the output, the fill references and the read/write mix references
(the dequantization's packed-code loads and 16-byte stores without its decode), on (14336,4096), (4096,14336),
(4096,4096), (1024,4096) -> bf16, blocksize 64, double quantization.

Timing: GPU-only. Each row's 20 launches are captured into one CUDA graph; a round replays it 5 times between CUDA
events (median / 20); rows are timed in 3 interleaved rounds, the order rotated each round, and the row's time is
the median of its round medians (so card clock drift favours no row). Every dequant row is checked once per shape
with torch.equal against quant.nf4.dequantize_nf4_ref.

Columns: name | µs | GB/s (the dequant's bytes: packed + absmax + nested absmax read + output written, over the
row's time, so rows compare directly; fill rows too) | % of copy bandwidth (bench.hw.copy_bandwidth_gbs, measured
at start: the target's ceiling) | exact.
Summary per shape: the best dequant row against the 95%-of-copy target.

Usage (repo root): python -m bench.dev.deq_sweep [--shapes all|big] [--only SUBSTR] [--prefetch]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import csrc.nf4_dequant as cd
import quant
from bench.dev import nf4_dequant_dev as dev
from bench.hw import capture_graph, copy_bandwidth_gbs
from bench.hw import replay_us as hw_replay_us
from quant.nf4 import dequantize_nf4_ref
from triton_ops.nf4_dequant import nf4_dequantize_tensors as triton_dequant

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096)]
IN_GRAPH, REPS, ROUNDS = 20, 5, 3
TARGET = 0.95  # share of copy bandwidth to reach


def capture(fn) -> torch.cuda.CUDAGraph:
    """IN_GRAPH calls of fn captured into one CUDA graph."""
    return capture_graph([fn] * IN_GRAPH)


def replay_us(g: torch.cuda.CUDAGraph) -> float:
    return hw_replay_us(g, IN_GRAPH, REPS)


def deq_bytes(shape, blocksize=64, nested=256) -> int:
    n = shape[0] * shape[1]
    nb = -(-n // blocksize)
    return (n + 1) // 2 + nb + 4 * (-(-nb // nested)) + 2 * n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="all", choices=("all", "big"))
    ap.add_argument("--only", default="", help="run only the dev variants whose name contains this")
    ap.add_argument("--prefetch", action="store_true",
                    help="also the L2-prefetch rows, on a copy of the packed codes after the other rows (their "
                         "evict_last lines would otherwise serve the other rows' reads from L2)")
    a = ap.parse_args()
    shapes = SHAPES[:2] if a.shapes == "big" else SHAPES
    variants = [v for v in dev.VARIANTS if a.only in v]
    t0 = time.time()
    dev_ = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev_)
    copy_gbs = copy_bandwidth_gbs()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; copy {copy_gbs:.0f} GB/s; "
          f"{len(variants)} dev variants", flush=True)
    t = time.time()
    dev.get_kernel("nf4d_fill_tma", torch.cuda.current_device())  # NVRTC compile of the dev module
    print(f"dev module compiled in {time.time() - t:.1f} s", flush=True)

    summary = []
    for shape in shapes:
        total = deq_bytes(shape)
        target_us = total / (TARGET * copy_gbs) / 1e3
        q = quant.quantize_nf4(torch.randn(shape, device=dev_), blocksize=64, double_quant=True)
        targs = (q.data.reshape(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1), q.code)
        plan = cd.DequantPlan(*targs, 64, 256)
        out = torch.empty(shape, dtype=torch.bfloat16, device=dev_)
        want = dequantize_nf4_ref(q, torch.bfloat16)

        rows = {}  # name -> [kind, graph, exact or None, round medians]

        def add(kind, name, fn, check):
            try:
                exact = None
                if check:
                    out.fill_(float("nan"))
                    fn()
                    exact = torch.equal(out, want)
                rows[name] = [kind, capture(fn), exact, []]
            except Exception as e:  # noqa: BLE001 - one failing variant must not end the sweep
                print(f"  {name:28s} failed: {type(e).__name__}: {e}"[:300], flush=True)

        add("ref", "torch fill_", lambda: out.fill_(1.0), False)
        for f in dev.FILLS:
            add("ref", f, lambda f=f: dev.fill(out, f), False)
        for m in dev.MIXES:  # the same loads and stores without the decode
            add("ref", m, lambda m=m: dev.mix(out, q.data.reshape(-1), m), False)
        add("deq", "cuda default (csrc)", lambda: plan(out), True)
        add("deq", "triton default", lambda: triton_dequant(*targs, shape, 64, 256, torch.bfloat16, out=out), True)
        for v in variants:
            add("deq", v, lambda v=v: dev.dequantize(plan, out, v), True)

        def time_rounds(names):
            for r in range(ROUNDS):  # interleaved rounds, order rotated
                k = r * len(names) // ROUNDS
                for name in names[k:] + names[:k]:
                    rows[name][3].append(replay_us(rows[name][1]))

        time_rounds(list(rows))
        if a.prefetch:
            # The packed codes into L2 first (a launch of its own), then the dequantization. On IN_GRAPH copies of the
            # codes, one per call of a row's graph (so a replay's evict_last lines are long gone when a copy comes
            # round again: every prefetch reads HBM), added and timed after the other rows; afterwards the copies'
            # lines are set back to evict_normal (outside the timing) and the copies freed.
            sink = torch.empty(1024, dtype=torch.int32, device=dev_)
            copies = [q.data.reshape(-1).clone() for _ in range(IN_GRAPH)]
            pplans = [cd.DequantPlan(c, *targs[1:], 64, 256) for c in copies]
            turn = itertools.count()

            def pick():  # the next copy and its plan, round robin (each captured call gets the next one)
                i = next(turn) % IN_GRAPH
                return copies[i], pplans[i]

            def pf_then(p, run):
                c, pl = pick()
                dev.prefetch(c, p, sink)
                run(c, pl)

            for p in dev.PREFETCHES:
                add("ref", f"{p} alone", lambda p=p: pf_then(p, lambda c, pl: None), False)
                add("ref", f"{p} + mix-ind-u2", lambda p=p: pf_then(p, lambda c, pl: dev.mix(out, c, "mix-ind-u2")),
                    False)
                add("deq", f"{p} + cuda default", lambda p=p: pf_then(p, lambda c, pl: pl(out)), True)
                for v in variants:
                    add("deq", f"{p} + {v}", lambda p=p, v=v: pf_then(p, lambda c, pl: dev.dequantize(pl, out, v)),
                        True)
            time_rounds([n for n in rows if n.startswith("pf-")])
            for c in copies:
                dev.prefetch(c, "demote", sink)
            torch.cuda.synchronize()
            copies = pplans = None
        names = list(rows)
        print(f"\n{shape[0]}x{shape[1]} -> bf16: {total / 1e6:.1f} MB moved; 95% of copy = {target_us:.2f} us",
              flush=True)
        timed = []
        for name in names:
            kind, _, exact, meds = rows[name]
            us = statistics.median(meds)
            gbs = total / us / 1e3
            timed.append((kind, name, us, exact))
            tag = "" if exact is None else ("exact" if exact else "MISMATCH")
            print(f"  {name:28s} {us:8.2f} us {gbs:6.0f} GB/s {100 * gbs / copy_gbs:5.1f}% copy  {tag}", flush=True)
        deq = sorted((r for r in timed if r[0] == "deq" and r[3]), key=lambda r: r[2])
        bad = [r[1] for r in timed if r[3] is False]
        if deq:
            best = deq[0]
            summary.append(f"{shape[0]}x{shape[1]}: best {best[1]} {best[2]:.2f} us vs target {target_us:.2f} us "
                           f"({100 * total / best[2] / 1e3 / copy_gbs:.1f}% of copy): "
                           f"{'MET' if best[2] <= target_us else 'not met'}; library default "
                           f"{next((r[2] for r in timed if r[1] == 'cuda default (csrc)'), float('nan')):.2f} us; "
                           f"top 4: " + " | ".join(f"{r[1]} {r[2]:.2f}" for r in deq[:4])
                           + (f"; MISMATCH: {bad}" if bad else ""))
        rows = out = want = q = plan = targs = None
        torch.cuda.empty_cache()
        print(f"  [{time.time() - t0:.0f} s]", flush=True)

    print(f"\nSummary (copy {copy_gbs:.0f} GB/s, target {TARGET:.0%}):")
    for s in summary:
        print(" ", s)
    print(f"wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
