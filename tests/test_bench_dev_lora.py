"""bench/dev/lora_skinny (CPU, Triton interpreter): the rank-R GEMM kernels against torch on odd shapes, every split,
strided operands (w = A.t(), dB's transposed output), and fp32 atomics."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.dev.lora_skinny import gt_x, x_wt

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("M,K,R", [(37, 70, 16), (64, 257, 8), (5, 33, 20)])
def test_x_wt_matches_torch(M, K, R, split_k):
    g = torch.Generator().manual_seed(M * K + R)
    x = torch.randn(M, K, generator=g)
    A = torch.randn(R, K, generator=g)
    got = x_wt(x, A.t(), block_m=16, block_k=32, split_k=split_k)
    torch.testing.assert_close(got, x @ A.t(), rtol=1e-5, atol=1e-4)
    B = torch.randn(K, R, generator=g)  # dyB = dy·B: w contiguous (K, R)
    torch.testing.assert_close(x_wt(x, B, block_m=16, block_k=32, split_k=split_k), x @ B, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("split_m", [1, 4])
@pytest.mark.parametrize("M,K,R", [(37, 70, 16), (130, 48, 8), (64, 33, 20)])
def test_gt_x_matches_torch(M, K, R, split_m):
    gen = torch.Generator().manual_seed(M + K * R)
    G = torch.randn(M, R, generator=gen)
    x = torch.randn(M, K, generator=gen)
    got = gt_x(G, x, 0.5, block_m=16, block_k=16, split_m=split_m)
    assert got.dtype == torch.float32 and got.shape == (R, K)
    torch.testing.assert_close(got, 0.5 * G.t() @ x, rtol=1e-5, atol=1e-4)
    # dB = s·dyᵀ·xa computed as (s·xaᵀ·dy)ᵀ: the kernel's output transposed
    dy = torch.randn(M, K, generator=gen)
    torch.testing.assert_close(gt_x(G, dy, 2.0, block_m=16, block_k=16, split_m=split_m).t(), 2.0 * dy.t() @ G,
                               rtol=1e-5, atol=1e-4)


def test_shape_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"w must be \(K=8, R\)"):
        x_wt(torch.zeros(4, 8), torch.zeros(7, 16))
    with pytest.raises(ValueError, match=r"x must be \(M=4, K\)"):
        gt_x(torch.zeros(4, 16), torch.zeros(5, 8))
    with pytest.raises(ValueError, match="one dtype"):
        x_wt(torch.zeros(4, 8), torch.zeros(8, 16, dtype=torch.float64))


_COMPILE_SM90 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bench.dev import lora_skinny as L

target = GPUTarget("cuda", 90, 32)
ints = {n: "i32" for n in ("M", "K", "R")}
cases = [
    (L._x_wt_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", **ints,
                      **{s: "i32" for s in ("sxm", "sxk", "swk", "swr", "som", "sor")}},
     {"BLOCK_M": 32, "BLOCK_K": 128, "BLOCK_R": 16, "SPLIT_K": 4, "PREC": "tf32"}),
    (L._gt_x_kernel, {"g_ptr": "*bf16", "x_ptr": "*bf16", "out_ptr": "*fp32", **ints,
                      **{s: "i32" for s in ("sgm", "sgr", "sxm", "sxk", "sor", "sok")}, "scale": "fp32"},
     {"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 16, "SPLIT_M": 4, "PREC": "tf32"}),
]
for fn, sig, consts in cases:
    sig = dict(sig, **{k: "constexpr" for k in consts})
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    except TypeError:  # an older ASTSource signature (triton 3.6's differs)
        print("SKIP: triton.compiler.ASTSource takes other arguments in this triton version")
        sys.exit(0)
    ptx = triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
    assert "mma" in ptx or "wgmma" in ptx, f"{fn.fn.__name__}: no tensor-core MMA in the PTX"
print("OK")
"""


def test_kernels_compile_for_sm90():
    """Both kernels through Triton's real GPU pipeline (PTX for sm_90) on this CPU machine, with the constexprs the
    GPU sweep uses: catches what the interpreter accepts but the compiler rejects (dot shapes, atomics, layouts).
    In a fresh process without TRITON_INTERPRET: this suite defines every Triton function (triton.language's own
    too) for the interpreter (tests/conftest.py), which the compiler cannot take."""
    pytest.importorskip("triton.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, f"compile for sm_90 failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    if r.stdout.strip().startswith("SKIP"):
        pytest.skip(r.stdout.strip())
    assert r.stdout.strip().endswith("OK")


@pytest.mark.gpu
@pytest.mark.parametrize("K", [4096, 14336])
def test_real_shapes_bf16_gpu(K):
    """The 8B step's shapes in bf16 on the GPU, every split the sweep uses: within bf16 rounding of an fp32
    reference (2% of its largest magnitude)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(K)
    x = torch.randn(4096, K, device="cuda", generator=gen).to(torch.bfloat16)
    A = (torch.randn(16, K, device="cuda", generator=gen) / K**0.5).to(torch.bfloat16)
    G = torch.randn(4096, 16, device="cuda", generator=gen).to(torch.bfloat16)
    ref_xa, ref_da = x.float() @ A.float().t(), G.float().t() @ x.float()
    for split in (1, 2, 4):
        got = x_wt(x, A.t(), split_k=split).float()
        assert (got - ref_xa).abs().max() <= 0.02 * ref_xa.abs().max(), f"x_wt split_k={split}"
        got = gt_x(G, x, 1.0, split_m=split)
        assert (got - ref_da).abs().max() <= 0.02 * ref_da.abs().max(), f"gt_x split_m={split}"


def test_sweep_cases_cover_the_batched_dA_ranks():
    """triton_ops.lora's backward computes dA for a batched group in one GEMM, dyB_catᵀ·x of (ΣR, K): the sweep
    must time dA at the q|k|v (48) and gate|up (32) ranks, not only at a single adapter's 16."""
    from bench.dev.lora_sweep import _cases

    ranks = {(kind, n): set() for _, kind, n, _ in _cases()}
    for _, kind, n, R in _cases():
        ranks[kind, n].add(R)
    assert ranks["xa", 4096] == {16, 32, 48}
    assert ranks["dA", 4096] == {16, 32, 48}
    assert ranks["dA", 14336] == {16}
