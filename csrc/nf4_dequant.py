"""Launcher for the CUDA C++ NF4 dequantization (``csrc/nf4_dequant.cu``), registered as a torch.library op.

Same contract as ``triton_ops.nf4_dequant``: plain tensors in (the layouts in ``quant/nf4.py``), an (N, K)
fp32/fp16/bf16 tensor out, bit-identical to the reference. The module is compiled through CuPy/NVRTC at first
use for the running card and launched on torch's current stream (``csrc.get_kernel`` / ``csrc.launch``).
"""
from __future__ import annotations

import numpy as np
import torch

from . import current_stream as _stream
from . import get_kernel, sm_count

__all__ = ["nf4_dequantize_cuda", "nf4_dequantize_cuda_tensors", "DequantPlan"]

THREADS = 256
WARP_ELEMS = 1024  # elements per warp range (16 packed bytes per lane: one 16-byte load each)
_DT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_KERNELS = _DT  # the dtypes the kernels write

# Launch configuration: U (16-byte loads in flight per lane), threads per block (32..256, a multiple of 32) and the
# grid cap in blocks per SM (0: one chunk per warp, no grid-stride loop). Overridable for experiments
# (bench/nf4.py --deq-sweep): {"U": 1|2|4, "blocks_per_sm": int, "threads": int (optional, default THREADS)}.
CONFIG_OVERRIDE: dict | None = None


def _config(n: int) -> tuple[int, int, int]:
    """(U, blocks_per_sm, threads) for n output elements."""
    if CONFIG_OVERRIDE is not None:
        threads = int(CONFIG_OVERRIDE.get("threads", THREADS))
        if threads < 32 or threads > 256 or threads % 32:
            raise ValueError(f"nf4_dequantize_cuda: threads must be a multiple of 32 in [32, 256], got {threads}")
        return CONFIG_OVERRIDE["U"], CONFIG_OVERRIDE["blocks_per_sm"], threads
    # Measured on an H200 (bench/nf4.py --explore, kernel time): capping the grid (grid-stride loop) is 3-9%
    # slower than one chunk per warp at every size; U = 2 is marginally best up to 4096 x 4096, U = 1 above
    # (14336 x 4096: 38.7 us; 128256 x 4096: 325 us, 95% of copy).
    return (2, 0, THREADS) if n <= 16 * 2**20 else (1, 0, THREADS)


def check_state(where, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize):
    """The NF4 quantization state as the CUDA kernels read it (nf4_dequant.cu, nf4_gemv.cu): CUDA tensors on one
    device, contiguous, with the byte format's dtypes and element counts. Messages start with ``where``."""
    n = int(shape[0]) * int(shape[1])
    for name, v in (("blocksize", blocksize), ("nested_blocksize", nested_blocksize)):
        if v < (32 if name == "blocksize" else 1) or v & (v - 1):
            raise ValueError(f"{where}: {name} must be a power of two (blocksize >= 32), got {v}")
    if data.device.type != "cuda":
        raise ValueError(f"{where}: tensors must be on a CUDA device, got {data.device}")
    if data.dtype != torch.uint8 or data.numel() != (n + 1) // 2 or not data.is_contiguous():
        raise ValueError(f"{where}: data must be contiguous uint8 with (N*K+1)//2 = {(n + 1) // 2} bytes, got "
                         f"{data.dtype} with {data.numel()}")
    nb = -(-n // blocksize)
    double = nested_absmax is not None
    want = torch.uint8 if double else torch.float32
    if absmax.dtype != want or absmax.numel() != nb or not absmax.is_contiguous():
        raise ValueError(f"{where}: absmax must be contiguous {want} with {nb} values, got {absmax.dtype} with "
                         f"{absmax.numel()}")
    checks = [("code", code, 16)]
    if double:
        if nested_code is None or offset is None:
            raise ValueError(f"{where}: double quantization needs nested_code and offset")
        checks += [("nested_absmax", nested_absmax, -(-nb // nested_blocksize)), ("nested_code", nested_code, 256),
                   ("offset", offset, 1)]
    for name, t, k in checks:
        if t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous() or t.device != data.device:
            raise ValueError(f"{where}: {name} must be contiguous float32 with {k} values on {data.device}, got "
                             f"{t.dtype} with {t.numel()} on {t.device}")
    if absmax.device != data.device:
        raise ValueError(f"{where}: absmax is on {absmax.device} but data is on {data.device}")


def _check(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, dtype, out):
    where = "nf4_dequantize_cuda"
    if dtype not in _KERNELS:
        raise ValueError(f"{where}: dtype must be float32, float16 or bfloat16, got {dtype}")
    check_state(where, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
    if out is not None and (out.shape != (shape[0], shape[1]) or out.dtype != dtype or out.device != data.device
                            or not out.is_contiguous()):
        raise ValueError(f"{where}: out must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
                         f"{data.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


# The compiled kernel per (device, dtype, U). A small weight's whole dequantization takes a few microseconds on the
# GPU, so the Python work per call (module lookup, stream wrapping, argument conversion) has to stay below that.
_FUNCS: dict = {}


def _kernel(device_index: int, dtype: torch.dtype, u: int):
    key = (device_index, dtype, u)
    fn = _FUNCS.get(key)
    if fn is None:
        fn = get_kernel("nf4_dequant.cu", f"nf4_dequant_{_DT[dtype]}_u{u}", torch.device("cuda", device_index))
        _FUNCS[key] = fn
    return fn


class DequantPlan:
    """One NF4 weight's kernel arguments, flattened once (device pointers and flags as numpy scalars of the
    kernel's parameter types), so a call converts only the output pointer. The tensors must already be validated
    (``check_state``); the plan keeps them alive. ``quant.dispatch`` keeps one per weight object."""

    __slots__ = ("index", "tensors", "raw", "wargs", "flags", "data_aligned", "launches")

    def __init__(self, data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize):
        double = nested_absmax is not None
        self.index = data.device.index if data.device.index is not None else torch.cuda.current_device()
        dummy = absmax  # never read when there is no double quantization
        self.tensors = (data, absmax, nested_absmax if double else dummy, nested_code if double else dummy,
                        offset if double else dummy, code)
        self._pointers()
        self.flags = (np.int32(blocksize.bit_length() - 1), np.int32(nested_blocksize.bit_length() - 1),
                      np.int32(double))
        self.launches: dict = {}  # (out dtype, n) -> (kernel, grid, block, tail for vec=0, tail for vec=1)

    def _pointers(self) -> None:
        self.raw = [t.data_ptr() for t in self.tensors]
        self.wargs = tuple(np.uint64(p) for p in self.raw)
        self.data_aligned = self.raw[0] % 16 == 0  # 16-byte loads need it (and an aligned output)

    def _launch_config(self, dtype: torch.dtype, n: int):
        key = (dtype, n)
        cfg = self.launches.get(key)
        if cfg is None or CONFIG_OVERRIDE is not None:
            u, blocks_per_sm, threads = _config(n)
            kernel = _kernel(self.index, dtype, u)
            blocks = -(-n // (u * WARP_ELEMS * (threads // 32)))
            if blocks_per_sm:
                blocks = min(blocks, blocks_per_sm * sm_count(self.index))
            head = (np.int64(n),) + self.flags
            cfg = (kernel, (blocks,), (threads,), head + (np.int32(0),), head + (np.int32(1),))
            if CONFIG_OVERRIDE is None:
                if len(self.launches) > 16:
                    self.launches.clear()
                self.launches[key] = cfg
        return cfg

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """Dequantize into ``out`` (contiguous, the weight's element count; not checked here)."""
        kernel, grid, block, tail0, tail1 = self._launch_config(out.dtype, out.numel())
        if [t.data_ptr() for t in self.tensors] != self.raw:  # storage moved in place (resize_, set_, FSDP regather)
            self._pointers()
        optr = out.data_ptr()
        args = self.wargs + (np.uint64(optr),) + (tail1 if self.data_aligned and optr % 16 == 0 else tail0)
        if self.index == torch.cuda.current_device():
            kernel(grid, block, args, stream=_stream(self.index))
        else:
            with torch.cuda.device(self.index):
                kernel(grid, block, args, stream=_stream(self.index))
        return out


def _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize):
    DequantPlan(data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize)(out)


def eager_ok(t: torch.Tensor) -> bool:
    """Plain eager CUDA tensors, no tracing: launch directly instead of through the torch.library op."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


@torch.library.custom_op("minitrain::nf4_dequant_cuda", mutates_args=())
def _nf4_dequant_cuda_op(data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                         nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                         shape: list[int], blocksize: int, nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape[0], shape[1], dtype=dtype, device=data.device)
    _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize)
    return out


@_nf4_dequant_cuda_op.register_fake
def _(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, dtype):
    return data.new_empty(shape[0], shape[1], dtype=dtype)


@torch.library.custom_op("minitrain::nf4_dequant_cuda_out", mutates_args=("out",))
def _nf4_dequant_cuda_out_op(data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                             nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                             blocksize: int, nested_blocksize: int, out: torch.Tensor) -> None:
    _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize)


@_nf4_dequant_cuda_out_op.register_fake
def _(data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, out):
    return None


def nf4_dequantize_cuda_tensors(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64,
                                nested_blocksize=256, dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """Dequantize NF4 from plain CUDA tensors with the CUDA C++ kernel (arguments as
    ``triton_ops.nf4_dequant.nf4_dequantize_tensors``). Returns (N, K) of ``dtype`` (``out`` when given)."""
    shape = [int(shape[0]), int(shape[1])]
    data = data.reshape(-1)
    offset = None if offset is None else offset.reshape(1)
    _check(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, dtype, out)
    if eager_ok(data):  # eager fast path: same kernel, no dispatcher round trip
        if out is None:
            out = torch.empty(shape[0], shape[1], dtype=dtype, device=data.device)
        _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize)
        return out
    if out is None:
        return torch.ops.minitrain.nf4_dequant_cuda(data, absmax, nested_absmax, nested_code, offset, code, shape,
                                                    blocksize, nested_blocksize, dtype)
    torch.ops.minitrain.nf4_dequant_cuda_out(data, absmax, nested_absmax, nested_code, offset, code, blocksize,
                                             nested_blocksize, out)
    return out


def nf4_dequantize_cuda(q, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight object (``quant.NF4Weight`` attributes) on CUDA to (N, K) of ``dtype``
    (default: the weight's dtype), into ``out`` when given."""
    dtype = q.dtype if dtype is None else dtype
    double = q.nested_absmax is not None
    return nf4_dequantize_cuda_tensors(q.data, q.absmax, q.nested_absmax if double else None,
                                       q.nested_code if double else None, q.offset if double else None, q.code,
                                       q.shape, q.blocksize, q.nested_blocksize, dtype, out)
