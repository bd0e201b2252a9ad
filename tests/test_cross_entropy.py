"""cross_entropy (Triton row kernel) against F.cross_entropy / cross_entropy_ref in fp32.

Inputs are built once and cloned for the kernel, a same-precision reference (the 16-bit logits fed to the
fp32 reference; its gradient is rounded to the logits' dtype) and an fp32 reference; one upstream gradient is
fed to all. Rule: kernel error vs fp32 <= 2 * (same-precision reference error) + atol.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from triton_ops.cross_entropy import cross_entropy, cross_entropy_ref

# (N, V) on CPU through the interpreter (its block is 1024 columns), each with a reason:
CPU_SHAPES = [
    (1, 7),       # tiny: one row, V smaller than one block
    (9, 3001),    # odd V spanning three blocks with a ragged last one
    (4, 1024),    # V exactly one block (no masked lanes)
]
# Real vocabularies (GPU): Llama-2 32000, SmolLM 49152, Llama-3 128256, Qwen2 151936, Gemma 256000.
GPU_VOCABS = [32000, 49152, 128256, 151936, 256000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _close(name, out, ref32, ref_same=None, rel=1e-5, abs_=1e-6):
    """Assert max|out - ref32| <= 2 * max|ref_same - ref32| + atol; print where on failure.

    atol = rel * max|ref32| + abs_, plus one ulp of a 16-bit output at max|ref32|: two roundings of nearly
    equal fp32 values may land on neighbouring 16-bit numbers."""
    ulp = torch.finfo(out.dtype).eps if out.dtype in (torch.float16, torch.bfloat16) else 0.0
    out, ref32 = out.float(), ref32.float()
    ref_err = 0.0 if ref_same is None else (ref_same.float() - ref32).abs().max().item()
    atol = (rel + ulp) * ref32.abs().max().item() + abs_
    diff = (out - ref32).abs()
    err = diff.max().item() if diff.numel() else 0.0
    bound = 2 * ref_err + atol
    if not err <= bound:  # also catches NaN
        where = divmod(int(diff.argmax()), out.shape[-1]) if out.dim() == 2 else int(diff.reshape(-1).argmax())
        n_bad = int((diff > bound).sum())
        pytest.fail(f"{name}: max error {err:.3e} at {where} > bound {bound:.3e} (same-precision ref error "
                    f"{ref_err:.3e}, atol {atol:.3e}); {n_bad} of {diff.numel()} elements differ")


def _labels(n, v, device, ignore_frac=0.25):
    y = torch.randint(0, v, (n,), device=device)
    y[torch.rand(n, device=device) < ignore_frac] = -100
    y[0] = torch.randint(0, v, ())  # at least one counted token: F.cross_entropy's mean over none is NaN
    return y


def _check(logits, labels, dtype, reduction="mean", n_items=None, softcap=None, inplace=False, use_f=True):
    """Run kernel, same-precision ref and fp32 ref with one upstream grad; compare loss and gradient."""
    x_k = logits.to(dtype).detach().clone().requires_grad_()
    x_s = x_k.detach().clone().requires_grad_()
    x_32 = x_k.detach().float().requires_grad_()
    # inplace_backward needs non-leaf logits: multiply by 1 (as an lm_head output would be)
    loss = cross_entropy(x_k * 1 if inplace else x_k, labels, reduction=reduction, n_items=n_items,
                         softcap=softcap, inplace_backward=inplace, backend="triton")
    loss_s = cross_entropy_ref(x_s, labels, reduction=reduction, n_items=n_items, softcap=softcap)
    if use_f and softcap is None and n_items is None:
        loss_32 = F.cross_entropy(x_32, labels, ignore_index=-100, reduction=reduction)
    else:
        loss_32 = cross_entropy_ref(x_32, labels, reduction=reduction, n_items=n_items, softcap=softcap)
    assert loss.dtype == torch.float32 and loss.shape == loss_32.shape
    dy = torch.rand_like(loss_32) + 0.5
    (g,) = torch.autograd.grad(loss, x_k, dy)
    (g_s,) = torch.autograd.grad(loss_s, x_s, dy)
    (g_32,) = torch.autograd.grad(loss_32, x_32, dy)
    _close("loss", loss, loss_32, loss_s.detach())
    _close("grad", g, g_32, g_s)
    assert g.dtype == dtype


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_f_cross_entropy(shape, dtype, device):
    n, v = shape
    _check(torch.randn(n, v, device=device) * 4, _labels(n, v, device), dtype)


@pytest.mark.parametrize("programs", [1, 3])
def test_persistent_programs_walk_all_rows(programs, device, monkeypatch):
    # on CUDA the row kernel runs a few programs per SM, each walking rows pid, pid + nprog, ...: fewer programs
    # than rows (1 and 3 for 7 rows, a remainder for some) must still cover every row, forward and backward
    ce = importlib.import_module("triton_ops.cross_entropy")  # the package exports a function of that name
    monkeypatch.setattr(ce, "_programs", lambda n, logits: min(n, programs))
    n, v = 7, 2100
    _check(torch.randn(n, v, device=device) * 4, _labels(n, v, device), torch.float32, "none")
    _check(torch.randn(n, v, device=device) * 4, _labels(n, v, device), torch.bfloat16, softcap=5.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 7.5])
def test_reductions_and_softcap(reduction, softcap, device):
    n, v = 6, 1500
    _check(torch.randn(n, v, device=device) * 10, _labels(n, v, device), torch.float32, reduction,
           softcap=softcap)


@pytest.mark.parametrize("n_items", [3, "tensor"])
def test_n_items(n_items, device):
    n, v = 5, 700
    y = _labels(n, v, device)
    n_items = torch.tensor(13, device=device) if n_items == "tensor" else n_items
    _check(torch.randn(n, v, device=device), y, torch.bfloat16, "sum", n_items=n_items)
    # sum / n_items, exactly what a trainer accumulating micro-batches wants
    x = torch.randn(n, v, device=device)
    got = cross_entropy(x, y, n_items=n_items, backend="triton")
    want = F.cross_entropy(x, y, reduction="sum") / n_items
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero(reduction, device):
    x = torch.randn(4, 300, device=device, requires_grad=True)
    y = torch.full((4,), -100, device=device)
    loss = cross_entropy(x, y, reduction=reduction, backend="triton")
    assert torch.equal(loss, torch.zeros_like(loss)), loss  # F.cross_entropy's mean would be NaN here
    (g,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


def test_extreme_logits(device):
    n, v = 6, 2000
    x = torch.randn(n, v, device=device)
    x[:, ::7] = 1e4
    x[:, 3::7] = -1e4
    y = _labels(n, v, device, ignore_frac=0.0)
    y[0] = 0  # a label on a +1e4 logit
    y[1] = 3  # a label on a -1e4 logit: loss ~ 2e4
    for dtype in (torch.float32, torch.bfloat16):
        _check(x, y, dtype)
        _check(x, y, dtype, "none", softcap=30.0)


def test_inplace_backward_writes_into_logits(device):
    n, v = 5, 1100
    w = torch.randn(v, 16, device=device, requires_grad=True)
    h = torch.randn(n, 16, device=device)
    y = _labels(n, v, device)
    logits = h @ w.t()  # a non-leaf: matmul's backward needs h, not the logits
    ptr = logits.data_ptr()
    loss = cross_entropy(logits, y, inplace_backward=True, backend="triton")
    (g_w,) = torch.autograd.grad(loss, w)
    w32 = w.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(F.cross_entropy(h @ w32.t(), y), w32)
    _close("grad_w", g_w, g_ref)
    # the logits buffer now holds d loss / d logits (the memory was reused, nothing new of N*V allocated)
    x = (h @ w.detach().t()).requires_grad_()
    (g_x,) = torch.autograd.grad(F.cross_entropy(x, y), x)
    assert logits.data_ptr() == ptr
    _close("logits buffer", logits.detach(), g_x)
    with pytest.raises(ValueError, match="leaf"):
        cross_entropy(torch.randn(2, 5, device=device, requires_grad=True), y[:2], inplace_backward=True,
                      backend="triton")


def test_non_contiguous_rows_and_3d(device):
    b, t, v = 2, 3, 900
    wide = torch.randn(b, t, v + 37, device=device)
    x = wide[..., :v]  # row stride v + 37: strided rows read in place, no copy
    y = _labels(b * t, v, device).reshape(b, t)
    _check(x.reshape(b * t, v), y.reshape(-1), torch.float32, "none")
    loss = cross_entropy(x, y, reduction="none", backend="triton")
    assert loss.shape == (b, t)
    torch.testing.assert_close(loss, F.cross_entropy(x.reshape(-1, v), y.reshape(-1), reduction="none")
                               .reshape(b, t), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph(device):
    n, v = 6, 1100
    x = torch.randn(n, v, device=device)
    y = _labels(n, v, device)

    def step(a, lab):
        return cross_entropy(a * 1, lab, softcap=20.0, inplace_backward=True, backend="triton")

    xc = x.clone().requires_grad_()
    # aot_eager on CPU: the same tracing (fake impls, autograd formula, no graph break) without inductor's
    # C++ code generation for the small ops around ours; inductor on CUDA.
    loss = torch.compile(step, fullgraph=True, backend="inductor" if x.is_cuda else "aot_eager")(xc, y)
    (g,) = torch.autograd.grad(loss, xc)
    x32 = x.clone().requires_grad_()
    loss32 = cross_entropy_ref(x32, y, softcap=20.0)
    (g32,) = torch.autograd.grad(loss32, x32)
    _close("compiled loss", loss, loss32)
    _close("compiled grad", g, g32)


def test_auto_backend_and_errors(device):
    x = torch.randn(3, 50, device=device)
    y = _labels(3, 50, device, 0.0)
    if device == "cpu":  # "auto" on CPU is the reference itself
        assert torch.equal(cross_entropy(x, y), cross_entropy_ref(x, y))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        cross_entropy(x.double(), y, backend="triton")
    with pytest.raises(ValueError, match="int64 labels"):
        cross_entropy(x, y.int(), backend="triton")
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(x, y, reduction="avg")
    with pytest.raises(ValueError, match="n_items"):
        cross_entropy(x, y, reduction="none", n_items=4)
    bad = y.clone()
    bad[1] = 50  # == V: out of range -> NaN for that row, never an out-of-bounds read
    rows = cross_entropy(x, bad, reduction="none", backend="triton")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all(), rows


# ---------------------------------------------------------------- GPU: real vocabularies and sizes


@pytest.mark.gpu
@pytest.mark.parametrize("v", GPU_VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_vocabularies(v, dtype):
    n = 512
    _check(torch.randn(n, v, device="cuda") * 3, _labels(n, v, "cuda"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gpu_options(reduction):
    n, v = 2048, 128256
    x = torch.randn(n, v, device="cuda") * 5
    y = _labels(n, v, "cuda")
    _check(x, y, torch.bfloat16, reduction, softcap=30.0, inplace=True)
    if reduction != "none":
        _check(x, y, torch.float16, reduction, n_items=torch.tensor(5000, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_in_place_gradient_keeps_every_row_loss(dtype):
    # the row kernel overwrites the logits with the gradient right after reading the label's logit; a warp that
    # ran ahead once stored g[label] before a slower one read it (wrong losses for a few fp32 rows in 1024 on
    # an H100): the losses written together with an in-place gradient equal those of the loss-only launch
    from triton_ops.cross_entropy import ce_launch

    n, v = 1024, 128256
    for _ in range(3):
        z = torch.randn(n, v, device="cuda").to(dtype) * 4
        y = _labels(n, v, "cuda")
        loss0, lse0 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        ce_launch(z, y, -100, 0.0, loss0, lse0)
        loss1, lse1 = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
        ce_launch(z, y, -100, 0.0, loss1, lse1, grad=z, scale=torch.full((), 1.0 / n, device="cuda"),
                  rows="triton")  # (the CUDA kernel of csrc/ce_rows.cu: tests/test_ce_rows.py)
        bad = (loss1 != loss0).nonzero().flatten()
        assert bad.numel() == 0 and torch.equal(lse1, lse0), (
            f"{bad.numel()} rows' losses changed when the gradient was written in place: rows {bad[:8].tolist()}")


@pytest.mark.gpu
def test_gpu_offsets_past_2_31():
    # N * V = 16800 * 128256 = 2.15e9 > 2^31: row offsets must be int64, the last rows check that.
    n, v = 16800, 128256
    assert n * v > 2**31
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    y = _labels(n, v, "cuda")
    y[-1] = v - 1
    x_k = x.clone().requires_grad_()
    loss = cross_entropy(x_k, y, reduction="none", backend="triton")
    dy = torch.rand(n, device="cuda") + 0.5
    (g,) = torch.autograd.grad(loss, x_k, dy)
    del x_k
    tail = slice(n - 256, n)  # rows whose element offsets pass 2^31
    x32 = x[tail].float().requires_grad_()
    loss32 = F.cross_entropy(x32, y[tail], reduction="none")
    (g32,) = torch.autograd.grad(loss32, x32, dy[tail])
    _close("loss (last rows)", loss[tail], loss32)
    _close("grad (last rows)", g[tail], g32, g32.to(torch.bfloat16))
    head = slice(0, 256)
    x32 = x[head].float().requires_grad_()
    loss32 = F.cross_entropy(x32, y[head], reduction="none")
    (g32,) = torch.autograd.grad(loss32, x32, dy[head])
    _close("loss (first rows)", loss[head], loss32)
    _close("grad (first rows)", g[head], g32, g32.to(torch.bfloat16))
