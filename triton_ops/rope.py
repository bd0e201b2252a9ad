"""Rotary position embedding (RoPE), Hugging Face "rotate-half" convention, q and k in one launch.

Formula, per token (b, t) and head h, with the head split in halves x = [x1, x2] (each D/2 wide) and cos/sin
rows c = [c1, c2], s = [s1, s2] (Hugging Face builds them as ``cat(freqs, freqs)``, so c1 == c2, s1 == s2):

    forward    y = x * c + rotate_half(x) * s,  rotate_half(x) = [-x2, x1]
               y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
    backward   the transpose (rotation by -theta when the halves are equal):
               dx1 = dy1 c1 + dy2 s2,   dx2 = dy2 c2 - dy1 s1

One kernel does both, selected by the ``IS_BACKWARD`` constexpr; math in fp32, one rounding to the output
dtype (Hugging Face rounds three times in bf16, so it is the less exact of the two). Each program rotates a
block of ``RopeConfig.tokens`` tokens (cos/sin rows loaded once per token, heads looped in tiles); the launch
parameters (tokens, warps, tile, persistent grid, 32-bit offsets) live in :class:`RopeConfig` and change only
the speed.

Layouts: q (B, T, H, D), k (B, T, KV, D) with ANY strides (views out of a fused qkv projection work without
copies); cos, sin (B, T, D), (1, T, D) or (T, D), any float dtype and strides. D must be even; D/2 need not be
a power of two (masked). Out of place the outputs are new contiguous tensors; in place q and k are overwritten.

Bytes moved per call: read and write q and k once (2 * (H + KV) * D * elem bytes per token) plus cos and sin
(2 * D * their elem bytes per token, once per token, shared by all heads).

Eager calls (not traced, no dispatch mode, no functorch transform) skip the torch.library dispatch: rope()
launches directly with cached per-shape launch arguments, through a torch.autograd.Function when autograd
records. torch.compile and fake tensors go through the ``minitrain::rope`` / ``minitrain::rope_`` ops.

cos/sin come from :func:`rope_cos_sin`, which reproduces transformers' LlamaRotaryEmbedding bit for bit
("default", "linear" and "llama3" rope types) from position ids, so packed sequences restart at 0.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MINITRAIN_ROPE_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# cos / sin from position ids, as transformers computes them
# ----------------------------------------------------------------------------------------------------------
def _rope_params(rope_theta, rope_scaling) -> tuple[float, dict]:
    """Normalize 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``) spellings."""
    params = dict(rope_scaling or {})
    theta = params.pop("rope_theta", None)
    if rope_theta is not None and theta is not None and float(rope_theta) != float(theta):
        raise ValueError(f"rope_cos_sin: rope_theta={rope_theta} contradicts rope_scaling['rope_theta']={theta}")
    theta = float(rope_theta if rope_theta is not None else (theta if theta is not None else 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    params["rope_type"] = kind
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotImplementedError("rope_cos_sin: partial_rotary_factor != 1 is not supported")
    if kind not in ("default", "linear", "llama3"):
        raise NotImplementedError(f"rope_cos_sin: rope_type {kind!r} is not supported (default, linear, llama3)")
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    missing = [key for key in need.get(kind, ()) if key not in params]
    if missing:
        raise ValueError(f"rope_cos_sin: rope_type {kind!r} needs {missing} in rope_scaling, got {sorted(params)}")
    return theta, params


def rope_inv_freq(head_dim: int, rope_theta: float | None = 10000.0, rope_scaling: dict | None = None) -> torch.Tensor:
    """The (head_dim/2,) fp32 inverse frequencies, computed on the CPU with the same torch ops, in the same order,
    as transformers' rope init functions, so the values are identical."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be a positive even number, got {head_dim}")
    theta, p = _rope_params(rope_theta, rope_scaling)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim))
    if p["rope_type"] == "linear":
        inv_freq = inv_freq / p["factor"]
    elif p["rope_type"] == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, rope_theta: float | None = None,
                 rope_scaling: dict | None = None, dtype: torch.dtype = torch.float32):
    """cos and sin tables for the given positions, equal to transformers' ``LlamaRotaryEmbedding(config)(x, pos)``.

    Args:
        position_ids: (B, T) or (T,) integer positions; packed sequences simply restart at 0 per document.
        head_dim: D (even).
        rope_theta: the base (default 10000 when neither this nor ``rope_scaling['rope_theta']`` is given).
        rope_scaling: None, or a dict as in config.json: transformers 4.x ``rope_scaling`` (``rope_type`` or
            ``type``: "default", "linear" with ``factor``, "llama3" with ``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``) or 5.x ``rope_parameters`` (the same keys
            plus ``rope_theta``).
        dtype: dtype of the returned tables (transformers casts to the activations' dtype).
    Returns:
        (cos, sin), each (B, T, D) (or (T, D) for 1-D positions) on position_ids' device.
    """
    inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling).to(position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2), fp32 as transformers does
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def packed_position_ids(doc_lengths, device=None) -> torch.Tensor:
    """(sum(doc_lengths),) int64 positions restarting at 0 at the start of every packed document."""
    lengths = torch.as_tensor(doc_lengths, dtype=torch.int64, device=device)
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    return torch.arange(total, device=device) - torch.repeat_interleave(starts, lengths, output_size=total)


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def _cos_sin_4d(cos: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(T, D) / (1|B, T, D) -> (1|B, T, 1, D) broadcasting against (B, T, heads, D)."""
    return (cos if cos.dim() == 3 else cos[None]).unsqueeze(2)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False):
    """Pure torch, fp32 math: the specification (q (B,T,H,D), k (B,T,KV,D), cos/sin (B|1,T,D) or (T,D))."""
    out = []
    c, s = _cos_sin_4d(cos, q).float(), _cos_sin_4d(sin, q).float()
    half = q.shape[-1] // 2
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        if backward:
            y = torch.cat((x1 * c1 + x2 * s2, x2 * c2 - x1 * s1), dim=-1)
        else:
            y = torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)
        out.append(y.to(x.dtype))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(x_ptr, y_ptr, xrow, yrow, rmask, n_heads, sx_h, sx_d, sy_h, sy_d, a1, b1, a2, b2,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr, IDX64: tl.constexpr):
    # y1 = x1 * a1 + x2 * b1 ; y2 = x2 * a2 + x1 * b2 for every head of the program's tokens.
    # xrow, yrow, rmask: (TOKENS, 1, 1) token offsets and validity; a*, b*: (TOKENS, 1, HALF_PAD) fp32
    d = tl.arange(0, HALF_PAD)[None, None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        if IDX64:
            h = h.to(tl.int64)
        mask = rmask & (h < n_heads) & (d < HALF)
        xo = xrow + h * sx_h + d * sx_d
        yo = yrow + h * sy_h + d * sy_d
        x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xo + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * a1 + x2 * b1
        y2 = x2 * a2 + x1 * b2
        tl.store(y_ptr + yo, y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_ptr + yo + HALF * sy_d, y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_qk_once(q_ptr, qo_ptr, qrow, qorow, H, sq_h, sq_d, sqo_h, sqo_d,
                    k_ptr, ko_ptr, krow, korow, KV, sk_h, sk_d, sko_h, sko_d,
                    rmask, a1, b1, a2, b2, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr,
                    BLOCK_HK: tl.constexpr, IDX64: tl.constexpr):
    # _rotate_heads for q and k when each fits one tile (H <= BLOCK_HQ, KV <= BLOCK_HK): the loads of both come
    # first. Done head block by head block, k's loads would follow q's stores, which the compiler cannot move
    # them above (in place they are the same memory), so each program would wait for two load latencies.
    d = tl.arange(0, HALF_PAD)[None, None, :]
    hq = tl.arange(0, BLOCK_HQ)[None, :, None]
    hk = tl.arange(0, BLOCK_HK)[None, :, None]
    if IDX64:
        hq = hq.to(tl.int64)
        hk = hk.to(tl.int64)
    dmask = rmask & (d < HALF)
    qmask = dmask & (hq < H)
    kmask = dmask & (hk < KV)
    qo = qrow + hq * sq_h + d * sq_d
    ko = krow + hk * sk_h + d * sk_d
    q1 = tl.load(q_ptr + qo, mask=qmask, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + qo + HALF * sq_d, mask=qmask, other=0.0).to(tl.float32)
    k1 = tl.load(k_ptr + ko, mask=kmask, other=0.0).to(tl.float32)
    k2 = tl.load(k_ptr + ko + HALF * sk_d, mask=kmask, other=0.0).to(tl.float32)
    qy = qorow + hq * sqo_h + d * sqo_d
    ky = korow + hk * sko_h + d * sko_d
    tl.store(qo_ptr + qy, (q1 * a1 + q2 * b1).to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo_ptr + qy + HALF * sqo_d, (q2 * a2 + q1 * b2).to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(ko_ptr + ky, (k1 * a1 + k2 * b1).to(ko_ptr.dtype.element_ty), mask=kmask)
    tl.store(ko_ptr + ky + HALF * sko_d, (k2 * a2 + k1 * b2).to(ko_ptr.dtype.element_ty), mask=kmask)


@triton.jit
def _rope_block(blk, q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, H, KV, n_rows,
                sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                sqo_b, sqo_t, sqo_h, sqo_d, sko_b, sko_t, sko_h, sko_d,
                sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                TOKENS: tl.constexpr, IDX64: tl.constexpr, IS_BACKWARD: tl.constexpr, SINGLE: tl.constexpr):
    # token block `blk` = rows blk*TOKENS ... +TOKENS-1 of the flattened (B*T) tokens: cos/sin rows loaded once,
    # then every q head and every k head of those tokens
    row = blk * TOKENS + tl.arange(0, TOKENS)[:, None, None]  # (TOKENS, 1, 1); B*T itself fits in int32
    if IDX64:  # int64: B*T*H*D offsets pass 2^31 at long contexts
        row = row.to(tl.int64)
    rmask = row < n_rows
    b = row // T
    t = row % T
    d = tl.arange(0, HALF_PAD)[None, None, :]
    cmask = rmask & (d < HALF)
    cp = cos_ptr + b * sc_b + t * sc_t + d * sc_d
    sp = sin_ptr + b * ss_b + t * ss_t + d * ss_d
    c1 = tl.load(cp, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cp + HALF * sc_d, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(sp + HALF * ss_d, mask=cmask, other=0.0).to(tl.float32)
    if IS_BACKWARD:  # transpose of the forward rotation
        b1 = s2
        b2 = -s1
    else:
        b1 = -s1
        b2 = s2
    if SINGLE:  # every q head and every k head in one tile each: all four loads issued before any store
        _rotate_qk_once(q_ptr, qo_ptr, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, H, sq_h, sq_d, sqo_h, sqo_d,
                        k_ptr, ko_ptr, b * sk_b + t * sk_t, b * sko_b + t * sko_t, KV, sk_h, sk_d, sko_h, sko_d,
                        rmask, c1, b1, c2, b2, HALF, HALF_PAD, BLOCK_HQ, BLOCK_HK, IDX64)
        return
    _rotate_heads(q_ptr, qo_ptr, b * sq_b + t * sq_t, b * sqo_b + t * sqo_t, rmask, H, sq_h, sq_d, sqo_h, sqo_d,
                  c1, b1, c2, b2, HALF, HALF_PAD, BLOCK_HQ, IDX64)
    _rotate_heads(k_ptr, ko_ptr, b * sk_b + t * sk_t, b * sko_b + t * sko_t, rmask, KV, sk_h, sk_d, sko_h, sko_d,
                  c1, b1, c2, b2, HALF, HALF_PAD, BLOCK_HK, IDX64)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, H, KV, n_rows, n_blocks,
                 sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                 sqo_b, sqo_t, sqo_h, sqo_d, sko_b, sko_t, sko_h, sko_d,
                 sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                 HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 TOKENS: tl.constexpr, PERSISTENT: tl.constexpr, IDX64: tl.constexpr, IS_BACKWARD: tl.constexpr,
                 SINGLE: tl.constexpr = False):
    # one program per block of TOKENS tokens, or (PERSISTENT) a fixed grid of programs striding over the blocks
    if PERSISTENT:
        for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
            _rope_block(blk, q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, H, KV, n_rows,
                        sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                        sqo_b, sqo_t, sqo_h, sqo_d, sko_b, sko_t, sko_h, sko_d,
                        sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                        HALF, HALF_PAD, BLOCK_HQ, BLOCK_HK, TOKENS, IDX64, IS_BACKWARD, SINGLE)
    else:
        _rope_block(tl.program_id(0), q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, H, KV, n_rows,
                    sq_b, sq_t, sq_h, sq_d, sk_b, sk_t, sk_h, sk_d,
                    sqo_b, sqo_t, sqo_h, sqo_d, sko_b, sko_t, sko_h, sko_d,
                    sc_b, sc_t, sc_d, ss_b, ss_t, ss_d,
                    HALF, HALF_PAD, BLOCK_HQ, BLOCK_HK, TOKENS, IDX64, IS_BACKWARD, SINGLE)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
class RopeConfig(NamedTuple):
    """Launch parameters of the Triton kernel (none changes the result; the GPU sweep in bench compares them).

    tokens: tokens (rows of the flattened B*T) per program, a power of two; the tail block is masked.
    num_warps: warps per program.
    tile: most elements of one (tokens, heads, D/2) half tile; heads are looped in blocks that fit it.
    grid_cap: 0 launches one program per token block; n > 0 launches min(blocks, n) persistent programs that
        stride over the blocks.
    int32: 32-bit offset math when every offset the kernel can form (padding included) is below 2^31;
        otherwise, or when False, 64-bit.
    loads_first: when all q heads fit one tile and all k heads another, load q and k before storing either
        (``_rotate_qk_once``); otherwise, or when False, q's heads then k's, block by block.
    """
    tokens: int = 1
    num_warps: int = 2
    tile: int = 2048
    grid_cap: int = 0
    int32: bool = True
    loads_first: bool = True


# Defaults from the H200 sweeps (stop 23; q (4, 2048, 32, D), k KV=8, bf16, forward out of place, CUDA-graph
# replay): 2 warps with 32-bit offsets 45.2 us against 51.4 us for the earlier 4 warps with 64-bit offsets at
# D=128; loads_first then 44.2 vs 45.1 us at D=128 and 28.3 vs 32.0 us at D=80; more tokens per program or a
# persistent grid gained nothing measurable (bench/results/2026-11-28-h200-rope.md)
DEFAULT_CONFIG = RopeConfig()


def check_rope_inputs(q, k, cos, sin, where: str = "rope"):
    """Validate shapes/dtypes/devices; returns cos and sin as (B|1, T, D) views (no copies)."""
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: {name} must be float32/float16/bfloat16, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{where}: {name} is on {x.device}, expected q's device {q.device}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{where}: expected q (B, T, H, D) and k (B, T, KV, D), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"{where}: k must be (B={B}, T={T}, KV, D={D}) like q, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise ValueError(f"{where}: q and k must share a dtype, got {q.dtype} and {k.dtype}")
    if D % 2:
        raise ValueError(f"{where}: head dim D must be even, got {D}")
    out = []
    for name, x in (("cos", cos), ("sin", sin)):
        x3 = x[None] if x.dim() == 2 else x
        if x3.dim() != 3 or x3.shape[0] not in (1, B) or x3.shape[1] != T or x3.shape[2] != D:
            raise ValueError(f"{where}: {name} must be (B={B} or 1, T={T}, D={D}) or (T, D), got {tuple(x.shape)}")
        out.append(x3)
    return out[0], out[1]


def _check_config(config: RopeConfig) -> None:
    if not isinstance(config, RopeConfig):
        raise TypeError(f"rope: config must be a RopeConfig, got {type(config).__name__}")
    if config.tokens < 1 or config.tokens & (config.tokens - 1):
        raise ValueError(f"rope: config.tokens must be a power of two >= 1, got {config.tokens}")
    if config.num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"rope: config.num_warps must be a power of two from 1 to 32, got {config.num_warps}")
    if config.tile < 1 or config.grid_cap < 0:
        raise ValueError(f"rope: config.tile must be >= 1 and config.grid_cap >= 0, got {config}")


def _max_offset(extents, strides) -> int:
    return sum((n - 1) * s for n, s in zip(extents, strides))


def _make_plan(q, k, cos, sin, q_out, k_out, backward: bool, config: RopeConfig):
    """Validated launch arguments for these sizes/strides/dtypes: (grid, positional scalars, constexprs), or None
    when there is nothing to do."""
    cos3, sin3 = check_rope_inputs(q, k, cos, sin)
    _check_config(config)
    if q_out.shape != q.shape or k_out.shape != k.shape:
        raise ValueError(f"rope: outputs must be shaped like q {tuple(q.shape)} and k {tuple(k.shape)}, got "
                         f"{tuple(q_out.shape)} and {tuple(k_out.shape)}")
    B, T, H, D = q.shape
    KV = k.shape[2]
    if q.numel() == 0 or k.numel() == 0:
        return None
    half = D // 2
    half_pad = triton.next_power_of_2(half)
    tokens = config.tokens
    # heads per step: all of them when a (tokens, heads, D/2) half tile stays within config.tile elements
    block_hq = max(1, min(triton.next_power_of_2(H), config.tile // (tokens * half_pad)))
    block_hk = max(1, min(triton.next_power_of_2(KV), config.tile // (tokens * half_pad)))
    # a batch-broadcast (1, T, D) table gets batch stride 0
    sc = (0 if cos3.shape[0] == 1 else cos3.stride(0), cos3.stride(1), cos3.stride(2))
    ss = (0 if sin3.shape[0] == 1 else sin3.stride(0), sin3.stride(1), sin3.stride(2))
    n_rows = B * T
    n_blocks = triton.cdiv(n_rows, tokens)
    idx64 = True
    if config.int32:
        # largest offset formed, masked lanes included: batch index up to (B*T + tokens - 1) // T, padded heads,
        # d up to HALF_PAD - 1 plus the second half's HALF
        bmax = (n_blocks * tokens - 1) // T + 1
        dpad = half_pad + half
        hq, hk = triton.cdiv(H, block_hq) * block_hq, triton.cdiv(KV, block_hk) * block_hk
        worst = max(_max_offset((bmax, T, hq, dpad), q.stride()), _max_offset((bmax, T, hk, dpad), k.stride()),
                    _max_offset((bmax, T, hq, dpad), q_out.stride()), _max_offset((bmax, T, hk, dpad), k_out.stride()),
                    _max_offset((bmax, T, dpad), sc), _max_offset((bmax, T, dpad), ss))
        idx64 = worst >= 2**31
    grid = min(n_blocks, config.grid_cap) if config.grid_cap else n_blocks
    args = (T, H, KV, n_rows, n_blocks, *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *sc, *ss)
    meta = dict(HALF=half, HALF_PAD=half_pad, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, TOKENS=tokens,
                PERSISTENT=bool(config.grid_cap), IDX64=idx64, IS_BACKWARD=bool(backward),
                SINGLE=config.loads_first and H <= block_hq and KV <= block_hk, num_warps=config.num_warps)
    return (grid,), args, meta


# Validated launch plans by everything they depend on (a cache: same key, same plan); cleared when it grows past
# _PLANS_MAX so a stream of new shapes cannot grow it without bound.
_PLANS: dict[tuple, tuple | None] = {}
_PLANS_MAX = 512


def _launch_rope(q, k, cos, sin, q_out, k_out, backward: bool, config: RopeConfig = DEFAULT_CONFIG) -> None:
    """Rotate q, k into q_out, k_out (which may be q, k themselves). The first call per (shapes, strides, dtypes,
    devices, direction, config) validates and builds the launch arguments; later calls look them up."""
    try:
        out = 0 if q_out is q and k_out is k else (q_out.shape, q_out.stride(), k_out.shape, k_out.stride(),
                                                    q_out.dtype, k_out.dtype, q_out.device, k_out.device)
        key = (q.shape, q.stride(), k.shape, k.stride(), cos.shape, cos.stride(), sin.shape, sin.stride(), q.dtype,
               k.dtype, cos.dtype, sin.dtype, q.device, k.device, cos.device, sin.device, backward, config, out)
    except AttributeError:  # a non-tensor argument: let the checks say which one and what was expected
        check_rope_inputs(q, k, cos, sin)
        raise
    plan = _PLANS.get(key, _PLANS)
    if plan is _PLANS:
        if q_out.dtype != q.dtype or k_out.dtype != k.dtype or q_out.device != q.device or k_out.device != q.device:
            raise ValueError(f"rope: outputs must match q's dtype {q.dtype} and device {q.device}")
        plan = _make_plan(q, k, cos, sin, q_out, k_out, backward, config)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    if plan is not None:
        grid, args, meta = plan
        _rope_kernel[grid](q, k, q_out, k_out, cos, sin, *args, **meta)


# ----------------------------------------------------------------------------------------------------------
# torch.library registration (what torch.compile and fake tensors see)
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minitrain::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch_rope(q, k, cos, sin, q_out, k_out, backward)
    return q_out, k_out


@_rope_op.register_fake
def _(q, k, cos, sin, backward):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("minitrain::rope_", mutates_args=("q", "k"))
def _rope_inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    _launch_rope(q, k, cos, sin, q, k, backward)


@_rope_inplace_op.register_fake
def _(q, k, cos, sin, backward):
    return None


def rope_setup_context(ctx, inputs, output):
    _, _, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward = backward


def make_rope_backward(op):
    """Autograd formula shared by the Triton and the CUDA op: the gradient of a rotation is the transposed
    rotation, i.e. the same op with the direction flag flipped. cos and sin are constants (no gradient)."""

    def backward(ctx, dq_out, dk_out):
        # autograd materializes the gradient of an unused output as zeros, so both are tensors here
        cos, sin = ctx.saved_tensors
        dq, dk = op(dq_out, dk_out, cos, sin, not ctx.backward)
        return dq, dk, None, None, None

    return backward


torch.library.register_autograd("minitrain::rope", make_rope_backward(torch.ops.minitrain.rope),
                                setup_context=rope_setup_context)


# ----------------------------------------------------------------------------------------------------------
# The eager short path
# ----------------------------------------------------------------------------------------------------------
# A RoPE call moves ~40 MB in ~45 us on an H200, so the host work of an eager call is what limits it: the
# custom op's dispatch and autograd wrapping cost more than the kernel. Outside tracing, rope() calls the
# launcher directly (launch plans cached per shape, see _launch_rope), through _EagerRope when autograd must
# record it. torch.compile, fake tensors, dispatch modes and functorch transforms take the torch.library ops.
def _eager_ok(q, k, cos, sin) -> bool:
    return (type(q) is torch.Tensor and type(k) is torch.Tensor and type(cos) is torch.Tensor
            and type(sin) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and torch._C._functorch.peek_interpreter_stack() is None)


class _EagerRope(torch.autograd.Function):
    """The op's autograd formula without its dispatch: backward is the launch with the direction flipped
    (differentiable again when the backward itself records a graph). ``launch`` is the backend's launcher,
    ``launch(q, k, cos, sin, q_out, k_out, backward)``; ``op`` its torch.library op, which a traced backward
    (compiled autograd) calls instead."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, backward, launch, op):
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        launch(q, k, cos, sin, q_out, k_out, backward)
        ctx.save_for_backward(cos, sin)
        ctx.backward, ctx.launch, ctx.op = backward, launch, op
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        if _eager_ok(dq_out, dk_out, cos, sin):
            dq, dk = _eager_rope(dq_out, dk_out, cos, sin, False, ctx.launch, ctx.op, not ctx.backward)
        else:  # traced (compiled autograd, fake tensors): the op, which tracing sees through
            dq, dk = ctx.op(dq_out, dk_out, cos, sin, not ctx.backward)
        return dq, dk, None, None, None, None, None


def _eager_rope(q, k, cos, sin, inplace: bool, launch, op, backward: bool = False):
    """rope() outside tracing: the same results as the torch.library ops, without their dispatch."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q_out, k_out = _EagerRope.apply(q, k, cos, sin, backward, launch, op)
        if not inplace:
            return q_out, k_out
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    if inplace:
        launch(q, k, cos, sin, q, k, backward)
        torch.autograd.graph.increment_version((q, k))  # as the mutating op would: autograd sees the change
        return q, k
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    launch(q, k, cos, sin, q_out, k_out, backward)
    return q_out, k_out


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"rope: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    return backend


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False,
         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embeddings to q and k (Hugging Face rotate-half convention) in one launch.

    Args:
        q: (B, T, H, D) queries, float32/float16/bfloat16, any strides (e.g. a view of a fused qkv output).
        k: (B, T, KV, D) keys, same dtype.
        cos, sin: (B, T, D), (1, T, D) or (T, D) tables from :func:`rope_cos_sin` (any float dtype); constants.
        inplace: overwrite q and k. Without autograd recording this is a true in-place kernel; when q or k
            needs a gradient, the rotated values are computed out of place and copied back (autograd cannot
            record one in-place op on two views), so the result is the same but no memory is saved.
        backend: "auto" (Triton on CUDA, the reference on CPU; env MINITRAIN_ROPE_BACKEND overrides),
            "torch", "triton" or "cuda" (csrc/rope.cu, needs CuPy).
    Returns:
        (q_rot, k_rot): new contiguous tensors, or q and k themselves when ``inplace``.
    """
    backend = resolve_backend(backend, q.device)
    if backend == "torch":
        check_rope_inputs(q, k, cos, sin)
        q_out, k_out = rope_ref(q, k, cos, sin)
        if inplace:
            q.copy_(q_out)
            k.copy_(k_out)
            return q, k
        return q_out, k_out
    if not q.is_cuda and not (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"rope: backend {backend!r} needs CUDA tensors, got {q.device} "
                         "(CPU tensors run the Triton kernel only under TRITON_INTERPRET=1)")
    if backend == "cuda":
        import csrc.rope  # registers minitrain::rope_cuda; compiles at first launch

        launch = csrc.rope.launch_rope_cuda
        op, inplace_op = torch.ops.minitrain.rope_cuda, torch.ops.minitrain.rope_cuda_
    else:
        launch = _launch_rope
        op, inplace_op = torch.ops.minitrain.rope, torch.ops.minitrain.rope_
    if _eager_ok(q, k, cos, sin):
        return _eager_rope(q, k, cos, sin, inplace, launch, op)
    if not inplace:
        return op(q, k, cos, sin, False)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        q_out, k_out = op(q, k, cos, sin, False)
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    inplace_op(q, k, cos, sin, False)
    return q, k
