"""Load a Llama checkpoint directory (safetensors) into :class:`minitrain.model.LlamaForCausalLM`.

The model is built on the meta device and materialized one tensor at a time: each tensor is read from its
memory-mapped safetensors file, cast, moved to the device and (with ``load_in_4bit``) quantized to NF4 right
there, so neither host nor device memory ever holds the whole 16-bit model. Pre-quantized bitsandbytes
4-bit checkpoints (config.json ``quantization_config``) load their NF4 bytes as they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .model import LlamaForCausalLM, ModelArgs, rope_inv_freq
from .tokenizer import Tokenizer

# The seven projections of each layer; these become NF4Linear with load_in_4bit (as transformers/Unsloth do).
QUANT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


def _read_config(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{d}: no config.json (expected a checkpoint directory with config.json and "
                                f"model.safetensors or model.safetensors.index.json)")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: expected a JSON object")
    return cfg


def _prequantized(cfg: dict, where: Path) -> bool:
    qc = cfg.get("quantization_config")
    if qc is None:
        return False
    method = qc.get("quant_method")
    if method != "bitsandbytes" or not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{where}/config.json: quantization_config {qc} is not supported (only bitsandbytes 4-bit "
                         f"nf4: quant_method 'bitsandbytes', load_in_4bit true, bnb_4bit_quant_type 'nf4')")
    return True


def _weight_map(d: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the single model.safetensors."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({type(e).__name__}: {e})") from None
        files = {f: d / f for f in set(wm.values())}
        for f, p in files.items():
            if not p.is_file():
                raise FileNotFoundError(f"{index} names shard '{f}' which does not exist in {d}")
        return {k: files[f] for k, f in wm.items()}
    single = d / "model.safetensors"
    if not single.is_file():
        have = sorted(p.name for p in d.iterdir())
        raise FileNotFoundError(f"{d}: neither model.safetensors nor model.safetensors.index.json (weights are "
                                f"read only from safetensors, never from pickles). Directory holds: {have}")
    return {k: single for k in _open(single).keys()}


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for truncated/corrupt headers and buffers
        raise ValueError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """dtype=None -> bf16 on GPUs that support it, else fp16; fp32 on CPU."""
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                 "fp32": torch.float32, "float32": torch.float32}
        if dtype not in names:
            raise ValueError(f"load_model: dtype must be one of {sorted(names)} or a torch dtype, got {dtype!r}")
        dtype = names[dtype]
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"load_model: dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _set(model: nn.Module, name: str, value) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if isinstance(value, nn.Module):
        setattr(mod, attr, value)
    else:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())


def load_model(path: str | Path, max_seq_length: int = 2048, dtype=None, load_in_4bit: bool = False, device=None,
               tokenizer: bool = True):
    """Load a checkpoint directory.

    Args:
        path: directory with config.json, model.safetensors (or shards + model.safetensors.index.json) and the
            tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json).
        max_seq_length: longest sequence the caller will use (stored as ``model.max_seq_length``).
        dtype: compute dtype (torch dtype or "bf16"/"fp16"/"fp32"); None = bf16 on GPUs that support it,
            else fp16, and fp32 on CPU.
        load_in_4bit: quantize the seven projections of every layer to NF4 (double quantization) as they load;
            embeddings, norms and lm_head stay in ``dtype``.
        device: "cuda", "cpu", a torch.device, or None (CUDA when available).
        tokenizer: also load the tokenizer (set False for a weights-only directory).
    Returns:
        (model, tokenizer) — the model in eval mode with requires_grad=False on every base weight;
        tokenizer is None when ``tokenizer=False``.
    """
    from quant import NF4Linear, NF4Weight, quantize_nf4

    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"load_model: {d} is not a directory")
    cfg = _read_config(d)
    try:
        args = ModelArgs.from_config(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{d / 'config.json'}: {e}") from None
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype, device)
    prequant = _prequantized(cfg, d)
    tok = Tokenizer.from_pretrained(d) if tokenizer else None  # fail early on missing tokenizer files
    wmap = _weight_map(d)

    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    expected = dict(model.named_parameters(remove_duplicate=False))
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    quantized = {f"model.layers.{i}.{t}" for i in range(args.num_hidden_layers) for t in QUANT_TARGETS} \
        if (load_in_4bit or prequant) else set()

    def read(name: str, want_shape=None, cast=True) -> torch.Tensor:
        if name not in wmap:
            raise KeyError(f"{d}: checkpoint has no tensor '{name}'")
        f = wmap[name]
        h = _open(f)  # opened per tensor: its memory map is released as soon as the tensor is copied out
        try:
            shape = tuple(h.get_slice(name).get_shape())
        except Exception as e:
            raise ValueError(f"{f}: tensor '{name}' missing or unreadable: {e}") from None
        if want_shape is not None and shape != tuple(want_shape):
            raise ValueError(f"{f}: tensor '{name}' has shape {shape}, expected {tuple(want_shape)} from config.json")
        try:
            t = h.get_tensor(name)
        except Exception as e:
            raise ValueError(f"{f}: tensor '{name}' could not be read (truncated or corrupt?): {e}") from None
        t = t.to(device=device)
        return t.to(dtype) if cast and t.is_floating_point() else t

    used = set()
    for name, p in expected.items():
        mod_name, _, attr = name.rpartition(".")
        if mod_name in quantized:
            if attr == "bias":
                continue  # read together with the weight
            lin = model.get_submodule(mod_name)
            bias = read(mod_name + ".bias", lin.bias.shape) if lin.bias is not None else None
            if prequant:
                keys = [k for k in wmap if k.startswith(name + ".") or k == name]
                sd = {k: read(k, cast=False) for k in keys}
                try:
                    q = NF4Weight.from_state_dict(sd, mod_name + ".")
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{wmap.get(name, d)}: {e}") from None
                if tuple(q.shape) != tuple(p.shape):
                    raise ValueError(f"{wmap[name]}: tensor '{name}' has shape {tuple(q.shape)} in its quant_state, "
                                     f"expected {tuple(p.shape)} from config.json")
                used.update(keys)
            else:
                try:
                    q = quantize_nf4(read(name, p.shape), double_quant=True)
                except ValueError as e:  # e.g. inf/NaN in the weight: say which tensor of which file
                    raise ValueError(f"{wmap[name]}: tensor '{name}': {e}") from None
            _set(model, mod_name, NF4Linear(q, bias))
            used.update({name, mod_name + ".bias"})
        else:
            _set(model, name, read(name, p.shape))
            used.add(name)
    model.tie_weights()
    leftover = [k for k in wmap if k not in used and not k.endswith(IGNORED_SUFFIXES)
                and not (k == "lm_head.weight" and args.tie_word_embeddings)]
    if leftover:
        raise ValueError(f"{d}: checkpoint has tensors this Llama model does not use: {leftover[:8]}"
                         f"{' ...' if len(leftover) > 8 else ''} (is config.json for this checkpoint?)")
    model.model.inv_freq = rope_inv_freq(args).to(device)
    model.max_seq_length = max_seq_length
    model.name_or_path = str(d)  # PEFT's base_model_name_or_path; merged exports copy files from here
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model, tok
