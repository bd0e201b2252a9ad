"""Export edge cases against the oracles (peft, transformers, on CPU): peft loads our adapters for ranks 1/8,
alpha != r, rsLoRA, dropout, a target subset and a load_adapter round trip; we load peft adapters whose
target_modules are name suffixes or narrowed by exclude_modules; loading onto existing adapters takes the
file's scaling and a refused file changes nothing; exported files get the usual permissions (umask)."""
import copy
import json
import os
import stat

import pytest
import torch

from minitrain.loader import load_model
from minitrain.lora import LoRAError, add_lora, load_adapter, lora_layers, save_adapter, save_merged
from test_export import _adapted, _check, make_tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    return path, make_tiny_checkpoint(path)


def _load(path):
    return load_model(path, dtype=torch.float32, device="cpu")[0]


def _peft_adapter(hf, out, **kw):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(hf), LoraConfig(task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(out)
    return pm.eval()


@pytest.mark.parametrize("r,rslora,dropout,targets", [(1, False, 0.0, None), (8, True, 0.1, ["q_proj", "v_proj"])])
def test_peft_loads_ours_and_the_round_trip(base, tmp_path, r, rslora, dropout, targets):
    from peft import PeftModel

    path, hf = base
    model = _load(path)
    add_lora(model, r=r, alpha=3, dropout=dropout, use_rslora=rslora, **({"target_modules": targets} if targets else {}))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    model.eval()
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"], cfg["lora_dropout"]) == (r, 3, rslora, dropout)
    assert (cfg["task_type"], cfg["bias"], cfg["fan_in_fan_out"], cfg["base_model_name_or_path"]) == \
        ("CAUSAL_LM", "none", False, str(path))
    if targets:
        assert cfg["target_modules"] == targets
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - hf(ids).logits).abs().max() > 1e-3  # the adapter does something
        _check(ours, PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "a").eval()(ids).logits, "peft vs ours")
    back = load_adapter(_load(path), tmp_path / "a").eval()
    save_adapter(back, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text()) == cfg
    with torch.no_grad():
        _check(PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "b").eval()(ids).logits, ours, "round trip")


@pytest.mark.parametrize("kw,n_layers", [(dict(target_modules=["self_attn.q_proj"]), 2),
                                         (dict(target_modules=["q_proj", "v_proj"],
                                               exclude_modules=["model.layers.1.self_attn.q_proj"]), 3)])
def test_we_load_peft_suffix_and_excluded_targets(base, tmp_path, kw, n_layers):
    path, hf = base
    pm = _peft_adapter(hf, tmp_path / "p", r=2, lora_alpha=5, **kw)
    model = load_adapter(_load(path), tmp_path / "p").eval()
    assert len(lora_layers(model)) == n_layers
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        _check(model(ids), pm(ids).logits, "ours (peft adapter) vs peft")


def test_loading_onto_existing_adapters_takes_the_files_scaling(base, tmp_path):
    path, hf = base
    pm = _peft_adapter(hf, tmp_path / "p", r=2, lora_alpha=7, target_modules=["q_proj", "v_proj"])
    model = _load(path)
    add_lora(model, r=2, alpha=100, use_rslora=True, target_modules=["q_proj", "v_proj"])
    load_adapter(model, tmp_path / "p").eval()
    assert {layer.scale for layer in lora_layers(model).values()} == {3.5}
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        _check(model(ids), pm(ids).logits, "ours (loaded onto alpha=100 rsLoRA adapters) vs peft")
    save_adapter(model, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (cfg["lora_alpha"], cfg["use_rslora"]) == (7, False)


def test_a_refused_adapter_changes_nothing(base, tmp_path):
    path, hf = base
    _peft_adapter(hf, tmp_path / "p", r=2, lora_alpha=7, target_modules=["q_proj", "v_proj"])
    model = _load(path)
    add_lora(model, r=2, alpha=2)  # all seven projections: the file lacks k_proj ...
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    with pytest.raises(LoRAError, match=r"lacks 20 adapter matrices, e\.g\. \['model\.layers\.0\.self_attn\.k_proj"):
        load_adapter(model, tmp_path / "p")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert {layer.scale for layer in lora_layers(model).values()} == {1.0}
    other = _load(path)
    add_lora(other, r=2, alpha=2, target_modules=["k_proj", "v_proj"])
    with pytest.raises(LoRAError, match=r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
                                        r"is for module 'model\.layers\.0\.self_attn\.q_proj', which has no LoRA"):
        load_adapter(other, tmp_path / "p")
    os.remove(tmp_path / "p" / "adapter_model.safetensors")
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoRAError, match=r"adapter_model\.safetensors not found \(adapter_model\.bin is a pickle"):
        load_adapter(_load(path), tmp_path / "p")


def test_exported_files_follow_the_umask(base, tmp_path):
    path, _ = base
    model, tok = _adapted(path)
    old = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "a")
        save_merged(model, tok, tmp_path / "m", dtype=torch.float32)
    finally:
        os.umask(old)
    files = list((tmp_path / "a").iterdir()) + list((tmp_path / "m").iterdir())
    assert not [f.name for f in files if f.name.endswith(".tmp")]
    modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files
             if f.name in ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json")}
    assert len(modes) == 4 and set(modes.values()) == {"0o644"}, modes


def test_gguf_of_the_merged_model_converts_back(base, tmp_path):
    """merged checkpoint -> GGUF (as llama.cpp writes it, F32) -> convert_gguf (bf16): config fields, every
    tensor once, one dtype, readable files, and transformers' logits within bf16 rounding."""
    pytest.importorskip("gguf")
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    from minitrain.gguf_convert import convert_gguf
    from test_gguf import tiny_bpe, write_gguf

    path, _ = base
    model, tok = _adapted(path)
    save_merged(model, tok, tmp_path / "merged", dtype=torch.float32)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    write_gguf(tmp_path / "m.gguf", hf, tiny_bpe(), q8_tensor=None)
    old = os.umask(0o022)
    try:
        out = convert_gguf(tmp_path / "m.gguf", tmp_path / "conv", dtype=torch.bfloat16)
    finally:
        os.umask(old)
    cfg = json.loads((out / "config.json").read_text())
    want = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": hf.config.rms_norm_eps}
    assert {k: cfg.get(k) for k in want} == want
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert sorted(dtypes) == sorted(hf.state_dict()) and set(dtypes.values()) == {"BF16"}
    assert oct(stat.S_IMODE((out / "model.safetensors").stat().st_mode)) == "0o644"
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        conv = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        _check(conv(ids).logits, hf(ids).logits, "converted (bf16) vs merged (fp32)", tol=2e-2)
