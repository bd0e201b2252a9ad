"""RMSNorm forward and forward + backward, bf16, against transformers, torch.compile, liger-kernel, unsloth.

Shapes: x (B*T=16384, C=4096) — the issue's target (Llama-3-8B hidden states) — and an odd (16383, 4100).

Bytes counted (the floor at copy speed), elem = 2 bytes:
    forward            read x, write y                      2 * N*C*elem
    forward + backward  + read x and dy, write dx            5 * N*C*elem
(the weight, rstd and dweight are O(C + N) and left out). Target: forward + backward at >= 85% of the copy
bandwidth measured in the same run.

Providers:
  * minitrain (triton): ``triton_ops.rms_norm.rms_norm``, weight trainable (dx and dweight);
  * minitrain (triton, no dW): the same with a frozen weight (what LoRA training runs);
  * transformers: LlamaRMSNorm eager; torch.compile: the same module compiled (inductor);
  * liger-kernel: LigerRMSNorm (llama casting, its default in-place backward);
  * unsloth: ``fast_rms_layernorm`` on a LlamaRMSNorm, in its own process (importing unsloth patches
    transformers); it never computes dweight, so compare it with the "no dW" row. With PEERS_UNSLOTH=1 the
    main run starts it; ``python -m bench.rms_norm --only-unsloth`` runs it alone.

Run: ``python -m bench.rms_norm`` (well under a minute of GPU time plus torch.compile).
``python -m bench.rms_norm --sweep`` instead times each candidate launch configuration of the Triton kernels
(rows per program, warps, grid, pipeline stages, eviction hint, row split; ``SWEEP_*`` below) for both shapes,
forward and backward separately, checks each against the default's output, and writes
``bench/results/<date>-<card>-rms_norm-sweep.md`` (about two minutes, mostly compilation).
"""
from __future__ import annotations

import gc

import torch

from bench import hw

SHAPES = [(16384, 4096), (16383, 4100)]  # (N = B*T, C)
DT = torch.bfloat16
EPS = 1e-5
MODES = ("fwd", "fwd+bwd")
PEERS = ("transformers", "torch.compile", "liger-kernel", "unsloth")
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "GB/s", "% of ceiling", "peak MiB", "vs best peer",
           "eager µs"]
TARGET_SHARE = 0.85


def nbytes(N, C, mode):
    return (2 if mode == "fwd" else 5) * N * C * 2


def _inputs(N, C, weight_grad=True):
    x = torch.randn(N, C, device="cuda", dtype=DT, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C, device="cuda")).to(DT).requires_grad_(weight_grad)
    dy = torch.randn_like(x)
    return x, w, dy


def _modes(apply, x, w, dy):
    params = (x, w) if w.requires_grad else (x,)

    def fwd_bwd():
        torch.autograd.grad(apply(), params, dy)

    return {"fwd": apply, "fwd+bwd": fwd_bwd}


def _module(cls, C, w, **kw):
    m = cls(C, eps=EPS, **kw).to(device="cuda", dtype=DT)
    with torch.no_grad():
        m.weight.copy_(w)
    m.weight.requires_grad_(w.requires_grad)
    return m


# ---- providers: each returns {mode: callable} -----------------------------------------------------------

def minitrain(shape, weight_grad=True):
    from triton_ops.rms_norm import rms_norm

    x, w, dy = _inputs(*shape, weight_grad)
    return _modes(lambda: rms_norm(x, w, EPS, backend="triton"), x, w, dy)


def transformers_eager(shape, compiled=False):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w, dy = _inputs(*shape)
    m = _module(LlamaRMSNorm, shape[1], w)
    fn = torch.compile(m) if compiled else m
    return _modes(lambda: fn(x), x, m.weight, dy)


def liger(shape):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    x, w, dy = _inputs(*shape)
    m = _module(LigerRMSNorm, shape[1], w)
    return _modes(lambda: m(x), x, m.weight, dy)


def _unsloth_fn(module: str, name: str):
    """unsloth's kernel entry point, looked up explicitly: a TypeError "'module' object is not callable" was
    seen on the GPU machine, so a non-callable is reported with what it is instead of called."""
    import importlib

    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{module}.{name} is {fn!r}, not a function")
    return fn


def unsloth_provider(shape):
    # unsloth 2026.10: fast_rms_layernorm(layernorm, X, gemma=False, save_output=False, reuse_grad=False) reads
    # layernorm.weight and layernorm.variance_epsilon (checked against the 2026.10.9 wheel)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    fast_rms_layernorm = _unsloth_fn("unsloth.kernels.rms_layernorm", "fast_rms_layernorm")
    x, w, dy = _inputs(*shape, weight_grad=False)
    m = _module(LlamaRMSNorm, shape[1], w)
    return _modes(lambda: fast_rms_layernorm(m, x), x, m.weight, dy)


def providers():
    return [("minitrain (triton)", minitrain),
            ("minitrain (triton, no dW)", lambda s: minitrain(s, weight_grad=False)),
            ("transformers", transformers_eager),
            ("torch.compile", lambda s: transformers_eager(s, compiled=True)),
            ("liger-kernel", liger)]


# ---- driver ---------------------------------------------------------------------------------------------

def measure(provs):
    rows = []
    for shape in SHAPES:
        for name, make in provs:
            try:
                fns, err = make(shape), None
            except Exception as e:  # noqa: BLE001 - a missing or broken peer is a table entry, never a crash
                fns, err = {}, hw.error_cell(e)
            for mode in MODES:
                row = {"shape": list(shape), "mode": mode, "provider": name}
                if err:
                    row["error"] = err
                else:
                    try:
                        row["us"], row["peak"], row["eager"] = hw.time_and_peak(fns[mode])
                    except Exception as e:  # noqa: BLE001
                        row["error"] = hw.error_cell(e)
                print(f"rms_norm {mode} {shape} {name}: "
                      + (f"{row['us']:.1f} us, peak {row['peak']:.0f} MiB" if "us" in row else row["error"]),
                      flush=True)
                rows.append(row)
            del fns
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def table(rows, copy_gbs):
    out, summary = [], []
    for shape in SHAPES:
        N, C = shape
        for mode in MODES:
            group = [r for r in rows if r["shape"] == list(shape) and r["mode"] == mode]
            peers = [r["us"] for r in group if r["provider"] in PEERS and "us" in r]
            best = min(peers) if peers else None
            for r in group:
                row = {"op": f"rms_norm {mode}", "shape": f"x ({N},{C})", "dtype": "bf16", "provider": r["provider"]}
                if "us" not in r:
                    row["µs"] = r["error"]
                else:
                    gbs = nbytes(N, C, mode) / r["us"] / 1e3
                    row.update({"µs": f"{r['us']:.1f}", "GB/s": f"{gbs:.0f}",
                                "% of ceiling": f"{100 * gbs / copy_gbs:.0f}%", "peak MiB": f"{r['peak']:.0f}",
                                "vs best peer": f"{best / r['us']:.2f}x" if best else "no peer",
                                "eager µs": f"{r['eager']:.1f}" if "eager" in r else ""})
                out.append(row)
            for r in group:
                if r["provider"].startswith("minitrain") and "us" in r and mode == "fwd+bwd":
                    share = nbytes(N, C, mode) / r["us"] / 1e3 / copy_gbs
                    summary.append(f"- {r['provider']} fwd+bwd x ({N},{C}): {r['us']:.1f} µs = {100 * share:.0f}% of "
                                   f"copy bandwidth (target ≥ {100 * TARGET_SHARE:.0f}%: "
                                   f"{'met' if share >= TARGET_SHARE else 'NOT met'})"
                                   + (f"; best peer {best:.0f} µs, {best / r['us']:.2f}x" if best else ""))
    return hw.markdown_table(out, COLUMNS), "\n".join(summary) + "\n"


# ---- launch-configuration sweep ---------------------------------------------------------------------------
# Candidates for triton_ops.rms_norm's config overrides (keys: FWD_KEYS / BWD_KEYS there), pruned with ptxas
# register counts for sm_90 (bf16, C = 4096 / 4100): forward ~32 elements per thread costs ~61 registers,
# backward ~8 elements per thread ~63 (x, dy, x^ and g live at once), 16 per thread ~100; configurations that
# spill are left out. The first entry of each list is the default.
SWEEP_FWD = [
    {},                                         # default: 4 rows x 16 warps (2 rows x 8 warps with a tail)
    {"block_m": 1, "num_warps": 4},
    {"block_m": 1, "num_warps": 8},
    {"block_m": 2, "num_warps": 8},
    {"block_m": 2, "num_warps": 16},
    {"block_m": 4, "num_warps": 16},
    {"block_m": 4, "num_warps": 32},
    {"block_m": 8, "num_warps": 32},
    {"evict": "evict_first"},
    {"chunking": "pow2"},                       # the previous launch: one masked 8192 block for C = 4100
]
SWEEP_BWD_DW = [
    {},                                         # default: 1 row x 16 warps, 2 programs per SM, 3 stages
                                                # (C = 4100: 8 warps, 4 programs per SM; stages as smem allows)
    {"stages": 1},
    {"stages": 2},
    {"stages": 4},
    {"stages": 3, "evict": "evict_first"},
    {"per_sm": 1, "stages": 3},
    {"per_sm": 3, "stages": 3},                 # more programs than the registers let be resident
    {"block_m": 1, "num_warps": 16, "per_sm": 2, "stages": 3},   # C = 4096's default, for C = 4100
    {"block_m": 1, "num_warps": 32, "per_sm": 1, "stages": 3},
    {"block_m": 2, "num_warps": 32, "per_sm": 1, "stages": 1},
    {"block_m": 1, "num_warps": 8, "per_sm": 2, "stages": 3},
    {"block_m": 1, "num_warps": 8, "per_sm": 4, "stages": 3},
    {"block_m": 1, "num_warps": 8, "per_sm": 4, "stages": 4},
    {"block_m": 2, "num_warps": 16, "per_sm": 2, "stages": 3},
]
SWEEP_BWD_NODW = [
    {},                                         # default: 1 row x 16 warps (32 for 4100), one per row block
    {"block_m": 1, "num_warps": 16, "per_sm": 0},
    {"evict": "evict_first"},
    {"block_m": 1, "num_warps": 8, "per_sm": 0},
    {"block_m": 1, "num_warps": 32, "per_sm": 0},
    {"block_m": 2, "num_warps": 16, "per_sm": 0},
    {"block_m": 2, "num_warps": 32, "per_sm": 0},
    {"per_sm": 2, "stages": 1},                 # persistent, as the dw backward
    {"per_sm": 2, "stages": 2},
]
SWEEP_COLUMNS = ["pass", "shape", "config", "launch", "µs", "GB/s", "% of copy", "vs default", "check"]


def _launch_desc(kind, C, cfg):
    import importlib

    R = importlib.import_module("triton_ops.rms_norm")  # the package exports a function of the same name
    if kind == "fwd":
        k = R._fwd_config(C, cfg)
        return f"{k['BLOCK_M']}x({k['BLOCK_C']}+{k['TAIL_C']}) w{k['num_warps']} {k['EVICT'] or '-'}"
    k = R._bwd_config(C, cfg, kind == "bwd")
    grid = f"{k['per_sm']}/SM" if k["per_sm"] else "1/block"
    return (f"{k['BLOCK_M']}x({k['BLOCK_C']}+{k['TAIL_C']}) w{k['num_warps']} {grid} s{k['NUM_STAGES']} "
            f"{k['EVICT'] or '-'}")


def _agree(got, ref, exact):
    """'ok' when ``got`` matches the default launch's output (bit for bit where the row split is the same)."""
    if exact and torch.equal(got, ref):
        return "ok"
    err = (got.float() - ref.float()).abs()
    tol = 1e-2 + 2**-7 * ref.float().abs()
    bad = int((err > tol).sum())
    if bad == 0:
        return "ok" if not exact else f"ok (max diff {err.max().item():.1e})"
    return f"MISMATCH: {bad} beyond tolerance, max {err.max().item():.2e}"


def sweep():
    """Graph-replayed time of each candidate launch configuration, forward and backward separately, for both
    shapes; each output checked against the default configuration's. Prints and writes the table."""
    import importlib

    R = importlib.import_module("triton_ops.rms_norm")
    rms_norm_forward, rms_norm_backward = R.rms_norm_forward, R.rms_norm_backward
    copy_gbs = hw.ceilings()["copy_gbs"]
    rows, best_lines = [], []
    for N, C in SHAPES:
        x, w, dy = _inputs(N, C)
        x, w = x.detach(), w.detach()
        y0, r0 = rms_norm_forward(x, w, EPS)
        ref = {"fwd": (y0,), "bwd": rms_norm_backward(dy, x, w, r0, True),
               "bwd no dW": rms_norm_backward(dy, x, w, r0, False)}
        best = {}
        for kind, cands, nb in (("fwd", SWEEP_FWD, 2), ("bwd", SWEEP_BWD_DW, 3), ("bwd no dW", SWEEP_BWD_NODW, 3)):
            default_us = None
            for cfg in cands:
                if cfg.get("chunking") == "pow2" and R._blocks(C, "pow2") == R._blocks(C):
                    continue  # the same row split as the default (a power-of-two C)
                row = {"pass": kind, "shape": f"x ({N},{C})", "config": str(cfg) if cfg else "default"}
                try:
                    row["launch"] = _launch_desc("bwd_nodw" if kind == "bwd no dW" else kind, C, cfg)
                    if kind == "fwd":
                        def fn(cfg=cfg, x=x, w=w):
                            return rms_norm_forward(x, w, EPS, config=cfg)
                    else:
                        def fn(cfg=cfg, need_dw=kind == "bwd", x=x, w=w, dy=dy, r0=r0):
                            return rms_norm_backward(dy, x, w, r0, need_dw, config=cfg)
                    out = fn()
                    exact = cfg.get("chunking", "tail") == "tail"
                    checks = [_agree(out[0], ref[kind][0], exact)]
                    if kind == "bwd":
                        checks.append("dw " + _agree(out[1], ref[kind][1], False))
                    row["check"] = "; ".join(checks)
                    us = hw.graph_us(fn) or hw.bench_us(fn)
                except Exception as e:  # noqa: BLE001 - a configuration that fails to compile is a table entry
                    row["µs"] = hw.error_cell(e)
                    rows.append(row)
                    continue
                default_us = default_us or us
                gbs = nb * N * C * 2 / us / 1e3
                row.update({"µs": f"{us:.1f}", "GB/s": f"{gbs:.0f}", "% of copy": f"{100 * gbs / copy_gbs:.0f}%",
                            "vs default": f"{default_us / us:.2f}x"})
                if "MISMATCH" not in row["check"] and (kind not in best or us < best[kind][0]):
                    best[kind] = (us, row["config"], row["launch"])
                print(f"sweep {kind} ({N},{C}) {row['config']} [{row['launch']}]: {us:.1f} us "
                      f"({100 * gbs / copy_gbs:.0f}% of copy) {row['check']}", flush=True)
                rows.append(row)
        for kind, (us, cfg, launch) in best.items():
            best_lines.append(f"- x ({N},{C}) {kind}: best {cfg} [{launch}] {us:.1f} µs")
        if "fwd" in best and "bwd" in best:
            tot = best["fwd"][0] + best["bwd"][0]
            best_lines.append(f"- x ({N},{C}) fwd+bwd from the best of each: {tot:.1f} µs = "
                              f"{100 * 5 * N * C * 2 / tot / 1e3 / copy_gbs:.0f}% of copy bandwidth")
        del x, w, dy, y0, r0, ref
        gc.collect()
        torch.cuda.empty_cache()
    body = hw.markdown_table(rows, SWEEP_COLUMNS)
    notes = ("\nµs: one call replayed from a CUDA graph; the backward includes the dw partial reduction kernel. "
             "GB/s: x and y (fwd) or x, dy and dx (bwd) over the time. launch: rows x (block + tail columns), "
             "warps, programs (per SM, persistent, or one per row block), pipeline stages of the row loop, "
             "eviction hint. check: the output against the default configuration's (bit-identical where the row "
             "is split into the same blocks).\n\n")
    summary = "\n".join(best_lines) + "\n"
    print(body + notes + summary)
    path = hw.write_results("rms_norm-sweep", "RMSNorm launch-configuration sweep",
                            [("Sweep", body + notes), ("Best per pass", summary)])
    print(f"wrote {path}")


def main():
    import sys

    if "--sweep" in sys.argv[1:]:
        if not torch.cuda.is_available():
            raise SystemExit("bench/rms_norm.py measures a CUDA device; none is available here")
        sweep()
        return
    args = hw.peer_bench_args("rms_norm")
    rows = hw.rows_with_unsloth(
        "rms_norm", args.only_unsloth, lambda: measure(providers()), lambda: measure([("unsloth", unsloth_provider)]),
        lambda why: [{"shape": list(s), "mode": m, "provider": "unsloth", "error": why} for s in SHAPES for m in MODES])
    c = hw.ceilings()
    body, summary = table(rows, c["copy_gbs"])
    notes = ("\nGB/s: the bytes the op must move (x and y forward; x, dy and dx backward) over the time; % of the "
             "copy bandwidth measured in this run. µs: one call replayed from a CUDA graph (the GPU time; every "
             "provider alike), eager µs: the same call launched from Python (host overhead included). vs best peer: "
             "best peer time / this time (>1 = faster). "
             "unsloth never computes dweight: compare it with the 'no dW' row.\n\n")
    hw.publish("rms_norm", "RMSNorm, forward and forward + backward", body, notes, summary)


if __name__ == "__main__":
    main()
