"""End-to-end QLoRA training step on a Llama-3.1-8B-shaped model: minitrain against its peers (issue 9).

Workload (the same for every row): a random-weight Llama-3.1-8B-shaped checkpoint (C=4096, F=14336, 32 layers,
H=32, KV=8, V=128256, rope_theta 500000, llama3 rope scaling, untied lm_head, bf16) written once as sharded
safetensors; LoRA r=16, alpha=16 on all seven projections; batch B x T random token ids, labels = ids (every
token trained, mean over the B*(T-1) predicted tokens); bf16 autocast; gradient clipping at 1.0; torch AdamW
(fused), lr 1e-4, one optimizer step per micro-batch; gradient checkpointing in each framework's default form.

Rows (each in a fresh subprocess, so peak memory is per row and unsloth's patches stay in its own process):
  * ours / ours-16bit / ours-offload: minitrain.load_model(load_in_4bit=True / False), add_lora, checkpointing
    "on" ("offload" keeps the layer inputs in pinned host memory), a tight loop of the Trainer's math
    (token_loss_sum / n through the fused linear cross-entropy, clip, fused AdamW) rather than Trainer itself;
    the -graph rows replay forward + backward from one CUDA graph (minitrain.cuda_graphs), as the Trainer does;
  * peft-bnb / peft-16bit: transformers LlamaForCausalLM.from_pretrained (BitsAndBytesConfig nf4, double quant,
    bf16 compute / plain bf16), gradient_checkpointing_enable(use_reentrant=False), peft LoRA; loss =
    model(input_ids, labels=input_ids).loss;  peft-bnb-liger / peft-16bit-liger: the same after
    liger_kernel's apply_liger_kernel_to_llama (rope, rms_norm, swiglu, fused linear cross-entropy);
  * unsloth / unsloth-16bit: FastLanguageModel.from_pretrained + get_peft_model(use_gradient_checkpointing=
    "unsloth"), its model's loss; only run when this bench is started with PEERS_UNSLOTH=1 (see PEERS.md).

Timing: ``--warmup`` steps, then ``--steps`` timed steps, CUDA events around forward + backward + clip +
optimizer step, then a synchronize (as the Trainer's loss.item() does); median. tokens/s = B*T / median.
Peak = torch.cuda.max_memory_allocated / max_memory_reserved from after the model, adapters and optimizer
were built (warm-up + timed steps); the load peak is kept in the cached JSON. TFLOP/s counts the useful work
without recomputation: 4 * (linear params incl. lm_head) + 6 * layers * C * T FLOPs per token (forward, and
backward to the activations only: the base weights are frozen; LoRA FLOPs, ~1%, not counted).

``--longest ROWS``: the longest sequence that trains one step at batch 1, each probe a fresh process; the
next probe is extrapolated from the peak memory of passing probes (else doubled / bisected) at a granularity
of ``--longest-step`` tokens; probes are cached, so repeated invocations continue the search.
``--longest-cap-gib G`` runs that search with every probe's device memory limited to G GiB (torch's
``set_per_process_memory_fraction``, the same limit for every row): on a large card the uncapped limit lies
at several hundred thousand tokens, where one step takes minutes of attention alone and host memory for
offloaded activations can bind first; a common cap compares the rows' memory per token at affordable lengths.
Capped and uncapped searches are cached apart.
``--profile [ROW]``: that row (default ours) under torch.profiler for 2 steps after warm-up: kernel time by
kind (GEMM, attention, NF4 dequantize, ...), top kernels by GPU time, top ops, and GPU-busy vs wall time per
step (kernels replayed from a CUDA graph are reported one by one). The table ends with the compute stream's idle holes (no kernel
but copies running) by the kernels around them; ``$BENCH_TIMELINE=path`` also writes 8 ms of the device timeline
(name, stream, start, end µs) there as JSON.

Results accumulate across invocations in ``bench/results/.train-rows-<card>.json`` (``--cache``) and every
invocation rewrites ``bench/results/<date>-<card>-train.md`` with all cached rows.

Run: ``python -m bench.train --rows ours,peft-bnb,peft-bnb-liger --seq 2048`` (``--budget-s``, default 540)
     ``PEERS_UNSLOTH=1 python -m bench.train --rows unsloth,unsloth-16bit --seq 2048`` (after
     ``PEERS_UNSLOTH=1 source .whl/install.sh``);  CPU smoke run: ``python -m bench.train --tiny``.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR, CLIP = 16, 16, 1e-4, 1.0
# impl: which framework; quant: NF4 base weights; gc: our checkpointing mode; cuda: cannot run without CUDA.
ROWS = {
    "ours": dict(impl="ours", quant=True, gc="on", cuda=False),
    "ours-16bit": dict(impl="ours", quant=False, gc="on", cuda=False),
    "ours-offload": dict(impl="ours", quant=True, gc="offload", cuda=False),
    "ours-graph": dict(impl="ours", quant=True, gc="on", graph=True, cuda=True),
    "ours-16bit-graph": dict(impl="ours", quant=False, gc="on", graph=True, cuda=True),
    "ours-offload-graph": dict(impl="ours", quant=True, gc="offload", graph=True, cuda=True),
    # TrainConfig(offload_embeddings=True): the input embedding in pinned host memory; keep_mlp_layers=N: the last
    # N layers' MLP activations kept on the device (no recomputation)
    "ours-offload-graph-emb": dict(impl="ours", quant=True, gc="offload", graph=True, cuda=True, emb=True),
    "ours-offload-graph-keep4": dict(impl="ours", quant=True, gc="offload", graph=True, cuda=True, emb=True,
                                     keep_mlp=4),
    "ours-offload-graph-keep5": dict(impl="ours", quant=True, gc="offload", graph=True, cuda=True, emb=True,
                                     keep_mlp=5),
    "ours-16bit-offload-graph": dict(impl="ours", quant=False, gc="offload", graph=True, cuda=True),
    # the Trainer's default: keep_mlp_layers="auto" (as many kept as fit in 85% of the card, decided from a measured
    # first step); -7g: the same within max_memory_gib=7.0, with the input embedding on the host
    "ours-offload-graph-auto": dict(impl="ours", quant=True, gc="offload", graph=True, cuda=True, keep_mlp="auto"),
    "ours-16bit-offload-graph-auto": dict(impl="ours", quant=False, gc="offload", graph=True, cuda=True,
                                          keep_mlp="auto"),
    "ours-offload-graph-7g": dict(impl="ours", quant=True, gc="offload", graph=True, cuda=True, emb=True,
                                  keep_mlp="auto", max_gib=7.0),
    "peft-bnb": dict(impl="hf", quant=True, liger=False, cuda=False),  # bitsandbytes 0.50 runs NF4 on CPU too
    "peft-bnb-liger": dict(impl="hf", quant=True, liger=True, cuda=True),
    "peft-16bit": dict(impl="hf", quant=False, liger=False, cuda=False),
    "peft-16bit-liger": dict(impl="hf", quant=False, liger=True, cuda=True),
    "unsloth": dict(impl="unsloth", quant=True, cuda=True),
    "unsloth-16bit": dict(impl="unsloth", quant=False, cuda=True),
}
NOTES = {"ours": "tight loop of the Trainer's math: token_loss_sum/n (fused linear CE), clip 1.0, fused AdamW",
         "ours-graph": "the same math, forward + backward replayed from one CUDA graph (minitrain.cuda_graphs)",
         "hf": "model(ids, labels=ids).loss, clip 1.0, fused AdamW",
         "unsloth": "model(ids, labels=ids).loss, clip 1.0, fused AdamW; gc 'unsloth'"}
VERSION_DISTS = ("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth",
                 "unsloth_zoo", "accelerate", "safetensors")
COLUMNS = ["row", "quant", "seq", "batch", "tok/s", "step ms", "TFLOP/s", "% of ceiling", "peak alloc GiB",
           "peak reserved GiB", "vs unsloth", "note"]
TARGET_TOK_S, TARGET_GIB = 13000, 7.0


# ---- the model shape and its random checkpoint ------------------------------------------------------------

def model_config(tiny: bool, layers: int) -> dict:
    """config.json (transformers 4.x keys) of the Llama-3.1-8B shape, or of the tiny CPU smoke-test shape."""
    if tiny:
        shape = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072)
    else:
        shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192},
            "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": "bfloat16", "transformers_version": "4.46.0"}


def model_tag(cfg: dict) -> str:
    """Cache key of a model shape: 'llama3.1-8b-L32' or 'tiny-L1'."""
    return f"{'tiny' if cfg['hidden_size'] < 1024 else 'llama3.1-8b'}-L{cfg['num_hidden_layers']}"


def flops_per_token(cfg: dict, T: int) -> float:
    """Useful FLOPs per trained token without recomputation: forward 2P + backward-to-activations 2P over the
    frozen linear weights (projections and lm_head), plus causal attention 2TC forward + 4TC backward per layer."""
    C, F, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    D, H, KV = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = C * (H * D) * 2 + C * (KV * D) * 2 + 3 * C * F  # q, o, k, v, gate, up, down
    return 4.0 * (L * per_layer + C * V) + 6.0 * L * (H * D) * T


def checkpoint_tensors(cfg: dict):
    """[(shard file, [(name, shape, kind)])]: embeddings, layers in groups of 4, then norm + lm_head."""
    C, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    groups = [[("model.embed_tokens.weight", (V, C), "w")]]
    for i0 in range(0, L, 4):
        g = []
        for i in range(i0, min(L, i0 + 4)):
            p = f"model.layers.{i}."
            g += [(p + "input_layernorm.weight", (C,), "norm"), (p + "post_attention_layernorm.weight", (C,), "norm"),
                  (p + "self_attn.q_proj.weight", (q, C), "w"), (p + "self_attn.k_proj.weight", (kv, C), "w"),
                  (p + "self_attn.v_proj.weight", (kv, C), "w"), (p + "self_attn.o_proj.weight", (C, q), "w"),
                  (p + "mlp.gate_proj.weight", (F, C), "w"), (p + "mlp.up_proj.weight", (F, C), "w"),
                  (p + "mlp.down_proj.weight", (C, F), "w")]
        groups.append(g)
    groups.append([("model.norm.weight", (C,), "norm"), ("lm_head.weight", (V, C), "w")])
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_tokenizer(d: Path) -> None:
    """A small word-level tokenizer (the model's vocabulary stays as configured): unsloth's and transformers'
    from_pretrained want one beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>"]
    words = "the a of to and in is it you that was for on are with as his they be at one have this".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 131072}))


def checkpoint_complete(d: Path, cfg: dict) -> bool:
    try:
        if json.loads((d / "config.json").read_text()) != cfg:
            return False
        wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    except (OSError, ValueError, KeyError):
        return False
    return all((d / f).is_file() for f in set(wm.values())) and (d / "tokenizer.json").is_file()


def write_checkpoint(d: Path, cfg: dict, device) -> float:
    """Random bf16 weights (N(0, 0.02), norms 1), generated on ``device`` one shard at a time, written to a
    temporary directory that is renamed when complete. Returns seconds taken (0 when already present)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    if checkpoint_complete(d, cfg):
        return 0.0
    t0 = time.perf_counter()
    for stale in d.parent.glob(f"{d.name}.tmp-*"):  # left by a writer that was killed (16 GB each at 8B)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = d.parent / f"{d.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, total = {}, 0
    for fname, group in checkpoint_tensors(cfg):
        shard = {}
        for name, shape, kind in group:
            if kind == "norm":
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            shard[name] = t.cpu().contiguous()
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        del shard
        print(f"  wrote {fname}", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
    write_tokenizer(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return time.perf_counter() - t0


# ---- one row, inside its own process -------------------------------------------------------------------

def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in VERSION_DISTS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_ours(spec, device, dtype):
    """minitrain: our loader (NF4 on the fly), adapters, checkpointing; loss as the Trainer computes it."""
    from minitrain import add_lora, load_model
    from minitrain.lora import lora_parameters
    from minitrain.trainer import set_gradient_checkpointing, token_loss_sum

    model, _ = load_model(spec["ckpt"], max_seq_length=spec["seq"], dtype=dtype, load_in_4bit=spec["quant"],
                          device=device, tokenizer=False)
    add_lora(model, r=R, alpha=ALPHA, target_modules=SEVEN)
    policy = set_gradient_checkpointing(model, spec["gc"], spec.get("keep_mlp"), spec.get("emb"), spec.get("max_gib"))
    model.train()
    params = [p for _, p in lora_parameters(model)]

    def loss_fn(ids):
        batch = {"input_ids": ids, "labels": ids}
        return token_loss_sum(model, batch) / (ids.shape[0] * (ids.shape[1] - 1))  # sum / n trained tokens

    if spec.get("graph"):
        from minitrain.cuda_graphs import GraphedLoss

        graphed = GraphedLoss(model, spec["batch"], spec["seq"], warmup=2)
        if policy is not None:
            policy.graphs_only = True  # as the Trainer: only the capture keeps layers

        def loss_fn(ids):  # noqa: F811 - forward and backward, from the graph after two eager calls
            return graphed({"input_ids": ids, "labels": ids}, ids.shape[0] * (ids.shape[1] - 1))

        loss_fn.does_backward = True
        loss_fn.keep_policy = policy
        keep = spec.get("keep_mlp")
        budget = f", max_memory_gib={spec['max_gib']}" if spec.get("max_gib") else ""
        return params, loss_fn, (NOTES["ours-graph"] + ("; offload_embeddings=True" if spec.get("emb") else "")
                                 + (f"; keep_mlp_layers={keep!r}{budget}" if keep else ""))
    loss_fn.keep_policy = policy
    return params, loss_fn, ""


def bnb_quantize_projections(model, dtype, device) -> None:
    """Replace the seven projections of a bf16 transformers Llama by bitsandbytes Linear4bit (nf4, double
    quant): the way bench/lora.py builds its peft + bnb layers, used when from_pretrained cannot quantize."""
    import bitsandbytes as bnb

    for mod in list(model.modules()):
        for name in SEVEN:
            lin = getattr(mod, name, None)
            if lin is None or type(lin).__name__ != "Linear":
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
            setattr(mod, name, q.to(device))  # moving to the GPU quantizes
            del lin


def build_hf(spec, device, dtype):
    """transformers + peft (+ bitsandbytes NF4) (+ liger-kernel), the usual QLoRA recipe."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Patches transformers' Llama classes, so it comes before the model is built.
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
    if spec["quant"]:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda":
        kw["device_map"] = {"": torch.cuda.current_device()}
    note = ""
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(spec["ckpt"], **kw)
    except Exception as e:  # noqa: BLE001 - the same layers built by hand instead, and said so in the table
        if "quantization_config" not in kw:
            raise
        print(f"from_pretrained with BitsAndBytesConfig failed ({type(e).__name__}: {str(e)[:200]}); quantizing "
              "the bf16 model's projections with bnb.nn.Linear4bit instead", flush=True)
        kw.pop("quantization_config")
        model = transformers.LlamaForCausalLM.from_pretrained(spec["ckpt"], **kw)
        bnb_quantize_projections(model, dtype, device)
        torch.cuda.empty_cache()
        note = "bnb layers built by hand (from_pretrained + BitsAndBytesConfig failed)"
    if device.type != "cuda":
        model.to(device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=SEVEN,
                                             bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return params, lambda ids: model(input_ids=ids, labels=ids).loss, note


def build_unsloth(spec, device, dtype):
    """unsloth's FastLanguageModel with its own gradient checkpointing and loss."""
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    from unsloth import FastLanguageModel

    kw = {}
    if not spec["quant"] and "load_in_16bit" in inspect.signature(FastLanguageModel.from_pretrained).parameters:
        kw["load_in_16bit"] = True  # 2026 releases: an explicit 16-bit LoRA request
    model, _ = FastLanguageModel.from_pretrained(model_name=spec["ckpt"], max_seq_length=spec["seq"], dtype=dtype,
                                                 load_in_4bit=spec["quant"], **kw)
    model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=ALPHA, lora_dropout=0, target_modules=SEVEN,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    if hasattr(FastLanguageModel, "for_training"):
        FastLanguageModel.for_training(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(ids):
        return model(input_ids=ids, labels=ids).loss

    loss_fn.model = model  # bench/trainer.py trains it on its own batches
    return params, loss_fn, ""


BUILDERS = {"ours": build_ours, "hf": build_hf, "unsloth": build_unsloth}


# Kernel kinds for the profile summary: the first pattern found (lower case) in the kernel's name
KERNEL_KINDS = (("memcpy", ("memcpy", "memset")), ("attention", ("sdpa", "flash", "fmha", "attn")),
                ("gemm (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma", "sm90_")),
                ("nf4 dequantize / matmul", ("nf4",)), ("rms_norm", ("rms_norm",)), ("rope", ("rope",)),
                ("swiglu", ("swiglu",)), ("cross-entropy", ("_ce_", "cross_entropy", "flce", "_scale_kernel")),
                ("lora (Triton)", ("lora", "rank_update")), ("optimizer", ("adam", "multi_tensor", "foreach")),
                ("elementwise / copy (torch)", ("elementwise", "copy_kernel", "reduce_kernel", "fill")))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pats in KERNEL_KINDS if any(p in low for p in pats)), "other")


def profile_steps(step, batches, device, steps: int = 2) -> dict:
    """Run ``steps`` steps under torch.profiler: top kernels (GPU time), top ops (inclusive GPU time, or CPU
    time without CUDA), and GPU-busy vs host wall time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=acts) as prof:
        for ids in batches[:steps]:
            t0 = time.perf_counter()
            step(ids)
            if cuda:
                torch.cuda.synchronize()
            walls.append(1e3 * (time.perf_counter() - t0))
    avgs = prof.key_averages()

    def dev_us(e, self_=True):
        for a in (("self_device_time_total", "self_cuda_time_total") if self_ else
                  ("device_time_total", "cuda_time_total")):
            if hasattr(e, a):
                return float(getattr(e, a))
        return 0.0

    def on_device(e):
        return "CUDA" in str(getattr(e, "device_type", ""))

    kernels = sorted((e for e in avgs if on_device(e) and dev_us(e) > 0), key=dev_us, reverse=True)
    busy_ms = sum(dev_us(e) for e in kernels) / 1e3 / steps
    wall_ms = statistics.median(walls)
    kinds = collections.Counter()
    for e in kernels:
        kinds[kernel_kind(e.key)] += dev_us(e) / 1e3 / steps
    if cuda:
        top = [{"name": e.key, "calls": e.count // steps, "ms": dev_us(e) / 1e3 / steps} for e in kernels[:40]]
        ops = sorted((e for e in avgs if not on_device(e) and dev_us(e, False) > 0), key=lambda e: dev_us(e, False),
                     reverse=True)
        top_ops = [{"name": e.key, "calls": e.count // steps, "ms": dev_us(e, False) / 1e3 / steps} for e in ops[:15]]
    else:  # no GPU: the ops by self CPU time, so the table (and this code) still gets exercised
        ops = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)
        top = [{"name": e.key, "calls": e.count // steps, "ms": e.self_cpu_time_total / 1e3 / steps} for e in ops[:25]]
        top_ops = []
    host_ms = sum(e.self_cpu_time_total for e in avgs) / 1e3 / steps
    # where the host's time goes (an eager step is host-bound when wall >> GPU busy): ops by self CPU time,
    # CUDA runtime calls (kernel launches) included
    by_host = sorted((e for e in avgs if not on_device(e)), key=lambda e: e.self_cpu_time_total, reverse=True)
    host_ops = [{"name": e.key, "calls": e.count // steps, "ms": e.self_cpu_time_total / 1e3 / steps,
                 "us_per_call": e.self_cpu_time_total / max(e.count, 1)} for e in by_host[:20]]
    events = prof.events() if cuda else []
    gaps = idle_gaps(events, steps) if cuda else None
    if cuda and os.environ.get("BENCH_TIMELINE"):  # $BENCH_TIMELINE=path: 8 ms of the device timeline as JSON
        dev = sorted((e for e in events if on_device(e)), key=lambda e: e.time_range.start)
        t0 = dev[len(dev) // 3].time_range.start if dev else 0
        Path(os.environ["BENCH_TIMELINE"]).write_text(json.dumps(
            [[e.name[:80], getattr(e, "device_resource_id", None), round(e.time_range.start - t0, 1),
              round(e.time_range.end - t0, 1)] for e in dev if 0 <= e.time_range.start - t0 < 8000]))
    return {"steps": steps, "wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "host_op_ms": host_ms, "kernels": top,
            "kinds": [{"kind": k, "ms": v} for k, v in kinds.most_common()],
            "ops": top_ops, "host_ops": host_ops, "timed": "cuda" if cuda else "cpu", "gaps": gaps}


def idle_gaps(events, steps: int, top: int = 15) -> dict:
    """Where no compute kernel runs: the union of the device intervals of all kernels except copies and memsets
    (any stream), its holes between the first and the last kernel, and the largest holes with the kernels
    around them, summed over holes with the same neighbours. A hole that ends within 5 µs of a copy's end
    counts as waiting on that copy (``copy_wait_ms``): the kernel after it depended on a host<->device copy.
    ``events``: objects with ``name``, ``device_type`` and ``time_range.start/end`` in µs (torch.profiler's
    FunctionEvents)."""
    dev = [e for e in events if "CUDA" in str(getattr(e, "device_type", "")) and e.time_range.end > e.time_range.start]
    copy_ends = sorted(e.time_range.end for e in dev if e.name.startswith("Memcpy"))
    iv = sorted((e.time_range.start, e.time_range.end, e.name) for e in dev
                if not e.name.startswith(("Memcpy", "Memset")))
    holes = collections.defaultdict(lambda: [0, 0.0])
    idle = copy_wait = 0.0
    end = prev = None
    for s, e, name in iv:
        if end is not None and s > end:
            idle += s - end
            h = holes[(prev[:60], name[:60])]
            h[0] += 1
            h[1] += s - end
            i = bisect.bisect_right(copy_ends, s)
            if i and copy_ends[i - 1] >= max(end, s - 5.0):
                copy_wait += s - end
        if end is None or e > end:
            end, prev = e, name
    worst = sorted(holes.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    return {"idle_ms": idle / 1e3 / steps, "copy_wait_ms": copy_wait / 1e3 / steps,
            "holes": [{"after": a, "before": b, "count": c, "ms": t / 1e3 / steps} for (a, b), (c, t) in worst]}


def run_row(spec: dict) -> dict:
    """Build the row's model, warm up, time ``steps`` steps; a dict of numbers for the parent."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    out = {"ok": False, "versions": versions(), "card": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        out["total_gib"] = torch.cuda.mem_get_info()[1] / 2**30
        cap = spec.get("cap_gib")
        if cap:  # the same device-memory limit for every row: torch's allocator refuses to reserve beyond it
            if cap > out["total_gib"]:
                raise ValueError(f"--longest-cap-gib {cap} is more than the card's {out['total_gib']:.1f} GiB")
            torch.cuda.set_per_process_memory_fraction(cap / out["total_gib"])
            out["total_gib"] = out["cap_gib"] = cap
    t0 = time.perf_counter()
    params, loss_fn, out["note"] = BUILDERS[spec["impl"]](spec, device, dtype)
    opt = torch.optim.AdamW(params, lr=LR, fused=cuda)
    out["load_s"] = time.perf_counter() - t0
    out["trainable"] = sum(p.numel() for p in params)
    if cuda:
        torch.cuda.synchronize()
        out["load_peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["load_peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        torch.cuda.reset_peak_memory_stats()

    graphed = getattr(loss_fn, "does_backward", False)

    def step(ids):
        if graphed:  # gradients land in fixed .grad tensors: zero them, never drop them
            loss = loss_fn(ids)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
                loss = loss_fn(ids)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=not graphed)
        return loss.detach()

    B, T, V = spec["batch"], spec["seq"], spec["vocab"]
    n_warm, n_timed = spec["warmup"], spec["steps"]
    gen = torch.Generator().manual_seed(1234)  # the same token ids for every row
    batches = [torch.randint(0, V, (B, T), generator=gen).to(device) for _ in range(n_warm + max(n_timed, 2))]
    losses, ms, host_ms = [], [], []
    policy = getattr(loss_fn, "keep_policy", None)
    prior = [0, 0]  # peaks (allocated, reserved) that the measured steps reset
    for i in range(n_warm + n_timed):
        ids = batches[i]
        h0 = time.perf_counter()
        # keep_mlp_layers="auto": the first two steps (eager, none kept) are measured, as in the Trainer
        measured = policy is not None and not policy.calibrated and cuda
        if measured:  # ours rows only: importing minitrain sets cuBLAS's workspace, which the peers keep as is
            from minitrain.trainer import StepMemory

        mem = StepMemory(device) if measured else nullcontext()
        with mem:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            loss = step(ids)
            if cuda:
                end.record()
                torch.cuda.synchronize()
        if measured:
            prior = [max(prior[0], mem.prior_peak), max(prior[1], mem.prior_reserved)]
            policy.calibrate(mem, ids.numel())
            if policy.calibrated:
                out["keep_mlp_layers"] = policy.decide(ids.numel())
                out["note"] += f" (kept: {out['keep_mlp_layers']})"
                print("  " + policy.describe(ids.numel()), flush=True)
        wall = 1e3 * (time.perf_counter() - h0)
        losses.append(float(loss))
        if i >= n_warm:
            ms.append(start.elapsed_time(end) if cuda else wall)
            host_ms.append(wall)
        print(f"  step {i + 1}/{n_warm + n_timed}{' (warm-up)' if i < n_warm else ''}: loss {losses[-1]:.4f}, "
              f"{wall:.1f} ms", flush=True)
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"non-finite loss: {losses}")
    med = statistics.median(ms)
    out.update(ok=True, step_ms=med, step_ms_all=ms, host_step_ms=statistics.median(host_ms),
               tok_s=B * T / (med / 1e3), loss_first=losses[0], loss_last=losses[-1], losses=losses)
    if cuda:
        out["peak_alloc_gib"] = max(torch.cuda.max_memory_allocated(), prior[0]) / 2**30
        out["peak_reserved_gib"] = max(torch.cuda.max_memory_reserved(), prior[1]) / 2**30
    if spec.get("profile"):
        out["profile"] = profile_steps(step, batches[n_warm:], device)
    out["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")  # unsloth's import sets its own
    return out


def child_main(spec: dict, result: Path) -> None:
    """Entry point of a row's process: the JSON result always gets written, an error as an error cell."""
    try:
        if spec["kind"] == "prepare":
            import torch

            cuda = torch.cuda.is_available()
            dev = torch.device("cuda" if cuda else "cpu")
            secs = write_checkpoint(Path(spec["ckpt"]), spec["config"], dev)
            from bench.hw import card_slug

            out = {"ok": True, "cuda": cuda, "card_slug": card_slug(), "write_s": secs}
        else:
            out = run_row(spec)
    except BaseException as e:  # noqa: BLE001 - every failure becomes a table cell in the parent
        import torch

        from bench.hw import error_cell

        msg = str(e).lower()  # unsloth and cuBLAS report some allocation failures as other errors
        oom = isinstance(e, torch.OutOfMemoryError) or any(
            k in msg for k in ("out of memory", "alloc_failed", "cudaerrormemoryallocation"))
        out = {"ok": False, "oom": oom, "error": "OOM" if oom else error_cell(e)}
        if oom:
            import traceback

            traceback.print_exception(e)
    result.write_text(json.dumps(out))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is written: skip interpreter teardown (seconds for transformers/triton/unsloth)


# ---- the parent: subprocesses, the longest-sequence search, the cache and the table -------------------------

def child_env(unsloth: bool, expandable: bool = False) -> dict:
    """The environment of a row's process: unsloth's wheels only on the path of unsloth's own rows (importing
    it patches transformers/peft), offline hub."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if expandable:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not unsloth:
        paths = [p for p in paths if not os.path.isdir(os.path.join(p, "unsloth"))]
        env.pop("PEERS_UNSLOTH", None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in paths if p != root])
    return env


def spawn(spec: dict, timeout: float, label: str, module: str = "bench.train") -> dict:
    """Run one child (``python -m <module> --child SPEC``) in its own process group, echoing its output with
    a prefix; on timeout the whole group is killed (compile workers too, so no GPU memory stays held)."""
    import signal

    with tempfile.TemporaryDirectory() as td:
        res = Path(td) / "result.json"
        cmd = [sys.executable, "-m", module, "--child", json.dumps(spec), "--result", str(res)]
        t0 = time.perf_counter()
        env = child_env(spec.get("impl") == "unsloth", spec.get("expandable", False))
        root = str(Path(__file__).resolve().parent.parent)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True, cwd=root)
        tail = collections.deque(maxlen=15)

        def pump():
            for line in proc.stdout:
                tail.append(line.rstrip())
                print(f"  [{label}] {line.rstrip()}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(5)
            return {"ok": False, "timeout": True, "error": f"timed out after {timeout:.0f} s"}
        reader.join(5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group (workers), if any
        except (ProcessLookupError, PermissionError):
            pass
        if res.is_file():
            out = json.loads(res.read_text())
        else:
            last = next((l for l in reversed(tail) if l.strip()), "")
            out = {"ok": False, "error": f"failed: exit code {proc.returncode}: {last[:120]}"}
        out["wall_s"] = time.perf_counter() - t0
        return out


def next_probe(probes: dict, lo_bound: int, hi_bound: int, step: int, start: int):
    """The next sequence length to probe, or None when the search is done.

    ``probes``: {seq: {"ok": bool, "peak_reserved_gib": ..., "total_gib": ...}}. The answer lies between the
    longest pass and the shortest failure above it. With two passes, peak memory is fitted as a + b*T (it is
    close to linear in T with flash attention) and the lengths that fill 97% and 101% of the card are tried to
    bracket the limit; otherwise the first probe is ``start``, then doubling; then bisection.
    """
    passes = sorted(T for T, p in probes.items() if p["ok"])
    lo = passes[-1] if passes else 0
    fails = sorted(T for T, p in probes.items() if not p["ok"] and T > lo)
    hi = fails[0] if fails else hi_bound + step
    if hi - lo <= step or lo >= hi_bound:
        return None
    cands = []
    if not passes:
        cands.append(start)
    fit = [(T, probes[T]["peak_reserved_gib"]) for T in passes if probes[T].get("peak_reserved_gib")]
    total = next((p["total_gib"] for p in probes.values() if p.get("total_gib")), None)
    if len(fit) >= 2 and total:
        (t1, m1), (t2, m2) = fit[-2], fit[-1]
        b = (m2 - m1) / (t2 - t1)
        if b > 0:
            full = (total - (m2 - b * t2)) / b  # the T whose predicted peak is the whole card
            cands += [0.97 * full, 1.01 * full + step]
    cands.append(2 * lo if passes and not fails else (lo + hi) / 2)
    for c in cands:
        c = min(int(c) // step * step, hi_bound)
        if lo < c < hi and c not in probes:
            return c
    return None


def fmt(x, spec=",.0f", none="—"):
    return none if x is None else format(x, spec)


def render(records: list, tflops: float | None) -> list[tuple[str, str]]:
    """The results file's sections from the cached records."""
    sections = []
    rows = [r for r in records if r["kind"] == "row"]
    for tag in sorted({r["model"] for r in rows}, reverse=True):
        group = sorted((r for r in rows if r["model"] == tag),
                       key=lambda r: (r["seq"], r["batch"], list(ROWS).index(r["row"]) if r["row"] in ROWS else 99))
        out, target = [], []
        for r in group:
            res = r["result"]
            info = ROWS.get(r["row"], {})
            line = {"row": r["row"], "quant": "nf4" if info.get("quant") else "bf16", "seq": r["seq"],
                    "batch": r["batch"]}
            if not res.get("ok"):
                line.update({"tok/s": res.get("error", "failed"), "note": res.get("note", "")})
                out.append(line)
                continue
            uns_name = "unsloth" if info.get("quant") else "unsloth-16bit"
            uns = next((u["result"] for u in group if u["row"] == uns_name and u["seq"] == r["seq"]
                        and u["batch"] == r["batch"] and u["result"].get("ok")), None)
            tf = res["tok_s"] * r["flops_per_token"] / 1e12
            note = NOTES.get(info.get("impl"), "")
            if info.get("impl") == "ours":
                note += f"; gc '{info.get('gc')}'"
            if res.get("note"):
                note += f"; {res['note']}"
            if res.get("alloc_conf"):
                note += f"; PYTORCH_CUDA_ALLOC_CONF={res['alloc_conf']}"
            line.update({"tok/s": fmt(res["tok_s"]), "step ms": fmt(res["step_ms"], ".1f"), "TFLOP/s": fmt(tf, ".0f"),
                         "% of ceiling": f"{100 * tf / tflops:.0f}%" if tflops else "—",
                         "peak alloc GiB": fmt(res.get("peak_alloc_gib"), ".2f"),
                         "peak reserved GiB": fmt(res.get("peak_reserved_gib"), ".2f"),
                         "vs unsloth": f"{res['tok_s'] / uns['tok_s']:.2f}x" if uns else "—",
                         "note": note + (f"; loss {res['loss_first']:.3f} → {res['loss_last']:.3f}"
                                         if "loss_first" in res else "")
                                 + (f"; {len(res['step_ms_all'])} timed steps" if "step_ms_all" in res else "")
                                 + (f"; load {res['load_s']:.0f} s" if "load_s" in res else "")
                                 + (f", load peak {res['load_peak_alloc_gib']:.2f} GiB"
                                    if res.get("load_peak_alloc_gib") else "")})
            out.append(line)
            if (r["row"] in ("ours", "ours-graph") or r["row"].startswith("ours-offload-graph")) and \
                    r["seq"] == 2048 and r["batch"] == 2:
                met = res["tok_s"] >= TARGET_TOK_S and (res.get("peak_alloc_gib") or 1e9) <= TARGET_GIB
                target.append(f"- Target (issue 9): ≥ {TARGET_TOK_S:,} tok/s at ≤ {TARGET_GIB} GiB peak for {r['row']}, "
                              f"NF4, B=2 T=2048: measured {res['tok_s']:,.0f} tok/s at "
                              f"{fmt(res.get('peak_alloc_gib'), '.2f')} GiB allocated "
                              f"({fmt(res.get('peak_reserved_gib'), '.2f')} GiB reserved): "
                              f"{'met' if met else 'not met'}.")
        if not target:
            target.append(f"- Target (issue 9): ≥ {TARGET_TOK_S:,} tok/s at ≤ {TARGET_GIB} GiB peak for ours, NF4, "
                          "B=2 T=2048 (not measured in this table).")
        body = hw_table(out) + "\n" + "\n".join(target) + "\n"
        sections.append((f"Throughput and memory: {tag}", body))
    longest = [r for r in records if r["kind"] == "longest"]
    if longest:
        out = []
        for r in sorted(longest, key=lambda r: (r["model"], r.get("cap_gib") or 1e9, r["row"])):
            pr = {int(k): v for k, v in r["probes"].items()}
            passes = [T for T, p in pr.items() if p["ok"]]
            fails = [T for T, p in pr.items() if not p["ok"]]
            best = max(passes, default=None)
            above = min([f for f in fails if best is None or f > best], default=None)
            cap = r.get("cap_gib")
            out.append({"model": r["model"], "row": r["row"],
                        "device memory": f"capped at {cap:g} GiB" if cap else "whole card",
                        "longest seq (batch 1)": fmt(best),
                        "shortest failing": fmt(above),
                        "peak reserved GiB at longest": fmt(pr[best].get("peak_reserved_gib") if best else None, ".1f"),
                        "done": "yes" if r.get("done") else "no (run again to continue)",
                        "probes": ", ".join(f"{T}:{p.get('why', 'ok' if p['ok'] else 'fail')}"
                                            for T, p in sorted(pr.items()))})
        sections.append(("Longest trainable sequence at batch 1", hw_table(out)))
    for r in (r for r in records if r["kind"] == "profile"):
        p = r["result"]["profile"]
        head = (f"{r['row']}, {r['model']}, B={r['batch']} T={r['seq']}, {p['steps']} steps under torch.profiler "
                f"(after warm-up): wall {p['wall_ms']:.1f} ms/step, GPU busy (sum of kernel time) "
                f"{p['gpu_busy_ms']:.1f} ms/step ({100 * p['gpu_busy_ms'] / p['wall_ms']:.0f}% of wall), host time "
                f"inside profiled ops {p['host_op_ms']:.1f} ms/step (profiler overhead included).\n\n")
        kk = hw_table([{"kernel kind": k["kind"], "ms/step": f"{k['ms']:.2f}",
                        "% of GPU busy": f"{100 * k['ms'] / max(p['gpu_busy_ms'], 1e-9):.1f}%"}
                       for k in p.get("kinds", [])]) + "\n" if p["timed"] == "cuda" and p.get("kinds") else ""
        kt = hw_table([{"kernel" if p["timed"] == "cuda" else "op (CPU time)": k["name"][:100].replace("|", "/"),
                        "calls/step": k["calls"], "ms/step": f"{k['ms']:.2f}",
                        "% of step": f"{100 * k['ms'] / p['wall_ms']:.1f}%"} for k in p["kernels"]])
        ot = hw_table([{"op (inclusive GPU time)": k["name"][:100].replace("|", "/"), "calls/step": k["calls"],
                        "ms/step": f"{k['ms']:.2f}", "% of step": f"{100 * k['ms'] / p['wall_ms']:.1f}%"}
                       for k in p["ops"]]) if p["ops"] else ""
        ht = hw_table([{"op (self host time)": k["name"][:100].replace("|", "/"), "calls/step": k["calls"],
                        "ms/step": f"{k['ms']:.2f}", "µs/call": f"{k['us_per_call']:.1f}",
                        "% of step": f"{100 * k['ms'] / p['wall_ms']:.1f}%"}
                       for k in p.get("host_ops", [])]) if p["timed"] == "cuda" and p.get("host_ops") else ""
        g = p.get("gaps")
        gt = ((f"No compute kernel running (copies and memsets aside) for {g['idle_ms']:.2f} ms/step between the "
               f"first and the last kernel, {g.get('copy_wait_ms', 0):.2f} ms/step of it in holes that end as a "
               f"host<->device copy ends; the largest holes, by the kernels around them:\n\n"
               + hw_table([{"after": h["after"].replace("|", "/"), "before": h["before"].replace("|", "/"),
                            "holes/step": f"{h['count'] / p['steps']:g}", "ms/step": f"{h['ms']:.2f}"}
                           for h in g["holes"]])) if g else "")
        sections.append((f"Profile: {r['row']} {r['model']} T={r['seq']}",
                         head + kk + kt + ("\n" + ot if ot else "") + ("\n" + ht if ht else "")
                         + ("\n" + gt if gt else "")))
    vers = {}
    for r in records:
        for k, v in (r.get("result") or {}).get("versions", {}).items():
            vers.setdefault(k, set()).add(v)
    if vers:
        sections.append(("Versions seen by the rows' processes",
                         "".join(f"- {k}: {', '.join(sorted(v))}\n" for k, v in sorted(vers.items()))))
    return sections


def hw_table(rows: list[dict]) -> str:
    cols = []
    for r in rows:
        cols += [c for c in (COLUMNS if "tok/s" in r else r) if c not in cols]
    from bench.hw import markdown_table

    return markdown_table(rows, cols)


def load_cache(path: Path) -> list:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


def save_cache(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(path)


def upsert(records: list, rec: dict, keys=("kind", "model", "row", "seq", "batch")) -> None:
    records[:] = [r for r in records if any(r.get(k) != rec.get(k) for k in keys)] + [rec]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="ours", help=f"comma list of {', '.join(ROWS)} (or 'all')")
    ap.add_argument("--seq", default="2048", help="comma list of sequence lengths")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (unsloth's step times were still settling after 3 on an H100)")
    ap.add_argument("--steps", type=int, default=12, help="timed steps (median)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 1 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="hidden 64, vocab 256, seq 32, 2 timed steps (CPU smoke)")
    ap.add_argument("--ckpt-dir", default=None, help="checkpoint cache (default /tmp/mt-8b[-L<layers>])")
    ap.add_argument("--timeout", type=float, default=480, help="seconds per row process")
    ap.add_argument("--budget-s", type=float, default=540, help="whole-invocation limit in seconds (0: none), "
                    "sized for one 10-minute device call: rows that would not fit are reported as not run, and the "
                    "results are still written")
    ap.add_argument("--min-row-s", type=float, default=150, help="with --budget-s: start a row only when this "
                    "much time is left")
    ap.add_argument("--longest", default="", help="rows for the longest-sequence search, e.g. ours,unsloth")
    ap.add_argument("--longest-range", default="1024:524288", help="lower:upper bound of the search")
    ap.add_argument("--longest-start", type=int, default=32768, help="first probe")
    ap.add_argument("--longest-step", type=int, default=1024, help="granularity")
    ap.add_argument("--longest-probes", type=int, default=4, help="probes per row in this invocation")
    ap.add_argument("--longest-cap-gib", type=float, default=None,
                    help="limit each probe's device memory to this many GiB (the same for every row)")
    ap.add_argument("--probe-timeout", type=float, default=420)
    ap.add_argument("--profile", nargs="?", const="ours", default=None, metavar="ROW",
                    help="profile ROW (default ours; first --seq) for 2 steps")
    ap.add_argument("--cache", default=None, help="JSON of accumulated rows (default bench/results/"
                    ".train-rows-<card>.json)")
    ap.add_argument("--fresh", action="store_true", help="forget the cached rows first")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--expandable", action="store_true", help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                    "for every row (unsloth's import sets its own allocator settings in its process)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        return child_main(json.loads(a.child), Path(a.result))

    t_start = time.perf_counter()
    layers = a.layers or (1 if a.tiny else 32)
    if a.tiny and a.seq == "2048":
        a.seq = "32"
    if a.tiny and a.steps == 12:
        a.steps = 2
    if a.tiny and a.warmup == 5:
        a.warmup = 1
    cfg = model_config(a.tiny, layers)
    tag = model_tag(cfg)
    default_dir = f"/tmp/mt-tiny-L{layers}" if a.tiny else "/tmp/mt-8b" + ("" if layers == 32 else f"-L{layers}")
    ckpt = Path(a.ckpt_dir or default_dir)
    rows = list(ROWS) if a.rows == "all" else [r for r in a.rows.split(",") if r]
    longest = [r for r in a.longest.split(",") if r]
    for r in rows + longest:
        if r not in ROWS:
            raise SystemExit(f"unknown row {r!r}; expected one of {', '.join(ROWS)}")
    seqs = [int(s) for s in a.seq.split(",") if s]
    want_unsloth = os.environ.get("PEERS_UNSLOTH") == "1"

    def remaining():
        return float("inf") if a.budget_s <= 0 else a.budget_s - (time.perf_counter() - t_start) - 60  # 60 s: results

    print(f"checkpoint {ckpt} ({tag})", flush=True)
    prep = spawn({"kind": "prepare", "ckpt": str(ckpt), "config": cfg}, max(60.0, min(900.0, remaining())), "prepare")
    if not prep.get("ok"):
        raise SystemExit(f"could not write the checkpoint: {prep.get('error')}")
    cuda = prep["cuda"]
    print(f"checkpoint ready ({'written in %.0f s' % prep['write_s'] if prep['write_s'] else 'cached'}); "
          f"device: {prep['card_slug'] if cuda else 'cpu'}", flush=True)
    cache = Path(a.cache or Path(__file__).resolve().parent / "results" / f".train-rows-{prep['card_slug']}.json")
    records = [] if a.fresh else load_cache(cache)
    base = {"ckpt": str(ckpt), "vocab": cfg["vocab_size"], "warmup": a.warmup, "steps": a.steps,
            "expandable": a.expandable}

    def skip_reason(name):
        if ROWS[name]["cuda"] and not cuda:
            return "skipped (needs CUDA)"
        if ROWS[name]["impl"] == "unsloth" and not want_unsloth:
            return "not run (needs PEERS_UNSLOTH=1 and `PEERS_UNSLOTH=1 source .whl/install.sh`)"
        return None

    jobs = [(T, name) for T in seqs for name in rows]
    for T, name in jobs:
        rec = {"kind": "row", "model": tag, "row": name, "seq": T, "batch": a.batch,
               "flops_per_token": flops_per_token(cfg, T)}
        why = skip_reason(name)
        if why is None and remaining() < a.min_row_s:
            why = "not run (time budget)"
        if why:
            print(f"{name} T={T}: {why}", flush=True)
            if not any(r.get("kind") == "row" and r["model"] == tag and r["row"] == name and r["seq"] == T
                       and r["batch"] == a.batch for r in records):  # never hide an earlier measurement
                upsert(records, {**rec, "result": {"ok": False, "error": why}})
            continue
        # --profile ROW: that row at the first --seq also runs 2 steps under torch.profiler after its timed steps
        prof = a.profile == name and T == seqs[0]
        spec = {"kind": "row", **base, **ROWS[name], "row": name, "seq": T, "batch": a.batch, "profile": prof}
        print(f"== {name} T={T} B={a.batch}", flush=True)
        limit = min(a.timeout, remaining())
        res = spawn(spec, limit, f"{name} T={T}")
        print(f"{name} T={T}: " + (f"{res['tok_s']:,.0f} tok/s, step {res['step_ms']:.1f} ms, peak "
                                    f"{fmt(res.get('peak_alloc_gib'), '.2f')} GiB alloc / "
                                    f"{fmt(res.get('peak_reserved_gib'), '.2f')} GiB reserved"
                                    if res.get("ok") else res.get("error")), flush=True)
        earlier = next((r for r in records if r.get("kind") == "row" and r["model"] == tag and r["row"] == name
                        and r["seq"] == T and r["batch"] == a.batch and r["result"].get("ok")), None)
        if res.get("timeout") and limit < a.timeout and earlier:
            print(f"{name} T={T}: cut short by the time budget; the earlier measurement stays", flush=True)
            continue
        if res.get("profile"):
            upsert(records, {"kind": "profile", "model": tag, "row": name, "seq": T, "batch": a.batch,
                             "result": {"profile": res.pop("profile")}})
        upsert(records, {**rec, "result": res})
        save_cache(cache, records)
    if a.profile and a.profile not in rows:
        print(f"--profile {a.profile}: that row is not in --rows, nothing profiled", flush=True)

    lo_bound, hi_bound = (int(x) for x in a.longest_range.split(":"))
    for name in longest:
        why = skip_reason(name) or (None if cuda else "skipped (needs CUDA)")
        if why:
            print(f"longest {name}: {why}", flush=True)
            continue
        key = {"kind": "longest", "model": tag, "row": name, "seq": 0, "batch": 1, "cap_gib": a.longest_cap_gib}
        old = next((r for r in records if all(r.get(k) == v for k, v in key.items())), None)
        probes = {int(k): v for k, v in (old or {}).get("probes", {}).items()}
        for _ in range(a.longest_probes):
            T = next_probe(probes, lo_bound, hi_bound, a.longest_step, a.longest_start)
            if T is None:
                break
            if remaining() < 120:
                print(f"longest {name}: stopping (time budget)", flush=True)
                break
            spec = {"kind": "row", **base, **ROWS[name], "row": name, "seq": T, "batch": 1, "warmup": 0, "steps": 1,
                    "cap_gib": a.longest_cap_gib}
            print(f"== longest {name}: probe T={T}", flush=True)
            limit = min(a.probe_timeout, remaining())
            res = spawn(spec, limit, f"{name} probe T={T}")
            if res.get("timeout") and limit < a.probe_timeout:
                print(f"longest {name}: probe T={T} cut short by the time budget (not recorded)", flush=True)
                break
            why = "ok" if res.get("ok") else ("oom" if res.get("oom") else "timeout" if res.get("timeout") else "error")
            print(f"longest {name}: T={T} {why}" + (f" ({res.get('error')})" if why == "error" else "") +
                  (f", peak reserved {res['peak_reserved_gib']:.1f} GiB" if res.get("peak_reserved_gib") else ""),
                  flush=True)
            probes[T] = {"ok": bool(res.get("ok")), "why": why, "peak_reserved_gib": res.get("peak_reserved_gib"),
                         "total_gib": res.get("total_gib"), "versions": res.get("versions")}
            if why == "error":
                break  # not a memory limit: searching further would only repeat it
        done = next_probe(probes, lo_bound, hi_bound, a.longest_step, a.longest_start) is None
        seen = next((p["versions"] for p in probes.values() if p.get("versions")), {})
        upsert(records, {**key, "probes": {str(k): v for k, v in probes.items()}, "done": done,
                         "result": {"versions": seen}}, keys=tuple(key))
        save_cache(cache, records)

    save_cache(cache, records)
    tflops = None
    if cuda and not a.no_write:
        # The parent touches the GPU only now, after every row process has exited. unsloth's wheels (if on the
        # path) are hidden from this process: bench.hw.environment() would import it (40 s, patches).
        sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "unsloth"))]
        from bench import hw

        tflops = hw.ceilings()["bf16_tflops"]
    sections = render(records, tflops)
    setup = (f"Llama-3.1-8B shapes (C=4096, F=14336, H=32, KV=8, V=128256; layers as in each heading), random bf16 "
             f"weights, sharded safetensors; LoRA r={R} alpha={ALPHA} on {', '.join(SEVEN)}; random token ids, labels "
             f"= ids; bf16 autocast; clip {CLIP}; torch AdamW fused, lr {LR}; median of the timed steps (CUDA events "
             f"around forward + backward + optimizer step) after warm-up; each row in a fresh process. Peak = "
             f"torch.cuda.max_memory_allocated / max_memory_reserved over warm-up + timed steps. TFLOP/s: useful "
             f"FLOPs without recomputation (4 x linear params + 6 x layers x C x T per token; ~32 GFLOP/token at "
             f"T=2048), % of the measured bf16 matmul ceiling. vs unsloth: tok/s over unsloth's (same quantization, "
             f"seq, batch). Reference numbers from issue 9 (H100 80GB, B=2 T=2048): peft+bnb 6,650 tok/s at "
             f"13.8 GiB, +liger 7,180 at 7.6 GiB, unsloth 9,960 at 7.0 GiB, unsloth 16-bit 10,310 at 16.7 GiB.\n")
    sections = [("Setup", setup)] + sections
    text = "\n".join(f"## {h}\n\n{b}" for h, b in sections)
    print("\n" + text, flush=True)
    if cuda and not a.no_write:
        path = hw.write_results("train", "QLoRA training step, Llama-3.1-8B shapes: minitrain vs peers", sections)
        print(f"wrote {path}\nrows cached in {cache}", flush=True)


if __name__ == "__main__":
    main()
