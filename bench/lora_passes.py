"""Memory passes of triton_ops.lora's hand-written Functions: forward + backward of lora_qkv and lora_mlp at the
8B QLoRA step's shapes, with each switch of the module flipped.

Shapes: M = 4096 tokens (B=2, T=2048), C=4096, F=14336, QKV N = 4096 + 1024 + 1024, R=16, alpha=32, bf16,
NF4 bases (quant.quantize_nf4), adapters on every projection, no dropout (q, k, v batched).

Variants (module attributes of triton_ops.lora, set before each timed call):
  * default: SAVE_XA, RANK_UPDATE_KERNEL and FOLD_ADAPTERS on (what ships): the MLP's gate and up adapters
    and down's dh term folded into their base GEMMs (one GEMM over K + R); every other adapter term added to the
    output the base GEMM wrote (forward outputs, dx) by triton_ops.rank_update's one-pass kernel;
  * no fold: FOLD_ADAPTERS off: the MLP's adapter terms through the rank-update pass as well;
  * no fold, addmm adapter pass: also RANK_UPDATE_KERNEL off: those passes through cuBLAS's K=R addmm_;
  * recompute xa: SAVE_XA off: backward recomputes xa = x·Aᵀ (re-reads x per group, x twice and h once in
    the MLP); shows what saving xa gains.
Bytes of the adapter passes (bf16, MiB = 2^20 bytes, one read and one write each): QKV forward 2·48, dx 2·32;
MLP forward gate + up + down 2·(112 + 112 + 32), dh 2·112, dx 2·32. Saving xa removes reads of x or h:
QKV 32 (x once, batched), MLP 32 + 32 (x for gate and for up) + 112 (h for down) per layer.
(An "adapter first" order, the adapter GEMM writing the output and the base GEMM accumulating into it with
beta = 1, measured slower on an H100: QKV +118 µs, MLP +27 µs; it was removed.)

Time: triton.testing.do_bench medians (bench.hw.bench_us, CUDA events, ≥ 20 repetitions of forward+backward),
each variant measured twice interleaved, the lower median kept; and the GPU-only time of one CUDA-graph replay
of the same forward+backward (bench.hw.graph_us), which leaves out the host's launch costs. TFLOP/s counts the base GEMMs only
(forward + dx: QKV 4·M·C·6144, MLP 12·M·C·F), so every variant is judged on the same work.

Run: ``python -m bench.lora_passes`` (well under a minute on an H100).
"""
from __future__ import annotations

import torch

from bench import hw

M, C, F, R, ALPHA = 4096, 4096, 14336, 16, 32
NQ, NKV = 4096, 1024
DT = torch.bfloat16
VARIANTS = {  # name: (SAVE_XA, RANK_UPDATE_KERNEL, FOLD_ADAPTERS)
    "default": (True, True, True),
    "no fold": (True, True, False),
    "no fold, addmm adapter pass": (True, False, False),
    "recompute xa": (False, True, True),
}
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "TFLOP/s", "% of ceiling", "peak MiB", "vs default",
           "GPU-only µs", "GPU-only vs default"]


def _proj(N, K):
    import quant
    from triton_ops.lora import LoRAWeights, lora_scale

    base = quant.quantize_nf4((torch.randn(N, K, device="cuda") / K**0.5).to(DT))
    A = (torch.randn(R, K, device="cuda") / K**0.5).to(DT).requires_grad_()
    B = (torch.randn(N, R, device="cuda") * 0.01).to(DT).requires_grad_()
    return LoRAWeights(base, A, B, lora_scale(R, ALPHA))


def make_step(block):
    """(forward + backward callable, base FLOPs) of one block; grads returned, never accumulated."""
    from triton_ops.lora import lora_mlp, lora_qkv

    x = torch.randn(M, C, device="cuda", dtype=DT).requires_grad_()
    if block == "qkv":
        ws = [_proj(NQ, C), _proj(NKV, C), _proj(NKV, C)]
        dys = [torch.randn(M, n, device="cuda", dtype=DT) for n in (NQ, NKV, NKV)]

        def run():
            return lora_qkv(x, *ws, backend="triton")
        flops = 4 * M * C * (NQ + 2 * NKV)
    else:
        ws = [_proj(F, C), _proj(F, C), _proj(C, F)]
        dys = [torch.randn(M, C, device="cuda", dtype=DT)]

        def run():
            return (lora_mlp(x, *ws, backend="triton"),)
        flops = 12 * M * C * F
    leaves = [x] + [t for w in ws for t in (w.A, w.B)]

    def step():
        return torch.autograd.grad(run(), leaves, dys)
    return step, flops


def _set(variant):
    import triton_ops.lora as tlora

    tlora.SAVE_XA, tlora.RANK_UPDATE_KERNEL, tlora.FOLD_ADAPTERS = VARIANTS[variant]


def measure(block):
    step, flops = make_step(block)
    us, gpu, peak = {}, {}, {}
    for _ in range(2):  # interleaved rounds: drift (clocks, temperature) hits every variant alike
        for v in VARIANTS:
            _set(v)
            t = hw.bench_us(step, warmup=25, rep=300)
            us[v] = min(us.get(v, t), t)
            g = hw.graph_us(step)  # one CUDA-graph replay: GPU time without the host's launch costs
            if g is not None:
                gpu[v] = min(gpu.get(v, g), g)
    for v in VARIANTS:
        _set(v)
        peak[v] = hw.peak_mib(step)
    _set("default")
    return us, gpu, peak, flops


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora_passes.py measures a CUDA device; none is available here")
    import triton_ops.lora as tlora

    saved = (tlora.SAVE_XA, tlora.RANK_UPDATE_KERNEL, tlora.FOLD_ADAPTERS)
    ceiling = hw.matmul_tflops()
    rows = []
    try:
        for block in ("qkv", "mlp"):
            us, gpu, peak, flops = measure(block)
            shape = f"M={M} C={C} " + (f"N={NQ}+{NKV}+{NKV}" if block == "qkv" else f"F={F}") + f" R={R} nf4"
            for v in VARIANTS:
                tf = flops / us[v] / 1e6
                d = us[v] - us["default"]
                rows.append({"op": f"lora_{block} fwd+bwd", "shape": shape, "dtype": "bf16", "provider": v,
                             "µs": f"{us[v]:.0f}", "TFLOP/s": f"{tf:.0f}",
                             "% of ceiling": f"{100 * tf / ceiling:.0f}%",
                             "peak MiB": f"{peak[v]:.0f}",
                             "vs default": "—" if v == "default" else f"{d:+.0f} µs ({us['default'] / us[v]:.3f}x)",
                             "GPU-only µs": "—" if v not in gpu else f"{gpu[v]:.0f}",
                             "GPU-only vs default": "—" if v == "default" or not {v, "default"} <= gpu.keys() else
                             f"{gpu[v] - gpu['default']:+.0f} µs ({gpu['default'] / gpu[v]:.3f}x)"})
                print(f"{block} {v}: {us[v]:.0f} us, GPU-only {gpu.get(v)} us, peak {peak[v]:.0f} MiB", flush=True)
    finally:
        tlora.SAVE_XA, tlora.RANK_UPDATE_KERNEL, tlora.FOLD_ADAPTERS = saved
    body = hw.markdown_table(rows, COLUMNS)
    notes = ("\nvs default: µs difference (negative = faster than the default) and default µs / variant µs. "
             "default = SAVE_XA, RANK_UPDATE_KERNEL and FOLD_ADAPTERS on; TFLOP/s over the base GEMMs' work (forward + dx), from "
             "the eager µs. Eager µs are do_bench medians of eager calls, which on a slow host measure launch "
             "costs as much as the GPU; GPU-only µs replay one captured forward + backward (hw.graph_us).\n")
    print(body + notes)
    path = hw.write_results("lora-passes", "triton_ops.lora memory passes (8B QLoRA shapes)",
                            [("Results", body + notes)])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
