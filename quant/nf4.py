"""The NF4 4-bit weight format, byte-compatible with bitsandbytes (``quant_type="nf4"``).

Layout of a quantized weight W (N, K), flattened row-major into n = N*K elements:

* ``data``   uint8 ((n + 1) // 2, 1): byte j holds element 2j in the HIGH nibble and 2j+1 in the low
  nibble; with odd n the unused low nibble of the last byte holds code 7 (the 0.0 entry).
* ``absmax`` one scale per block of ``blocksize`` (64) consecutive elements. With double quantization it
  is itself stored as uint8 codes of the signed 8-bit dynamic map (``nested_code``) in blocks of
  ``nested_blocksize`` (256), with one fp32 ``nested_absmax`` per block and one fp32 ``offset`` (the mean
  of the fp32 absmax) added back:  absmax[i] = nested_code[a8[i]] * nested_absmax[i // 256] + offset.
* element k = NF4[q_k] * absmax[k // 64], computed in fp32 and cast once to the output dtype.

Bytes per element read by a dequantization: 0.5 (codes) + 1/64 (uint8 absmax) + 4/(64*256) (nested
absmax); written: 2 for fp16/bf16 output, 4 for fp32. Storage is ~0.516 bytes per element against 2 for
bf16, a 3.9x saving.

Where bitsandbytes' rules are subtle they are followed exactly (its CPU implementation is the definition):
the 4-bit codes are chosen by comparing against the fp32 midpoints of the table (ties go down), full
blocks are scaled by a reciprocal multiply and a partial last block by a division, and the 8-bit absmax
codes come from a 65536-bin lookup table (not round-to-nearest; see ``quantize_blockwise_8bit_ref``).
"""
from __future__ import annotations

import json
import math
from typing import Mapping

import torch

__all__ = [
    "NF4_CODE",
    "dynamic_map_8bit",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4_ref",
    "quantize_blockwise_8bit_ref",
    "QUANT_STATE_KEY",
]

# The 16 NF4 levels (quantiles of a standard normal, normalized to [-1, 1]), index = 4-bit code.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
PAD_CODE = 7  # NF4_CODE[7] == 0.0 fills the low nibble of the last byte when n is odd
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map_8bit(device=None) -> torch.Tensor:
    """The signed 8-bit "dynamic" map bitsandbytes uses to store absmax values: 256 sorted fp32 levels.

    For each decade 10^(i-6), i = 0..6, the midpoints of 2^i equal steps over [0.1, 1] scaled into that
    decade, mirrored for negative values, plus 0 and 1. The levels are computed in fp32, as there.
    """
    levels: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (10.0 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        levels += mids.tolist() + (-mids).tolist()
    levels += [0.0, 1.0]
    return torch.tensor(sorted(levels), dtype=torch.float32, device=device)


def _blocks(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a flat tensor into (full blocks (nb, blocksize), remainder or None)."""
    full = x.numel() - x.numel() % blocksize
    rem = x[full:] if full < x.numel() else None
    return x[:full].view(-1, blocksize), rem


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the elements scaled into [-1, 1], as bitsandbytes' 4-bit quantizer does."""
    full_blocks, rem = _blocks(flat, blocksize)
    absmax = full_blocks.abs().amax(dim=1)
    # Full blocks: multiply by an fp32 reciprocal; the partial block: divide (two different roundings).
    scaled = torch.clamp(full_blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem is not None:
        am = rem.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(rem / am, -1, 1)])
    return absmax, scaled


_LUT_SIZE = 65536


def _lut_8bit(code: torch.Tensor) -> torch.Tensor:
    """Bin i of [-1, 1] (65536 bins, value -1 + 2i/65535) -> the code whose midpoint interval holds it."""
    mids = 0.5 * (code[:-1] + code[1:])
    i = torch.arange(_LUT_SIZE, device=code.device, dtype=torch.float32)
    vals = -1.0 + (2.0 * i) / (_LUT_SIZE - 1)
    return torch.searchsorted(mids, vals, side="left")  # number of midpoints strictly below the bin value


def quantize_blockwise_8bit_ref(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a flat fp32 tensor against a sorted 256-level code, as bitsandbytes'
    CPU quantizer does it (the definition of the absmax bytes).

    Per block: absmax = max |x|; v = x * (1/absmax) clamped to [-1, 1]; v goes to one of 65536 uniform
    bins by truncating ((v + 1) * 0.5) * 65535 + 0.5 (each step rounded in fp32), and each bin holds the
    code nearest to the bin's own value. This differs from round-to-nearest for about one code in 500,
    which is why a plain nearest search is not used here. Blocks with absmax 0 get code 0.
    Returns (uint8 codes, fp32 absmax).
    """
    x = x.reshape(-1).float()
    n = x.numel()
    nb = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax
    v = torch.clamp(blocks * inv.view(-1, 1), -1.0, 1.0)
    t = ((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5
    idx = t.to(torch.int64).clamp_(0, _LUT_SIZE - 1)  # float -> int truncates, as the C cast does
    q = _lut_8bit(code.float())[idx]
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8), absmax


class NF4Weight:
    """A 4-bit NF4 weight with its quantization state (bitsandbytes layout; see the module docstring).

    Attributes:
        data: uint8 ((n+1)//2, 1) packed codes.
        absmax: uint8 (nblocks,) with double quantization, else fp32 (nblocks,).
        code: fp32 (16,) the NF4 table ("quant_map").
        nested_absmax: fp32 (ceil(nblocks/256),) or None.
        nested_code: fp32 (256,) the 8-bit dynamic map ("nested_quant_map") or None.
        offset: fp32 0-d tensor (mean of the fp32 absmax) or None.
        blocksize, nested_blocksize: ints.
        shape: torch.Size (N, K) of the original weight.
        dtype: the original (and default dequantization) dtype.
    """

    def __init__(self, data, absmax, shape, dtype, blocksize=64, code=None, nested_absmax=None,
                 nested_code=None, offset=None, nested_blocksize=NESTED_BLOCKSIZE, _where="NF4Weight"):
        self.data = data
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = int(blocksize)
        self.code = nf4_code(data.device) if code is None else code
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.offset = offset
        self.nested_blocksize = int(nested_blocksize)
        self._validate(_where)

    # -- structure ---------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes of device memory the quantized weight occupies (codes plus all quantization state)."""
        parts = [self.data, self.absmax, self.code, self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def _validate(self, where: str = "NF4Weight") -> None:
        n = self.numel
        if len(self.shape) != 2:
            raise ValueError(f"{where}: shape must be 2-D (N, K), got {tuple(self.shape)}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"{where}: blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.dtype not in _FLOAT_DTYPES.values():
            raise ValueError(f"{where}: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(f"{where}: packed data must be uint8 with (N*K+1)//2 = {(n + 1) // 2} bytes for "
                             f"shape {tuple(self.shape)}, got {self.data.dtype} with {self.data.numel()}")
        nb = -(-n // self.blocksize)
        if self.absmax.numel() != nb:
            raise ValueError(f"{where}: absmax must hold one value per block of {self.blocksize} "
                             f"({nb} for shape {tuple(self.shape)}), got {self.absmax.numel()}")
        if self.code.numel() != 16:
            raise ValueError(f"{where}: quant_map must have 16 entries, got {self.code.numel()}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"{where}: with nested quantization absmax must be uint8, got {self.absmax.dtype}")
            if self.nested_blocksize < 1 or self.nested_blocksize & (self.nested_blocksize - 1):
                raise ValueError(f"{where}: nested_blocksize must be a positive power of two (bitsandbytes writes "
                                 f"256), got {self.nested_blocksize}")
            nnb = -(-nb // self.nested_blocksize)
            if self.nested_absmax.numel() != nnb:
                raise ValueError(f"{where}: nested_absmax must hold {nnb} values (one per {self.nested_blocksize} "
                                 f"blocks), got {self.nested_absmax.numel()}")
            if self.nested_code is None or self.nested_code.numel() != 256:
                raise ValueError(f"{where}: nested_quant_map must have 256 entries")
            if self.offset is None:
                raise ValueError(f"{where}: nested quantization needs an offset")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"{where}: without nested quantization absmax must be float32, got {self.absmax.dtype}")

    # -- use ---------------------------------------------------------------------------------------
    def dequantize(self, dtype=None, out=None, backend="auto") -> torch.Tensor:
        """The (N, K) weight in ``dtype`` (default: the original dtype); see ``quant.dequantize_nf4``."""
        from .dispatch import dequantize_nf4

        return dequantize_nf4(self, dtype=dtype, out=out, backend=backend)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block fp32 scales, decoding the nested quantization when present."""
        if not self.double_quant:
            return self.absmax
        idx = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.nested_blocksize
        return self.nested_code[self.absmax.long()] * self.nested_absmax[idx] + self.offset

    def to(self, device=None) -> "NF4Weight":
        """A copy on ``device``. Only devices: the packed bytes have no float dtype to cast (the output dtype is
        ``dequantize``'s ``dtype=`` argument)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"NF4Weight.to: expected a device, got the dtype {device}; NF4Weight moves between devices "
                            f"only (choose the output dtype with dequantize(dtype=...))")

        def mv(t):
            return None if t is None else t.to(device)

        return NF4Weight(mv(self.data), mv(self.absmax), self.shape, self.dtype, self.blocksize, mv(self.code),
                         mv(self.nested_absmax), mv(self.nested_code), mv(self.offset), self.nested_blocksize)

    def cuda(self) -> "NF4Weight":
        return self.to("cuda")

    def __repr__(self) -> str:
        dq = f", double_quant (nested blocksize {self.nested_blocksize})" if self.double_quant else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
                f"device={self.device}, {self.nbytes / 2**20:.2f} MiB)")

    # -- checkpoints -------------------------------------------------------------------------------
    def quant_state_dict(self) -> dict:
        """The non-tensor part of the state, in bitsandbytes' key order."""
        d = {"quant_type": "nf4", "blocksize": self.blocksize,
             "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}
        if self.double_quant:
            d.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                      "nested_offset": float(self.offset.item())})
        return d

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under bitsandbytes' checkpoint keys for the Linear module ``prefix`` (e.g.
        ``"model.layers.0.mlp.down_proj."``): ``<prefix>weight``, ``<prefix>weight.absmax``, ...
        """
        w = prefix + "weight"
        sd = {w: self.data, f"{w}.absmax": self.absmax, f"{w}.quant_map": self.code}
        if self.double_quant:
            sd[f"{w}.nested_absmax"] = self.nested_absmax
            sd[f"{w}.nested_quant_map"] = self.nested_code
        packed = json.dumps(self.quant_state_dict()).encode("utf-8")
        sd[f"{w}.{QUANT_STATE_KEY}"] = torch.tensor(list(packed), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", device=None) -> "NF4Weight":
        """Read what ``state_dict(prefix)`` (or bitsandbytes' Linear4bit) wrote. Errors name the key."""
        w = prefix + "weight"
        qkey = f"{w}.{QUANT_STATE_KEY}"
        for key in (w, f"{w}.absmax", f"{w}.quant_map", qkey):
            if key not in sd:
                found = sorted(k for k in sd if k.startswith(w))
                raise KeyError(f"NF4 state dict: missing key '{key}' (found {found or 'no keys with that prefix'})")
        try:
            qs = json.loads(bytes(sd[qkey].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RuntimeError, ValueError) as e:
            raise ValueError(f"NF4 state dict: '{qkey}' does not hold UTF-8 JSON bytes: {e}") from None
        if not isinstance(qs, dict):
            raise ValueError(f"NF4 state dict: '{qkey}' must hold a JSON object, got {type(qs).__name__}")
        where = f"NF4 state dict '{qkey}'"
        for field in ("quant_type", "blocksize", "dtype", "shape"):
            if field not in qs:
                raise ValueError(f"{where}: missing field '{field}' (has {sorted(qs)})")
        if qs["quant_type"] != "nf4":
            raise ValueError(f"{where}: quant_type must be 'nf4', got {qs['quant_type']!r}")
        if qs["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: dtype must be one of {sorted(_FLOAT_DTYPES)}, got {qs['dtype']!r}")
        shape = qs["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise ValueError(f"{where}: shape must be [N, K] of positive ints, got {shape!r}")
        has_nested = f"{w}.nested_absmax" in sd
        if has_nested != ("nested_offset" in qs):
            raise ValueError(f"{where}: contradicts the tensors: nested_offset "
                             f"{'missing' if has_nested else 'present'} but '{w}.nested_absmax' "
                             f"{'present' if has_nested else 'missing'}")
        nested = {}
        if has_nested:
            if f"{w}.nested_quant_map" not in sd:
                raise KeyError(f"NF4 state dict: missing key '{w}.nested_quant_map'")
            if qs.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"{where}: nested_dtype must be 'float32', got {qs['nested_dtype']!r}")
            nested = dict(nested_absmax=sd[f"{w}.nested_absmax"].float(), nested_code=sd[f"{w}.nested_quant_map"].float(),
                          offset=torch.tensor(float(qs["nested_offset"]), dtype=torch.float32),
                          nested_blocksize=qs.get("nested_blocksize", NESTED_BLOCKSIZE))
        data = sd[w]
        if data.dtype != torch.uint8:  # bitsandbytes allows other quant_storage dtypes; the bytes are the same
            data = data.contiguous().view(torch.uint8)
        q = cls(data.reshape(-1, 1), sd[f"{w}.absmax"], shape, _FLOAT_DTYPES[qs["dtype"]], qs["blocksize"],
                sd[f"{w}.quant_map"].float(), **nested, _where=f"NF4 state dict for '{w}'")
        return q if device is None else q.to(device)


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D float weight (N, K) to NF4, byte-identical to bitsandbytes' ``quantize_4bit(w,
    blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)``.

    Any element count works (a partial last block included). The math is fp32 on w's device. A weight holding
    inf or NaN is refused (ValueError naming the first such element): bitsandbytes quantizes it silently, and the
    double-quantization offset (the mean of all block scales) then turns every element of the weight into NaN.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_nf4: expected a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"quantize_nf4: weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    if w.dtype not in _FLOAT_DTYPES.values():
        raise TypeError(f"quantize_nf4: weight must be float32, float16 or bfloat16, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: weight is empty (shape {tuple(w.shape)})")
    flat = w.detach().reshape(-1).float()
    code = nf4_code(w.device)
    absmax, scaled = _scale_blocks(flat, blocksize)
    if not bool(torch.isfinite(absmax).all()):  # amax propagates NaN, so this sees every inf and NaN
        bad = ~torch.isfinite(flat)
        first = int(bad.nonzero()[0, 0])
        row, col = divmod(first, w.shape[1])
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} has {int(bad.sum())} non-finite values "
                         f"(first: {flat[first].item()} at [{row}, {col}]); NF4 cannot store inf or "
                         f"NaN (with double quantization one would make every block NaN)")
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # 0.0 quantizes to PAD_CODE
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    data = ((q[0::2] << 4) | q[1::2]).view(-1, 1)
    if not double_quant:
        return NF4Weight(data, absmax, w.shape, w.dtype, blocksize, code)
    # The offset is the fp32 mean of the absmax as torch computes it on the CPU (bitsandbytes' definition);
    # a CUDA reduction sums in another order and can differ in the last bit, changing every nested byte.
    offset = absmax.cpu().mean().to(absmax.device)
    nested_code = dynamic_map_8bit(w.device)
    a8, absmax2 = quantize_blockwise_8bit_ref(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Weight(data, a8, w.shape, w.dtype, blocksize, code, absmax2, nested_code, offset)


def dequantize_nf4_ref(q: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference dequantization (pure torch, fp32 math, one cast): the specification of every backend."""
    dtype = q.dtype if dtype is None else dtype
    n = q.numel
    codes = torch.stack([q.data.view(-1) >> 4, q.data.view(-1) & 0xF], dim=1).view(-1)[:n]
    scale = q.absmax_fp32().repeat_interleave(q.blocksize)[:n]
    w = (q.code[codes.long()] * scale).view(q.shape).to(dtype)
    if out is None:
        return w
    return out.copy_(w)
