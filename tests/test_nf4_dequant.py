"""NF4 dequantization kernels (Triton and CUDA C++): bit-exact against the reference (the spec) and against
bitsandbytes' dequantize_4bit (the independent oracle), every output dtype, partial blocks and odd n, ``out=``,
torch.compile, and the CUDA source compiling for sm_90."""
import copy
import shutil

import pytest
import torch

import csrc
import quant
from quant.nf4 import dequantize_nf4_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# CPU (interpreter) shapes, small: (N, K) each with a reason.
CPU_SHAPES = [
    (1, 1),      # a single element: one partial block, the padding nibble
    (3, 7),      # odd element count inside one partial block
    (64, 64),    # whole blocks only, several tile rows
    (17, 300),   # partial last block, odd N
    (130, 129),  # odd N*K, odd N and K: the last byte's low nibble is padding
    (260, 66),   # 269 blocks: a second, partial nested group of 256 blocks
]

# GPU shapes: odd ones and the Llama-3-8B projections (C=4096, F=14336, V=128256).
GPU_SHAPES = [
    (1, 1),          # single element
    (3, 7),          # odd n, partial block
    (130, 129),      # odd n
    (1031, 67),      # > 1000 blocks, odd n, partial nested group
    (96, 4100),      # Llama-odd K: rows straddle blocks
    (1, 8191),       # just under a CUDA block's 8192 elements: scalar tail of 31
    (4097, 33),      # odd N, tiny K
    (1024, 4096),    # k/v projections (GQA: 8 heads x 128)
    (4096, 4096),    # q/o projections
    (14336, 4096),   # gate/up projections
    (4096, 14336),   # down projection
    (128256, 4096),  # vocab-sized: fp32 output passes 2^31 bytes (int64 offsets)
]


def _report(a, b):
    diff = (a.float() - b.float()).abs()
    bad = a != b
    n = int(bad.sum())
    where = tuple(int(i) for i in torch.nonzero(bad)[0]) if n else None
    return f"{n} of {a.numel()} differ, max |diff| {diff.max().item():.3g}, first at {where}"


def _quantized(shape, device, double_quant=True, blocksize=64):
    w = torch.randn(shape, device=device) * torch.rand((), device=device).add(0.01)
    return quant.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)


# -- CPU: the Triton kernel under the interpreter -----------------------------------------------------------
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_bit_exact_cpu(shape, double_quant):
    q = _quantized(shape, "cpu", double_quant)
    for dtype in DTYPES:
        got = quant.dequantize_nf4(q, dtype, backend="triton")
        want = dequantize_nf4_ref(q, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, want), f"{dtype}: {_report(got, want)}"


@pytest.mark.parametrize("byte_gather", [True, False])
def test_triton_both_formulations_cpu(byte_gather):
    """Both formulations of the kernel (the launcher picks one by size)."""
    import triton

    from triton_ops.nf4_dequant import _nf4_dequant_kernel

    for shape, double_quant in (((130, 129), True), ((260, 66), False)):
        q = _quantized(shape, "cpu", double_quant)
        dummy = q.absmax
        for dtype in DTYPES:
            out = torch.full(shape, float("nan"), dtype=dtype)
            n = out.numel()
            _nf4_dequant_kernel[(triton.cdiv(triton.cdiv(n, 64), 4096 // 64),)](
                q.data, q.absmax, q.nested_absmax if double_quant else dummy, q.nested_code if double_quant else dummy,
                q.offset.reshape(1) if double_quant else dummy, q.code, out, n, q.data.numel(), BLOCKSIZE=64,
                NESTED_BLOCKSIZE=256, DOUBLE_QUANT=double_quant, INTERPRET_BF16=dtype == torch.bfloat16, TILE=4096,
                BYTE_GATHER=byte_gather)
            want = dequantize_nf4_ref(q, dtype)
            assert torch.equal(out, want), f"{dtype} {shape}: {_report(out, want)}"


def test_triton_blocksize_128_cpu():
    q = _quantized((40, 100), "cpu", blocksize=128)  # partial last block of a non-default blocksize
    got = quant.dequantize_nf4(q, torch.bfloat16, backend="triton")
    want = dequantize_nf4_ref(q, torch.bfloat16)
    assert torch.equal(got, want), _report(got, want)


def test_triton_out_cpu():
    q = _quantized((33, 70), "cpu")
    out = torch.full((33, 70), float("nan"), dtype=torch.float16)
    got = quant.dequantize_nf4(q, torch.float16, out=out, backend="triton")
    assert got.data_ptr() == out.data_ptr()
    want = dequantize_nf4_ref(q, torch.float16)
    assert torch.equal(out, want), _report(out, want)


def test_triton_compile_fullgraph_cpu():
    q = _quantized((20, 64), "cpu")
    out = torch.empty(20, 64, dtype=torch.bfloat16)

    def f(o):
        a = quant.dequantize_nf4(q, torch.float16, backend="triton")
        quant.dequantize_nf4(q, torch.bfloat16, out=o, backend="triton")
        return a

    got = torch.compile(f, fullgraph=True)(out)
    assert torch.equal(got, dequantize_nf4_ref(q, torch.float16))
    assert torch.equal(out, dequantize_nf4_ref(q, torch.bfloat16))


def test_errors():
    q = _quantized((8, 64), "cpu")
    with pytest.raises(ValueError, match="out must be a contiguous"):
        quant.dequantize_nf4(q, torch.float16, out=torch.empty(8, 64, dtype=torch.float32), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        quant.dequantize_nf4(q, backend="nope")
    from triton_ops.nf4_dequant import nf4_dequantize_tensors

    with pytest.raises(ValueError, match="absmax must be contiguous"):
        nf4_dequantize_tensors(q.data, q.absmax.float(), q.nested_absmax, q.nested_code, q.offset, q.code, q.shape)
    with pytest.raises(ValueError, match="data must be contiguous uint8"):
        nf4_dequantize_tensors(q.data[:-1], q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.shape)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_sm90():
    csrc.nvcc_compile_check("nf4_dequant.cu", arch="sm_90")


# -- GPU ---------------------------------------------------------------------------------------------------
try:
    import cupy  # noqa: F401  (the CUDA C++ backend compiles through CuPy/NVRTC)

    HAS_CUPY = True
except ImportError:
    HAS_CUPY = False
BACKENDS = ["triton", "cuda"] if HAS_CUPY else ["triton"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUPY, reason="cupy not installed: the CUDA C++ backend is not tested")
def test_cuda_backend_runs_gpu():
    q = _quantized((64, 64), "cuda")
    got = quant.dequantize_nf4(q, torch.bfloat16, backend="cuda")
    assert torch.equal(got, dequantize_nf4_ref(q, torch.bfloat16)), "CUDA C++ backend"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_bit_exact_gpu(shape):
    q = _quantized(shape, "cuda")
    want32 = dequantize_nf4_ref(q, torch.float32)  # the spec; any dtype's answer is this cast once
    for dtype in DTYPES:
        want = want32.to(dtype)
        for backend in BACKENDS:
            got = quant.dequantize_nf4(q, dtype, backend=backend)
            assert torch.equal(got, want), f"{backend} {dtype}: {_report(got, want)}"
            del got
    del want32
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 7), (1031, 67), (1, 8191)])
def test_no_double_quant_and_blocksizes_gpu(shape):
    for double_quant, blocksize in ((False, 64), (True, 128), (True, 32), (False, 256)):
        q = _quantized(shape, "cuda", double_quant, blocksize)
        for dtype in DTYPES if blocksize == 64 else [torch.bfloat16]:  # fewer kernel variants to compile
            want = dequantize_nf4_ref(q, dtype)
            for backend in BACKENDS:
                got = quant.dequantize_nf4(q, dtype, backend=backend)
                assert torch.equal(got, want), f"{backend} {dtype} dq={double_quant} B={blocksize}: {_report(got, want)}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 7), (130, 129), (1031, 67), (4096, 4096), (14336, 4096), (4096, 14336)])
def test_matches_bitsandbytes_gpu(shape):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    # Our kernels on bitsandbytes' own bytes and state (its CUDA quantizer, its tensors).
    q = quant.NF4Weight(packed.reshape(-1, 1), state.absmax, shape, torch.bfloat16, 64, state.code,
                        state.state2.absmax, state.state2.code, state.offset.reshape(()).float(), state.state2.blocksize)
    for dtype in DTYPES:
        st = copy.copy(state)
        st.dtype = dtype
        want = bnbF.dequantize_4bit(packed, quant_state=st)
        for backend in BACKENDS:
            got = quant.dequantize_nf4(q, dtype, backend=backend)
            assert torch.equal(got, want), f"{backend} {dtype}: {_report(got, want)}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_out_and_unaligned_gpu(backend):
    if backend not in BACKENDS:
        pytest.skip("cupy not installed")
    shape = (257, 129)
    q = _quantized(shape, "cuda")
    for dtype in DTYPES:
        want = dequantize_nf4_ref(q, dtype)
        out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        got = quant.dequantize_nf4(q, dtype, out=out, backend=backend)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, want), _report(out, want)
        # An output buffer 2 bytes past a 16-byte boundary: the CUDA kernel must take its scalar path.
        base = torch.full((shape[0] * shape[1] + 8,), float("nan"), device="cuda", dtype=dtype)
        odd = base[1:1 + shape[0] * shape[1]].view(shape)
        quant.dequantize_nf4(q, dtype, out=odd, backend=backend)
        assert torch.equal(odd, want), _report(odd, want)
        assert torch.isnan(base[0]) and torch.isnan(base[-1]), "wrote outside the output"


@pytest.mark.gpu
def test_auto_and_compile_gpu():
    from quant.dispatch import measured_choices

    q = _quantized((1024, 4096), "cuda")
    want = dequantize_nf4_ref(q, torch.bfloat16)
    got = quant.dequantize_nf4(q, torch.bfloat16)
    assert torch.equal(got, want), _report(got, want)
    assert any(v in ("triton", "cuda") for v in measured_choices().values()), measured_choices()
    for backend in ("auto",) + tuple(BACKENDS):
        f = torch.compile(lambda: quant.dequantize_nf4(q, torch.bfloat16, backend=backend), fullgraph=True)
        got = f()
        assert torch.equal(got, want), f"{backend}: {_report(got, want)}"
