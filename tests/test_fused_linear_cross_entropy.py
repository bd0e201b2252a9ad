"""fused_linear_cross_entropy against materialized logits + F.cross_entropy / cross_entropy_ref.

Three copies of the inputs: the kernel; a same-precision reference (logits = h @ W.T in the inputs' dtype,
then the fp32 loss; autograd gradients in that dtype); an fp32 reference (everything upcast). One upstream
gradient for all. Rule: kernel error vs fp32 <= 2 * (same-precision error) + atol, where atol is a
relative 1e-5 plus, for 16-bit inputs, the rounding bounds of what the kernel rounds differently from the
reference: one ulp of each element of G = dloss/dlogits (written in the inputs' dtype, so
eps * max(|G| |W|) for grad_h and eps * max(|G|^T |h|) for grad_W), and for grad_W one more such ulp per
chunk (it is accumulated chunk by chunk in the weight's dtype: one rounding of the partial sum per chunk).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from triton_ops.cross_entropy import cross_entropy_ref
from triton_ops.fused_linear_cross_entropy import (default_chunk_size, fused_linear_cross_entropy,
                                                   fused_linear_cross_entropy_ref)

# (N, C, V, chunk) on CPU (interpreter), each with a reason:
CPU_CASES = [
    (1, 8, 7, None),      # tiny: one token, one chunk
    (37, 24, 1501, 8),    # odd N and V: five chunks with a ragged last one, V spanning two blocks
    (16, 32, 300, 16),    # N a multiple of the chunk
]
GPU_VOCABS = [32000, 49152, 128256, 151936, 256000]  # Llama-2, SmolLM, Llama-3, Qwen2, Gemma


def _close(name, out, ref32, ref_same=None, atol_extra=0.0, rel=1e-5, abs_=1e-6):
    ulp = torch.finfo(out.dtype).eps if out.dtype in (torch.float16, torch.bfloat16) else 0.0
    out, ref32 = out.float(), ref32.float()
    ref_err = 0.0 if ref_same is None else (ref_same.float() - ref32).abs().max().item()
    atol = (rel + ulp) * ref32.abs().max().item() + abs_ + atol_extra
    diff = (out - ref32).abs()
    err = diff.max().item() if diff.numel() else 0.0
    bound = 2 * ref_err + atol
    if not err <= bound:  # also catches NaN
        where = divmod(int(diff.argmax()), out.shape[-1]) if out.dim() == 2 else int(diff.reshape(-1).argmax())
        pytest.fail(f"{name}: max error {err:.3e} at {where} > bound {bound:.3e} (same-precision ref error "
                    f"{ref_err:.3e}, atol {atol:.3e}); {int((diff > bound).sum())} of {diff.numel()} differ")


def _labels(n, v, device, ignore_frac=0.25):
    y = torch.randint(0, v, (n,), device=device)
    y[torch.rand(n, device=device) < ignore_frac] = -100
    y[0] = torch.randint(0, v, ())  # at least one counted token: F.cross_entropy's mean over none is NaN
    return y


def _inputs(n, c, v, device, bias=False):
    h = torch.randn(n, c, device=device)
    w = torch.randn(v, c, device=device) * (2.0 / math.sqrt(c))  # logits of order a few units
    b = torch.randn(v, device=device) if bias else None
    return h, w, b


def _check(h, w, y, dtype, b=None, reduction="mean", n_items=None, softcap=None, chunk=None, compile=False, rel=1e-5,
           backend="triton"):
    """Kernel vs same-precision and fp32 references; loss and grads of h, W (and b); ``rel``: _close's relative term;
    ``backend``: "triton" (the Triton row kernel) or "cuda" (csrc/ce_rows.cu for the loss-and-gradient chunks)."""
    def leaves(dt):
        return [t.to(dt).detach().clone().requires_grad_() for t in (h, w) + (() if b is None else (b,))]

    k, s, f = leaves(dtype), leaves(dtype), leaves(torch.float32)

    def run(a):
        return fused_linear_cross_entropy(a[0], a[1], y, a[2] if b is not None else None, reduction=reduction,
                                          n_items=n_items, softcap=softcap, chunk_size=chunk, backend=backend)

    # aot_eager on CPU: the same tracing (fake impls, autograd formula, no graph break) without the minutes
    # inductor spends generating C++ for the small ops around ours; inductor on CUDA.
    compiler = "inductor" if h.is_cuda else "aot_eager"
    loss = (torch.compile(run, fullgraph=True, backend=compiler) if compile else run)(k)
    logits_s = s[0] @ s[1].t() + (s[2] if b is not None else 0)  # in dtype, like an unfused lm_head
    loss_s = cross_entropy_ref(logits_s, y, reduction=reduction, n_items=n_items, softcap=softcap)
    logits_32 = f[0] @ f[1].t() + (f[2] if b is not None else 0)
    if softcap is None and n_items is None:
        loss_32 = F.cross_entropy(logits_32, y, reduction=reduction)
    else:
        loss_32 = cross_entropy_ref(logits_32, y, reduction=reduction, n_items=n_items, softcap=softcap)
    assert loss.dtype == torch.float32 and loss.shape == loss_32.shape
    dy = torch.rand_like(loss_32) + 0.5
    g, g_s = (torch.autograd.grad(lo, a, dy) for lo, a in ((loss, k), (loss_s, s)))
    g_32 = torch.autograd.grad(loss_32, f + [logits_32], dy)
    eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    n_chunks = -(-h.shape[0] // (chunk or default_chunk_size(h.shape[0], w.shape[0], k[1].element_size())))
    a_g = g_32[-1].abs()
    _close("loss", loss, loss_32, loss_s.detach(), rel=rel)
    _close("grad_hidden", g[0], g_32[0], g_s[0], eps * (a_g @ f[1].detach().abs()).max().item(), rel=rel)
    gw_bound = (a_g.t() @ f[0].detach().abs()).max().item()
    _close("grad_weight", g[1], g_32[1], g_s[1], eps * n_chunks * gw_bound, rel=rel)
    if b is not None:
        _close("grad_bias", g[2], g_32[2], g_s[2], eps * n_chunks * a_g.sum(0).max().item(), rel=rel)
    assert all(t.dtype == dtype for t in g)


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_materialized(case, dtype, device):
    n, c, v, chunk = case
    h, w, _ = _inputs(n, c, v, device)
    _check(h, w, _labels(n, v, device), dtype, chunk=chunk)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_options(reduction, device):
    n, c, v = 21, 16, 700
    h, w, b = _inputs(n, c, v, device, bias=True)
    y = _labels(n, v, device)
    _check(h, w, y, torch.float32, b, reduction, softcap=3.0, chunk=8)
    if reduction != "none":
        _check(h, w, y, torch.float16, None, reduction, n_items=torch.tensor(50, device=device), chunk=8)


def test_all_ignored_and_extreme(device):
    n, c, v = 9, 16, 500
    h, w, _ = _inputs(n, c, v, device)
    y = torch.full((n,), -100, device=device)
    for reduction in ("mean", "sum", "none"):
        hk, wk = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_linear_cross_entropy(hk, wk, y, reduction=reduction, chunk_size=4, backend="triton")
        assert torch.equal(loss, torch.zeros_like(loss)), loss  # not NaN
        gh, gw = torch.autograd.grad(loss.sum(), (hk, wk))
        assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    # extreme logits ~ +-1e4: large hidden states along a few weight rows
    w2 = w.clone()
    w2[:3] = h[:3] / h[:3].norm(dim=1, keepdim=True) ** 2 * 1e4  # logits[i, i] = 1e4 for i < 3
    w2[3] = -w2[0]
    y = _labels(n, v, device, 0.0)
    y[0], y[1] = 0, 3  # label on a +1e4 logit, and on a -1e4 one
    _check_fp64(h, w2, y, None, "mean", chunk=4)
    _check_fp64(h, w2, y, 30.0, "none", chunk=4)


def _check_fp64(h, w, y, cap, reduction, chunk):
    """fp32 on extreme logits, held to the tolerance rule against fp64: the kernel's error vs fp64 <= 2 x the fp32
    torch reference's error vs fp64 + a small atol. With weight rows of norm ~1e4 the gradients are sums of large
    cancelling terms, and with a softcap the (1 - t^2) factor, t = tanh(z / cap) near 1, turns an ulp of t into a
    large relative error: an fp32 torch computation is no exact reference there (against one, the kernel failed
    1 seed in ~10, e.g. MINITRAIN_SEED=759925320 and 111); fp64 measures how ill-conditioned the case is."""
    def loss_fn(hh, ww):
        z = hh @ ww.t()
        zc = z if cap is None else cap * torch.tanh(z / cap)
        keep = y != -100
        rows = torch.logsumexp(zc, dim=1) - zc.gather(1, y.clamp(min=0)[:, None])[:, 0]
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        return rows if reduction == "none" else rows.sum() / keep.sum().clamp(min=1)

    dy = torch.rand(h.shape[0] if reduction == "none" else (), dtype=torch.float64, device=h.device) + 0.5
    outs = {}
    for name, dt in (("kernel", torch.float32), ("torch fp32", torch.float32), ("fp64", torch.float64)):
        hh, ww = (t.to(dt).detach().clone().requires_grad_() for t in (h, w))
        if name == "kernel":
            loss = fused_linear_cross_entropy(hh, ww, y, reduction=reduction, softcap=cap, chunk_size=chunk,
                                              backend="triton")
        else:
            loss = loss_fn(hh, ww)
        outs[name] = (loss,) + torch.autograd.grad(loss, (hh, ww), dy.to(loss.dtype))
    for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
        exact = outs["fp64"][i]
        err = (outs["kernel"][i].double() - exact).abs().max().item()
        ref_err = (outs["torch fp32"][i].double() - exact).abs().max().item()
        atol = 1e-6 * exact.abs().max().item() + 1e-6
        assert err <= 2 * ref_err + atol, f"{what}: kernel vs fp64 {err:.3e} > 2 x torch fp32's {ref_err:.3e} + {atol:.1e}"


def test_weight_frozen_and_shifted_3d(device):
    b_, t, c, v = 2, 5, 16, 300
    h_full = torch.randn(b_, t + 1, c, device=device, requires_grad=True)
    h = h_full[:, :-1]  # non-contiguous (B, T, C) view, as when shifting hidden states against labels
    w = torch.randn(v, c, device=device) * 0.5  # frozen lm_head: no grad_W matmul at all
    y = _labels(b_ * t, v, device).reshape(b_, t)
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=4, backend="triton")
    (g,) = torch.autograd.grad(loss, h_full)
    h32 = h_full.detach().clone().requires_grad_()
    ref = F.cross_entropy((h32[:, :-1] @ w.t()).reshape(-1, v), y.reshape(-1))
    (g32,) = torch.autograd.grad(ref, h32)
    _close("loss", loss, ref)
    _close("grad_hidden", g, g32)
    assert torch.equal(g[:, -1], torch.zeros_like(g[:, -1]))
    with torch.no_grad():
        _close("no-grad loss", fused_linear_cross_entropy(h, w, y, backend="triton"), ref)


def test_second_backward_refused(device):
    h, w, _ = _inputs(6, 8, 40, device)
    h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, _labels(6, 40, device), backend="triton")
    torch.autograd.grad(loss, h, retain_graph=True)
    with pytest.raises(RuntimeError, match="once per forward"):
        torch.autograd.grad(loss, h)


def test_compile_fullgraph(device):
    n, c, v = 13, 16, 300
    h, w, _ = _inputs(n, c, v, device)
    _check(h, w, _labels(n, v, device), torch.float32, softcap=10.0, chunk=4, compile=True)


def test_chunk_formula_and_errors(device):
    # V=128256 bf16: 0.49 GiB / (128256 * 2) = 2051 rows -> 2048 (a multiple of 128), capped at N
    assert default_chunk_size(16384, 128256, 2) == 2048
    assert default_chunk_size(300, 128256, 2) == 300
    assert default_chunk_size(16384, 256000, 4) == 512
    assert 2048 * 128256 * 2 < 0.5 * 2**30  # the default buffer stays within the memory target
    h, w, _ = _inputs(4, 8, 30, device)
    y = _labels(4, 30, device)
    if device == "cpu":
        assert torch.equal(fused_linear_cross_entropy(h, w, y), fused_linear_cross_entropy_ref(h, w, y))
    with pytest.raises(TypeError, match="share one dtype"):
        fused_linear_cross_entropy(h, w.half(), y, backend="triton")
    with pytest.raises(ValueError, match=r"weight \(V, C\)"):
        fused_linear_cross_entropy(h, w[:, :5].contiguous(), y, backend="triton")
    with pytest.raises(ValueError, match="int64 labels"):
        fused_linear_cross_entropy(h, w, y.int(), backend="triton")


# ---------------------------------------------------------------- GPU: real shapes


@pytest.mark.gpu
@pytest.mark.parametrize("v", GPU_VOCABS)
@pytest.mark.parametrize("chunk", [None, 256])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_vocabularies(v, chunk, backend):
    from csrc.ce_rows import MAX_VOCAB

    n, c = 1024, 2048
    h, w, _ = _inputs(n, c, v, "cuda")
    if backend == "cuda" and v > MAX_VOCAB:  # rows longer than the CUDA kernel holds: a clear error
        with pytest.raises(ValueError, match=f"at most {MAX_VOCAB}, got {v}"):
            _check(h, w, _labels(n, v, "cuda"), torch.bfloat16, chunk=chunk, backend=backend)
        return
    _check(h, w, _labels(n, v, "cuda"), torch.bfloat16, chunk=chunk, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_options(reduction):
    n, c, v = 2048, 2048, 128256
    h, w, b = _inputs(n, c, v, "cuda", bias=True)
    y = _labels(n, v, "cuda")
    _check(h, w, y, torch.bfloat16, b, reduction, softcap=30.0, chunk=512)
    if reduction != "none":
        _check(h, w, y, torch.float16, None, reduction, n_items=torch.tensor(3000, device="cuda"))
        _check(h, w, y, torch.float16, None, reduction, n_items=torch.tensor(3000, device="cuda"), backend="cuda")
        _check(h, w, y, torch.float32, None, reduction, n_items=3000)


@pytest.mark.gpu
def test_gpu_tokens_times_vocab_past_2_31():
    n, c, v = 17000, 256, 128256
    assert n * v > 2**31
    h, w, _ = _inputs(n, c, v, "cuda")
    _check(h, w, _labels(n, v, "cuda"), torch.bfloat16)
    _check(h, w, _labels(n, v, "cuda"), torch.bfloat16, backend="cuda")


@pytest.mark.gpu
def test_gpu_llama3_memory():
    """16,384 tokens, C=4096, V=128256 bf16: at most 0.5 GiB above inputs and their gradients."""
    n, c, v = 16384, 4096, 128256
    h = (torch.randn(n, c, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, c, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    y = _labels(n, v, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(h, w, y)
    gh, gw = torch.autograd.grad(loss, (h, w))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - gh.numel() * 2 - gw.numel() * 2
    assert extra <= 0.5 * 2**30, f"{extra / 2**30:.3f} GiB above inputs and grads"
    # values against fp32 in slices of the vocabulary-wide logits (the full fp32 logits would be 8 GiB)
    h32, w32 = h.detach().float(), w.detach().float()
    rows = slice(0, 2048)
    logits = h32[rows] @ w32.t()
    assert torch.isfinite(loss)
    valid = y != -100
    full_lse = torch.cat([torch.logsumexp(h32[i:i + 2048] @ w32.t(), 1) for i in range(0, n, 2048)])
    tgt = (h32 * w32[y.clamp(min=0)]).sum(1)
    ref_loss = ((full_lse - tgt) * valid).sum() / valid.sum()
    _close("loss", loss, ref_loss, rel=1e-4)

    def g_rows(lg):  # dloss/dlogits of the first 2048 rows, fp32
        p = torch.softmax(lg, 1)
        p[torch.arange(2048, device="cuda")[valid[rows]], y[rows][valid[rows]]] -= 1
        return p * (valid[rows, None] / valid.sum())

    g_s = g_rows((h.detach()[rows] @ w.detach().t()).float())  # same precision: bf16 logits, bf16 G
    _close("grad_hidden (first 2048 rows)", gh[rows], g_rows(logits) @ w32, (g_s.to(torch.bfloat16) @ w.detach()))


def test_backward_allocates_no_zero_grads(device):
    """The backward must not get zero-filled gradients for the op's non-differentiable gradient outputs:
    autograd's default would allocate and fill a V x C (grad_W-sized) tensor every step (1 GiB at Llama-3)."""
    n, c, v = 6, 8, 40
    h, w, _ = _inputs(n, c, v, device)
    h.requires_grad_(), w.requires_grad_()
    y = _labels(n, v, device)
    loss = fused_linear_cross_entropy(h, w, y, backend="triton")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.autograd.grad(loss, (h, w))
    big = [(e.name, e.input_shapes) for e in prof.events()
           if e.name in ("aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_", "aten::empty")
           and any(list(s) in ([v, c], [n, c]) for s in e.input_shapes if isinstance(s, list))]
    assert not big, f"backward allocated/filled gradient-sized tensors: {big}"


def test_frozen_weight_takes_half_the_chunk(monkeypatch):
    """Without a weight gradient (a frozen lm_head: no per-chunk re-read of grad_W) the default chunk's logits
    buffer is half the budget: 1024 tokens at V=128256 in bf16, 2048 with the gradient."""
    import importlib

    flce = importlib.import_module("triton_ops.fused_linear_cross_entropy")  # (the package exports a function so named)
    assert flce.default_chunk_size(4096, 128256, 2, flce.FROZEN_CHUNK_BUDGET_BYTES) == 1024
    assert flce.default_chunk_size(4096, 128256, 2) == 2048
    seen, run = [], flce._run_chunks
    monkeypatch.setattr(flce, "_run_chunks", lambda *a, **kw: (seen.append(a[6]), run(*a, **kw))[1])
    n, c, v = 300, 8, 2000  # budgets scaled down so the chunks differ at this size
    monkeypatch.setattr(flce, "CHUNK_BUDGET_BYTES", 256 * v * 4)
    monkeypatch.setattr(flce, "FROZEN_CHUNK_BUDGET_BYTES", 128 * v * 4)
    h = torch.randn(n, c, requires_grad=True)
    y = torch.randint(0, v, (n,))
    for trainable in (True, False):
        w = torch.randn(v, c, requires_grad=trainable)
        fused_linear_cross_entropy(h, w, y, backend="triton").backward()
    assert seen == [256, 128], seen
