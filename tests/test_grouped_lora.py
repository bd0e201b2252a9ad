"""Grouped LoRA projections in minitrain.model: attention's q/k/v through one ``triton_ops.lora.lora_qkv`` call
and the MLP through one ``lora_mlp`` call, against the same model with the switch off (each projection its own
LoRALinear module, ``lora_linear`` + SwiGLU kernel + ``lora_linear``).

What is exact and what is not: the forward computes every projection with the same ops either way, so the loss
is bit-identical where no adapters are batched (every LoRA projection with dropout); batching the adapters of
one input (x·[A_q; A_k; A_v]ᵀ) may round differently. In backward the grouped Functions sum the dx terms of a
group into one buffer (addmm_ with beta=1) where the modules' autograd adds three rounded buffers, so gradients
differ by rounding: fp32 runs agree to 1e-5 relative, bf16 runs are held to the tolerance rule against an fp32
reference. The checkpoint recomputation's skip of the unused MLP output is bit-exact on the grouped path.

CPU: LoRALinear is forced onto the hand-written path (as ``tests/test_trainer.py`` does) and the MLPs'
``kernel_backend`` is "triton" (SwiGLU through the Triton interpreter), which is what CUDA runs with "auto";
attention and the norms keep "auto" (plain torch on CPU; attention groups with any backend but "torch").
"""
import functools
import pytest
import torch

import minitrain.model as mm
import triton_ops.lora as tlora
from minitrain.lora import add_lora, lora_layers
from minitrain.model import LlamaForCausalLM, ModelArgs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def hand_written(monkeypatch):
    """LoRALinear through triton_ops.lora's hand-written path on CPU (what "auto" gives CUDA tensors), and a
    record of the grouped calls: ("qkv", number of projections) per lora_qkv call from the model (lora_linear
    calls it too, with one projection), "mlp" per lora_mlp call, "swiglu" per SwiGLU forward kernel."""
    import importlib

    import minitrain.lora as mlora

    tswiglu = importlib.import_module("triton_ops.swiglu")  # the module (triton_ops.swiglu is also the function)

    monkeypatch.setattr(mlora, "_fused_lora_linear", functools.partial(tlora.lora_linear, backend="triton"))
    calls = []
    qkv, mlp, sw_fn, sw_op = tlora.lora_qkv, tlora.lora_mlp, tlora._swiglu_fwd_op, tswiglu._swiglu_fwd_op

    def spy_qkv(x, *ws, _where="lora_qkv", **kw):
        if _where == "lora_qkv":
            calls.append(("qkv", sum(w is not None for w in ws)))
        return qkv(x, *ws, _where=_where, **kw)

    def spy_mlp(*a, **kw):
        calls.append("mlp")
        return mlp(*a, **kw)

    def spy_sw(fn):
        def wrapped(*a, **kw):
            calls.append("swiglu")
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(tlora, "lora_qkv", spy_qkv)
    monkeypatch.setattr(tlora, "lora_mlp", spy_mlp)
    monkeypatch.setattr(tlora, "_swiglu_fwd_op", spy_sw(sw_fn))       # lora_mlp's SwiGLU
    monkeypatch.setattr(tswiglu, "_swiglu_fwd_op", spy_sw(sw_op))     # the model's swiglu() (public op)
    monkeypatch.setattr(mm, "GROUPED_LORA", True)
    return calls


def tiny_model(targets=ALL, nf4=False, dropout=0.0, bias=False, kernel_backend="triton"):
    from test_cuda_graphs import nf4_projections

    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelArgs(**TINY, attention_bias=bias, mlp_bias=bias))
    if bias:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(std=0.1)
    if nf4:
        nf4_projections(model)
    add_lora(model, r=4, alpha=8, dropout=dropout, target_modules=list(targets))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)  # B != 0: every adapter gradient is exercised
    model.kernel_backend = kernel_backend
    if kernel_backend == "triton":  # only SwiGLU needs the kernel; RMSNorm and RoPE in the interpreter cost time
        for m in model.modules():
            if isinstance(m, (mm.LlamaAttention, mm.LlamaRMSNorm)):
                m.kernel_backend = "auto"
    return model.train()


def loss_and_grads(model, grouped, autocast=False, mode="off", early_stop=True):
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from minitrain.trainer import set_gradient_checkpointing

    mm.GROUPED_LORA = grouped
    set_gradient_checkpointing(model, mode)
    ids = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(7))
    torch.manual_seed(3)  # the same dropout masks in every run
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), set_checkpoint_early_stop(early_stop):
            logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    finally:
        set_gradient_checkpointing(model, "off")
        mm.GROUPED_LORA = True
    g = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), g


def _report(name, a, b):
    d = (a - b).abs()
    i = int(d.argmax())
    return f"{name}: max diff {d.max().item():.3g} at flat index {i}, {int((d > 0).sum())} of {d.numel()} differ"


def _expected_calls(model):
    """The grouped calls one forward makes: per layer a lora_qkv over the projections that join (LoRA ones and
    16-bit plain ones; an NF4 plain one runs its own module), and a lora_mlp where gate, up and down all join
    (an NF4 plain one cannot) and one has an adapter."""
    want = []
    for layer in model.model.layers:
        for mods, name in (((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), "qkv"),
                           ((layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj), "mlp")):
            kinds = [type(m).__name__ for m in mods]
            joins = sum(k in ("LoRALinear", "Linear") for k in kinds)
            if "LoRALinear" in kinds and name == "qkv":
                want.append(("qkv", joins))
            elif "LoRALinear" in kinds and joins == 3:
                want.append("mlp")
    return want


# (targets, nf4, dropout, bias, bf16 autocast): each a reason
CASES = [
    (ALL, False, 0.0, False, False),                              # plain: adapters batched in lora_qkv
    (ALL, True, 0.1, True, False),                                # QLoRA, dropout (no batching), biases
    (("q_proj", "v_proj"), False, 0.0, True, False),              # PEFT's default targets: k joins without adapter
    (("q_proj", "v_proj", "down_proj"), True, 0.1, False, False),  # NF4 k runs alone; MLP with gate/up plain NF4
    (("q_proj", "k_proj", "gate_proj", "down_proj"), False, 0.0, True, False),  # up joins the MLP without adapter
    (ALL, True, 0.1, True, True),                                 # bf16 autocast, QLoRA, dropout, biases
    (ALL, False, 0.0, False, True),                               # bf16 autocast, batched adapters
]


@pytest.mark.parametrize("targets,nf4,dropout,bias,autocast", CASES,
                         ids=["all", "all-nf4-drop-bias", "qv-bias", "qv-down-nf4-drop", "qk-gate-down-bias",
                              "bf16-all-nf4-drop-bias", "bf16-all"])
def test_grouped_equals_modules(hand_written, targets, nf4, dropout, bias, autocast):
    model = tiny_model(targets, nf4, dropout, bias)
    hand_written.clear()
    got = loss_and_grads(model, True, autocast)
    calls = [c for c in hand_written if c != "swiglu"]
    want_calls = _expected_calls(model)
    assert calls == want_calls, (calls, want_calls)
    hand_written.clear()
    same = loss_and_grads(model, False, autocast)
    assert not [c for c in hand_written if c != "swiglu"], hand_written  # switch off: module by module
    assert set(got[1]) == set(same[1]) and got[1]
    # an NF4 plain projection that runs alone keeps the exact order of the dropout masks only if it draws none
    batched = dropout == 0.0 and sum(t in targets for t in ("q_proj", "k_proj", "v_proj")) >= 2
    if not batched:  # the forward runs the same ops: bit-identical loss
        assert torch.equal(got[0], same[0]), (got[0].item(), same[0].item())
    if not autocast:
        assert got[0].item() == pytest.approx(same[0].item(), rel=1e-6)
        for n, g in got[1].items():
            assert torch.allclose(g, same[1][n], rtol=1e-5, atol=1e-7), _report(n, g, same[1][n])
        return
    # bf16: the tolerance rule against the fp32 run of the same model (no autocast, module by module)
    ref = loss_and_grads(model, False, False)
    assert abs(got[0] - ref[0]) <= 2 * abs(same[0] - ref[0]) + 2e-3, (got[0].item(), same[0].item(), ref[0].item())
    for n, g in got[1].items():
        e_got = (g - ref[1][n]).abs().max().item()
        e_same = (same[1][n] - ref[1][n]).abs().max().item()
        scale = ref[1][n].abs().max().item()
        assert e_got <= 2 * e_same + 1e-2 * scale + 1e-6, f"{n}: grouped err {e_got:.3g}, modules err {e_same:.3g}"


@pytest.mark.parametrize("nf4,dropout,mode", [(False, 0.0, "on"), (True, 0.1, "offload")],
                         ids=["fp32-on", "nf4+dropout-offload"])
def test_recompute_skip_on_the_grouped_mlp_is_exact(hand_written, monkeypatch, nf4, dropout, mode):
    """Gradient checkpointing through the trainer's CheckpointedLayer: with the grouped MLP the recomputation
    under output_unused(down's base) runs no SwiGLU (lora_mlp stops after gate and up), and the gradients are
    bit-identical to a recomputation without the skip; close to no checkpointing."""
    import minitrain.trainer as mt
    from minitrain.trainer import unused_output_base

    model = tiny_model(ALL, nf4, dropout)
    n = len(model.model.layers)
    layer = model.model.layers[0]
    assert unused_output_base(layer.forward) is layer.mlp.down_proj.base_layer.weight
    runs = {}
    for skip in (True, False):
        monkeypatch.setattr(mt, "RECOMPUTE_SKIPS_UNUSED_OUTPUT", skip)
        hand_written.clear()
        runs[skip] = loss_and_grads(model, True, mode=mode)
        # forward: one lora_mlp + its SwiGLU per layer; the recomputation: lora_mlp again, SwiGLU only without skip
        assert hand_written.count("mlp") == 2 * n, hand_written
        assert hand_written.count("swiglu") == (n if skip else 2 * n), (skip, hand_written)
    assert torch.equal(runs[True][0], runs[False][0])
    for name, g in runs[True][1].items():
        assert torch.equal(g, runs[False][1][name]), _report(name, g, runs[False][1][name])
    off = loss_and_grads(model, True)
    for name, g in runs[True][1].items():
        assert torch.allclose(g, off[1][name], rtol=1e-5, atol=1e-7), _report(name, g, off[1][name])


def test_hooks_and_patches_turn_grouping_off(hand_written):
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    mlp0 = model.model.layers[0].mlp
    with torch.no_grad():
        mm.GROUPED_LORA = False
        want = model(ids)
        mm.GROUPED_LORA = True
        seen = []
        h = attn0.q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
        hand_written.clear()
        got = model(ids)
        h.remove()
        assert seen == [(1, 7, attn0.q_proj.out_features)]  # the hook fired
        assert hand_written.count(("qkv", 3)) == 1 and hand_written.count("mlp") == 2, hand_written  # layer 1 only
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
        for register in ("register_forward_pre_hook", "register_full_backward_hook"):
            h = getattr(mlp0.up_proj, register)(lambda *a: None)
            hand_written.clear()
            model(ids)
            h.remove()
            assert hand_written.count("mlp") == 1 and hand_written.count(("qkv", 3)) == 2, (register, hand_written)
        h = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)  # global
        try:
            hand_written.clear()
            model(ids)
        finally:
            h.remove()
        assert not [c for c in hand_written if c != "swiglu"], hand_written
        attn1.k_proj.forward = lambda x: attn1.k_proj.base_layer(x)  # an instance patch
        hand_written.clear()
        model(ids)
        del attn1.k_proj.forward
        assert hand_written.count(("qkv", 3)) == 1, hand_written
        model.kernel_backend = "torch"  # the reference path: module by module, as before
        hand_written.clear()
        model(ids)
        assert not [c for c in hand_written if c != "swiglu"], hand_written


def test_no_grouping_without_the_hand_written_path():
    """On CPU with LoRALinear's default ("auto" = the fp32 reference there), or with an unknown function patched
    in, the model calls its modules one by one: grouping would change the computation."""
    import minitrain.lora as mlora

    model = tiny_model(kernel_backend="auto")
    x = torch.randn(1, 5, TINY["hidden_size"])
    attn = model.model.layers[0].self_attn
    assert mm._lora_backend(x) is None
    assert mm._grouped_projections(x, (attn.q_proj, attn.k_proj, attn.v_proj), "auto", True) is None
    old = mlora._fused_lora_linear
    try:
        mlora._fused_lora_linear = functools.partial(tlora.lora_linear, backend="triton")
        assert mm._lora_backend(x) == "triton"
        assert mm._grouped_projections(x, (attn.q_proj, attn.k_proj, attn.v_proj), "auto", True) is not None
        mlora._fused_lora_linear = functools.partial(tlora.lora_linear, backend="triton", dropout=0.0)
        assert mm._lora_backend(x) is None
    finally:
        mlora._fused_lora_linear = old


def test_kv_cache_decoding_is_unchanged(hand_written):
    model = tiny_model(("q_proj", "v_proj", "gate_proj"), nf4=True, dropout=0.1).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 6))
    outs = {}
    with torch.no_grad():
        for grouped in (True, False):
            mm.GROUPED_LORA = grouped
            cache = model.new_cache(2, 9)
            steps = [model(ids, cache=cache)]
            for t in range(3):
                steps.append(model(steps[-1][:, -1:].argmax(-1), cache=cache))
            outs[grouped] = steps
    mm.GROUPED_LORA = True
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b), _report("logits", a, b)


def test_switch_is_read_from_the_environment(monkeypatch):
    for value, want in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv("MINITRAIN_GROUPED_LORA", value)
        assert mm.grouped_lora_default() is want, value
    monkeypatch.delenv("MINITRAIN_GROUPED_LORA")
    assert mm.grouped_lora_default() is True


# ---- GPU: a moderately sized QLoRA model in bf16 ----------------------------------------------------------
GPU_ARGS = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["off", "on"])
def test_grouped_equals_modules_on_cuda(mode, monkeypatch):
    """bf16 autocast over an fp32 model with NF4 bases and LoRA on all seven projections, T=512: loss and
    every adapter gradient of the grouped path within 2x the modules' error against the fp32 run (+ a little),
    eager and replayed from a CUDA graph; the grouped calls really ran (one lora_qkv and lora_mlp per layer)."""
    from test_cuda_graphs import nf4_projections

    from minitrain.cuda_graphs import GraphedLoss, graph_blockers, zero_grads
    from minitrain.model import rope_inv_freq
    from minitrain.trainer import n_items, set_gradient_checkpointing, token_loss_sum

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(ModelArgs(**GPU_ARGS))
    model.model.inv_freq = rope_inv_freq(ModelArgs(**GPU_ARGS)).cuda()
    nf4_projections(model)
    add_lora(model, r=16, alpha=32)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.02)
    model.train()
    B, T = 1, 512
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, GPU_ARGS["vocab_size"], (B, T), generator=g)
    batch = {"input_ids": ids.cuda(), "labels": ids.cuda()}
    n = n_items(batch)
    calls = []
    qkv, mlp = tlora.lora_qkv, tlora.lora_mlp
    monkeypatch.setattr(tlora, "lora_qkv", lambda x, *w, _where="lora_qkv", **kw: (
        calls.append(_where), qkv(x, *w, _where=_where, **kw))[1])
    monkeypatch.setattr(tlora, "lora_mlp", lambda *a, **kw: (calls.append("mlp"), mlp(*a, **kw))[1])

    def grads():
        out = {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return out

    def eager(grouped, amp=True):
        monkeypatch.setattr(mm, "GROUPED_LORA", grouped)
        set_gradient_checkpointing(model, mode)
        calls.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = token_loss_sum(model, batch) / n
        loss.backward()
        set_gradient_checkpointing(model, "off")
        torch.cuda.synchronize()
        return loss.detach().float(), grads(), list(calls)

    def graphed(grouped):
        monkeypatch.setattr(mm, "GROUPED_LORA", grouped)
        set_gradient_checkpointing(model, mode)
        gl = GraphedLoss(model, B, T, amp_dtype=torch.bfloat16, warmup=1)
        for _ in range(3):  # warm-up, capture + replay, replay
            zero_grads(gl.params)
            loss = gl(batch, n)
        torch.cuda.synchronize()
        assert gl.graph is not None
        set_gradient_checkpointing(model, "off")
        return loss.detach().float(), grads(), None

    ref = eager(False, amp=False)  # fp32 math, module by module

    def check(got, same, what):
        assert abs(got[0] - ref[0]) <= 2 * abs(same[0] - ref[0]) + 2e-3, (what, got[0].item(), same[0].item(),
                                                                         ref[0].item())
        for k, gk in got[1].items():
            e_got = (gk - ref[1][k]).abs().max().item()
            e_same = (same[1][k] - ref[1][k]).abs().max().item()
            scale = ref[1][k].abs().max().item()
            assert e_got <= 2 * e_same + 1e-2 * scale + 1e-6, f"{what} {k}: grouped {e_got:.3g}, modules {e_same:.3g}"

    got, same = eager(True), eager(False)
    per_layer = 2 if mode == "on" else 1  # the recomputation calls them again
    assert got[2].count("lora_qkv") == per_layer * 2 and got[2].count("mlp") == per_layer * 2, got[2]
    assert "lora_qkv" not in same[2] and "mlp" not in same[2], same[2]
    check(got, same, "eager")
    set_gradient_checkpointing(model, mode)
    why = graph_blockers(model)
    set_gradient_checkpointing(model, "off")
    if why:  # e.g. checkpointing inside graphs needs a newer torch: the eager comparison above still counts
        pytest.skip("graphed part not possible here: " + "; ".join(why))
    check(graphed(True), graphed(False), "graphed")
