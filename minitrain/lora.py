"""LoRA adapters on 16-bit or NF4 linear layers, and the exports: PEFT-format adapters and merged checkpoints.

A LoRA layer computes ``y = x W^T + b + s * (dropout(x) A^T) B^T`` with the base weight W (N, K) frozen
(a tensor, or an NF4 weight that is dequantized on the fly), A (R, K) and B (N, R) trained, and
s = alpha / r (or alpha / sqrt(r) with rsLoRA). A starts kaiming-uniform and B at zero, as in PEFT, so a
fresh adapter leaves the model unchanged.

Files follow PEFT: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, where ``<module>`` is the Hugging Face
module path (``model.layers.0.self_attn.q_proj``). ``save_merged`` writes a plain checkpoint directory
(W + s B A computed in fp32 and cast once) that transformers and minitrain load. Every file is written to a
temporary name and renamed, so an interrupted write never replaces a good file with a half-written one.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # the fused kernel (issue 4); the plain-torch path below computes the same thing
    from triton_ops.lora import lora_linear as _fused_lora_linear
except ImportError:
    _fused_lora_linear = None

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INITS = ("default", "gaussian", "zeros")


class LoRAError(ValueError):
    """A problem with an adapter, its files or its settings, saying what was expected."""


# ---------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------
def _is_linear_like(m: nn.Module) -> bool:
    """nn.Linear or a frozen quantized linear (quant.NF4Linear): in/out features and a weight."""
    return isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")
                                       and hasattr(m, "weight") and hasattr(m.weight, "dequantize"))


def base_weight_fp32(base: nn.Module) -> torch.Tensor:
    """The base layer's (N, K) weight as an fp32 tensor (dequantized when it is NF4)."""
    w = base.weight
    if isinstance(w, torch.Tensor):
        return w.detach().float()
    return w.dequantize(torch.float32)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    Args:
        base: nn.Linear or quant.NF4Linear with weight (N, K); kept as ``base_layer`` and frozen.
        r: rank R. alpha: scale numerator. dropout: dropout on the adapter's input (training only).
        use_rslora: scale alpha / sqrt(r) instead of alpha / r.
        init: "default" (A kaiming-uniform, B zero: PEFT's), "gaussian" (A ~ N(0, 1/r), B zero), "zeros".
        dtype: dtype of A and B (fp32 by default: they are small and AdamW updates them precisely).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: str = "default", dtype: torch.dtype = torch.float32):
        super().__init__()
        if not _is_linear_like(base):
            raise LoRAError(f"LoRALinear: base must be nn.Linear or NF4Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise LoRAError(f"LoRA init must be one of {INITS}, got {init!r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), bool(use_rslora)
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))  # (R, K)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (N, R)
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "default") -> None:
        with torch.no_grad():
            if init == "default":  # nn.Linear's own init of an (R, K) weight, which is what PEFT uses
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                self.lora_A.zero_()
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if _fused_lora_linear is not None:  # computes in x's (or the autocast) dtype; grads in A/B's dtype
            return _fused_lora_linear(x, base.weight, self.lora_A, self.lora_B, self.scale, bias=base.bias,
                                      dropout=self.dropout, training=self.training)
        y = base(x)
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        h = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # (..., R) -> (..., N)
        return y + (h * self.scale).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B A as fp32 (N, K): what merging adds to the base weight."""
        return self.scale * (self.lora_B.detach().float() @ self.lora_A.detach().float())

    def merged_weight(self) -> torch.Tensor:
        """Dequantized base weight plus the LoRA delta, fp32 (N, K)."""
        return base_weight_fp32(self.base_layer) + self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, dropout={self.dropout:g}"


# ---------------------------------------------------------------------------------------------------------
# Adding, listing, loading
# ---------------------------------------------------------------------------------------------------------
def _target_matcher(target_modules):
    """A predicate on full module names from a list of last-name components, "all-linear", or a regex."""
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return lambda name: name.rsplit(".", 1)[-1] in DEFAULT_TARGETS
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) for t in targets):
        raise LoRAError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    return lambda name: name.rsplit(".", 1)[-1] in targets or name in targets


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> LoRALinear, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter matrix, in module order."""
    return [(n, p) for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def add_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0,
             target_modules=DEFAULT_TARGETS, use_rslora: bool = False, init: str = "default",
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap the target linear layers of ``model`` in :class:`LoRALinear` (in place) and freeze everything else.

    Args:
        model: a model with Hugging Face module names (``model.layers.N.self_attn.q_proj`` ...).
        r, alpha, dropout, use_rslora, init: see :class:`LoRALinear`.
        target_modules: last name components (default: the seven projections), "all-linear", or a regex
            matched against full module names.
    Returns:
        the same model; only ``lora_A``/``lora_B`` require grad.
    """
    if lora_layers(model):
        raise LoRAError("add_lora: this model already has LoRA adapters; use load_adapter to replace their weights")
    match = _target_matcher(target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    found = [(n, m) for n, m in model.named_modules() if n and match(n) and n.rsplit(".", 1)[-1] != "lm_head"]
    bad = [n for n, m in found if not _is_linear_like(m)]
    if bad:
        raise LoRAError(f"add_lora: target module(s) {bad[:3]} are {type(dict(found)[bad[0]]).__name__}, "
                        "expected linear layers")
    if not found:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear_like(m)})
        raise LoRAError(f"add_lora: no module matches target_modules={target_modules!r}; linear layers here: {linears}")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r, alpha, dropout, use_rslora, init, dtype))
    names = sorted({n.rsplit(".", 1)[-1] for n, _ in found})
    model.lora_settings = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
                           "target_modules": names if not isinstance(target_modules, str) else target_modules,
                           "init": init}
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors: ``base_model.model.<module>.lora_A.weight`` -> (R, K), ``lora_B`` -> (N, R)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    return out


def _base_model_name(model: nn.Module) -> str | None:
    for obj in (model, getattr(model, "config", None), getattr(model, "args", None)):
        for attr in ("name_or_path", "_name_or_path", "source_dir"):
            v = getattr(obj, attr, None) if obj is not None else None
            if isinstance(v, (str, os.PathLike)) and str(v):
                return str(v)
    return None


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors.

    Args:
        dtype: dtype of the saved matrices (default: as trained, fp32).
    Returns:
        the directory.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("save_adapter: the model has no LoRA adapters (call add_lora first)")
    settings = getattr(model, "lora_settings", None) or {}
    first = next(iter(layers.values()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if dtype is None else v.to(dtype)).contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path or _base_model_name(model),
        "revision": None, "inference_mode": True,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout, "use_rslora": first.use_rslora,
        "target_modules": settings.get("target_modules") or sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": {"default": True, "gaussian": "gaussian", "zeros": True}.get(settings.get("init"), True),
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False,
    }
    atomic_save_safetensors(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    return directory


def _read_adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise LoRAError(f"load_adapter: {path} not found (an adapter directory holds {ADAPTER_CONFIG} and "
                        f"{ADAPTER_WEIGHTS})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"load_adapter: {path} is not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"load_adapter: {path}: peft_type {cfg.get('peft_type')!r} is not supported (expected 'LORA')")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                   "modules_to_save": None, "layers_to_transform": None}
    for key, ok in unsupported.items():
        if cfg.get(key) not in (ok, None) and cfg.get(key) != ok:
            raise LoRAError(f"load_adapter: {path}: '{key}' = {cfg[key]!r} is not supported (expected {ok!r})")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"load_adapter: {path}: bias={cfg['bias']!r} is not supported (expected 'none')")
    for key in ("r", "lora_alpha", "target_modules"):
        if cfg.get(key) is None:
            raise LoRAError(f"load_adapter: {path}: missing '{key}'")
    return cfg


def load_adapter(model: nn.Module, directory, trainable: bool = True) -> nn.Module:
    """Load a PEFT-format adapter (saved here or by peft) onto ``model``, adding LoRA layers if it has none.

    Args:
        model: the base model (or one that already has adapters of the same shapes).
        directory: holds adapter_config.json and adapter_model.safetensors.
        trainable: leave the adapter matrices requiring grad (to continue training).
    Returns:
        the same model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = _read_adapter_config(directory)
    wpath = directory / ADAPTER_WEIGHTS
    if not wpath.is_file():
        extra = " (adapter_model.bin is a pickle and is not loaded: re-save it as safetensors)" \
            if (directory / "adapter_model.bin").exists() else ""
        raise LoRAError(f"load_adapter: {wpath} not found{extra}")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"load_adapter: cannot read {wpath}: {e}") from None
    pat = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight$")
    parsed = []
    for key in tensors:
        m = pat.match(key)
        if m is None:
            raise LoRAError(f"load_adapter: {wpath}: unexpected tensor '{key}' (only lora_A/lora_B weights of "
                            "linear layers are supported)")
        parsed.append((key, m.group(1), m.group(2)))
    if not parsed:
        raise LoRAError(f"load_adapter: {wpath} holds no tensors (expected lora_A/lora_B weights)")
    alpha, use_rslora = cfg["lora_alpha"], bool(cfg.get("use_rslora", False))
    if not lora_layers(model):
        # Wrap exactly the modules the file holds. peft matches target_modules as name suffixes
        # ("self_attn.q_proj") and may narrow them (exclude_modules); its saved keys are the ground truth.
        targets = cfg["target_modules"]
        in_file = {module for _, module, _ in parsed}
        match = _target_matcher(targets)
        picked = {n for n, mod in model.named_modules()
                  if n and match(n) and n.rsplit(".", 1)[-1] != "lm_head" and _is_linear_like(mod)}
        if picked != in_file:
            targets = "|".join(re.escape(n) for n in sorted(in_file))
        add_lora(model, r=int(cfg["r"]), alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                 target_modules=targets, use_rslora=use_rslora)
        model.lora_settings["target_modules"] = cfg["target_modules"]
    layers = lora_layers(model)
    seen = set()
    for key, module, which in parsed:  # check everything before changing anything
        layer = layers.get(module)
        if layer is None:
            raise LoRAError(f"load_adapter: {wpath}: '{key}' is for module '{module}', which has no LoRA layer here")
        shape = tuple(getattr(layer, which).shape)
        if tuple(tensors[key].shape) != shape:
            raise LoRAError(f"load_adapter: {wpath}: '{key}' has shape {tuple(tensors[key].shape)}, expected "
                            f"{shape}")
        seen.add((module, which))
    missing = [f"{n}.{w}" for n in layers for w in ("lora_A", "lora_B") if (n, w) not in seen]
    if missing:
        raise LoRAError(f"load_adapter: {wpath} lacks {len(missing)} adapter matrices, e.g. {missing[:2]}")
    for key, module, which in parsed:
        param = getattr(layers[module], which)
        with torch.no_grad():
            param.copy_(tensors[key])
        param.requires_grad_(trainable)
    # The file's alpha / rsLoRA define its scaling, whatever adapters the model already had (dropout, a
    # training setting, stays the model's).
    for layer in layers.values():
        layer.alpha, layer.use_rslora = float(alpha), use_rslora
        layer.scale = layer.alpha / (math.sqrt(layer.r) if use_rslora else layer.r)
    if getattr(model, "lora_settings", None) is not None:
        model.lora_settings.update(lora_alpha=alpha, use_rslora=use_rslora)
    return model


# ---------------------------------------------------------------------------------------------------------
# Merged export
# ---------------------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def merged_tensors(model: nn.Module, dtype: torch.dtype = torch.bfloat16):
    """(key, shape, make) for every tensor of the plain checkpoint, in module order; ``make()`` computes it:
    LoRA layers merged (fp32 math, cast once), NF4 layers dequantized, a tied lm_head left out (as
    transformers saves it). Nothing is computed until asked, so an export holds one shard at a time."""
    covered: list[str] = []
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = hasattr(model, "lm_head") and emb is not None and model.lm_head.weight is emb.weight
    for name, module in model.named_modules():
        if any(name.startswith(c + ".") for c in covered):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoRALinear) or (name and _is_linear_like(module) and not isinstance(module.weight, torch.Tensor)):
            lin = module.base_layer if isinstance(module, LoRALinear) else module
            merge = module.merged_weight if isinstance(module, LoRALinear) else (lambda m=module: base_weight_fp32(m))
            yield prefix + "weight", (lin.out_features, lin.in_features), lambda f=merge: f().to(dtype).cpu().contiguous()
            if lin.bias is not None:
                yield prefix + "bias", tuple(lin.bias.shape), lambda b=lin.bias: b.detach().float().to(dtype).cpu()
            covered.append(name)
            continue
        for pname, p in module.named_parameters(recurse=False):
            if tied and name == "lm_head" and pname == "weight":
                continue
            yield prefix + pname, tuple(p.shape), lambda t=p: t.detach().float().to(dtype).cpu().contiguous()
        for bname, b in module.named_buffers(recurse=False):
            if bname not in module._non_persistent_buffers_set:
                yield prefix + bname, tuple(b.shape), lambda t=b: t.detach().cpu().contiguous()


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The whole merged checkpoint in memory (see :func:`merged_tensors`)."""
    return {k: make() for k, _, make in merged_tensors(model, dtype)}


def _model_config_dict(model: nn.Module) -> dict:
    """config.json contents for the model: minitrain's ModelArgs, or a transformers config."""
    args = getattr(model, "args", None)
    if args is not None and hasattr(args, "extra"):
        from dataclasses import fields

        cfg = dict(args.extra)
        for f in fields(args):
            if f.name not in ("extra", "rope_theta", "rope_scaling"):
                cfg[f.name] = getattr(args, f.name)
        if "rope_parameters" not in cfg:
            cfg["rope_theta"] = args.rope_theta
            cfg["rope_scaling"] = args.rope_scaling
        cfg.setdefault("model_type", "llama")
        cfg.setdefault("architectures", ["LlamaForCausalLM"])
        cfg.setdefault("hidden_act", "silu")
        return cfg
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    raise LoRAError(f"save_merged: cannot find the model's configuration on {type(model).__name__} "
                    "(expected .args (ModelArgs) or .config)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")


def _save_tokenizer(tokenizer, model: nn.Module, directory: Path, source_dir) -> None:
    src = source_dir or getattr(tokenizer, "source_dir", None) or _base_model_name(model)
    src = Path(src) if src is not None and Path(src).is_dir() else None
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
        if src is not None and (src / "generation_config.json").is_file():  # eos ids for generation
            atomic_copy(src / "generation_config.json", directory / "generation_config.json")
        return
    if src is None:
        raise LoRAError("save_merged: cannot find tokenizer files to copy: pass source_dir=<the base model's "
                        "checkpoint directory>")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_copy(src / name, directory / name)


def save_merged(model: nn.Module, tokenizer, directory, dtype: torch.dtype = torch.bfloat16,
                max_shard_size: int = 5 * 2**30, source_dir=None) -> Path:
    """Write a merged checkpoint directory that transformers and minitrain load.

    Each LoRA layer becomes W + s B A, computed in fp32 from the dequantized base and cast once to ``dtype``;
    NF4 layers without an adapter are dequantized; config.json loses ``quantization_config``.

    Args:
        tokenizer: the model's tokenizer (files are copied from ``source_dir`` / the model's source when it
            cannot save itself), or None to copy tokenizer files from ``source_dir``.
        dtype: torch.bfloat16, torch.float16 or torch.float32.
        max_shard_size: bytes per safetensors shard; larger checkpoints get model.safetensors.index.json.
    Returns:
        the directory.
    """
    if dtype not in _DTYPE_NAMES:
        raise LoRAError(f"save_merged: dtype must be bfloat16, float16 or float32, got {dtype}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _model_config_dict(model)
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = _DTYPE_NAMES[dtype]
    items = list(merged_tensors(model, dtype))
    esize = torch.empty((), dtype=dtype).element_size()
    groups: list[list] = [[]]
    size = 0
    for key, shape, make in items:  # plan the shards from the shapes, then compute one shard at a time
        nbytes = math.prod(shape) * esize
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append((key, make))
        size += nbytes
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for name, group in zip(names, groups):
        shard = {key: make() for key, make in group}
        total += sum(v.numel() * v.element_size() for v in shard.values())
        weight_map.update({key: name for key in shard})
        atomic_save_safetensors(shard, directory / name, metadata={"format": "pt"})
        del shard
    index = directory / "model.safetensors.index.json"
    if len(groups) > 1:
        atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for stale in directory.glob("model*.safetensors*"):  # from an earlier export with other sharding
        if stale.name not in names and not (len(groups) > 1 and stale == index):
            stale.unlink()
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    _save_tokenizer(tokenizer, model, directory, source_dir)
    return directory


# ---------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------
def _tmp_path(path: Path) -> Path:
    """A new empty file beside ``path`` under a unique hidden name. Created with mode 0o666 less the umask,
    as a plain open() would be (tempfile.mkstemp's 0o600 would make every export unreadable to others)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    """Write text to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        _fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_path(path)
    try:
        mode = tmp.stat().st_mode & 0o777
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)  # safetensors (0.8) writes its files 0o600 whatever the umask
        _fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj, path) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        torch.save(obj, str(tmp))
        _fsync_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = _tmp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        _fsync_replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
