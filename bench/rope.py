"""RoPE on q and k, forward and forward + backward, bf16, against transformers, torch.compile, liger, unsloth.

Shapes: q (B=4, T=2048, H=32, D=128) and k (KV=8), Llama-3 cos/sin (B, T, D) — the issue's target; and the
same with D=80 (a non-power-of-two half). Every provider rotates the same (B, T, heads, D) storage; the
Hugging Face-style providers see it as (B, heads, T, D) through a transpose, as in LlamaAttention.

Bytes counted per call (the floor at copy speed): read and write q and k once, read cos and sin once:
    2 * B*T*(H + KV)*D*2  +  2 * B*T*D*2        (bf16); forward + backward counts twice that.

Providers:
  * minitrain (triton), minitrain (cuda): ``triton_ops.rope.rope`` out of place (the CUDA C++ one needs CuPy);
  * minitrain (triton, in place): forward only, no autograd (inference / recompute use);
  * transformers: ``apply_rotary_pos_emb`` eager; torch.compile: the same function compiled (inductor);
  * liger-kernel: ``liger_rotary_pos_emb`` (rotates in place);
  * unsloth: ``fast_rope_embedding`` (in place), run in its own process because importing unsloth patches
    transformers: with PEERS_UNSLOTH=1 the main run starts it; ``python -m bench.rope --only-unsloth`` runs it
    alone. Rows are cached next to the results so either order gives the full table.

Peak MiB: memory allocated during one call above what was allocated before it (inputs, cos/sin, grads of
the upstream). Run: ``python -m bench.rope`` (well under a minute of GPU time plus torch.compile).
"""
from __future__ import annotations

import gc

import torch

from bench import hw

SHAPES = [(4, 2048, 32, 8, 128), (4, 2048, 32, 8, 80)]  # (B, T, H, KV, D)
DT = torch.bfloat16
THETA = 500000.0
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
MODES = ("fwd", "fwd+bwd")
PEERS = ("transformers", "torch.compile", "liger-kernel", "unsloth")
COLUMNS = ["op", "shape", "dtype", "provider", "µs", "GB/s", "% of ceiling", "peak MiB", "vs best peer",
           "eager µs"]
TARGET_US = 150.0


def nbytes(B, T, H, KV, D, mode):
    one = 2 * B * T * (H + KV) * D * 2 + 2 * B * T * D * 2
    return one if mode == "fwd" else 2 * one


def _inputs(B, T, H, KV, D):
    from triton_ops.rope import rope_cos_sin

    q = torch.randn(B, T, H, D, device="cuda", dtype=DT, requires_grad=True)
    k = torch.randn(B, T, KV, D, device="cuda", dtype=DT, requires_grad=True)
    pos = torch.arange(T, device="cuda").expand(B, T)
    cos, sin = rope_cos_sin(pos, D, THETA, LLAMA3, dtype=DT)  # (B, T, D), as LlamaRotaryEmbedding returns
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    return q, k, cos, sin, dq, dk


def _modes(apply, q, k, dq, dk, grad_q_of=None):
    """fwd and fwd+bwd callables for ``apply() -> (q_out, k_out)`` in whatever layout the provider returns."""

    def fwd():
        return apply()

    def fwd_bwd():
        qo, ko = apply()
        torch.autograd.grad((qo, ko), (q, k), grad_q_of(dq, dk) if grad_q_of else (dq, dk))

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _bhtd(dq, dk):
    return dq.transpose(1, 2), dk.transpose(1, 2)


# ---- providers: each returns {mode: callable} -----------------------------------------------------------

def minitrain(shape, backend):
    from triton_ops.rope import rope

    if backend == "cuda":
        import cupy  # noqa: F401  (reported as not installed rather than failing inside the op)
    q, k, cos, sin, dq, dk = _inputs(*shape)
    return _modes(lambda: rope(q, k, cos, sin, backend=backend), q, k, dq, dk)


def minitrain_inplace(shape):
    from triton_ops.rope import rope

    q, k, cos, sin, _, _ = _inputs(*shape)
    q, k = q.detach(), k.detach()

    def fwd():
        with torch.no_grad():
            return rope(q, k, cos, sin, inplace=True, backend="triton")

    return {"fwd": fwd}


def transformers_eager(shape, compiled=False):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    fn = torch.compile(apply_rotary_pos_emb) if compiled else apply_rotary_pos_emb
    q, k, cos, sin, dq, dk = _inputs(*shape)
    return _modes(lambda: fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin), q, k, dq, dk, _bhtd)


def liger(shape):
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        from liger_kernel.ops.rope import LigerRopeFunction

        def liger_rotary_pos_emb(q, k, cos, sin):
            return LigerRopeFunction.apply(q, k, cos, sin)[:2]

    q, k, cos, sin, dq, dk = _inputs(*shape)
    return _modes(lambda: liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin), q, k, dq, dk, _bhtd)


def unsloth_provider(shape):
    # unsloth 2026.10: fast_rope_embedding(Q, K, cos, sin, rope_embedding_indices=None), Q (B, H, T, D)
    # (checked against the 2026.10.9 wheel); looked up explicitly: a TypeError "'module' object is not
    # callable" was seen on the GPU machine, so a non-callable is reported with what it is instead of called
    import importlib

    fast_rope_embedding = importlib.import_module("unsloth.kernels.rope_embedding").fast_rope_embedding
    if not callable(fast_rope_embedding):
        raise TypeError(f"unsloth.kernels.rope_embedding.fast_rope_embedding is {fast_rope_embedding!r}")
    q, k, cos, sin, dq, dk = _inputs(*shape)
    # unsloth indexes cos/sin by position within the sequence: a (T, D) table (all rows start at 0 here)
    c, s = cos[0].contiguous(), sin[0].contiguous()
    return _modes(lambda: fast_rope_embedding(q.transpose(1, 2), k.transpose(1, 2), c, s), q, k, dq, dk, _bhtd)


def providers():
    return [("minitrain (triton)", lambda s: minitrain(s, "triton")),
            ("minitrain (cuda)", lambda s: minitrain(s, "cuda")),
            ("minitrain (triton, in place)", minitrain_inplace),
            ("transformers", transformers_eager),
            ("torch.compile", lambda s: transformers_eager(s, compiled=True)),
            ("liger-kernel", liger)]


# ---- driver ---------------------------------------------------------------------------------------------

def measure(provs):
    rows = []
    for shape in SHAPES:
        for name, make in provs:
            try:
                fns = make(shape)
                err = None
            except Exception as e:  # noqa: BLE001 - a missing or broken peer is a table entry, never a crash
                fns, err = {}, hw.error_cell(e)
            for mode in MODES:
                row = {"shape": list(shape), "mode": mode, "provider": name}
                if err:
                    row["error"] = err
                elif mode not in fns:
                    continue
                else:
                    try:
                        row["us"], row["peak"], row["eager"] = hw.time_and_peak(fns[mode])
                    except Exception as e:  # noqa: BLE001
                        row["error"] = hw.error_cell(e)
                print(f"rope {mode} {shape} {name}: "
                      + (f"{row['us']:.1f} us, peak {row['peak']:.0f} MiB" if "us" in row else row["error"]),
                      flush=True)
                rows.append(row)
            del fns
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def table(rows, copy_gbs):
    out, summary = [], []
    for shape in SHAPES:
        B, T, H, KV, D = shape
        for mode in MODES:
            group = [r for r in rows if r["shape"] == list(shape) and r["mode"] == mode]
            peers = [r["us"] for r in group if r["provider"] in PEERS and "us" in r]
            best = min(peers) if peers else None
            for r in group:
                row = {"op": f"rope {mode}", "shape": f"q ({B},{T},{H},{D}) k KV={KV}", "dtype": "bf16",
                       "provider": r["provider"]}
                if "us" not in r:
                    row["µs"] = r["error"]
                else:
                    gbs = nbytes(*shape, mode) / r["us"] / 1e3
                    row.update({"µs": f"{r['us']:.1f}", "GB/s": f"{gbs:.0f}",
                                "% of ceiling": f"{100 * gbs / copy_gbs:.0f}%", "peak MiB": f"{r['peak']:.0f}",
                                "vs best peer": f"{best / r['us']:.2f}x" if best else "no peer",
                                "eager µs": f"{r['eager']:.1f}" if "eager" in r else ""})
                out.append(row)
            floor = nbytes(*shape, mode) / copy_gbs / 1e3
            for r in group:
                if r["provider"].startswith("minitrain") and "us" in r and mode == "fwd+bwd":
                    line = (f"- {r['provider']} fwd+bwd {shape}: {r['us']:.1f} µs (floor at copy speed {floor:.0f} µs"
                            + (f"; target ≤ {TARGET_US:.0f} µs: {'met' if r['us'] <= TARGET_US else 'NOT met'}"
                               if shape == SHAPES[0] else "")
                            + (f"; best peer {best:.0f} µs, {best / r['us']:.2f}x)" if best else ")"))
                    summary.append(line)
    return hw.markdown_table(out, COLUMNS), "\n".join(summary) + "\n"


def main():
    args = hw.peer_bench_args("rope")
    rows = hw.rows_with_unsloth(
        "rope", args.only_unsloth, lambda: measure(providers()), lambda: measure([("unsloth", unsloth_provider)]),
        lambda why: [{"shape": list(s), "mode": m, "provider": "unsloth", "error": why} for s in SHAPES for m in MODES])
    c = hw.ceilings()
    body, summary = table(rows, c["copy_gbs"])
    notes = ("\nGB/s: the bytes a kernel must move (q, k read and written once, cos/sin read once; twice that "
             "for fwd+bwd) over the time; % of the copy bandwidth measured in this run. µs: one call replayed from a "
             "CUDA graph (the GPU time; every provider alike), eager µs: "
             "the same call launched from Python (host overhead included). vs best peer: best peer "
             "time / this time (>1 = faster). liger-kernel and unsloth rotate in place; minitrain (triton) and "
             "(cuda) write new tensors, as transformers does.\n\n")
    hw.publish("rope", "RoPE (q and k, Llama-3 scaling), forward and forward + backward", body, notes, summary)


if __name__ == "__main__":
    main()
