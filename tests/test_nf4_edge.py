"""NF4 with unusual input: odd element counts, zeros, non-finite values, views, checkpoints of modules holding
NF4Linear (missing, mis-shaped and unexpected keys), device/dtype moves, and the errors bad calls get.
bitsandbytes (CPU) is the oracle wherever bytes are involved."""
import copy

import pytest
import torch
from torch import nn

import quant
from quant import NF4Linear

bnbF = pytest.importorskip("bitsandbytes.functional")


def _bnb(w, double_quant):
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def _assert_bytes_match_bnb(w, double_quant):
    q = quant.quantize_nf4(w, double_quant=double_quant)
    packed, st = _bnb(w, double_quant)
    assert torch.equal(q.data, packed) and torch.equal(q.absmax, st.absmax)
    if double_quant:
        assert torch.equal(q.nested_absmax, st.state2.absmax) and torch.equal(q.offset, st.offset)
    st = copy.copy(st)
    st.dtype = torch.float32
    assert torch.equal(q.dequantize(torch.float32), bnbF.dequantize_4bit(packed, quant_state=st))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [
    (1, 256 * 64 + 1),  # one element past a full nested group: a 1-element block alone in the second group
    (2, 256 * 32 - 3),  # odd count just under one nested group, partial last 64-block
    (1, 63),            # a single partial block
])
def test_block_boundaries_match_bitsandbytes(shape, double_quant):
    _assert_bytes_match_bnb((torch.randn(shape) * 0.02).to(torch.bfloat16), double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_all_zero_and_one_element_weights(double_quant):
    for w in (torch.zeros(1, 1), torch.zeros(3, 7), torch.zeros(2, 256 * 64 + 5), torch.full((1, 1), -3.0)):
        _assert_bytes_match_bnb(w, double_quant)
    assert not quant.quantize_nf4(torch.zeros(3, 7), double_quant=double_quant).dequantize().any()


def test_transposed_view_quantizes_its_logical_layout():
    w = torch.randn(70, 130, dtype=torch.float16)
    q = quant.quantize_nf4(w.t())  # (130, 70), not contiguous
    assert q.shape == (130, 70)
    assert torch.equal(q.data, quant.quantize_nf4(w.t().contiguous()).data)
    _assert_bytes_match_bnb(w.t(), True)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("double_quant", [True, False])
def test_non_finite_weight_is_refused_with_its_position(value, double_quant):
    w = torch.randn(4, 100)
    w[2, 71] = value
    with pytest.raises(ValueError, match=r"shape \(4, 100\) has 1 non-finite values \(first: .* at \[2, 71\]\)"):
        quant.quantize_nf4(w.to(torch.bfloat16), double_quant=double_quant)


def test_why_non_finite_is_refused():
    # What accepting it would give (bitsandbytes' own behaviour): one NaN makes the whole weight NaN, through the
    # double-quantization offset (the mean of all block scales).
    w = torch.randn(8, 64)
    w[0, 0] = float("nan")
    packed, st = _bnb(w, True)
    assert bnbF.dequantize_4bit(packed, quant_state=st).isnan().all()


def test_nested_blocksize_must_be_a_power_of_two():
    q = quant.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="nested_blocksize must be a positive power of two .* got 0"):
        quant.NF4Weight(q.data, q.absmax, q.shape, q.dtype, 64, q.code, q.nested_absmax, q.nested_code, q.offset, 0)


def test_nf4weight_to_a_dtype_says_what_to_do():
    q = quant.quantize_nf4(torch.randn(8, 64))
    assert torch.equal(q.to("cpu").dequantize(), q.dequantize())
    with pytest.raises(TypeError, match=r"expected a device, got the dtype torch.float16.*dequantize\(dtype=...\)"):
        q.to(torch.float16)


# -- modules holding NF4Linear: state_dict / load_state_dict ---------------------------------------------------
class _Net(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.up = NF4Linear.from_linear(nn.Linear(64, 96, bias=bias))
        self.down = NF4Linear.from_linear(nn.Linear(96, 40, bias=False), double_quant=False)
        self.norm = nn.LayerNorm(40)

    def forward(self, x):
        return self.norm(self.down(self.up(x)))


def test_model_state_dict_roundtrip_through_safetensors():
    from safetensors.torch import load, save

    torch.manual_seed(0)
    net = _Net()
    sd = net.state_dict()
    assert sd["up.weight"].dtype == torch.uint8 and sd["up.weight"].shape == (64 * 96 // 2, 1)
    assert sd["up.weight.absmax"].dtype == torch.uint8 and sd["up.weight.nested_absmax"].shape == (1,)
    assert sd["down.weight.absmax"].dtype == torch.float32 and "down.weight.nested_absmax" not in sd
    assert "down.bias" not in sd
    torch.manual_seed(1)
    net2 = _Net()
    assert net2.load_state_dict(load(save(sd)), strict=True) is not None
    x = torch.randn(2, 5, 64)
    assert torch.equal(net2(x), net(x))


def test_load_reports_a_missing_weight_even_with_its_bias_present():
    net = _Net()
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("up.weight")}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "up.weight"'):
        _Net().load_state_dict(sd)
    assert _Net().load_state_dict(sd, strict=False).missing_keys == ["up.weight"]


def test_load_refuses_a_weight_of_another_shape_naming_key_and_shapes():
    small = NF4Linear.from_linear(nn.Linear(64, 16, bias=False))
    before = small.weight
    sd = NF4Linear.from_linear(nn.Linear(64, 32, bias=False)).state_dict(prefix="")
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: .* shape \(32, 64\), the module expects "
                                           r"\(16, 64\)"):
        small.load_state_dict(sd)
    assert small.weight is before and small(torch.randn(3, 64)).shape == (3, 16)


def test_load_refuses_a_mis_shaped_bias_naming_the_key():
    net = _Net()
    sd = dict(net.state_dict(), **{"up.bias": torch.zeros(95)})
    with pytest.raises(RuntimeError, match=r"size mismatch for up.bias: .* shape \(95,\), the module expects \(96,\)"):
        _Net().load_state_dict(sd)


def test_load_reports_unexpected_keys():
    net = _Net(bias=False)
    sd = dict(net.state_dict(), **{"up.weight.stray": torch.zeros(1), "up.extra": torch.zeros(1),
                                   "up.bias": torch.zeros(96)})
    res = _Net(bias=False).load_state_dict(sd, strict=False)
    assert sorted(res.unexpected_keys) == ["up.bias", "up.extra", "up.weight.stray"] and res.missing_keys == []
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _Net(bias=False).load_state_dict(sd)


def test_module_dtype_cast_keeps_the_bytes():
    net = _Net()
    data = net.up.weight.data
    net.to("cpu").to(torch.float16)
    assert net.up.weight.data is data and net.up.bias.dtype == torch.float16
    assert net.up.weight.dtype == torch.float32  # the original dtype, dequantize()'s default
    assert net(torch.randn(3, 64, dtype=torch.float16)).dtype == torch.float16


# -- forward / matmul_nf4 ---------------------------------------------------------------------------------------
def test_forward_batch_dims_bias_and_autocast():
    lin = nn.Linear(130, 70)
    m = NF4Linear.from_linear(lin)
    x = torch.randn(2, 3, 130)
    ref = torch.nn.functional.linear(x, m.dequantize(torch.float32), lin.bias)
    assert torch.equal(m(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 70)
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match=r"x of shape \(2, 3, 129\) has 129 features but the weight is \(70, 130\)"):
        m(torch.randn(2, 3, 129))
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        m(torch.tensor(1.0))
    with pytest.raises(TypeError, match="expected an NF4Weight, got Tensor"):
        quant.matmul_nf4(x, torch.randn(70, 130))


@pytest.mark.parametrize("backend", ["auto", "torch", "dequant"])
@pytest.mark.parametrize("m", [0, 1, 3, 17])
def test_matmul_row_counts(backend, m):
    q = quant.quantize_nf4(torch.randn(24, 100))
    x = torch.randn(m, 100)
    b = torch.randn(24)
    y = quant.matmul_nf4(x, q, b, backend=backend)
    assert y.shape == (m, 24)
    assert torch.allclose(y, x @ q.dequantize().T + b, atol=1e-5)


def test_dequantize_out_of_the_wrong_dtype_or_layout():
    q = quant.quantize_nf4(torch.randn(8, 64))
    for out, why in ((torch.empty(8, 64, dtype=torch.float16), r"got torch.float16 \(8, 64\)"),
                     (torch.empty(64, 8).t(), r"got torch.float32 \(8, 64\) on cpu with strides \(1, 8\)"),
                     (torch.empty(8, 128)[:, ::2], r"with strides \(128, 2\)"),
                     (torch.empty(512), r"got torch.float32 \(512,\)")):
        want = r"out must be a torch.float32 tensor of shape \(8, 64\) on cpu, contiguous or with rows apart.*"
        with pytest.raises(ValueError, match=want + why):
            quant.dequantize_nf4(q, torch.float32, out=out)
