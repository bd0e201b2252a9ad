"""Sweep of the cross-entropy row kernels on the GPU: the CUDA C++ cluster kernel (csrc/ce_rows.cu, every variant
and several rows per cluster) against the Triton row kernel, loss + gradient in place as the fused linear
cross-entropy calls them (one 2048-row chunk of bf16 logits).

Each captured call works on its own copy of the logits (CALLS copies), so no call finds its rows in L2; µs is
the median per call over REPS graph replays. GB/s counts what the op must move at least: each logit read once
and its gradient written once (2 x 2 bytes per logit; the Triton kernel reads twice, 3 x 2 bytes).

    python -m bench.dev.ce_rows_sweep [--vocab 128256 32000 ...] [--rows 2048]
"""
from __future__ import annotations

import argparse

import torch

from bench import hw
from csrc import ce_rows
from triton_ops.cross_entropy import ce_launch

CALLS, REPS = 5, 5


def _time(bufs, launch) -> float:
    """µs per call of ``launch(z)`` over the copies ``bufs``, one CUDA graph of them all."""
    graph = hw.capture_graph([lambda z=z: launch(z) for z in bufs])
    return hw.replay_us(graph, len(bufs), REPS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 32000, 65536])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--per-cluster", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    copy = hw.copy_bandwidth_gbs()
    print(f"{hw.card_name()}: copy {copy:.0f} GB/s; N = {args.rows} rows, bf16, loss + gradient in place")
    n = args.rows
    for v in args.vocab:
        g = torch.Generator(device="cuda").manual_seed(v)
        base = (torch.randn(n, v, device="cuda", generator=g) * 3).to(torch.bfloat16)
        bufs = [base.clone() for _ in range(CALLS)]
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        y[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
        loss, lse = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        scale = torch.full((), 1.0 / n, device="cuda")
        ideal = 2 * n * v * 2
        def rows(kind):
            return lambda z: ce_launch(z, y, -100, 0.0, loss, lse, grad=z, scale=scale, rows=kind)

        def cuda(name, rpc):
            return lambda z: ce_rows.launch_ce_rows(z, y, -100, loss, lse, z, scale, variant=name, rows_per_cluster=rpc)

        results = [("triton", _time(bufs, rows("triton")))]
        for name, var in ce_rows.VARIANTS.items():
            if var.capacity < v:
                continue
            for rpc in args.per_cluster:
                try:
                    results.append((f"cuda {name} rows/cluster {rpc}", _time(bufs, cuda(name, rpc))))
                except Exception as e:  # noqa: BLE001 - a variant that fails to launch is a line, not a crash
                    print(f"  V={v} {name} rows/cluster {rpc}: {type(e).__name__}: {str(e)[:160]}")
        results.append(("auto (default)", _time(bufs, rows("auto"))))
        tri = results[0][1]
        print(f"\nV = {v}: at copy speed {ideal / copy / 1e3:.1f} µs (cuda's bytes), {1.5 * ideal / copy / 1e3:.1f} "
              f"µs (triton's)")
        print(f"| kernel | µs | GB/s (2 x 2 B/logit) | % of copy | vs triton |\n|---|---|---|---|---|")
        for name, us in results:
            print(f"| {name} | {us:.1f} | {ideal / us / 1e3:.0f} | {100 * ideal / us / 1e3 / copy:.0f}% | "
                  f"{tri / us:.2f}x |")
        del bufs, base


if __name__ == "__main__":
    main()
