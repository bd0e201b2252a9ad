"""The ``train``, ``merge`` and ``demo`` subcommands. ``add_subcommands(subparsers)`` registers them on the
``minitrain`` parser; every ModelConfig / LoRAConfig / TrainConfig field is a ``--flag`` (``--learning-rate`` or
``--learning_rate``), and ``--config run.toml`` sets the same fields (flags win over the file).

User mistakes (a missing file, a bad value, a data or adapter problem) print one line, not a traceback;
``MINITRAIN_DEBUG=1`` shows the traceback.

Under ``torchrun --nproc-per-node N -m minitrain train ...`` the process group starts from torchrun's environment
(see ``minitrain.distributed``): each rank loads the model onto its own GPU, the adapters train data-parallel, and
rank 0 alone prints and writes. ``--fsdp`` (or MINITRAIN_FSDP=1) also shards the model with FSDP2.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

from .config import SECTIONS, ConfigError, build, default_of, field_types, load_toml

_HELP = {}  # field name -> the comment in config.py (filled lazily from the source)


def _field_help() -> dict[str, str]:
    if not _HELP:
        import inspect

        from . import config

        for line in inspect.getsource(config).splitlines():
            s = line.strip()
            if ":" in s and "#" in s and not s.startswith(("#", "def", "class", "return", "if")):
                _HELP[s.split(":", 1)[0].strip()] = s.split("#", 1)[1].strip()
    return _HELP


def _add_field_flags(p: argparse.ArgumentParser, skip=()) -> None:
    helps = _field_help()
    for section, cls in SECTIONS.items():
        g = p.add_argument_group(f"{section} settings ({cls.__name__}; also [{section}] in --config)")
        types_ = field_types(cls)
        for f in fields(cls):
            if f.name in skip:
                continue
            tp = types_[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            base = args[0] if args and typing.get_origin(tp) is not list else tp
            flags = [f"--{f.name.replace('_', '-')}"]
            if "_" in f.name and base is not bool:  # also the spelling of transformers' TrainingArguments
                flags.append(f"--{f.name}")
            if f.name == "r":
                flags.append("--lora-r")
            default = default_of(cls, f.name)  # argparse's own default stays None: a flag given beats the file
            shown = " ".join(default) if isinstance(default, list) else default
            kw = dict(dest=f"{section}.{f.name}", default=None, help=f"{helps.get(f.name, '')} (default: {shown})")
            if base is bool:
                g.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
            elif typing.get_origin(base) is list:
                g.add_argument(*flags, nargs="+", metavar="NAME", **kw)
            else:
                word = str in args and base is not str  # int | str: a number or a word ("N|auto")
                g.add_argument(*flags, metavar=f.name.upper() if base is str else
                               base.__name__.upper() + ("|WORD" if word else ""), **kw)


def _settings(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """Sections from --config, overridden by the flags given on the command line; and where each value came from
    (field name -> the file or the flag), for error messages."""
    sections, extra, origins = ({name: {} for name in SECTIONS}, {}, {})
    if getattr(args, "config", None):
        sections, extra = load_toml(args.config)
        origins = {name: str(args.config) for values in sections.values() for name in values}
    from .config import coerce

    for key, value in vars(args).items():
        if value is None or "." not in key:
            continue
        section, name = key.split(".", 1)
        flag = f"--{name.replace('_', '-')}"
        sections[section][name] = coerce(SECTIONS[section], name, value, flag)
        origins[name] = flag
    return sections, extra, origins


def _parse_data(specs) -> list[dict]:
    """FILE or FILE:WEIGHT (e.g. chat.jsonl:0.3) -> load_dataset sources."""
    from .data.sources import list_files

    out = []
    for spec in specs:
        path, weight = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if not Path(path).exists():
            raise ConfigError(f"--data {spec}: {path} not found")
        list_files(path)  # an unknown file type is an error now, not after the model has loaded
        out.append({"path": path, "weight": weight})
    if any(s["weight"] is not None for s in out) and len(out) > 1:
        for s in out:
            s["weight"] = 1.0 if s["weight"] is None else s["weight"]
    return out


# What a finished or interrupted run leaves in its output directory (Trainer and save_adapter).
RUN_OUTPUTS = ("adapter", "metrics.jsonl", "loss_curve.png", "checkpoint-*", ".checkpoint-*.tmp")


def _check_output_dir(out: Path, resuming: bool, overwrite: bool, main: bool) -> None:
    """Refuse to start a fresh run over a previous run's outputs: its checkpoints would be replaced (and, with
    save_total_limit, the new run's early checkpoints deleted as the "oldest") and metrics.jsonl would mix two
    runs. --resume continues that run; --overwrite-output-dir deletes those outputs first (rank 0 only)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is a file, not a directory")
    if resuming or not out.is_dir():
        return
    found = sorted({p for pattern in RUN_OUTPUTS for p in out.glob(pattern)})
    if not found:
        return
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    if not overwrite:
        raise ConfigError(f"output directory {out} holds a previous run ({names}); use --resume to continue it, "
                          f"another --output, or --overwrite-output-dir to delete those files and start afresh")
    if main:
        import shutil

        for p in found:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"--overwrite-output-dir: deleted the previous run's {names} in {out}", flush=True)


def allocator_defaults(environ=os.environ) -> None:
    """Expandable segments for one-process training, unless the user chose allocator settings: the CUDA graph's
    pool then reserves far less beside what it uses (H100, 8B-shaped QLoRA with offload, `bench.train --expandable`:
    8.32 instead of 9.52 GiB reserved for 6.99 GiB allocated, 10,311 vs 10,133 tok/s). Read by torch when CUDA first
    allocates, so this runs before anything touches the GPU; multi-process runs (torchrun) keep torch's default,
    as their NCCL buffers were not measured with it."""
    if environ.get("WORLD_SIZE", "1") != "1":
        return
    if "PYTORCH_CUDA_ALLOC_CONF" in environ or "PYTORCH_ALLOC_CONF" in environ:
        return
    environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def cmd_train(args: argparse.Namespace) -> int:
    from . import distributed

    allocator_defaults()
    env = distributed.init_distributed()  # None unless launched by torchrun
    try:
        return _train(args, env)
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, env) -> int:
    import torch

    from . import distributed
    from .data import load_dataset
    from .loader import load_model
    from .lora import add_lora, load_adapter
    from .trainer import Trainer

    sections, extra, origins = _settings(args)
    model_name = args.model or sections["model"].get("model") or extra.get("model")
    sections["model"]["model"] = model_name
    if args.output or extra.get("output"):
        sections["train"]["output_dir"] = args.output or extra["output"]
        origins["output_dir"] = "--output" if args.output else str(args.config)
    if args.resume:
        sections["train"]["resume_from_checkpoint"] = args.resume
    data = args.data or extra.get("data")
    if not model_name:
        raise ConfigError("--model DIR is required (a checkpoint directory with config.json)")
    if not data:
        raise ConfigError("--data FILE is required (JSONL/JSON/CSV/TXT; repeat it to mix datasets: --data b.jsonl:0.3)")
    mcfg, lcfg, tcfg = build(sections, origins)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[mcfg.dtype]
    sources = _parse_data([data] if isinstance(data, str) else data)  # check the files before the slow load
    _check_output_dir(Path(tcfg.output_dir), resuming=bool(tcfg.resume_from_checkpoint),
                      overwrite=args.overwrite_output_dir, main=env is None or env.is_main)
    fsdp = bool(args.fsdp) or os.environ.get("MINITRAIN_FSDP") == "1"
    if fsdp and (env is None or env.world_size < 2):
        raise ConfigError("--fsdp shards the model over several processes: launch with "
                          "torchrun --nproc-per-node N (N >= 2) -m minitrain train ...")
    load_on = None if env is None else env.device
    if fsdp:
        load_on = distributed.load_device_for_fsdp(mcfg.model, mcfg.load_in_4bit, env)
        if load_on != env.device and dtype is None:  # the GPU's default, not the host's fp32
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if load_on != env.device and env.is_main:
            print(f"FSDP2: the model does not fit one GPU's free memory: loading it on the host, then moving one "
                  f"layer at a time to {env.device.type} while sharding", flush=True)
    model, tok = load_model(mcfg.model, max_seq_length=mcfg.max_seq_length, dtype=dtype, load_in_4bit=mcfg.load_in_4bit,
                            device=load_on)
    model.name_or_path = str(mcfg.model)  # recorded as base_model_name_or_path in adapter_config.json
    ds = load_dataset(sources, tok, max_seq_length=mcfg.max_seq_length,
                      train_on_responses_only=tcfg.train_on_responses_only, eval_split=int(tcfg.eval_split) if tcfg.eval_split >= 1 else tcfg.eval_split,
                      seed=tcfg.seed)
    torch.manual_seed(tcfg.seed)
    if args.adapter:  # continue training an existing adapter (ours or peft's)
        load_adapter(model, args.adapter)
    else:
        add_lora(model, r=lcfg.r, alpha=lcfg.lora_alpha, dropout=lcfg.lora_dropout, target_modules=lcfg.target_modules,
                 use_rslora=lcfg.use_rslora, init=lcfg.init)
    if fsdp:
        distributed.shard_model(model, env)  # the Trainer broadcasts rank 0's adapter otherwise
    metrics = Trainer(model, tok, ds, tcfg).train()
    out = Path(tcfg.output_dir)
    if env is None or env.is_main:
        ranks = "" if env is None else f" on {env.world_size} ranks{' (FSDP2)' if fsdp else ''}"
        print(f"done: {metrics.get('step', 0)} steps{ranks}, final loss {metrics.get('loss', float('nan')):.4f}")
        print(f"adapter: {out / 'adapter'}   metrics: {out / 'metrics.jsonl'}   loss curve: {out / 'loss_curve.png'}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    import json

    import torch

    from .loader import load_model
    from .lora import load_adapter, save_merged

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg_path = Path(args.model) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"--model {args.model}: no config.json there (expected a checkpoint directory)")
    stored = json.loads(cfg_path.read_text()).get("torch_dtype") or json.loads(cfg_path.read_text()).get("dtype")
    # Load in the stored 16-bit dtype (exact in fp32 when merging); anything else loads as fp32.
    load_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)
    model, tok = load_model(args.model, dtype=load_dtype, device="cpu")
    load_adapter(model, args.adapter, trainable=False)
    out = save_merged(model, tok, args.output, dtype=dtype, source_dir=args.model)
    print(f"merged checkpoint ({args.dtype}): {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main

    allocator_defaults()
    return main(args)


def add_subcommands(subparsers) -> None:
    """Register ``train``, ``merge`` and ``demo`` on an argparse subparsers object."""
    t = subparsers.add_parser("train", help="fine-tune a LoRA/QLoRA adapter on your data",
                              description="Fine-tune LoRA adapters. Settings: flags, or --config run.toml.")
    t.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer files)")
    t.add_argument("--data", action="append", metavar="FILE[:WEIGHT]",
                   help="dataset file or directory; repeat to mix several, with optional weights (b.jsonl:0.3)")
    t.add_argument("--output", "--output-dir", "--output_dir",
                   help="output directory: adapter/, metrics.jsonl, loss_curve.png, checkpoints (default: outputs)")
    t.add_argument("--overwrite-output-dir", "--overwrite_output_dir", action="store_true",
                   help="delete a previous run's adapter, checkpoints and metrics in --output before training "
                        "(without it, such a directory is refused unless --resume)")
    t.add_argument("--config", help="a TOML file with the same settings: top-level keys or [model]/[lora]/[train] "
                                    "tables, plus data and output. Precedence: flag > file > default")
    t.add_argument("--adapter", help="continue training this adapter directory (ours or peft's)")
    t.add_argument("--resume", "--resume-from-checkpoint", "--resume_from_checkpoint", nargs="?", const="latest",
                   default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint in --output (or the one given)")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model (NF4 weights, adapters) over the ranks with FSDP2 "
                        "(also MINITRAIN_FSDP=1); without it the adapters train data-parallel on full copies")
    _add_field_flags(t, skip=("model", "output_dir", "resume_from_checkpoint"))
    t.set_defaults(func=_guarded(cmd_train, "train"))

    from .cli import DefaultsFormatter

    fmt = dict(formatter_class=DefaultsFormatter)
    m = subparsers.add_parser("merge", help="merge an adapter into its base model (a plain 16-bit checkpoint)", **fmt)
    m.add_argument("--model", required=True, help="base checkpoint directory")
    m.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    m.add_argument("--output", required=True, help="directory for the merged checkpoint")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    m.set_defaults(func=_guarded(cmd_merge, "merge"))

    d = subparsers.add_parser("demo", help="fine-tune SmolLM2-135M-Instruct on a headline task, before/after accuracy",
                              **fmt)
    d.add_argument("--model", default=None, help="use this checkpoint instead of the cached SmolLM2 conversion")
    d.add_argument("--output", default="runs/demo", help="where the adapter, metrics and loss curve go")
    d.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    d.add_argument("--n-train", type=int, default=400, help="training headlines")
    d.add_argument("--n-eval", type=int, default=120, help="held-out headlines")
    d.add_argument("--learning-rate", type=float, default=5e-4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.set_defaults(func=_guarded(cmd_demo, "demo"))


def _guarded(fn, name: str):
    """Run a command; user errors become one line on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        if os.environ.get("MINITRAIN_DEBUG") == "1":
            return fn(args)
        from .lora import LoRAError
        from .trainer import TrainingError

        try:
            return fn(args)
        except (ConfigError, LoRAError, TrainingError, ValueError, KeyError, OSError, RuntimeError) as e:
            msg = str(e).strip().strip('"') or type(e).__name__
            where = f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})" if "WORLD_SIZE" in os.environ else ""
            print(f"minitrain {name}: error{where}: {msg}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"minitrain {name}: interrupted", file=sys.stderr)
            return 130

    return run


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m minitrain.cli_train train ...``) until minitrain.cli registers these."""
    p = argparse.ArgumentParser(prog="minitrain")
    sub = p.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
