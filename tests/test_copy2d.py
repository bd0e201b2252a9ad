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


def test_source_offsets_past_int32(device):
    """A transposed-like source whose column stride times the column index passes 2^31 elements (a 4 GiB fp16
    allocation, touched only at the 6 elements read): the kernel's source offsets must not wrap in int32 (it
    read out of bounds: a crash, hence the subprocess)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, torch\n"
        "from triton_ops.copy2d import copy2d_\n"
        "dev, s = sys.argv[1], 2**30 + 7\n"
        "big = torch.empty(2 * s + 2, dtype=torch.float16, device=dev)\n"
        "src = big.as_strided((2, 3), (1, s))\n"
        "want = torch.tensor([[1., 2., 3.], [4., 5., 6.]], dtype=torch.float16, device=dev)\n"
        "for m in range(2):\n"
        "    for n in range(3):\n"
        "        big[m + n * s] = want[m, n]\n"
        "dst = torch.zeros(2, 3, dtype=torch.float16, device=dev)\n"
        "copy2d_(dst, src, kernel=True)\n"
        "assert torch.equal(dst, want), dst\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(root))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, "-c", code, device], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "ok" in p.stdout, \
        f"triton_ops/copy2d.py: source offsets past 2^31 (rc {p.returncode}): {p.stdout[-1500:]} {p.stderr[-1500:]}"


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
