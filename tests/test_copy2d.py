"""triton_ops.copy2d: dst <- alpha·src into a column slice of a wider buffer (the adapter fold's assembly)."""
import pytest
import torch

from triton_ops.copy2d import copy2d_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(M, N, lo, hi, src_dtype, dst_dtype, alpha, device, kernel, transposed=False):
    src = torch.randn(N, M, device=device).to(src_dtype).t() if transposed else \
        torch.randn(M, N, device=device).to(src_dtype)
    buf = torch.full((M, lo + N + hi), float("nan"), device=device, dtype=dst_dtype)
    dst = buf[:, lo:lo + N]
    got = copy2d_(dst, src, alpha, kernel=kernel)
    want = (src.float() * alpha).to(dst_dtype) if (alpha != 1.0 or src_dtype != dst_dtype) else src
    assert got.data_ptr() == dst.data_ptr()
    assert torch.equal(dst, want), (dst - want).abs().max()
    assert torch.isnan(buf[:, :lo]).all() and torch.isnan(buf[:, lo + N:]).all(), "wrote outside dst"


@pytest.mark.parametrize("kernel", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_and_scale_into_a_column_slice(dtype, kernel, device):
    """Bit-exact against torch's fp32 product rounded once (nearest even; bf16 under the interpreter too),
    odd shapes, tiles partial in both dimensions, transposed sources, fp32 -> 16-bit with a scale."""
    for M, N, lo, hi in ((37, 70, 16, 8), (5, 1030, 0, 3), (300, 16, 24, 0)):
        _case(M, N, lo, hi, dtype, dtype, 1.0, device, kernel)
        _case(M, N, lo, hi, torch.float32, dtype, 0.3, device, kernel)
        _case(M, N, lo, hi, dtype, dtype, 2.0, device, kernel, transposed=True)


def test_errors():
    buf = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="unit column stride"):
        copy2d_(buf.t()[:, :4], torch.zeros(10, 4))
    with pytest.raises(ValueError, match="src of its shape"):
        copy2d_(buf[:, :5], torch.zeros(4, 6))


@pytest.mark.gpu
def test_copy2d_gpu_real_shapes():
    """The fold's copies at the 8B step's shapes: x (4096, 4096) into [xa | x | xa], s·B (14336, 16) fp32 ->
    bf16 into [s·B | W]."""
    _case(4096, 4096, 16, 16, torch.bfloat16, torch.bfloat16, 1.0, "cuda", None)
    _case(14336, 16, 0, 4096, torch.float32, torch.bfloat16, 0.5, "cuda", None)
    _case(4096, 16, 4096, 0, torch.bfloat16, torch.bfloat16, 1.0, "cuda", None)
    _case(523, 4100, 64, 64, torch.float16, torch.float16, 1.0, "cuda", None)
