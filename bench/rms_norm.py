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


def unsloth(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from unsloth.kernels.rms_layernorm import fast_rms_layernorm

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


def main():
    args = hw.peer_bench_args("rms_norm")
    rows = hw.rows_with_unsloth(
        "rms_norm", args.only_unsloth, lambda: measure(providers()), lambda: measure([("unsloth", unsloth)]),
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
