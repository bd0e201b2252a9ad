"""RoPE against transformers' own LlamaRotaryEmbedding and apply_rotary_pos_emb, forward and backward.

Triton kernel on CPU under the interpreter (small shapes) and on CUDA (real shapes); the CUDA C++ kernel
compiles with nvcc here and runs on CUDA in the gpu tests.
"""
import importlib
import os
import shutil

import pytest
import torch

from triton_ops.rope import packed_position_ids, rope, rope_cos_sin, rope_inv_freq, rope_ref

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

# (name, rope_theta, 4.x-style rope_scaling)
SCALINGS = [
    ("default", 10000.0, None),
    ("linear", 10000.0, {"rope_type": "linear", "factor": 4.0}),
    ("llama3", 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}),
]

# (B, T, H, KV, D)
CPU_SHAPES = [
    (1, 3, 2, 1, 8),     # tiny
    (2, 5, 3, 1, 80),    # odd: D/2 = 40 is not a power of two, GQA 3:1
    (1, 4, 4, 2, 96),    # odd: D/2 = 48, the other common non-power-of-two head dim
]
GPU_SHAPES = [
    (4, 2048, 32, 8, 128),  # realistic: Llama-3-8B attention at T=2048
    (2, 423, 12, 4, 80),    # odd T and D
    (3, 257, 8, 8, 96),     # odd T, D=96, MHA
]
# how q and k are laid out in memory
LAYOUTS = [
    "contiguous",  # (B, T, H, D) tensors of their own
    "fused_qkv",   # non-contiguous views of one (B, T, (H + 2 KV) * D) projection output
    "bhtd",        # (B, H, T, D) storage seen through a transpose
]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
# one correctly rounded output (half an ulp, relative) is the least error any kernel can have; tiny tensors
# can give the same-precision reference a lucky max error below it
RTOL = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
if os.environ.get("TRITON_INTERPRET") == "1":
    # the interpreter converts fp32 -> bf16 by truncation, not round-to-nearest (triton 3.9: about half of
    # random values land one ulp low), so allow a whole ulp there; compiled kernels keep the half-ulp bound
    RTOL[torch.bfloat16] = 2.0**-7


def _hf_config(head_dim: int, theta: float, scaling: dict | None, five_style: bool) -> LlamaConfig:
    """A LlamaConfig with this rope; transformers 5 spells it rope_parameters, 4.x rope_theta + rope_scaling."""
    kw = dict(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
              max_position_embeddings=131072, num_hidden_layers=1, intermediate_size=64, vocab_size=128)
    if five_style and "rope_parameters" in LlamaConfig.__init__.__code__.co_varnames:
        params = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
        return LlamaConfig(rope_parameters=params, **kw)
    return LlamaConfig(rope_theta=theta, rope_scaling=scaling, **kw)


def _qk(B, T, H, KV, D, dtype, device, layout):
    if layout == "contiguous":
        q = torch.randn(B, T, H, D, dtype=dtype, device=device)
        k = torch.randn(B, T, KV, D, dtype=dtype, device=device)
    elif layout == "fused_qkv":
        qkv = torch.randn(B, T, (H + 2 * KV) * D, dtype=dtype, device=device)
        q = qkv[..., : H * D].view(B, T, H, D)
        k = qkv[..., H * D: (H + KV) * D].view(B, T, KV, D)
    else:
        q = torch.randn(B, H, T, D, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(B, KV, T, D, dtype=dtype, device=device).transpose(1, 2)
    return q, k


def _check(what, got, ref_same, ref32, dtype):
    """STYLE.md's rule: |kernel - fp32 ref| <= 2 * max|same-precision ref - fp32 ref| + atol, where atol also
    allows the half-ulp rounding of each output element."""
    err = (got.float() - ref32).abs()
    bound = 2 * (ref_same.float() - ref32).abs().max().item() + ATOL[dtype] + RTOL[dtype] * ref32.abs()
    bad = err > bound
    if bad.any():
        excess = err - bound
        where = torch.unravel_index(excess.argmax(), err.shape)
        pytest.fail(f"{what}: error {err[where].item():.3e} at {tuple(int(i) for i in where)} exceeds its bound "
                    f"{bound[where].item():.3e} (max error {err.max().item():.3e}); {int(bad.sum())} of "
                    f"{err.numel()} elements beyond it")


def _run_against_hf(B, T, H, KV, D, dtype, device, layout, backend, scaling=SCALINGS[2]):
    _, theta, rs = scaling
    # packed batch: positions restart at 0 per document in row 0, plain positions elsewhere
    pos = torch.arange(T, device=device).repeat(B, 1)
    pos[0] = packed_position_ids([T // 3, T - T // 3], device=device)
    cos32, sin32 = rope_cos_sin(pos, D, theta, rs, dtype=torch.float32)
    cos, sin = cos32.to(dtype), sin32.to(dtype)

    q, k = _qk(B, T, H, KV, D, dtype, device, layout)
    dq, dk = torch.randn(B, T, H, D, dtype=dtype, device=device), torch.randn(B, T, KV, D, dtype=dtype, device=device)
    qk_kernel = [x.detach().clone().requires_grad_() for x in (q, k)]
    if layout == "fused_qkv":  # keep the kernel's inputs non-contiguous views
        qkv = torch.cat([q.detach().flatten(2), k.detach().flatten(2), torch.zeros_like(k.detach().flatten(2))], -1)
        qkv.requires_grad_()
        qk_kernel = [qkv[..., : H * D].view(B, T, H, D), qkv[..., H * D: (H + KV) * D].view(B, T, KV, D)]
        assert not qk_kernel[0].is_contiguous()
        grad_of = [qkv]
    else:
        grad_of = qk_kernel
    qo, ko = rope(*qk_kernel, cos, sin, backend=backend)
    grads = torch.autograd.grad((qo, ko), grad_of, (dq, dk))
    if layout == "fused_qkv":
        g = grads[0]
        grads = (g[..., : H * D].view(B, T, H, D), g[..., H * D: (H + KV) * D].view(B, T, KV, D))
        assert torch.count_nonzero(g[..., (H + KV) * D:]) == 0

    qs, ks = [x.detach().clone().requires_grad_() for x in (q, k)]
    qs_o, ks_o = apply_rotary_pos_emb(qs, ks, cos, sin, unsqueeze_dim=2)
    gs = torch.autograd.grad((qs_o, ks_o), (qs, ks), (dq, dk))
    q32, k32 = [x.detach().float().requires_grad_() for x in (q, k)]
    q32_o, k32_o = apply_rotary_pos_emb(q32, k32, cos32, sin32, unsqueeze_dim=2)
    g32 = torch.autograd.grad((q32_o, k32_o), (q32, k32), (dq.float(), dk.float()))

    assert qo.shape == (B, T, H, D) and ko.shape == (B, T, KV, D) and qo.dtype == dtype
    # cos32 vs cos rounding is shared by the kernel and the same-precision reference, so judge the kernel
    # against fp32 math on the rounded tables as well: that is what both of them were given
    c16, s16 = cos.float(), sin.float()
    q32r, k32r = apply_rotary_pos_emb(q.float(), k.float(), c16, s16, unsqueeze_dim=2)
    _check("q forward", qo, qs_o, q32r, dtype)
    _check("k forward", ko, ks_o, k32r, dtype)
    _check("q forward vs fp32 tables", qo, qs_o, q32_o.detach(), dtype)
    _check("k forward vs fp32 tables", ko, ks_o, k32_o.detach(), dtype)
    _check("dq", grads[0], gs[0], g32[0], dtype)
    _check("dk", grads[1], gs[1], g32[1], dtype)


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_triton_cpu(shape, dtype):
    _run_against_hf(*shape, dtype, "cpu", "contiguous", "triton")


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_rope_triton_cpu_strided(layout):
    _run_against_hf(2, 3, 3, 1, 80, torch.bfloat16, "cpu", layout, "triton")


@pytest.mark.parametrize("scaling", SCALINGS, ids=[s[0] for s in SCALINGS])
def test_rope_torch_backend_cpu(scaling):
    _run_against_hf(2, 7, 4, 2, 64, torch.bfloat16, "cpu", "fused_qkv", "torch", scaling)


@pytest.mark.parametrize("scaling", SCALINGS, ids=[s[0] for s in SCALINGS])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("five_style", [True, False], ids=["rope_parameters", "rope_scaling"])
def test_cos_sin_bit_exact_vs_hf(scaling, D, five_style, device):
    name, theta, rs = scaling
    config = _hf_config(D, theta, rs, five_style)
    pos = torch.stack([packed_position_ids([5, 9, 2], device=device),
                       torch.randint(0, 131072, (16,), device=device)])  # long positions exercise llama3 bands
    x = torch.empty(0, dtype=torch.bfloat16, device=device)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config).to(device)(x, pos)
    cos, sin = rope_cos_sin(pos, D, theta, rs, dtype=torch.bfloat16)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin), name
    # the 5.x dict (theta inside) gives the same tables; so does the 4.x spelling with "type"
    params = getattr(config, "rope_parameters", None) or {**(rs or {}), "rope_theta": theta}
    cos5, sin5 = rope_cos_sin(pos, D, rope_scaling=params, dtype=torch.bfloat16)
    assert torch.equal(cos5, hf_cos) and torch.equal(sin5, hf_sin)
    if rs is not None:
        legacy = {("type" if key == "rope_type" else key): v for key, v in rs.items()}
        assert torch.equal(rope_inv_freq(D, theta, legacy), rope_inv_freq(D, theta, rs))


def test_packed_position_ids():
    assert packed_position_ids([3, 1, 2]).tolist() == [0, 1, 2, 0, 0, 1]
    assert packed_position_ids([4]).tolist() == [0, 1, 2, 3]


def test_rope_cos_sin_errors():
    with pytest.raises(ValueError, match="even"):
        rope_inv_freq(7)
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(8, 10000.0, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="contradicts"):
        rope_inv_freq(8, 10000.0, {"rope_type": "default", "rope_theta": 500000.0})


def test_rope_input_errors():
    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    cos, sin = rope_cos_sin(torch.arange(3), 8)
    with pytest.raises(ValueError, match="even"):
        rope(q[..., :7], k[..., :7], cos[:, :7], sin[:, :7], backend="triton")
    with pytest.raises(ValueError, match="share a dtype"):
        rope(q, k.half(), cos, sin, backend="triton")
    with pytest.raises(ValueError, match="cos must be"):
        rope(q, k, cos[:2], sin, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        rope(q, k, cos, sin, backend="nope")
    # a non-tensor table is named, not an AttributeError from the launch-plan cache key
    for args, name in (((q, k, None, sin), "cos"), ((q, k, cos, None), "sin")):
        with pytest.raises(TypeError, match=f"{name} must be a tensor"):
            rope(*args, backend="triton")


def test_rope_inverse_and_cos_sin_layouts():
    # backward direction undoes forward (rotation by -theta); (T, D), (1, T, D) and (B, T, D) tables agree
    B, T, H, KV, D = 2, 5, 2, 1, 80
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, KV, D)
    cos, sin = rope_cos_sin(torch.arange(T), D)
    out = [rope(q, k, c, s, backend="triton") for c, s in
           ((cos, sin), (cos[None], sin[None]), (cos.expand(B, T, D), sin.expand(B, T, D)))]
    for qo, ko in out[1:]:
        assert torch.equal(qo, out[0][0]) and torch.equal(ko, out[0][1])
    qb, kb = torch.ops.minitrain.rope(out[0][0], out[0][1], cos, sin, True)
    torch.testing.assert_close(qb, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kb, k, atol=1e-5, rtol=1e-5)
    rq, rk = rope_ref(q, k, cos, sin)
    torch.testing.assert_close(out[0][0], rq, atol=1e-5, rtol=1e-5)


def _inplace_case(device, backend, B=2, T=5, H=3, KV=1, D=80, dtype=torch.bfloat16):
    qkv = torch.randn(B, T, (H + 2 * KV) * D, dtype=dtype, device=device)
    cos, sin = rope_cos_sin(torch.arange(T, device=device), D, dtype=dtype)
    q, k = qkv[..., : H * D].view(B, T, H, D), qkv[..., H * D: (H + KV) * D].view(B, T, KV, D)
    v_before = qkv[..., (H + KV) * D:].clone()
    qo, ko = rope(q, k, cos, sin, backend=backend)
    q2, k2 = rope(q, k, cos, sin, inplace=True, backend=backend)
    assert q2.data_ptr() == qkv.data_ptr() and q2 is q and k2 is k
    assert torch.equal(q, qo) and torch.equal(k, ko)
    assert torch.equal(qkv[..., (H + KV) * D:], v_before)

    # under autograd the in-place call gives the same values and the same gradients as out of place
    x = torch.randn(B, T, 16, dtype=dtype, device=device)
    w = torch.randn((H + 2 * KV) * D, 16, dtype=dtype, device=device, requires_grad=True)
    grads = []
    for inplace in (False, True):
        p = x @ w.t()
        q, k = p[..., : H * D].view(B, T, H, D), p[..., H * D: (H + KV) * D].view(B, T, KV, D)
        qo, ko = rope(q, k, cos, sin, inplace=inplace, backend=backend)
        loss = (qo.float() ** 2).sum() + (ko.float() * 3).sum() + p[..., (H + KV) * D:].float().sum()
        grads.append(torch.autograd.grad(loss, w)[0])
    assert torch.equal(grads[0], grads[1])


def test_rope_inplace_cpu():
    _inplace_case("cpu", "triton", T=3)


def _compiled_case(device, backend, compile_backend, shape, dtype):
    B, T, H, KV, D = shape
    cos, sin = rope_cos_sin(torch.arange(T, device=device), D, 500000.0, SCALINGS[2][2], dtype=dtype)
    q, k = _qk(B, T, H, KV, D, dtype, device, "fused_qkv")
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def f(q, k, cos, sin):
        qo, ko = rope(q, k, cos, sin, backend=backend)
        return qo * 2, ko

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=compile_backend)):
        qi, ki = [x.detach().clone().requires_grad_() for x in (q, k)]
        qo, ko = fn(qi, ki, cos, sin)
        results.append((qo, ko, *torch.autograd.grad((qo, ko), (qi, ki), (dq, dk))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_rope_torch_compile_cpu():
    # aot_eager traces the op through its fake and autograd registration (fullgraph: no graph break)
    _compiled_case("cpu", "triton", "aot_eager", (1, 2, 2, 1, 80), torch.float32)


def test_vec_width_choice():
    from csrc.rope import _vec_width

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype)
    q, k = t(2, 3, 4, 128), t(2, 3, 2, 128)
    assert _vec_width((q, k, q, k), 64) == 8
    assert _vec_width((q.float(), k.float(), q.float(), k.float()), 64) == 4  # 16 bytes at most
    qkv = t(2, 3, 8 * 80)
    assert _vec_width((qkv[..., :320].view(2, 3, 4, 80), qkv[..., 320:480].view(2, 3, 2, 80)) * 2, 40) == 8
    odd = t(2, 3, 4 * 80 + 1)[..., 1:].view(2, 3, 4, 80)  # base address off by one element
    assert _vec_width((odd, k, q, k), 40) == 1
    strided = t(2, 3, 4, 256)[..., ::2]  # d-stride 2
    assert _vec_width((strided, k, q, k), 64) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_rope_cu_compiles_for_sm90():
    from csrc import nvcc_compile_check

    nvcc_compile_check("rope.cu", arch="sm_90")


# ---------------------------------------------------------------------------------------------- GPU
def _gpu_backends():
    try:
        import cupy  # noqa: F401
        return ["triton", "cuda"]
    except ImportError:
        return ["triton", pytest.param("cuda", marks=pytest.mark.skip(reason="cupy not installed"))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("shape,dtype", [(s, torch.bfloat16) for s in GPU_SHAPES]
                         + [(GPU_SHAPES[1], torch.float16), (GPU_SHAPES[1], torch.float32)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rope_gpu(backend, shape, dtype, layout):
    _run_against_hf(*shape, dtype, "cuda", layout, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("scaling", SCALINGS, ids=[s[0] for s in SCALINGS])
def test_rope_gpu_scalings(backend, scaling):
    _run_against_hf(2, 300, 8, 2, 128, torch.bfloat16, "cuda", "fused_qkv", backend, scaling)


@pytest.mark.gpu
def test_rope_gpu_backends_agree():
    # the Triton and CUDA C++ kernels do the same fp32 math with one rounding: equal up to fma contraction
    pytest.importorskip("cupy")
    B, T, H, KV, D = 2, 333, 8, 2, 80
    q, k = _qk(B, T, H, KV, D, torch.bfloat16, "cuda", "fused_qkv")
    cos, sin = rope_cos_sin(torch.arange(T, device="cuda"), D, dtype=torch.bfloat16)
    a = rope(q, k, cos, sin, backend="triton")
    b = rope(q, k, cos, sin, backend="cuda")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_rope_inplace_gpu(backend):
    _inplace_case("cuda", backend, B=2, T=513, H=32, KV=8, D=128)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
def test_rope_torch_compile_gpu(backend):
    _compiled_case("cuda", backend, "inductor", (2, 256, 8, 2, 96), torch.bfloat16)


# ---------------------------------------------------------------------------------------------- launch configs
# Every RopeConfig must give the same result as the default: fp32 inputs, where the interpreter's numpy math
# equals rope_ref's bit for bit (same products, same sums, one rounding).
CONFIGS = [
    dict(tokens=2),                        # T*B = 10 not a multiple of 4 below: masked tail block
    dict(tokens=4, num_warps=1),
    dict(tokens=4, tile=64),               # heads looped in blocks smaller than H (and KV)
    dict(tokens=2, grid_cap=3),            # persistent: 3 programs stride over the token blocks
    dict(tokens=1, int32=True),            # 32-bit offsets
    dict(tokens=4, grid_cap=2, int32=True, num_warps=8),
    dict(loads_first=True),                # q and k loaded before either is stored (_rotate_qk_once)
    dict(tokens=2, loads_first=True, int32=False),
    dict(tokens=4, tile=64, loads_first=True),  # heads do not fit one tile: the block-by-block path
]


def _launch_case(config, D, layout, inplace, backward, B=2, T=5, H=3, KV=2):
    from triton_ops.rope import RopeConfig, _launch_rope

    q, k = _qk(B, T, H, KV, D, torch.float32, "cpu", layout)
    cos, sin = rope_cos_sin(torch.arange(T), D, 500000.0, SCALINGS[2][2])
    want = rope_ref(q, k, cos, sin, backward=backward)
    if inplace:
        qo, ko = q, k
    else:
        qo, ko = torch.empty(q.shape), torch.empty(k.shape)
    _launch_rope(q, k, cos[None], sin[None], qo, ko, backward, RopeConfig(**config))
    for name, got, ref in (("q", qo, want[0]), ("k", ko, want[1])):
        if not torch.equal(got, ref):
            diff = (got - ref).abs()
            pytest.fail(f"{name} {config} D={D} {layout} inplace={inplace} backward={backward}: max diff "
                        f"{diff.max().item():.3e}, {int((diff > 0).sum())} of {diff.numel()} elements differ")


@pytest.mark.parametrize("config", CONFIGS, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CONFIGS])
@pytest.mark.parametrize("D", [80, 96])
def test_rope_configs_cpu(config, D):
    # odd halves (40, 48: masked to 64), a fused-qkv view and a transposed (B, H, T, D) storage, both directions
    _launch_case(config, D, "fused_qkv", inplace=False, backward=False)
    _launch_case(config, D, "bhtd", inplace=True, backward=True)


def test_rope_config_errors():
    from triton_ops.rope import RopeConfig, _launch_rope

    q, k = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8)
    cos, sin = rope_cos_sin(torch.arange(3), 8)
    for bad, match in ((dict(tokens=3), "power of two"), (dict(num_warps=3), "num_warps"), (dict(tile=0), "tile")):
        with pytest.raises(ValueError, match=match):
            _launch_rope(q, k, cos, sin, q.clone(), k.clone(), False, RopeConfig(**bad))


def test_rope_int32_choice():
    # 32-bit offsets only when every offset the kernel forms (masked lanes and padded heads/d included) fits
    from triton_ops.rope import RopeConfig, _make_plan

    cos, sin = torch.empty(1, 4, 8, device="meta"), torch.empty(1, 4, 8, device="meta")

    def idx64(q_stride_t, config=RopeConfig(int32=True)):
        q = torch.empty(0, device="meta").as_strided((2, 4, 3, 8), (4 * q_stride_t, q_stride_t, 8, 1))
        k = torch.empty(2, 4, 1, 8, device="meta")
        return _make_plan(q, k, cos, sin, torch.empty(q.shape, device="meta"), k, False, config)[2]["IDX64"]

    assert not idx64(32)
    assert idx64(2**31 // 7 + 1)  # (b=1, t=3): 4 s + 3 s passes 2^31
    assert idx64(32, RopeConfig(int32=False))
    # the highest real offset, 7 s + 2 heads * 8 + 7, is below 2^31, but the padded head (3 -> 4 heads) passes it
    s = -(-(2**31 - 31) // 7)
    assert 7 * s + 2 * 8 + 7 < 2**31 <= 7 * s + 3 * 8 + 7
    assert idx64(s)
    assert not idx64(s - 2)


# ---------------------------------------------------------------------------------------------- eager path
def test_rope_eager_path_cpu(monkeypatch):
    # outside tracing rope() launches through _EagerRope (no custom-op dispatch) with one cached plan per shape;
    # results and gradients equal the torch.library op's, double backward included
    R = importlib.import_module("triton_ops.rope")  # the module (the package exports a function of that name)

    B, T, H, KV, D = 2, 3, 2, 1, 16
    q, k = torch.randn(B, T, H, D, requires_grad=True), torch.randn(B, T, KV, D, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T), D)
    made = []
    make = R._make_plan
    monkeypatch.setattr(R, "_make_plan", lambda *a: made.append(a[6]) or make(*a))
    R._PLANS.clear()
    qo, ko = rope(q, k, cos, sin, backend="triton")
    assert type(qo.grad_fn).__name__ == "_EagerRopeBackward"
    rope(q, k, cos, sin, backend="triton")
    assert made == [False]  # the second call reused the plan
    qr, kr = torch.ops.minitrain.rope(q, k, cos, sin, False)
    assert torch.equal(qo, qr) and torch.equal(ko, kr)
    # the gradient is differentiable in the upstream gradient (create_graph), as the op's is
    dq, dk = torch.randn_like(qo, requires_grad=True), torch.randn_like(ko, requires_grad=True)
    g = torch.autograd.grad((qo, ko), (q, k), (dq, dk), create_graph=True)
    gr = torch.autograd.grad((qr, kr), (q, k), (dq, dk), create_graph=True)
    assert all(torch.equal(a, b) for a, b in zip(g, gr))
    assert made == [False, True]
    gg = torch.autograd.grad(g[0].square().sum() + g[1].sum(), (dq, dk))
    ggr = torch.autograd.grad(gr[0].square().sum() + gr[1].sum(), (dq, dk))
    assert all(torch.equal(a, b) for a, b in zip(gg, ggr))


def test_rope_eager_inplace_bumps_version():
    # the direct in-place launch tells autograd, as the mutating op does: a saved tensor changed is an error
    B, T, H, KV, D = 1, 2, 2, 1, 8
    x = torch.randn(B, T, H, D, requires_grad=True)
    e = x.exp()  # exp saves its output e for backward
    k = torch.randn(B, T, KV, D)
    cos, sin = rope_cos_sin(torch.arange(T), D)
    before = e._version
    with torch.no_grad():
        rope(e, k, cos, sin, inplace=True, backend="triton")
    assert e._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        e.sum().backward()


def test_rope_eager_forward_compiled_autograd_backward():
    # an eager forward (through _EagerRope) whose backward compiled autograd traces: the traced backward must
    # take the torch.library op, which tracing sees through, not launch the kernel on traced tensors
    B, T, H, KV, D = 1, 3, 2, 1, 8
    q, k = torch.randn(B, T, H, D, requires_grad=True), torch.randn(B, T, KV, D, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(T), D)
    qo, ko = rope(q, k, cos, sin, backend="triton")
    assert type(qo.grad_fn).__name__ == "_EagerRopeBackward"
    torch._dynamo.reset()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        (qo.square().sum() + ko.sum()).backward()
    torch._dynamo.reset()
    qr, kr = [x.detach().requires_grad_() for x in (q, k)]
    a, b = rope_ref(qr, kr, cos, sin)
    (a.square().sum() + b.sum()).backward()
    assert torch.allclose(q.grad, qr.grad, atol=1e-6) and torch.allclose(k.grad, kr.grad, atol=1e-6)
