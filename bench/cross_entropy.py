"""Cross-entropy on the GPU, against torch, torch.compile, liger-kernel, cut-cross-entropy and unsloth.

1. Loss from hidden states and the lm_head weight (C=4096, V=128256, bf16, grads of hidden AND weight),
   forward + backward at 4,096 and 16,384 tokens. Providers: torch (matmul + fp32 F.cross_entropy, what
   transformers does), torch.compile of that, liger-kernel's LigerFusedLinearCrossEntropyLoss, Apple's
   cut-cross-entropy ``linear_cross_entropy``, unsloth (fast_cross_entropy_loss on the matmul's logits, and
   unsloth_zoo's ``unsloth_fused_ce_loss``), ours ``fused_linear_cross_entropy`` (default, a smaller chunk,
   and the CUDA C++ row kernel instead of the default Triton one), and "3 matmuls alone" (h W^T, G W, G^T h
   with a ready G: the floor of any method that keeps the three GEMMs). TFLOP/s counts 6*N*V*C; % of
   ceiling: of the bf16 matmul rate measured in this run.
   These rows are timed in ROUNDS interleaved rounds (every provider once per round, order rotated; µs is the
   median of the round medians, the last column their spread): the card's clock drifts with power and
   temperature over a run by more than the differences between the fast providers. cut-cross-entropy and
   unsloth are interleaved likewise among themselves, in their own process (see below).
   Peak MiB: allocated above the inputs during one forward+backward, the returned grads included
   (grad_h + grad_W = 1.13 GiB at 16k); the last column subtracts those grads.
2. Cross-entropy on given logits (N=16384, V=128256, bf16), forward + backward: torch (fp32 upcast),
   torch.compile, liger-kernel's LigerCrossEntropyLoss, unsloth's fast_cross_entropy_loss, ours (new
   gradient tensor, and inplace_backward). GB/s counts the ideal 3*N*V*2 bytes (read in the forward, read
   and write in the backward); % of ceiling: of the copy bandwidth measured in this run. Timed in the same
   interleaved rounds as section 1.

cut-cross-entropy and unsloth travel in the unsloth wheel set: ``python -m bench.cross_entropy --only-unsloth``
under PEERS_UNSLOTH=1 measures them in their own process (cut-cross-entropy first, then unsloth, whose import
patches other libraries) and leaves the rows in bench/results/.cross_entropy-unsloth-<card>.json, which the main
run picks up; with PEERS_UNSLOTH=1 set the main run starts that subprocess itself. A missing peer is a table
entry, never a crash. Results: bench/results/<date>-<card>-cross_entropy.md.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench import hw

C, V = 4096, 128256
TOKENS = [4096, 16384]
CE_N = 16384
ROUNDS = 3  # interleaved timing rounds of the hidden -> loss providers (_rows_in_rounds)
DEVICE = "cuda"  # a module constant so a CPU smoke run can swap it
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "TFLOP/s or GB/s", "% of ceiling", "peak MiB",
           "vs best peer", "MiB beyond grads", "rounds ms (min-max)"]
OURS = ("minitrain", "minitrain chunk=1024", "minitrain cuda rows", "minitrain inplace_backward")
NOT_PEERS = OURS + ("3 matmuls alone (floor)",)


def _cache_path():
    return hw.RESULTS_DIR / f".cross_entropy-unsloth-{hw.card_slug()}.json"


def _peak(fn, grads_bytes=0):
    """(peak MiB above what was allocated before, MiB beyond the returned grads) for one fn(), after a warm-up."""
    fn()  # warm-up (compiles, autotunes, allocator)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak, peak - grads_bytes / 2**20


def _error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _rows_in_rounds(op, shape, cands, rounds=ROUNDS):
    """Rows for candidates [(provider, fn or None, grads_bytes, error)], timed in interleaved rounds.

    A 16k-token step is ~80 ms of matmuls: over a run of seconds the card's clock moves with its power and
    temperature by several percent, so providers timed one after the other would be compared in different
    states. Each round times every provider once (do_bench median, order rotated per round); a row's µs is the
    median of its round medians, and the spread of those is printed with it."""
    rows, live = [], []
    for provider, fn, gb, error in cands:
        r = {"op": op, "shape": shape, "dtype": "bf16", "provider": provider, "rounds": []}
        if error is None:
            try:
                r["peak"], r["beyond"] = _peak(fn, gb)
                live.append((r, fn))
            except Exception as e:  # noqa: BLE001 - a failing provider is a table entry, never a crash
                error = _error(e)
        if error is not None:
            r["error"] = error
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(r)
    for k in range(rounds):
        order = live[k % max(1, len(live)):] + live[:k % max(1, len(live))]
        for r, fn in order:
            if "error" in r:
                continue
            try:
                r["rounds"].append(hw.bench_us(fn, warmup=50, rep=600))
            except Exception as e:  # noqa: BLE001
                r["error"] = _error(e)
    for r in rows:
        if r["rounds"] and "error" not in r:
            t = sorted(r["rounds"])
            r["us"] = t[len(t) // 2]
            r["spread"] = f"{t[0] / 1e3:.1f}-{t[-1] / 1e3:.1f}"
        print({k: v for k, v in r.items() if k != "rounds"}, flush=True)
    return rows


def _inputs(n):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    h = (torch.randn(n, C, device=DEVICE, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, C, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (n,), device=DEVICE, generator=g)
    y[torch.rand(n, device=DEVICE, generator=g) < 0.1] = -100  # some ignored (prompt) tokens
    return h, w, y


def _loss_of(out):
    """Peers may return (loss, extras) or an output object: take the loss tensor."""
    if isinstance(out, torch.Tensor):
        return out
    return out.loss if hasattr(out, "loss") else out[0]


def _grad_step(loss_fn, h, w, y):
    def step():
        torch.autograd.grad(_loss_of(loss_fn(h, w, y)), (h, w))
    return step


def linear_rows(n, only_unsloth=False):
    """Section 1 rows for n tokens."""
    op, shape = "hidden -> CE loss (fwd+bwd)", f"N={n} C={C} V={V}"
    h, w, y = _inputs(n)
    gb = (h.numel() + w.numel()) * 2
    rows = []
    if only_unsloth:
        cands = []
        try:
            from cut_cross_entropy import linear_cross_entropy

            cands.append(("cut-cross-entropy", _grad_step(lambda a, b, t: linear_cross_entropy(a, b, t), h, w, y),
                          gb, None))
        except ImportError as e:
            cands.append(("cut-cross-entropy", None, gb, f"not installed ({e})"))
        try:
            import unsloth  # noqa: F401  (before anything imports peft/transformers)
            from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

            def uns(a, b, t):
                return fast_cross_entropy_loss((a @ b.t()).view(1, n, V), t.view(1, n))
            cands.append(("unsloth fast_cross_entropy_loss", _grad_step(uns, h, w, y), gb, None))
        except Exception as e:  # noqa: BLE001
            cands.append(("unsloth fast_cross_entropy_loss", None, gb, f"not installed ({e})"))
        try:
            from unsloth_zoo.fused_losses import unsloth_fused_ce_loss

            def uns_fused(a, b, t):
                try:  # newer unsloth_zoo: labels already aligned with the hidden states
                    return unsloth_fused_ce_loss(None, a.view(1, n, C), b, None, t.view(1, n), shift_labels=False)
                except TypeError:  # older: shifts internally (N-1 tokens)
                    return unsloth_fused_ce_loss(None, a.view(1, n, C), b, None, t.view(1, n))
            cands.append(("unsloth_fused_ce_loss", _grad_step(uns_fused, h, w, y), gb, None))
        except Exception as e:  # noqa: BLE001
            cands.append(("unsloth_fused_ce_loss", None, gb, f"not installed ({e})"))
        return _rows_in_rounds(op, shape, cands)

    # floor: the three GEMMs of any method that computes logits once, with a ready G = dloss/dlogits
    big = torch.empty(n, V, device=DEVICE, dtype=torch.bfloat16).normal_()
    out_h, out_w = torch.empty_like(h), torch.empty_like(w)
    hd, wd = h.detach(), w.detach()

    def floor():
        torch.mm(hd, wd.t(), out=big)
        torch.mm(big, wd, out=out_h)
        torch.mm(big.t(), hd, out=out_w)
    cands = [("3 matmuls alone (floor)", floor, 0, None)]

    def torch_loss(a, b, t):
        return F.cross_entropy((a @ b.t()).float(), t)
    cands.append(("torch", _grad_step(torch_loss, h, w, y), gb, None))
    cands.append(("torch.compile", _grad_step(torch.compile(torch_loss, dynamic=False), h, w, y), gb, None))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        cands.append(("liger-kernel", _grad_step(lambda a, b, t: liger(b, a, t), h, w, y), gb, None))
    except ImportError as e:
        cands.append(("liger-kernel", None, gb, f"not installed ({e})"))
    from triton_ops.fused_linear_cross_entropy import fused_linear_cross_entropy

    cands.append(("minitrain", _grad_step(fused_linear_cross_entropy, h, w, y), gb, None))
    # the CUDA C++ row kernel (csrc/ce_rows.cu, each logit read once) instead of the default Triton one (twice)
    cands.append(("minitrain cuda rows", _grad_step(
        lambda a, b, t: fused_linear_cross_entropy(a, b, t, backend="cuda"), h, w, y), gb, None))
    if n > 1024:  # the default chunk is 2048 tokens at this V; half of it shows what the chunk size buys
        cands.append(("minitrain chunk=1024", _grad_step(
            lambda a, b, t: fused_linear_cross_entropy(a, b, t, chunk_size=1024), h, w, y), gb, None))
    rows += _rows_in_rounds(op, shape, cands)
    del big, out_h, out_w
    return rows


def logits_rows(only_unsloth=False):
    """Section 2 rows: cross-entropy on given (N, V) bf16 logits."""
    n = CE_N
    op, shape = "logits -> CE loss (fwd+bwd)", f"N={n} V={V}"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    leaf = (torch.randn(n, V, device=DEVICE, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, V, (n,), device=DEVICE, generator=g)
    gb = leaf.numel() * 2

    def step(loss_fn, x=None):
        def run():
            torch.autograd.grad(_loss_of(loss_fn(leaf if x is None else x(), y)), leaf)
        return run
    if only_unsloth:
        try:
            import unsloth  # noqa: F401
            from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

            cand = ("unsloth fast_cross_entropy_loss", step(
                lambda x, t: fast_cross_entropy_loss(x.view(1, n, V), t.view(1, n))), gb, None)
        except Exception as e:  # noqa: BLE001
            cand = ("unsloth fast_cross_entropy_loss", None, gb, f"not installed ({e})")
        return _rows_in_rounds(op, shape, [cand])

    def torch_loss(x, t):
        return F.cross_entropy(x.float(), t)
    cands = [("torch", step(torch_loss), gb, None),
             ("torch.compile", step(torch.compile(torch_loss, dynamic=False)), gb, None)]
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        cands.append(("liger-kernel", step(liger), gb, None))  # writes its grad into the logits
    except ImportError as e:
        cands.append(("liger-kernel", None, gb, f"not installed ({e})"))
    from triton_ops.cross_entropy import cross_entropy

    cands.append(("minitrain", step(cross_entropy), gb, None))
    # in place: the logits must be a non-leaf (like an lm_head output); a view of the leaf costs nothing
    cands.append(("minitrain inplace_backward",
                  step(lambda x, t: cross_entropy(x, t, inplace_backward=True), x=lambda: leaf.view(n, V)), gb, None))
    return _rows_in_rounds(op, shape, cands)


def _fmt(rows, tflops, copy_gbs):
    for r in rows:
        if "us" not in r:
            continue
        n = int(r["shape"].split()[0][2:])
        if r["op"].startswith("hidden"):
            rate = 6 * n * V * C / r["us"] / 1e6
            r["rate"], r["pct"] = f"{rate:.0f} TFLOP/s", f"{100 * rate / tflops:.0f}%"
        else:
            rate = 3 * n * V * 2 / r["us"] / 1e3
            r["rate"], r["pct"] = f"{rate:.0f} GB/s", f"{100 * rate / copy_gbs:.0f}%"
    out = []
    for r in rows:
        peers = [p["us"] for p in rows if p["shape"] == r["shape"] and p["op"] == r["op"] and "us" in p
                 and p["provider"] not in NOT_PEERS]
        vs = f"{min(peers) / r['us']:.2f}x" if "us" in r and peers and r["provider"] in OURS else ""
        is_floor = r["provider"].endswith("(floor)")
        out.append({"op": r["op"], "shape": r["shape"], "dtype": r["dtype"], "provider": r["provider"],
                     "µs": f"{r['us']:.0f}" if "us" in r else r.get("error", ""),
                     "TFLOP/s or GB/s": r.get("rate", ""), "% of ceiling": r.get("pct", ""),
                     "peak MiB": "—" if is_floor else (f"{r['peak']:.0f}" if "peak" in r else ""),
                     "vs best peer": vs,
                     "MiB beyond grads": "—" if is_floor else (f"{r['beyond']:.0f}" if "beyond" in r else ""),
                     "rounds ms (min-max)": r.get("spread", "")})
    return hw.markdown_table(out, COLUMNS)


def _summary(rows):
    lines = []
    for n, target_ms in ((16384, 80), (4096, 21)):
        ours = [r for r in rows if r["provider"] == "minitrain" and r["shape"] == f"N={n} C={C} V={V}" and "us" in r]
        floor = [r for r in rows if r["provider"].endswith("(floor)") and r["shape"] == f"N={n} C={C} V={V}"
                 and "us" in r]
        if ours:
            o = ours[0]
            fl = f", floor {floor[0]['us'] / 1e3:.1f} ms" if floor else ""
            lines.append(f"- {n} tokens: {o['us'] / 1e3:.1f} ms (target <= {target_ms} ms{fl}): "
                         f"{'met' if o['us'] <= target_ms * 1e3 else 'NOT met'}; "
                         f"peak {o['peak']:.0f} MiB above inputs, "
                         f"{o['beyond']:.0f} MiB beyond inputs and grads (target <= 512 MiB"
                         f"{'' if n == 16384 else ', stated for 16k'}): "
                         f"{'met' if o['beyond'] <= 512 else 'NOT met'}.")
    return "\n".join(lines) + "\n"


def main():
    args = hw.peer_bench_args("cross_entropy", "measure cut-cross-entropy and unsloth only (run under PEERS_UNSLOTH=1)")
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.only_unsloth:
        rows = [r for n in TOKENS for r in linear_rows(n, only_unsloth=True)] + logits_rows(only_unsloth=True)
        hw.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        _cache_path().write_text(json.dumps(rows))
        print(f"wrote {_cache_path()}")
        return
    c = hw.ceilings()
    print(f"{hw.card_name()}: copy {c['copy_gbs']:.0f} GB/s, bf16 matmul {c['bf16_tflops']:.0f} TFLOP/s", flush=True)
    if os.environ.get("PEERS_UNSLOTH") == "1":
        try:
            subprocess.run([sys.executable, "-m", "bench.cross_entropy", "--only-unsloth"], timeout=240, check=False)
        except subprocess.TimeoutExpired:
            print("unsloth subprocess timed out")
    try:
        side = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        side = []
    rows = []
    for n in TOKENS:
        rows += linear_rows(n)
        mine = [r for r in side if r["shape"] == f"N={n} C={C} V={V}"]
        rows += mine or [{"op": "hidden -> CE loss (fwd+bwd)", "shape": f"N={n} C={C} V={V}", "dtype": "bf16",
                          "provider": p, "error": "not run (python -m bench.cross_entropy --only-unsloth under "
                                                  "PEERS_UNSLOTH=1)"}
                         for p in ("cut-cross-entropy", "unsloth fast_cross_entropy_loss", "unsloth_fused_ce_loss")]
    rows += logits_rows()
    mine = [r for r in side if r["op"].startswith("logits")]
    rows += mine or [{"op": "logits -> CE loss (fwd+bwd)", "shape": f"N={CE_N} V={V}", "dtype": "bf16",
                      "provider": "unsloth fast_cross_entropy_loss", "error": "not run (see --only-unsloth)"}]
    body = _fmt(rows, c["bf16_tflops"], c["copy_gbs"])
    notes = ("\nPeak MiB: allocated above the inputs during one forward+backward (returned grads included); "
             "MiB beyond grads subtracts grad_h and grad_W (or grad_logits). vs best peer: best peer time / ours "
             "(>1 = ours faster); peers are torch, torch.compile, liger-kernel, cut-cross-entropy and unsloth. "
             "unsloth_fused_ce_loss may shift labels internally (N-1 tokens) on older unsloth_zoo.\n\n")
    summary = _summary(rows)
    hw.publish("cross_entropy", "Cross-entropy: fused linear (hidden -> loss) and on given logits", body, notes, summary)


if __name__ == "__main__":
    main()
