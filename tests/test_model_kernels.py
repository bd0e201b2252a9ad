"""minitrain.model with its kernels switch (``model.use_kernels`` / ``kernel_backend``): the model run through
triton_ops' rms_norm, rope and swiglu kernels against the same model on its plain-torch ops.

CPU: the Triton kernels run under the interpreter (``kernel_backend = "triton"``) at a tiny size; fp32 logits
and every parameter's gradient agree with the plain-torch model within 1e-4 relative, bf16 follows the
tolerance rule (kernel model's error vs fp32 <= 2 x the bf16 plain model's error + small atol). With the
switch off, or on CPU tensors with "auto", the model runs the plain-torch code bit for bit.
GPU (``-m gpu``): the same in bf16 at Llama-like shapes with ``kernel_backend = "auto"``, eager and
torch.compile(fullgraph=True), plus a training step's loss and gradients.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import minitrain.model as mm
from minitrain.model import LlamaForCausalLM, ModelArgs

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny: 2 layers, GQA (4 query heads on 2 KV heads), D=16 != C/H, odd F; runs under the interpreter in seconds
TINY = dict(vocab_size=61, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)
# Llama-like (GPU): C=1024, 16 heads on 4 KV heads of D=64, SwiGLU F=2816 (~2.75 C), T=512
LLAMA = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0)


def make_model(args: dict, dtype=torch.float32, device="cpu") -> LlamaForCausalLM:
    """Random weights drawn large enough that activations and logits are O(1) (the default init is tiny)."""
    m = LlamaForCausalLM(ModelArgs(**args))
    with torch.no_grad():
        for n, p in m.named_parameters():
            scale = 0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 and "embed" not in n else 0.1
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n else scale * torch.randn_like(p) * 3)
    return m.to(device=device, dtype=dtype)


def packed_inputs(B: int, doc_lengths: list[int], vocab: int, device):
    """Input ids and position ids of B rows each packing documents of the given lengths (positions restart)."""
    pos = torch.cat([torch.arange(n) for n in doc_lengths])[None].expand(B, -1).contiguous()
    ids = torch.randint(0, vocab, pos.shape)
    return ids.to(device), pos.to(device)


def run(model, ids, pos, dlogits):
    """Logits and the gradients of all parameters (by name) for the upstream gradient dlogits."""
    logits = model(ids, pos)
    names, params = zip(*[(n, p) for n, p in model.named_parameters()])
    grads = torch.autograd.grad(logits, params, dlogits.to(logits.dtype))
    return logits.detach(), dict(zip(names, grads))


def under_autocast(model, ids, pos, dlogits, kernel_backend: str):
    """(fp32 plain run, bf16-autocast plain run, bf16-autocast run on ``kernel_backend``): each (logits, grads)."""
    model.kernel_backend = "torch"
    truth = run(model, ids, pos, dlogits)
    out = {}
    for be in ("torch", kernel_backend):
        model.kernel_backend = be
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            out[be] = run(model, ids, pos, dlogits)
    return truth, out["torch"], out[kernel_backend]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (in fp64)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (in fp64): steadier than the max element through a whole bf16 network."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def where(a, b) -> str:
    err = (a.double() - b.double()).abs()
    idx = tuple(i.item() for i in torch.unravel_index(err.argmax(), err.shape))
    return f"max abs err {err.max().item():.3g} at {idx}, |ref| max {b.abs().max().item():.3g}"


def assert_close_rel(got, want, tol, what):
    e = rel_err(got, want)
    assert e <= tol, f"{what}: relative error {e:.3g} > {tol:g}; {where(got, want)}"


def assert_rule(got, ref_same, truth, what, factor=2.0, atol=1e-3):
    """Tolerance rule: error of the kernel path vs fp32 <= factor x (same-precision reference's error) + atol,
    errors as relative norms."""
    e_k, e_r = rel_norm_err(got, truth), rel_norm_err(ref_same, truth)
    assert e_k <= factor * e_r + atol, (f"{what}: kernel rel err {e_k:.3g} > {factor} x reference rel err {e_r:.3g} "
                                        f"+ {atol}; {where(got, truth)}")


class CountCalls:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **kw):
        self.n += 1
        return self.fn(*a, **kw)


@contextlib.contextmanager
def counting_kernels():
    """Wrap the model's three kernel entry points in call counters; yields [rms_norm, rope, swiglu] counters."""
    saved = mm._k_rms_norm, mm._k_rope, mm._k_swiglu
    calls = [CountCalls(f) for f in saved]
    mm._k_rms_norm, mm._k_rope, mm._k_swiglu = calls
    try:
        yield calls
    finally:
        mm._k_rms_norm, mm._k_rope, mm._k_swiglu = saved


# ---------------------------------------------------------------------------------------------------------
# CPU: Triton under the interpreter vs plain torch
# ---------------------------------------------------------------------------------------------------------
def test_switch_values(monkeypatch):
    m = make_model(TINY)
    assert m.use_kernels and m.kernel_backend == "auto"
    m.use_kernels = False
    assert m.kernel_backend == "torch" and m.model.layers[1].mlp.kernel_backend == "torch"
    m.model.kernel_backend = "triton"
    assert m.kernel_backend == "triton" and m.use_kernels
    m.model.norm.kernel_backend = "torch"
    assert m.kernel_backend == "mixed"
    with pytest.raises(ValueError, match="kernel_backend"):
        m.kernel_backend = "cuda"
    monkeypatch.setenv("MINITRAIN_KERNELS", "0")
    m0 = make_model(TINY)
    assert not m0.use_kernels and m0.kernel_backend == "torch"
    m0.use_kernels = True  # explicit setting wins over the environment
    assert m0.kernel_backend == "auto"
    monkeypatch.setenv("MINITRAIN_KERNELS", "maybe")
    with pytest.raises(ValueError, match="MINITRAIN_KERNELS"):
        make_model(TINY)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_off_and_cpu_auto_are_plain_torch(dtype):
    """On CPU tensors "auto" runs the plain-torch ops, so it equals "torch" (= the model before the switch)
    bit for bit, logits and gradients; and no kernel is called."""
    m = make_model(TINY, dtype)
    ids, pos = packed_inputs(2, [5, 6, 2], TINY["vocab_size"], "cpu")
    g = torch.randn(2, 13, TINY["vocab_size"])
    m.kernel_backend = "torch"
    want, want_g = run(m, ids, pos, g)
    m.kernel_backend = "auto"
    with counting_kernels() as calls:
        got, got_g = run(m, ids, pos, g)
    assert [c.n for c in calls] == [0, 0, 0]
    assert torch.equal(got, want), where(got, want)
    for n in want_g:
        assert torch.equal(got_g[n], want_g[n]), f"grad {n}: {where(got_g[n], want_g[n])}"


def test_triton_matches_torch_fp32():
    """fp32: the model on the Triton kernels (interpreter) vs on plain torch, packed batch with restarting
    positions, odd T=13: logits and every gradient within 1e-4 relative; each kernel actually ran."""
    m = make_model(TINY)
    ids, pos = packed_inputs(2, [5, 6, 2], TINY["vocab_size"], "cpu")
    g = torch.randn(2, 13, TINY["vocab_size"])
    m.kernel_backend = "torch"
    want, want_g = run(m, ids, pos, g)
    m.kernel_backend = "triton"
    with counting_kernels() as calls:
        got, got_g = run(m, ids, pos, g)
    L = TINY["num_hidden_layers"]
    assert [c.n for c in calls] == [2 * L + 1, L, L], [c.n for c in calls]
    assert_close_rel(got, want, 1e-4, "logits")
    for n in want_g:
        assert_close_rel(got_g[n], want_g[n], 1e-4, f"grad {n}")


def test_triton_bf16_tolerance_rule():
    """bf16: kernel model's error vs the fp32 plain model <= 2 x the bf16 plain model's error + atol."""
    m32 = make_model(TINY)
    m32.kernel_backend = "torch"
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    ids, pos = packed_inputs(2, [7, 6], TINY["vocab_size"], "cpu")
    g = torch.randn(2, 13, TINY["vocab_size"])
    truth, truth_g = run(m32, ids, pos, g)
    ref, ref_g = run(m16, ids, pos, g)
    m16.kernel_backend = "triton"
    got, got_g = run(m16, ids, pos, g)
    assert_rule(got, ref, truth, "logits")
    # All gradients together meet the 2x rule; one tensor alone may reach 3x: after a backward through the whole
    # bf16 network both paths carry independent rounding, and their ratio on a single small tensor varies with
    # the seed (MINITRAIN_SEED=3456746219: 2.2x on layer 0's input-norm weight; 8 other seeds under 2x).
    cat = lambda d: torch.cat([d[n].reshape(-1).double() / truth_g[n].double().norm().clamp_min(1e-30)  # noqa: E731
                               for n in truth_g])
    assert_rule(cat(got_g), cat(ref_g), cat(truth_g), "all gradients")
    for n in truth_g:
        assert_rule(got_g[n], ref_g[n], truth_g[n], f"grad {n}", factor=3.0)


def test_triton_autocast_bf16():
    """fp32 weights under bf16 autocast (the trainer's mixed precision): the kernels get bf16 q/k/gate/up and
    fp32 norms; the tolerance rule holds against the fp32 model without autocast."""
    ids, pos = packed_inputs(2, [4, 9], TINY["vocab_size"], "cpu")
    g = torch.randn(2, 13, TINY["vocab_size"])
    (truth, truth_g), (ref, ref_g), (got, got_g) = under_autocast(make_model(TINY), ids, pos, g, "triton")
    assert_rule(got, ref, truth, "logits")
    for n in truth_g:
        assert_rule(got_g[n], ref_g[n], truth_g[n], f"grad {n}")


def test_triton_decode_with_cache():
    """Prefill then one-token decode through the KV cache on the kernels equals the plain-torch run."""
    m = make_model(TINY).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    outs = {}
    for be in ("torch", "triton"):
        m.kernel_backend = be
        cache = m.new_cache(2, 8)
        with torch.no_grad():
            a = m(ids[:, :6], cache=cache)
            b = m(ids[:, 6:], cache=cache)
        outs[be] = torch.cat([a, b], dim=1)
    assert_close_rel(outs["triton"], outs["torch"], 1e-4, "logits")


def test_compile_fullgraph_triton():
    """torch.compile(fullgraph=True) traces the model with the kernel ops (custom ops, no graph break);
    aot_eager keeps the CPU test fast (the GPU test compiles with inductor)."""
    m = make_model(TINY)
    m.kernel_backend = "triton"
    ids, pos = packed_inputs(1, [6, 7], TINY["vocab_size"], "cpu")
    g = torch.randn(1, 13, TINY["vocab_size"])
    want, want_g = run(m, ids, pos, g)
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    logits = cm(ids, pos)
    names, params = zip(*m.named_parameters())
    grads = torch.autograd.grad(logits, params, g)
    assert_close_rel(logits.detach(), want, 1e-5, "compiled logits")
    for n, gr in zip(names, grads):
        assert_close_rel(gr, want_g[n], 1e-5, f"compiled grad {n}")


# ---------------------------------------------------------------------------------------------------------
# GPU: bf16 at Llama-like shapes, kernel_backend="auto"
# ---------------------------------------------------------------------------------------------------------
def _gpu_models():
    m32 = make_model(LLAMA, torch.float32, "cuda")
    m32.kernel_backend = "torch"
    ref = copy.deepcopy(m32).to(torch.bfloat16)
    ref.kernel_backend = "torch"
    ker = copy.deepcopy(ref)
    ker.kernel_backend = "auto"
    return m32, ref, ker


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_gpu_bf16_logits_and_grads(compiled):
    torch.backends.cuda.matmul.allow_tf32 = False
    m32, ref, ker = _gpu_models()
    ids, pos = packed_inputs(2, [200, 1, 180, 131], LLAMA["vocab_size"], "cuda")  # T=512, packed
    g = torch.randn(2, 512, LLAMA["vocab_size"], device="cuda")
    truth, truth_g = run(m32, ids, pos, g)
    r, r_g = run(ref, ids, pos, g)
    if compiled:
        torch._dynamo.reset()
        cm = torch.compile(ker, fullgraph=True)
        logits = cm(ids, pos)
        names, params = zip(*ker.named_parameters())
        k, k_g = logits.detach(), dict(zip(names, torch.autograd.grad(logits, params, g.to(logits.dtype))))
    else:
        with counting_kernels() as calls:
            k, k_g = run(ker, ids, pos, g)
        L = LLAMA["num_hidden_layers"]
        assert [c.n for c in calls] == [2 * L + 1, L, L], f"kernel calls on CUDA with 'auto': {[c.n for c in calls]}"
    assert_rule(k, r, truth, "logits")
    for n in truth_g:
        assert_rule(k_g[n], r_g[n], truth_g[n], f"grad {n}")


@pytest.mark.gpu
def test_gpu_autocast_bf16():
    """fp32 weights under bf16 autocast, as the trainer runs: kernel model vs plain model, fp32 as truth."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ids, pos = packed_inputs(2, [256, 256], LLAMA["vocab_size"], "cuda")
    g = torch.randn(2, 512, LLAMA["vocab_size"], device="cuda")
    (truth, truth_g), (ref, ref_g), (got, got_g) = under_autocast(make_model(LLAMA, torch.float32, "cuda"), ids, pos,
                                                                  g, "auto")
    assert_rule(got, ref, truth, "logits")
    for n in truth_g:
        assert_rule(got_g[n], ref_g[n], truth_g[n], f"grad {n}")


@pytest.mark.gpu
def test_gpu_bf16_training_step():
    """One training step (shifted-label cross-entropy, backward, AdamW): the kernel model's loss and gradients
    follow the tolerance rule against the bf16 plain model, fp32 as truth, and its step leaves finite weights."""
    torch.backends.cuda.matmul.allow_tf32 = False
    models = _gpu_models()
    ids, pos = packed_inputs(2, [300, 212], LLAMA["vocab_size"], "cuda")
    out = []
    for m in models:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
        logits = m(ids, pos)
        tok_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        tok_loss.mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
        opt.step()
        weights = {n: p.detach().clone() for n, p in m.named_parameters()}
        out.append((tok_loss.detach(), grads, weights))
    (l32, g32, _), (lr, gr, _), (lk, gk, wk) = out
    assert_rule(lk, lr, l32, "per-token loss")  # a vector: the mean alone can land near fp32 by luck
    for n in g32:
        assert_rule(gk[n], gr[n], g32[n], f"grad {n}")
        assert torch.isfinite(wk[n].float()).all(), f"non-finite weight after the step: {n}"
