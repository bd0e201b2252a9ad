"""Training settings as typed dataclasses, with the names practitioners know (transformers / PEFT / Unsloth).

The CLI derives one ``--flag`` per field from these classes, and a TOML file maps onto the same fields:
top-level keys, or ``[train]``, ``[lora]`` and ``[model]`` tables. An unknown key is an error naming it.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .lora import DEFAULT_TARGETS, INITS


class ConfigError(ValueError):
    """A bad setting: names the key (and file) and what was expected. ``key``: the field it concerns, so that
    ``build`` can say which file or flag the value came from."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {expected}, got {value!r}", key=name)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def is_auto(value) -> bool:
    """``value`` spells "auto" (any case, surrounding blanks)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()


@dataclass
class ModelConfig:
    model: str | None = None  # checkpoint directory (config.json + safetensors + tokenizer files)
    load_in_4bit: bool = False  # QLoRA: quantize the seven projections to NF4 while loading
    max_seq_length: int = 2048  # longer sequences are truncated (with a count)
    dtype: str | None = None  # "bf16" | "fp16" | "fp32"; None: bf16 where supported, else fp16 (fp32 on CPU)

    def __post_init__(self):
        _check(self.max_seq_length >= 1, "max_seq_length", self.max_seq_length, ">= 1")
        if self.dtype is not None:
            check_choice("dtype", self.dtype, ("bf16", "fp16", "fp32"))


@dataclass
class LoRAConfig:
    r: int = 16  # adapter rank
    lora_alpha: float = 16.0  # scale numerator: update scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # layers that get adapters
    use_rslora: bool = False  # scale alpha / sqrt(r) (rank-stabilized LoRA)
    init: str = "default"  # "default" (PEFT: A kaiming-uniform, B zero) | "gaussian" | "zeros"

    def __post_init__(self):  # the same rules as LoRALinear, checked before the (slow) model load
        _check(isinstance(self.r, int) and self.r >= 1, "r", self.r, "a positive integer (the adapter rank)")
        _check(_finite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "a number > 0")
        _check(_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1, "lora_dropout", self.lora_dropout,
               "in [0, 1)")
        _check(len(self.target_modules) > 0, "target_modules", self.target_modules, "at least one module name")
        check_choice("init", self.init, INITS)


@dataclass
class TrainConfig:
    output_dir: str = "outputs"  # checkpoints, metrics.jsonl, loss curve and the final adapter go here
    learning_rate: float = 2e-4  # peak learning rate (1e-4 .. 5e-5 is steadier)
    num_train_epochs: float = 1.0  # passes over the data (ignored when max_steps > 0)
    max_steps: int = -1  # optimizer steps to run; > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 2  # sequences per micro-batch
    per_device_eval_batch_size: int = 2  # sequences per eval batch
    gradient_accumulation_steps: int = 4  # micro-batches per optimizer step
    warmup_steps: int = 0  # linear warm-up steps (overrides warmup_ratio when > 0)
    warmup_ratio: float = 0.0  # warm-up as a fraction of the total steps
    lr_scheduler_type: str = "linear"  # "linear" | "cosine" | "constant" (after warm-up)
    optim: str = "adamw"  # "adamw" (fused on CUDA) | "sgd"
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_epsilon: float = 1e-8  # AdamW denominator guard
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables clipping
    seed: int = 3407  # data order, adapter init and dropout
    logging_steps: int = 1  # write a metrics.jsonl line every N steps
    eval_steps: int = 50  # eval loss every N steps (when there is an eval set); 0: only at the end
    save_steps: int = 100  # checkpoint every N steps; 0: only the final adapter
    save_total_limit: int = 2  # checkpoints kept (oldest deleted first)
    # "auto" (on for CUDA, off on the CPU) | "off" | "on" (recompute each layer) | "offload" (+ inputs on host,
    # within a host-memory budget: MINITRAIN_OFFLOAD_HOST_GIB, default 75% of the memory available)
    gradient_checkpointing: str = "auto"
    # with "offload": the MLP halves of the last N decoder layers keep their activations on the device instead of
    # being recomputed (0.23-0.28 GiB and 1.3-2 ms of an 8B-shaped 2 x 2048-token step per layer on an H200);
    # "auto": as many as fit within max_memory_gib, decided per input size from the measured memory of the first
    # two steps (none under multi-process training); None: $MINITRAIN_KEEP_MLP_LAYERS, else "auto"
    keep_mlp_layers: int | str | None = None  # last N layers keep MLP activations (or 'auto': as many as fit)
    # the peak allocated device memory (GiB, as torch.cuda.max_memory_allocated counts it; the process reserves
    # more) that keep_mlp_layers="auto" plans a step for; None: 85% of what torch may use on the device, less one
    # eager step's working memory
    max_memory_gib: float | None = None  # GiB the step's peak allocation may reach with 'auto' kept layers
    # with "offload" on a GPU: a frozen, untied input embedding in pinned host memory (0.98 GiB less device memory
    # at Llama-3's vocabulary); None: $MINITRAIN_OFFLOAD_EMBEDDINGS, else off
    offload_embeddings: bool | None = None
    eval_split: float = 0.0  # held-out share of the data (< 1) or example count (>= 1) for eval loss
    packing: bool = False  # pack several short examples into one max_seq_length row
    train_on_responses_only: bool = False  # loss only on assistant turns of chat data
    bf16: bool | None = None  # bf16 autocast; None: on when the GPU supports it
    fp16: bool = False  # fp16 autocast with dynamic loss scaling (GPUs without bf16)
    fused_cross_entropy: bool = True  # loss from hidden states without materializing (tokens x vocab) logits
    # replay forward+backward from CUDA graphs, one per batch shape: "auto" (on CUDA when the model allows it;
    # padded batches then run at a few lengths, see Trainer) | "on" (the same, an error where impossible) | "off"
    cuda_graphs: str = "auto"
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest" in output_dir
    progress: bool = True  # the progress line on stderr

    def __post_init__(self):
        gc = self.gradient_checkpointing
        if gc is True or gc == "true":
            self.gradient_checkpointing = "on"
        elif gc is False or gc in (None, "false"):
            self.gradient_checkpointing = "off"
        check_choice("gradient_checkpointing", self.gradient_checkpointing, ("auto", "off", "on", "offload"))
        check_choice("lr_scheduler_type", self.lr_scheduler_type, ("linear", "cosine", "constant"))
        if self.cuda_graphs is True or self.cuda_graphs is False:
            self.cuda_graphs = "on" if self.cuda_graphs else "off"
        check_choice("cuda_graphs", self.cuda_graphs, ("auto", "on", "off"))
        check_choice("optim", self.optim, ("adamw", "sgd"))
        if is_auto(self.keep_mlp_layers):
            self.keep_mlp_layers = "auto"
        elif self.keep_mlp_layers is not None:
            _check(_whole(self.keep_mlp_layers) and int(self.keep_mlp_layers) >= 0, "keep_mlp_layers",
                   self.keep_mlp_layers, "a whole number >= 0, 'auto' or None")
            self.keep_mlp_layers = int(self.keep_mlp_layers)
        if self.max_memory_gib is not None:
            _check(_finite(self.max_memory_gib) and self.max_memory_gib > 0, "max_memory_gib", self.max_memory_gib,
                   "a finite number > 0 (GiB) or None")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            _check(int(getattr(self, name)) >= 1, name, getattr(self, name), ">= 1")
        _check(_finite(self.learning_rate) and self.learning_rate >= 0, "learning_rate", self.learning_rate,
               "a finite number >= 0")
        _check(_finite(self.num_train_epochs) and self.num_train_epochs >= 0, "num_train_epochs",
               self.num_train_epochs, "a finite number >= 0")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0", key="max_steps")
        _check(_finite(self.warmup_ratio) and 0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", self.warmup_ratio,
               "in [0, 1)")
        for name in ("warmup_steps", "eval_steps", "save_steps"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        for name in ("weight_decay", "adam_epsilon", "max_grad_norm"):  # max_grad_norm 0: no clipping
            _check(_finite(getattr(self, name)) and getattr(self, name) >= 0, name, getattr(self, name),
                   "a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            _check(_finite(getattr(self, name)) and 0 <= getattr(self, name) < 1, name, getattr(self, name),
                   "in [0, 1)")
        es = self.eval_split
        _check(_finite(es) and es >= 0 and (es < 1 or float(es).is_integer()), "eval_split", es,
               "a fraction in [0, 1) or a whole example count >= 1")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16 and fp16 are both set; choose one", key="fp16")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}", key=name)


SECTIONS = {"model": ModelConfig, "lora": LoRAConfig, "train": TrainConfig}


def field_types(cls) -> dict[str, object]:
    """Field name -> resolved type annotation."""
    return typing.get_type_hints(cls)


def coerce(cls, name: str, value, where: str):
    """Check/convert one value against the field's annotation (int for a float field is fine)."""
    tp = field_types(cls)[name]
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    args = typing.get_args(tp) if union else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if union else tp
    if value is None and optional:
        return None
    origin = typing.get_origin(base)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: '{name}' must be a list of strings, got {value!r}")
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                if str in args:  # int | str: a word such as "auto" (the field's own check validates it)
                    return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
        if name == "gradient_checkpointing" and isinstance(value, bool):
            return "on" if value else "off"
    else:
        return value
    raise ConfigError(f"{where}: '{name}' must be {getattr(base, '__name__', base)}, got {value!r}")


def _owner(key: str):
    for cls in SECTIONS.values():
        if key in {f.name for f in fields(cls)}:
            return cls
    return None


# Names people bring from other tools, for the "did you mean" hint where spelling is no help.
_SYNONYMS = {"rank": "r", "lora_r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
             "epochs": "num_train_epochs", "steps": "max_steps", "batch_size": "per_device_train_batch_size",
             "grad_accum": "gradient_accumulation_steps", "output": "output_dir", "scheduler": "lr_scheduler_type",
             "seq_len": "max_seq_length", "max_length": "max_seq_length", "model_name": "model"}


def _unknown(key: str, where: str, candidates) -> ConfigError:
    candidates = list(candidates)
    owner = _owner(key)
    if owner is not None and key not in candidates:  # a real setting in the wrong table
        section = next(n for n, c in SECTIONS.items() if c is owner)
        return ConfigError(f"{where}: unknown key '{key}' (it is a [{section}] setting, or a top-level key)")
    if key == "eval_data":
        return ConfigError(f"{where}: 'eval_data' is not supported; hold out part of the data with eval_split "
                           f"(a fraction, or an example count)")
    close = [_SYNONYMS[key]] if _SYNONYMS.get(key) in candidates else difflib.get_close_matches(key, candidates, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def all_field_names() -> list[str]:
    return [f.name for cls in SECTIONS.values() for f in fields(cls)]


def _check_extra(key: str, value, where: str):
    """The run keys beside the settings: ``data`` (a path or a list of paths, FILE[:WEIGHT]), ``output`` (a path)."""
    if key == "data":
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where}: 'data' must be a path or a list of paths (FILE or FILE:WEIGHT), got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: '{key}' must be str (a path), got {value!r}")
    return value


def settings_from_dict(data: dict, where: str = "config", extra_keys=("data", "output")) -> tuple[dict, dict]:
    """Split a flat-or-sectioned dict into {section: {field: value}} (checked) and the extra run keys."""
    out: dict[str, dict] = {name: {} for name in SECTIONS}
    extra: dict = {}
    for key, value in data.items():
        if key in SECTIONS and (isinstance(value, dict) or _owner(key) is None):  # 'model' is a key too
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{key}' must be a table ([{key}] followed by its settings), got {value!r}")
            cls = SECTIONS[key]
            names = {f.name for f in fields(cls)}
            for k, v in value.items():
                if k not in names:
                    raise _unknown(k, f"{where} [{key}]", names)
                out[key][k] = coerce(cls, k, v, f"{where} [{key}]")
            continue
        if key in extra_keys:
            extra[key] = _check_extra(key, value, where)
            continue
        cls = _owner(key)
        if cls is None:
            raise _unknown(key, where, all_field_names() + list(extra_keys) + list(SECTIONS))
        section = next(n for n, c in SECTIONS.items() if c is cls)
        out[section][key] = coerce(cls, key, value, where)
    return out, extra


def load_toml(path) -> tuple[dict, dict]:
    """Read a run.toml into ({section: {field: value}}, extra keys such as data/output)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return settings_from_dict(data, str(path))


def build(section_values: dict, origins: dict | None = None) -> tuple[ModelConfig, LoRAConfig, TrainConfig]:
    """Dataclass instances from {section: {field: value}}. ``origins`` maps a field name to where its value
    came from (a TOML file, a --flag); a value the dataclass refuses is reported with that origin."""
    try:
        return (ModelConfig(**section_values.get("model", {})), LoRAConfig(**section_values.get("lora", {})),
                TrainConfig(**section_values.get("train", {})))
    except ConfigError as e:
        where = (origins or {}).get(e.key)
        if where is None:
            raise
        raise ConfigError(f"{where}: {e}", key=e.key) from None
    except TypeError as e:
        raise ConfigError(str(e)) from None


def to_dict(*configs) -> dict:
    return {type(c).__name__: asdict(c) for c in configs}


def default_of(cls, name: str):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not MISSING else f.default
