"""CUDA C++ kernels, compiled at first use through CuPy (NVRTC) for the running card.

Each ``csrc/<op>.cu`` holds ``extern "C" __global__`` kernels; ``csrc/<op>.py`` launches them with
:func:`get_kernel` and :func:`launch`. The loader compiles a source once per process and architecture,
keeps the module, and launches on torch's current stream so the kernels order correctly with torch's own
work. CuPy is an optional dependency (``pip install minitrain[cuda]``); asking for a CUDA C++ backend
without it raises a clear error, everything else works without it.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SRC_DIR = Path(__file__).resolve().parent
NVRTC_OPTIONS = ("-std=c++17", "--use_fast_math", "-default-device")


class CupyMissingError(ImportError):
    pass


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise CupyMissingError(
            "the CUDA C++ backend needs CuPy: pip install 'minitrain[cuda]' (cupy-cuda13x; on CUDA 12 use "
            f"cupy-cuda12x), or choose backend='triton' ({e})") from None
    return cupy


@functools.lru_cache(maxsize=None)
def cupy_available() -> bool:
    """Whether CuPy imports (the CUDA C++ backends need it); cached."""
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def source(name: str) -> str:
    """The text of ``csrc/<name>`` (e.g. ``"nf4_dequant.cu"``), with local ``#include "x.cuh"`` inlined."""
    path = SRC_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"csrc: no CUDA source {path}")
    out = []
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith('#include "') and s.endswith('"'):
            out.append(source(s[len('#include "'):-1]))
        else:
            out.append(line)
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def _module(name: str, arch: str, extra: tuple[str, ...]):
    cupy = _cupy()
    options = NVRTC_OPTIONS + (f"--gpu-architecture={arch}",) + extra
    return cupy.RawModule(code=source(name), options=options, backend="nvrtc")


def get_kernel(name: str, kernel: str, device: torch.device | None = None, extra_options: tuple[str, ...] = ()):
    """The compiled ``extern "C"`` kernel ``kernel`` of ``csrc/<name>`` for ``device``'s architecture."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
    major, minor = torch.cuda.get_device_capability(device)
    arch = os.environ.get("MINITRAIN_CUDA_ARCH", f"sm_{major}{minor}")
    with _cupy().cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        return _module(name, arch, tuple(extra_options)).get_function(kernel)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (cached: launch configurations ask on every call)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


try:  # the raw stream handle without building a torch.cuda.Stream object (what torch's Triton launchers use)
    _raw_stream = torch._C._cuda_getCurrentRawStream
except AttributeError:  # pragma: no cover - CPU-only or future torch
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream

_STREAMS: dict = {}


def current_stream(index: int):
    """CuPy's wrapper of torch's current stream on device ``index``, cached per stream handle: a small kernel
    takes a few microseconds on the GPU, so the host work per launch (wrapping the stream included) must not."""
    handle = _raw_stream(index)
    st = _STREAMS.get(handle)
    if st is None:
        st = _cupy().cuda.ExternalStream(handle, index)
        if len(_STREAMS) > 64:  # streams come and go (CUDA graph capture, side streams); keep the cache small
            _STREAMS.clear()
        _STREAMS[handle] = st
    return st


def launch(kernel, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0) -> None:
    """Launch on torch's current stream. Tensors in ``args`` are passed as device pointers; other args
    must already be numpy scalars of the kernel's parameter types (np.int32, np.int64, np.float32)."""
    import numpy as np

    conv = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
    kernel(grid, block, conv, shared_mem=shared_mem, stream=current_stream(torch.cuda.current_device()))


def nvcc_compile_check(name: str, arch: str = "sm_90", nvcc: str = "nvcc") -> None:
    """Compile ``csrc/<name>`` with nvcc to an object (no GPU needed); raises with nvcc's output on error."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / name
        src.write_text(source(name))
        cmd = [nvcc, f"-arch={arch}", "-std=c++17", "-c", str(src), "-o", str(Path(tmp) / "out.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed for csrc/{name}:\n{r.stdout}\n{r.stderr}")
