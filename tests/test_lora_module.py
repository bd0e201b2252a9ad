"""LoRALinear, add_lora and the TOML/dataclass configuration.

Oracles: peft's own LoRA Linear layer (same A, B, base) for forward and gradients; quant.NF4Linear's
dequantized weight for the 4-bit base.
"""
import math

import pytest
import torch
from torch import nn

import quant
from minitrain.config import ConfigError, LoRAConfig, TrainConfig, build, load_toml, settings_from_dict
from minitrain.lora import DEFAULT_TARGETS, LoRAError, LoRALinear, add_lora, lora_layers, lora_parameters

# (N, K, R): tiny; odd/unaligned features and rank.


pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(16, 8, 4), (37, 23, 3)]


def _report(a, b, what):
    d = (a - b).abs()
    return f"{what}: max error {d.max().item():.3g} at {tuple(int(i) for i in torch.nonzero(d == d.max())[0])}, " \
           f"{int((d > 1e-5).sum())} of {d.numel()} differ"


def _peft_linear(base: nn.Linear, r, alpha, use_rslora):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["x"])
    return PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha, use_rslora=use_rslora)


@pytest.mark.parametrize("N,K,R", SHAPES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_and_grads_match_peft(N, K, R, use_rslora):
    base = nn.Linear(K, N, bias=True)
    ours = LoRALinear(base, r=R, alpha=2 * R + 1, use_rslora=use_rslora)
    with torch.no_grad():
        ours.lora_B.normal_()  # a non-zero update, so the adapter path is exercised
    import copy

    ref = _peft_linear(copy.deepcopy(base), R, 2 * R + 1, use_rslora)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_A)
        ref.lora_B["default"].weight.copy_(ours.lora_B)
    assert ours.scale == pytest.approx(ref.scaling["default"])
    x = torch.randn(3, 5, K)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), ref(x2)
    assert torch.allclose(y1, y2, atol=1e-5, rtol=1e-5), _report(y1, y2, "forward")
    dy = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, (x1, ours.lora_A, ours.lora_B), dy)
    g2 = torch.autograd.grad(y2, (x2, ref.lora_A["default"].weight, ref.lora_B["default"].weight), dy)
    for a, b, name in zip(g1, g2, ("dx", "dA", "dB")):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), _report(a, b, name)


def test_init_is_peft_default_and_leaves_output_unchanged():
    N, K, R = 48, 40, 8
    base = nn.Linear(K, N, bias=False)
    layer = LoRALinear(base, r=R, alpha=16)
    bound = 1.0 / math.sqrt(K)  # kaiming_uniform(a=sqrt(5)) on (R, K): U(-1/sqrt(K), 1/sqrt(K))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    assert layer.lora_A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(4, K)
    assert torch.equal(layer(x), base(x))
    assert layer.scale == 2.0 and LoRALinear(base, r=4, alpha=8, use_rslora=True).scale == 4.0
    g = LoRALinear(base, r=R, alpha=16, init="gaussian")
    assert g.lora_A.std().item() == pytest.approx(1.0 / R, rel=0.25)
    with pytest.raises(LoRAError, match="init"):
        LoRALinear(base, r=R, alpha=16, init="pissa")
    with pytest.raises(LoRAError, match="rank"):
        LoRALinear(base, r=0, alpha=16)


def test_nf4_base_matches_dequantized_dense():
    K, N, R = 128, 64, 4
    dense = nn.Linear(K, N, bias=False)
    q = quant.NF4Linear.from_linear(dense)
    layer = LoRALinear(q, r=R, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    w = q.weight.dequantize(torch.float32)
    x = torch.randn(6, K, requires_grad=True)
    y = layer(x)
    expect = x @ w.t() + layer.scale * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.allclose(y, expect, atol=1e-5), _report(y, expect, "NF4 forward")
    torch.autograd.grad(y.sum(), [layer.lora_A, layer.lora_B])  # the adapter trains on a 4-bit base
    assert torch.allclose(layer.merged_weight(), w + layer.scale * layer.lora_B @ layer.lora_A, atol=1e-6)


def test_dropout_only_in_training():
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(8, 32)
    no_drop = base(x) + layer.scale * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    layer.eval()
    assert torch.allclose(layer(x), no_drop, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), no_drop, atol=1e-3)


class _Tiny(nn.Module):
    """HF-named module tree: model.layers.N.self_attn.*_proj / mlp.*_proj, plus an embedding and lm_head."""

    def __init__(self, C=16, F=24, L=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(10, C)
        self.model.layers = nn.ModuleList()
        for _ in range(L):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, n, nn.Linear(C, C, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.gate_proj, layer.mlp.up_proj = nn.Linear(C, F, bias=False), nn.Linear(C, F, bias=False)
            layer.mlp.down_proj = nn.Linear(F, C, bias=False)
            self.model.layers.append(layer)
        self.lm_head = nn.Linear(C, 10, bias=False)


def test_add_lora_wraps_targets_and_freezes_the_rest():
    C, F, L, R = 16, 24, 2, 4
    m = add_lora(_Tiny(C, F, L), r=R, alpha=8)
    layers = lora_layers(m)
    assert len(layers) == 7 * L
    assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == sorted(DEFAULT_TARGETS)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == [n for n, _ in lora_parameters(m)]
    expect = L * (4 * R * (C + C) + 2 * R * (C + F) + R * (F + C))
    assert sum(p.numel() for n, p in m.named_parameters() if p.requires_grad) == expect
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in dict(m.named_parameters())
    with pytest.raises(LoRAError, match="already has LoRA"):
        add_lora(m)
    m2 = add_lora(_Tiny(), target_modules=["q_proj", "v_proj"])
    assert len(lora_layers(m2)) == 4
    m3 = add_lora(_Tiny(), target_modules=r"model\.layers\.1\.mlp\..*")
    assert sorted(lora_layers(m3)) == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.gate_proj",
                                       "model.layers.1.mlp.up_proj"]
    with pytest.raises(LoRAError, match="no module matches"):
        add_lora(_Tiny(), target_modules=["qkv"])


def test_add_lora_on_nf4_layers():
    m = _Tiny()
    for layer in m.model.layers:
        layer.mlp.up_proj = quant.NF4Linear.from_linear(layer.mlp.up_proj)
    add_lora(m, r=2, alpha=2)
    assert isinstance(m.model.layers[0].mlp.up_proj.base_layer, quant.NF4Linear)


# ---- configuration --------------------------------------------------------------------------------------

def test_defaults_are_the_practitioner_ones():
    t, lo = TrainConfig(), LoRAConfig()
    assert (t.learning_rate, t.per_device_train_batch_size, t.gradient_accumulation_steps) == (2e-4, 2, 4)
    assert (lo.r, lo.lora_alpha, lo.lora_dropout, tuple(lo.target_modules)) == (16, 16.0, 0.0, DEFAULT_TARGETS)
    assert TrainConfig(gradient_checkpointing=True).gradient_checkpointing == "on"
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        TrainConfig(lr_scheduler_type="poly")


def test_toml_maps_onto_fields(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('model = "ckpt"\nlearning_rate = 1e-4\nmax_steps = 60\ngradient_checkpointing = "offload"\n'
                 'data = ["a.jsonl"]\n[lora]\nr = 8\nlora_alpha = 16\ntarget_modules = ["q_proj", "v_proj"]\n')
    sections, extra = load_toml(p)
    m, lo, t = build(sections)
    assert (m.model, t.learning_rate, t.max_steps, t.gradient_checkpointing) == ("ckpt", 1e-4, 60, "offload")
    assert (lo.r, lo.lora_alpha, lo.target_modules) == (8, 16.0, ["q_proj", "v_proj"])
    assert extra == {"data": ["a.jsonl"]}


def test_toml_errors_name_the_key(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("lerning_rate = 1e-4\n")
    with pytest.raises(ConfigError, match=r"run.toml: unknown key 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        load_toml(p)
    p.write_text("[lora]\nrank = 8\n")
    with pytest.raises(ConfigError, match=r"\[lora\]: unknown key 'rank'"):
        load_toml(p)
    p.write_text('max_steps = "many"\n')
    with pytest.raises(ConfigError, match="'max_steps' must be int"):
        load_toml(p)
    p.write_text("max_steps = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="unknown key 'foo'"):
        settings_from_dict({"foo": 1})
