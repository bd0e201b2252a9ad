"""NF4 dequantization in one Triton launch, double-quantized absmax decoded in registers.

Formula (bitsandbytes NF4, the layout documented in ``quant/nf4.py``), for element k of a weight (N, K)
flattened row-major into n = N*K elements, blocks of B (64) elements, nested groups of G (256) blocks:

    absmax[b] = nested_code[a8[b]] * nested_absmax[b // G] + offset      (fp32; no fused multiply-add)
    w[k]      = code[q_k] * absmax[k // B]                               (fp32, then ONE cast to the output)

or absmax[b] read directly as fp32 without double quantization. The result is bit-identical to
``quant.nf4.dequantize_nf4_ref`` for fp32, fp16 and bf16 outputs and any n (partial blocks, odd n).

Layouts: ``data`` uint8 ((n+1)//2,) with element 2j in the HIGH nibble of byte j and 2j+1 in the low nibble;
``absmax`` uint8 (ceil(n/B),) (or fp32 without double quantization); ``nested_absmax`` fp32 (ceil(n/B/G),);
``nested_code`` fp32 (256,); ``offset`` fp32 0-d; ``code`` fp32 (16,); output (N, K) contiguous, or its rows
``ld`` elements apart (a column slice of a wider buffer, K a multiple of B: each block then lies in one row).

Bytes moved per element: read 0.5 (codes) + 1/B (uint8 absmax; 4/B when fp32) + 4/(B*G) (nested absmax),
write 2 (fp16/bf16) or 4 (fp32). The kernel is bandwidth-bound; its only work per element is a nibble
extract, a 16-entry table lookup (L1-resident) and one multiply.

Each program handles TILE elements (a few thousand) laid out as a (TILE/B, B) tile, one quantization block
per row, so each row's absmax is decoded once. Two formulations exist: 16 packed bytes per thread with the
nibbles interleaved back by ``tl.join``, or one byte load per output element; both write wide contiguous
stores. The configuration is picked by size (``_config``, measured on an H200), not autotuned: in eager mode
the public call launches the kernel directly (no autotuner, no dispatcher), so a small weight costs little
more host time than the launch itself; under torch.compile the same kernel runs inside the torch.library op.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["nf4_dequantize_ref", "nf4_dequantize", "nf4_dequantize_tensors", "BYTES_PER_ELEMENT", "DequantPlan",
           "out_layout_ok"]

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def BYTES_PER_ELEMENT(out_dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True,
                      nested_blocksize: int = 256) -> float:
    """Bytes read + written per dequantized element (what the benchmark counts)."""
    absmax = 1.0 / blocksize if double_quant else 4.0 / blocksize
    nested = 4.0 / (blocksize * nested_blocksize) if double_quant else 0.0
    return 0.5 + absmax + nested + torch.empty(0, dtype=out_dtype).element_size()


def nf4_dequantize_ref(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64,
                       nested_blocksize=256, dtype=torch.bfloat16) -> torch.Tensor:
    """Pure-torch reference on plain tensors (fp32 math, one cast); the spec the kernels are tested against."""
    n = shape[0] * shape[1]
    flat = data.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]
    if nested_absmax is not None:
        idx = torch.arange(absmax.numel(), device=absmax.device) // nested_blocksize
        scale = nested_code[absmax.long()] * nested_absmax[idx] + offset
    else:
        scale = absmax
    w = code[codes.long()] * scale.repeat_interleave(blocksize)[:n]
    return w.view(shape[0], shape[1]).to(dtype)


@triton.jit
def cast_rtne(x, out_ty: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """fp32 -> out_ty rounding to nearest even, as torch casts (INTERPRET_BF16: out_ty is bf16 and the kernel
    runs under the interpreter)."""
    if INTERPRET_BF16:
        # Triton's CPU interpreter truncates fp32 -> bf16; round to nearest even by hand there (finite values).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(out_ty)


# Launch configuration (TILE elements per program, formulation, warps), chosen by size instead of autotuning:
# the autotuner's Python wrapper costs more host time per call than the whole kernel takes on a small weight,
# and the choice was measured once on the GPU (bench/nf4.py, "ours triton" rows). Overridable for experiments.
CONFIG_OVERRIDE: dict | None = None


def _config(n: int) -> tuple[int, bool, int]:
    """(TILE, BYTE_GATHER, num_warps) for n output elements."""
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE["TILE"], CONFIG_OVERRIDE["BYTE_GATHER"], CONFIG_OVERRIDE["num_warps"]
    if _INTERPRET:
        return 2048, False, 4
    # Measured on an H200 (bench/nf4.py --explore, kernel time): the byte-gather formulation is 2x slower
    # everywhere; 4 warps beat 8; TILE 4096 is best up to ~8M elements (1024 x 4096: 4.7 us), 8192 above
    # (14336 x 4096: 38.8 us vs 42.6 with 8 warps; 128256 x 4096: 324 us, 95% of copy).
    if n <= 8 * 2**20:
        return 4096, False, 4
    return 8192, False, 4


@triton.jit
def _nf4_dequant_kernel(data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, out_ptr,
                        n, nbytes, K, ld,
                        BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                        INTERPRET_BF16: tl.constexpr, TILE: tl.constexpr, BYTE_GATHER: tl.constexpr,
                        STRIDED: tl.constexpr):
    ROWS: tl.constexpr = TILE // BLOCKSIZE    # one quantization block per tile row (TILE >= BLOCKSIZE)
    ROW_BYTES: tl.constexpr = BLOCKSIZE // 2
    # int64: the element offsets of a 128256 x 4096 fp32 output pass 2^31 bytes.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)                       # (ROWS,) = the block index of each row
    nblocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
    row_ok = rows < nblocks
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        c2 = tl.load(nested_code_ptr + a8)
        a2 = tl.load(nested_absmax_ptr + rows // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
        # Two roundings, as the reference: the launcher turns fp fusion off so this is not an FMA.
        scale = c2 * a2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)
    out_ty: tl.constexpr = out_ptr.dtype.element_ty
    elem_offs = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]    # (ROWS, B)
    if STRIDED:
        # out rows of K elements ld apart (K % BLOCKSIZE == 0: a quantization block never spans two rows); the
        # block index fits int32 (n < 2^37), whose division is far cheaper than int64's
        KB = K // BLOCKSIZE
        r32 = rows.to(tl.int32)
        wrow = r32 // KB
        first = wrow.to(tl.int64) * ld + ((r32 - wrow * KB) * BLOCKSIZE).to(tl.int64)
        out_offs = first[:, None] + tl.arange(0, BLOCKSIZE)[None, :]
    else:
        out_offs = elem_offs
    if BYTE_GATHER:
        elem_ok = elem_offs < n
        byte = tl.load(data_ptr + elem_offs // 2, mask=elem_ok, other=0, eviction_policy="evict_first")
        shift = (((elem_offs & 1) ^ 1) * 4).to(tl.uint8)                      # even k: high nibble
        w = tl.load(code_ptr + ((byte >> shift) & 0xF).to(tl.int32)) * scale[:, None]
        tl.store(out_ptr + out_offs, cast_rtne(w, out_ty, INTERPRET_BF16), mask=elem_ok)
    else:
        byte_offs = rows[:, None] * ROW_BYTES + tl.arange(0, ROW_BYTES)[None, :]     # (ROWS, B/2)
        packed = tl.load(data_ptr + byte_offs, mask=byte_offs < nbytes, other=0, eviction_policy="evict_first")
        hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]
        lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale[:, None]
        w = tl.join(cast_rtne(hi, out_ty, INTERPRET_BF16), cast_rtne(lo, out_ty, INTERPRET_BF16))  # (ROWS, B/2, 2)
        w = tl.reshape(w, (ROWS, BLOCKSIZE))
        tl.store(out_ptr + out_offs, w, mask=elem_offs < n)


def _check(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, dtype,
           out=None, where="nf4_dequantize"):
    """Validate the plain-tensor arguments; the messages say what was expected."""
    if len(shape) != 2:
        raise ValueError(f"{where}: shape must be (N, K), got {tuple(shape)}")
    n = int(shape[0]) * int(shape[1])
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"{where}: dtype must be float32, float16 or bfloat16, got {dtype}")
    if blocksize < 32 or blocksize & (blocksize - 1) or nested_blocksize & (nested_blocksize - 1):
        raise ValueError(f"{where}: blocksize must be a power of two >= 32 and nested_blocksize a power of two, "
                         f"got {blocksize} and {nested_blocksize}")
    dev = data.device
    if data.dtype != torch.uint8 or data.numel() != (n + 1) // 2 or not data.is_contiguous():
        raise ValueError(f"{where}: data must be contiguous uint8 with (N*K+1)//2 = {(n + 1) // 2} bytes, got "
                         f"{data.dtype} with {data.numel()} (contiguous={data.is_contiguous()})")
    nb = -(-n // blocksize)
    double = nested_absmax is not None
    want = torch.uint8 if double else torch.float32
    if absmax.dtype != want or absmax.numel() != nb or not absmax.is_contiguous():
        raise ValueError(f"{where}: absmax must be contiguous {want} with {nb} values, got {absmax.dtype} with "
                         f"{absmax.numel()}")
    tensors = {"data": data, "absmax": absmax, "code": code}
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"{where}: code must be float32 with 16 entries, got {code.dtype} with {code.numel()}")
    if double:
        if nested_code is None or offset is None:
            raise ValueError(f"{where}: double quantization needs nested_code and offset")
        nnb = -(-nb // nested_blocksize)
        for name, t, k in (("nested_absmax", nested_absmax, nnb), ("nested_code", nested_code, 256),
                           ("offset", offset, 1)):
            if t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous():
                raise ValueError(f"{where}: {name} must be contiguous float32 with {k} values, got {t.dtype} "
                                 f"with {t.numel()}")
            tensors[name] = t
    for name, t in tensors.items():
        if t.device != dev:
            raise ValueError(f"{where}: {name} is on {t.device} but data is on {dev}")
    if out is not None and (out.shape != (shape[0], shape[1]) or out.dtype != dtype or out.device != dev
                            or not out_layout_ok(out, blocksize)):
        raise ValueError(f"{where}: out must be a {dtype} tensor of shape {tuple(shape)} on {dev}, contiguous or "
                         f"with rows apart (unit column stride, K a multiple of the blocksize {blocksize}), got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device} with strides {tuple(out.stride())}")
    return n


def out_layout_ok(out: torch.Tensor, blocksize: int) -> bool:
    """Whether the kernel can write ``out``: contiguous, or 2-D rows of K elements ``out.stride(0) >= K`` apart
    with unit column stride and K a multiple of ``blocksize`` (e.g. the columns [c, c + K) of a wider buffer)."""
    if out.is_contiguous():
        return True
    return (out.dim() == 2 and out.stride(1) == 1 and out.stride(0) >= out.shape[1]
            and out.shape[1] % blocksize == 0)


class DequantPlan:
    """One NF4 weight's kernel arguments with the launch configuration cached per (output dtype, n), so an eager
    call does little more than the kernel launch itself. The tensors must already be validated (``_check``)."""

    __slots__ = ("tensors", "blocksize", "nested_blocksize", "double", "nbytes", "launches")

    def __init__(self, data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize):
        self.double = nested_absmax is not None
        dummy = absmax  # unused pointer arguments when there is no double quantization
        self.tensors = (data, absmax, nested_absmax if self.double else dummy, nested_code if self.double else dummy,
                        offset if self.double else dummy, code)
        self.blocksize, self.nested_blocksize = blocksize, nested_blocksize
        self.nbytes = data.numel()
        self.launches: dict = {}  # (out dtype, n) -> (grid, keyword arguments)

    def _launch_config(self, dtype: torch.dtype, n: int, strided: bool = False):
        key = (dtype, n, strided)
        cfg = self.launches.get(key)
        if cfg is None or CONFIG_OVERRIDE is not None:
            tile, byte_gather, warps = _config(n)
            tile = max(tile, self.blocksize)
            kw = dict(BLOCKSIZE=self.blocksize, NESTED_BLOCKSIZE=self.nested_blocksize, DOUBLE_QUANT=self.double,
                      INTERPRET_BF16=_INTERPRET and dtype == torch.bfloat16, TILE=tile, BYTE_GATHER=byte_gather,
                      STRIDED=strided, num_warps=warps,
                      enable_fp_fusion=False)  # absmax = code2*absmax2 + offset must round twice, like the reference
            cfg = ((triton.cdiv(triton.cdiv(n, self.blocksize), tile // self.blocksize),), kw)
            if CONFIG_OVERRIDE is None:
                if len(self.launches) > 16:
                    self.launches.clear()
                self.launches[key] = cfg
        return cfg

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        """Dequantize into ``out``: the weight's element count, contiguous or (N, K) rows ``out.stride(0)`` apart
        (unit column stride, K a multiple of the blocksize; not checked here: ``check_out``)."""
        n = out.numel()
        # not is_contiguous(), not stride(0) != K: a one-row column slice counts as contiguous (torch ignores the
        # stride of a size-1 dimension) and is written linearly; its K need not be whole blocks
        strided = not out.is_contiguous()
        grid, kw = self._launch_config(out.dtype, n, strided)
        K, ld = (out.shape[1], out.stride(0)) if strided else (0, 0)  # 0, 0: one specialization when unused
        _nf4_dequant_kernel[grid](*self.tensors, out, n, self.nbytes, K, ld, **kw)
        return out


def _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize):
    DequantPlan(data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize)(out)


def eager_ok(t: torch.Tensor) -> bool:
    """Whether a call may skip the torch.library op and launch directly: plain eager tensors, no tracing (the op
    is what torch.compile / fake tensors see; in eager it would only add dispatcher overhead)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


# -- torch.library registration -------------------------------------------------------------------------------
@torch.library.custom_op("minitrain::nf4_dequant_triton", mutates_args=())
def _nf4_dequant_op(data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                    nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                    shape: list[int], blocksize: int, nested_blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(shape[0], shape[1], dtype=dtype, device=data.device)
    _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize)
    return out


@_nf4_dequant_op.register_fake
def _(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, dtype):
    return data.new_empty(shape[0], shape[1], dtype=dtype)


@torch.library.custom_op("minitrain::nf4_dequant_triton_out", mutates_args=("out",))
def _nf4_dequant_out_op(data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
                        nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor,
                        blocksize: int, nested_blocksize: int, out: torch.Tensor) -> None:
    _launch(data, absmax, nested_absmax, nested_code, offset, code, out, blocksize, nested_blocksize)


@_nf4_dequant_out_op.register_fake
def _(data, absmax, nested_absmax, nested_code, offset, code, blocksize, nested_blocksize, out):
    return None


# -- public functions ------------------------------------------------------------------------------------------
def nf4_dequantize_tensors(data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64,
                           nested_blocksize=256, dtype=torch.bfloat16, out=None) -> torch.Tensor:
    """Dequantize NF4 from plain tensors (layouts in the module docstring) with the Triton kernel.

    Args:
        data: uint8 ((N*K+1)//2,) or ((N*K+1)//2, 1) packed codes.
        absmax: uint8 (ceil(N*K/blocksize),) with double quantization (nested_* and offset given), else fp32.
        nested_absmax, nested_code, offset: fp32 (groups,), (256,), 0-d; or all None.
        code: fp32 (16,) the NF4 table. shape: (N, K). dtype: float32 | float16 | bfloat16.
        out: optional (N, K) buffer of ``dtype`` to write into (returned): contiguous, or rows apart
            (``out_layout_ok``), e.g. a column slice of a wider matrix.
    Returns:
        (N, K) tensor of ``dtype``, bit-identical to the fp32 reference cast once.
    """
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
        return torch.ops.minitrain.nf4_dequant_triton(data, absmax, nested_absmax, nested_code, offset, code, shape,
                                                      blocksize, nested_blocksize, dtype)
    torch.ops.minitrain.nf4_dequant_triton_out(data, absmax, nested_absmax, nested_code, offset, code, blocksize,
                                               nested_blocksize, out)
    return out


def nf4_dequantize(q, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize an NF4 weight object (anything with the attributes of ``quant.NF4Weight``: data, absmax,
    nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, dtype) to (N, K).

    ``dtype`` defaults to the weight's original dtype; ``out`` is an optional reused (N, K) buffer.
    """
    dtype = q.dtype if dtype is None else dtype
    double = q.nested_absmax is not None
    return nf4_dequantize_tensors(q.data, q.absmax, q.nested_absmax if double else None,
                                  q.nested_code if double else None, q.offset if double else None, q.code,
                                  q.shape, q.blocksize, q.nested_blocksize, dtype, out)
