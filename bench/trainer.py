"""minitrain.Trainer as users run it: default settings, examples of many lengths, padded batches.

bench/train.py times one fixed-shape step; this bench times the whole ``Trainer.train()`` a user starts with the
defaults of USERS.md (batch 2, accumulation 4, packing off, so right-padded batches whose length changes every
micro-batch), on the Llama-3.1-8B-shaped checkpoint of bench/train.py (random weights, NF4 on the fly, LoRA r=16
alpha=16 on all seven projections, gradient checkpointing "auto", bf16, AdamW lr 2e-4).

Data: ``--examples`` token-id examples whose lengths follow a log-normal law (median ``--median-len``, clipped
to [32, ``--max-len``]), the first third of each a prompt (label -100). The same examples, seed and steps for
every row.

Rows (each in a fresh process): ``eager`` (cuda_graphs="off": every micro-batch through Python and ~10k
launches) and ``graphs`` (the default, cuda_graphs="auto": each padded batch is padded further to one of a few
lengths, and each (batch, length) shape runs from a CUDA graph from its third sighting on; the first two run
eagerly, they train normally), both with gradient checkpointing "auto" ("offload" on one CUDA device);
``graphs-on``: the graphs row with gradient_checkpointing="on" (recompute each layer, no host copies).

``unsloth`` (only with PEERS_UNSLOTH=1, see PEERS.md): FastLanguageModel + get_peft_model (its gradient
checkpointing), trained on the very same micro-batches (minitrain's batch plan for the same examples and seed,
right-padded, attention mask given) by a plain loop: loss = its mean loss x (trained tokens of the micro-batch /
trained tokens of the step), accumulated over the 4 micro-batches, clip 1.0, fused AdamW, lr 2e-4 constant.

Reported per row: real (unpadded) tokens per second over the whole run (what the user waits for, warm-up,
compilation and graph captures included) and over the steps after ``--steady-from`` (steady state); padding the
graph lengths added; graphs captured; peak memory allocated / reserved (torch) and the device memory in use at
the end (torch.cuda.mem_get_info, which also counts the instantiated graphs).

Run: ``python -m bench.trainer`` (GPU; ``--steps``, ``--rows eager,graphs``); CPU smoke: ``--tiny``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.train import SEVEN, model_config, spawn, write_checkpoint

# row: (cuda_graphs, gradient_checkpointing); None: unsloth's own loop
ROWS = {"eager": ("off", "auto"), "graphs": ("auto", "auto"), "graphs-on": ("auto", "on"), "unsloth": None}


def make_examples(n: int, median: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = np.clip(np.exp(rng.normal(np.log(median), 0.6, n)), 32, max_len).astype(int)
    out = []
    for L in lens.tolist():
        ids = rng.integers(4, vocab, L).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (L // 3) + ids[L // 3:]})
    return out


def run_unsloth(spec: dict) -> dict:
    import torch

    from bench.train import build_unsloth
    from minitrain.trainer import ExampleBatches, n_items

    write_checkpoint(Path(spec["ckpt"]), spec["config"], torch.device("cuda"))
    t0 = time.perf_counter()
    params, loss_fn, _ = build_unsloth({"ckpt": spec["ckpt"], "seq": spec["max_len"], "quant": True}, "cuda",
                                       torch.bfloat16)
    model = loss_fn.model
    load_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
    data = make_examples(spec["examples"], spec["median_len"], spec["max_len"], spec["config"]["vocab_size"])
    batches = ExampleBatches(data, 2, shuffle=True, seed=0, pad_id=3)
    it = iter(())
    times, tokens, losses = [], [], []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t_run = time.perf_counter()
    for step in range(spec["steps"]):
        t0 = time.perf_counter()
        micro = []
        while len(micro) < 4:
            b = next(it, None)
            if b is None:
                it = iter(batches)
                continue
            micro.append(b)
        counts = [n_items(b) for b in micro]
        total = sum(counts)
        step_loss = 0.0
        for b, n in zip(micro, counts):
            b = {k: b[k].cuda(non_blocking=True) for k in ("input_ids", "attention_mask", "labels")}
            loss = model(**b).loss * (n / total)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(int(b["attention_mask"].sum()) for b in micro))
        losses.append(step_loss)
    wall = time.perf_counter() - t_run
    steady = [(t, s) for i, (t, s) in enumerate(zip(tokens, times)) if i + 1 > spec["steady_from"]]
    free, total_mem = torch.cuda.mem_get_info()
    return {"ok": True, "card": torch.cuda.get_device_name(), "load_s": load_s, "wall_s": wall,
            "tok_s_run": sum(tokens) / sum(times),
            "tok_s_steady": sum(t for t, _ in steady) / sum(s for _, s in steady) if steady else None,
            "loss_first": losses[0], "loss_last": losses[-1], "graphs": 0, "pad_fraction": None,
            "graph_pad_fraction": None, "off_because": ["unsloth"],
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "in_use_gib": (total_mem - free) / 2**30}


def run_row(spec: dict) -> dict:
    import torch

    if spec["impl"] == "unsloth":
        return run_unsloth(spec)

    from minitrain import Trainer, TrainConfig, add_lora, load_model
    from minitrain.trainer import graph_length

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    ckpt = Path(spec["ckpt"])
    write_checkpoint(ckpt, spec["config"], dev)
    t0 = time.perf_counter()
    model, tok = load_model(str(ckpt), max_seq_length=spec["max_len"], load_in_4bit=not spec["tiny"], device=dev)
    add_lora(model, r=16, alpha=16, target_modules=SEVEN)
    load_s = time.perf_counter() - t0
    data = make_examples(spec["examples"], spec["median_len"], spec["max_len"], spec["config"]["vocab_size"])
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out, max_steps=spec["steps"], per_device_train_batch_size=2,
                          gradient_accumulation_steps=4, learning_rate=2e-4, save_steps=0, progress=False,
                          logging_steps=1, cuda_graphs=spec["cuda_graphs"], seed=0, warmup_steps=0,
                          gradient_checkpointing=spec["gc"])
        tr = Trainer(model, tok, data, cfg)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tr.train()
        wall = time.perf_counter() - t0
        rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    tokens = [r["tokens_per_s"] * r["step_time"] for r in rows]
    steady = [(t, r["step_time"]) for t, r in zip(tokens, rows) if r["step"] > spec["steady_from"]]
    # the padding the graph lengths add, over the batches this run drew (real tokens are what tok/s counts)
    plan = [b for e in range(2) for b in tr.batches.plan(e)][: spec["steps"] * 4]
    real = sum(len(data[i]["input_ids"]) for b in plan for i in b)
    padded = sum(len(b) * max(len(data[i]["input_ids"]) for i in b) for b in plan)
    graphed = sum(len(b) * graph_length(max(len(data[i]["input_ids"]) for i in b)) for b in plan)
    out = {"ok": True, "card": torch.cuda.get_device_name() if cuda else "cpu", "load_s": load_s, "wall_s": wall,
           "tok_s_run": sum(tokens) / sum(r["step_time"] for r in rows),
           "tok_s_steady": sum(t for t, _ in steady) / sum(s for _, s in steady) if steady else None,
           "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "graphs": tr.graphs_captured,
           "pad_fraction": 1 - real / padded, "graph_pad_fraction": 1 - real / graphed,
           "off_because": tr.graphs_off_because, "gc": tr.gc_mode}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        alloc, reserved = tr.peak_memory()  # torch's peaks, and those keep_mlp_layers="auto" reset while measuring
        out.update(peak_alloc_gib=alloc / 2**30, peak_reserved_gib=reserved / 2**30, in_use_gib=(total - free) / 2**30)
    return out


def fmt(x, f=",.0f"):
    return "—" if x is None else format(x, f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="eager,graphs")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps (4 micro-batches each)")
    ap.add_argument("--steady-from", type=int, default=30, help="steady state: steps after this one")
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--median-len", type=int, default=350)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny model, 4 steps")
    ap.add_argument("--ckpt-dir", default=None, help="checkpoint cache (default: bench/train.py's, /tmp/mt-8b)")
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        try:
            out = run_row(json.loads(a.child))
        except BaseException as e:  # noqa: BLE001 - the parent shows it as the row's error
            import traceback

            traceback.print_exc()
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
        Path(a.result).write_text(json.dumps(out))
        sys.stdout.flush()
        os._exit(0)
    layers = a.layers or (1 if a.tiny else 32)
    cfg = model_config(a.tiny, layers)
    if a.tiny:
        a.steps, a.steady_from, a.examples, a.median_len, a.max_len = 4, 2, 64, 24, 64
    ckpt = a.ckpt_dir or (f"/tmp/mt-tiny-L{layers}" if a.tiny else f"/tmp/mt-8b{'' if layers == 32 else f'-L{layers}'}")
    results = []
    for name in a.rows.split(","):
        if name == "unsloth" and os.environ.get("PEERS_UNSLOTH") != "1":
            print("unsloth row skipped: run under PEERS_UNSLOTH=1 (see bench/train.py)", flush=True)
            continue
        if name not in ROWS:
            raise SystemExit(f"bench.trainer: unknown row {name!r}; rows: {', '.join(ROWS)}")
        graphs, gc = ROWS[name] or (None, None)
        spec = {"ckpt": ckpt, "config": cfg, "tiny": a.tiny, "cuda_graphs": graphs, "gc": gc, "steps": a.steps,
                "impl": "unsloth" if name == "unsloth" else "ours",  # unsloth's wheels only on its row's path
                "steady_from": a.steady_from, "examples": a.examples, "median_len": a.median_len,
                "max_len": a.max_len}
        t0 = time.perf_counter()
        r = spawn(spec, a.timeout, name, module="bench.trainer")
        r["row"], r["process_s"] = name, time.perf_counter() - t0
        print(json.dumps(r), flush=True)
        results.append(r)
    cols = ["row", "checkpointing", "tok/s whole run", f"tok/s steps > {a.steady_from}", "run s", "graphs",
            "padding (batch)",
            "padding (graph lengths)", "loss first → last", "peak alloc GiB", "peak reserved GiB", "in use GiB"]
    table = []
    for r in results:
        if not r.get("ok"):
            table.append({"row": r["row"], "tok/s whole run": r.get("error", "failed")})
            continue
        graphed = r["graph_pad_fraction"] is not None and r["row"].startswith("graphs")
        table.append({"row": r["row"], "checkpointing": r.get("gc", "—"), "tok/s whole run": fmt(r["tok_s_run"]),
                      f"tok/s steps > {a.steady_from}": fmt(r["tok_s_steady"]), "run s": fmt(r["wall_s"], ".1f"),
                      "graphs": r["graphs"],
                      "padding (batch)": "—" if r["pad_fraction"] is None else f"{100 * r['pad_fraction']:.1f}%",
                      "padding (graph lengths)": f"{100 * r['graph_pad_fraction']:.1f}%" if graphed else "—",
                      "loss first → last": f"{r['loss_first']:.3f} → {r['loss_last']:.3f}",
                      "peak alloc GiB": fmt(r.get("peak_alloc_gib"), ".2f"),
                      "peak reserved GiB": fmt(r.get("peak_reserved_gib"), ".2f"),
                      "in use GiB": fmt(r.get("in_use_gib"), ".2f")})
    from bench.hw import markdown_table

    body = markdown_table(table, cols)
    notes = (f"\n{a.steps} optimizer steps x 4 micro-batches of 2 examples ({a.examples} examples, lengths "
             f"log-normal, median {a.median_len}, clipped to [32, {a.max_len}]); model "
             f"{'tiny' if a.tiny else 'Llama-3.1-8B-shaped'} with {layers} layers"
             f"{', NF4' if not a.tiny else ''}. tok/s counts real tokens (the attention mask), so padding is a "
             f"cost, not a gain. padding (batch): share of padding in the batches as collated; (graph lengths): "
             f"after the further padding of the graphs row. in use: device memory in use at the end "
             f"(mem_get_info), graphs included.\n")
    print(body + notes)
    if not a.no_write and not a.tiny:
        from bench.hw import write_results

        print("wrote", write_results("trainer", "Trainer with default settings: padded batches of many lengths",
                                     [("Results", body + notes)]))


if __name__ == "__main__":
    main()
