"""CUDA-graph training micro-steps (minitrain.cuda_graphs): the loss formulation on CPU against the trainer's,
and on the GPU the replayed forward + backward against the eager one (losses, every adapter gradient, a few
AdamW steps), with QLoRA bases, gradient checkpointing, packed rows and ignored labels."""
import pytest
import torch

from minitrain.cuda_graphs import GraphedLoss, GraphError, graph_blockers, summed_token_loss, zero_grads
from minitrain.lora import add_lora
from minitrain.model import LlamaForCausalLM, ModelArgs, rope_inv_freq
from minitrain.trainer import n_items, set_gradient_checkpointing, token_loss_sum

ARGS = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, max_position_embeddings=512)


def nf4_projections(model):
    """Every attention and MLP projection of ``model`` becomes an NF4Linear (the QLoRA base)."""
    import quant

    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                setattr(parent, n, quant.NF4Linear.from_linear(getattr(parent, n)))


def model_with_lora(device, dtype, nf4=False, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(ModelArgs(**ARGS)).to(dtype)
    model.model.inv_freq = rope_inv_freq(ModelArgs(**ARGS)).to(device)  # fp32 angles, as the loader sets them
    if nf4:
        nf4_projections(model)
    add_lora(model, r=8, alpha=16, dropout=dropout)
    for n, p in model.named_parameters():  # non-zero B so that every adapter gradient is exercised
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def random_batch(B, T, device, packed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ARGS["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[:, : T // 4] = -100  # a prompt that is not trained
    labels[torch.rand(B, T, generator=g) < 0.1] = -100
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two documents per row, the second restarting its positions
        cut = T // 3
        pos = torch.cat([torch.arange(cut), torch.arange(T - cut)])[None].expand(B, T).contiguous()
        batch["position_ids"] = pos
    return {k: v.to(device) for k, v in batch.items()}


def grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_summed_token_loss_equals_the_trainers_loss_on_cpu():
    """The graph-safe loss (all positions through the CE, ignored labels add nothing) is the trainer's loss."""
    model = model_with_lora("cpu", torch.float32)
    for packed in (False, True):
        batch = random_batch(2, 24, "cpu", packed=packed, seed=3)
        n = n_items(batch)
        want = token_loss_sum(model, batch) / n
        got = summed_token_loss(model, batch["input_ids"], batch["labels"], batch.get("position_ids"),
                                torch.tensor(float(n)))
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (packed, got.item(), want.item())


def test_graphs_refuse_what_they_cannot_run():
    model = model_with_lora("cpu", torch.float32, dropout=0.1)
    why = graph_blockers(model)
    assert any("CUDA" in w for w in why) and any("dropout" in w for w in why), why
    with pytest.raises(GraphError, match="not possible"):
        GraphedLoss(model, 2, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("nf4, checkpointing, packed", [(False, "off", False), (True, "on", False),
                                                        (True, "on", True), (True, "offload", True)])
def test_graph_replay_matches_eager_forward_backward(nf4, checkpointing, packed):
    B, T = 2, 200  # T not a multiple of any block size
    eager = model_with_lora("cuda", torch.bfloat16, nf4=nf4)
    graphed = model_with_lora("cuda", torch.bfloat16, nf4=nf4)
    # offload (host copies on a side stream, captured in the graph) against plain recomputation, eager
    set_gradient_checkpointing(eager, "on" if checkpointing == "offload" else checkpointing)
    set_gradient_checkpointing(graphed, checkpointing)
    gl = GraphedLoss(graphed, B, T, packed=packed, warmup=2)
    for step in range(5):  # 2 eager warm-up calls, the capture, 2 replays: each on new data
        batch = random_batch(B, T, "cuda", packed=packed, seed=10 + step)
        n = n_items(batch)
        zero_grads(list(eager.parameters()))
        eager.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = token_loss_sum(eager, batch) / n
        want.backward()
        zero_grads(gl.params)
        got = gl(batch, n)
        torch.cuda.synchronize()
        assert abs(got.item() - want.item()) <= 2e-3 * abs(want.item()), (step, got.item(), want.item())
        ge, gg = grads(eager), grads(graphed)
        for name in ge:
            err = ((gg[name] - ge[name]).norm() / ge[name].norm().clamp_min(1e-12)).item()
            assert err < 2e-2, f"step {step}: {name} gradient differs, relative error {err:.3g}"
    assert gl.graph is not None


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_graph_accumulates_like_eager_and_trains_the_same(mode):
    """Two micro-batches per step through the graph, AdamW on the adapters: the loss curve tracks eager (which
    recomputes from device copies; with "offload" the graph's layer inputs live in reused host buffers)."""
    B, T = 2, 128
    models = [model_with_lora("cuda", torch.bfloat16, nf4=True) for _ in range(2)]
    set_gradient_checkpointing(models[0], "on")
    set_gradient_checkpointing(models[1], mode)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in models]
    gl = GraphedLoss(models[1], B, T, warmup=1)
    curves = ([], [])
    for step in range(6):
        micro = [random_batch(B, T, "cuda", seed=100 + 2 * step + j) for j in range(2)]
        n = sum(n_items(b) for b in micro)
        for k, (m, opt) in enumerate(zip(models, opts)):
            opt.zero_grad(set_to_none=False)
            total = 0.0
            for b in micro:
                if k == 0:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        loss = token_loss_sum(m, b) / n
                    loss.backward()
                else:
                    loss = gl(b, n)
                total += loss.item()
            opt.step()
            curves[k].append(total)
    for a, b in zip(*curves):
        assert abs(a - b) <= 5e-3 * abs(a), curves


def _offload_vs_on(batches_per_backward, lengths):
    """Adapter grads of checkpointing "offload" and "on" on CPU, for backwards over several summed forwards."""
    from minitrain.trainer import HostOffload

    out = {}
    for mode in ("on", "offload"):
        model = model_with_lora("cpu", torch.float32)
        set_gradient_checkpointing(model, mode)
        for group in range(len(lengths) // batches_per_backward):
            model.zero_grad(set_to_none=True)
            loss = 0
            for j in range(batches_per_backward):
                T = lengths[group * batches_per_backward + j]
                batch = random_batch(2, T, "cpu", seed=T)
                loss = loss + token_loss_sum(model, batch)
            loss.backward()
        out[mode] = grads(model)
        pools = {layer.forward.offload for layer in model.model.layers} - {None}
    return out, pools


def test_offload_two_forwards_before_one_backward():
    # a second forward while the first's layer inputs still wait for their recomputation (two losses summed)
    # must not overwrite them: fresh host buffers for the second, the same gradients as plain recomputation
    out, _ = _offload_vs_on(2, [24, 24, 17, 24])
    for name, g in out["on"].items():
        assert torch.allclose(out["offload"][name], g, rtol=1e-5, atol=1e-6), name


def test_offload_host_buffers_grow_to_the_longest_batch():
    # batches of varying length reuse one host buffer per checkpointed input, grown to the largest input: two per
    # layer (x and h1) with the two-segment offload checkpoint (minitrain.trainer.SPLIT_OFFLOAD_SEGMENTS), else one
    from minitrain import trainer

    lengths = [16, 40, 24, 8, 40]
    out, pools = _offload_vs_on(1, lengths)
    for name, g in out["on"].items():
        assert torch.allclose(out["offload"][name], g, rtol=1e-5, atol=1e-6), name
    (pool,) = pools
    per_layer = 2 if trainer.SPLIT_OFFLOAD_SEGMENTS else 1
    assert len(pool.buffers) == per_layer * ARGS["num_hidden_layers"], pool.buffers.keys()
    assert all(b.numel() >= 2 * max(lengths) * ARGS["hidden_size"] for b in pool.buffers.values())


@pytest.mark.gpu
def test_offload_keeps_layer_inputs_off_the_gpu():
    """Eager, 8 layers: "offload" gives the gradients of "on", and its peak holds at most three layer inputs where
    "on" holds all eight (at least 5 x 8 MiB less; measured on an H100: 165 vs 210 MiB above the model)."""
    args = ModelArgs(**dict(ARGS, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8))
    B, T = 2, 2048
    per_input = B * T * args.hidden_size * 2
    ids = torch.randint(0, args.vocab_size, (B, T), device="cuda")
    out = {}
    for mode in ("on", "offload"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(args).to(torch.bfloat16)
        model.model.inv_freq = rope_inv_freq(args).cuda()
        add_lora(model, r=8, alpha=16)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        set_gradient_checkpointing(model, mode)
        for step in range(2):  # the second step reuses the host buffers
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = token_loss_sum(model, {"input_ids": ids, "labels": ids}) / (B * T)
            loss.backward()
            torch.cuda.synchronize()
        out[mode] = (loss.item(), grads(model), torch.cuda.max_memory_allocated() - base)
        del model, loss
        torch.cuda.empty_cache()
    (l_on, g_on, peak_on), (l_off, g_off, peak_off) = out["on"], out["offload"]
    assert l_on == pytest.approx(l_off, rel=1e-3)
    for name in g_on:
        err = ((g_off[name] - g_on[name]).norm() / g_on[name].norm().clamp_min(1e-12)).item()
        assert err < 1e-2, f"{name}: offload gradient differs from checkpointing 'on' by {err:.3g}"
    assert peak_off <= peak_on - 5 * per_input, (peak_on / 2**20, peak_off / 2**20, per_input / 2**20)


@pytest.mark.gpu
def test_graph_rejects_a_batch_of_another_shape():
    model = model_with_lora("cuda", torch.bfloat16)
    gl = GraphedLoss(model, 2, 64, warmup=1)
    with pytest.raises(GraphError, match=r"shape \(2, 64\)"):
        gl(random_batch(2, 65, "cuda"), 10)


@pytest.mark.gpu
def test_warmups_of_many_shapes_reuse_their_memory():
    """Eager warm-ups of several shapes run on one side stream, so the blocks one frees serve the next (a new
    stream each left every warm-up's memory cached under a stream never used again)."""
    from minitrain.cuda_graphs import warmup_stream

    assert warmup_stream(torch.device("cuda")) is warmup_stream(torch.device("cuda", torch.cuda.current_device()))
    model = model_with_lora("cuda", torch.bfloat16)
    reserved = []
    for T in (256, 224, 192, 160, 128, 112):  # each needs no more than the one before
        GraphedLoss(model, 2, T, warmup=2)(random_batch(2, T, "cuda"), 100)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] <= reserved[0] + 8 * 2**20, [r / 2**20 for r in reserved]


@pytest.mark.gpu
def test_trainer_graphs_padded_batches_of_many_lengths_by_default(tmp_path):
    """Default settings (packing off, cuda_graphs "auto"): examples of many lengths run from a few graphs, one per
    graph length, and the per-step losses follow the eager trainer (cuda_graphs="off")."""
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer, graph_length

    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(40):
        n = int(torch.randint(12, 150, (), generator=g))
        ids = torch.randint(1, ARGS["vocab_size"], (n,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    curves, trainers = [], []
    for mode in ("off", "auto"):
        model = model_with_lora("cuda", torch.bfloat16, nf4=True)
        cfg = TrainConfig(output_dir=str(tmp_path / mode), max_steps=10, learning_rate=1e-3,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing="on",
                          save_steps=0, progress=False, lr_scheduler_type="constant", cuda_graphs=mode, seed=1)
        tr = Trainer(model, None, data, cfg)
        tr.train()
        curves.append(tr.history["loss"])
        trainers.append(tr)
    assert trainers[0].graphs_off_because and not trainers[1].graphs_off_because
    lengths = {graph_length(max(len(data[i]["input_ids"]) for i in b)) for e in range(2)
               for b in trainers[1].batches.plan(e)}
    assert 1 <= trainers[1].graphs_captured <= 2 * len(lengths) and trainers[0].graphs_captured == 0
    for a, b in zip(*curves):
        assert abs(a - b) <= 2e-2 * abs(a), curves


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_trainer_with_cuda_graphs_follows_the_eager_trainer(tmp_path, fp16):
    """Trainer(cuda_graphs="on") against cuda_graphs="off": same data, same init, AdamW with clipping and
    accumulation; per-step losses within bf16 tolerance, and the graphs were really used. fp16: loss scaling by
    the GradScaler's scale tensor inside the graph, the same scale at the end."""
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    T = 96
    data = []
    for _ in range(24):
        ids = torch.randint(0, ARGS["vocab_size"], (T,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [-100] * 20 + ids[20:]})
    curves, used, scales = [], [], []
    for mode in ("off", "on"):
        model = model_with_lora("cuda", torch.float16 if fp16 else torch.bfloat16, nf4=True)
        cfg = TrainConfig(output_dir=str(tmp_path / mode), max_steps=6, learning_rate=1e-3, per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, gradient_checkpointing="on", save_steps=0, progress=False,
                          lr_scheduler_type="constant", cuda_graphs=mode, seed=1, fp16=fp16, bf16=not fp16)
        tr = Trainer(model, None, data, cfg)
        calls = []
        orig = tr._graph_for
        tr._graph_for = lambda b: (calls.append(1), orig(b))[1]
        tr.train()
        curves.append(tr.history["loss"])
        used.append(bool(tr.graphs_off_because) is False and len(calls) > 0)
        scales.append(tr.scaler.get_scale() if fp16 else None)
    assert used == [False, True] and scales[0] == scales[1]
    for a, b in zip(*curves):
        assert abs(a - b) <= 1e-2 * abs(a), curves


def test_graph_lengths_are_few_and_pad_at_most_a_quarter():
    from minitrain.trainer import GRAPH_MIN_LEN, graph_length

    lengths = [graph_length(t) for t in range(1, 2049)]
    assert sorted(set(lengths)) == [64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896,
                                    1024, 1280, 1536, 1792, 2048]
    for t, n in zip(range(1, 2049), lengths):
        assert n >= t and n % 16 == 0
        assert t <= GRAPH_MIN_LEN or n <= 1.25 * t, (t, n)
    assert lengths == sorted(lengths)  # a longer batch never runs at a shorter length
    assert graph_length(4097) == 5120 and graph_length(130_000) == 131_072
    assert graph_length(2000, limit=2000) == 2000 and graph_length(1900, limit=2000) == 2000  # capped: T as is
    assert graph_length(1700, limit=2000) == 1792


def test_pad_batch_extends_a_padded_batch():
    from minitrain.trainer import pad_batch

    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    batch = {"input_ids": ids, "labels": torch.tensor([[-100, 6, 7], [-100, 9, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]), "position_ids": torch.tensor([[0, 1, 2], [0, 1, 0]]),
             "n_items": torch.tensor(3)}
    out = pad_batch(batch, 5, pad_id=1)
    assert out["input_ids"].tolist() == [[5, 6, 7, 1, 1], [8, 9, 0, 1, 1]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, 9, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert out["position_ids"][:, 3:].tolist() == [[3, 4], [1, 2]]
    assert int(out["n_items"]) == 3 and pad_batch(batch, 3, 1) is batch


def test_padded_batches_reach_the_model_without_position_ids():
    """A right-padded batch is plain causal attention for its real tokens: minitrain's model gets no position ids
    (the flash path, no host sync); the loss equals that of each row alone, unpadded."""
    from minitrain.data.batching import collate_padded
    from minitrain.trainer import is_padded

    class Store:
        def __init__(self, seqs):
            self.seqs = seqs

        def get(self, i, rejected=False):
            import numpy as np
            ids = np.asarray(self.seqs[i], dtype=np.int64)
            return ids, np.ones(len(ids), dtype=bool)

    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, ARGS["vocab_size"], (n,), generator=g).tolist() for n in (40, 23)]
    batch = collate_padded(Store(seqs), [0, 1], pad_id=0)
    assert is_padded(batch) and batch["position_ids"][1, 23:].eq(0).all()
    model = model_with_lora("cpu", torch.float32)
    seen = []
    orig = model.hidden_states
    model.hidden_states = lambda ids, position_ids=None, **kw: (seen.append(position_ids), orig(ids, position_ids, **kw))[1]
    with torch.no_grad():
        both = token_loss_sum(model, batch, fused=False)
        alone = sum(token_loss_sum(model, collate_padded(Store(seqs), [i], pad_id=0), fused=False) for i in (0, 1))
    assert seen and all(p is None for p in seen)
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-5)


def test_trainer_pads_batches_to_graph_lengths_only_when_graphs_run(tmp_path):
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer

    model = model_with_lora("cpu", torch.float32)
    data = [{"input_ids": list(range(1, n + 1))} for n in (70, 30, 65, 9)]
    tr = Trainer(model, None, data, TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False,
                                                per_device_train_batch_size=2, seed=0))
    b = tr.batches.collate([0, 2])
    assert tr.graphs_off_because and tr._graph_shape(b) is b  # CPU: eager, nothing added
    tr.graphs_off_because = []  # as on CUDA
    out = tr._graph_shape(b)
    assert out["input_ids"].shape == (2, 80) and int(out["attention_mask"].sum()) == 135
    assert tr._graph_shape({"input_ids": torch.zeros(1, 70, dtype=torch.long)})["input_ids"].shape == (1, 70)


def test_trainer_says_why_graphs_are_off(tmp_path):
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer, TrainingError

    model = model_with_lora("cpu", torch.float32)
    data = [{"input_ids": list(range(10))}] * 4
    tr = Trainer(model, None, data, TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False))
    assert any("CUDA" in w for w in tr.graphs_off_because)
    with pytest.raises(TrainingError, match="cuda_graphs='on' is not possible"):
        Trainer(model, None, data, TrainConfig(output_dir=str(tmp_path), max_steps=1, cuda_graphs="on"))


def test_gradient_checkpointing_auto_is_on_for_cuda_only(tmp_path):
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer

    assert TrainConfig().gradient_checkpointing == "auto"
    data = [{"input_ids": list(range(1, 12))}] * 4
    model = model_with_lora("cpu", torch.float32)
    assert Trainer(model, None, data, TrainConfig(output_dir=str(tmp_path), progress=False)).gc_mode == "off"
    assert Trainer(model, None, data, TrainConfig(output_dir=str(tmp_path), progress=False,
                                                  gradient_checkpointing="offload")).gc_mode == "offload"
    if torch.cuda.is_available():
        model = model_with_lora("cuda", torch.bfloat16)
        assert Trainer(model, None, data, TrainConfig(output_dir=str(tmp_path), progress=False)).gc_mode == "on"
    with pytest.raises(ValueError, match="auto"):
        TrainConfig(gradient_checkpointing="sometimes")


def test_trainer_runs_on_eagerly_when_a_capture_runs_out_of_memory(tmp_path, monkeypatch):
    """A capture that runs out of GPU memory trained nothing: the trainer drops its graphs, says so once, and
    trains that batch and the rest eagerly, as an eager run would (simulated on the CPU)."""
    import json

    from minitrain.config import TrainConfig
    from minitrain.cuda_graphs import GraphOutOfMemory
    from minitrain.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, ARGS["vocab_size"], (int(n),), generator=g).tolist()} for n in
            torch.randint(10, 60, (12,), generator=g)]
    cfg = dict(max_steps=3, learning_rate=1e-3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
               save_steps=0, progress=False, lr_scheduler_type="constant", seed=1, gradient_checkpointing="offload")
    ref = Trainer(model_with_lora("cpu", torch.float32), None, data, TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    ref.train()
    tr = Trainer(model_with_lora("cpu", torch.float32), None, data, TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    tr.graphs_off_because = []  # as on CUDA: the first batch is padded to a graph length and "captured"
    calls = []

    def capture_fails(batch, n_total):
        calls.append(batch["input_ids"].shape)
        raise GraphOutOfMemory("capturing the CUDA graph for batches of shape (2, 64) ran out of GPU memory (test)")

    tr._graph_for = lambda batch: None if tr.graphs_off_because else capture_fails
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    import minitrain.trainer as trainer_mod

    modes, orig = [], trainer_mod.set_gradient_checkpointing
    monkeypatch.setattr(trainer_mod, "set_gradient_checkpointing", lambda m, mode, *a, **kw: (modes.append(mode), orig(m, mode, *a, **kw))[1])
    tr.train()
    assert len(calls) == 1 and "ran out of GPU memory" in tr.graphs_off_because[0]
    # the fallback rebuilds the checkpointing wrappers (an "offload" run drops the aborted capture's stashes)
    assert modes == ["offload", "offload", "off"], modes
    for a, b in zip(ref.history["loss"], tr.history["loss"]):
        assert abs(a - b) <= 1e-5 * abs(a), (ref.history["loss"], tr.history["loss"])
    warnings = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if "warning" in l]
    assert [w["warning"] for w in warnings] == ["cuda_graphs_off"] and "eagerly" in warnings[0]["message"]


@pytest.mark.gpu
def test_capture_out_of_memory_on_cuda_falls_back_to_eager(tmp_path, monkeypatch):
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer

    class NoMemory:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "graph", NoMemory)
    data = [{"input_ids": list(range(1, 40 + i))} for i in range(8)]
    tr = Trainer(model_with_lora("cuda", torch.bfloat16), None, data,
                 TrainConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, save_steps=0,
                             progress=False, seed=0))
    tr.train()
    assert "ran out of GPU memory" in tr.graphs_off_because[0] and tr.graphs_captured == 0
    assert all(torch.isfinite(torch.tensor(tr.history["loss"])))


def test_fp16_graphs_scale_the_loss_by_the_scalers_own_tensor(tmp_path):
    from minitrain.config import TrainConfig
    from minitrain.trainer import Trainer

    data = [{"input_ids": list(range(1, 12))}] * 4
    tr = Trainer(model_with_lora("cpu", torch.float32), None, data,
                 TrainConfig(output_dir=str(tmp_path), progress=False, fp16=True, bf16=False))
    s = tr._loss_scale()
    assert s is not None and s.dim() == 0 and s is tr._loss_scale() and float(s) == tr.scaler.get_scale()
    tr.scaler.load_state_dict({**tr.scaler.state_dict(), "scale": 1024.0})
    assert float(s) == 1024.0  # updated in place: a captured graph reads the new value
    assert Trainer(model_with_lora("cpu", torch.float32), None, data,
                   TrainConfig(output_dir=str(tmp_path), progress=False))._loss_scale() is None


def test_gradient_checkpointing_auto_never_blocks_requested_graphs(tmp_path, monkeypatch):
    """torch < 2.10 cannot capture checkpointing: there "auto" must leave it off when cuda_graphs="on" asks for
    graphs (on by default, it made Trainer(cuda_graphs="on") fail where it used to run); "auto" graphs keep
    checkpointing (the graphs are then off, the progress line says why). Checked through the Trainer's decision
    for a CUDA device, on the CPU."""
    import minitrain.cuda_graphs as cg
    from minitrain import trainer as trainer_mod

    cuda = torch.device("cuda", 0)
    decide = getattr(trainer_mod, "auto_checkpointing", None)
    assert decide is not None, "minitrain/trainer.py: no auto_checkpointing(device, cuda_graphs) deciding 'auto'"
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decide(torch.device("cpu"), "auto") == "off" and decide(cuda, "auto") == "offload"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # several processes share the host: recompute, no host copies
    assert decide(cuda, "auto") == "on" and decide(cuda, "on") == "on"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert decide(cuda, "auto") == "offload"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "4")  # srun/mpirun-style: no local count, so assume the host is shared
    assert decide(cuda, "auto") == "on"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # torchrun's local count wins
    assert decide(cuda, "auto") == "offload"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(cg, "CHECKPOINT_IN_GRAPHS", False)
    assert decide(cuda, "on") == "off", "gradient_checkpointing='auto' with cuda_graphs='on' on torch < 2.10"
    assert decide(cuda, "auto") == "offload" and decide(cuda, "off") == "offload"
