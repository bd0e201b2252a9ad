"""Loader for the exploratory NF4 dequantization kernels (``bench/dev/nf4_dequant_dev.cu``; bench only).

The source is compiled once per process and architecture through CuPy/NVRTC (the options of ``csrc``), its
``#include "x.cuh"`` inlined from ``bench/dev/`` or ``csrc/``, and launched on torch's current stream. Arguments
come from a ``csrc.nf4_dequant.DequantPlan`` (the library kernel's parameters). bf16 output only.

Variant names (``VARIANTS``): ``w-<store>-u<U>`` (wt-deq layout, one 256 * 8 * U element tile per block; U 1, 2,
4 or 8),
``p1-<store>-u<U>-b<B>[-lb8]`` (software-pipelined warp chunks with a shared-memory transpose, grid
min(chunks / 8, B x SMs) blocks of 256), ``p2-...`` (as p1, 4-byte loads, no transpose), ``c-<store>-s<S>-b<B>`` (a cp.async ring of S stages of 8192-element
tiles in shared memory, persistent grid of min(tiles, B x SMs) blocks); store ``def``
(st.global), ``cs`` (st.global.cs) or ``na`` (st.global.L1::no_allocate); ``-lb8``: ``__launch_bounds__(256, 8)``.
Fill references (``FILLS``): ``fill-<store>-u1``, ``fill-tma``. Read/write mix references (``MIXES``):
``mix-ind-u<U>`` / ``mix-dep-u<U>`` (the dequantization's loads of packed codes and 16-byte stores of its output,
no decode; the stores independent of / dependent on the loads) and ``read-u<U>`` (the loads alone). L2
prefetch references (``PREFETCHES``, run before a dequantization as a launch of their own): ``pf-bulk`` (bulk L2
prefetches, evict_last) and ``pf-load`` (16-byte loads with an evict_last policy, persistent grid).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np
import torch

import csrc

DEV_DIR = Path(__file__).resolve().parent
SOURCE = "nf4_dequant_dev.cu"
THREADS = 256  # every kernel of the source: blockDim.x == 256
WARPS = THREADS // 32
WARP_ELEMS = 1024  # p1/p2: elements per warp range; a chunk is U ranges
FILL_CHUNK = 16384  # fill-tma: bytes per bulk store

VARIANTS = (
    tuple(f"w-{s}-u{u}" for u in (1, 2) for s in ("def", "cs", "na"))
    + tuple(f"w-{s}-u{u}" for u in (4, 8) for s in ("def", "cs"))
    + tuple(f"p1-{s}-u{u}-b{b}" for u in (1, 2) for s in ("def", "cs") for b in (4, 8, 16))
    + ("p1-def-u1-b8-lb8", "p1-def-u2-b8-lb8")
    + tuple(f"p2-{s}-u{u}-b8" for u in (1, 2) for s in ("def", "cs"))
    + ("p2-def-u1-b16", "p2-def-u1-b8-lb8")
    + tuple(f"c-{s}-s{st}-b{b}" for s in ("def", "cs") for st in (4, 8) for b in (1, 2, 4))
)
C_TILE = 8192  # c family: elements per tile
FILLS = ("fill-def-u1", "fill-cs-u1", "fill-na-u1", "fill-tma")
_RE = re.compile(r"(?:(w)-(def|cs|na)-u([1248])|(p[12])-(def|cs)-u([12])-b([1-9][0-9]*)(-lb8)?)")
_C_RE = re.compile(r"c-(def|cs)-s([48])-b([1-9])")
_FILL_RE = re.compile(r"fill-(?:(def|cs|na)-u1|(tma))")
MIXES = ("mix-ind-u1", "mix-ind-u2", "mix-dep-u1", "mix-dep-u2", "read-u1", "read-u2")
_MIX_RE = re.compile(r"(mix-ind|mix-dep|read)-u([12])")
PREFETCHES = ("pf-bulk", "pf-load")
PF_CHUNK = 4096  # pf-bulk: bytes per bulk prefetch


def source(name: str = SOURCE) -> str:
    """The text of ``bench/dev/<name>`` with local ``#include "x.cuh"`` inlined (from bench/dev/, else csrc/)."""
    path = DEV_DIR / name if (DEV_DIR / name).exists() else csrc.SRC_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"bench.dev: no CUDA source {name} in {DEV_DIR} or {csrc.SRC_DIR}")
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        out.append(source(s[len('#include "'):-1]) if s.startswith('#include "') and s.endswith('"') else line)
    return "\n".join(out)


def kernel_names() -> tuple[str, ...]:
    """Every ``extern "C"`` kernel name the launchers can pick (tests check each exists in the source)."""
    return tuple(sorted({launch_config(v, 1 << 20, 132)[0] for v in VARIANTS}
                        | {fill_config(f, 1 << 20)[0] for f in FILLS}
                        | {mix_config(m, 1 << 20)[0] for m in MIXES}
                        | {prefetch_config(p, 1 << 20, 132)[0] for p in PREFETCHES} | {"nf4d_l2_demote"}))


def launch_config(variant: str, n: int, sms: int) -> tuple[str, int]:
    """(kernel name, blocks) for ``variant`` dequantizing n elements on a card with ``sms`` SMs (pure)."""
    c = _C_RE.fullmatch(variant)
    if c is not None:
        store, st, b = c.groups()
        return f"nf4d_c_{store}_s{st}", max(1, min(n // C_TILE, int(b) * sms))
    m = _RE.fullmatch(variant)
    if m is None:
        raise ValueError(f"bench.dev.nf4_dequant_dev: unknown variant {variant!r} (one of {VARIANTS})")
    w, wstore, wu, fam, store, u, b, lb8 = m.groups()
    if w:
        return f"nf4d_w_{wstore}_u{wu}", max(1, -(-n // (THREADS * 8 * int(wu))))
    chunks = -(-n // (int(u) * WARP_ELEMS))
    return f"nf4d_{fam}_{store}_u{u}{'_lb8' if lb8 else ''}", max(1, min(-(-chunks // WARPS), int(b) * sms))


def fill_config(method: str, nbytes: int, chunk: int = FILL_CHUNK) -> tuple[str, int]:
    """(kernel name, blocks) for a fill reference over ``nbytes`` (pure)."""
    m = _FILL_RE.fullmatch(method)
    if m is None:
        raise ValueError(f"bench.dev.nf4_dequant_dev: unknown fill {method!r} (one of {FILLS})")
    store, tma = m.groups()
    if tma:
        return "nf4d_fill_tma", max(1, -(-max(nbytes // chunk, 1) // WARPS))
    return f"nf4d_fill_{store}_u1", max(1, -(-nbytes // (16 * THREADS)))


def mix_config(method: str, out_bytes: int) -> tuple[str, int]:
    """(kernel name, blocks) for a mix reference over an output of ``out_bytes`` (pure): one tile per block."""
    m = _MIX_RE.fullmatch(method)
    if m is None:
        raise ValueError(f"bench.dev.nf4_dequant_dev: unknown mix reference {method!r} (one of {MIXES})")
    kind, u = m.groups()
    return f"nf4d_{kind.replace('-', '_')}_u{u}", max(1, out_bytes // (16 * THREADS * int(u)))


def prefetch_config(method: str, nbytes: int, sms: int, chunk: int = PF_CHUNK) -> tuple[str, int]:
    """(kernel name, blocks) for an L2 prefetch reference over ``nbytes`` (pure): pf-bulk one bulk prefetch of
    ``chunk`` bytes per thread, pf-load a persistent grid of 4 blocks per SM."""
    if method == "pf-bulk":
        return "nf4d_pf_bulk", max(1, -(-(-(-nbytes // chunk)) // THREADS))
    if method == "pf-load":
        return "nf4d_pf_load", max(1, min(4 * sms, -(-nbytes // (16 * THREADS))))
    raise ValueError(f"bench.dev.nf4_dequant_dev: unknown prefetch {method!r} (one of {PREFETCHES})")


@functools.lru_cache(maxsize=None)
def _module(arch: str):
    cupy = csrc._cupy()  # raises csrc.CupyMissingError with the install hint
    return cupy.RawModule(code=source(), options=csrc.NVRTC_OPTIONS + (f"--gpu-architecture={arch}",),
                          backend="nvrtc")


def get_kernel(name: str, index: int):
    major, minor = torch.cuda.get_device_capability(index)
    arch = os.environ.get("MINITRAIN_CUDA_ARCH", f"sm_{major}{minor}")
    with csrc._cupy().cuda.Device(index):
        return _module(arch).get_function(name)


def dequantize(plan, out: torch.Tensor, variant: str) -> torch.Tensor:
    """Run ``variant`` with ``plan``'s arguments (a ``csrc.nf4_dequant.DequantPlan``) into ``out`` (contiguous
    bf16, the weight's element count; not checked beyond dtype) on torch's current stream."""
    if out.dtype != torch.bfloat16:
        raise ValueError(f"bench.dev.nf4_dequant_dev: bf16 output only, got {out.dtype}")
    n = out.numel()
    name, blocks = launch_config(variant, n, csrc.sm_count(plan.index))
    optr = out.data_ptr()
    vec = plan.data_aligned and optr % 16 == 0
    args = plan.wargs + (np.uint64(optr), np.int64(n)) + plan.flags + (np.int32(vec),)
    get_kernel(name, plan.index)((blocks,), (THREADS,), args, stream=csrc.current_stream(plan.index))
    return out


def fill(out: torch.Tensor, method: str, value: int = 0x3F803F80, chunk: int = FILL_CHUNK) -> torch.Tensor:
    """Write the 32-bit ``value`` over all of ``out`` (contiguous, 16-byte aligned CUDA) with fill ``method``."""
    if not out.is_cuda or not out.is_contiguous() or out.data_ptr() % 16:
        raise ValueError("bench.dev.nf4_dequant_dev.fill: out must be a contiguous, 16-byte aligned CUDA tensor")
    index = out.device.index if out.device.index is not None else torch.cuda.current_device()
    nbytes = out.numel() * out.element_size()
    name, blocks = fill_config(method, nbytes, chunk)
    args = (np.uint64(out.data_ptr()), np.int64(nbytes), np.uint32(value & 0xFFFFFFFF), np.int32(chunk))
    get_kernel(name, index)((blocks,), (THREADS,), args, stream=csrc.current_stream(index))
    return out


def mix(out: torch.Tensor, src: torch.Tensor, method: str, value: int = 0x3F803F80) -> torch.Tensor:
    """Run the mix reference ``method``: read ``src`` (uint8, at least out's bytes / 4) in the packed codes' layout
    and (``mix-*``) write all of ``out`` (contiguous, 16-byte aligned CUDA; whole tiles only)."""
    nbytes = out.numel() * out.element_size()
    name, blocks = mix_config(method, nbytes)
    tile = 16 * THREADS * int(method[-1])
    if (not out.is_cuda or not out.is_contiguous() or out.data_ptr() % 16 or src.data_ptr() % 16
            or nbytes % tile or src.numel() * src.element_size() < nbytes // 4):
        raise ValueError(f"bench.dev.nf4_dequant_dev.mix: out must be contiguous CUDA, 16-byte aligned, a whole "
                         f"number of {tile}-byte tiles, and src (16-byte aligned) at least {nbytes // 4} bytes")
    index = out.device.index if out.device.index is not None else torch.cuda.current_device()
    args = (np.uint64(src.data_ptr()), np.uint64(out.data_ptr()), np.int64(nbytes), np.uint32(value & 0xFFFFFFFF))
    get_kernel(name, index)((blocks,), (THREADS,), args, stream=csrc.current_stream(index))
    return out


def prefetch(src: torch.Tensor, method: str, sink: torch.Tensor, chunk: int = PF_CHUNK) -> None:
    """Bring ``src`` (contiguous CUDA, 16-byte aligned) into L2 with ``method`` (or, method "demote", set its lines
    back to evict_normal); ``sink`` is a CUDA tensor of at least 1 KiB the load variant may write (almost never
    does); ``chunk``: bytes per bulk prefetch, a positive multiple of 16."""
    if not src.is_cuda or not src.is_contiguous() or src.data_ptr() % 16 or sink.numel() * sink.element_size() < 1024:
        raise ValueError("bench.dev.nf4_dequant_dev.prefetch: src must be contiguous, 16-byte aligned CUDA and sink "
                         "at least 1 KiB")
    if chunk <= 0 or chunk % 16:
        raise ValueError(f"bench.dev.nf4_dequant_dev.prefetch: chunk must be a positive multiple of 16, got {chunk}")
    index = src.device.index if src.device.index is not None else torch.cuda.current_device()
    nbytes = src.numel() * src.element_size()
    if method == "demote":
        name, blocks = "nf4d_l2_demote", max(1, min(4 * csrc.sm_count(index), -(-nbytes // (128 * THREADS))))
    else:
        name, blocks = prefetch_config(method, nbytes, csrc.sm_count(index), chunk)
    args = (np.uint64(src.data_ptr()), np.int64(nbytes), np.int32(chunk), np.uint64(sink.data_ptr()))
    get_kernel(name, index)((blocks,), (THREADS,), args, stream=csrc.current_stream(index))
