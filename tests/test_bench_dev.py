"""bench/dev NF4 dequant variants (CPU): the source compiles for sm_90 and has every kernel the loader can pick,
and the launch arithmetic (grids, arguments) for odd shapes, with the kernel call stubbed."""
import re
import shutil
import subprocess
import types

import numpy as np
import pytest
import torch

import csrc
from bench.dev import nf4_dequant_dev as dev


def _source_kernels(src: str) -> set[str]:
    """Kernel names defined in the source: direct definitions and the macro instantiations."""
    names = set(re.findall(r'extern "C" __global__ void __launch_bounds__\([^)]*\) (\w+)\(', src))
    names |= set(re.findall(r"^NF4D_(?:W|FILL|MIX|C)\((\w+),", src, re.M))
    for p in re.findall(r"^NF4D_P\((\w+),", src, re.M):
        names |= {p, p + "_lb8"}
    return names - {"NAME"}


def test_every_kernel_in_source():
    missing = set(dev.kernel_names()) - _source_kernels(dev.source())
    assert not missing, f"kernels the loader picks but the source lacks: {sorted(missing)}"


def test_includes_inlined():
    src = dev.source()
    assert not any(line.strip().startswith('#include "') for line in src.splitlines())
    assert "load_stream_16" in src  # from csrc/nf4_common.cuh


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_compiles_sm90_with_every_entry(tmp_path):
    cu = tmp_path / "dev.cu"
    cu.write_text(dev.source())
    ptx = tmp_path / "dev.ptx"
    for cmd in (["nvcc", "-arch=sm_90", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / "dev.o")],
                ["nvcc", "-arch=sm_90", "-std=c++17", "-ptx", str(cu), "-o", str(ptx)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"nvcc failed:\n{r.stdout}\n{r.stderr}"
    entries = set(re.findall(r"\.entry (\w+)\(", ptx.read_text()))
    missing = set(dev.kernel_names()) - entries
    assert not missing, f"PTX lacks entries: {sorted(missing)}"


# (n elements, reason): odd and tiny counts, one below a chunk, the Llama shapes.
SHAPES_N = [
    (1, "single element"),
    (3 * 7, "odd, inside one block"),
    (1023, "one below a U=1 warp chunk"),
    (2049, "one past a U=2 chunk"),
    (96 * 4100, "Llama-odd K"),
    (14336 * 4096, "gate/up projection"),
]


@pytest.mark.parametrize("n,reason", SHAPES_N)
@pytest.mark.parametrize("sms", [132, 1])
def test_launch_config_grids(n, reason, sms):
    for v in dev.VARIANTS:
        name, blocks = dev.launch_config(v, n, sms)
        assert blocks >= 1
        if v.startswith("c-"):
            b = int(v.split("-b")[1])
            assert blocks == max(1, min(n // dev.C_TILE, b * sms)) and name.startswith("nf4d_c_")
        elif v.startswith("w-"):
            u = int(v.split("-u")[1][0])
            assert blocks * dev.THREADS * 8 * u >= n > (blocks - 1) * dev.THREADS * 8 * u or n <= 0
        else:
            u = int(v.split("-u")[1][0])
            b = int(v.split("-b")[1].split("-")[0])
            chunks = -(-n // (u * dev.WARP_ELEMS))
            assert blocks == min(-(-chunks // dev.WARPS), b * sms)
            assert name.endswith("_lb8") == v.endswith("-lb8")
    for f in dev.FILLS:
        name, blocks = dev.fill_config(f, 2 * n)
        assert blocks >= 1 and name.startswith("nf4d_fill_")
    for m in dev.MIXES:  # one 16 * 256 * U byte output tile per block
        name, blocks = dev.mix_config(m, 2 * n)
        u = int(m[-1])
        assert blocks == max(1, 2 * n // (16 * dev.THREADS * u)) and name.startswith(("nf4d_mix_", "nf4d_read_"))


def test_mix_rejects_partial_tiles_and_short_src():
    out = torch.empty(100)  # CPU and not a whole tile: refused before any launch
    with pytest.raises(ValueError, match="whole number of 4096-byte tiles"):
        dev.mix(out, torch.empty(1000, dtype=torch.uint8), "mix-dep-u1")
    with pytest.raises(ValueError, match="at least 1024 bytes"):  # the message names src's minimum (out's bytes / 4)
        dev.mix(torch.empty(1024), torch.empty(100, dtype=torch.uint8), "mix-dep-u1")
    with pytest.raises(ValueError, match="unknown mix reference"):
        dev.mix_config("mix-dep-u3", 4096)


def test_prefetch_refusals():
    src = torch.empty(4096, dtype=torch.uint8)  # a CPU tensor: refused before any launch
    with pytest.raises(ValueError, match="contiguous, 16-byte aligned CUDA"):
        dev.prefetch(src, "pf-bulk", torch.empty(256))
    with pytest.raises(ValueError, match="unknown prefetch"):
        dev.prefetch_config("pf-none", 4096, 132)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown variant"):
        dev.launch_config("p3-def-u1-b8", 1024, 132)
    with pytest.raises(ValueError, match="unknown fill"):
        dev.fill_config("fill-def-u4", 1024)


@pytest.mark.parametrize("n", [1, 1023, 96 * 4100 + 1])
@pytest.mark.parametrize("aligned", [True, False])
def test_dequantize_stubbed(monkeypatch, n, aligned):
    calls = []
    monkeypatch.setattr(dev, "get_kernel", lambda name, index: lambda grid, block, args, stream: calls.append(
        (name, grid, block, args)))
    monkeypatch.setattr(csrc, "sm_count", lambda index: 132)
    monkeypatch.setattr(csrc, "current_stream", lambda index: None)
    plan = types.SimpleNamespace(index=0, data_aligned=aligned, wargs=tuple(np.uint64(16 * i) for i in range(6)),
                                 flags=(np.int32(6), np.int32(8), np.int32(1)))
    out = torch.empty(n, dtype=torch.bfloat16)
    for v in dev.VARIANTS:
        dev.dequantize(plan, out, v)
    assert len(calls) == len(dev.VARIANTS)
    for v, (name, grid, block, args) in zip(dev.VARIANTS, calls):
        assert (name, grid[0]) == dev.launch_config(v, n, 132) and block == (dev.THREADS,)
        assert len(args) == 12 and args[7] == np.int64(n) and args[8:11] == plan.flags
        assert args[11] == np.int32(aligned and out.data_ptr() % 16 == 0)
    with pytest.raises(ValueError, match="bf16"):
        dev.dequantize(plan, torch.empty(n, dtype=torch.float16), dev.VARIANTS[0])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,blocksize", [((3, 7), 64), ((1, 8192 * 3 + 64 * 5), 64), ((96, 4100), 64),
                                             ((1024, 4096 + 64), 64), ((4096, 4104), 64), ((512, 4096 + 32), 32),
                                             ((768, 4096), 128), ((640, 4096), 512), ((256, 4096), 1024)])
def test_gpu_every_variant_bit_exact(shape, blocksize):
    """Every dev variant (odd counts: partial tiles and per-element tails; 2052 tiles at (4096, 4104), so the c
    ring's stages are refilled; blocksizes 32-512 through the c family's shared absmax copies, 1024 through its
    per-element path) equals the reference bit for bit."""
    import csrc.nf4_dequant as cd
    import quant
    from quant.nf4 import dequantize_nf4_ref

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q = quant.quantize_nf4(torch.randn(shape, device="cuda"), blocksize=blocksize, double_quant=True)
    plan = cd.DequantPlan(q.data.reshape(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset.reshape(1),
                          q.code, blocksize, q.nested_blocksize)
    want = dequantize_nf4_ref(q, torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
    bad = []
    for v in dev.VARIANTS:
        out.fill_(float("nan"))
        dev.dequantize(plan, out, v)
        if not torch.equal(out, want):
            bad.append(v)
    assert not bad, f"variants not bit-exact at {shape}: {bad}"
