"""Fused NF4 matmul for small M (decode, short sequences): y = x @ dequant(W)^T (+ bias), W never materialized.

Formula: for x (M, K) and an NF4 weight W (N, K) (layout of ``quant/nf4.py``; blocks of B elements along the
flattened row-major W),
    W[n, k] = cast_x(code[q(n, k)] * absmax[(n*K + k) // B])     (absmax decoded from the double quantization)
    y[m, n] = sum_k x[m, k] * W[n, k]    (fp32 accumulation)    + bias[n]
W is dequantized exactly as ``dequantize_nf4_ref(q, x.dtype)`` does, tile by tile in registers, so the only
difference from ``F.linear(x, dequant(W))`` is the order of the fp32 accumulation.

Each program owns a (BLOCK_M, BLOCK_N) tile of y and walks K in BLOCK_K steps: it reads BLOCK_N x BLOCK_K/2
packed bytes, decodes the high nibbles (even k) and the low nibbles (odd k) into two (BLOCK_N, BLOCK_K/2)
tiles and multiplies them with the even and odd columns of x, so no interleaving is needed.

Bytes read: N*K/2 (codes) + N*K/B (absmax) + M*K*2 (x, 16-bit) per program row of tiles; written: M*N*2.
For M <= 128 this is far less than dequant + GEMM (which writes and re-reads N*K*2 bytes), which is where it
wins; for large M, dequantizing once into a buffer and calling cuBLAS is faster (``quant.matmul_nf4``
measures both). Requirements: K % B == 0 (blocks never straddle rows), B <= 64 for the tiling below.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from csrc import sm_count

from .nf4_dequant import cast_rtne, nf4_dequantize_tensors

__all__ = ["nf4_matmul_ref", "nf4_matmul", "nf4_gemv", "fused_supported", "GEMV_MAX_M"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def nf4_matmul_ref(x, w_dequant, bias=None):
    """Reference on a dequantized weight: fp32 math, cast once to x's dtype."""
    y = x.float() @ w_dequant.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fused_supported(shape, blocksize) -> bool:
    """Whether the fused kernel handles this weight: blocks must not straddle rows and fit a K tile."""
    return blocksize <= 64 and shape[1] % blocksize == 0 and shape[1] % 2 == 0


def _configs():
    if _INTERPRET:  # the interpreter cannot autotune several configs
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3))]


def _prune(configs, named_args, **kwargs):
    # Small M: narrow N tiles give enough programs to fill the card; tall M tiles want wide N tiles (and
    # would run out of registers with the widest ones only when both are large).
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 16))
    keep = [c for c in configs if (c.kwargs["BLOCK_N"] <= 64 if bm <= 32 else c.kwargs["BLOCK_N"] >= 64)]
    return keep or configs[:1]


@triton.jit
def _decode_tile(data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, off, row_byte, row_blk, n_ok,
                 byte0, KH, jb, jh, HB: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 x_dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """The (BLOCK_N, NB, HB) weight tile whose packed bytes start at column ``byte0`` of each row, decoded into
    x's dtype: (even-k values, odd-k values). KH: packed bytes per row; rows of jb blocks past KH read as 0."""
    blk_ok = (byte0 + jb * HB) < KH                                      # (NB,)
    w_ok = n_ok[:, None] & blk_ok[None, :]                               # (BN, NB)
    boffs = row_byte[:, None, None] + (byte0 + jb * HB)[None, :, None] + jh[None, None, :]
    packed = tl.load(data_ptr + boffs, mask=w_ok[:, :, None], other=0, eviction_policy="evict_first")
    blk = row_blk[:, None] + (byte0 // HB + jb)[None, :]                 # (BN, NB)
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + blk, mask=w_ok, other=0).to(tl.int32)
        a2 = tl.load(nested_absmax_ptr + blk // NESTED_BLOCKSIZE, mask=w_ok, other=0.0)
        scale = tl.load(nested_code_ptr + a8) * a2 + off  # fp fusion is off: two roundings as the reference
    else:
        scale = tl.load(absmax_ptr + blk, mask=w_ok, other=0.0)
    w_hi = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, :, None]     # even k
    w_lo = tl.load(code_ptr + (packed & 0xF).to(tl.int32)) * scale[:, :, None]    # odd k
    return cast_rtne(w_hi, x_dtype, INTERPRET_BF16), cast_rtne(w_lo, x_dtype, INTERPRET_BF16)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "BLOCKSIZE", "DOUBLE_QUANT"],
                 prune_configs_by=None if _INTERPRET else {"early_config_prune": _prune})
@triton.jit
def _nf4_matmul_kernel(x_ptr, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr,
                       bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym, M_BUCKET,
                       HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE   # quantization blocks per row of a K tile
    HB: tl.constexpr = BLOCKSIZE // 2         # packed bytes per quantization block
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # n*K/2 passes 2^31 for big weights
    m_ok = offs_m < M
    n_ok = offs_n < N
    jb = tl.arange(0, NB)
    jh = tl.arange(0, HB)
    half = tl.arange(0, BLOCK_K // 2)
    row_byte = offs_n * (K // 2)
    row_blk = offs_n * (K // BLOCKSIZE)
    x_dtype = x_ptr.dtype.element_ty
    off = 0.0
    if DOUBLE_QUANT:
        off = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_hi, w_lo = _decode_tile(data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, off, row_byte,
                                  row_blk, n_ok, k0 // 2, K // 2, jb, jh, HB, NESTED_BLOCKSIZE, DOUBLE_QUANT, x_dtype,
                                  INTERPRET_BF16)
        w_hi = tl.reshape(w_hi, (BLOCK_N, BLOCK_K // 2))
        w_lo = tl.reshape(w_lo, (BLOCK_N, BLOCK_K // 2))
        kk = k0 + 2 * half
        x_mask = m_ok[:, None] & (kk < K)[None, :]
        x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kk + 1)[None, :], mask=x_mask, other=0.0)
        if DOT_F32:  # the interpreter's 16-bit dot is wrong; the values are exact in fp32
            x_even = x_even.to(tl.float32)
            x_odd = x_odd.to(tl.float32)
            w_hi = w_hi.to(tl.float32)
            w_lo = w_lo.to(tl.float32)
        if IEEE:
            acc = tl.dot(x_even, tl.trans(w_hi), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_lo), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even, tl.trans(w_hi), acc)
            acc = tl.dot(x_odd, tl.trans(w_lo), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, cast_rtne(acc, y_ptr.dtype.element_ty, INTERPRET_BF16), mask=m_ok[:, None] & n_ok[None, :])


def _launch(x2, data, absmax, nested_absmax, nested_code, offset, code, n_out, blocksize, nested_blocksize, bias):
    M, K = x2.shape
    y = torch.empty(M, n_out, dtype=x2.dtype, device=x2.device)
    block_m = min(max(16, triton.next_power_of_2(M)), 64 if M > 64 else 128)
    if _INTERPRET:
        block_m = 16
    double = nested_absmax is not None
    dummy = absmax
    grid = lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    _nf4_matmul_kernel[grid](
        x2, data, absmax, nested_absmax if double else dummy, nested_code if double else dummy,
        offset if double else dummy, code, bias if bias is not None else x2, y, M, n_out, K, x2.stride(0),
        y.stride(0), triton.next_power_of_2(M),
        HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double,
        DOT_F32=_INTERPRET, IEEE=x2.dtype == torch.float32, BLOCK_M=block_m,
        INTERPRET_BF16=_INTERPRET and x2.dtype == torch.bfloat16,
        enable_fp_fusion=False,  # the absmax decode must not become an FMA (bit-exact weights)
    )
    return y


# -- GEMV for M <= GEMV_MAX_M (decode) ---------------------------------------------------------------------------
GEMV_MAX_M = 8
GEMV_CONFIG_OVERRIDE: dict | None = None  # {"BLOCK_N", "ROW_BYTES", "num_warps"}: experiments (bench/nf4.py)


@triton.jit
def _nf4_gemv_kernel(x_ptr, data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, code_ptr, bias_ptr,
                     y_ptr, N, KH, KB, stride_xm, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROW_BYTES: tl.constexpr):
    """Program (p, m) owns output columns [p*BLOCK_N, +BLOCK_N) of row m of y and streams those BLOCK_N weight rows
    once, ROW_BYTES packed bytes of each per step (16-byte loads), decoding in registers into a 2-D fp32 partial-sum
    tile that is reduced once at the end: y[m, n] = sum_k x[m, k] * cast_x(code[q(n,k)] * absmax(n,k)).
    The programs of one weight tile for the M rows are adjacent in launch order, so the tile is read from DRAM once
    and from L2 by the others. KH = K/2 bytes per weight row, KB = K/BLOCKSIZE blocks per row (K % BLOCKSIZE == 0:
    a block never straddles rows).
    Measured on an H200 (kernel time, M=1): 16.6 us for 4096 x 4096, 7.9 us for 1024 x 4096, 44 us for 14336 x 4096,
    the same for every (BLOCK_N, ROW_BYTES, warps) tried, i.e. bound by the per-element decode work, not by memory
    (bitsandbytes' gemv: 11.6, 8.0, 30.6 us). Tried and slower: a 3-D (M, BLOCK_N, ROW_BYTES) product for all
    rows at once (135 vs 92 us at M=8, 4096 x 4096), keeping the (BLOCK_N, blocks, bytes) tile 3-D through the product (1.4-3.8x),
    and tl.gather on a register copy of the table (same time, and wrong results as used here on triton 3.6)."""
    NB: tl.constexpr = ROW_BYTES * 2 // BLOCKSIZE   # quantization blocks per row per step
    HB: tl.constexpr = BLOCKSIZE // 2               # packed bytes per block
    m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)   # n * K/2 passes 2^31 for big weights
    n_ok = offs_n < N
    jb = tl.arange(0, NB)
    jh = tl.arange(0, HB)
    half = tl.arange(0, ROW_BYTES)
    row_byte = offs_n * KH
    row_blk = offs_n * KB
    x_row = x_ptr + m * stride_xm
    x_dtype = x_ptr.dtype.element_ty
    off = 0.0
    if DOUBLE_QUANT:
        off = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_N, ROW_BYTES), dtype=tl.float32)
    for b0 in range(0, KH, ROW_BYTES):                                    # b0: packed byte = k0 / 2
        w_hi, w_lo = _decode_tile(data_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, off, row_byte,
                                  row_blk, n_ok, b0, KH, jb, jh, HB, NESTED_BLOCKSIZE, DOUBLE_QUANT, x_dtype,
                                  INTERPRET_BF16)
        w_hi = tl.reshape(w_hi, (BLOCK_N, ROW_BYTES)).to(tl.float32)
        w_lo = tl.reshape(w_lo, (BLOCK_N, ROW_BYTES)).to(tl.float32)
        kb = b0 + half
        x_ok = kb < KH
        x_even = tl.load(x_row + 2 * kb, mask=x_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + 2 * kb + 1, mask=x_ok, other=0.0).to(tl.float32)
        acc += w_hi * x_even[None, :] + w_lo * x_odd[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, cast_rtne(y, y_ptr.dtype.element_ty, INTERPRET_BF16), mask=n_ok)




def _gemv_config(m: int, n_out: int, k: int, blocksize: int, device) -> tuple[int, int, int]:
    """(BLOCK_N, ROW_BYTES, num_warps): enough programs for ~4 per SM, 2 KiB of packed weight per step (16 bytes
    per thread at 4 warps; the fp32 partial-sum tile is BLOCK_N x ROW_BYTES)."""
    if GEMV_CONFIG_OVERRIDE is not None:
        c = GEMV_CONFIG_OVERRIDE
        block_n, row_bytes, warps = c["BLOCK_N"], c["ROW_BYTES"], c["num_warps"]
    elif _INTERPRET:  # few, wide programs: the interpreter's cost is per program and per op, not per element
        block_n, row_bytes, warps = 16, 64, 4
    else:
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
        block_n = 8
        while block_n > 1 and triton.cdiv(n_out, block_n) < 4 * sms:
            block_n //= 2
        row_bytes = max(2048 // block_n, 16)
        warps = 4
    row_bytes = max(min(row_bytes, triton.next_power_of_2(k // 2)), blocksize // 2)
    return block_n, row_bytes, warps


def _launch_gemv(x2, data, absmax, nested_absmax, nested_code, offset, code, n_out, blocksize, nested_blocksize, bias):
    M, K = x2.shape
    y = torch.empty(M, n_out, dtype=x2.dtype, device=x2.device)
    block_n, row_bytes, warps = _gemv_config(M, n_out, K, blocksize, x2.device)
    double = nested_absmax is not None
    dummy = absmax
    _nf4_gemv_kernel[(M, triton.cdiv(n_out, block_n))](
        x2, data, absmax, nested_absmax if double else dummy, nested_code if double else dummy,
        offset if double else dummy, code, bias if bias is not None else x2, y, n_out, K // 2, K // blocksize,
        x2.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=double,
        INTERPRET_BF16=_INTERPRET and x2.dtype == torch.bfloat16, BLOCK_N=block_n, ROW_BYTES=row_bytes, num_warps=warps,
        enable_fp_fusion=False,  # the absmax decode must not become an FMA (bit-exact weights)
    )
    return y


def _check(x, data, absmax, code, shape, blocksize, bias):
    where = "nf4_matmul"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{where}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[-1] != shape[1]:
        raise ValueError(f"{where}: x has {x.shape[-1]} features but the weight is {tuple(shape)} (N, K)")
    if not fused_supported(shape, blocksize):
        raise ValueError(f"{where}: the fused kernel needs K % blocksize == 0 and blocksize <= 64, got K={shape[1]}, "
                         f"blocksize={blocksize}")
    n = shape[0] * shape[1]
    if data.dtype != torch.uint8 or data.numel() != (n + 1) // 2 or not data.is_contiguous():
        raise ValueError(f"{where}: data must be contiguous uint8 with {(n + 1) // 2} bytes, got {data.dtype} "
                         f"with {data.numel()}")
    for name, t in (("data", data), ("absmax", absmax), ("code", code)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (shape[0],) or not bias.is_contiguous()):
        raise ValueError(f"{where}: bias must be contiguous ({shape[0]},), got {tuple(bias.shape)}")


# -- torch.library registration -------------------------------------------------------------------------------
def register_linear_op(name: str, impl, dequantize):
    """``torch.ops.minitrain.<name>``: y = impl(x, data, absmax, nested_absmax, nested_code, offset, code, shape,
    blocksize, nested_blocksize, bias), the argument list of every NF4 matmul op (Triton and CUDA C++), with its fake
    (shape only) and its autograd: dx = dy @ W with W dequantized again by ``dequantize`` (same arguments as
    ``nf4_dequantize_tensors``) to dy's dtype, so nothing of size N*K is saved; dbias = sum of dy."""

    def op(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, nested_absmax: torch.Tensor | None,
           nested_code: torch.Tensor | None, offset: torch.Tensor | None, code: torch.Tensor, shape: list[int],
           blocksize: int, nested_blocksize: int, bias: torch.Tensor | None) -> torch.Tensor:
        return impl(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize,
                    bias)

    op = torch.library.custom_op(f"minitrain::{name}", op, mutates_args=())

    @op.register_fake
    def _(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
        return x.new_empty(*x.shape[:-1], shape[0])

    def setup_context(ctx, inputs, output):
        x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias = inputs
        ctx.q = (data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize)
        ctx.has_bias = bias is not None

    def backward(ctx, grad_y):
        shape = ctx.q[6]
        grad_x = grad_y @ dequantize(*ctx.q, grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad_y.reshape(-1, shape[0]).sum(0) if ctx.has_bias and ctx.needs_input_grad[10] else None
        return grad_x, None, None, None, None, None, None, None, None, None, grad_b

    op.register_autograd(backward, setup_context=setup_context)
    return op


def fused_impl(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    """The fused launch on validated arguments (no checks; ``nf4_matmul`` is the checked entry point)."""
    x2 = x.reshape(-1, shape[1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _launch(x2, data, absmax, nested_absmax, nested_code, offset, code, shape[0], blocksize, nested_blocksize,
                bias)
    return y.view(*x.shape[:-1], shape[0])


register_linear_op("nf4_matmul_fused", fused_impl, nf4_dequantize_tensors)


def nf4_matmul(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64, nested_blocksize=256,
               bias=None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) with W dequantized in registers (fused; best for small M).

    Args:
        x: (..., K) fp32/fp16/bf16. data/absmax/nested_absmax/nested_code/offset/code: the NF4 tensors
            (layouts in ``triton_ops.nf4_dequant``). shape: (N, K). bias: optional (N,).
    Returns:
        (..., N) in x's dtype. Differentiable in x and bias (the backward dequantizes W once).
    """
    shape = [int(shape[0]), int(shape[1])]
    data = data.reshape(-1)
    offset = None if offset is None else offset.reshape(1)
    _check(x, data, absmax, code, shape, blocksize, bias)
    return torch.ops.minitrain.nf4_matmul_fused(x, data, absmax, nested_absmax, nested_code, offset, code, shape,
                                                blocksize, nested_blocksize, bias)


def gemv_impl(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize, nested_blocksize, bias):
    """The GEMV launch on validated arguments (no checks; ``nf4_gemv`` is the checked entry point)."""
    x2 = x.reshape(-1, shape[1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _launch_gemv(x2, data, absmax, nested_absmax, nested_code, offset, code, shape[0], blocksize,
                     nested_blocksize, bias)
    return y.view(*x.shape[:-1], shape[0])


register_linear_op("nf4_gemv", gemv_impl, nf4_dequantize_tensors)


def nf4_gemv(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize=64, nested_blocksize=256,
             bias=None) -> torch.Tensor:
    """y = x @ dequant(W)^T (+ bias) for few rows of x (M <= GEMV_MAX_M, decode): each program streams a few
    weight rows once and reduces in fp32 (arguments as ``nf4_matmul``). Differentiable in x and bias."""
    shape = [int(shape[0]), int(shape[1])]
    data = data.reshape(-1)
    offset = None if offset is None else offset.reshape(1)
    _check(x, data, absmax, code, shape, blocksize, bias)
    return torch.ops.minitrain.nf4_gemv(x, data, absmax, nested_absmax, nested_code, offset, code, shape, blocksize,
                                        nested_blocksize, bias)
