"""The training loop: parity with transformers + peft, gradient accumulation, exact resume after kill -9,
NaN handling, gradient checkpointing, schedules, diagnostics and the files a run leaves behind.

Oracles: transformers' LlamaForCausalLM wrapped by peft (same checkpoint, same adapter init, same batches,
same optimizer) for the per-step losses; transformers' LR schedulers for the learning rates.
"""
import json
import math
import os
import runpy
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from minitrain.config import TrainConfig
from minitrain.loader import load_model
from minitrain.lora import DEFAULT_TARGETS, add_lora, lora_layers
from minitrain.trainer import ExampleBatches, Trainer, TrainingError, diagnose, lr_at

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_graphs import nf4_projections  # noqa: E402
from test_export import WORDS, make_tiny_checkpoint  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(n, vocab=64, lo=3, hi=20, seed=0):
    """n random variable-length sequences (labels = input ids; the first token is never predicted)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = int(torch.randint(lo, hi, (), generator=g))
        ids = torch.randint(0, vocab, (t,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def quiet(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=0.0,
                save_steps=0, progress=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def adapted(ckpt, seed=1, r=4, dropout=0.0):
    model, tok = load_model(ckpt, dtype=torch.float32, device="cpu", tokenizer=False)
    torch.manual_seed(seed)
    add_lora(model, r=r, alpha=8, dropout=dropout)
    return model


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_loss_curve_matches_transformers_peft(tmp_path, optim):
    from peft import LoraConfig, get_peft_model

    ckpt = tmp_path / "base"
    hf = make_tiny_checkpoint(ckpt)
    model = adapted(ckpt)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(DEFAULT_TARGETS), lora_dropout=0.0))
    with torch.no_grad():  # the same adapter initialization on both sides
        for name, layer in lora_layers(model).items():
            mod = pm.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)
    data = examples(16)
    cfg = quiet(tmp_path, max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2, optim=optim,
                weight_decay=0.01)
    ours = Trainer(model, None, data, cfg)
    ours.train()

    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2, weight_decay=0.01) if optim == "sgd" else \
        torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    batches, it, ref = ExampleBatches(data, 2, shuffle=True, seed=5), None, []
    pm.train()
    for _ in range(6):  # the same batches, loss normalized by the step's trained tokens (HF's num_items_in_batch)
        micro = []
        while len(micro) < 2:
            it = it or iter(batches)
            b = next(it, None)
            if b is None:
                it = None
                continue
            micro.append(b)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            loss = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                      num_items_in_batch=n).loss
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        ref.append(total)
    got = ours.history["loss"]
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    assert len(got) == 6 and max(diffs) <= 1e-4, f"per-step losses differ: ours {got}, transformers+peft {ref}"
    assert all(l.lora_B.abs().max() > 0 for l in lora_layers(model).values())  # it trained


def test_gradient_accumulation_1x8_equals_4x2(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    data = examples(8, lo=2, hi=24, seed=3)  # very different lengths: padding and per-micro-batch means would differ
    finals, losses = [], []
    for bs, ga in ((1, 8), (4, 2)):
        model = adapted(ckpt)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(std=0.02)
        tr = Trainer(model, None, data, quiet(tmp_path / f"{bs}x{ga}", max_steps=2, optim="sgd", learning_rate=0.5,
                                              per_device_train_batch_size=bs, gradient_accumulation_steps=ga))
        tr.train()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        losses.append(tr.history["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    moved = 0.0
    for n in finals[0]:
        d = (finals[0][n] - finals[1][n]).abs().max().item()
        assert d <= 1e-6, f"{n}: 1x8 and 4x2 updates differ by {d:.3g}"
    init = adapted(ckpt)
    moved = max((finals[0][n] - p).abs().max().item() for n, p in init.named_parameters() if p.requires_grad)
    assert moved > 1e-3  # the update is not trivially zero


CHILD = r'''
import os, sys, time
import torch

def train(ckpt, out, kill_at=-1, marker=None):
    torch.set_num_threads(1)
    from minitrain.config import TrainConfig
    from minitrain.loader import load_model
    from minitrain.lora import add_lora
    from minitrain.trainer import Trainer
    model, _ = load_model(ckpt, dtype=torch.float32, device="cpu", tokenizer=False)
    torch.manual_seed(1)
    add_lora(model, r=4, alpha=8, dropout=0.1)  # dropout: resume must restore the RNG too
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(10):
        ids = torch.randint(0, 64, (int(torch.randint(3, 16, (), generator=g)),), generator=g).tolist()
        data.append({"input_ids": ids})
    def cb(trainer, step, metrics):
        if step == kill_at:
            open(marker, "w").write(str(step))
            time.sleep(600)  # killed here, between checkpoints
    cfg = TrainConfig(output_dir=out, max_steps=6, save_steps=2, per_device_train_batch_size=2,
                      gradient_accumulation_steps=2, learning_rate=1e-2, progress=False, seed=7,
                      resume_from_checkpoint="latest")
    Trainer(model, None, data, cfg, callbacks=[cb]).train()
    return model

if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
'''


def test_resume_after_kill_9_gives_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    train = runpy.run_path(str(script), run_name="child")["train"]
    threads = torch.get_num_threads()
    try:
        train(str(ckpt), str(tmp_path / "ref"))  # uninterrupted
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        marker = tmp_path / "reached"
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(tmp_path / "run"), "5", str(marker)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t0 = time.time()
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() - t0 < 240, "the child never reached step 5"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        ckpts = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
        assert ckpts == ["checkpoint-2", "checkpoint-4"], ckpts
        train(str(ckpt), str(tmp_path / "run"))  # resumes from checkpoint-4
    finally:
        torch.set_num_threads(threads)
    ref = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    got = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), f"{k}: max diff {(ref[k] - got[k]).abs().max().item():.3g}"

    def losses(d):
        return [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

    assert losses(tmp_path / "run") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 6


def test_nan_loss_stops_after_saving_the_last_good_state(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model = adapted(ckpt)

    def poison(trainer, step, metrics):  # a numerical blow-up in the forward pass from step 3 on
        if step == 2:
            trainer.model.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))

    tr = Trainer(model, None, examples(12), quiet(tmp_path, max_steps=5, per_device_train_batch_size=2,
                                                  gradient_accumulation_steps=2), callbacks=[poison])
    good = None
    with pytest.raises(TrainingError, match=r"loss is nan at step 3, micro-batch 1 of 2") as e:
        tr.train()
    assert "checkpoint-2" in str(e.value)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "checkpoint-2" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    good = {f"base_model.model.{n}.{w}.weight": getattr(l, w).detach() for n, l in lora_layers(model).items()
            for w in ("lora_A", "lora_B")}
    assert all(torch.equal(saved[k], good[k]) for k in good)
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    # the failing step's batches come next
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "index": 4, "order": "bucketed"}


def test_non_finite_gradient_stops_before_the_update(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model = adapted(ckpt)
    first = next(iter(lora_layers(model).values()))

    def poison(trainer, step, metrics):  # finite loss, NaN gradient from step 2 on
        if step == 1:
            first.lora_A.register_hook(lambda g: g * float("nan"))

    tr = Trainer(model, None, examples(8), quiet(tmp_path, max_steps=3, per_device_train_batch_size=2,
                                                 gradient_accumulation_steps=2), callbacks=[poison])
    with pytest.raises(TrainingError, match=r"gradient norm is nan at step 2"):
        tr.train()
    assert all(torch.isfinite(p).all() for _, p in model.named_parameters())  # the NaN never reached the weights
    assert (tmp_path / "out" / "checkpoint-1" / "adapter" / "adapter_model.safetensors").is_file()


def test_fp16_loss_scaling_skips_an_overflowing_step_and_goes_on(tmp_path):
    """fp16 autocast with dynamic loss scaling: a step whose gradients overflow is skipped (weights untouched,
    scale halved) instead of stopping the run, and the other steps train."""
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model = adapted(ckpt)
    first = next(iter(lora_layers(model).values()))
    snaps, scales, handles = {}, {}, []

    def hook(g):  # an overflow in one backward only
        handles.pop().remove()
        return g * float("inf")

    def watch(trainer, step, metrics):
        snaps[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        scales[step] = trainer.scaler.get_scale()
        if step == 2:
            handles.append(first.lora_A.register_hook(hook))

    tr = Trainer(model, None, examples(16), quiet(tmp_path, max_steps=5, fp16=True, per_device_train_batch_size=2,
                                                  gradient_accumulation_steps=2, learning_rate=1e-2), callbacks=[watch])
    assert tr.amp_dtype == torch.float16 and tr.scaler.is_enabled()
    tr.train()  # no TrainingError: the scaler handles the overflow
    assert all(torch.equal(snaps[3][n], snaps[2][n]) for n in snaps[2]), "the overflowing step changed the weights"
    assert scales[3] == scales[2] / 2, scales
    assert any(not torch.equal(snaps[4][n], snaps[3][n]) for n in snaps[3]), "training did not go on"
    assert all(torch.isfinite(p).all() for _, p in model.named_parameters())
    assert all(torch.isfinite(torch.tensor(tr.history["loss"])))


def test_gradient_checkpointing_modes_give_the_same_training(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    results = []
    for mode in ("off", "on", "offload"):
        model = adapted(ckpt)
        tr = Trainer(model, None, examples(8), quiet(tmp_path / mode, max_steps=2, gradient_checkpointing=mode,
                                                     per_device_train_batch_size=2, gradient_accumulation_steps=2))
        tr.train()
        results.append((tr.history["loss"], {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # unwrapped afterwards
    for losses, params in results[1:]:
        assert losses == pytest.approx(results[0][0], abs=1e-6)
        for n, p in params.items():
            assert torch.allclose(p, results[0][1][n], atol=1e-6), n


# ---- the checkpoint recomputation skips the MLP down projection's unused output ----------------------------
# (tiny Llama built in memory; the LoRA projections forced onto the hand-written autograd Functions, which "auto"
# keeps for CUDA tensors, so the CPU runs the code the GPU runs)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def fused_lora_on_cpu(monkeypatch):
    """LoRALinear through triton_ops.lora's hand-written path on CPU, and a count of base-weight dequantizes
    (``_dense``) per weight object: the down projection's forward dequantizes its weight once per run."""
    import functools

    import minitrain.lora as mlora
    import triton_ops.lora as tlora

    monkeypatch.setattr(mlora, "_fused_lora_linear", functools.partial(tlora.lora_linear, backend="triton"))
    calls = {}
    dense = tlora._dense

    def counting(base, dtype):
        calls[id(base)] = calls.get(id(base), 0) + 1
        return dense(base, dtype)

    monkeypatch.setattr(tlora, "_dense", counting)
    return calls


def tiny_lora_model(nf4=False, dropout=0.0):
    from minitrain.model import LlamaForCausalLM, ModelArgs

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelArgs(**TINY))
    if nf4:
        nf4_projections(model)
    add_lora(model, r=4, alpha=8, dropout=dropout)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)  # B != 0: every adapter gradient is exercised
    return model.train()


def loss_and_grads(model, mode, calls, early_stop=True):
    """One forward + backward; returns the loss, the adapter gradients and the down weights' dequantize counts."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from minitrain.trainer import set_gradient_checkpointing

    set_gradient_checkpointing(model, mode)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(7))
    calls.clear()
    torch.manual_seed(3)  # the same dropout masks in every run
    with set_checkpoint_early_stop(early_stop):
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    set_gradient_checkpointing(model, "off")
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    downs = [calls.get(id(layer.mlp.down_proj.base_layer.weight), 0) for layer in model.model.layers]
    return loss.detach(), g, downs


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-recompute"])
@pytest.mark.parametrize("mode", ["on", "offload"])
@pytest.mark.parametrize("nf4,dropout", [(False, 0.0), (True, 0.1)], ids=["fp32", "nf4+dropout"])
def test_recompute_skips_the_unused_down_output_exactly(fused_lora_on_cpu, monkeypatch, nf4, dropout, mode,
                                                        early_stop):
    import minitrain.trainer as mt

    model = tiny_lora_model(nf4, dropout)
    skip = loss_and_grads(model, mode, fused_lora_on_cpu, early_stop)
    monkeypatch.setattr(mt, "RECOMPUTE_SKIPS_UNUSED_OUTPUT", False)
    full = loss_and_grads(model, mode, fused_lora_on_cpu, early_stop)
    off = loss_and_grads(model, "off", fused_lora_on_cpu)
    n = len(model.model.layers)
    # forward + backward (dx) dequantize the down weight; the recomputation does only without the skip
    assert skip[2] == [2] * n and full[2] == [3] * n and off[2] == [2] * n, (skip[2], full[2], off[2])
    assert torch.equal(skip[0], full[0]), (skip[0], full[0])
    for name, g in skip[1].items():
        d = (g - full[1][name]).abs()
        assert torch.equal(g, full[1][name]), f"{name}: max diff {d.max().item():.3g}, {int((d > 0).sum())} differ"
    assert skip[0].item() == pytest.approx(off[0].item(), abs=1e-6)
    for name, g in skip[1].items():
        assert torch.allclose(g, off[1][name], atol=1e-6), name


def test_recompute_skip_flag_is_set_only_in_the_recomputation_and_reset_on_errors(fused_lora_on_cpu):
    """The flag is on while the layer is recomputed, off in the forward, and off again after the recomputation
    ends: normally (checkpoint's early stop raises inside the layer) or by an error in the layer."""
    import triton_ops.lora as tlora
    from minitrain.trainer import set_gradient_checkpointing

    model = tiny_lora_model()
    seen, fail = [], []

    def probe(mod, args):  # a pre-hook: it cannot read the MLP's output, so the skip stays allowed
        marked = getattr(tlora._unused, "bases", ())
        seen.append(marked[0] if len(marked) == 1 else (None if not marked else marked))
        if fail:
            raise RuntimeError("boom in the recomputation")

    down = [layer.mlp.down_proj.base_layer.weight for layer in model.model.layers]
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(probe)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    for mode in ("on", "offload"):
        set_gradient_checkpointing(model, mode)
        seen.clear()
        model(ids).square().mean().backward()
        assert seen[:2] == [None, None], "flag set during the forward"
        assert seen[2] is down[1] and seen[3] is down[0], "the recomputation (last layer first) is not flagged"
        assert getattr(tlora._unused, "bases", ()) == ()
        loss = model(ids).square().mean()
        fail.append(1)
        with pytest.raises(RuntimeError, match="boom in the recomputation"):
            loss.backward()
        fail.clear()
        assert getattr(tlora._unused, "bases", ()) == (), "flag left set after an error"
        model.zero_grad(set_to_none=True)
    set_gradient_checkpointing(model, "off")


def test_recompute_skip_only_where_the_output_is_provably_unused(fused_lora_on_cpu):
    from minitrain.trainer import CheckpointedLayer, unused_output_base

    model = tiny_lora_model()
    layer = model.model.layers[0]
    assert unused_output_base(layer.forward) is layer.mlp.down_proj.base_layer.weight
    h = layer.mlp.register_forward_hook(lambda mod, args, out: None)  # a hook could read the output
    assert unused_output_base(layer.forward) is None
    h.remove()
    h = layer.mlp.down_proj.register_forward_hook(lambda mod, args, out: None)
    assert unused_output_base(layer.forward) is None
    h.remove()
    assert unused_output_base(layer.self_attn.forward) is None  # not a decoder layer
    assert unused_output_base(CheckpointedLayer(layer).forward) is layer.mlp.down_proj.base_layer.weight
    layer.self_attn.o_proj.base_layer.weight = layer.mlp.down_proj.base_layer.weight  # another user of the weight
    assert unused_output_base(layer.forward) is None
    plain = tiny_lora_model()
    plain.model.layers[0].mlp.down_proj = plain.model.layers[0].mlp.down_proj.base_layer  # no LoRA on down
    assert unused_output_base(plain.model.layers[0].forward) is None


def _eager_loss_and_grads(model, batch, n):
    """(loss, adapter grads) of one eager bf16-autocast forward + backward on CUDA."""
    from minitrain.trainer import token_loss_sum
    from test_cuda_graphs import grads

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = token_loss_sum(model, batch) / n
    loss.backward()
    torch.cuda.synchronize()
    return loss.detach().float(), grads(model)


def _graphed_loss_and_grads(model, batch, n, B, T):
    """(loss, adapter grads, None) replayed from the trainer's CUDA graph: warm-up, capture + replay, replay."""
    from minitrain.cuda_graphs import GraphedLoss, zero_grads
    from test_cuda_graphs import grads

    gl = GraphedLoss(model, B, T, warmup=1)
    for _ in range(3):
        zero_grads(gl.params)
        loss = gl(batch, n)
    torch.cuda.synchronize()
    assert gl.graph is not None
    return loss.detach().float(), grads(model), None


def _within_run_to_run(run, what: str):
    """run(False) twice and run(True) once, each (loss, {name: grad}, extra): the True run may differ from the False
    one by at most twice the spread of the two False runs (bit for bit where they agree). Returns both runs."""
    def spread(a, b):
        return max([(a[0] - b[0]).abs().item()] + [(a[1][k] - b[1][k]).abs().max().item() for k in a[1]])

    base, base2, alt = run(False), run(False), run(True)
    noise, diff = spread(base, base2), spread(alt, base)
    assert diff <= 2 * noise, f"{run.__name__}: {what} differ by {diff:.3g} (run-to-run {noise:.3g})"
    return base, alt


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_recompute_skip_is_exact_on_cuda_eager_and_graphed(mode, monkeypatch):
    """bf16 QLoRA on CUDA: the skip drops one down-weight dequantize per layer from the eager step, and with and
    without it the loss and adapter gradients agree, eager and replayed from a CUDA graph: bit for bit where two
    runs without the skip do (the attention backward need not be deterministic), else within their spread."""
    import minitrain.trainer as mt
    import triton_ops.lora as tlora
    from minitrain.trainer import n_items, set_gradient_checkpointing
    from test_cuda_graphs import model_with_lora, random_batch

    B, T = 2, 200
    batch = random_batch(B, T, "cuda", seed=5)
    n = n_items(batch)
    calls = []
    dense, dense_into = tlora._dense, tlora._dense_into  # plain dequantizes, and those into a folded GEMM's buffer
    monkeypatch.setattr(tlora, "_dense", lambda base, dtype: (calls.append(base), dense(base, dtype))[1])
    monkeypatch.setattr(tlora, "_dense_into", lambda base, out: (calls.append(base), dense_into(base, out))[1])

    def eager(skip):
        monkeypatch.setattr(mt, "RECOMPUTE_SKIPS_UNUSED_OUTPUT", skip)
        model = model_with_lora("cuda", torch.bfloat16, nf4=True)
        set_gradient_checkpointing(model, mode)
        calls.clear()
        loss, g = _eager_loss_and_grads(model, batch, n)
        downs = [sum(c is layer.mlp.down_proj.base_layer.weight for c in calls) for layer in model.model.layers]
        return loss, g, downs

    def graphed(skip):
        monkeypatch.setattr(mt, "RECOMPUTE_SKIPS_UNUSED_OUTPUT", skip)
        model = model_with_lora("cuda", torch.bfloat16, nf4=True)
        set_gradient_checkpointing(model, mode)
        return _graphed_loss_and_grads(model, batch, n, B, T)

    for run in (eager, graphed):
        full, skip = _within_run_to_run(run, "skip vs no skip")
        if run is eager:
            layers = len(skip[2])
            assert skip[2] == [2] * layers and full[2] == [3] * layers, (skip[2], full[2])


# ---- gradient_checkpointing="offload": each decoder layer as two checkpoint segments (x -> h1 -> out) ----------
def offload_run(model, monkeypatch, split, calls, autocast=False, early_stop=True, forwards=1, keep_mlp=0,
                calibrate=None):
    """One backward of ``forwards`` summed losses with gradient_checkpointing="offload", the split on or off.
    Returns the loss, the adapter gradients, per layer the dequantize counts of o_proj's and down's base weights,
    the stash indices in the order HostOffload.stash was called, and per layer gate's dequantize count.
    ``keep_mlp``: KEEP_MLP_LAYERS for the run; ``calibrate(policy)`` is called with the KeepMLPPolicy of "auto"."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    import minitrain.trainer as mt

    monkeypatch.setattr(mt, "SPLIT_OFFLOAD_SEGMENTS", split)
    monkeypatch.setattr(mt, "KEEP_MLP_LAYERS", keep_mlp)
    stashes, stash = [], mt.HostOffload.stash

    def spy(self, index, x, **kw):
        stashes.append(index)
        return stash(self, index, x, **kw)

    monkeypatch.setattr(mt.HostOffload, "stash", spy)
    policy = mt.set_gradient_checkpointing(model, "offload")
    if callable(calibrate):
        calibrate(policy)
    calls.clear()
    torch.manual_seed(3)  # the same dropout masks in every run
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), set_checkpoint_early_stop(early_stop):
            loss = 0
            for k in range(forwards):
                ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(7 + k))
                logits = model(ids)[:, :-1].float()
                loss = loss + torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    finally:
        mt.set_gradient_checkpointing(model, "off")
        monkeypatch.setattr(mt.HostOffload, "stash", stash)
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    layers = model.model.layers
    o = [calls.get(id(layer.self_attn.o_proj.base_layer.weight), 0) for layer in layers]
    down = [calls.get(id(layer.mlp.down_proj.base_layer.weight), 0) for layer in layers]
    gate = [calls.get(id(layer.mlp.gate_proj.base_layer.weight), 0) for layer in layers]
    return loss.detach(), g, o, down, stashes, gate


def assert_same_bits(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name, g in a[1].items():
        d = (g.float() - b[1][name].float()).abs()
        assert torch.equal(g, b[1][name]), f"{name}: max diff {d.max().item():.3g}, {int((d > 0).sum())} differ"


def bf16_bases(model):
    """Every LoRA projection's base weight (and bias) in bf16: the 16-bit base the hand-written path casts."""
    for layer in lora_layers(model).values():
        layer.base_layer.to(torch.bfloat16)
    return model


SPLIT_CASES = {  # (nf4 bases, 16-bit bases under bf16 autocast, dropout, GROUPED_LORA, MLP's SwiGLU on the kernel)
    "fp32": (False, False, 0.0, True, False),  # q/k/v grouped (lora_qkv), the MLP module by module
    "fp32-ungrouped": (False, False, 0.0, False, False),  # minitrain.model.GROUPED_LORA = False
    "bf16-autocast+dropout": (False, True, 0.1, True, False),  # 16-bit bases, bf16 compute
    "nf4+dropout": (True, False, 0.1, True, False),
    "nf4+dropout-ungrouped": (True, False, 0.1, False, False),
    "nf4+dropout-grouped-mlp": (True, False, 0.1, True, True),  # one lora_mlp call per MLP
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_offload_split_is_bit_identical_and_skips_o_proj(fused_lora_on_cpu, monkeypatch, case):
    """Two segments per layer (stashes x and h1) give the same loss and adapter gradients, bit for bit, as one
    segment; the attention half's recomputation runs no o_proj (dequantize only in forward and backward), the MLP
    half's no down projection (and, grouped, no SwiGLU); close to no checkpointing."""
    import minitrain.model as mm

    nf4, bf16, dropout, grouped, grouped_mlp = SPLIT_CASES[case]
    monkeypatch.setattr(mm, "GROUPED_LORA", grouped)
    model = tiny_lora_model(nf4, dropout)
    if bf16:
        bf16_bases(model)
    swiglu = []
    if grouped_mlp:  # the MLP's SwiGLU on the Triton kernel: LlamaMLP makes one lora_mlp call
        import triton_ops.lora as tlora

        for layer in model.model.layers:
            layer.mlp.kernel_backend = "triton"
        sw = tlora._swiglu_fwd_op
        monkeypatch.setattr(tlora, "_swiglu_fwd_op", lambda *a, **kw: (swiglu.append(1), sw(*a, **kw))[1])
    n = len(model.model.layers)
    split = offload_run(model, monkeypatch, True, fused_lora_on_cpu, autocast=bf16)
    n_sw = len(swiglu)
    one = offload_run(model, monkeypatch, False, fused_lora_on_cpu, autocast=bf16)
    assert split[4] == list(range(2 * n)) and one[4] == list(range(0, 2 * n, 2)), (split[4], one[4])
    # forward + backward (dx) dequantize o_proj's and down's weights; o_proj's recomputation only without split
    assert split[2] == [2] * n and one[2] == [3] * n, (split[2], one[2])
    assert split[3] == [2] * n and one[3] == [2] * n, (split[3], one[3])
    if grouped_mlp:
        assert n_sw == n and len(swiglu) == 2 * n, (n_sw, len(swiglu))  # the forward's SwiGLU only
    assert_same_bits(split, one)
    if not bf16:
        off = loss_and_grads(model, "off", fused_lora_on_cpu)
        assert split[0].item() == pytest.approx(off[0].item(), abs=1e-6)
        for name, g in split[1].items():
            assert torch.allclose(g, off[1][name], rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-recompute"])
def test_offload_split_without_recompute_skip_and_two_forwards(fused_lora_on_cpu, monkeypatch, early_stop):
    """The split alone (skip off) and the split with the skip agree bit for bit with one segment, with and
    without checkpoint's early stop; two forwards before one backward (two summed losses) stash twice over."""
    import minitrain.trainer as mt

    model = tiny_lora_model(True, 0.1)
    n = len(model.model.layers)
    want = offload_run(model, monkeypatch, False, fused_lora_on_cpu, early_stop=early_stop, forwards=2)
    got = offload_run(model, monkeypatch, True, fused_lora_on_cpu, early_stop=early_stop, forwards=2)
    assert got[4] == list(range(2 * n)) * 2 and got[2] == [4] * n and want[2] == [6] * n, (got[4], got[2], want[2])
    assert_same_bits(got, want)
    monkeypatch.setattr(mt, "RECOMPUTE_SKIPS_UNUSED_OUTPUT", False)
    plain = offload_run(model, monkeypatch, True, fused_lora_on_cpu, early_stop=early_stop, forwards=2)
    assert plain[2] == [6] * n and plain[3] == [6] * n, (plain[2], plain[3])
    assert_same_bits(plain, want)


ATTN_REUSE_CASES = ["reuse", "outputs-only", "over-budget", "nothing-fits", "two-forwards", "full-recompute"]


@pytest.mark.parametrize("case", ATTN_REUSE_CASES)
def test_offload_split_reuses_the_attention_output(fused_lora_on_cpu, monkeypatch, case):
    """The attention half's forward keeps the attention output and log-sum-exp with its input (host copies);
    its recomputation then runs no attention kernel and gives the same loss and adapter gradients bit for bit
    as recomputing the attention through the same Function (cuDNN's ops on CUDA, fp32 math on this CPU path),
    also over the host budget (nothing kept: recomputed, the Function's path again), with two forwards before
    one backward and without checkpoint's early stop; close to plain SDPA."""
    import minitrain.model as mm
    import minitrain.trainer as mt

    monkeypatch.setattr(mm, "SAVED_ATTENTION_ON_CPU", True)
    forwards = 2 if case == "two-forwards" else 1
    early_stop = case != "full-recompute"
    model = tiny_lora_model(True, 0.1)
    n = len(model.model.layers)
    kernels, math = [], mm._attention_math
    monkeypatch.setattr(mm, "_attention_math", lambda *a: (kernels.append(1), math(*a))[1])
    x_bytes = 2 * 11 * TINY["hidden_size"] * 4  # one stash: (B, T, C) fp32
    if case == "over-budget":  # room for the first input only, not for its attention tensors: recomputed; the
        monkeypatch.setenv(mt.HOST_BUDGET_ENV, str(1.5 * x_bytes / 2**30))  # other inputs stay on the device
    if case == "nothing-fits":  # every input stays on the device; the attention is recomputed there, its outputs
        monkeypatch.setenv(mt.HOST_BUDGET_ENV, "0")  # never kept beside them
    if case == "outputs-only":  # out and lse kept, q/k/v recomputed by their projections
        monkeypatch.setattr(mt, "REUSE_ATTENTION_INPUTS", False)
    kept, keep = [], mt.HostOffload.keep_attention
    monkeypatch.setattr(mt.HostOffload, "keep_attention", lambda self, s, saved: (kept.append(s.index),
                                                                                keep(self, s, saved))[1])
    got = offload_run(model, monkeypatch, True, fused_lora_on_cpu, early_stop=early_stop, forwards=forwards)
    assert kept == list(range(0, 2 * n, 2)) * forwards, kept
    # q/k/v's base weights: dequantized in the forward and the backward (not layer 0's: its input, the embedding,
    # needs no gradient), and in the recomputation only where the attention did not get its inputs back
    qkv = [[fused_lora_on_cpu.get(id(getattr(layer.self_attn, p).base_layer.weight), 0) for p in ("q_proj", "k_proj",
            "v_proj")] for layer in model.model.layers]
    again = [case in ("outputs-only", "nothing-fits", "over-budget") for i in range(n)]
    assert qkv == [[(1 + (i > 0) + a) * forwards] * 3 for i, a in enumerate(again)], (case, qkv)
    # the attention kernel runs in the forward, and again only where its output was not kept
    recomputed = n if case in ("over-budget", "nothing-fits") else 0
    assert len(kernels) == (n + recomputed) * forwards, (case, len(kernels))
    kernels.clear()
    monkeypatch.setattr(mt.HostOffload, "saved_attention", lambda self, s: None)  # recompute it, same Function
    want = offload_run(model, monkeypatch, True, fused_lora_on_cpu, early_stop=early_stop, forwards=forwards)
    assert len(kernels) == 2 * n * forwards, len(kernels)
    assert_same_bits(got, want)
    monkeypatch.setattr(mt, "REUSE_ATTENTION_OUTPUT", False)  # plain SDPA: the same up to rounding
    kernels.clear()
    sdpa = offload_run(model, monkeypatch, True, fused_lora_on_cpu, early_stop=early_stop, forwards=forwards)
    assert kernels == []
    assert got[0].item() == pytest.approx(sdpa[0].item(), abs=1e-5)
    for name, g in got[1].items():
        assert torch.allclose(g, sdpa[1][name], rtol=1e-4, atol=1e-5), name


@pytest.mark.parametrize("room", [0, 1, 2], ids=["inputs-only", "one-attention", "all"])
def test_offload_attention_copies_never_push_an_input_over_the_host_budget(fused_lora_on_cpu, monkeypatch, room):
    """A host budget with room for every segment input (and ``room`` layers' attention tensors): every input goes
    to host as without attention reuse; an attention's copies are kept only where the inputs stashed after them
    still fit, all of its tensors or none (no host buffer allocated for an attention that is recomputed)."""
    import minitrain.model as mm
    import minitrain.trainer as mt

    monkeypatch.setattr(mm, "SAVED_ATTENTION_ON_CPU", True)
    model = tiny_lora_model(True, 0.1)
    n = len(model.model.layers)
    B, T, C, H, KV = 2, 11, TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_key_value_heads"]
    x_bytes = B * T * C * 4
    attn_bytes = (2 * B * T * C + B * H * T + 2 * B * T * C // H * KV) * 4  # out, lse, q, k, v (fp32)
    monkeypatch.setenv(mt.HOST_BUDGET_ENV, str((2 * n * x_bytes + room * attn_bytes) / 2**30))
    offloads, init = [], mt.HostOffload.__init__
    monkeypatch.setattr(mt.HostOffload, "__init__", lambda self, *a, **k: (offloads.append(self), init(self, *a, **k))[1])
    got = offload_run(model, monkeypatch, True, fused_lora_on_cpu)
    off = offloads[-1]
    assert off.kept_last_step == 0, f"{off.kept_last_step} segment inputs left on the device by attention copies"
    attn_keys = sorted({k[0] for k in off.buffers if "attn" in k})
    assert attn_keys == list(range(0, 2 * room, 2)), f"attention host buffers of stashes {attn_keys}, room {room}"
    assert off.host_bytes() == 2 * n * x_bytes + room * attn_bytes, (off.host_bytes(), x_bytes, attn_bytes)
    monkeypatch.setattr(mt.HostOffload, "saved_attention", lambda self, s: None)  # recompute it, same Function
    assert_same_bits(got, offload_run(model, monkeypatch, True, fused_lora_on_cpu))


def test_unused_qkv_bases_only_where_nothing_reads_the_outputs(fused_lora_on_cpu):
    from minitrain.trainer import unused_qkv_bases

    def bases(layer):
        return [next(n for n in ("q_proj", "k_proj", "v_proj") if getattr(layer.self_attn, n).base_layer.weight is w)
                for w in unused_qkv_bases(layer)]

    layer = tiny_lora_model().model.layers[0]
    assert bases(layer) == ["q_proj", "k_proj", "v_proj"]
    h = layer.self_attn.k_proj.register_forward_hook(lambda *a: None)  # could read k's output: k computed
    assert bases(layer) == ["q_proj", "v_proj"]
    h.remove()
    h = layer.self_attn.register_forward_hook(lambda *a: None)
    assert bases(layer) == []
    h.remove()
    layer.self_attn.qkv = lambda x: (x, x, x)  # another qkv: its outputs may go anywhere
    assert bases(layer) == []
    del layer.self_attn.qkv
    layer.self_attn.v_proj.base_layer.weight = layer.self_attn.q_proj.base_layer.weight  # one weight, two modules
    assert bases(layer) == ["k_proj"]


def test_offload_second_backward_refuses_an_overwritten_attention_buffer(fused_lora_on_cpu, monkeypatch):
    """retain_graph: a second backward must not read attention copies a later forward overwrote. Here forward A
    keeps no attention (reuse off) and is still pending, so forward B's inputs get private host buffers but its
    attention the layer's shared ones; after B's backward, forward C takes those again. B's second backward
    refuses (before, only the input's buffer was checked: it read C's attention silently)."""
    import minitrain.model as mm
    import minitrain.trainer as mt

    monkeypatch.setattr(mm, "SAVED_ATTENTION_ON_CPU", True)
    model = tiny_lora_model(True, 0.0)
    mt.set_gradient_checkpointing(model, "offload")
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    try:
        monkeypatch.setattr(mt, "REUSE_ATTENTION_OUTPUT", False)
        loss_a = model(ids).square().mean()  # noqa: F841  (pending: its stashes hold the inputs' buffers)
        monkeypatch.setattr(mt, "REUSE_ATTENTION_OUTPUT", True)
        loss_b = model(ids).square().mean()
        loss_b.backward(retain_graph=True)
        model(ids).square().mean().backward()  # forward C reuses B's attention buffers
        with pytest.raises(RuntimeError, match="reused by a later forward"):
            loss_b.backward()
    finally:
        mt.set_gradient_checkpointing(model, "off")


def test_saved_attention_math_matches_sdpa_and_autograd():
    """The CPU path of _SavedAttentionFn: causal GQA output and its hand-written backward against SDPA with
    repeated k/v and autograd, and the output handed to ``keep`` is the one returned."""
    import torch.nn.functional as F

    from minitrain.model import _SavedAttentionFn

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 6, 9, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64).requires_grad_()
    dout = torch.randn(2, 6, 9, 8, generator=g, dtype=torch.float64)
    kept = []
    out = _SavedAttentionFn.apply(q, k, v, 8 ** -0.5, kept.append, None)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert len(kept) == 1 and kept[0].out is out and kept[0].lse.shape == (2, 6, 9, 1)
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # given the saved output, the forward computes nothing and the backward is the same
    again = _SavedAttentionFn.apply(q, k, v, 8 ** -0.5, None, kept[0])
    assert again.data_ptr() == out.data_ptr()
    for a, b in zip(torch.autograd.grad(again, (q, k, v), dout), grads):
        assert torch.equal(a, b)


def test_offload_split_flags_each_recomputation_with_its_unused_projection(fused_lora_on_cpu):
    """Pre-hooks (which cannot read an output) on o_proj and down_proj see no flag in the forward; in the backward
    each half is recomputed (MLP half first) under its own projection's base, and the flag is reset after."""
    import triton_ops.lora as tlora
    from minitrain.trainer import set_gradient_checkpointing

    model = tiny_lora_model()
    seen = []
    for i, layer in enumerate(model.model.layers):
        for name, m in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj)):
            m.register_forward_pre_hook(
                lambda mod, args, tag=(name, i): seen.append((tag, getattr(tlora._unused, "bases", ()))))
    set_gradient_checkpointing(model, "offload")
    model(torch.randint(0, TINY["vocab_size"], (2, 9))).square().mean().backward()
    set_gradient_checkpointing(model, "off")
    L = model.model.layers
    w = {(k, i): (L[i].self_attn.o_proj if k == "o" else L[i].mlp.down_proj).base_layer.weight
         for k in ("o", "down") for i in range(len(L))}
    order = [("o", 0), ("down", 0), ("o", 1), ("down", 1), ("down", 1), ("o", 1), ("down", 0), ("o", 0)]
    assert [t for t, _ in seen] == order, seen
    assert all(b == () for _, b in seen[:4]), "flag set during the forward"
    assert all(len(b) == 1 and b[0] is w[t] for t, b in seen[4:]), "a recomputation not flagged with its own projection"
    assert getattr(tlora._unused, "bases", ()) == ()


def test_offload_split_only_where_it_is_the_same_computation(fused_lora_on_cpu, monkeypatch):
    """split_layer / unused_attention_output_base: hooks on the layer (or a global one), a KV cache, a subclass or
    a patched forward keep one segment; a forward hook on o_proj or a shared o_proj weight keeps the split but
    not the o_proj skip. Forward hooks on the layer and on o_proj leave the gradients bit-identical."""
    import functools

    import minitrain.model as mm
    import minitrain.trainer as mt
    from minitrain.trainer import split_layer, unused_attention_output_base

    model = tiny_lora_model()
    layer = model.model.layers[0]
    o_w = layer.self_attn.o_proj.base_layer.weight
    c = object()
    assert split_layer(layer.forward, (c, c, c), {}) is layer
    assert split_layer(layer.forward, (c, c, c, None), {}) is layer
    assert split_layer(layer.forward, (c, c, c), {"cache": None}) is layer
    assert split_layer(layer.forward, (c, c, c, c), {}) is None  # a KV cache
    assert split_layer(layer.self_attn.forward, (c, c, c), {}) is None
    assert unused_attention_output_base(layer) is o_w
    monkeypatch.setattr(mt, "SPLIT_OFFLOAD_SEGMENTS", False)
    assert split_layer(layer.forward, (c, c, c), {}) is None
    monkeypatch.setattr(mt, "SPLIT_OFFLOAD_SEGMENTS", True)
    for target in (layer, layer.self_attn, layer.mlp):
        for reg in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"):
            h = getattr(target, reg)(lambda *a: None)
            assert split_layer(layer.forward, (c, c, c), {}) is None, (type(target).__name__, reg)
            h.remove()
    h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert split_layer(layer.forward, (c, c, c), {}) is None
        assert unused_attention_output_base(layer) is None
    finally:
        h.remove()

    class Sub(mm.LlamaDecoderLayer):
        pass

    sub = Sub(model.model.args, 0)
    assert split_layer(sub.forward, (c, c, c), {}) is None
    with monkeypatch.context() as mp:  # a class-level patch, even one calling the original
        mp.setattr(mm.LlamaDecoderLayer, "forward", lambda self, *a: mt._DECODER_FORWARD(self, *a))
        assert split_layer(layer.forward, (c, c, c), {}) is None
    with monkeypatch.context() as mp:
        mp.setattr(mm.LlamaAttention, "forward", lambda self, *a: mt._ATTENTION_FORWARD(self, *a))
        assert split_layer(layer.forward, (c, c, c), {}) is layer and unused_attention_output_base(layer) is None
    layer.self_attn.forward = functools.partial(mm.LlamaAttention.forward, layer.self_attn)  # on the instance
    assert split_layer(layer.forward, (c, c, c), {}) is None and unused_attention_output_base(layer) is None
    del layer.self_attn.forward
    assert split_layer(layer.forward, (c, c, c), {}) is layer and unused_attention_output_base(layer) is o_w
    h = layer.self_attn.o_proj.register_forward_hook(lambda *a: None)
    assert split_layer(layer.forward, (c, c, c), {}) is layer and unused_attention_output_base(layer) is None
    h.remove()
    plain = tiny_lora_model()
    p0 = plain.model.layers[0]
    p0.self_attn.o_proj = p0.self_attn.o_proj.base_layer  # no LoRA on o_proj
    assert split_layer(p0.forward, (c, c, c), {}) is p0 and unused_attention_output_base(p0) is None
    p0.self_attn.o_proj = torch.nn.Identity()
    assert unused_attention_output_base(p0) is None
    p1 = plain.model.layers[1]
    p1.self_attn.q_proj.base_layer.weight = p1.self_attn.o_proj.base_layer.weight  # another user of the weight
    assert split_layer(p1.forward, (c, c, c), {}) is p1 and unused_attention_output_base(p1) is None

    # gradients: a forward hook on o_proj (split, no o_proj skip) and on every layer (one segment)
    calls = fused_lora_on_cpu
    n = len(model.model.layers)
    want = offload_run(model, monkeypatch, False, calls)
    hs = [m.self_attn.o_proj.register_forward_hook(lambda *a: None) for m in model.model.layers]
    got = offload_run(model, monkeypatch, True, calls)
    assert got[4] == list(range(2 * n)) and got[2] == [3] * n and got[3] == [2] * n, got[2:]
    assert_same_bits(got, want)
    for h in hs:
        h.remove()
    hs = [m.register_forward_hook(lambda mod, args, out: None) for m in model.model.layers]
    got = offload_run(model, monkeypatch, True, calls)
    assert got[4] == list(range(0, 2 * n, 2)) and got[2] == [3] * n, got[2:]
    assert_same_bits(got, want)
    for h in hs:
        h.remove()


def test_split_switch_is_read_from_the_environment():
    import minitrain.trainer as mt

    assert mt.SPLIT_OFFLOAD_SEGMENTS is (os.environ.get("MINITRAIN_SPLIT_CHECKPOINT", "1") not in ("0", "off"))
    code = "import minitrain.trainer as t; print(t.SPLIT_OFFLOAD_SEGMENTS)"
    env = dict(os.environ, MINITRAIN_SPLIT_CHECKPOINT=" Off ")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", (out.stdout, out.stderr[-2000:])


# ---- checkpointed MLPs in token tiles (minitrain.model._TiledMLP) ------------------------------------------
def _gate_down_dequants(model, calls):
    layers = model.model.layers
    return ([calls.get(id(l.mlp.gate_proj.base_layer.weight), 0) for l in layers],
            [calls.get(id(l.mlp.down_proj.base_layer.weight), 0) for l in layers])


@pytest.mark.parametrize("early_stop", [True, False], ids=["early-stop", "full-recompute"])
@pytest.mark.parametrize("mode", ["on", "offload", "offload-one-segment"])
@pytest.mark.parametrize("grouped", [False, True], ids=["module-by-module", "grouped-mlp"])
def test_tiled_mlp_matches_untiled_with_fewer_dequantizes(fused_lora_on_cpu, monkeypatch, mode, early_stop, grouped):
    """With checkpointing, an MLP over more than 4 tiles' worth of tokens runs tile by tile
    (MINITRAIN_MLP_TILE=4: 22 tokens in 6 tiles of 4): the same loss and adapter gradients as untiled (fp32
    GEMMs of other row counts: 1e-5), each NF4 base dequantized once in the forward and once in the backward for all tiles (untiled: gate's 3
    times, with the recomputation's), no MLP work in the recomputation; the tile's own recomputation skips down."""
    import minitrain.model as mm
    import minitrain.trainer as mt
    import triton_ops.lora as tlora

    model = tiny_lora_model(True, 0.0)
    for name, p in model.named_parameters():  # non-zero B: every adapter gradient is exercised
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    if grouped:
        for layer in model.model.layers:
            layer.mlp.kernel_backend = "triton"
    n = len(model.model.layers)
    monkeypatch.setattr(mt, "SPLIT_OFFLOAD_SEGMENTS", mode == "offload")
    gm = "on" if mode == "on" else "offload"
    tiled_calls, down_gemms = [], []
    apply, proj_out = mm._TiledMLP.apply, tlora._proj_out
    monkeypatch.setattr(mm._TiledMLP, "apply", lambda *a: (tiled_calls.append(a[2]), apply(*a))[1])
    downs = {id(layer.mlp.down_proj.base_layer.weight) for layer in model.model.layers}
    monkeypatch.setattr(tlora, "_proj_out", lambda x2, pr, *a: (down_gemms.append(id(pr.base) in downs),
                                                                proj_out(x2, pr, *a))[1])

    monkeypatch.setenv("MINITRAIN_MLP_TILE", "0")
    want = loss_and_grads(model, gm, fused_lora_on_cpu, early_stop=early_stop)
    assert sum(down_gemms) == n  # the forward's only
    down_gemms.clear()
    want_counts = _gate_down_dequants(model, fused_lora_on_cpu)
    assert tiled_calls == []
    monkeypatch.setenv("MINITRAIN_MLP_TILE", "4")
    got = loss_and_grads(model, gm, fused_lora_on_cpu, early_stop=early_stop)
    got_counts = _gate_down_dequants(model, fused_lora_on_cpu)
    assert tiled_calls == [4] * (2 * n), tiled_calls  # the forward and the recomputation, 4 tokens per tile
    assert sum(down_gemms) == 6 * n, down_gemms  # the forward's 6 tiles; none in the tiles' recomputation
    assert got[0].item() == pytest.approx(want[0].item(), abs=1e-6)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert want_counts == ([3] * n, [2] * n), want_counts
    assert got_counts == ([2] * n, [2] * n), got_counts
    for layer in model.model.layers:
        assert layer.mlp.tile_tokens == 0  # "off" again after loss_and_grads
    assert getattr(tlora._cache, "d", None) is None  # the weight cache is gone after the backward


def test_tiled_mlp_only_where_the_tiles_recompute_the_same(fused_lora_on_cpu, monkeypatch):
    """Not tiled: checkpointing off, at most four tiles' worth of tokens, LoRA dropout active (other masks in the
    tiles' recomputation), no grad; the tile default and its errors."""
    import minitrain.model as mm

    tiled_calls = []
    apply = mm._TiledMLP.apply
    monkeypatch.setattr(mm._TiledMLP, "apply", lambda *a: (tiled_calls.append(a[2]), apply(*a))[1])
    monkeypatch.setenv("MINITRAIN_MLP_TILE", "4")
    model = tiny_lora_model(True, 0.0)
    loss_and_grads(model, "off", fused_lora_on_cpu)
    assert tiled_calls == []
    monkeypatch.setenv("MINITRAIN_MLP_TILE", "6")  # 22 tokens: not more than four tiles' worth (24)
    loss_and_grads(model, "on", fused_lora_on_cpu)
    assert tiled_calls == []
    monkeypatch.setenv("MINITRAIN_MLP_TILE", "5")  # more than four tiles' worth (20): 5 tiles, 4 of 5 tokens + 2
    loss_and_grads(model, "on", fused_lora_on_cpu)
    assert tiled_calls == [5] * 4, tiled_calls
    tiled_calls.clear()
    dropped = tiny_lora_model(True, 0.1)
    loss_and_grads(dropped, "on", fused_lora_on_cpu)
    assert tiled_calls == []
    mlp = model.model.layers[0].mlp
    mlp.tile_tokens = 4
    with torch.no_grad():
        mlp(torch.randn(2, 11, TINY["hidden_size"]))
    assert tiled_calls == []
    mlp.tile_tokens = 0
    monkeypatch.delenv("MINITRAIN_MLP_TILE")
    assert mm.mlp_tile_default() == 4096
    for bad in ("-3", "lots", "1.5"):
        monkeypatch.setenv("MINITRAIN_MLP_TILE", bad)
        with pytest.raises(ValueError, match="MINITRAIN_MLP_TILE"):
            mm.mlp_tile_default()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_tiled_mlp_meets_the_tolerance_rule_on_cuda_eager_and_graphed(mode, monkeypatch):
    """bf16 QLoRA on CUDA with checkpointing, MLPs in tiles of 58 tokens (MINITRAIN_MLP_TILE=64, 2 x 200
    tokens: 7 tiles), eagerly and replayed from the trainer's CUDA graph: loss and adapter gradients within
    STYLE.md's rule against the fp32 run of the same weights (untiled): error <= 2 x the untiled bf16 run's error
    + 1e-3 of the tensor's scale. Tiles change GEMM row counts, so bits may differ."""
    import minitrain.model as mm
    from minitrain.trainer import n_items, set_gradient_checkpointing, token_loss_sum
    from test_cuda_graphs import grads, model_with_lora, random_batch

    B, T = 2, 200
    batch = random_batch(B, T, "cuda", seed=5)
    n = n_items(batch)
    tiled_calls = []
    apply = mm._TiledMLP.apply
    monkeypatch.setattr(mm._TiledMLP, "apply", lambda *a: (tiled_calls.append(a[2]), apply(*a))[1])

    def run(tiled, graphed=False, fp32=False):
        monkeypatch.setenv("MINITRAIN_MLP_TILE", "64" if tiled else "0")
        model = model_with_lora("cuda", torch.bfloat16, nf4=True)
        if fp32:
            model.float()
        set_gradient_checkpointing(model.train(), mode)
        tiled_calls.clear()
        if graphed:
            loss, g, _ = _graphed_loss_and_grads(model, batch, n, B, T)
        elif fp32:
            loss = token_loss_sum(model, batch) / n
            loss.backward()
            loss, g = loss.detach().float(), grads(model)
        else:
            loss, g = _eager_loss_and_grads(model, batch, n)
        return loss, {k: v.float() for k, v in g.items()}, list(tiled_calls)

    ref = run(False, fp32=True)
    assert ref[2] == []
    for graphed in (False, True):
        base, alt = run(False, graphed), run(True, graphed)
        assert base[2] == [] and alt[2] and set(alt[2]) == {58}, (base[2], alt[2])
        pairs = [("loss", alt[0], base[0], ref[0])] + [(k, alt[1][k], base[1][k], ref[1][k]) for k in ref[1]]
        for name, a, b, r in pairs:
            err_a, err_b = (a - r).abs().max().item(), (b - r).abs().max().item()
            bound = 2 * err_b + 1e-3 * r.abs().max().item()
            how = "graphed" if graphed else "eager"
            assert err_a <= bound, f"{how} {name}: tiled error {err_a:.3g} > {bound:.3g} (untiled {err_b:.3g})"


@pytest.mark.parametrize("split", [True, False], ids=["split", "one-segment"])
@pytest.mark.parametrize("fit", [0, 3], ids=["nothing-fits", "three-fit"])
def test_offload_over_the_host_budget_keeps_inputs_on_the_device(fused_lora_on_cpu, monkeypatch, split, fit):
    """Layer inputs whose host copies would take the offload beyond its host-memory budget stay where they are
    (device memory instead of host memory, no copies): the same loss and adapter gradients bit for bit, the
    host buffers within the budget, one warning naming the budget and the variable that sets it."""
    import warnings

    import minitrain.trainer as mt

    model = tiny_lora_model(True, 0.1)
    want = offload_run(model, monkeypatch, split, fused_lora_on_cpu)
    x_bytes = 2 * 11 * TINY["hidden_size"] * 4  # one stash: (B, T, C) fp32
    monkeypatch.setenv(mt.HOST_BUDGET_ENV, str((fit + 0.5) * x_bytes / 2**30))
    made, init = [], mt.HostOffload.__init__
    monkeypatch.setattr(mt.HostOffload, "__init__", lambda self, *a, **kw: (made.append(self), init(self, *a, **kw))[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = offload_run(model, monkeypatch, split, fused_lora_on_cpu)
    assert_same_bits(got, want)
    off = made[-1]
    n_stash = len(got[4])  # 2 per layer split, 1 per layer whole
    host = min(fit, n_stash)
    assert off.host_bytes() == host * x_bytes <= off.host_budget, (off.host_bytes(), off.host_budget)
    assert off.kept_last_step == n_stash - host, (off.kept_last_step, n_stash)
    msgs = [str(w.message) for w in caught if "host memory" in str(w.message)]
    if host == n_stash:
        assert msgs == []
    else:
        assert len(msgs) == 1 and mt.HOST_BUDGET_ENV in msgs[0] and "stay on cpu" in msgs[0], msgs


def test_offload_host_buffers_grow_by_doubling():
    """A layer's host buffer, fed the Trainer's rising graph lengths (2 x 64 ... 2 x 2048 tokens), is reallocated
    only when it must at least double: 6 allocations in all (the quarter growth took 16), and the bytes ever
    allocated stay under twice the final buffer's (pinning host memory is what costs)."""
    import minitrain.trainer as mt

    lengths = [64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792,
               2048]
    ho = mt.HostOffload(host_budget=math.inf)
    seen, allocated = [], 0
    for T in lengths + lengths[::-1]:
        view, reused = ho._host_buffer((0, torch.float32), torch.empty(2, T, 8))
        assert reused and view.shape == (2, T, 8)
        buf = ho.buffers[(0, torch.float32)]
        if not any(b is buf for b in seen):
            seen.append(buf)
            allocated += buf.numel()
    assert len(seen) == 6, [b.numel() for b in seen]
    assert allocated < 2 * seen[-1].numel()


def test_offload_host_budget_default_and_setting(monkeypatch):
    import minitrain.trainer as mt

    monkeypatch.setenv(mt.HOST_BUDGET_ENV, "2.5")
    assert mt.default_host_budget() == 2.5 * 2**30
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(mt.HOST_BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=f"{mt.HOST_BUDGET_ENV}='{bad}': expected a number of GiB"):
            mt.default_host_budget()
    monkeypatch.delenv(mt.HOST_BUDGET_ENV)
    avail = mt.available_host_bytes()
    if avail is None:
        assert mt.default_host_budget() == math.inf
    else:  # 75% of what is available now (it moves a little between the two reads)
        assert mt.default_host_budget() == pytest.approx(0.75 * avail, rel=0.05)
    monkeypatch.setattr(mt, "available_host_bytes", lambda: 64 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes on the host (torchrun): each takes its share
    assert mt.default_host_budget() == 0.75 * 16 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "one")  # unreadable: taken as alone
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert mt.default_host_budget() == 0.75 * 64 * 2**30
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "8")  # a launcher without a local count: at most 8 share the host
    assert mt.default_host_budget() == 0.75 * 8 * 2**30


@pytest.mark.gpu
def test_offload_over_the_host_budget_is_exact_on_cuda_eager_and_graphed(monkeypatch):
    """bf16 QLoRA on CUDA with gradient_checkpointing="offload" (two segments per layer): a host budget that
    holds two of the four layer inputs leaves the others on the GPU, eagerly and inside the trainer's CUDA
    graph, with the same loss and adapter gradients (within the run-to-run spread of the attention backward)."""
    import minitrain.trainer as mt
    from minitrain.trainer import n_items, set_gradient_checkpointing
    from test_cuda_graphs import ARGS, model_with_lora, random_batch

    B, T, C = 2, 200, ARGS["hidden_size"]
    batch = random_batch(B, T, "cuda", seed=5)
    n = n_items(batch)
    # inputs only: kept attention outputs would take budget too (covered by the CPU budget cases of
    # test_offload_split_reuses_the_attention_output)
    monkeypatch.setattr(mt, "REUSE_ATTENTION_OUTPUT", False)
    made, init = [], mt.HostOffload.__init__
    monkeypatch.setattr(mt.HostOffload, "__init__", lambda self, *a, **kw: (made.append(self), init(self, *a, **kw))[1])

    def build(limited):
        if limited:
            monkeypatch.setenv(mt.HOST_BUDGET_ENV, str(2.5 * B * T * C * 2 / 2**30))
        else:
            monkeypatch.delenv(mt.HOST_BUDGET_ENV, raising=False)
        model = model_with_lora("cuda", torch.bfloat16, nf4=True)
        set_gradient_checkpointing(model.train(), "offload")
        return model

    def eager(limited):
        loss, g = _eager_loss_and_grads(build(limited), batch, n)
        return loss, g, made[-1].kept_last_step

    def graphed(limited):
        return _graphed_loss_and_grads(build(limited), batch, n, B, T)

    for run in (eager, graphed):
        base, alt = _within_run_to_run(run, "host budget vs none")
        if run is eager:
            assert base[2] == 0 and alt[2] == 2 * len(build(False).model.layers) - 2, (base[2], alt[2])
        assert made[-1].host_bytes() <= 2.5 * B * T * C * 2, made[-1].host_bytes()


def _offload_qlora_model(args):
    """A bf16 QLoRA model on CUDA (NF4 bases, r=16 adapters with B != 0) with gradient_checkpointing="offload"."""
    from minitrain.model import LlamaForCausalLM, rope_inv_freq
    from minitrain.trainer import set_gradient_checkpointing
    from test_cuda_graphs import nf4_projections

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(args).to(torch.bfloat16)
    model.model.inv_freq = rope_inv_freq(args).cuda()
    nf4_projections(model)
    add_lora(model, r=16, alpha=32)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    set_gradient_checkpointing(model.train(), "offload")
    return model


def _small_offload_case():
    """(args, B, T, batch, n_items) of the offload exactness tests on CUDA: C=1024, 2 layers, B=2, T=256."""
    from minitrain.model import ModelArgs
    from minitrain.trainer import n_items
    from test_cuda_graphs import random_batch

    args = ModelArgs(vocab_size=512, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    B, T = 2, 256
    batch = random_batch(B, T, "cuda", seed=5)
    return args, B, T, batch, n_items(batch)


def _graphed_unblocked(model, batch, n, B, T):
    """_graphed_loss_and_grads of a model that nothing keeps out of the trainer's CUDA graph."""
    from minitrain.cuda_graphs import graph_blockers

    assert graph_blockers(model) == [], graph_blockers(model)
    return _graphed_loss_and_grads(model, batch, n, B, T)


@pytest.mark.gpu
def test_offload_split_is_exact_on_cuda_eager_and_graphed(monkeypatch):
    """bf16 autocast QLoRA (NF4 bases) on CUDA, C=1024, 2 layers, T=256: with gradient_checkpointing="offload"
    the split (two segments, o_proj skipped in the recomputation) and one segment give the same loss and adapter
    gradients, eagerly and replayed from the trainer's CUDA graph: bit for bit where two one-segment runs are
    (the attention backward need not be deterministic), else within their spread. Eagerly the split drops one
    o_proj dequantize per layer and step, and stashes two inputs per layer."""
    import minitrain.trainer as mt
    import triton_ops.lora as tlora

    args, B, T, batch, n = _small_offload_case()
    calls, stashes = [], []
    dense, stash = tlora._dense, mt.HostOffload.stash
    monkeypatch.setattr(tlora, "_dense", lambda base, dtype: (calls.append(base), dense(base, dtype))[1])
    monkeypatch.setattr(mt.HostOffload, "stash", lambda self, i, x, **kw: (stashes.append(i), stash(self, i, x, **kw))[1])

    def build(split):
        monkeypatch.setattr(mt, "SPLIT_OFFLOAD_SEGMENTS", split)
        return _offload_qlora_model(args)

    def eager(split):
        model = build(split)
        calls.clear()
        stashes.clear()
        loss, g = _eager_loss_and_grads(model, batch, n)
        o = [sum(c is layer.self_attn.o_proj.base_layer.weight for c in calls) for layer in model.model.layers]
        return loss, g, (o, list(stashes))

    def graphed(split):
        return _graphed_unblocked(build(split), batch, n, B, T)

    for run in (eager, graphed):
        one, split = _within_run_to_run(run, "split vs one segment")
        if run is eager:
            layers = args.num_hidden_layers
            assert split[2] == ([2] * layers, list(range(2 * layers))), split[2]
            assert one[2] == ([3] * layers, list(range(0, 2 * layers, 2))), one[2]


@pytest.mark.gpu
def test_saved_attention_fn_is_sdpa_on_cuda():
    """_SavedAttentionFn on CUDA (cuDNN's SDPA ops, GQA, q/k/v as views of one fused projection output) gives
    F.scaled_dot_product_attention's output bit for bit and its gradients (those of the same cuDNN backward),
    and with the saved output the same gradients again without a forward kernel."""
    import torch.nn.functional as F

    from minitrain.model import _SavedAttentionFn

    torch.manual_seed(0)
    B, T, H, KV, D = 2, 333, 8, 2, 128
    qkv = torch.randn(B, T, (H + 2 * KV) * D, device="cuda", dtype=torch.bfloat16)
    q = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2)
    k = qkv[..., H * D:(H + KV) * D].view(B, T, KV, D).transpose(1, 2)
    v = qkv[..., (H + KV) * D:].view(B, T, KV, D).transpose(1, 2)
    dout = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # as o_proj's view gives
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=D ** -0.5, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (qs, ks, vs), dout)
    kept = []
    out = _SavedAttentionFn.apply(qs, ks, vs, D ** -0.5, kept.append, None)
    grads = torch.autograd.grad(out, (qs, ks, vs), dout)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
    again = _SavedAttentionFn.apply(qs, ks, vs, D ** -0.5, None, kept[0])
    assert again.data_ptr() == out.data_ptr()
    for a, b in zip(torch.autograd.grad(again, (qs, ks, vs), dout), grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


@pytest.mark.gpu
def test_offload_attention_reuse_is_exact_on_cuda_eager_and_graphed(monkeypatch):
    """bf16 autocast QLoRA on CUDA, C=1024, 2 layers, T=256, gradient_checkpointing="offload": keeping the
    attention output with the segment input (the recomputation runs no attention kernel) gives the loss and
    adapter gradients of recomputing it, eagerly and replayed from the trainer's CUDA graph, within the
    run-to-run spread (bit for bit where runs agree); eagerly every layer's recomputation gets its output back."""
    import minitrain.trainer as mt

    args, B, T, batch, n = _small_offload_case()
    got_back, saved_attention = [], mt.HostOffload.saved_attention
    monkeypatch.setattr(mt.HostOffload, "saved_attention",
                        lambda self, s: (lambda r: (got_back.append(r is not None), r)[1])(saved_attention(self, s)))

    def build(reuse):
        monkeypatch.setattr(mt, "REUSE_ATTENTION_OUTPUT", reuse)
        return _offload_qlora_model(args)

    def eager(reuse):
        model = build(reuse)
        got_back.clear()
        loss, g = _eager_loss_and_grads(model, batch, n)
        return loss, g, list(got_back)

    def graphed(reuse):
        return _graphed_unblocked(build(reuse), batch, n, B, T)

    for run in (eager, graphed):
        plain, reuse = _within_run_to_run(run, "attention output kept vs recomputed")
        if run is eager:
            assert reuse[2] == [True] * args.num_hidden_layers and plain[2] == [False] * args.num_hidden_layers, \
                (reuse[2], plain[2])


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_lr_schedule_matches_transformers(kind):
    from transformers import get_scheduler

    total, warm = 23, 4
    cfg = TrainConfig(learning_rate=3e-4, lr_scheduler_type=kind, warmup_steps=warm)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-4)
    name = "constant_with_warmup" if kind == "constant" else kind
    sched = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total)
    for step in range(total):
        assert lr_at(step, total, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        sched.step()


def test_diagnostics_say_one_plain_sentence_each():
    steps = list(range(1, 41))
    falling = [2.0 - 0.04 * s for s in steps]
    kinds = {k for k, _ in diagnose(falling, [(20, 1.2), (40, 1.5)], steps, done=False)}
    assert kinds == {"overfitting"}
    kinds = {k: s for k, s in diagnose([0.01] * 40, [], steps, done=False)}
    assert set(kinds) == {"memorization"} and "memorizing" in kinds["memorization"]
    assert diagnose([0.01] * 40, [(40, 0.02)], steps, done=False, expect_eval=True) == []  # held-out agrees
    assert diagnose([0.01] * 40, [], steps, done=False, expect_eval=True) == []  # wait for the eval loss
    assert [k for k, _ in diagnose([0.01] * 40, [(40, 2.5)], steps, done=False, expect_eval=True)] == ["memorization"]
    flat = diagnose([1.5] * 40, [], steps, done=True)
    assert [k for k, _ in flat] == ["underfitting"] and "raise the learning rate" in flat[0][1]
    assert diagnose(falling, [(20, 1.2), (40, 1.1)], steps, done=True) == []


def test_run_on_a_dataset_leaves_metrics_curve_and_adapter(tmp_path):
    from minitrain.data import load_dataset
    from minitrain.tokenizer import Tokenizer

    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model = adapted(ckpt)
    tok = Tokenizer.from_pretrained(ckpt)
    g = torch.Generator().manual_seed(0)
    lines = [{"text": " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(4, 12, (), generator=g)),), generator=g))}
             for _ in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    ds = load_dataset(str(tmp_path / "d.jsonl"), tok, max_seq_length=32, eval_split=0.2, seed=1)
    cfg = quiet(tmp_path, max_steps=4, eval_steps=2, save_steps=2, packing=True, logging_steps=1,
                gradient_accumulation_steps=2)
    Trainer(model, tok, ds, cfg).train()
    out = tmp_path / "out"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mib"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    if png.find(b"IDAT") > 0 and b"matplotlib" not in png:
        n = int.from_bytes(png[png.find(b"IDAT") - 4:png.find(b"IDAT")], "big")
        raw = zlib.decompress(png[png.find(b"IDAT") + 4:png.find(b"IDAT") + 4 + n])
        assert len(raw) == h * (1 + 3 * w)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.gpu
def test_qlora_bf16_offload_trains_on_cuda(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model, _ = load_model(ckpt, dtype=torch.bfloat16, device="cuda", load_in_4bit=True, tokenizer=False)
    torch.manual_seed(1)
    add_lora(model, r=8, alpha=16)
    data = examples(16) * 4
    tr = Trainer(model, None, data, quiet(tmp_path, max_steps=12, learning_rate=3e-3, gradient_checkpointing="offload",
                                          per_device_train_batch_size=4, gradient_accumulation_steps=2))
    tr.train()
    losses = tr.history["loss"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.gpu
def test_trainer_auto_keep_mlp_layers_calibrates_on_its_first_steps(tmp_path, monkeypatch):
    """keep_mlp_layers="auto" (the default) with gradient_checkpointing="offload" on CUDA: the first two steps run
    eagerly and are measured; the CUDA graphs captured after them keep the MLP halves of as many layers as fit (all
    of the tiny model's within 85% of the card: no h1 stash inside a capture; none within a 1 MiB budget), and the
    losses equal those of a run that keeps none (within the attention backward's run-to-run spread)."""
    import minitrain.trainer as mt

    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    data = examples(16) * 2
    captured, stash = [], mt.HostOffload.stash

    def spy(self, index, x, **kw):
        if torch.cuda.is_current_stream_capturing():
            captured[-1].append(index)
        return stash(self, index, x, **kw)

    monkeypatch.setattr(mt.HostOffload, "stash", spy)

    def run(name, keep, max_gib=None):
        model, _ = load_model(ckpt, dtype=torch.bfloat16, device="cuda", load_in_4bit=True, tokenizer=False)
        torch.manual_seed(1)
        add_lora(model, r=8, alpha=16)
        cfg = quiet(tmp_path, output_dir=str(tmp_path / name), max_steps=6, learning_rate=3e-3,
                    gradient_checkpointing="offload", per_device_train_batch_size=4, keep_mlp_layers=keep,
                    max_memory_gib=max_gib)
        tr = Trainer(model, None, data, cfg)
        captured.append([])
        tr.train()
        return tr, len(model.model.layers), captured[-1]

    auto, n, stashed = run("auto", None)
    p = auto.keep_policy
    assert p is not None and p.calibrated and p.steps_seen == 2 and p.graphs_only, vars(p)
    assert auto.graphs_captured >= 1 and set(p.counts.values()) == {n}, (auto.graphs_captured, p.counts)
    assert stashed and all(i % 2 == 0 for i in stashed), stashed  # captures stash x only, never a kept h1
    none, _, stashed0 = run("none", 0)
    assert none.keep_policy is None and any(i % 2 for i in stashed0), stashed0
    a, b = auto.history["loss"], none.history["loss"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05, (a, b)
    tight, _, stashed1 = run("tight", "auto", max_gib=2**-10)
    assert tight.keep_policy.calibrated and set(tight.keep_policy.counts.values()) == {0}, tight.keep_policy.counts
    assert any(i % 2 for i in stashed1), stashed1
    alloc, reserved = tight.peak_memory()
    assert 0 < alloc <= reserved


@pytest.mark.gpu
def test_qlora_llama3_8b_shaped_throughput_and_memory(tmp_path):
    """A few QLoRA steps on a random Llama-3.1-8B-shaped model (full width and vocabulary, 4 of its 32 layers),
    seq 2048, bf16, gradient checkpointing; tokens/s and peak memory are printed and written to bench/results."""
    import quant
    from minitrain.model import LlamaForCausalLM, ModelArgs, rope_inv_freq

    args = ModelArgs(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(args).to(torch.bfloat16)
    model.model.inv_freq = rope_inv_freq(args).cuda()  # fp32 angles (as the loader sets them)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, quant.NF4Linear.from_linear(getattr(parent, n)))
    torch.cuda.empty_cache()
    add_lora(model, r=16, alpha=16)
    T, B, steps = 2048, 2, 6
    data = [{"input_ids": torch.randint(0, 128256, (T,)).tolist()} for _ in range(B * steps)]
    torch.cuda.reset_peak_memory_stats()
    tr = Trainer(model, None, data, quiet(tmp_path, max_steps=steps, learning_rate=1e-4, per_device_train_batch_size=B,
                                          gradient_accumulation_steps=1, gradient_checkpointing="on"))
    tr.train()
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    tok_s = sorted(r["tokens_per_s"] for r in rows[1:])[len(rows[1:]) // 2]  # median, first step is warm-up
    peak = max(r["peak_mem_mib"] for r in rows)
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    line = (f"| Llama-3.1-8B-shaped, 4 of 32 layers, QLoRA r=16 bf16, B={B} T={T}, checkpointing on | "
            f"{tok_s:,.0f} tokens/s | {peak:,.0f} MiB peak |")
    print("\n" + line)
    try:
        from bench.hw import write_results

        write_results("train-qlora-8b-shaped", "QLoRA training step, Llama-3.1-8B shapes (minitrain trainer)",
                      [("tokens/s and peak memory", "| model | throughput | memory |\n|---|---|---|\n" + line + "\n")])
    except Exception as e:  # the measurement stands even if the results file cannot be written
        print(f"(results file not written: {e})")


def test_cli_allocator_defaults_respect_the_user():
    from minitrain.cli_train import allocator_defaults

    env = {}
    allocator_defaults(env)
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for user in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_ALLOC_CONF": "backend:native"},
                 {"WORLD_SIZE": "2"}):
        env = dict(user)
        allocator_defaults(env)
        assert env == user, env


def test_example_batches_are_length_bucketed_and_cover_each_example_once():
    import numpy as np

    rng = np.random.default_rng(0)
    lens = np.clip(np.exp(rng.normal(np.log(300), 0.6, 1000)), 8, 2048).astype(int)
    data = [{"input_ids": [1] * int(n)} for n in lens]
    eb = ExampleBatches(data, 2, shuffle=True, seed=3)
    p0, p1 = eb.plan(0), eb.plan(1)
    assert sorted(i for b in p0 for i in b) == list(range(1000)) and p0 != p1 and p0 == eb.plan(0)

    def padding(plan):
        real = sum(lens[i] for b in plan for i in b)
        return 1 - real / sum(len(b) * max(lens[i] for i in b) for b in plan)

    random_pairs = [list(map(int, rng.permutation(1000)[i:i + 2])) for i in range(0, 1000, 2)]
    assert padding(p0) < 0.05 < 0.15 < padding(random_pairs), (padding(p0), padding(random_pairs))
    assert ExampleBatches(data, 2, shuffle=False, seed=3).plan(0)[:2] == [[0, 1], [2, 3]]


def test_resume_without_a_checkpoint_starts_fresh_metrics_and_survives_a_torn_line(tmp_path):
    data = examples(8)
    out = tmp_path / "run"
    out.mkdir()
    killed = [{"step": 1, "loss": 9.0}, {"step": 2, "loss": 8.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in killed) + '{"step": 3, "lo')
    make_tiny_checkpoint(tmp_path / "base")
    cfg = quiet(tmp_path, output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                resume_from_checkpoint="latest")
    tr = Trainer(adapted(tmp_path / "base"), None, data, cfg)
    tr.train()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2] and all(r.get("loss") not in (9.0, 8.0) for r in rows), rows

    # a torn last line after a checkpoint: the resume drops it and replays from the checkpoint
    tr.save_checkpoint()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    cfg = quiet(tmp_path, output_dir=str(out), max_steps=3, per_device_train_batch_size=2,
                resume_from_checkpoint="latest")
    Trainer(adapted(tmp_path / "base"), None, data, cfg).train()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_transformers_model_trains_with_gradient_checkpointing(tmp_path):
    """gradient_checkpointing "auto" is on for CUDA, so a transformers model gets it by default there: its forward
    must not fill a KV cache (the checkpointed layer's recomputation appended its keys again: a shape error at the
    first backward). Same losses as without checkpointing (checked on the CPU with "on")."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    assert base.config.use_cache  # the transformers default: a cache unless told otherwise
    curves = []
    for gc in ("off", "on"):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        add_lora(model, r=4, alpha=8)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.05)
        tr = Trainer(model, None, examples(8), quiet(tmp_path, output_dir=str(tmp_path / gc), max_steps=3,
                                                     per_device_train_batch_size=2, gradient_checkpointing=gc))
        assert tr.gc_mode == gc
        tr.train()
        curves.append(tr.history["loss"])
    assert len(curves[1]) == 3 and max(abs(a - b) for a, b in zip(*curves)) <= 1e-5, curves


def test_example_batches_resume_a_run_saved_before_bucketing_in_its_own_order():
    data = [{"input_ids": [1] * n} for n in range(3, 43)]
    old = ExampleBatches(data, 2, shuffle=True, seed=3)
    old.bucketed = False  # what runs before length bucketing drew
    it = old.raw()
    for _ in range(5):
        next(it)
    saved = {"epoch": old.epoch, "index": old.index}  # such checkpoints carry no "order"
    rest = list(it)
    new = ExampleBatches(data, 2, shuffle=True, seed=3)
    new.load_state_dict(saved)
    assert list(new.raw()) == rest and not new.bucketed
    fresh = ExampleBatches(data, 2, shuffle=True, seed=3)
    assert fresh.state_dict()["order"] == "bucketed"
    again = ExampleBatches(data, 2, shuffle=True, seed=3)
    again.load_state_dict(fresh.state_dict())
    assert again.bucketed and again.plan(0) == fresh.plan(0) != old.plan(0)


def test_a_warning_on_another_rank_reaches_that_ranks_stderr(tmp_path, capsys):
    from minitrain.trainer import Progress

    make_tiny_checkpoint(tmp_path / "base")
    tr = Trainer(adapted(tmp_path / "base"), None, examples(4), quiet(tmp_path, max_steps=1))
    tr.main, tr.rank = False, 3  # as on data-parallel rank 3: no progress line, no metrics file
    tr.notes.append(("cuda_graphs_off", "capturing ran out of GPU memory (test)"))
    tr._log({"step": 1, "loss": 1.0}, Progress(1, True, main=False))
    err = capsys.readouterr().err
    assert "rank 3: warning: capturing ran out of GPU memory (test)" in err and not tr.notes


def test_offload_host_budget_counts_fresh_buffers_of_later_forwards():
    """Three forwards before a backward: the layer's reused buffer is still needed, so the later forwards' copies
    go to fresh buffers. With a budget of two copies the third must stay on the device: the fresh buffers count
    towards the budget too (before, host_bytes() saw only the reused buffer and all three were copied)."""
    import minitrain.trainer as mt

    x = torch.randn(4, 8)
    nbytes = x.numel() * x.element_size()
    off = mt.HostOffload(host_budget=2 * nbytes)
    stashes = [off.stash(0, x.clone().requires_grad_()) for _ in range(3)]  # index 0 each time: three forwards
    copied = [s.host is not None for s in stashes]
    held = sum(s.host.numel() * s.host.element_size() for s in stashes if s.host is not None)
    assert copied == [True, True, False], f"host copies of three forwards' inputs (budget: two): {copied}"
    assert off.host_bytes() == held <= off.host_budget, (off.host_bytes(), held, off.host_budget)
    for s in stashes:  # each forward's recomputation still gets its own input back
        assert torch.equal(off.fetch(s), x)
    del stashes, s
    assert off.host_bytes() == nbytes, off.host_bytes()  # the fresh copies went with their stashes


@pytest.mark.parametrize("keep", [1, 2, 5])
def test_offload_keep_mlp_layers_is_bit_identical_and_skips_their_recomputation(fused_lora_on_cpu, monkeypatch, keep):
    """KEEP_MLP_LAYERS = k: the last k layers' MLP halves run without a checkpoint (no h1 stash, no recomputation:
    gate's base dequantized in forward and backward only), with the same loss and gradients, bit for bit; k
    beyond the layer count keeps them all."""
    model = tiny_lora_model(True, 0.1)
    n = len(model.model.layers)
    want = offload_run(model, monkeypatch, True, fused_lora_on_cpu)
    got = offload_run(model, monkeypatch, True, fused_lora_on_cpu, keep_mlp=keep)
    kept = range(max(0, n - keep), n)
    assert got[4] == [j for j in range(2 * n) if not (j % 2 and j // 2 in kept)], got[4]
    assert want[5] == [3] * n and got[5] == [2 if i in kept else 3 for i in range(n)], (want[5], got[5])
    assert_same_bits(got, want)


@pytest.mark.parametrize("fit", [0, 2, 9])
def test_offload_auto_keep_mlp_layers_keeps_what_the_budget_allows(fused_lora_on_cpu, monkeypatch, fit):
    """keep_mlp_layers="auto": once calibrated, the last layers whose kept MLP activations fit the budget run as
    KEEP_MLP_LAYERS = that count would (the same stashes and dequantizations), bit for bit equal to checkpointing
    them all; before calibration none is kept."""
    model = tiny_lora_model(True, 0.1)
    n, tokens = len(model.model.layers), 2 * 11
    want = offload_run(model, monkeypatch, True, fused_lora_on_cpu)
    same = offload_run(model, monkeypatch, True, fused_lora_on_cpu, keep_mlp="auto")  # not calibrated: keeps none
    assert same[4] == want[4] and same[5] == want[5], (same[4], same[5])
    assert_same_bits(same, want)
    seen = []

    def calibrate(policy):
        # measured: 1000 bytes allocated before and 1400 after (optimizer state), a peak 600 above the start
        k = policy.bytes_per_token
        policy.max_memory_gib = (1400 + policy.grad_bytes + 600 + fit * tokens * k + k // 2) / 2**30
        policy.set_measurements(before=1000, peak=1600, after=1400, tokens=tokens, usable=0)
        seen.append(policy)

    got = offload_run(model, monkeypatch, True, fused_lora_on_cpu, keep_mlp="auto", calibrate=calibrate)
    keep = min(fit, n)
    assert seen[0].count(tokens) == keep, (seen[0].count(tokens), keep)
    kept = range(n - keep, n)
    assert got[4] == [j for j in range(2 * n) if not (j % 2 and j // 2 in kept)], got[4]
    assert got[5] == [2 if i in kept else 3 for i in range(n)], got[5]
    assert_same_bits(got, want)


def test_keep_mlp_policy_arithmetic():
    """KeepMLPPolicy.count: (budget - predicted peak with none kept) // (tokens * bytes per token), the step's
    transient part scaled up with the tokens and never down, at most the layer count, none when tiled or not
    calibrated; the budget is max_memory_gib or AUTO_KEEP_SHARE of the usable memory."""
    import minitrain.trainer as mt

    GiB = 2**30
    p = mt.KeepMLPPolicy(layers=32, bytes_per_token=1000, tiled_above=16384, max_memory_gib=1.0, grad_bytes=50)
    assert p.count(100) == 0 and not p.calibrated
    first = mt.StepMemory("cpu")  # as measured: the first step only counts (one-time allocations), no CUDA call
    first.before, first.peak, first.after = 0, 10**9, 0
    p.calibrate(first, 10)
    assert not p.calibrated and p.steps_seen == 1 and p.count(10) == 0
    p.set_measurements(before=100, peak=300, after=150, tokens=1000, usable=0)
    assert p.budget == GiB and p.base == 100 + 50 + 50 and p.transient == 200
    assert p.predicted_peak(1000, 3) == 200 + 200 + 3 * 1000 * 1000
    assert p.predicted_peak(500, 0) == 200 + 200  # never scaled down
    assert p.predicted_peak(4000, 0) == 200 + 800  # scaled up
    assert p.count(1000) == 32  # (1 GiB - 400) // 1e6 = 1073 > 32 layers
    assert p.count(16384) == min(32, (GiB - 200 - 200 * 16384 // 1000) // (16384 * 1000))
    assert p.count(16385) == 0  # the MLP runs in tiles there
    q = mt.KeepMLPPolicy(layers=32, bytes_per_token=10**6, max_memory_gib=None)
    q.set_measurements(before=0, peak=2 * GiB, after=GiB, tokens=1000, usable=10 * GiB)
    assert q.budget == int(mt.AUTO_KEEP_SHARE * 10 * GiB) - 2 * GiB  # room for one eager step beside the graphs
    assert q.count(1000) == (q.budget - 3 * GiB) // 10**9 and q.count(2000) == (q.budget - 5 * GiB) // (2 * 10**9)
    q.set_measurements(before=0, peak=9 * GiB, after=0, tokens=1000, usable=10 * GiB)
    assert q.count(1000) == 0  # over budget with none kept: none
    p.set_measurements(before=100, peak=300, after=150, tokens=1000, usable=0, live_grad_bytes=50)
    assert p.base == 150  # gradients still allocated after the step are in "after" already: not counted twice
    assert "the last 0 of 32 layers" in q.describe(1000)
    t = mt.KeepMLPPolicy(layers=32, bytes_per_token=1000, tiled_above=16384, max_memory_gib=1.0)
    t.set_measurements(before=0, peak=100, after=0, tokens=20000, usable=0)  # calibrated on a tiled step
    assert t.calibrated and t.tiled_calibration and t.count(1000) == 0  # its transient says nothing of untiled steps
    q.max_tokens = 4000  # the budget leaves room for an eager step at the longest input: 4x the calibrating one's
    q.set_measurements(before=0, peak=2 * GiB, after=GiB, tokens=1000, usable=10 * GiB)
    assert q.budget == int(mt.AUTO_KEEP_SHARE * 10 * GiB) - 8 * GiB
    p.graphs_only = True  # outside a CUDA graph capture (as on the CPU): an eager step keeps none
    assert p.count(1000) == 0 and p.decide(1000) == 32 and "the last 32 of 32" in p.describe(1000)
    p.graphs_only = False
    assert p.count(1000) == 32
    with pytest.raises(ValueError, match="must run tokens"):
        q.set_measurements(before=0, peak=0, after=0, tokens=0, usable=0)


def test_keep_mlp_policy_counts_what_a_kept_mlp_holds(monkeypatch):
    """KeepMLPPolicy.for_model: bytes per token of a kept MLP half: norm input and output in the residual dtype;
    gate(x) and up(x) in the compute dtype where the MLP runs as one lora_mlp call (LlamaMLP.grouped), four
    F-sized tensors where it runs module by module (what autograd keeps there, checked below); dropout's masks; no
    policy for a model that is not minitrain's Llama (a transformers Llama under the Trainer's default on CUDA
    trains with none kept, no error)."""
    import minitrain.trainer as mt
    from minitrain.model import LlamaMLP
    from transformers import LlamaConfig, LlamaForCausalLM

    C, F = TINY["hidden_size"], TINY["intermediate_size"]
    model = tiny_lora_model(False, 0.0)  # fp32, on the CPU: module by module
    mlp, norm = model.model.layers[0].mlp, model.model.layers[0].post_attention_layernorm
    assert mlp.grouped(torch.zeros(1, C)) is None
    k = mt.KeepMLPPolicy.for_model(model).bytes_per_token
    R = 3 * model.model.layers[0].mlp.gate_proj.r  # x·Aᵀ of the three adapters
    assert k == 4 * (2 * C + 4 * F + R) + 4
    # what autograd keeps for the MLP half (per token, parameters and fixed-size tensors left out): at most k
    params = {p.data_ptr() for p in model.parameters()}

    def saved_bytes(T):
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        h1 = torch.randn(1, T, C, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = h1 + mlp(norm(h1))
        del out
        return sum(seen.values())
    per_token = (saved_bytes(64) - saved_bytes(32)) / 32
    assert 0.9 * k <= per_token <= k, (per_token, k)
    monkeypatch.setattr(LlamaMLP, "grouped", lambda self, x: ("triton", ()))  # as on CUDA with the kernels
    assert mt.KeepMLPPolicy.for_model(model).bytes_per_token == 4 * (2 * C + 2 * F + R) + 4
    assert mt.KeepMLPPolicy.for_model(model, compute_dtype=torch.bfloat16).bytes_per_token == \
        4 * 2 * C + 2 * (2 * F + R) + 4
    dropped = tiny_lora_model(False, 0.1)
    assert mt.KeepMLPPolicy.for_model(dropped).bytes_per_token == 4 * (2 * C + 2 * F + R) + 4 + 2 * C + F
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    add_lora(hf, r=4, alpha=8)
    try:
        assert mt.set_gradient_checkpointing(hf, "offload", keep_mlp_layers="auto") is None
    finally:
        mt.set_gradient_checkpointing(hf, "off")


def test_calibrate_keep_counts_only_steps_that_updated(tmp_path):
    """Trainer._calibrate_keep: the peaks a measured step reset are kept; a step that trained nothing or that the
    GradScaler skipped (non-finite gradient norm: no optimizer state yet) does not count towards the calibration;
    the tokens counted are those of the step's largest micro-batch."""
    import types

    from minitrain.trainer import Progress

    make_tiny_checkpoint(tmp_path / "base")
    tr = Trainer(adapted(tmp_path / "base"), None, examples(4), quiet(tmp_path))
    calls = []
    tr.keep_policy = types.SimpleNamespace(calibrate=lambda mem, t: calls.append(t), calibrated=False)
    mem = types.SimpleNamespace(prior_peak=7, prior_reserved=9)
    host = [{"input_ids": torch.zeros(2, 5)}, {"input_ids": torch.zeros(2, 8)}]
    quiet_progress = Progress(1, False, main=True)
    tr._calibrate_keep(mem, host, 0, 1.0, quiet_progress)
    tr._calibrate_keep(mem, host, 10, float("inf"), quiet_progress)
    assert calls == [] and (tr._prior_peak, tr._prior_reserved) == (7, 9)
    tr._calibrate_keep(types.SimpleNamespace(prior_peak=3, prior_reserved=11), host, 10, 0.5, quiet_progress)
    assert calls == [16] and (tr._prior_peak, tr._prior_reserved) == (7, 11)


def test_trainer_sets_up_auto_keep_as_on_cuda(tmp_path):
    """The Trainer's default on one CUDA device ("offload", keep "auto"), set up on the CPU by faking the device:
    a minitrain model gets a policy expecting its longest micro-batch (batch x the longest example, padded to its
    graph length); a transformers model gets none; several processes get none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minitrain.trainer import KeepMLPPolicy, graph_length, set_gradient_checkpointing

    make_tiny_checkpoint(tmp_path / "base")
    data = examples(6)
    longest = max(len(e["input_ids"]) for e in data)
    tr = Trainer(adapted(tmp_path / "base"), None, data, quiet(tmp_path, per_device_train_batch_size=3))
    tr.device, tr.gc_mode = torch.device("cuda"), "offload"
    try:
        tr._set_checkpointing()
        assert isinstance(tr.keep_policy, KeepMLPPolicy) and not tr.keep_policy.calibrated
        assert tr.keep_policy.max_tokens == 3 * graph_length(longest, tr.model.args.max_position_embeddings)
        tr._keep_auto_off = True  # after a capture ran out of memory with layers kept
        tr._set_checkpointing()
        assert tr.keep_policy is None
        tr._keep_auto_off, tr.dist = False, object()  # as under torchrun
        tr._set_checkpointing()
        assert tr.keep_policy is None
    finally:
        set_gradient_checkpointing(tr.model, "off")
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    add_lora(hf, r=4, alpha=8)
    tr = Trainer(hf, None, data, quiet(tmp_path))
    tr.device, tr.gc_mode = torch.device("cuda"), "offload"
    try:
        tr._set_checkpointing()  # no error: the transformers layers keep nothing
        assert tr.keep_policy is None
    finally:
        set_gradient_checkpointing(hf, "off")


def test_a_capture_out_of_memory_with_kept_layers_turns_auto_off_not_graphs(tmp_path, monkeypatch):
    """A capture that runs out of memory while "auto" keeps layers: keep none from then on and capture again
    (graphs stay on), said once; without kept layers graphs go off as before."""
    import types

    from minitrain.cuda_graphs import GraphOutOfMemory

    make_tiny_checkpoint(tmp_path / "base")
    tr = Trainer(adapted(tmp_path / "base"), None, examples(4), quiet(tmp_path))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rebuilt = []
    monkeypatch.setattr(tr, "_set_checkpointing", lambda: rebuilt.append(tr._keep_auto_off))

    def capture_fails(batch, n_total):
        raise GraphOutOfMemory("capturing the CUDA graph for batches of shape (2, 64) ran out of GPU memory (test)")

    tr.graphs_off_because, tr._graphs = [], {(2, 64, False): object()}
    batch = {"input_ids": torch.zeros(2, 64, dtype=torch.long)}
    tr.keep_policy = types.SimpleNamespace(decide=lambda tokens: 2 if tokens == 128 else 0)
    assert tr._replay(capture_fails, batch, 1) is None
    assert tr.graphs_off_because == [] and tr._graphs == {} and tr._keep_auto_off and rebuilt == [True]
    assert [k for k, _ in tr.notes] == ["keep_mlp_layers_off"]
    tr.keep_policy = types.SimpleNamespace(decide=lambda tokens: 0)  # a capture that kept none fails: graphs off
    assert tr._replay(capture_fails, batch, 1) is None
    assert "ran out of GPU memory" in tr.graphs_off_because[0] and [k for k, _ in tr.notes][-1] == "cuda_graphs_off"


def test_keep_mlp_layers_setting(monkeypatch):
    import minitrain.trainer as mt

    monkeypatch.setenv("MINITRAIN_KEEP_MLP_LAYERS", "3")
    assert mt.keep_mlp_layers_default() == 3
    monkeypatch.setenv("MINITRAIN_KEEP_MLP_LAYERS", " Auto ")
    assert mt.keep_mlp_layers_default() == "auto"
    monkeypatch.delenv("MINITRAIN_KEEP_MLP_LAYERS")
    assert mt.keep_mlp_layers_default() == 0 and mt.keep_mlp_layers_default(unset="auto") == "auto"
    with pytest.raises(ValueError, match="keep_mlp_layers must be a whole number >= 0 or 'auto'"):
        mt.set_gradient_checkpointing(tiny_lora_model(False, 0.0), "offload", keep_mlp_layers="all")
    for bad in (0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_memory_gib must be a finite number > 0"):
            mt.set_gradient_checkpointing(tiny_lora_model(False, 0.0), "offload", keep_mlp_layers="auto",
                                          max_memory_gib=bad)
    assert mt.set_gradient_checkpointing(tiny_lora_model(False, 0.0), "on", keep_mlp_layers="auto") is None
    assert isinstance(mt.set_gradient_checkpointing(tiny_lora_model(False, 0.0), "offload", keep_mlp_layers=" Auto"),
                      mt.KeepMLPPolicy)
    monkeypatch.setenv("MINITRAIN_KEEP_MLP_LAYERS", "-1")
    with pytest.raises(ValueError, match="MINITRAIN_KEEP_MLP_LAYERS='-1'"):
        mt.keep_mlp_layers_default()
    monkeypatch.setenv("MINITRAIN_KEEP_MLP_LAYERS", "all")
    with pytest.raises(ValueError, match="whole number"):
        mt.keep_mlp_layers_default()
    with pytest.raises(ValueError, match="keep_mlp_layers must be a whole number >= 0"):
        mt.set_gradient_checkpointing(tiny_lora_model(False, 0.0), "offload", keep_mlp_layers=-2)


def test_keep_mlp_layers_config():
    from minitrain.config import ConfigError, TrainConfig

    assert TrainConfig(keep_mlp_layers=3).keep_mlp_layers == 3
    assert TrainConfig(keep_mlp_layers=3.0).keep_mlp_layers == 3
    assert TrainConfig(keep_mlp_layers="AUTO").keep_mlp_layers == "auto"
    assert TrainConfig(max_memory_gib=7).max_memory_gib == 7
    for bad in (-1, 1.5, True, "all"):
        with pytest.raises(ConfigError, match="keep_mlp_layers"):
            TrainConfig(keep_mlp_layers=bad)
    for bad in (0, -2.0, float("inf"), "7"):
        with pytest.raises(ConfigError, match="max_memory_gib"):
            TrainConfig(max_memory_gib=bad)
