"""The ``minitrain`` command line. Each subcommand is a function taking parsed arguments."""
from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minitrain", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("nf4-check", help="quantize/dequantize a weight and report error and memory saved")
    c.add_argument("--shape", type=int, nargs=2, default=(4096, 4096), metavar=("N", "K"))
    c.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    c.add_argument("--no-double-quant", action="store_true", help="keep fp32 absmax (bitsandbytes' compress_statistics=False)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_nf4_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
