"""Data-parallel training through torchrun, on CPU with the gloo backend (2 processes), against one process.

Oracle: the single-process trainer (itself checked against transformers + peft in test_trainer.py) on the same
global batch: N ranks with G micro-batches per step train on exactly the micro-batches one process trains on with
G*N, and the token-normalized loss makes the split irrelevant, so per-step losses and the final adapter agree to
fp32 rounding (different summation order only). Also: only rank 0 writes files (rank 1 gets an output directory of
its own, which must stay absent), resume from a checkpoint continues every rank exactly (dropout on), the CLI
works under torchrun, and FSDP2 on an NF4 (QLoRA) model gives the same training.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minitrain.config import TrainConfig
from minitrain.loader import load_model
from minitrain.lora import add_lora
from minitrain.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_export import WORDS, make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5  # fp32: only the order of the gradient sums differs

WORKER = r'''
import json, sys
import torch
torch.set_num_threads(1)
from minitrain import distributed
from minitrain.config import TrainConfig
from minitrain.loader import load_model
from minitrain.lora import add_lora
from minitrain.trainer import Trainer

ckpt, out, modes, device = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
env = distributed.init_distributed(device)
r = env.rank
dtype = torch.float32 if device == "cpu" else torch.bfloat16

PLAIN = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)

def examples():
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(12):
        ids = torch.randint(0, 64, (int(torch.randint(3, 16, (), generator=g)),), generator=g).tolist()
        data.append({"input_ids": ids})
    return data

def run(mode, name, dropout, **kw):
    model, _ = load_model(ckpt, dtype=dtype, device=env.device, tokenizer=False, load_in_4bit=mode == "fsdp")
    torch.manual_seed(1 + r)  # different initial adapters on purpose: rank 0's must be broadcast
    add_lora(model, r=4, alpha=8, dropout=dropout)
    if mode == "fsdp":
        nf4 = sum(q.weight.data.numel() for q in model.modules() if type(q).__name__ == "NF4Linear")
        distributed.shard_model(model)
        local = [p.to_local() for p in model.parameters()]
        packed = [p.to_local() for n, p in model.named_parameters() if n.endswith("nf4_data")]  # the NF4 bytes
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        result.setdefault("shares", []).append([sum(t.numel() * t.element_size() for t in packed) / nf4,
                                                sum(t.numel() * t.element_size() for t in local) / full])
    base = dict(output_dir=f"{out}/{mode}/{name}/rank{r}", learning_rate=1e-2, lr_scheduler_type="constant",
                max_grad_norm=1.0, progress=False, seed=5, per_device_train_batch_size=1,
                gradient_accumulation_steps=2, save_steps=0)
    base.update(kw)
    tr = Trainer(model, None, examples(), TrainConfig(**base))
    tr.train()
    return tr.history["loss"]

results = {}
for mode in modes:
    result = results[mode] = {}
    gc = {"ddp": ("on", "off"), "fsdp": ("off", "on")}[mode]  # (plain, resumed): each mode both ways
    # SGD without clipping: a gradient off by any factor (a mean over ranks instead of the sum) changes the curve
    result["plain"] = run(mode, "plain", 0.0, max_steps=3, gradient_checkpointing=gc[0], **PLAIN)
    result["full"] = run(mode, "full", 0.1, max_steps=4, gradient_checkpointing=gc[1])
    run(mode, "resumed", 0.1, max_steps=2, save_steps=2, gradient_checkpointing=gc[1])  # stopped at step 2 ...
    result["resumed"] = run(mode, "resumed", 0.1, max_steps=4, save_steps=2,  # ... and continued from it
                            resume_from_checkpoint="latest", gradient_checkpointing=gc[1])
if r == 0:
    with open(f"{out}/losses.json", "w") as f:
        json.dump(results, f)
distributed.shutdown()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd=REPO, timeout=240, gpu=False):
    """``torchrun --nproc-per-node 2`` on CPU (gloo) or 2 GPUs (NCCL); returns the completed process (asserting
    exit status 0)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    if not gpu:
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def examples():
    g = torch.Generator().manual_seed(0)  # the worker's data, same generator
    data = []
    for _ in range(12):
        ids = torch.randint(0, 64, (int(torch.randint(3, 16, (), generator=g)),), generator=g).tolist()
        data.append({"input_ids": ids})
    return data


def one_process(ckpt, out, load_in_4bit=False, device="cpu", **kw):
    """The single-process run with the same global batch as the worker's "plain" run: G*N = 4 micro-batches of 1
    per step, SGD without clipping."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model, _ = load_model(ckpt, dtype=dtype, device=device, tokenizer=False, load_in_4bit=load_in_4bit)
    torch.manual_seed(1)  # rank 0's initial adapter
    add_lora(model, r=4, alpha=8, dropout=0.0)
    cfg = TrainConfig(output_dir=str(out), lr_scheduler_type="constant", progress=False, seed=5,
                      per_device_train_batch_size=1, gradient_accumulation_steps=4, save_steps=0,
                      optim="sgd", learning_rate=0.5, max_grad_norm=0.0, **kw)
    tr = Trainer(model, None, examples(), cfg)
    tr.train()
    return tr.history["loss"]


def compare_adapters(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        d = (x[k] - y[k]).abs()
        assert d.max() <= TOL, f"{k}: max |diff| {d.max().item():.3g} at {divmod(int(d.argmax()), d.shape[1])}, " \
                               f"{int((d > TOL).sum())} of {d.numel()} over {TOL}"
    assert max(v.abs().max().item() for k, v in x.items() if "lora_B" in k) > 0  # it trained


def check_losses(got, ref, what, tol=TOL):
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    assert len(got) == len(ref) and max(diffs) <= tol, f"{what}: per-step losses {got} vs {ref}, max diff {max(diffs):.3g}"


def check_peft_loads(ckpt, adapter: Path, hf=None):
    """peft loads the adapter onto the transformers base; its logits equal minitrain's with the same adapter."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from minitrain.lora import load_adapter

    hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    pm = PeftModel.from_pretrained(hf, adapter).eval()
    ours, _ = load_model(ckpt, dtype=torch.float32, device="cpu", tokenizer=False)
    load_adapter(ours, adapter, trainable=False)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        a, b = ours(ids), pm(ids).logits
    d = (a - b).abs()
    assert d.max() <= 1e-4, f"peft vs minitrain logits: max |diff| {d.max().item():.3g}, {int((d > 1e-4).sum())} differ"


def test_two_ranks_train_like_one_process_and_resume_exactly(tmp_path):
    """DDP (fp32 base) and FSDP2 (NF4 base), each: 2 ranks x 2 micro-batches == 1 process x 4, resume exact."""
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "runs"
    torchrun([str(script), str(ckpt), str(out), "ddp,fsdp", "cpu"])  # one launch for both: start-up is most of it
    results = json.loads((out / "losses.json").read_text())
    # FSDP2: rank 0 holds half of the packed NF4 bytes, and about half of all parameter bytes
    assert all(a == 0.5 and 0.45 < b < 0.55 for a, b in results["fsdp"]["shares"]), results["fsdp"]["shares"]
    for mode in ("ddp", "fsdp"):
        got, runs = results[mode], out / mode
        ref = one_process(ckpt, tmp_path / mode, load_in_4bit=mode == "fsdp", max_steps=3)
        check_losses(got["plain"], ref, f"{mode}: 2 ranks x 2 micro-batches vs 1 process x 4")
        compare_adapters(runs / "plain" / "rank0" / "adapter", tmp_path / mode / "adapter")

        # resume: the same losses, metrics and adapter as the uninterrupted 2-rank run (dropout on: RNG per rank)
        check_losses(got["resumed"][-2:], got["full"][-2:], f"{mode}: resumed vs uninterrupted")
        full, res = runs / "full" / "rank0", runs / "resumed" / "rank0"
        lines = [[json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
                 for d in (full, res)]
        assert lines[0] == lines[1] and len(lines[0]) == 4, (mode, lines)
        compare_adapters(full / "adapter", res / "adapter")
        assert sorted(p.name for p in res.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

        # only rank 0 writes: rank 1's output directories never came into being
        assert not any((runs / run / "rank1").exists() for run in ("plain", "full", "resumed")), mode
        assert (runs / "plain" / "rank0" / "loss_curve.png").is_file()
    check_peft_loads(ckpt, out / "ddp" / "plain" / "rank0" / "adapter")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_like_one_gpu(tmp_path):
    """NCCL on 2 GPUs, bf16 autocast, fused kernels on (DDP: 16-bit base; FSDP2: NF4 base): the per-step losses
    of 2 GPUs equal one GPU's on the same global batch within bf16 rounding; the DDP adapter loads in peft (the
    QLoRA one belongs to the NF4 base, which peft would not reproduce)."""
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "runs"
    torchrun([str(script), str(ckpt), str(out), "ddp,fsdp", "cuda"], gpu=True, timeout=400)
    results = json.loads((out / "losses.json").read_text())
    for mode in ("ddp", "fsdp"):
        got = results[mode]
        ref = one_process(ckpt, tmp_path / mode, load_in_4bit=mode == "fsdp", device="cuda", max_steps=3)
        check_losses(got["plain"], ref, f"{mode} on 2 GPUs vs 1 GPU (bf16)", tol=2e-2)
        check_losses(got["resumed"][-2:], got["full"][-2:], f"{mode} on 2 GPUs: resumed vs uninterrupted", tol=2e-2)
        assert not any((out / mode / run / "rank1").exists() for run in ("plain", "full", "resumed")), mode
    check_peft_loads(ckpt, out / "ddp" / "plain" / "rank0" / "adapter")


def test_cli_under_torchrun_matches_one_process(tmp_path):
    from minitrain.cli_train import main

    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    lines = [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (), generator=g)),), generator=g))}
             for _ in range(24)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    common = ["--model", str(ckpt), "--data", str(data), "--max-steps", "3", "--learning-rate", "1e-2",
              "--per-device-train-batch-size", "2", "--no-progress", "--dtype", "fp32", "--lora-r", "4",
              "--save-steps", "0", "--max-seq-length", "32", "--eval-split", "5", "--eval-steps", "2"]
    proc = torchrun(["-m", "minitrain", "train", *common, "--output", str(tmp_path / "two"),
                     "--gradient-accumulation-steps", "1"])
    assert proc.stdout.count("done: 3 steps") == 1, proc.stdout  # printed by rank 0 only
    assert main(["train", *common, "--output", str(tmp_path / "one"), "--gradient-accumulation-steps", "2"]) == 0

    def losses(d, key):
        return [json.loads(l)[key] for l in (d / "metrics.jsonl").read_text().splitlines() if f'"{key}"' in l]

    for key in ("loss", "eval_loss"):  # eval: the ranks share the 5 held-out examples, sums reduced
        two, one = losses(tmp_path / "two", key), losses(tmp_path / "one", key)
        assert len(one) == (3 if key == "loss" else 2)
        check_losses(two, one, f"CLI {key}: torchrun 2 ranks vs 1 process")
    compare_adapters(tmp_path / "two" / "adapter", tmp_path / "one" / "adapter")
    # --fsdp needs torchrun: a plain process gets a one-line error (exit status 2), before loading anything
    assert main(["train", *common, "--output", str(tmp_path / "x"), "--fsdp"]) == 2
    assert not (tmp_path / "x").exists()


EVAL_WORKER = r'''
import sys
import torch
from minitrain import distributed
from minitrain.config import TrainConfig
from minitrain.loader import load_model
from minitrain.lora import add_lora
from minitrain.trainer import Trainer
env = distributed.init_distributed("cpu")
model, _ = load_model(sys.argv[1], dtype=torch.float32, device="cpu", tokenizer=False, load_in_4bit=True)
torch.manual_seed(1)
add_lora(model, r=4, alpha=8)
distributed.shard_model(model)
train = [{"input_ids": list(range(3, 12))} for _ in range(4)]
ev = [{"input_ids": list(range(3, 12))}, {"input_ids": list(range(3, 12)), "labels": [-100] * 9}]
tr = Trainer(model, None, train, TrainConfig(output_dir=sys.argv[2] + f"/rank{env.rank}", max_steps=1, progress=False,
             per_device_train_batch_size=1, per_device_eval_batch_size=1, save_steps=0), eval_dataset=ev)
loss = tr.evaluate()
with open(sys.argv[2] + f"/eval{env.rank}.txt", "w") as f:  # files, not stdout: the ranks' lines interleave
    f.write(f"{loss:.6f}")
distributed.shutdown()
'''


def test_fsdp_eval_with_an_untrained_batch_on_one_rank_does_not_hang(tmp_path):
    """Rank 1's eval batch has no trained label: it must still run the forward, or rank 0's all-gathers wait
    for ever (found in review); both ranks report the same loss (rank 0's batch only)."""
    ckpt = tmp_path / "ckpt"
    make_tiny_checkpoint(ckpt)
    script = tmp_path / "eval_worker.py"
    script.write_text(EVAL_WORKER)
    (tmp_path / "out").mkdir()
    torchrun([str(script), str(ckpt), str(tmp_path / "out")], timeout=120)
    losses = [(tmp_path / "out" / f"eval{r}.txt").read_text() for r in (0, 1)]
    assert losses[0] == losses[1] and float(losses[0]) > 0, losses


VOCAB_WORKER = r'''
import sys
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from minitrain import distributed
env = distributed.init_distributed("cpu")
r = env.rank
g = torch.Generator().manual_seed(0)
V, C = 37, 8  # odd V: FSDP2's torch.chunk shards are 19 and 18 rows
W = torch.randn(V, C, generator=g)
sizes = [5, 0]  # rank 1 has no trained row at all
hs = [torch.randn(n, C, generator=g, dtype=torch.float64).float() for n in sizes]
ys = [torch.randint(0, V, (n,), generator=g) for n in sizes]
ys[0][1] = -100  # an ignored row
head = torch.nn.Linear(C, V, bias=False)
head.weight.data.copy_(W)
head.weight.requires_grad_(False)
fully_shard(head, mesh=init_device_mesh("cpu", (2,)))
h = hs[r].clone().requires_grad_(True)
loss = distributed.vocab_parallel_loss(head, h, ys[r])
(loss * (r + 2)).backward()  # different upstream grads per rank: each token's owner's must be used
ref_h = [x.clone().requires_grad_(True) for x in hs]
ref = [F.cross_entropy(x @ W.t(), y, reduction="sum", ignore_index=-100) for x, y in zip(ref_h, ys)]
sum(l * (i + 2) for i, l in enumerate(ref)).backward()
emb = torch.nn.Embedding(V, C)
emb.weight.data.copy_(W)
emb.weight.requires_grad_(False)
fully_shard(emb, mesh=init_device_mesh("cpu", (2,)))
ids = [torch.randint(0, V, (2, 7), generator=g), torch.randint(0, V, (3,), generator=g)][r]  # any shape per rank
looked = distributed.vocab_parallel_embedding(emb, ids)
out = {"embedding_exact": bool(torch.equal(looked, W[ids])),
       "loss": abs(loss.item() - ref[r].item()), "grad": (h.grad - ref_h[r].grad).abs().max().item() if sizes[r] else 0.0,
       "value": loss.item()}
with open(sys.argv[1] + f"/vp{r}.txt", "w") as f:
    f.write(repr(out))
distributed.shutdown()
'''


def test_vocab_parallel_loss_and_embedding_equal_the_full_weights(tmp_path):
    """FSDP2 never gathers a frozen lm_head or embedding: the vocabulary-parallel loss and its hidden-state gradient
    must equal F.cross_entropy of the full head per rank (uneven shards, an ignored row, a rank without rows,
    different upstream grads per rank), and the lookup must equal indexing the full table exactly."""
    script = tmp_path / "vp_worker.py"
    script.write_text(VOCAB_WORKER)
    torchrun([str(script), str(tmp_path)], timeout=120)
    for r in (0, 1):
        got = eval((tmp_path / f"vp{r}.txt").read_text())
        assert got["loss"] <= 1e-4 and got["grad"] <= 1e-5 and got["embedding_exact"], (r, got)
    assert eval((tmp_path / "vp0.txt").read_text())["value"] > 0


def test_unsharded_tensors_move_once_and_ties_survive():
    """shard_model moves what the root unit keeps (norm, rotary tables, a tied embedding) parameter by parameter:
    a tied lm_head must stay the very same parameter as the embedding after the move (meta device: no GPU needed)."""
    from minitrain.distributed import _move_unsharded_
    from minitrain.model import LlamaForCausalLM, ModelArgs

    model = LlamaForCausalLM(ModelArgs(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    frozen = model.model.norm.weight.requires_grad_(False)
    _move_unsharded_(model, torch.device("meta"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert not model.model.norm.weight.requires_grad and frozen.device.type == "cpu"


TILE_WORKER = r'''
import json, os, sys
import torch
torch.set_num_threads(1)
import minitrain.model as mm
from minitrain import distributed
from minitrain.config import TrainConfig
from minitrain.loader import load_model
from minitrain.lora import add_lora
from minitrain.trainer import Trainer

ckpt, out = sys.argv[1], sys.argv[2]
env = distributed.init_distributed("cpu")
r = env.rank
calls = []  # the tile size of each _TiledMLP.apply
apply = mm._TiledMLP.apply
mm._TiledMLP.apply = lambda *a: (calls.append(a[2]), apply(*a))[1]
seen = set()  # the tile_tokens of the MLPs' forwards (the trainer sets them for train() only)
tiling = mm.LlamaMLP._tiling
mm.LlamaMLP._tiling = lambda self, x: (seen.add(self.tile_tokens), tiling(self, x))[1]

def examples():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (int(torch.randint(3, 16, (), generator=g)),), generator=g).tolist()}
            for _ in range(12)]

def run(mode, tile):
    os.environ["MINITRAIN_MLP_TILE"] = str(tile)  # read by set_gradient_checkpointing
    model, _ = load_model(ckpt, dtype=torch.float32, device=env.device, tokenizer=False, load_in_4bit=mode == "fsdp")
    torch.manual_seed(1 + r)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    if mode == "fsdp":
        distributed.shard_model(model)
    cfg = TrainConfig(output_dir=f"{out}/{mode}/tile{tile}/rank{r}", optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                      lr_scheduler_type="constant", progress=False, seed=5, per_device_train_batch_size=1,
                      gradient_accumulation_steps=2, save_steps=0, max_steps=3, gradient_checkpointing="on")
    n0 = len(calls)
    seen.clear()
    tr = Trainer(model, None, examples(), cfg)
    tr.train()
    return {"loss": tr.history["loss"], "calls": len(calls) - n0, "tile_tokens": sorted(seen)}

res = {f"{mode}{tile}": run(mode, tile) for mode in ("ddp", "fsdp") for tile in (0, 2)}
with open(f"{out}/tiles{r}.json", "w") as f:
    json.dump(res, f)
distributed.shutdown()
'''


def test_two_ranks_tiled_mlp_trains_like_untiled_and_fsdp_stays_untiled(tmp_path):
    """Gradient checkpointing "on" with MINITRAIN_MLP_TILE=2 (micro-batches of 3..15 tokens: those over 8 tokens
    run _TiledMLP): 2 ranks (gloo) give the same per-step losses (SGD, no clipping) and adapter as the untiled
    2-rank run. Under FSDP2 (NF4 base) tile_tokens is set but _TiledMLP.apply is never called (sharded parameters),
    and training matches the untiled FSDP2 run."""
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    script = tmp_path / "tile_worker.py"
    script.write_text(TILE_WORKER)
    out = tmp_path / "runs"
    out.mkdir()
    torchrun([str(script), str(ckpt), str(out)])
    for r in (0, 1):
        res = json.loads((out / f"tiles{r}.json").read_text())
        assert res["ddp0"]["calls"] == 0 and res["ddp0"]["tile_tokens"] == [0], (r, res["ddp0"])
        assert res["ddp2"]["calls"] > 0 and res["ddp2"]["tile_tokens"] == [2], \
            f"rank {r}: MINITRAIN_MLP_TILE=2 never tiled the MLP: {res['ddp2']}"
        check_losses(res["ddp2"]["loss"], res["ddp0"]["loss"], f"rank {r}: DDP tiled vs untiled")
        assert res["fsdp2"]["tile_tokens"] == [2], (r, res["fsdp2"])
        assert res["fsdp2"]["calls"] == 0, f"rank {r}: FSDP2 ran _TiledMLP.apply {res['fsdp2']['calls']} times"
        check_losses(res["fsdp2"]["loss"], res["fsdp0"]["loss"], f"rank {r}: FSDP2 with tiles set vs untiled")
    compare_adapters(out / "ddp" / "tile2" / "rank0" / "adapter", out / "ddp" / "tile0" / "rank0" / "adapter")
    compare_adapters(out / "fsdp" / "tile2" / "rank0" / "adapter", out / "fsdp" / "tile0" / "rank0" / "adapter")
