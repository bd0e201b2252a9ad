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
    """Both formulations of the kernel (the launcher picks one by size), contiguous and rows-apart outputs."""
    import triton

    from triton_ops.nf4_dequant import _nf4_dequant_kernel

    for shape, double_quant, pad in (((130, 129), True, 0), ((260, 66), False, 0), ((70, 192), True, 24)):
        q = _quantized(shape, "cpu", double_quant)
        dummy = q.absmax
        for dtype in DTYPES:
            buf = torch.full((shape[0], shape[1] + pad), float("nan"), dtype=dtype)
            out = buf[:, pad:]
            n = out.numel()
            _nf4_dequant_kernel[(triton.cdiv(triton.cdiv(n, 64), 4096 // 64),)](
                q.data, q.absmax, q.nested_absmax if double_quant else dummy, q.nested_code if double_quant else dummy,
                q.offset.reshape(1) if double_quant else dummy, q.code, out, n, q.data.numel(),
                shape[1] if pad else 0, out.stride(0) if pad else 0, BLOCKSIZE=64,
                NESTED_BLOCKSIZE=256, DOUBLE_QUANT=double_quant, INTERPRET_BF16=dtype == torch.bfloat16, TILE=4096,
                BYTE_GATHER=byte_gather, STRIDED=pad > 0)
            want = dequantize_nf4_ref(q, dtype)
            assert torch.equal(out, want), f"{dtype} {shape}: {_report(out, want)}"
            assert torch.isnan(buf[:, :pad]).all()


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


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_rows_apart_cpu(dtype, backend):
    """out = a column slice of a wider buffer (rows ld apart): the weight lands in those columns bit-exactly and
    nothing else of the buffer is written; odd row counts, the last block partial across programs."""
    for shape, lo, hi in (((33, 128), 16, 24), ((5, 64), 8, 0), ((130, 192), 0, 8)):
        q = _quantized(shape, "cpu")
        buf = torch.full((shape[0], lo + shape[1] + hi), float("nan"), dtype=dtype)
        out = buf[:, lo:lo + shape[1]]
        got = quant.dequantize_nf4(q, dtype, out=out, backend=backend)
        want = dequantize_nf4_ref(q, dtype)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, want), _report(out, want)
        assert torch.isnan(buf[:, :lo]).all() and torch.isnan(buf[:, lo + shape[1]:]).all(), "wrote outside out"


@pytest.mark.parametrize("K", [100, 32, 192])
def test_out_one_row_column_slice_cpu(K):
    """A (1, K) column slice of a wider buffer is contiguous to torch (a size-1 dimension's stride is ignored), so
    the checks accept it for any K; the kernel must write it as one row, not as rows stride(0) apart (K = 100, 32:
    not whole blocks of 64, which wrote the second block into the next row or divided by K // 64 = 0)."""
    q = _quantized((1, K), "cpu")
    buf = torch.full((2, K + 20), float("nan"), dtype=torch.float32)
    out = buf[:1, 10:10 + K]
    quant.dequantize_nf4(q, torch.float32, out=out, backend="triton")
    want = dequantize_nf4_ref(q, torch.float32)
    assert torch.equal(out, want), f"(1, {K}) slice with strides {out.stride()}: {_report(out, want)}"
    assert torch.isnan(buf[:, :10]).all() and torch.isnan(buf[:, 10 + K:]).all() and torch.isnan(buf[1]).all(), \
        f"(1, {K}) slice: wrote outside out"


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
    with pytest.raises(ValueError, match="out must be a torch.float16 tensor"):
        quant.dequantize_nf4(q, torch.float16, out=torch.empty(8, 64, dtype=torch.float32), backend="triton")
    q2 = _quantized((8, 96), "cpu")  # K = 96: blocks of 64 span rows, so rows apart cannot be written
    with pytest.raises(ValueError, match="K a multiple of the blocksize 64"):
        quant.dequantize_nf4(q2, torch.float16, out=torch.empty(8, 100, dtype=torch.float16)[:, :96], backend="triton")
    with pytest.raises(ValueError, match="CUDA C.. kernel writes contiguous outputs only"):
        quant.dequantize_nf4(q, torch.float16, out=torch.empty(8, 80, dtype=torch.float16)[:, 8:72], backend="cuda")
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
@pytest.mark.parametrize("shape", [(14336, 4096), (4096, 14336), (1031, 192)])
def test_out_rows_apart_gpu(shape):
    """The Triton kernel writing rows ld apart (what triton_ops.lora's adapter fold uses): bit-exact, nothing
    outside the slice written, through "auto" too (which must pick the Triton kernel for it)."""
    q = _quantized(shape, "cuda")
    for dtype in DTYPES:
        want = dequantize_nf4_ref(q, dtype)
        for backend, lo, hi in (("triton", 16, 0), ("auto", 0, 16), ("auto", 8, 24)):
            buf = torch.full((shape[0], lo + shape[1] + hi), float("nan"), device="cuda", dtype=dtype)
            out = buf[:, lo:lo + shape[1]]
            quant.dequantize_nf4(q, dtype, out=out, backend=backend)
            assert torch.equal(out, want), _report(out, want)
            assert torch.isnan(buf[:, :lo]).all() and torch.isnan(buf[:, lo + shape[1]:]).all()


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


# -- CPU: the eager CUDA path's host work (kernels stubbed; no GPU needed) -----------------------------------------
def _stub_launches(monkeypatch):
    """Route dequantize_nf4's CUDA path through CPU tensors with both kernels recording their launches."""
    import csrc.nf4_dequant as cd
    import triton_ops.nf4_dequant as td

    seen = []

    class _Jit:  # stands in for the @triton.jit kernel: kernel[grid](*args, **kw)
        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append(("triton", grid, args, kw))

    monkeypatch.setattr(cd, "_kernel", lambda *key: lambda grid, block, args, stream=None: seen.append(
        ("cuda", grid, block, args)))
    monkeypatch.setattr(cd, "_stream", lambda index: None)
    monkeypatch.setattr(td, "_nf4_dequant_kernel", _Jit())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)  # == a CPU tensor's device.index
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    return seen


def test_eager_path_validates_once_and_never_syncs_cpu(monkeypatch):
    """After the first call on a weight, dequantize_nf4's eager CUDA path neither re-validates the weight nor calls
    anything that waits for the device (.item(), .tolist(), .cpu(), bool(tensor), synchronize), and launches one
    kernel per call with the output's pointer (both backends)."""
    import quant.dispatch as qd
    import triton_ops.nf4_dequant as td

    q = _quantized((64, 256), "cpu")
    seen = _stub_launches(monkeypatch)
    checks = []
    real_check = td._check
    monkeypatch.setattr(td, "_check", lambda *a, **k: (checks.append(1), real_check(*a, **k))[1])
    out = torch.empty(64, 256, dtype=torch.bfloat16)
    quant.dequantize_nf4(q, torch.bfloat16, out=out, backend="cuda")  # validates and plans
    assert len(checks) == 1 and len(seen) == 1

    def sync(*a, **k):
        raise AssertionError("device synchronization on the eager dequantize path")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    monkeypatch.setattr(torch.cuda, "synchronize", sync)
    for backend in ("cuda", "triton", "cuda", "triton"):
        y = quant.dequantize_nf4(q, torch.bfloat16, out=out, backend=backend)
        assert y is out
    fresh = quant.dequantize_nf4(q, torch.float16, backend="cuda")  # allocates its output
    assert fresh.shape == (64, 256) and fresh.dtype == torch.float16
    assert len(checks) == 1, "the weight was validated again"
    assert [s[0] for s in seen[1:]] == ["cuda", "triton", "cuda", "triton", "cuda"]
    assert int(seen[-1][3][6]) == fresh.data_ptr() and int(seen[1][3][6]) == out.data_ptr()
    assert seen[2][2][6] is out and seen[2][2][7] == 64 * 256
    # a replaced tensor on the weight is noticed: validated and planned again
    q.absmax = q.absmax.clone()
    quant.dequantize_nf4(q, torch.bfloat16, out=out, backend="cuda")
    assert len(checks) == 2 and int(seen[-1][3][1]) == q.absmax.data_ptr()
    assert len(qd._PREPARED) >= 1


def test_cuda_launch_arguments_match_kernel_cpu(monkeypatch):
    """The CUDA launcher's argument tuple matches nf4_dequant.cu's parameter list in count and C type, with the
    pointers, element count, block-size shifts and flags in place; the threads knob sets the block size."""
    import re

    import numpy as np

    import csrc.nf4_dequant as cd

    params = re.search(r"void __launch_bounds__\(256\) NAME\((.*?)\)\s*\{", csrc.source("nf4_dequant.cu"), re.S).group(1)
    params = [re.sub(r"\s+", " ", p.replace("\\", "")).strip() for p in params.split(",")]
    want = [np.uint64 if "*" in p else np.int64 if p.startswith("long long") else np.int32 for p in params]
    seen = _stub_launches(monkeypatch)
    q = _quantized((33, 130), "cpu")  # odd element count: a partial last block
    out = torch.empty(33, 130, dtype=torch.float16)
    quant.dequantize_nf4(q, torch.float16, out=out, backend="cuda")
    (_, grid, block, args), = seen
    assert [type(a) for a in args] == want, (params, [type(a).__name__ for a in args])
    named = dict(zip([p.split()[-1].lstrip("*") for p in params], args))
    assert [int(named[k]) for k in ("data", "absmax", "nested_absmax", "nested_code", "offset", "code", "out")] == \
        [t.data_ptr() for t in (q.data, q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, out)]
    assert (named["n"], named["log2_blocksize"], named["log2_nested"], named["double_quant"]) == (33 * 130, 6, 8, 1)
    assert named["vec"] == (q.data.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0)
    assert block == (cd.THREADS,) and grid[0] >= 1
    # storage reallocated in place (as FSDP2 frees and regathers parameters): the plan reads the new pointer
    old = q.data.data_ptr()
    q.data.untyped_storage().resize_(q.data.numel() * 64)  # > 128 KiB: a fresh mapping, not grown in place
    assert q.data.data_ptr() != old
    quant.dequantize_nf4(q, torch.float16, out=out, backend="cuda")
    assert int(seen[-1][3][0]) == q.data.data_ptr()
    monkeypatch.setattr(cd, "CONFIG_OVERRIDE", {"U": 4, "blocks_per_sm": 0, "threads": 64})
    quant.dequantize_nf4(q, torch.float16, out=out, backend="cuda")
    assert seen[-1][2] == (64,)
    monkeypatch.setattr(cd, "CONFIG_OVERRIDE", {"U": 1, "blocks_per_sm": 0, "threads": 48})
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.dequantize_nf4(q, torch.float16, out=out, backend="cuda")
