"""The LoRA adapter term y += alpha * a @ b^T (triton_ops.rank_update) against torch's addmm_, bf16.

Shapes (M, N, R) from the 8B QLoRA step at B=2 x T=2048 (M = 4096 tokens), r=16:
  (4096, 14336, 16)  gate / up outputs and the down projection's dh;
  (4096, 6144, 48)   q|k|v outputs side by side (three adapters);
  (4096, 4096, 16)   q / o outputs and every dx;
  (4096, 1024, 16)   k / v outputs.

Bytes counted (elem = 2): read and write y (2 * M * N * elem) plus a and b ((M + N) * R * elem). Both
providers do the same work; % of ceiling is of the copy bandwidth measured in the same run.

Providers: minitrain (triton) = ``rank_update_(y, a, b, alpha)``; torch addmm_ = ``y.addmm_(a, b.t(),
alpha=alpha)`` (cuBLAS, beta = 1). GPU-only µs from a CUDA-graph replay (hw.graph_us) next to do_bench's
median of eager calls.

Run: ``python -m bench.rank_update`` (seconds). ``--sweep`` also times tile configurations of the kernel.
"""
from __future__ import annotations

import argparse

import torch

from bench import hw

SHAPES = [(4096, 14336, 16), (4096, 6144, 48), (4096, 4096, 16), (4096, 1024, 16)]
DT = torch.bfloat16
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "GB/s", "% of ceiling", "vs addmm_", "GPU-only µs",
           "GPU-only GB/s"]
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, GROUP_M=8, num_warps=w)
         for bm, bn in ((64, 128), (128, 128), (128, 256), (256, 128)) for w in (4, 8)]


def nbytes(M, N, R):
    return (2 * M * N + (M + N) * R) * 2


def _inputs(M, N, R):
    y = torch.randn(M, N, device="cuda", dtype=DT)
    a = torch.randn(M, R, device="cuda", dtype=DT)
    b = torch.randn(N, R, device="cuda", dtype=DT) * 0.01
    return y, a, b


def measure(copy_gbs):
    from triton_ops.rank_update import rank_update_

    rows = []
    for M, N, R in SHAPES:
        y, a, b = _inputs(M, N, R)
        provs = {"minitrain (triton)": lambda: rank_update_(y, a, b, 0.5),
                 "torch addmm_": lambda: y.addmm_(a, b.t(), alpha=0.5)}
        us = {p: hw.bench_us(f, warmup=10, rep=100) for p, f in provs.items()}
        gus = {p: hw.graph_us(f) for p, f in provs.items()}
        for p in provs:
            gbs = nbytes(M, N, R) / us[p] / 1e3
            g = gus[p]
            rows.append({"op": "y += a·bᵀ", "shape": f"M={M} N={N} R={R}", "dtype": "bf16", "provider": p,
                         "µs": f"{us[p]:.1f}", "GB/s": f"{gbs:.0f}", "% of ceiling": f"{100 * gbs / copy_gbs:.0f}%",
                         "vs addmm_": f"{us['torch addmm_'] / us[p]:.2f}x",
                         "GPU-only µs": "—" if g is None else f"{g:.1f}",
                         "GPU-only GB/s": "—" if g is None else f"{nbytes(M, N, R) / g / 1e3:.0f}"})
            print(f"{M}x{N} R={R} {p}: {us[p]:.1f} us ({gbs:.0f} GB/s), graph {g}", flush=True)
    return rows


def sweep(copy_gbs):
    from triton_ops.rank_update import _launch

    lines = []
    for M, N, R in SHAPES:
        y, a, b = _inputs(M, N, R)
        want = y.clone().addmm_(a, b.t())
        res = []
        scratch = y.clone()  # timed calls accumulate into it; y stays the input of the check
        for cfg in SWEEP:
            out = y.clone()
            _launch(out, a, b, 1.0, cfg)
            err = (out.float() - want.float()).abs().max().item()
            us = hw.bench_us(lambda: _launch(scratch, a, b, 1.0, cfg), warmup=10, rep=100)
            res.append((us, cfg, err))
        res.sort(key=lambda t: t[0])
        lines.append(f"{M}x{N} R={R}: " + " | ".join(
            f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']}: {u:.1f} us "
            f"({100 * nbytes(M, N, R) / u / 1e3 / copy_gbs:.0f}%, max diff {e:.2g})" for u, c, e in res))
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's tile configurations")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/rank_update.py measures a CUDA device; none is available here")
    c = hw.ceilings()
    rows = measure(c["copy_gbs"])
    sections = [("Results", hw.markdown_table(rows, COLUMNS))]
    if args.sweep:
        sections.append(("Tile sweep (do_bench µs, % of copy bandwidth; max diff vs addmm_)", sweep(c["copy_gbs"])))
    path = hw.write_results("rank_update", "LoRA adapter term y += a·bᵀ: one-pass kernel vs cuBLAS addmm_", sections)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
