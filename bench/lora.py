"""Fused LoRA blocks at Llama-3.1-8B shapes: forward + backward time and peak memory.

Blocks (C=4096, F=14336, H=32, KV=8, D=128, R=16, alpha=32, bf16, 4096 and 16384 tokens):
  * MLP: y = down(silu(gate(x)) · up(x)), base FLOPs 12·T·C·F (3 GEMMs forward, 3 for dx backward);
  * QKV: Q, K, V = x·Wqᵀ, x·Wkᵀ, x·Wvᵀ, base FLOPs 4·T·C·(H·D + 2·KV·D).
Adapter FLOPs (~1%) are not counted, so TFLOP/s compares every provider on the same work.

Providers:
  * floor: the base GEMMs alone in torch eager, plain bf16 weights, no adapter (what LoRA cannot beat);
  * minitrain (NF4): triton_ops.lora on quant.quantize_nf4 weights (dequantization included);
  * minitrain (bf16): the same ops on plain bf16 weights (shows what the dequantization costs);
  * peft + bnb: peft LoRA layers injected on bitsandbytes Linear4bit (nf4, double quant), peft's defaults;
  * unsloth: unsloth.kernels.fast_lora apply_lora_mlp_swiglu / apply_lora_qkv on the same peft + bnb layers,
    run in its own process (importing unsloth patches peft/transformers): with PEERS_UNSLOTH=1 the main run
    starts it; `python -m bench.lora --only-unsloth` runs it alone.
Each mode stores its rows next to the results and writes the merged table, so running the two modes one
after the other (either order) gives the full table.

Peak MiB = max allocated during one forward+backward minus what was allocated before it (weights and the
input are held by every provider already).

Run: ``python -m bench.lora`` (about a minute of GPU time; unsloth adds ~1 min with its import).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as Fn

from bench import hw

C, F, H, KV, D, R, ALPHA = 4096, 14336, 32, 8, 128, 16, 32
TOKENS = (4096, 16384)
DT = torch.bfloat16
BLOCKS = ("mlp", "qkv")
PEERS = ("peft + bnb", "unsloth")
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "TFLOP/s", "% of ceiling", "peak MiB", "vs best peer"]


def shapes(block):
    """(name, N, K) of each projection in the block."""
    if block == "mlp":
        return [("gate_proj", F, C), ("up_proj", F, C), ("down_proj", C, F)]
    return [("q_proj", H * D, C), ("k_proj", KV * D, C), ("v_proj", KV * D, C)]


def base_flops(block, T):
    return 12 * T * C * F if block == "mlp" else 4 * T * C * (H * D + 2 * KV * D)


def _w(N, K):
    return torch.randn(N, K, device="cuda", dtype=DT) * 0.02


def _time_and_peak(step):
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return hw.bench_us(step, warmup=5, rep=60), peak


def _x(T, batched=False):
    return torch.randn(1, T, C, device="cuda", dtype=DT, requires_grad=True) if batched else \
        torch.randn(T, C, device="cuda", dtype=DT, requires_grad=True)


# ---- providers: each returns a step() running one forward + backward ---------------------------------

def floor_step(block, T):
    x = _x(T)
    Ws = [_w(N, K) for _, N, K in shapes(block)]
    if block == "mlp":
        def fwd():
            return (Fn.silu(x @ Ws[0].t()) * (x @ Ws[1].t())) @ Ws[2].t()
    else:
        def fwd():
            return tuple(x @ W.t() for W in Ws)
    return _step(fwd, [x])


def _step(fwd, params):
    def step():
        outs = fwd()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, params, [torch.full_like(o, 1e-3) for o in outs])
    return step


def minitrain_step(block, T, nf4=True):
    import quant
    from triton_ops.lora import LoRAWeights, lora_mlp, lora_qkv

    x = _x(T)
    specs, params = [], [x]
    for _, N, K in shapes(block):
        w = _w(N, K)
        base = quant.quantize_nf4(w) if nf4 else w
        del w
        A = (torch.randn(R, K, device="cuda", dtype=DT) / K**0.5).requires_grad_()
        B = (torch.randn(N, R, device="cuda", dtype=DT) * 0.01).requires_grad_()
        specs.append(LoRAWeights(base, A, B, ALPHA / R))
        params += [A, B]
    torch.cuda.empty_cache()
    fwd = (lambda: lora_mlp(x, *specs)) if block == "mlp" else (lambda: lora_qkv(x, *specs))
    return _step(fwd, params)


def _peft_module(block):
    """An nn.Module with the block's projections as bnb Linear4bit (nf4, double quant) + peft LoRA."""
    import bitsandbytes as bnb
    import peft

    class Block(torch.nn.Module):
        def forward(self, x):
            if block == "mlp":
                return self.down_proj(Fn.silu(self.gate_proj(x)) * self.up_proj(x))
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    m = Block()
    for name, N, K in shapes(block):
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=DT, compress_statistics=True, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(_w(N, K).cpu(), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4")
        setattr(m, name, lin.cuda())
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[n for n, _, _ in shapes(block)])
    m = peft.inject_adapter_in_model(cfg, m)
    for name, N, K in shapes(block):
        with torch.no_grad():  # B starts at zero in peft; give it values so every product is real
            getattr(m, name).lora_B["default"].weight.normal_(0, 0.01)
    params = [p for p in m.parameters() if p.requires_grad]
    torch.cuda.empty_cache()
    return m, params


def peft_step(block, T):
    m, params = _peft_module(block)
    x = _x(T)
    return _step(lambda: m(x), [x] + params)


def unsloth_step(block, T):
    from unsloth.kernels import fast_lora

    m, params = _peft_module(block)
    x = _x(T, batched=True)  # unsloth's backward expects (batch, seq, hidden)
    fn = fast_lora.apply_lora_mlp_swiglu if block == "mlp" else fast_lora.apply_lora_qkv
    return _step(lambda: fn(m, x), [x] + params)


# ---- driver ---------------------------------------------------------------------------------------------

def _cache_path():
    return hw.RESULTS_DIR / f".lora-rows-{hw.card_slug()}.json"


def _load_cache():
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return []


def _save_cache(rows):
    hw.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    _cache_path().write_text(json.dumps(rows))


def measure(providers):
    rows = []
    for block in BLOCKS:
        for T in TOKENS:
            for name, make in providers:
                row = {"block": block, "T": T, "provider": name}
                try:
                    step = make(block, T)
                    row["us"], row["peak"] = _time_and_peak(step)
                    del step
                except ImportError as e:
                    row["error"] = f"not installed ({e.name or e})"
                except Exception as e:  # noqa: BLE001 - one failing provider must not lose the table
                    row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                gc.collect()
                torch.cuda.empty_cache()
                print(f"{block} T={T} {name}: " + (f"{row['us']:.0f} us, peak {row['peak']:.0f} MiB"
                                                   if "us" in row else row["error"]), flush=True)
                rows.append(row)
    return rows


def table(rows, tflops_ceiling):
    out, summary = [], []
    for block in BLOCKS:
        for T in TOKENS:
            group = [r for r in rows if r["block"] == block and r["T"] == T]
            peers = [r["us"] for r in group if r["provider"] in PEERS and "us" in r]
            best = min(peers) if peers else None
            shape = (f"T={T} C={C} F={F} R={R}" if block == "mlp" else f"T={T} C={C} H={H} KV={KV} D={D} R={R}")
            for r in group:
                row = {"op": f"lora_{block} fwd+bwd", "shape": shape, "dtype": "bf16", "provider": r["provider"]}
                if "us" not in r:
                    row["µs"] = r["error"]
                else:
                    tf = base_flops(block, T) / r["us"] / 1e6
                    row.update({"µs": f"{r['us']:.0f}", "TFLOP/s": f"{tf:.0f}",
                                "% of ceiling": f"{100 * tf / tflops_ceiling:.0f}%", "peak MiB": f"{r['peak']:.0f}",
                                "vs best peer": f"{best / r['us']:.2f}x" if best else "no peer"})
                out.append(row)
            by = {r["provider"]: r for r in group if "us" in r}
            ours = by.get("minitrain (NF4)")
            if ours:
                parts = []
                if "floor" in by:
                    parts.append(f"minitrain/floor = {ours['us'] / by['floor']['us']:.3f} (target ≤ 1.15)")
                if "peft + bnb" in by:
                    parts.append(f"peft+bnb/minitrain = {by['peft + bnb']['us'] / ours['us']:.2f}x (target ≥ 2)")
                if "unsloth" in by:
                    parts.append(f"unsloth/minitrain time = {by['unsloth']['us'] / ours['us']:.2f}x, peak "
                                 f"{ours['peak']:.0f} vs unsloth {by['unsloth']['peak']:.0f} MiB (target ≤)")
                summary.append(f"- {block} T={T}: " + "; ".join(parts))
    return hw.markdown_table(out, COLUMNS), "\n".join(summary) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only-unsloth", action="store_true", help="measure unsloth only (run under PEERS_UNSLOTH=1)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora.py measures a CUDA device; none is available here")
    cached = _load_cache()
    if args.only_unsloth:
        try:
            import unsloth  # noqa: F401  (must come before peft/transformers: it patches them)
        except Exception as e:  # noqa: BLE001 - a missing peer is a table entry, never a crash
            print(f"unsloth not importable: {type(e).__name__}: {e}")
        rows = measure([("unsloth", unsloth_step)])
        rows += [r for r in cached if r["provider"] != "unsloth"]
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        rows = measure([("floor", floor_step), ("minitrain (NF4)", minitrain_step),
                        ("minitrain (bf16)", lambda b, t: minitrain_step(b, t, nf4=False)),
                        ("peft + bnb", peft_step)])
        uns = [r for r in cached if r["provider"] == "unsloth"]
        if os.environ.get("PEERS_UNSLOTH") == "1":
            _save_cache(rows)
            try:
                subprocess.run([sys.executable, "-m", "bench.lora", "--only-unsloth"], timeout=400, check=False)
                uns = [r for r in _load_cache() if r["provider"] == "unsloth"]
            except subprocess.TimeoutExpired:
                print("unsloth subprocess timed out")
        if not uns:
            uns = [{"block": b, "T": t, "provider": "unsloth",
                    "error": "not run (python -m bench.lora --only-unsloth under PEERS_UNSLOTH=1)"}
                   for b in BLOCKS for t in TOKENS]
        rows += uns
    _save_cache(rows)
    try:
        from quant.dispatch import resolve_backend
        dq = resolve_backend("auto", torch.device("cuda"))
    except Exception as e:  # noqa: BLE001
        dq = f"unknown ({type(e).__name__})"
    c = hw.ceilings()
    body, summary = table(rows, c["bf16_tflops"])
    notes = (f"\nTFLOP/s counts the base GEMM FLOPs only (same work for every provider); % of the measured bf16 "
             f"matmul ceiling. Peak MiB: extra memory of one forward+backward above the held weights and input. "
             f"vs best peer: best peer time / this time (>1 = faster). NF4 dequantization backend: {dq}. "
             f"Adapters: bf16 for minitrain, peft's own default dtype for peft + bnb and unsloth.\n\n")
    print(body + notes + summary)
    path = hw.write_results("lora", "Fused LoRA blocks (MLP, QKV), forward + backward, Llama-3.1-8B shapes",
                            [("Results", body + notes), ("Targets", summary)])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
