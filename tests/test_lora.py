"""LoRA linear / QKV / MLP: forward and every gradient (dx, dA, dB) of the hand-written path against the
plain-torch composition in the same precision, peft's LoRA layer on the same weights, and the fp32 reference;
16-bit and NF4 bases, with and without dropout (same keep-mask fed to all) and bias."""
import pytest
import torch
import torch.nn.functional as Fn

import quant
from triton_ops.lora import (LoRAWeights, dropout_keep_mask, lora_linear, lora_mlp, lora_o, lora_qkv, lora_scale)

peft_lora = pytest.importorskip("peft.tuners.lora")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # x max |fp32 reference|: ~2 ulp

# (lead shape of x, K, N, R)
CPU_LINEAR = [
    ((37,), 70, 130, 1),      # odd T/K/N, rank 1
    ((37,), 70, 130, 64),     # rank 64 (close to K)
    ((2, 5), 64, 96, 8),      # tiny, batched (B, T, K) input
]
GPU_LINEAR = [
    ((1037,), 4100, 4100, 16),   # odd C = 4100, odd T
    ((2, 523), 4096, 14336, 1),  # Llama-3-8B up projection, rank 1
    ((777,), 11008, 4096, 64),   # Llama-2-7B down projection, rank 64
]
# (lead shape, C, F, R)
CPU_MLP = [((37,), 70, 130, 4), ((2, 3), 64, 96, 1)]   # odd / tiny batched
GPU_MLP = [((523,), 4100, 11008, 16), ((2, 1024), 4096, 14336, 64)]  # odd C and F; realistic Llama-3-8B
# (lead shape, C, H*D, KV*D, R)
CPU_QKV = [((37,), 70, 64, 16, 8)]
GPU_QKV = [((2, 1037), 4096, 4096, 1024, 16)]  # Llama-3-8B, odd T

VARIANTS = {  # name: (dropout p, bias)
    "plain": (0.0, False),
    "dropout+bias": (0.1, True),
}


def check(name, out, same, ref32, atol_rel):
    """Error vs fp32 <= 2 x (same-precision reference error) + small atol; on failure say where."""
    err = (out.float() - ref32.float()).abs()
    ref_err = (same.float() - ref32.float()).abs().max().item()
    bound = 2 * ref_err + atol_rel * max(1e-6, ref32.abs().max().item())
    if err.max().item() > bound:
        i = err.argmax().item()
        where = tuple(int(w) for w in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: max error {err.max().item():.3g} at {where} > bound {bound:.3g} "
                             f"(same-precision reference error {ref_err:.3g}); {int((err > bound).sum())} of "
                             f"{err.numel()} elements exceed it")


class _MaskDropout(torch.nn.Module):
    """Stands in for peft's nn.Dropout so peft applies the same keep-mask as everyone else."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1 - self.p)


def _make_proj(N, K, R, dtype, device, nf4, p, bias, lead, adapter=True):
    """Weights of one projection: (base for the op, dense W in dtype, dense W fp32, A, B, bias, keep-mask)."""
    w = torch.randn(N, K, device=device) / K**0.5
    if nf4:
        base = quant.quantize_nf4(w.to(dtype))
        W, W32 = base.dequantize(dtype), base.dequantize(torch.float32)
    else:
        base = w.to(dtype)
        W, W32 = base, base.float()
    A = (torch.randn(R, K, device=device) / K**0.5).to(dtype) if adapter else None
    B = (torch.randn(N, R, device=device) / R**0.5).to(dtype) if adapter else None
    b = (torch.randn(N, device=device) * 0.1).to(dtype) if bias else None
    keep = dropout_keep_mask(lead + (K,), p, device) if (adapter and p > 0) else None
    return dict(base=base, W=W, W32=W32, A=A, B=B, bias=b, keep=keep, p=p, scale=lora_scale(R, 2 * R))


def _spec(d):
    return LoRAWeights(d["base"], d["A"], d["B"], d["scale"], d["bias"], d["p"], d["keep"])


def _plain(x, d, W, cast):
    """The plain-torch composition (differentiable): x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ."""
    y = x @ W.t()
    if d["bias"] is not None:
        y = y + cast(d["bias"])
    if d["A"] is not None:
        xd = x if d["keep"] is None else x * d["keep"].to(x.dtype) / (1 - d["p"])
        y = y + d["scale"] * ((xd @ cast(d["A"]).t()) @ cast(d["B"]).t())
    return y


def _peft(d, dtype, device):
    """peft's LoRA Linear wrapping an nn.Linear that holds the same (dequantized) base weight and adapter."""
    N, K = d["W"].shape
    lin = torch.nn.Linear(K, N, bias=d["bias"] is not None, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(d["W"])
        if d["bias"] is not None:
            lin.bias.copy_(d["bias"])
    lin.requires_grad_(False)
    R = d["A"].shape[0]
    try:  # peft >= 0.18 takes the LoraConfig; older releases take the fields as keywords
        cfg = peft_lora.LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=d["p"])
        layer = peft_lora.Linear(lin, "default", config=cfg, r=R, lora_alpha=2 * R, lora_dropout=d["p"])
    except TypeError:
        layer = peft_lora.Linear(lin, "default", r=R, lora_alpha=2 * R, lora_dropout=d["p"])
    layer.to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(d["A"])
        layer.lora_B["default"].weight.copy_(d["B"])
    if d["keep"] is not None:
        layer.lora_dropout["default"] = _MaskDropout(d["keep"], d["p"])
    assert layer.scaling["default"] == d["scale"]
    return layer


def _grads(outs, inputs, dys):
    return torch.autograd.grad(outs, inputs, dys)


def _compare(tag, got, same, ref32, dtype, peft=None):
    for i, (a, b, c) in enumerate(zip(got, same, ref32)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{tag}[{i}]: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        check(f"{tag}[{i}] vs torch", a, b, c, ATOL[dtype])
        if peft is not None:
            check(f"{tag}[{i}] vs peft", a, peft[i], c, ATOL[dtype])


# ---- lora_linear -----------------------------------------------------------------------------------------

def _linear_case(lead, K, N, R, dtype, device, nf4, variant, backend, compile_=False):
    p, bias = VARIANTS[variant]
    d = _make_proj(N, K, R, dtype, device, nf4, p, bias, lead)
    x = torch.randn(lead + (K,), device=device).to(dtype)
    dy = torch.randn(lead + (N,), device=device).to(dtype)
    ident = lambda t: t  # noqa: E731

    # the op
    xk, Ak, Bk = (t.clone().requires_grad_() for t in (x, d["A"], d["B"]))

    def op(x_, A_, B_):
        return lora_linear(x_, d["base"], A_, B_, d["scale"], d["bias"], d["p"], dropout_mask=d["keep"],
                           backend=backend)
    fn = torch.compile(op, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager") if compile_ else op
    yk = fn(xk, Ak, Bk)
    got = (yk,) + _grads(yk, (xk, Ak, Bk), dy)
    # plain torch, same precision
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, d["A"], d["B"]))
    ys = _plain(xs, dict(d, A=As, B=Bs), d["W"], ident)
    same = (ys,) + _grads(ys, (xs, As, Bs), dy)
    # fp32 reference
    x32, A32, B32 = (t.float().requires_grad_() for t in (x, d["A"], d["B"]))
    y32 = _plain(x32, dict(d, A=A32, B=B32), d["W32"], lambda t: t.float())
    ref = (y32,) + _grads(y32, (x32, A32, B32), dy.float())
    # peft
    layer = _peft(d, dtype, device)
    xp = x.clone().requires_grad_()
    yp = layer(xp)
    pe = (yp,) + _grads(yp, (xp, layer.lora_A["default"].weight, layer.lora_B["default"].weight), dy)
    _compare(f"lora_linear {dtype} nf4={nf4} {variant} {lead}x{K}->{N} R={R} (y, dx, dA, dB)", got, same, ref, dtype, pe)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear(dtype, nf4, variant, device):
    _linear_case(*CPU_LINEAR[0], dtype, device, nf4, variant, backend="triton")


@pytest.mark.parametrize("case", CPU_LINEAR[1:])
def test_lora_linear_shapes(case, device):
    _linear_case(*case, torch.bfloat16, device, True, "dropout+bias", backend="triton")


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_lora_linear_reference_path(backend, device):
    """The CPU path (the fp32 reference through torch autograd) meets the same bar."""
    _linear_case((37,), 70, 130, 8, torch.bfloat16, device, True, "dropout+bias", backend=backend)


def test_lora_linear_compile(device):
    _linear_case((2, 5), 64, 96, 8, torch.float32, device, True, "dropout+bias", backend="triton", compile_=True)


def test_lora_o_is_lora_linear():
    assert lora_o is lora_linear


def test_noncontiguous_input(device):
    """x as a column slice of a wider buffer (row stride != K)."""
    d = _make_proj(96, 64, 8, torch.float32, device, False, 0.0, False, (37,))
    wide = torch.randn(37, 100, device=device)
    x = wide[:, 10:74]
    assert not x.is_contiguous()
    xk = x.clone().requires_grad_()  # leaf to take the grad of, same values
    y = lora_linear(x, d["base"], d["A"], d["B"], d["scale"], backend="triton")
    y2 = lora_linear(xk.contiguous(), d["base"], d["A"], d["B"], d["scale"], backend="triton")
    torch.testing.assert_close(y, y2)


def test_rslora_scale_and_errors(device):
    assert lora_scale(16, 32) == 2.0
    assert lora_scale(16, 32, use_rslora=True) == 8.0
    with pytest.raises(ValueError):
        lora_scale(0, 8)
    W = torch.randn(12, 10, device=device)
    x = torch.randn(3, 10, device=device)
    A, B = torch.randn(2, 10, device=device), torch.randn(12, 2, device=device)
    with pytest.raises(ValueError, match=r"input has 11 features"):
        lora_linear(torch.randn(3, 11, device=device), W, A, B, 1.0)
    with pytest.raises(ValueError, match=r"A \(R, K=10\) and B \(N=12, R\)"):
        lora_linear(x, W, B, A, 1.0)
    with pytest.raises(ValueError, match="both A and B"):
        lora_linear(x, W, A, None, 1.0)
    with pytest.raises(ValueError, match="dropout_mask must be a bool"):
        lora_linear(x, W, A, B, 1.0, dropout=0.1, dropout_mask=torch.ones(3, 10, device=device))
    with pytest.raises(TypeError, match="dequantize"):
        lora_linear(x, object(), A, B, 1.0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        lora_linear(x.long(), W, A, B, 1.0)


def test_dropout_off_in_eval(device):
    """training=False ignores dropout: output equals the dropout-free op."""
    d = _make_proj(96, 64, 8, torch.float32, device, False, 0.0, False, (5,))
    x = torch.randn(5, 64, device=device)
    a = lora_linear(x, d["base"], d["A"], d["B"], d["scale"], dropout=0.5, training=False, backend="triton")
    b = lora_linear(x, d["base"], d["A"], d["B"], d["scale"], backend="triton")
    assert torch.equal(a, b)


# ---- lora_qkv --------------------------------------------------------------------------------------------

def _qkv_case(lead, C, NQ, NKV, R, dtype, device, nf4, backend="triton", compile_=False, q_dropout=0.1):
    # q_dropout > 0: q and k run their adapters separately; 0: they share the batched adapter GEMMs
    q = _make_proj(NQ, C, R, dtype, device, nf4, q_dropout, False, lead)
    k = _make_proj(NKV, C, R, dtype, device, nf4, 0.0, True, lead)           # bias
    v = _make_proj(NKV, C, R, dtype, device, nf4, 0.0, False, lead, adapter=False)  # no adapter
    x = torch.randn(lead + (C,), device=device).to(dtype)
    dys = tuple(torch.randn(lead + (n,), device=device).to(dtype) for n in (NQ, NKV, NKV))
    ps = (q, k, v)

    def run(x_, ds, Ws, f):
        outs = f(x_, ds, Ws)
        leaves = [x_] + [t for dd in ds if dd["A"] is not None for t in (dd["A"], dd["B"])]
        return tuple(outs) + _grads(outs, leaves, dys if outs[0].dtype == dtype else tuple(t.float() for t in dys))

    def leafs(cast):
        return [dict(dd, A=None if dd["A"] is None else cast(dd["A"]).requires_grad_(),
                     B=None if dd["B"] is None else cast(dd["B"]).requires_grad_()) for dd in ps]

    def op(x_, ds, Ws):
        return lora_qkv(x_, *[_spec(dd) for dd in ds], backend=backend)
    fop = torch.compile(op, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager") if compile_ else op
    got = run(x.clone().requires_grad_(), leafs(torch.clone), None, fop)
    same = run(x.clone().requires_grad_(), leafs(torch.clone), [dd["W"] for dd in ps],
               lambda x_, ds, Ws: tuple(_plain(x_, dd, W, lambda t: t) for dd, W in zip(ds, Ws)))
    ref = run(x.float().requires_grad_(), leafs(lambda t: t.float()), [dd["W32"] for dd in ps],
              lambda x_, ds, Ws: tuple(_plain(x_, dd, W, lambda t: t.float()) for dd, W in zip(ds, Ws)))
    _compare(f"lora_qkv {dtype} nf4={nf4} q_dropout={q_dropout} {lead}x{C} (Q, K, V, dx, dAq, dBq, dAk, dBk)",
             got, same, ref, dtype)


@pytest.mark.parametrize("q_dropout", [0.1, 0.0], ids=["separate", "batched"])
@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CPU_QKV)
def test_lora_qkv(case, dtype, nf4, q_dropout, device):
    _qkv_case(*case, dtype, device, nf4, q_dropout=q_dropout)


@pytest.mark.parametrize("q_dropout", [0.1, 0.0], ids=["separate", "batched"])
def test_lora_qkv_input_without_grad(q_dropout, device):
    """x that needs no gradient (a frozen first layer): dx is skipped, adapter grads are unchanged."""
    d = [_make_proj(n, 64, 4, torch.float32, device, False, p, False, (9,)) for n, p in ((32, q_dropout), (16, 0.0))]
    x = torch.randn(9, 64, device=device)
    dys = [torch.randn(9, dd["W"].shape[0], device=device) for dd in d]
    leaves = [t for dd in d for t in (dd["A"], dd["B"])]
    for t in leaves:
        t.requires_grad_()
    a = torch.autograd.grad(lora_qkv(x, *[_spec(dd) for dd in d], backend="triton"), leaves, dys)
    xg = x.clone().requires_grad_()
    b = torch.autograd.grad(lora_qkv(xg, *[_spec(dd) for dd in d], backend="triton"), [xg] + leaves, dys)[1:]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_lora_qkv_compile(device):
    _qkv_case((2, 5), 64, 64, 16, 4, torch.float32, device, True, compile_=True)


# ---- lora_mlp --------------------------------------------------------------------------------------------

MLP_VARIANTS = {  # adapters on (gate, up, down), dropout on gate and down, bias on up
    "all+dropout+bias": ((True, True, True), 0.1, True),
    "down only": ((False, False, True), 0.0, False),
    "no down adapter": ((True, True, False), 0.0, False),
    "all plain": ((True, True, True), 0.0, False),
}


def _mlp_case(lead, C, F, R, dtype, device, nf4, variant, backend="triton", compile_=False):
    adapters, p, bias = MLP_VARIANTS[variant]
    g = _make_proj(F, C, R, dtype, device, nf4, p, False, lead, adapters[0])
    u = _make_proj(F, C, R, dtype, device, nf4, 0.0, bias, lead, adapters[1])
    dn = _make_proj(C, F, R, dtype, device, nf4, p, False, lead, adapters[2])  # keep-mask over (..., F)
    x = torch.randn(lead + (C,), device=device).to(dtype)
    dy = torch.randn(lead + (C,), device=device).to(dtype)
    ps = (g, u, dn)

    def leafs(cast):
        return [dict(dd, A=None if dd["A"] is None else cast(dd["A"]).requires_grad_(),
                     B=None if dd["B"] is None else cast(dd["B"]).requires_grad_()) for dd in ps]

    def run(x_, ds, f, dy_):
        y = f(x_, ds)
        leaves = [x_] + [t for dd in ds if dd["A"] is not None for t in (dd["A"], dd["B"])]
        return (y,) + _grads(y, leaves, dy_)

    def plain(Wkey, cast):
        def f(x_, ds):
            h = Fn.silu(_plain(x_, ds[0], ds[0][Wkey], cast)) * _plain(x_, ds[1], ds[1][Wkey], cast)
            return _plain(h, ds[2], ds[2][Wkey], cast)
        return f

    def op(x_, ds):
        return lora_mlp(x_, *[_spec(dd) for dd in ds], backend=backend)
    fop = torch.compile(op, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager") if compile_ else op
    got = run(x.clone().requires_grad_(), leafs(torch.clone), fop, dy)
    same = run(x.clone().requires_grad_(), leafs(torch.clone), plain("W", lambda t: t), dy)
    ref = run(x.float().requires_grad_(), leafs(lambda t: t.float()), plain("W32", lambda t: t.float()), dy.float())
    pe = None
    if all(adapters):  # peft: three LoRA Linears composed as the MLP
        layers = [_peft(dd, dtype, device) for dd in ps]
        xp = x.clone().requires_grad_()
        yp = layers[2](Fn.silu(layers[0](xp)) * layers[1](xp))
        leaves = [xp] + [t for L in layers for t in (L.lora_A["default"].weight, L.lora_B["default"].weight)]
        pe = (yp,) + _grads(yp, leaves, dy)
    _compare(f"lora_mlp {dtype} nf4={nf4} {variant} {lead}x{C} F={F} R={R} (y, dx, dA/dB...)", got, same, ref, dtype, pe)


@pytest.mark.parametrize("variant", list(MLP_VARIANTS))
@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
def test_lora_mlp(nf4, variant, device):
    _mlp_case(*CPU_MLP[0], torch.bfloat16, device, nf4, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_mlp_dtypes(dtype, device):
    _mlp_case(*CPU_MLP[0], dtype, device, True, "all+dropout+bias")


def test_lora_mlp_small_batched(device):
    _mlp_case(*CPU_MLP[1], torch.bfloat16, device, True, "all+dropout+bias")


def _count_folds(monkeypatch):
    """Force the adapter folds on any device; returns {name: calls} of the two folded paths."""
    import triton_ops.lora as tlora

    calls = {"gate_up": 0, "dh": 0}
    monkeypatch.setattr(tlora, "FOLD_ON_CPU", True)
    for name, attr in (("gate_up", "_gate_up_folded"), ("dh", "_dh_folded")):
        fn = getattr(tlora, attr)

        def counted(*a, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*a)
        monkeypatch.setattr(tlora, attr, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["all plain", "no down adapter", "all+dropout+bias"])
def test_lora_mlp_folded_adapters(variant, dtype, device, monkeypatch):
    """Adapters folded into the base GEMMs (gate/up forward over K + R, dh over C + R): outputs and every grad
    within the tolerance rule of the fp32 reference and peft, on odd token counts; the folds run exactly where
    allowed (not with dropout or bias, not on 16-bit bases, not with a rank that is not a multiple of 8)."""
    calls = _count_folds(monkeypatch)
    _mlp_case((37,), 128, 192, 8, dtype, device, True, variant)
    adapters, p, bias = MLP_VARIANTS[variant]
    assert calls == {"gate_up": int(p == 0 and not bias), "dh": int(adapters[2] and p == 0)}, calls
    _mlp_case((2, 5), 64, 128, 16, dtype, device, False, variant)  # 16-bit bases: nothing is folded
    _mlp_case((37,), 128, 192, 4, dtype, device, True, variant)    # rank 4: nothing is folded
    assert calls == {"gate_up": int(p == 0 and not bias), "dh": int(adapters[2] and p == 0)}, calls


def test_lora_mlp_fold_frees_dy_copy_before_dx(device, monkeypatch):
    """The dh fold's dyB is a view of its (M, C + R) [dy | dyB] buffer; backward must drop it once down's adapter
    grads are done, not hold the whole buffer through the gate/up dx GEMMs (the MLP backward's peak)."""
    import weakref

    import triton_ops.lora as tlora

    calls = _count_folds(monkeypatch)
    folded, dx_base = tlora._dh_folded, tlora._dx_base
    refs, alive = [], []

    def dh_folded(*a):
        dh, dyB = folded(*a)
        assert dyB._base is not None, "the fold's dyB is expected to be a view of [dy | dyB]"
        refs.append(weakref.ref(dyB._base))
        return dh, dyB

    def counted_dx_base(*a):
        alive.append(bool(refs) and refs[-1]() is not None)
        return dx_base(*a)

    monkeypatch.setattr(tlora, "_dh_folded", dh_folded)
    monkeypatch.setattr(tlora, "_dx_base", counted_dx_base)
    _mlp_case((37,), 128, 192, 8, torch.float32, device, True, "all plain")
    assert calls["gate_up"] == 1 and refs, calls
    assert alive and not any(alive), f"[dy | dyB] still alive at the gate/up dx GEMMs: {alive}"


def test_lora_mlp_fold_one_dense_weight_at_a_time(device, monkeypatch):
    """The gate/up fold dequantizes each NF4 weight into its own [s·B | W] / [W | s·B] buffer; gate's must be freed
    before up's is allocated (as the unfolded path frees each dense weight after its GEMM), not held while it is
    (one more (F, K) dense weight at the forward's peak)."""
    import weakref

    import triton_ops.lora as tlora

    calls = _count_folds(monkeypatch)
    dense_into, empty = tlora._dense_into, torch.empty
    refs, alive = [], []

    def counted(base, out):
        refs.append(weakref.ref(out._base if out._base is not None else out))
        return dense_into(base, out)

    def watched_empty(*a, **k):
        if len(refs) == 1 and not alive:  # the first allocation after gate's dequantize: up's buffer
            alive.append(refs[0]() is not None)
        return empty(*a, **k)

    monkeypatch.setattr(tlora, "_dense_into", counted)
    monkeypatch.setattr(torch, "empty", watched_empty)
    _mlp_case((37,), 128, 192, 8, torch.float32, device, True, "no down adapter")
    assert calls == {"gate_up": 1, "dh": 0} and len(refs) == 2, (calls, len(refs))
    assert alive == [False], "gate's [s·B | W] buffer still alive when up's buffer is allocated"


def test_lora_mlp_fold_switch_and_tiles(device, monkeypatch):
    """FOLD_ADAPTERS off folds nothing; inside weight_cache (the tiled MLP) nothing is folded either."""
    import triton_ops.lora as tlora

    calls = _count_folds(monkeypatch)
    monkeypatch.setattr(tlora, "FOLD_ADAPTERS", False)
    _mlp_case((37,), 128, 192, 8, torch.float32, device, True, "all plain")
    monkeypatch.setattr(tlora, "FOLD_ADAPTERS", True)
    with tlora.weight_cache():
        _mlp_case((37,), 128, 192, 8, torch.float32, device, True, "all plain")
    assert calls == {"gate_up": 0, "dh": 0}, calls


def test_lora_mlp_reference_path(device):
    _mlp_case(*CPU_MLP[0], torch.bfloat16, device, True, "all+dropout+bias", backend="torch")


def test_lora_mlp_compile(device):
    _mlp_case((2, 3), 64, 96, 4, torch.float32, device, True, "all+dropout+bias", compile_=True)


def test_lora_mlp_compile_keeps_the_plain_ops_where_the_fold_applies(device, monkeypatch):
    """A foldable MLP (NF4, rank 8, no dropout) under torch.compile: the traced graph runs the unfolded ops (the
    fold launches raw kernels into slices of its own buffers), and the results meet the tolerance rule; eagerly
    the same case folds."""
    calls = _count_folds(monkeypatch)
    _mlp_case((2, 5), 128, 192, 8, torch.float32, device, True, "all plain", compile_=True)
    assert calls == {"gate_up": 0, "dh": 0}, calls
    _mlp_case((2, 5), 128, 192, 8, torch.float32, device, True, "all plain")
    assert calls == {"gate_up": 1, "dh": 1}, calls


def test_lora_mlp_dh_fold_needs_whole_16_bytes_of_columns(device, monkeypatch):
    """dh is folded only where dyB's column offset in [dy | dyB], C, is a multiple of 8 elements. Gate and up
    fold nowhere here (their K = C is not whole 64-element NF4 blocks); down's weight (C, F = 192) is."""
    calls = _count_folds(monkeypatch)
    _mlp_case((37,), 68, 192, 8, torch.float32, device, True, "all plain")    # C % 8 == 4: not folded
    assert calls == {"gate_up": 0, "dh": 0}, calls
    _mlp_case((37,), 136, 192, 8, torch.float32, device, True, "all plain")   # C % 8 == 0: folded
    assert calls == {"gate_up": 0, "dh": 1}, calls


def test_lora_mlp_backward_runs_once(device):
    """The in-place backward reuses the saved pre-activations; a second backward must refuse, not lie."""
    d = [_make_proj(n, k, 4, torch.float32, device, False, 0.0, False, (5,)) for n, k in ((96, 64), (96, 64), (64, 96))]
    x = torch.randn(5, 64, device=device, requires_grad=True)
    y = lora_mlp(x, *[_spec(dd) for dd in d], backend="triton")
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---- output_unused: a recomputation that discards the output ---------------------------------------------

def _count_calls(monkeypatch, name):
    import triton_ops.lora as tlora

    calls, fn = [], getattr(tlora, name)

    def counting(*a, **k):
        calls.append(a[0])
        return fn(*a, **k)
    monkeypatch.setattr(tlora, name, counting)
    return calls


@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
def test_lora_mlp_output_unused_saves_the_same_and_skips_swiglu_and_down(nf4, device, monkeypatch):
    """Under output_unused(down's base): the same saved tensors (bit for bit) and gradients, an uninitialized
    output of the right shape, and neither the swiglu forward nor down's dequantize run."""
    from triton_ops.lora import output_unused

    lead, C, F, R = CPU_MLP[1]
    adapters, p, bias = MLP_VARIANTS["all+dropout+bias"]
    ds = [_make_proj(F, C, R, torch.bfloat16, device, nf4, p, False, lead), _make_proj(F, C, R, torch.bfloat16, device,
          nf4, 0.0, bias, lead), _make_proj(C, F, R, torch.bfloat16, device, nf4, p, False, lead)]
    x = torch.randn(lead + (C,), device=device, dtype=torch.bfloat16)
    dy = torch.randn(lead + (C,), device=device, dtype=torch.bfloat16)
    swiglu_calls = _count_calls(monkeypatch, "_swiglu_fwd_op")
    dense_calls = _count_calls(monkeypatch, "_dense")

    def run(skip):
        leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for dd in ds for t in (dd["A"], dd["B"])]
        specs = [LoRAWeights(dd["base"], leaves[1 + 2 * i], leaves[2 + 2 * i], dd["scale"], dd["bias"], dd["p"],
                             dd["keep"]) for i, dd in enumerate(ds)]
        swiglu_calls.clear(), dense_calls.clear()
        if skip:
            with output_unused(ds[2]["base"]):
                y = lora_mlp(leaves[0], *specs, backend="triton")
        else:
            y = lora_mlp(leaves[0], *specs, backend="triton")
        ran = (len(swiglu_calls), sum(b is ds[2]["base"] for b in dense_calls))
        saved = [t.clone() if t is not None else None for t in y.grad_fn.saved_tensors]
        xa_down = y.grad_fn.saved_tensors[-1]
        return y, saved, ran, torch.autograd.grad(y, leaves, dy), (xa_down.stride(), xa_down.shape, xa_down.dtype)

    y0, saved0, ran0, g0, xa0 = run(False)
    y1, saved1, ran1, g1, xa1 = run(True)
    assert ran0 == (1, 1) and ran1 == (0, 0), (ran0, ran1)
    assert (y1.shape, y1.dtype, y1.device, y1.stride()) == (y0.shape, y0.dtype, y0.device, y0.stride())
    assert len(saved0) == len(saved1)
    # the last saved tensor is down's xa = drop(h)·A_dᵀ: it exists only when the forward ran down (the
    # backward computes it from the h the SwiGLU backward kernel writes); a stand-in of its shape is saved
    assert xa0[0] != (0, 0) and xa1[0] == (0, 0) and xa0[1:] == xa1[1:], (xa0, xa1)
    for i, (a, b) in enumerate(zip(saved0[:-1], saved1[:-1])):
        assert (a is None and b is None) or torch.equal(a, b), f"saved tensor {i} differs"
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert torch.equal(a, b), f"grad {i}: max diff {(a.float() - b.float()).abs().max().item():.3g}"


@pytest.mark.parametrize("q_dropout", [0.1, 0.0], ids=["separate", "batched"])
def test_lora_qkv_output_unused_skips_only_that_projection(q_dropout, device, monkeypatch):
    """Only the projection whose base is flagged loses its output; the others (sharing the batched adapter GEMM
    or not) and every gradient are bit-identical."""
    from triton_ops.lora import output_unused

    lead, C, R = (9,), 64, 4
    ds = [_make_proj(n, C, R, torch.float32, device, False, pq, False, lead) for n, pq in ((32, q_dropout), (16, 0.0),
                                                                                        (16, 0.0))]
    x = torch.randn(lead + (C,), device=device)
    dys = [torch.randn(lead + (dd["W"].shape[0],), device=device) for dd in ds]
    dense_calls = _count_calls(monkeypatch, "_dense")

    def run(flag):
        leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for dd in ds for t in (dd["A"], dd["B"])]
        specs = [LoRAWeights(dd["base"], leaves[1 + 2 * i], leaves[2 + 2 * i], dd["scale"], None, dd["p"], dd["keep"])
                 for i, dd in enumerate(ds)]
        dense_calls.clear()
        if flag is None:
            outs = lora_qkv(leaves[0], *specs, backend="triton")
        else:
            with output_unused(flag):
                outs = lora_qkv(leaves[0], *specs, backend="triton")
        ran = [sum(b is dd["base"] for b in dense_calls) for dd in ds]
        saved = [t.clone() if t is not None else None for t in outs[0].grad_fn.saved_tensors]
        return outs, saved, ran, torch.autograd.grad(outs, leaves, dys)

    o0, s0, r0, g0 = run(None)
    o1, s1, r1, g1 = run(ds[1]["base"])
    assert r0 == [1, 1, 1] and r1 == [1, 0, 1], (r0, r1)
    assert torch.equal(o0[0], o1[0]) and torch.equal(o0[2], o1[2])
    assert o1[1].shape == o0[1].shape and o1[1].dtype == o0[1].dtype
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(s0, s1))
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert torch.equal(a, b), f"grad {i}: max diff {(a - b).abs().max().item():.3g}"


def test_output_unused_nests_and_resets_after_an_error():
    import triton_ops.lora as tlora

    a, b = object(), object()
    with pytest.raises(ValueError):
        with tlora.output_unused(a):
            assert tlora._output_unused(a) and not tlora._output_unused(b)
            with tlora.output_unused(b):
                assert tlora._output_unused(b) and not tlora._output_unused(a)
            assert tlora._output_unused(a)
            with tlora.output_unused(a, None, b):  # several bases at once (None ignored)
                assert tlora._output_unused(a) and tlora._output_unused(b) and not tlora._output_unused(None)
            raise ValueError
    assert not tlora._output_unused(a) and getattr(tlora._unused, "bases", ()) == ()


# ---- fewer memory passes: saved xa, the one-pass adapter update ------------------------------------------

class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (aten op name, beta) of every op run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((func.overloadpacket.__name__, kwargs.get("beta", 1)))
        return func(*args, **kwargs)

    def count(self, *names):
        return sum(n in names for n, _ in self.ops)


def _passes_case(op, dtype, device, nf4, variant):
    """Builds one case of `op` ("linear", "qkv", "mlp"); returns run() -> (outputs + grads, mm count in backward)."""
    lead, C, R = (2, 9), 48, 4
    if op == "linear":
        p, bias = VARIANTS[variant]
        ds = [_make_proj(40, C, R, dtype, device, nf4, p, bias, lead)]
    elif op == "qkv":  # q with dropout (alone) or not (batched with k); k with bias; v without adapter
        ds = [_make_proj(32, C, R, dtype, device, nf4, 0.1 if variant == "separate" else 0.0, False, lead),
              _make_proj(16, C, R, dtype, device, nf4, 0.0, True, lead),
              _make_proj(16, C, R, dtype, device, nf4, 0.0, False, lead, adapter=False)]
    else:
        adapters, p, bias = MLP_VARIANTS[variant]
        F = 72
        ds = [_make_proj(F, C, R, dtype, device, nf4, p, False, lead, adapters[0]),
              _make_proj(F, C, R, dtype, device, nf4, 0.0, bias, lead, adapters[1]),
              _make_proj(C, F, R, dtype, device, nf4, p, False, lead, adapters[2])]
    x = torch.randn(lead + (C,), device=device).to(dtype)
    n_out = [dd["W"].shape[0] for dd in ds] if op != "mlp" else [C]
    dys = [torch.randn(lead + (n,), device=device).to(dtype) for n in n_out]

    def run(ref=False):
        """(outputs + grads, backward's GEMM count, every op's (name, beta)); ref: the fp32 reference path."""
        cast = (lambda t: t.float()) if ref else torch.clone
        leaves = [cast(x).requires_grad_()] + [cast(t).requires_grad_() for dd in ds if dd["A"] is not None
                                               for t in (dd["A"], dd["B"])]
        it = iter(leaves[1:])
        specs = [_spec(dict(dd, A=next(it), B=next(it))) if dd["A"] is not None else _spec(dd) for dd in ds]
        backend = "torch" if ref else "triton"
        with _OpLog() as fwd:
            outs = lora_mlp(leaves[0], *specs, backend=backend) if op == "mlp" else \
                lora_qkv(leaves[0], *specs, backend=backend)
        outs = (outs,) if op == "mlp" else tuple(outs)
        with _OpLog() as bwd:
            grads = torch.autograd.grad(outs, leaves, [cast(t) for t in dys])
        return outs + grads, bwd.count("mm", "addmm", "addmm_"), fwd.ops + bwd.ops
    return run


PASSES_CASES = [("linear", "plain"), ("linear", "dropout+bias"), ("qkv", "separate"), ("qkv", "batched"),
                ("mlp", "all+dropout+bias"), ("mlp", "down only"), ("mlp", "no down adapter")]
# GEMMs the saved xa removes from backward: one per adapter run alone, one per batched group
XA_GEMMS = {("linear", "plain"): 1, ("linear", "dropout+bias"): 1, ("qkv", "separate"): 2, ("qkv", "batched"): 1,
            ("mlp", "all+dropout+bias"): 3, ("mlp", "down only"): 1, ("mlp", "no down adapter"): 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PASSES_CASES, ids=["-".join(c) for c in PASSES_CASES])
def test_saved_xa_is_bit_identical_to_recomputing_it(case, dtype, device, monkeypatch):
    """SAVE_XA (xa = drop(x)·Aᵀ kept from the forward) gives the same bits as recomputing it in backward, and
    backward runs that many fewer GEMMs."""
    import triton_ops.lora as tlora

    run = _passes_case(case[0], dtype, device, dtype == torch.bfloat16, case[1])
    monkeypatch.setattr(tlora, "SAVE_XA", False)
    recomputed, mm_recomputed, _ = run()
    monkeypatch.setattr(tlora, "SAVE_XA", True)
    saved, mm_saved, _ = run()
    for i, (a, b) in enumerate(zip(saved, recomputed)):
        assert a.dtype == b.dtype and torch.equal(a, b), \
            f"{case} {dtype} output/grad {i}: max diff {(a.float() - b.float()).abs().max().item():.3g}, " \
            f"{int((a != b).sum())} of {a.numel()} differ"
    assert mm_recomputed - mm_saved == XA_GEMMS[case], (mm_recomputed, mm_saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["all+dropout+bias", "down only"])
def test_down_xa_under_output_unused_is_computed_in_backward(variant, dtype, device, monkeypatch):
    """Under output_unused(down's base) the forward never forms h, so down's xa is computed in backward from the
    h the SwiGLU backward kernel writes: gradients bit-identical to the run that saved it, and to SAVE_XA off."""
    import triton_ops.lora as tlora

    adapters, p, bias = MLP_VARIANTS[variant]
    lead, C, F, R = (2, 9), 48, 72, 4
    ds = [_make_proj(F, C, R, dtype, device, False, p, False, lead, adapters[0]),
          _make_proj(F, C, R, dtype, device, False, 0.0, bias, lead, adapters[1]),
          _make_proj(C, F, R, dtype, device, False, p, False, lead, adapters[2])]
    x = torch.randn(lead + (C,), device=device).to(dtype)
    dy = torch.randn(lead + (C,), device=device).to(dtype)

    def run(skip):
        leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for dd in ds if dd["A"] is not None
                                                 for t in (dd["A"], dd["B"])]
        it = iter(leaves[1:])
        specs = [_spec(dict(dd, A=next(it), B=next(it))) if dd["A"] is not None else _spec(dd) for dd in ds]
        if skip:
            with tlora.output_unused(ds[2]["base"]):
                y = lora_mlp(leaves[0], *specs, backend="triton")
        else:
            y = lora_mlp(leaves[0], *specs, backend="triton")
        xa_down = y.grad_fn.saved_tensors[-1]
        if tlora.SAVE_XA:  # a stand-in of down's xa under the flag, the real one without
            assert (xa_down.stride() == (0, 0)) == skip, xa_down.stride()
        with _OpLog() as log:
            grads = torch.autograd.grad(y, leaves, dy)
        return grads, log.count("mm", "addmm", "addmm_")

    saved, mm_saved = run(False)
    skipped, mm_skipped = run(True)
    monkeypatch.setattr(tlora, "SAVE_XA", False)
    recomputed, _ = run(False)
    assert mm_skipped == mm_saved + 1, (mm_skipped, mm_saved)  # the one GEMM drop(h)·A_dᵀ
    for i, (a, b, c) in enumerate(zip(skipped, saved, recomputed)):
        d_saved, d_recomputed = ((a.float() - t.float()).abs().max().item() for t in (b, c))
        assert torch.equal(a, b) and torch.equal(a, c), f"grad {i}: max diff {d_saved:.3g} / {d_recomputed:.3g}"


def _force_rank_update_kernel(monkeypatch):
    """The adapter terms through triton_ops.rank_update's kernel on any device (CPU: Triton's interpreter);
    returns the list that records one entry per kernel launch."""
    import triton_ops.rank_update as ru

    launches, launch = [], ru._launch
    monkeypatch.setattr(ru, "uses_kernel", lambda y, R: 0 < R <= ru.MAX_R and y.numel() > 0)
    monkeypatch.setattr(ru, "_launch", lambda *a, **k: (launches.append(a[0].shape), launch(*a, **k))[1])
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", PASSES_CASES, ids=["-".join(c) for c in PASSES_CASES])
def test_rank_update_kernel_meets_the_tolerance_rule(case, dtype, device, monkeypatch):
    """Adapter terms added by the one-pass kernel (forward outputs, dx, dh): outputs and grads within the
    tolerance rule of the fp32 reference (the case builders), and of the addmm_ path on the same inputs; the
    kernel runs (as often as addmm_ runs without it) and no K=R addmm_ is left."""
    import triton_ops.lora as tlora

    launches = _force_rank_update_kernel(monkeypatch)
    op, variant = case
    if op == "linear":
        _linear_case((37,), 70, 130, 8, dtype, device, True, variant, backend="triton")
    elif op == "qkv":
        _qkv_case(*CPU_QKV[0], dtype, device, True, q_dropout=0.1 if variant == "separate" else 0.0)
    else:
        _mlp_case(*CPU_MLP[0], dtype, device, True, variant)
    run = _passes_case(op, dtype, device, True, variant)
    launches.clear()
    kern, _, ops_k = run()
    n_kernel = len(launches)
    monkeypatch.setattr(tlora, "RANK_UPDATE_KERNEL", False)
    addmm, _, ops_a = run()
    ref, _, _ = run(ref=True)
    assert len(kern) == len(addmm) == len(ref)
    for i, (a, b, c) in enumerate(zip(kern, addmm, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        check(f"{case} {dtype} rank-update kernel vs addmm_ [{i}]", a, b, c, ATOL[dtype])
    assert n_kernel > 0 and n_kernel + ops_k.count(("addmm_", 1)) == ops_a.count(("addmm_", 1)), (ops_k, ops_a)


def test_rank_update_kernel_compile(device, monkeypatch):
    """torch.compile over the Functions with the kernel's custom op inside (it runs, and the results meet the
    tolerance rule)."""
    launches = _force_rank_update_kernel(monkeypatch)
    _mlp_case((2, 3), 64, 96, 4, torch.float32, device, True, "all+dropout+bias", compile_=True)
    _qkv_case((2, 5), 64, 64, 16, 4, torch.float32, device, True, compile_=True, q_dropout=0.0)
    assert launches


def test_rank_update_switch_reads_the_environment():
    """On unless MINITRAIN_LORA_RANK_UPDATE=0 at import (one fresh interpreter for the off case)."""
    import os
    import subprocess
    import sys

    import triton_ops.lora as tlora

    assert tlora.RANK_UPDATE_KERNEL == (os.environ.get("MINITRAIN_LORA_RANK_UPDATE", "1") != "0")
    out = subprocess.run([sys.executable, "-c", "import triton_ops.lora as t; print(t.RANK_UPDATE_KERNEL)"],
                         capture_output=True, text=True, env=dict(os.environ, MINITRAIN_LORA_RANK_UPDATE="0"))
    assert out.stdout.strip() == "False", (out.stdout, out.stderr[-2000:])


# ---- GPU: real shapes ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("nf4", [False, True], ids=["16bit", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_gpu(dtype, nf4, variant):
    _linear_case(*GPU_LINEAR[0], dtype, "cuda", nf4, variant, backend="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_LINEAR[1:])
def test_lora_linear_gpu_shapes(case):
    _linear_case(*case, torch.bfloat16, "cuda", True, "dropout+bias", backend="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("q_dropout", [0.1, 0.0], ids=["separate", "batched"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_qkv_gpu(dtype, q_dropout):
    _qkv_case(*GPU_QKV[0], dtype, "cuda", True, backend="auto", q_dropout=q_dropout)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(MLP_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_mlp_gpu(dtype, variant):
    _mlp_case(*GPU_MLP[0], dtype, "cuda", True, variant, backend="auto")


@pytest.mark.gpu
def test_lora_mlp_gpu_llama():
    _mlp_case(*GPU_MLP[1], torch.bfloat16, "cuda", True, "all+dropout+bias", backend="auto")


@pytest.mark.gpu
def test_compile_gpu():
    """Inductor on the GPU around the Functions at real shapes (the CPU tests trace the same graphs with
    aot_eager)."""
    _mlp_case((523,), 4096, 14336, 16, torch.bfloat16, "cuda", True, "all+dropout+bias", backend="auto",
              compile_=True)
    _qkv_case((2, 523), 4096, 4096, 1024, 16, torch.bfloat16, "cuda", True, backend="auto", compile_=True,
              q_dropout=0.0)
    _linear_case((1037,), 4100, 4100, 16, torch.bfloat16, "cuda", True, "plain", backend="auto", compile_=True)


@pytest.mark.gpu
def test_lora_mlp_saves_only_x_and_preactivations():
    """After forward, the live memory grows by y + x-independent saves only: g and u (T x F each), never h or a
    dequantized (F x C) weight."""
    T, C, F, R = 1024, 4096, 14336, 16
    ds = [_make_proj(n, k, R, torch.bfloat16, "cuda", True, 0.0, False, (T,)) for n, k in ((F, C), (F, C), (C, F))]
    specs = [_spec(dd) for dd in ds]
    for dd in ds:
        dd["A"].requires_grad_()
        dd["W"] = dd["W32"] = None
    torch.cuda.empty_cache()
    x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    before = torch.cuda.memory_allocated()
    y = lora_mlp(x, *specs)
    grown = torch.cuda.memory_allocated() - before
    expected = y.numel() * 2 + 2 * T * F * 2 + 3 * T * R * 2  # y + g + u + the three adapters' xa (T, R)
    assert grown <= expected + 2**20, f"forward kept {grown / 2**20:.1f} MiB, expected {expected / 2**20:.1f} MiB"
    y.sum().backward()
    assert ds[0]["A"].grad is not None and x.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", [True, False], ids=["rank-update", "addmm"])
@pytest.mark.parametrize("block", ["mlp", "qkv-batched", "qkv-separate"])
def test_lora_blocks_gpu_llama(block, kernel, monkeypatch):
    """The 8B QLoRA step's shapes (M = 2x2048 tokens, C=4096, F=14336, R=16, bf16, NF4 bases), adapter terms by
    the rank-update kernel and by addmm_, against the fp32 reference by the tolerance rule."""
    import triton_ops.lora as tlora

    monkeypatch.setattr(tlora, "RANK_UPDATE_KERNEL", kernel)
    if block == "mlp":
        _mlp_case((2, 2048), 4096, 14336, 16, torch.bfloat16, "cuda", True, "all+dropout+bias", backend="auto")
    else:
        _qkv_case((2, 2048), 4096, 4096, 1024, 16, torch.bfloat16, "cuda", True, backend="auto",
                  q_dropout=0.1 if block == "qkv-separate" else 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_lora_mlp_gpu_llama_folded(fold, monkeypatch):
    """The 8B QLoRA step's MLP without dropout (M = 2x2048, R=16, NF4): with the adapters folded into the base
    GEMMs (the default on CUDA) and without, against the fp32 reference and peft by the tolerance rule; the two
    folds run on CUDA exactly when switched on. Odd token count and R=64 at the second shape."""
    import triton_ops.lora as tlora

    calls = _count_folds(monkeypatch)
    monkeypatch.setattr(tlora, "FOLD_ON_CPU", False)
    monkeypatch.setattr(tlora, "FOLD_ADAPTERS", fold)
    _mlp_case((2, 2048), 4096, 14336, 16, torch.bfloat16, "cuda", True, "all plain", backend="auto")
    _mlp_case((523,), 4096, 11008, 64, torch.float16, "cuda", True, "all plain", backend="auto")
    assert calls == ({"gate_up": 2, "dh": 2} if fold else {"gate_up": 0, "dh": 0}), calls


@pytest.mark.gpu
@pytest.mark.parametrize("case", PASSES_CASES, ids=["-".join(c) for c in PASSES_CASES])
def test_saved_xa_is_bit_identical_gpu(case, monkeypatch):
    """cuBLAS and the compiled SwiGLU kernels: saved xa == recomputed xa, bit for bit."""
    test_saved_xa_is_bit_identical_to_recomputing_it(case, torch.bfloat16, "cuda", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["all+dropout+bias", "down only"])
def test_down_xa_under_output_unused_gpu(variant, monkeypatch):
    """The compiled forward and backward SwiGLU kernels give the same h bits, so down's xa computed in
    backward equals the saved one."""
    test_down_xa_under_output_unused_is_computed_in_backward(variant, torch.bfloat16, "cuda", monkeypatch)
