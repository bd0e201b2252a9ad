"""Data pipeline throughput on the CPU: chat rendering, tokenization (batch API vs per record), the whole
``load_dataset`` (read JSONL → format → template → response-only masks → token store) and packing.

Synthetic Alpaca-style instruct records (a few dozen words each) are written to a temporary JSONL file.
Target from issue 7: >= 50k records/s for tokenizing 100k records with the ``tokenizers`` batch API.

Run: ``python -m bench.data [--records 100000] [--tokenizer CHECKPOINT_DIR]``. Without --tokenizer it uses the
SmolLM2-135M-Instruct checkpoint that ``minitrain demo`` converts into the cache (``~/.cache/minitrain/
smollm2-135m-instruct``) when it is there, else a byte-level BPE of 8192 tokens trained on the synthetic text with
the ChatML template. Writes ``bench/results/<date>-cpu<N>-data.md``. This bench needs no GPU; its table comes from
the machine it runs on. Besides the pipeline it times parts of ``tokenizers`` (Encoding objects, id lists,
offsets, the pre-tokenizer alone, one thread, without Digits, ignore_merges, without the post-processor) to
show where its time goes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from itertools import chain
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET = 50_000  # records/s
WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which one all "
         "data model train loss token learn rate batch layer paris france berlin germany capital river city "
         "headline company market profit revenue contract clause court case law answer question explain why "
         "because summary translate english german morning evening good bad positive negative neutral").split()
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    return [{"instruction": words(rng.randint(5, 20)).capitalize() + "?",
             "input": words(rng.randint(0, 30)) if rng.random() < 0.5 else "",
             "output": words(rng.randint(10, 60)).capitalize() + "."} for _ in range(n)]


def make_tokenizer(path: str | None, sample: list[str]):
    if path:
        from minitrain.tokenizer import Tokenizer

        return Tokenizer.from_pretrained(path), f"{Path(path).name} tokenizer.json + its chat template"
    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, trainers

    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, show_progress=False,
                                                       special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from minitrain.tokenizer import Tokenizer

    return (Tokenizer(tk, config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, chat_template=CHATML),
            "byte-level BPE, 8192 tokens, trained on the synthetic text; ChatML template")


def variants(backend):
    """The tokenizer with one part changed, to see what its time is spent on (same ids unless noted)."""
    from tokenizers import Tokenizer as TK

    cfg = json.loads(backend.to_str())
    out = []
    pre = cfg.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":
        digits = [p for p in pre["pretokenizers"] if p.get("type") != "Digits"]
        if len(digits) < len(pre["pretokenizers"]):
            c = json.loads(backend.to_str())
            c["pre_tokenizer"]["pretokenizers"] = digits
            out.append(("without the Digits pre-tokenizer (ids differ on digits)", TK.from_str(json.dumps(c))))
    if cfg.get("model", {}).get("type") == "BPE":
        c = json.loads(backend.to_str())
        c["model"]["ignore_merges"] = not c["model"].get("ignore_merges", False)
        out.append((f"ignore_merges={c['model']['ignore_merges']}", TK.from_str(json.dumps(c))))
    if cfg.get("post_processor") is not None:
        c = json.loads(backend.to_str())
        c["post_processor"] = None
        out.append(("without the post-processor", TK.from_str(json.dumps(c))))
    return out


def one_thread_rate(backend, texts: list[str]) -> float:
    """Seconds for encode_batch_fast over ``texts`` in a fresh process with TOKENIZERS_PARALLELISM=false (the
    variable is read once per process, so it cannot be switched here)."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        backend.save(str(Path(d) / "tokenizer.json"))
        (Path(d) / "texts.json").write_text(json.dumps(texts))
        code = ("import json, sys, time; from tokenizers import Tokenizer; d = sys.argv[1]; "
                "tk = Tokenizer.from_file(d + '/tokenizer.json'); t = json.load(open(d + '/texts.json')); "
                "t0 = time.perf_counter(); tk.encode_batch_fast(t, add_special_tokens=False); "
                "print(time.perf_counter() - t0)")
        out = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, check=True,
                             env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return float(out.stdout.strip().splitlines()[-1])


def same_examples(a, b, n: int) -> bool:
    """Whether the first ``n`` examples of two datasets have the same ids and trained masks."""
    if len(a) < n or len(b) < n:
        return False
    ea, eb = int(a.store.offsets[n]), int(b.store.offsets[n])
    return (np.array_equal(a.store.offsets[: n + 1], b.store.offsets[: n + 1]) and
            np.array_equal(a.store.ids[:ea], b.store.ids[:eb]) and np.array_equal(a.store.mask[:ea], b.store.mask[:eb]))


def python_speed() -> float:
    """Seconds for a fixed pure-Python loop (about 0.1-0.2 s on an idle modern core): shows how much of the
    machine this run had when other processes share the cores."""
    t0 = time.perf_counter()
    s = 0
    for i in range(3_000_000):
        s += i
    return time.perf_counter() - t0


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished child processes (num_proc workers)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


REPEATS = 3  # runs of the PieceCache rows (the machine is shared: one run can be off by 30%)


def median_run(secs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run with the median wall time, as (wall, CPU)."""
    return sorted(secs)[len(secs) // 2]


def spread(runs) -> str:
    return " / ".join(f"{w:.2f}" for (w, _), _ in runs)


def timed(fn):
    """(wall seconds, CPU seconds of this process and its workers, result)."""
    t0, c0 = time.perf_counter(), _cpu()
    out = fn()
    return (time.perf_counter() - t0, _cpu() - c0), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--per-record", type=int, default=10_000, help="records for the slow per-record paths")
    ap.add_argument("--tokenizer", default=None, help="a checkpoint directory with tokenizer.json")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.tokenizer is None:
        from minitrain.gguf_convert import cache_dir

        smol = cache_dir() / "smollm2-135m-instruct"  # what `minitrain demo` converts once (prepare_model)
        args.tokenizer = str(smol) if (smol / "tokenizer.json").is_file() else None
    import torch

    from minitrain.data import load_dataset, normalize, read_records
    from minitrain.data.encode import PieceCache, find_backend, piece_cache_unsupported

    n, m = args.records, min(args.per_record, args.records)
    load0, speed0 = os.getloadavg(), python_speed()
    recs = synthetic_records(n)
    tok, tok_desc = make_tokenizer(args.tokenizer, [r["instruction"] + " " + r["output"] for r in recs[:20000]])
    backend = find_backend(tok)
    convs = [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")},
              {"role": "assistant", "content": r["output"]}] for r in recs]
    rows = []

    def row(stage, count, provider, secs, tokens=None, note=""):
        wall, cpu = secs
        rate = count / wall
        rows.append({"stage": stage, "records": f"{count:,}", "provider": provider, "wall s": f"{wall:.2f}",
                     "records/s": f"{rate:,.0f}", "tokens/s": f"{tokens / wall:,.0f}" if tokens else "",
                     "CPU s": f"{cpu:.2f}", "records/CPU-s": f"{count / max(cpu, 1e-9):,.0f}",
                     "vs 50k/s target": f"{rate / TARGET:.2f}x", "note": note})
        print(" | ".join(str(v) for v in rows[-1].values()), flush=True)

    s, texts = timed(lambda: [tok.apply_chat_template(c, tokenize=False) for c in convs])
    row("render chat template", n, "jinja2 sandbox (minitrain.tokenizer)", s)
    fast = getattr(tok, "fast_chat_renderer", lambda: None)()
    if fast is not None:
        s, fast_texts = timed(lambda: [fast(c) for c in convs])
        row("render chat template", n, "minitrain fast renderer (verified on probes)", s,
            note="byte-identical to jinja2 on all records" if fast_texts == texts else "DIFFERS from jinja2")
    pieces = PieceCache(backend) if piece_cache_unsupported(backend) is None else None
    if pieces is not None:
        import minitrain.data.encode as encode_mod

        def piece_encode(cache):  # in batches of 2048 records, as load_dataset calls it
            parts = [cache.encode(texts[i: i + 2048]) for i in range(0, n, 2048)]
            return np.concatenate([p[0] for p in parts]), None, np.concatenate([p[2] for p in parts])

        def cold():  # as a user gets it: a fresh cache, and the power tables (shared by caches) not made yet
            encode_mod._POWERS.clear()
            cache = PieceCache(backend)
            return cache, piece_encode(cache)

        load_p, speed_p = os.getloadavg()[0], python_speed()
        runs = [timed(cold) for _ in range(REPEATS)]
        pieces, (pids, _, counts) = runs[0][1]
        piece_outs = [out for _, (_, out) in runs]
        row("tokenize rendered text", n, f"minitrain PieceCache (cold: fresh cache, median of {REPEATS})",
            median_run([r[0] for r in runs]), len(pids), f"{pieces.n_entries:,} distinct pieces; wall s of the "
            f"runs {spread(runs)}; load {load_p:.1f}, reference loop {speed_p:.2f} s just before")
        runs = [timed(lambda: piece_encode(pieces)) for _ in range(REPEATS)]
        piece_outs += [out for _, out in runs]
        row("tokenize rendered text", n, f"minitrain PieceCache (warm cache, median of {REPEATS})",
            median_run([r[0] for r in runs]), len(pids), f"wall s of the runs {spread(runs)}")
    enc = getattr(backend, "encode_batch_fast", backend.encode_batch)
    s, ids = timed(lambda: [e.ids for e in enc(texts, add_special_tokens=False)])
    ntok = sum(map(len, ids))
    row("tokenize rendered text", n, "tokenizers encode_batch_fast (Rust, all cores)", s, ntok)
    if pieces is not None:  # every run, cold and warm, against the tokenizer
        ref_ids, ref_counts = np.fromiter(chain.from_iterable(ids), np.int32, ntok), list(map(len, ids))
        same = all(np.array_equal(p, ref_ids) and c.tolist() == ref_counts for p, _, c in piece_outs)
        rows[-3]["note"] += (f"; ids identical to encode_batch on all records in all {len(piece_outs)} runs "
                             "(cold and warm)" if same else "; IDS DIFFER")
        del piece_outs
    s, encs = timed(lambda: enc(texts, add_special_tokens=False))
    row("tokenize rendered text, Encoding objects only", n, "tokenizers encode_batch_fast (Rust, all cores)", s, ntok)
    s, _ = timed(lambda: [e.ids for e in encs])
    row("Encoding.ids to Python lists", n, "tokenizers", s, ntok)
    del encs
    s, _ = timed(lambda: backend.encode_batch(texts, add_special_tokens=False))
    row("tokenize rendered text + offsets", n, "tokenizers encode_batch (Rust, all cores)", s, ntok)
    s, _ = timed(lambda: [tok.encode(t, add_special_tokens=False) for t in texts[:m]])
    row("tokenize rendered text", m, "per-record encode", s, sum(map(len, ids[:m])))
    pt = backend.pre_tokenizer
    if pt is not None:
        s, pre = timed(lambda: [pt.pre_tokenize_str(t) for t in texts[:m]])
        row("pre-tokenizer alone (pre_tokenize_str)", m, "tokenizers", s, sum(map(len, ids[:m])),
            f"{sum(map(len, pre)) / m:.0f} pre-tokens per record")
    s, out = timed(lambda: one_thread_rate(backend, texts[:m]))
    row("tokenize rendered text", m, "tokenizers encode_batch_fast, TOKENIZERS_PARALLELISM=false (subprocess)",
        (out, out), sum(map(len, ids[:m])), "time measured inside the subprocess")
    for what, change in variants(backend):
        s, _ = timed(lambda: change.encode_batch_fast(texts[:m], add_special_tokens=False))
        row("tokenize rendered text", m, f"tokenizers encode_batch_fast, {what}", s, sum(map(len, ids[:m])))

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "instruct.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
        fm = Path(d) / "instruct_small.jsonl"
        fm.write_text("".join(json.dumps(r) + "\n" for r in recs[:m]))
        fr = Path(d) / "raw.jsonl"
        fr.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        # the parts of load_dataset, one by one (its own row below is all of them together), with the garbage
        # collector off as load_dataset has it
        import gc

        gc.disable()
        s, got = timed(lambda: list(read_records(f)))
        row("load_dataset part: read + parse JSONL", len(got), "minitrain.data.sources", s)
        s, exs = timed(lambda: [normalize(r, "instruct", loc) for r, loc, _ in got])
        row("load_dataset part: normalize to messages", len(exs), "minitrain.data.formats", s)
        spans = getattr(fast, "spans", None)
        if spans is not None:
            s, _ = timed(lambda: [spans(e["messages"]) for e in exs])
            row("load_dataset part: render + assistant spans", len(exs), "minitrain fast renderer, one pass", s)
        del got, exs
        gc.enable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s, ds = timed(lambda: load_dataset(f, tok, max_seq_length=2048))
            tokens = int(ds.store.lengths.sum())
            row("load_dataset instruct, responses only", len(ds), "minitrain batch path", s, tokens,
                f"{ds.sources[0].trained / tokens:.0%} of tokens trained")
            s, ds_all = timed(lambda: load_dataset(f, tok, max_seq_length=2048, train_on_responses_only=False))
            row("load_dataset instruct, all tokens", len(ds_all), "minitrain batch path", s, tokens)
            s, dsp = timed(lambda: load_dataset(f, tok, max_seq_length=2048, num_proc=os.cpu_count()))
            row("load_dataset instruct, responses only", len(dsp), f"minitrain, num_proc={os.cpu_count()}", s, tokens)
            s, dsm = timed(lambda: load_dataset(fm, tok, max_seq_length=2048, use_batch_api=False))
            row("load_dataset instruct, responses only", len(dsm), "per-record path", s, int(dsm.store.lengths.sum()))
            same = same_examples(ds, dsm, len(dsm)) and same_examples(dsp, dsm, len(dsm))
            rows[-4]["note"] += (f"; ids and masks identical to the per-record path (tokenizer's own encode, jinja2 "
                                 f"template) on the first {len(dsm):,} records" if same else
                                 "; DIFFERS from the per-record path")
            rows[-2]["note"] += "same as the batch path" if same_examples(dsp, ds, len(ds)) else "DIFFERS from the batch path"
            s, dsr = timed(lambda: load_dataset(fr, tok, max_seq_length=2048))
            row("load_dataset raw text", len(dsr), "minitrain batch path", s, int(dsr.store.lengths.sum()))
        loader = ds.train_batches(batch_size=8, packing=True)
        s, nt = timed(lambda: sum(b["input_ids"].numel() for b in loader))
        row("packed batches (8 x 2048)", len(ds), "minitrain collate", s, nt,
            f"{len(loader)} batches, {tokens / nt:.1%} of the slots hold tokens")
        loader = ds.train_batches(batch_size=8, packing=False)
        s, nt = timed(lambda: sum(b["input_ids"].numel() for b in loader))
        row("padded batches (8 x longest)", len(ds), "minitrain collate", s, nt,
            f"{len(loader)} batches, {tokens / nt:.1%} of the slots hold tokens")

    import jinja2
    import tokenizers

    load, speed = os.getloadavg(), python_speed()
    env = {"date": datetime.date.today().isoformat(), "load average at start / end": f"{load0[0]:.1f} / {load[0]:.1f} "
           "(other processes shared the cores: wall-clock rates are lower bounds; records/CPU-s is per core)",
           "reference loop (3M Python additions) at start / end": f"{speed0:.2f} s / {speed:.2f} s "
           f"(an idle core takes about 0.15 s: this run had roughly 1/{max(speed0, speed) / 0.15:.0f} of a core at worst)", "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPU cores, no GPU used", "python": platform.python_version(), "torch": torch.__version__,
           "tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__, "tokenizer": tok_desc,
           "records": f"{n:,} synthetic instruct records, {ntok / n:.0f} tokens each on average"}
    cols = list(rows[0])
    table = ("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
             + "".join("| " + " | ".join(r[c] for c in cols) + " |\n" for r in rows))
    text = ("# minitrain.data throughput (CPU)\n\n| | |\n|---|---|\n"
            + "".join(f"| {k} | {v} |\n" for k, v in env.items())
            + "\n" + table)
    out = Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{env['date']}-cpu{os.cpu_count()}-data.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
