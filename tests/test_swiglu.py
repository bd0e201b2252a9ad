"""swiglu: fused forward and (in-place) backward against the fp32 reference and torch in the same precision."""
import pytest
import torch
import torch.nn.functional as Fn

from triton_ops.swiglu import swiglu, swiglu_backward, swiglu_backward_, swiglu_backward_ref, swiglu_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}  # x max |reference|

CPU_SHAPES = [
    (4, 64),          # tiny, one block per row
    (3, 7, 130),      # odd rows and an F that is no multiple of the block
    (1, 5, 1000),     # several blocks per row with a ragged tail
]
GPU_SHAPES = [
    (4096, 14336),    # realistic: Llama-3-8B MLP, 4096 tokens
    (523, 11008),     # odd token count, Llama-2-7B F
    (2, 1037, 4100),  # odd everything, batched
]


def check(name, out, same, ref32, atol_rel):
    """Kernel error vs fp32 <= 2 x (same-precision torch error) + small atol; report where it fails."""
    err = (out.float() - ref32.float()).abs()
    ref_err = (same.float() - ref32.float()).abs().max().item()
    bound = 2 * ref_err + atol_rel * max(1.0, ref32.abs().max().item())
    if out.dtype == torch.bfloat16 and out.device.type == "cpu":
        # Triton's CPU interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest even): one more ulp.
        bound = bound + 2.0**-7 * ref32.float().abs()
    else:
        bound = torch.full_like(err, bound)
    if (err > bound).any():
        i = (err - bound).argmax().item()
        where = tuple(torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{name}: error {err.view(-1)[i].item():.3g} at {tuple(int(w) for w in where)} > bound "
                             f"{bound.view(-1)[i].item():.3g} (same-precision torch error {ref_err:.3g}); "
                             f"{int((err > bound).sum())} of {err.numel()} elements exceed it")


def _inputs(shape, dtype, device):
    g = torch.randn(shape, device=device) * 3
    u = torch.randn(shape, device=device)
    dh = torch.randn(shape, device=device)
    return g.to(dtype), u.to(dtype), dh.to(dtype)


def _run(shape, dtype, device, backend, fn=swiglu):
    g, u, dh = _inputs(shape, dtype, device)
    gk, uk = g.clone().requires_grad_(), u.clone().requires_grad_()
    hk = fn(gk, uk, backend=backend) if fn is swiglu else fn(gk, uk)
    dgk, duk = torch.autograd.grad(hk, (gk, uk), dh)
    gs, us = g.clone().requires_grad_(), u.clone().requires_grad_()
    hs = Fn.silu(gs) * us  # torch in the same precision: two roundings
    dgs, dus = torch.autograd.grad(hs, (gs, us), dh)
    g32, u32 = g.float().requires_grad_(), u.float().requires_grad_()
    h32 = Fn.silu(g32) * u32
    dg32, du32 = torch.autograd.grad(h32, (g32, u32), dh.float())
    for name, a, b, c in (("h", hk, hs, h32), ("dgate", dgk, dgs, dg32), ("dup", duk, dus, du32)):
        assert a.dtype == dtype and a.shape == torch.Size(shape)
        check(f"{name} {dtype} {shape}", a, b, c, ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_swiglu_kernel(shape, dtype, device):
    _run(shape, dtype, device, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_reference_path(dtype, device):
    _run((3, 7, 130), dtype, device, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_matches(dtype, device):
    """swiglu_backward_ writes (h, dg, du) over (dh, g, u): bit-identical to the out-of-place kernel."""
    g, u, dh = _inputs((13, 130), dtype, device)
    dg, du = swiglu_backward(dh, g, u, backend="triton")
    g2, u2, dh2 = g.clone(), u.clone(), dh.clone()
    swiglu_backward_(dh2, g2, u2, store_h=True, backend="triton")
    assert torch.equal(g2, dg) and torch.equal(u2, du)
    assert torch.equal(dh2, swiglu(g, u, backend="triton"))
    rg, ru, rh = swiglu_backward_ref(dh, g, u)  # fp32 math, one rounding: the kernel differs by ~1 ulp at most
    torch.testing.assert_close(g2, rg)
    torch.testing.assert_close(u2, ru)
    torch.testing.assert_close(dh2, rh)
    g3, u3, dh3 = g.clone(), u.clone(), dh.clone()
    swiglu_backward_(dh3, g3, u3, store_h=False, backend="triton")
    assert torch.equal(dh3, dh), "store_h=False must leave dh untouched"
    assert torch.equal(g3, dg) and torch.equal(u3, du)
    g4, u4, dh4 = g.clone(), u.clone(), dh.clone()
    swiglu_backward_(dh4, g4, u4, store_h=True, backend="torch")
    assert torch.equal(g4, rg) and torch.equal(u4, ru) and torch.equal(dh4, rh)


def test_noncontiguous_halves_of_fused_projection(device):
    """gate and up as the two halves of one (T, 2F) buffer: row strides, no copy."""
    gu = torch.randn(13, 2 * 130, device=device)
    g, u = gu[:, :130], gu[:, 130:]
    assert not g.is_contiguous()
    h = swiglu(g, u, backend="triton")
    torch.testing.assert_close(h, swiglu_ref(g.contiguous(), u.contiguous()), rtol=1e-6, atol=1e-6)
    dh = torch.randn(13, 130, device=device)
    gk, uk = g.clone().requires_grad_(), u.clone().requires_grad_()
    ref = torch.autograd.grad(swiglu(gk, uk, backend="torch"), (gk, uk), dh)
    gl = gu.clone().requires_grad_()
    got = torch.autograd.grad(swiglu(gl[:, :130], gl[:, 130:], backend="triton"), gl, dh)[0]
    torch.testing.assert_close(got, torch.cat(ref, dim=1), rtol=1e-5, atol=1e-5)


def test_errors(device):
    g = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(g, torch.randn(4, 9, device=device), backend="triton")
    with pytest.raises(ValueError, match="share dtype"):
        swiglu(g, g.half(), backend="triton")
    with pytest.raises(ValueError, match="last dimension"):
        swiglu(g.t(), g.t(), backend="triton")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        swiglu(g.double(), g.double(), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        swiglu(g, g, backend="cuda")


def test_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"  # aot_eager: traces fwd+bwd, no C++ build on CPU
    fn = torch.compile(lambda a, b: swiglu(a, b, backend="triton"), fullgraph=True, backend=backend)
    _run((3, 7, 130), torch.float32, device, backend="triton", fn=fn)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_swiglu_gpu(shape, dtype):
    _run(shape, dtype, "cuda", backend="auto")


@pytest.mark.gpu
def test_inplace_backward_gpu():
    g, u, dh = _inputs((4096, 14336), torch.bfloat16, "cuda")
    dg, du = swiglu_backward(dh, g, u)
    h = swiglu(g, u)
    before = torch.cuda.memory_allocated()
    swiglu_backward_(dh, g, u)
    assert torch.cuda.memory_allocated() == before, "the in-place backward allocated memory"
    assert torch.equal(g, dg) and torch.equal(u, du) and torch.equal(dh, h)


@pytest.mark.gpu
def test_compile_fullgraph_gpu():
    fn = torch.compile(lambda a, b: swiglu(a, b), fullgraph=True)
    _run((523, 11008), torch.bfloat16, "cuda", backend="auto", fn=fn)
