"""Multi-GPU scaling of the QLoRA trainer: a Llama-3.1-8B-shaped model (random weights, NF4 base, bf16, LoRA r=16 on
the seven projections, gradient checkpointing on), B sequences of T tokens per GPU per step.

Measured per run: the median step time after warm-up (the slowest rank's), tokens/s over all GPUs, and the peak
memory of the GPU that used the most (``torch.cuda.max_memory_allocated`` from after the model is built, so what
training needs). Rows: 1 GPU; DDP on N GPUs (adapters replicated, gradients summed once per step); FSDP2 on N GPUs
(NF4 bytes, quantization state and adapters sharded, all-gathered per layer). Targets of issue 10: DDP tokens/s
on 2 GPUs >= 1.85x one GPU; FSDP2 peak memory per GPU <= 0.6x one GPU's.

FLOPs counted per token: 4 x (parameters of the 8B shape in the layers run + lm_head): forward 2N plus backward 2N
for the input gradients (the frozen base has no weight gradients); the recomputation of checkpointing and the
attention scores are not counted, so the % of the bf16 matmul ceiling is a lower bound of what the GPU does.

Run (repo root):
  python -m bench.ddp                                   # all three on this machine's GPUs (torchrun started here)
  python -m bench.ddp --mode single                     # 1 GPU only
  torchrun --nproc-per-node 2 -m bench.ddp --mode ddp   # or --mode fsdp; rows merge with the stored ones
Options: --layers 32 (of the 8B's 32), --seq 2048, --batch 2, --steps 8.
Rows are kept in bench/results/.ddp-rows-<card>.json, the table in bench/results/<date>-<card>-ddp.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

WHAT = "ddp"
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "TFLOP/s", "% of ceiling", "peak MiB", "vs best peer"]


SHAPE_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8)
SHAPE_SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def build_model(layers: int, device: torch.device, shape: dict = SHAPE_8B):
    """Random Llama-3.1-8B-shaped model with ``layers`` decoder layers, NF4 projections, LoRA r=16."""
    import quant
    from minitrain.lora import add_lora
    from minitrain.model import LlamaForCausalLM, ModelArgs, rope_inv_freq

    args = ModelArgs(num_hidden_layers=layers, rope_theta=500000.0, max_position_embeddings=8192,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **shape)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 16 GB for 32 layers, never 32 GB of fp32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(args)
    finally:
        torch.set_default_dtype(old)
    model.model.inv_freq = rope_inv_freq(args).to(device)  # fp32 angles (as the loader sets them)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, quant.NF4Linear.from_linear(getattr(parent, n)))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    add_lora(model, r=16, alpha=16)
    C, F, V = args.hidden_size, args.intermediate_size, args.vocab_size
    kv = args.num_key_value_heads * args.head_dim
    params = layers * (C * (C + kv + kv + C) + 3 * C * F) + V * C
    return model, params


def measure(mode: str, layers: int, seq: int, batch: int, steps: int, smoke: bool = False, ckpt: str = "on") -> dict:
    """One run in this process (of a torchrun group for ddp/fsdp); returns the row fields (on every rank).
    ``smoke``: a tiny model on CPU (gloo), to check the script without a GPU."""
    from minitrain import distributed
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer

    kind = "cpu" if smoke else "cuda"
    env = distributed.init_distributed(kind) if mode != "single" else None
    device = env.device if env else torch.device(kind)
    world = env.world_size if env else 1
    shape = SHAPE_SMOKE if smoke else SHAPE_8B
    model, n_params = build_model(layers, device, shape)
    if mode == "fsdp":
        distributed.shard_model(model, env)
    if not smoke:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, shape["vocab_size"], (seq,), generator=g).tolist()}
            for _ in range(batch * steps * world)]
    rows = []
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out, max_steps=steps, learning_rate=1e-4, lr_scheduler_type="constant",
                          per_device_train_batch_size=batch, gradient_accumulation_steps=1, save_steps=0,
                          gradient_checkpointing=ckpt, bf16=not smoke, progress=False, seed=0,
                          # FSDP2 and activation offload run eagerly
                          cuda_graphs="off" if smoke or mode == "fsdp" or ckpt == "offload" else "on")
        tr = Trainer(model, None, data, cfg, callbacks=[lambda t, s, m: rows.append(m)])
        tr.train()
    timed = rows[3:] if len(rows) > 4 else rows[1:]  # the first steps compile, fill caches, capture the graph
    dt = sorted(r["step_time"] for r in timed)[len(timed) // 2]
    tokens = batch * seq * world
    return {"mode": mode, "world": world, "step_s": dt, "tokens_per_s": tokens / dt,
            "peak_mib": max(r["peak_mem_mib"] for r in rows), "tflops_per_gpu": 4 * n_params * batch * seq / dt / 1e12,
            "losses_finite": all(torch.isfinite(torch.tensor([r["loss"] for r in rows])).tolist()),
            "layers": layers, "seq": seq, "batch": batch, "ckpt": ckpt, "env": env}


def table_rows(results: list[dict], ceiling: float) -> list[dict]:
    singles = {r.get("ckpt", "on"): r for r in results if r["mode"] == "single"}
    out = []
    for r in results:
        ckpt = r.get("ckpt", "on")
        name = {"single": "minitrain 1 GPU", "ddp": f"minitrain DDP x{r['world']}",
                "fsdp": f"minitrain FSDP2 x{r['world']}"}[r["mode"]] + (" + activation offload" if ckpt == "offload" else "")
        single = singles.get(ckpt)
        if single is None or r["mode"] == "single":
            vs = "-" if single is not None else f"1-GPU row missing (python -m bench.ddp --mode single --checkpointing {ckpt})"
        elif r["mode"] == "ddp":
            vs = f"{r['tokens_per_s'] / single['tokens_per_s']:.2f}x 1-GPU tokens/s (target >= 1.85 at x2)"
        else:
            vs = f"{r['peak_mib'] / single['peak_mib']:.2f}x 1-GPU peak memory, same settings (target <= 0.6)"
            if ckpt != "on" and "on" in singles:
                vs += f"; {r['peak_mib'] / singles['on']['peak_mib']:.2f}x the 1-GPU default (checkpointing on)"
        out.append({"op": "QLoRA train step", "shape": f"8B-shaped {r['layers']}/32 layers, B={r['batch']}/GPU T={r['seq']}",
                    "dtype": "nf4 + bf16", "provider": name, "µs": f"{r['step_s'] * 1e6:,.0f}",
                    "TFLOP/s": f"{r['tflops_per_gpu']:.1f}/GPU", "% of ceiling": f"{100 * r['tflops_per_gpu'] / ceiling:.0f}%",
                    "peak MiB": f"{r['peak_mib']:,.0f}", "vs best peer": vs,
                    "tokens/s": f"{r['tokens_per_s']:,.0f}", "finite": r["losses_finite"]})
    return out


def report(results: list[dict], smoke: bool = False) -> None:
    from bench.hw import markdown_table, matmul_tflops, write_results

    ceiling = 1.0 if smoke else matmul_tflops()
    rows = table_rows(results, ceiling)
    cols = COLUMNS + ["tokens/s"]
    print(markdown_table(rows, cols))
    if smoke:
        return
    note = ("Peers: none measured (no other trainer in this bench). µs: median step time of the slowest rank; "
            "TFLOP/s counts 4 x params x tokens per GPU (no recompute, no attention scores); peak MiB: the largest "
            "per-GPU peak from after the model was built. Losses finite in every run: "
            f"{all(r['finite'] for r in rows)}.\n")
    path = write_results(WHAT, "Multi-GPU QLoRA training: DDP scaling and FSDP2 memory (minitrain trainer)",
                         [("8B-shaped QLoRA step", markdown_table(rows, cols) + "\n" + note)])
    print(f"written: {path}")


def _store(result: dict, only: bool = False) -> list[dict]:
    """Merge this run's row into the stored rows (``only``: drop the others, so no stale row is reported)."""
    from bench.hw import load_rows, save_rows

    keep = {k: v for k, v in result.items() if k != "env"}
    same = lambda r: (r.get("mode"), r.get("ckpt", "on")) == (keep["mode"], keep["ckpt"])  # noqa: E731
    rows = [r for r in ([] if only else load_rows(WHAT)) if not same(r)] + [keep]
    rows.sort(key=lambda r: (r.get("ckpt", "on") != "on", ["single", "ddp", "fsdp"].index(r["mode"])))
    save_rows(WHAT, rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("all", "single", "ddp", "fsdp"), default="all")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--checkpointing", choices=("on", "offload"), default="on",
                   help="gradient checkpointing mode of every run (offload: layer inputs kept on the host)")
    p.add_argument("--nproc", type=int, default=None, help="GPUs for --mode all (default: all visible)")
    p.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks the script, measures nothing")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.smoke:
        raise SystemExit("bench.ddp measures CUDA GPUs; none is available here")
    from minitrain import distributed

    if distributed.launched_by_torchrun():
        if a.mode not in ("ddp", "fsdp"):
            raise SystemExit("under torchrun use --mode ddp or --mode fsdp")
        res = measure(a.mode, a.layers, a.seq, a.batch, a.steps, a.smoke, a.checkpointing)
        main_rank = res["env"] is None or res["env"].is_main
        distributed.shutdown()
        if main_rank:
            report(_store(res) if not a.smoke else [res], a.smoke)
        return 0
    if a.smoke and a.mode != "single":
        raise SystemExit("--smoke: use --mode single, or torchrun ... --mode ddp|fsdp --smoke")
    if a.mode in ("all", "single"):
        res = measure("single", a.layers, a.seq, a.batch, a.steps, a.smoke, a.checkpointing)
        if a.smoke:
            report([res], smoke=True)
            return 0
        rows = _store(res, only=a.mode == "all")
        del res
        if a.mode == "single":
            report(rows)
            return 0
    if a.mode in ("ddp", "fsdp"):
        raise SystemExit("--mode ddp/fsdp runs under torchrun: torchrun --nproc-per-node N -m bench.ddp --mode ddp")
    import gc

    gc.collect()  # the 1-GPU model must leave GPU 0 before the torchrun ranks start
    torch.cuda.empty_cache()
    n = a.nproc or torch.cuda.device_count()
    if n < 2:
        print(f"only {n} GPU visible: DDP/FSDP2 rows not measured")
        report(rows)
        return 0
    for mode in ("ddp", "fsdp"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
               str(29400 + os.getpid() % 500), "-m", "bench.ddp", "--mode", mode, "--layers", str(a.layers),
               "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps), "--checkpointing", a.checkpointing]
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, timeout=420).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        print(f"{mode} on {n} GPUs: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    from bench.hw import load_rows

    report(load_rows(WHAT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
