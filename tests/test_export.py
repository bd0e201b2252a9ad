"""Exports: PEFT-format adapters (peft loads ours, we load peft's) and merged checkpoints (transformers loads
them). Oracles: peft.PeftModel and transformers.LlamaForCausalLM on the same tiny checkpoint; fp32, <= 1e-4."""
import json

import pytest
import torch

from minitrain.loader import load_model
from minitrain.lora import LoRAError, add_lora, load_adapter, lora_layers, save_adapter, save_merged

WORDS = ["the", "company", "profits", "rose", "fell", "shares", "record", "loss", "deal", "new"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_tiny_checkpoint(path, tie=False, seed=0):
    """A random transformers Llama (GQA, 2 layers) with a word-level tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "pad_token": "</s>"}))
    return hf


def _adapted(path, seed=1, **kw):
    model, tok = load_model(path, dtype=torch.float32, device="cpu", **kw)
    torch.manual_seed(seed)
    add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)  # a trained-looking adapter: B != 0
    return model, tok


def _check(a, b, what, tol=1e-4):
    d = (a - b).abs()
    assert d.max() <= tol, f"{what}: max |diff| {d.max().item():.3g}, {int((d > tol).sum())} of {d.numel()} over {tol}"


@pytest.mark.parametrize("tie", [False, True])
def test_peft_loads_our_adapter(tmp_path, tie):
    from peft import PeftModel

    ckpt = tmp_path / "base"
    hf = make_tiny_checkpoint(ckpt, tie=tie)
    model, _ = _adapted(ckpt)
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    pm = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        _check(model(ids), pm(ids).logits, "peft vs minitrain logits")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 7 * 2


def test_we_load_a_peft_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    ckpt = tmp_path / "base"
    hf = make_tiny_checkpoint(ckpt)
    pm = get_peft_model(hf, LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                                       use_rslora=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    pm.save_pretrained(tmp_path / "peft_adapter")
    model, _ = load_model(ckpt, dtype=torch.float32, device="cpu")
    load_adapter(model, tmp_path / "peft_adapter")
    assert len(lora_layers(model)) == 3 * 2
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        _check(model(ids), pm.eval()(ids).logits, "minitrain (peft adapter) vs peft logits")


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_transformers_and_minitrain_load_the_merged_checkpoint(tmp_path, load_in_4bit):
    from transformers import LlamaForCausalLM

    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model, tok = _adapted(ckpt, load_in_4bit=load_in_4bit)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ours = model(ids)
    out = save_merged(model, tok, tmp_path / "merged", dtype=torch.float32, max_shard_size=40_000)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in names and "config.json" in names and "tokenizer.json" in names
    assert len([n for n in names if n.endswith(".safetensors")]) > 1  # sharded
    assert not [n for n in names if n.endswith(".tmp")]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        _check(hf(ids).logits, ours, "transformers (merged) vs minitrain (LoRA)")
    back, _ = load_model(out, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        _check(back(ids), ours, "minitrain (merged) vs minitrain (LoRA)")


def test_merged_bf16_is_cast_once(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model, tok = _adapted(ckpt)
    layer = lora_layers(model)["model.layers.0.mlp.up_proj"]
    expect = (layer.base_layer.weight.float() + layer.scale * layer.lora_B.float() @ layer.lora_A.float()).bfloat16()
    save_merged(model, tok, tmp_path / "m", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], expect)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_adapter_errors_are_clear(tmp_path):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model, _ = _adapted(ckpt)
    with pytest.raises(LoRAError, match="adapter_config.json not found"):
        load_adapter(model, tmp_path)
    save_adapter(model, tmp_path / "a")
    other, _ = load_model(ckpt, dtype=torch.float32, device="cpu")
    add_lora(other, r=8, alpha=8)
    with pytest.raises(LoRAError, match=r"has shape \(4, \d+\), expected \(8, \d+\)"):
        load_adapter(other, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAError, match="use_dora"):
        load_adapter(model, tmp_path / "a")


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    ckpt = tmp_path / "base"
    make_tiny_checkpoint(ckpt)
    model, _ = _adapted(ckpt)
    save_adapter(model, tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        next(iter(lora_layers(model).values())).lora_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
