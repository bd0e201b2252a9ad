"""NF4 format: byte-exact agreement with bitsandbytes (the independent oracle, on CPU), checkpoints both
ways, NF4Linear, and the errors bad input gets."""
import copy
import json

import pytest
import torch

import quant
from quant.nf4 import QUANT_STATE_KEY, quantize_blockwise_8bit_ref

bnbF = pytest.importorskip("bitsandbytes.functional")

# (N, K): each with a reason.
SHAPES = [
    (1, 1),         # a single element: one partial block, one padding nibble
    (3, 7),         # odd element count: padding nibble, one partial block
    (64, 64),       # whole blocks only
    (17, 300),      # partial last block, odd rows
    (130, 129),     # odd N*K with odd N and K
    (256, 72),      # exactly 288 blocks: a partial nested (256-block) group
    (1031, 67),     # > 1000 blocks, odd element count, partial nested group
    (96, 4100),     # Llama-odd K (C=4100)
]
SCALES = [1e-4, 0.02, 1.0, 300.0]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bnb_quantize(w, double_quant):
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def _bnb_dequantize(packed, state, dtype):
    state = copy.copy(state)
    state.dtype = dtype  # bitsandbytes dequantizes to the state's dtype
    return bnbF.dequantize_4bit(packed, quant_state=state)


def _report(a, b):
    diff = (a.float() - b.float()).abs() if a.is_floating_point() else (a.int() - b.int()).abs()
    n = int((a != b).sum())
    where = tuple(int(i) for i in torch.nonzero(a != b)[0]) if n else None
    return f"{n} of {a.numel()} differ, max |diff| {diff.max().item():.3g}, first at {where}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_matches_bitsandbytes(shape, dtype, double_quant):
    for scale in SCALES:
        w = (torch.randn(shape) * scale).to(dtype)
        q = quant.quantize_nf4(w, double_quant=double_quant)
        packed, st = _bnb_quantize(w, double_quant)
        assert torch.equal(q.data, packed), _report(q.data, packed)
        assert torch.equal(q.absmax, st.absmax), _report(q.absmax, st.absmax)
        assert torch.equal(q.code, st.code)
        if double_quant:
            assert torch.equal(q.nested_absmax, st.state2.absmax), _report(q.nested_absmax, st.state2.absmax)
            assert torch.equal(q.nested_code, st.state2.code)
            assert torch.equal(q.offset, st.offset)
        for out_dtype in DTYPES:
            ours = q.dequantize(out_dtype)
            theirs = _bnb_dequantize(packed, st, out_dtype)
            assert ours.dtype == out_dtype
            assert torch.equal(ours, theirs), _report(ours, theirs)


def test_absmax_quantizer_is_not_round_to_nearest():
    # The trap DESIGN.md names: the 8-bit absmax codes must follow bitsandbytes' table, which differs from
    # nearest-level rounding for roughly one value in 500. Check both facts on a large sample.
    code = quant.dynamic_map_8bit()
    x = torch.randn(256 * 400)
    ours, absmax = quantize_blockwise_8bit_ref(x, code, 256)
    theirs, state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(ours, theirs), _report(ours, theirs)
    v = (x.view(-1, 256) / absmax.view(-1, 1)).reshape(-1)
    nearest = (v.view(-1, 1) - code.view(1, -1)).abs().argmin(dim=1).to(torch.uint8)
    assert (nearest != ours).sum() > 0  # a nearest-rounding implementation would fail the equality above


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(quant.dynamic_map_8bit(), bnbF.create_dynamic_map())


def test_padding_nibble_is_code_7():
    w = torch.randn(3, 5)  # 15 elements
    q = quant.quantize_nf4(w)
    assert q.data.shape == (8, 1)
    assert int(q.data[-1, 0]) & 0xF == 7
    assert quant.NF4_CODE[7] == 0.0


def test_zero_and_constant_weights():
    for w in (torch.zeros(4, 64), torch.full((2, 130), 0.5)):
        q = quant.quantize_nf4(w, double_quant=False)
        packed, st = _bnb_quantize(w, False)
        assert torch.equal(q.data, packed) and torch.equal(q.absmax, st.absmax)
        assert torch.equal(q.dequantize(), _bnb_dequantize(packed, st, torch.float32))


def test_dequantize_error_and_size():
    w = torch.randn(256, 512) * 0.02
    q = quant.quantize_nf4(w)
    rel = (q.dequantize() - w).norm() / w.norm()
    assert rel < 0.12  # NF4 on Gaussian weights: ~0.1 relative error
    assert q.nbytes < w.numel() * 2 / 3.8  # ~3.9x smaller than bf16


def test_dequantize_out_buffer_and_backend_errors():
    q = quant.quantize_nf4(torch.randn(8, 64))
    out = torch.empty(8, 64, dtype=torch.bfloat16)
    res = quant.dequantize_nf4(q, torch.bfloat16, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, quant.dequantize_nf4_ref(q, torch.bfloat16))
    with pytest.raises(ValueError, match="out must be a torch.bfloat16 tensor of shape \\(8, 64\\) on cpu, contiguous or "
                       "with rows apart .* got torch.bfloat16 \\(8, 63\\)"):
        quant.dequantize_nf4(q, torch.bfloat16, out=torch.empty(8, 63, dtype=torch.bfloat16))
    wide = torch.zeros(8, 80, dtype=torch.bfloat16)  # a column slice of a wider buffer is a valid out
    quant.dequantize_nf4(q, torch.bfloat16, out=wide[:, 16:])
    assert torch.equal(wide[:, 16:], quant.dequantize_nf4_ref(q, torch.bfloat16)) and not wide[:, :16].any()
    with pytest.raises(ValueError, match="backend must be one of"):
        quant.dequantize_nf4(q, backend="fast")
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        quant.dequantize_nf4(q, torch.int8)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_roundtrip_with_bitsandbytes(double_quant):
    prefix = "model.layers.0.mlp.down_proj."
    w = torch.randn(40, 72).to(torch.bfloat16)
    q = quant.quantize_nf4(w, double_quant=double_quant)
    sd = q.state_dict(prefix)
    expected = {prefix + "weight", prefix + "weight.absmax", prefix + "weight.quant_map",
                prefix + "weight." + QUANT_STATE_KEY}
    if double_quant:
        expected |= {prefix + "weight.nested_absmax", prefix + "weight.nested_quant_map"}
    assert set(sd) == expected

    # ours -> bitsandbytes
    qs = {k[len(prefix + "weight."):]: v for k, v in sd.items() if k != prefix + "weight"}
    st = bnbF.QuantState.from_dict(qs, device=torch.device("cpu"))
    assert torch.equal(bnbF.dequantize_4bit(sd[prefix + "weight"], quant_state=st), q.dequantize())

    # bitsandbytes -> ours: the keys Linear4bit writes (weight + "weight." + packed quant state)
    packed, st = _bnb_quantize(w, double_quant)
    bsd = {prefix + "weight": packed}
    bsd.update({prefix + "weight." + k: v for k, v in st.as_dict(packed=True).items()})
    q2 = quant.NF4Weight.from_state_dict(bsd, prefix)
    assert q2.shape == (40, 72) and q2.dtype == torch.bfloat16 and q2.double_quant == double_quant
    assert torch.equal(q2.dequantize(), _bnb_dequantize(packed, st, torch.bfloat16))
    # and the JSON we write is the JSON bitsandbytes writes
    ours_json = json.loads(bytes(sd[prefix + "weight." + QUANT_STATE_KEY].tolist()))
    theirs_json = json.loads(bytes(bsd[prefix + "weight." + QUANT_STATE_KEY].tolist()))
    assert ours_json == theirs_json


def test_linear4bit_module_loads_our_state_dict():
    # What transformers does with a "-bnb-4bit" checkpoint: Params4bit.from_prequantized on the keys.
    bnb = pytest.importorskip("bitsandbytes")
    lin = torch.nn.Linear(64, 32, bias=True)
    ours = quant.NF4Linear.from_linear(lin)
    sd = ours.state_dict()
    theirs = bnb.nn.Linear4bit(64, 32, bias=True, quant_type="nf4", compress_statistics=True,
                               compute_dtype=torch.float32)
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    theirs.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(sd["bias"])
    x = torch.randn(5, 64)
    assert torch.equal(theirs.weight.quant_state.absmax, ours.weight.absmax)
    assert torch.allclose(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def test_nf4_linear_forward_and_state_dict():
    lin = torch.nn.Linear(130, 70, bias=True)
    m = quant.NF4Linear.from_linear(lin)
    x = torch.randn(2, 3, 130)
    ref = torch.nn.functional.linear(x, m.dequantize(torch.float32), lin.bias)
    assert torch.allclose(m(x), ref, atol=1e-6)
    # 4-bit weights: the output's relative error is ~0.09 (max 0.104 over 200 seeds); 0.15 catches a broken format
    assert (m(x) - lin(x)).norm() < 0.15 * lin(x).norm()

    sd = m.state_dict()
    m2 = quant.NF4Linear.from_linear(torch.nn.Linear(130, 70, bias=True))
    m2.load_state_dict(sd)
    assert torch.equal(m2.weight.data, m.weight.data) and torch.equal(m2(x), m(x))
    assert "nf4" in repr(m) and "MiB" in repr(m.weight)


def test_quantize_errors_name_the_problem():
    with pytest.raises(ValueError, match="must be 2-D"):
        quant.quantize_nf4(torch.randn(4, 4, 4))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16, got torch.int32"):
        quant.quantize_nf4(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quant.quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="empty"):
        quant.quantize_nf4(torch.randn(0, 4))


def test_state_dict_errors_name_the_key():
    p = "m."
    sd = quant.quantize_nf4(torch.randn(8, 64)).state_dict(p)
    qkey = p + "weight." + QUANT_STATE_KEY

    bad = dict(sd)
    del bad[p + "weight.absmax"]
    with pytest.raises(KeyError, match="missing key 'm.weight.absmax'"):
        quant.NF4Weight.from_state_dict(bad, p)

    bad = dict(sd, **{qkey: torch.tensor(list(b"{not json"), dtype=torch.uint8)})
    with pytest.raises(ValueError, match="does not hold UTF-8 JSON"):
        quant.NF4Weight.from_state_dict(bad, p)

    def with_json(**changes):
        d = json.loads(bytes(sd[qkey].tolist()))
        d.update(changes)
        d = {k: v for k, v in d.items() if v is not None}
        return dict(sd, **{qkey: torch.tensor(list(json.dumps(d).encode()), dtype=torch.uint8)})

    with pytest.raises(ValueError, match="for 'm.weight': packed data must be uint8 with .* = 512 bytes"):
        quant.NF4Weight.from_state_dict(with_json(shape=[16, 64]), p)
    bad = dict(sd, **{p + "weight.absmax": sd[p + "weight.absmax"][:-1]})
    with pytest.raises(ValueError, match="for 'm.weight': absmax must hold one value per block of 64 \\(8 "):
        quant.NF4Weight.from_state_dict(bad, p)
    with pytest.raises(ValueError, match="quant_type must be 'nf4'"):
        quant.NF4Weight.from_state_dict(with_json(quant_type="fp4"), p)
    with pytest.raises(ValueError, match="shape must be \\[N, K\\]"):
        quant.NF4Weight.from_state_dict(with_json(shape=[512]), p)
    with pytest.raises(ValueError, match="contradicts the tensors"):
        quant.NF4Weight.from_state_dict(with_json(nested_offset=None), p)
    with pytest.raises(ValueError, match="missing field 'dtype'"):
        quant.NF4Weight.from_state_dict(with_json(dtype=None), p)


def test_to_device_roundtrip():
    q = quant.quantize_nf4(torch.randn(8, 64))
    q2 = q.to("cpu")
    assert torch.equal(q2.dequantize(), q.dequantize())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1031, 67), (14336, 4096), (3, 7)])
def test_quantize_on_cuda_matches_cpu_and_bitsandbytes(shape):
    w = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    q_cpu = quant.quantize_nf4(w)
    q_gpu = quant.quantize_nf4(w.cuda())
    for name in ("data", "absmax", "nested_absmax", "offset"):
        a, b = getattr(q_cpu, name), getattr(q_gpu, name).cpu()
        assert torch.equal(a, b), f"{name}: {_report(a, b)}"
    # bitsandbytes' CUDA dequantization of our bytes equals our reference on the GPU.
    sd = q_gpu.state_dict("")
    st = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"},
                                   device=torch.device("cuda"))
    for dtype in DTYPES:
        st.dtype = dtype
        theirs = bnbF.dequantize_4bit(sd["weight"], quant_state=st)
        ours = quant.dequantize_nf4(q_gpu, dtype, backend="torch")
        assert torch.equal(ours, theirs), _report(ours, theirs)
