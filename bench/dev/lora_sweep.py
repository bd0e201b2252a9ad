"""GPU sweep: bench/dev/lora_skinny's rank-R GEMM kernels against torch.mm on the 8B LoRA step's shapes (< 90 s).

Cases (M = 4096 tokens, bf16, R as minitrain batches the adapters: q|k|v 48, gate|up 32, single 16):
    xa = x·Aᵀ for the q|k|v group, gate|up, o_proj and down_proj; dyB = dy·B for N = 4096, 1024, 14336;
    dA = s·dyBᵀ·x for the q|k|v group, gate|up, o_proj (K = 4096) and down_proj (K = 14336), the batched groups
    as triton_ops.lora's backward runs them (dyB_catᵀ·x, (ΣR, K)); dB = s·dyᵀ·xa for N = 4096, 1024, 14336.
torch rows are what triton_ops.lora runs: ``x @ A.t()``, ``dy @ B``, ``torch.mm(dyB.t(), x).mul_(s)`` then
``.to(float32)`` (the adapters are fp32), likewise for dB; this process imports minitrain first, so cuBLAS runs
without a workspace (as in training; ``--cublas-default`` keeps torch's default workspace instead).

Timing: 20 calls captured into one CUDA graph, 5 replays between CUDA events, median / 20; the calls rotate over
copies of the wide operand (x or dy) that total >= 128 MiB, so the L2 does not serve one call what the previous one
read (in the step these operands were written long before); rows of a case in 3
interleaved rounds, the order rotated, median of the round medians. Each kernel row is checked against an fp32
reference (max |error| <= 2% of the reference's largest magnitude: bf16 rounding of a sum over M or K).
Columns: case | row | µs | GB/s (the bytes each product must move: both operands read, the output written) |
% of copy bandwidth (bench.hw) | check. A summary line per case: the fastest kernel row against torch.

Usage (repo root, GPU): python -m bench.dev.lora_sweep [--cublas-default] [--only SUBSTR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

IN_GRAPH, REPS, ROUNDS = 20, 5, 3
M = 4096
SCALE = 1.0  # alpha / r of the 8B benchmark (16 / 16)
L2_COPY_BYTES = 128 * 2**20  # the wide operand rotates over copies totalling at least this (> 2x the H100/H200 L2)

X_WT_CONFIGS = [dict(block_m=bm, block_k=bk, split_k=sk, num_warps=4, num_stages=st)
                for bm, bk, sk, st in [(16, 128, 1, 4), (32, 128, 1, 4), (32, 256, 1, 3), (64, 128, 1, 4),
                                       (32, 128, 2, 4), (64, 128, 2, 4), (64, 128, 4, 4), (128, 64, 4, 3)]]
GT_X_CONFIGS = [dict(block_m=bm, block_k=bk, split_m=sm, num_warps=4, num_stages=st)
                for bm, bk, sm, st in [(64, 64, 1, 4), (64, 128, 1, 3), (64, 64, 2, 4), (64, 64, 4, 4),
                                       (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 8, 4), (32, 128, 8, 4)]]


def _cases():
    # (name, kind, K or N, R): kind "xa" = x (M, K)·Aᵀ (A (R, K)); "dyB" = dy (M, N)·B (B (N, R));
    # "dA" = s·dyBᵀ·x (dyB (M, R), x (M, K)); "dB" = s·dyᵀ·xa (dy (M, N), xa (M, R))
    return [("xa q|k|v", "xa", 4096, 48), ("xa gate|up", "xa", 4096, 32), ("xa o", "xa", 4096, 16),
            ("xa down", "xa", 14336, 16), ("dyB N=4096", "dyB", 4096, 16), ("dyB N=1024", "dyB", 1024, 16),
            ("dyB N=14336", "dyB", 14336, 16), ("dA q|k|v", "dA", 4096, 48), ("dA gate|up", "dA", 4096, 32),
            ("dA K=4096", "dA", 4096, 16), ("dA K=14336", "dA", 14336, 16),
            ("dB N=4096", "dB", 4096, 16), ("dB N=1024", "dB", 1024, 16), ("dB N=14336", "dB", 14336, 16)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cublas-default", action="store_true", help="keep torch's default cuBLAS workspace")
    ap.add_argument("--only", default="", help="cases whose name contains this")
    args = ap.parse_args()
    if not args.cublas_default:
        import minitrain  # noqa: F401  (sets CUBLAS_WORKSPACE_CONFIG=:0:0 as training does)
    import torch

    from bench.dev.lora_skinny import gt_x, x_wt
    from bench.hw import capture_graph, copy_bandwidth_gbs, replay_us

    if not torch.cuda.is_available():
        raise SystemExit("lora_sweep measures a CUDA device; none is available")
    t_start = time.time()
    copy = copy_bandwidth_gbs()
    print(f"# {torch.cuda.get_device_name()}, copy {copy:.0f} GB/s, torch {torch.__version__}, CUBLAS_WORKSPACE_CONFIG="
          f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG', '(unset)')}", flush=True)

    def graph_us(fn, xs):
        # call i reads the wide operand xs[i % len(xs)]: copies that together exceed the L2, so no call finds its
        # operand cached by the one before (in the step these operands come from far back, cold)
        g = capture_graph([lambda i=i: fn(xs[i % len(xs)]) for i in range(IN_GRAPH)])
        return replay_us(g, IN_GRAPH, REPS), g

    gen = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    for name, kind, n, R in _cases():
        if args.only and args.only not in name:
            continue
        rows = {}
        if kind in ("xa", "dyB"):
            x = torch.randn(M, n, device="cuda", generator=gen).to(bf)
            if kind == "xa":
                A = (torch.randn(R, n, device="cuda", generator=gen) / n**0.5).to(bf)
                w = A.t()
                rows["torch"] = lambda x, A=A: x @ A.t()
            else:
                w = (torch.randn(n, R, device="cuda", generator=gen) / n**0.5).to(bf)
                rows["torch"] = lambda x, w=w: x @ w
            ref = x.float() @ w.float()
            for c in X_WT_CONFIGS:
                rows["triton " + " ".join(f"{k}={v}" for k, v in c.items())] = (
                    lambda x, w=w, c=c: x_wt(x, w, **c))
            nbytes = (M * n + n * R + M * R) * 2
        else:
            g = torch.randn(M, R, device="cuda", generator=gen).to(bf)
            x = torch.randn(M, n, device="cuda", generator=gen).to(bf)
            if kind == "dA":
                rows["torch"] = lambda x, g=g: torch.mm(g.t(), x).mul_(SCALE).to(torch.float32)
                ref = SCALE * g.float().t() @ x.float()
                for c in GT_X_CONFIGS:
                    rows["triton " + " ".join(f"{k}={v}" for k, v in c.items())] = (
                        lambda x, g=g, c=c: gt_x(g, x, SCALE, **c))
            else:  # dB (N, R) = s·dyᵀ·xa; the kernel writes its transpose (R, N)
                rows["torch"] = lambda x, g=g: torch.mm(x.t(), g).mul_(SCALE).to(torch.float32)
                ref = (SCALE * g.float().t() @ x.float()).t()
                for c in GT_X_CONFIGS:
                    rows["triton " + " ".join(f"{k}={v}" for k, v in c.items())] = (
                        lambda x, g=g, c=c: gt_x(g, x, SCALE, **c).t())
            nbytes = M * R * 2 + M * n * 2 + R * n * 4
        tol = 0.02 * ref.abs().max().item()
        xs = [x] + [x.clone() for _ in range(max(0, -(-L2_COPY_BYTES // (x.numel() * x.element_size())) - 1))]
        checks, live = {}, []
        for row, fn in rows.items():
            try:
                err = (fn(x).float() - ref).abs().max().item()
                checks[row] = "ok" if err <= tol else f"WRONG (max |err| {err:.3g} > {tol:.3g})"
                live.append(row)
            except Exception as e:  # noqa: BLE001 - one failing config is a line, not the end of the sweep
                print(f"{name} | {row} | FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
        if not live:  # every row failed its check: nothing to time (and the rotation below would divide by 0)
            continue
        rounds = {row: [] for row in live}
        graphs = []
        for r in range(ROUNDS):
            order = live[r % len(live):] + live[:r % len(live)]
            for row in order:
                us, gr = graph_us(rows[row], xs)
                rounds[row].append(us)
                graphs.append(gr)
        graphs.clear()
        res = {row: statistics.median(t) for row, t in rounds.items()}
        for row, us in sorted(res.items(), key=lambda kv: kv[1]):
            gbs = nbytes / us / 1e3
            print(f"{name:<12} | {row:<62} | {us:7.1f} µs | {gbs:6.0f} GB/s | {100 * gbs / copy:3.0f}% copy | "
                  f"{checks[row]}", flush=True)
        ok = {row: us for row, us in res.items() if row != "torch" and checks[row] == "ok"}
        if ok and "torch" in res:
            best = min(ok, key=ok.get)
            print(f"SUMMARY {name}: torch {res['torch']:.1f} µs; best kernel {ok[best]:.1f} µs "
                  f"({res['torch'] / ok[best]:.2f}x) [{best}]", flush=True)
        torch.cuda.empty_cache()
    print(f"# done in {time.time() - t_start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
