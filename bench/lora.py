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

Two times per provider: µs = one forward+backward replayed from a CUDA graph (torch.cuda.CUDAGraph
capture of the whole step, as the trainer runs it: GPU time only), and eager µs = the same step called from
Python (GPU time or host time, whichever is longer). eager/graph well above 1 means the eager call is
host-bound (launch and Python work). A provider that cannot be captured says why in its row and is compared
on eager time.
  * minitrain (NF4, dx into x): lora_qkv(..., overwrite_x=True), backward writes dx into x's storage as
    unsloth's apply_lora_qkv does by default (inplace=True); the plain row keeps x intact.

Peak MiB = max allocated during one forward+backward minus what was allocated before it (weights and the
input are held by every provider already), measured on an eager call.

Targets: the issue asks for ≥ 2x faster than peft + bnb. The floor bounds that: no LoRA implementation can
beat the floor, so peft+bnb time / floor time is the largest speed-up over peft+bnb any implementation can
reach; the Targets section prints it next to ours.

Run: ``python -m bench.lora`` (about two minutes of GPU time; unsloth adds ~1 min with its import).
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as Fn

from bench import hw

C, F, H, KV, D, R, ALPHA = 4096, 14336, 32, 8, 128, 16, 32
TOKENS = (4096, 16384)
DT = torch.bfloat16
BLOCKS = ("mlp", "qkv")
PEERS = ("peft + bnb", "unsloth")
OURS = "minitrain (NF4)"
OURS_OW = "minitrain (NF4, dx into x)"
SKIP = {("mlp", OURS_OW)}  # overwrite_x is a QKV option (the MLP backward already reuses its own buffers)
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "TFLOP/s", "% of ceiling", "peak MiB", "vs best peer",
           "eager µs", "eager/graph", "graph capture"]


def shapes(block):
    """(name, N, K) of each projection in the block."""
    if block == "mlp":
        return [("gate_proj", F, C), ("up_proj", F, C), ("down_proj", C, F)]
    return [("q_proj", H * D, C), ("k_proj", KV * D, C), ("v_proj", KV * D, C)]


def base_flops(block, T):
    return 12 * T * C * F if block == "mlp" else 4 * T * C * (H * D + 2 * KV * D)


def _w(N, K):
    return torch.randn(N, K, device="cuda", dtype=DT) * 0.02


def _graph_us(step):
    """(µs of one CUDA-graph replay of ``step``, None) or (None, why it could not be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        torch.cuda.synchronize()
        us = hw.bench_us(graph.replay, warmup=5, rep=60)
        del graph
        return us, None
    except Exception as e:  # noqa: BLE001 - a provider that cannot be captured is compared on eager time
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def _time_and_peak(step):
    """(eager µs, peak MiB of one eager call, graph µs or None, why not captured or None)."""
    peak = hw.peak_mib(step)
    eager = hw.bench_us(step, warmup=5, rep=60)
    graph, why = _graph_us(step)
    return eager, peak, graph, why


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


def minitrain_step(block, T, nf4=True, overwrite_x=False):
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
    if block == "mlp":
        if overwrite_x:
            raise ValueError("overwrite_x is a lora_qkv option")
        def fwd():
            return lora_mlp(x, *specs)
    else:
        def fwd():
            return lora_qkv(x, *specs, overwrite_x=overwrite_x)
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

def measure(providers):
    """Rows of every (provider, block, T). Providers run one after another (peers last), so a capture that
    breaks a peer's CUDA context cannot lose our rows."""
    rows = []
    for name, make in providers:
        for block in BLOCKS:
            for T in TOKENS:
                if (block, name) in SKIP:
                    continue
                row = {"block": block, "T": T, "provider": name}
                try:
                    step = make(block, T)
                    row["us"], row["peak"], row["graph_us"], row["graph_why"] = _time_and_peak(step)
                    del step
                except ImportError as e:
                    row["error"] = f"not installed ({e.name or e})"
                except Exception as e:  # noqa: BLE001 - one failing provider must not lose the table
                    row["error"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                gc.collect()
                torch.cuda.empty_cache()
                if "us" in row:
                    msg = f"eager {row['us']:.0f} us, graph {row['graph_us'] or 0:.0f} us, peak {row['peak']:.0f} MiB"
                    msg += f" (not captured: {row['graph_why']})" if row["graph_why"] else ""
                else:
                    msg = row["error"]
                print(f"{block} T={T} {name}: {msg}", flush=True)
                rows.append(row)
    return rows


def _gpu_us(r):
    """The time a row is compared on: graph replay when it could be captured, else eager."""
    return r["graph_us"] if r.get("graph_us") else r["us"]


def table(rows, tflops_ceiling):
    out, summary = [], []
    for block in BLOCKS:
        for T in TOKENS:
            group = [r for r in rows if r["block"] == block and r["T"] == T]
            peers = [_gpu_us(r) for r in group if r["provider"] in PEERS and "us" in r]
            best = min(peers) if peers else None
            shape = (f"T={T} C={C} F={F} R={R}" if block == "mlp" else f"T={T} C={C} H={H} KV={KV} D={D} R={R}")
            for r in group:
                row = {"op": f"lora_{block} fwd+bwd", "shape": shape, "dtype": "bf16", "provider": r["provider"]}
                if "us" not in r:
                    row["µs"] = r["error"]
                else:
                    us = _gpu_us(r)
                    tf = base_flops(block, T) / us / 1e6
                    row.update({"µs": f"{us:.0f}" + ("" if r.get("graph_us") else " (eager)"), "TFLOP/s": f"{tf:.0f}",
                                "% of ceiling": f"{100 * tf / tflops_ceiling:.0f}%", "peak MiB": f"{r['peak']:.0f}",
                                "vs best peer": f"{best / us:.2f}x" if best else "no peer",
                                "eager µs": f"{r['us']:.0f}",
                                "eager/graph": f"{r['us'] / r['graph_us']:.2f}" if r.get("graph_us") else "",
                                "graph capture": "ok" if r.get("graph_us") else
                                (f"failed: {r['graph_why']}" if r.get("graph_why") else "not measured")})
                out.append(row)
            summary += _targets(block, T, {r["provider"]: r for r in group if "us" in r})
    return hw.markdown_table(out, COLUMNS), "\n".join(summary) + "\n"


def _targets(block, T, by):
    """Target lines of one (block, T): ratios on graph time (GPU) and on eager time, and the bound that the
    floor puts on any speed-up over peft + bnb."""
    lines = []
    floor, peft, uns = by.get("floor"), by.get("peft + bnb"), by.get("unsloth")
    for name in (OURS, OURS_OW):
        ours = by.get(name)
        if not ours:
            continue
        parts = []
        for label, key in (("graph", "graph_us"), ("eager", "us")):
            if not ours.get(key):
                continue
            p = [f"{label}: {ours[key]:.0f} µs"]
            if floor and floor.get(key):
                p.append(f"/floor = {ours[key] / floor[key]:.3f} (target ≤ 1.15)")
            if peft and peft.get(key):
                p.append(f"peft+bnb/ours = {peft[key] / ours[key]:.2f}x (target ≥ 2)")
            if uns and uns.get(key):
                p.append(f"unsloth/ours = {uns[key] / ours[key]:.2f}x")
            parts.append(", ".join(p))
        if uns:
            parts.append(f"peak {ours['peak']:.0f} vs unsloth {uns['peak']:.0f} MiB (target ≤: "
                         f"{'met' if ours['peak'] <= uns['peak'] else 'NOT met'})")
        lines.append(f"- {block} T={T} {name}: " + "; ".join(parts))
    if block == "qkv":  # what is alive at the backward's peak (bf16, MiB)
        mib = 2 / 2**20
        held = 2 * T * (H * D + 2 * KV * D) * mib   # outputs + dys, held by the step around the backward
        w, dx = H * D * C * mib, T * C * mib
        lines.append(f"- qkv T={T} peak model: outputs + dys {held:.0f} + the dequantized q weight {w:.0f} = "
                     f"{held + w:.0f} MiB with dx written into x, + dx {dx:.0f} = {held + w + dx:.0f} MiB with a "
                     f"fresh dx buffer (rank-R terms < 2 MiB)")
    if block == "mlp":
        mib = 2 / 2**20
        held, gu, w = 2 * T * C * mib, 2 * T * F * mib, C * F * mib
        dh, dx = min(T, C // 2) * F * mib, T * C * mib
        lines.append(f"- mlp T={T} peak model: output + dy {held:.0f} + saved g, u {gu:.0f} + max(a C/2-row chunk "
                     f"of dh {dh:.0f}, dx {dx:.0f}) + one dequantized weight {w:.0f} = "
                     f"{held + gu + max(dh, dx) + w:.0f} MiB (rank-R terms < 2 MiB; a whole dh would add "
                     f"{T * F * mib - max(dh, dx):.0f})")
    if floor and peft:
        b = []
        for label, key in (("graph", "graph_us"), ("eager", "us")):
            if floor.get(key) and peft.get(key):
                bound = peft[key] / floor[key]
                b.append(f"{label}: peft+bnb {peft[key]:.0f} µs / floor {floor[key]:.0f} µs = {bound:.2f}x "
                         f"({'2x not ruled out' if bound >= 2 else '2x ruled out'})")
        lines.append(f"- {block} T={T} largest speed-up over peft+bnb any LoRA can have (one that costs nothing "
                     f"over the bf16 base GEMMs, not even the dequantization): " + "; ".join(b))
    return lines


def main():
    args = hw.peer_bench_args("lora")
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = hw.rows_with_unsloth(
        "lora", args.only_unsloth,
        lambda: measure([("floor", floor_step), (OURS, minitrain_step),
                         (OURS_OW, lambda b, t: minitrain_step(b, t, overwrite_x=True)),
                         ("minitrain (bf16)", lambda b, t: minitrain_step(b, t, nf4=False)),
                         ("peft + bnb", peft_step)]),
        lambda: measure([("unsloth", unsloth_step)]),
        lambda why: [{"block": b, "T": t, "provider": "unsloth", "error": why} for b in BLOCKS for t in TOKENS])
    try:
        from quant.dispatch import resolve_backend
        dq = resolve_backend("auto", torch.device("cuda"))
    except Exception as e:  # noqa: BLE001
        dq = f"unknown ({type(e).__name__})"
    c = hw.ceilings()
    body, summary = table(rows, c["bf16_tflops"])
    notes = (f"\nµs: one forward+backward replayed from a CUDA graph (GPU time), or the eager time where the "
             f"provider could not be captured (marked); eager µs: the same step called from Python; eager/graph "
             f"> 1: host-bound eager call. TFLOP/s counts the base GEMM FLOPs only (same work for every provider) "
             f"at µs; % of the measured bf16 matmul ceiling. Peak MiB: extra memory of one eager forward+backward "
             f"above the held weights and input. vs best peer: best peer µs / this µs (>1 = faster). NF4 "
             f"dequantization backend: {dq}. Adapters: bf16 for minitrain, peft's own default dtype for peft + bnb "
             f"and unsloth. minitrain (NF4, dx into x): lora_qkv(overwrite_x=True), dx written into x's storage "
             f"like unsloth's apply_lora_qkv (inplace=True by default).\n\n")
    hw.publish("lora", "Fused LoRA blocks (MLP, QKV), forward + backward, Llama-3.1-8B shapes", body, notes, summary)


if __name__ == "__main__":
    main()
