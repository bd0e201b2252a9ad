"""RMSNorm with Hugging Face LlamaRMSNorm's exact casting, fused forward and backward.

Forward, per row x of C elements (statistics in fp32, two roundings exactly where transformers has them):

    r  = rsqrt(mean(x32^2) + eps)             fp32, saved for the backward (4 bytes per row)
    h  = (x32 * r).to(x.dtype)                rounded to the input dtype, as ``hidden.to(input_dtype)``
    y  = (w * h)                              in promote(w.dtype, x.dtype), as ``self.weight * hidden``

Backward, with x^ = x32 * r and g = dy * w (fp32, no intermediate rounding):

    dx = r * (g - x^ * mean(g * x^))          (the rounding of h is passed straight through, as autograd does)
    dw = sum over rows of dy * h              (h rounded, the exact derivative of y = w * h)

dw is accumulated in fp32 by a fixed set of persistent programs, one partial row each, then summed in a fixed
order and cast to the weight's dtype by one small kernel: no atomics, the same bits on every run.

Layout: x (..., C) whose rows are evenly strided with unit column stride (any contiguous tensor or a row
slice of one); weight (C,). A row is held in registers as a power-of-two block plus, for other widths, a
power-of-two tail (C = 4100: 4096 + 4 columns). Bytes moved per element: forward reads x and writes y
(2 * elem bytes); backward reads x and dy and writes dx (3 * elem bytes), plus for dw one fp32 partial row of
C per persistent program, written once and read once (2 programs per SM at C = 4096: 2 * 132 * 4096 * 4 bytes
= 4.3 MB each way, 1% of the 403 MB the backward moves at x (16384, 4096) bf16).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from csrc import sm_count as _sm_count

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "MINITRAIN_RMS_NORM_BACKEND"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_C = 65536  # one row lives in registers; wider rows would spill heavily


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure torch, the specification: transformers' LlamaRMSNorm.forward, operation for operation."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
# A row of C elements lives in registers as a power-of-two block of BLOCK_C columns plus, when C is not a
# power of two, a power-of-two tail of TAIL_C columns after it (C = 4100: 4096 + 4, where one 8192 block
# would leave half its lanes masked). ALIGN (elements) is a power of two dividing every row stride, so rows
# of odd width are still loaded in vectors of ALIGN elements (8 bytes for C = 4100 in bf16, not 2). MASK_C is
# False when the main block lies inside the row (C >= BLOCK_C): its loads then carry only a row mask, which
# leaves them vectorized (a column mask `cols < C` with C not a multiple of 16 makes every load 2 bytes wide).
@triton.jit
def _fwd_part(x, rstd, w_ptr, y_ptr, y_row, cols, cmask, mask):
    h = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)  # the rounding transformers does with hidden.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    y = w.to(tl.float32)[None, :] * h.to(tl.float32)  # bf16*bf16 is exact in fp32: one rounding, as torch's mul
    tl.store(y_ptr + y_row[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, C, inv_c, sx, sy, eps,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, TAIL_C: tl.constexpr,
                         MASK_C: tl.constexpr, ALIGN: tl.constexpr, EVICT: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: N*C can pass 2^31
    rmask = rows < N
    x_row = tl.multiple_of(rows * sx, ALIGN)
    y_row = tl.multiple_of(rows * sy, ALIGN)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < (C if MASK_C else BLOCK_C)  # all-true when C >= BLOCK_C: no column mask, vector loads
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    x32 = x.to(tl.float32)
    ss = tl.sum(x32 * x32, axis=1)
    if TAIL_C > 0:
        tcols = BLOCK_C + tl.arange(0, TAIL_C)
        tcmask = tcols < C
        tmask = rmask[:, None] & tcmask[None, :]
        xt = tl.load(x_ptr + x_row[:, None] + tcols[None, :], mask=tmask, other=0.0, eviction_policy=EVICT)
        xt32 = xt.to(tl.float32)
        ss += tl.sum(xt32 * xt32, axis=1)
    rstd = tl.math.rsqrt(ss * inv_c + eps)  # torch's mean multiplies by fp32(1/C) too; rsqrtf as torch.rsqrt
    _fwd_part(x, rstd, w_ptr, y_ptr, y_row, cols, cmask, mask)
    if TAIL_C > 0:
        _fwd_part(xt, rstd, w_ptr, y_ptr, y_row, tcols, tcmask, tmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _bwd_load(x_ptr, dy_ptr, w, rstd, x_row, dy_row, cols, mask, EVICT: tl.constexpr):
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    dy = tl.load(dy_ptr + dy_row[:, None] + cols[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    xhat = x.to(tl.float32) * rstd[:, None]
    g = dy.to(tl.float32) * w[None, :]
    return x, dy.to(tl.float32), xhat, g


@triton.jit
def _bwd_store(dx_ptr, dx_row, cols, mask, g, xhat, c, rstd):
    dx = (g - xhat * c[:, None]) * rstd[:, None]
    tl.store(dx_ptr + dx_row[:, None] + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, N, C, inv_c, sdy, sx, sdx,
                         HAS_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                         TAIL_C: tl.constexpr, MASK_C: tl.constexpr, ALIGN: tl.constexpr, EVICT: tl.constexpr,
                         NUM_STAGES: tl.constexpr):
    # persistent: program p takes row blocks p, p + P, p + 2P, ... (a grid of one program per row block runs the
    # loop once) and keeps its dw partial in registers, summed over the block's rows at each step
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < (C if MASK_C else BLOCK_C)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if TAIL_C > 0:
        tcols = BLOCK_C + tl.arange(0, TAIL_C)
        tcmask = tcols < C
        wt = tl.load(w_ptr + tcols, mask=tcmask, other=0.0).to(tl.float32)
        acc_t = tl.zeros((TAIL_C,), dtype=tl.float32)
    for start in tl.range(pid * BLOCK_M, N, n_prog * BLOCK_M, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < N
        x_row = tl.multiple_of(rows * sx, ALIGN)
        dy_row = tl.multiple_of(rows * sdy, ALIGN)
        dx_row = tl.multiple_of(rows * sdx, ALIGN)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        mask = rmask[:, None] & cmask[None, :]
        x, dy, xhat, g = _bwd_load(x_ptr, dy_ptr, w, rstd, x_row, dy_row, cols, mask, EVICT)
        dot = tl.sum(g * xhat, axis=1)
        if TAIL_C > 0:
            tmask = rmask[:, None] & tcmask[None, :]
            xt, dyt, xhat_t, g_t = _bwd_load(x_ptr, dy_ptr, wt, rstd, x_row, dy_row, tcols, tmask, EVICT)
            dot += tl.sum(g_t * xhat_t, axis=1)
        c = dot * inv_c
        _bwd_store(dx_ptr, dx_row, cols, mask, g, xhat, c, rstd)
        if HAS_DW:
            acc += tl.sum(dy * xhat.to(x.dtype).to(tl.float32), axis=0)
        if TAIL_C > 0:
            _bwd_store(dx_ptr, dx_row, tcols, tmask, g_t, xhat_t, c, rstd)
            if HAS_DW:
                acc_t += tl.sum(dyt * xhat_t.to(xt.dtype).to(tl.float32), axis=0)
    if HAS_DW:
        part = dw_part_ptr + pid.to(tl.int64) * C
        tl.store(part + cols, acc, mask=cmask)
        if TAIL_C > 0:
            tl.store(part + tcols, acc_t, mask=tcmask)


@triton.jit
def _rms_norm_dw_kernel(part_ptr, dw_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dw[c] = sum over the P partial rows, in a fixed order (deterministic), cast to the weight's dtype
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        prow = start + tl.arange(0, BLOCK_P)
        mask = (prow < P)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + prow.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    tl.store(dw_ptr + cols, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"



def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """x (..., C) as an (N, C) view with unit column stride, or a clear error (no hidden copies)."""
    C = x.shape[-1]
    if x.stride(-1) != 1 and C > 1:
        raise ValueError(f"rms_norm: {name} must have unit stride in its last dim, got strides {x.stride()}")
    try:
        return x.view(-1, C)
    except RuntimeError:
        raise ValueError(f"rms_norm: {name} of shape {tuple(x.shape)} and strides {x.stride()} cannot be viewed "
                         f"as (rows, {C}); pass a contiguous tensor") from None


def _blocks(C: int, chunking: str = "tail") -> tuple[int, int]:
    """(BLOCK_C, TAIL_C): "pow2" rounds C up to one power-of-two block; "tail" splits a non-power-of-two C
    into the largest power of two below it plus a power-of-two tail (4100 = 4096 + 4 in 4096 + 4 lanes, not
    8192), unless that takes as many lanes as rounding up (100 = 64 + 64 lanes: one 128 block)."""
    up = triton.next_power_of_2(C)
    if chunking == "pow2" or up == C:
        return up, 0
    if chunking != "tail":
        raise ValueError(f"rms_norm: chunking must be 'pow2' or 'tail', got {chunking!r}")
    main = up // 2
    tail = triton.next_power_of_2(C - main)
    return (up, 0) if main + tail >= up else (main, tail)


def _rows_per_tile(elements: int, width: int) -> int:
    """Rows of ``width`` in a tile of about ``elements`` (a small tail may take it 1/16 over): a power of two
    from 1 to 16."""
    n = min(16, max(1, (elements + elements // 16) // width))
    return 1 << (n.bit_length() - 1)


def _warps(elements: int, per_warp: int, most: int) -> int:
    return min(most, max(4, triton.next_power_of_2(max(1, elements // per_warp))))


def _align(*strides: int) -> int:
    """The largest power of two (at most 16) dividing every row stride, in elements."""
    a = 16
    for s in strides:
        while a > 1 and s % a:
            a //= 2
    return a


# Defaults from first principles, per pass (H100/H200: 132 SMs, 64K 32-bit registers and 2048 threads per SM;
# register counts from ptxas for sm_90, tests/test_rms_norm.py checks them):
#   forward: one program per tile of rows; tiles of up to 16K elements (several short rows per program) at
#     ~32 elements per thread: C = 4096 takes 4 rows, 16 warps, ~61 registers, two programs and 64 KB of loads
#     in flight per SM. A tail costs registers (4 rows of 4096 + 4: ~76, one program per SM), so a row with a
#     tail gets half the tile (2 rows of 4100: ~40 registers);
#   backward: x, dy, x^ and g are all live until the row's dot is reduced; with dw ~8 elements per thread (C =
#     4096: 1 row, 16 warps, ~63 registers with w and the dw partial in fp32), otherwise ~16 (8 warps: fewer,
#     wider programs measured faster, see _bwd_config). With dw: persistent programs, as many
#     per SM as the registers allow (2 of 16 warps), each looping over rows with the loop software-pipelined
#     (up to 3 stages, as shared memory allows: the next rows' x and dy load into shared memory while this one
#     reduces; no loop-carried latency between rows). Without dw: one program per row block, like the forward.
# `config` (a dict with any of FWD_KEYS / BWD_KEYS) overrides them, for bench.rms_norm --sweep; per_sm=0 means
# one program per row block (accepted only without dw).
FWD_KEYS = ("block_m", "num_warps", "chunking", "evict")
BWD_KEYS = ("block_m", "num_warps", "chunking", "evict", "per_sm", "stages")


def _check_keys(cfg: dict, keys: tuple, what: str) -> None:
    unknown = set(cfg) - set(keys)
    if unknown:
        raise ValueError(f"rms_norm: unknown {what} config keys {sorted(unknown)}; expected some of {keys}")


def _fwd_config(C: int, config: dict | None = None) -> dict:
    cfg = dict(config or {})
    _check_keys(cfg, FWD_KEYS, "forward")
    block_c, tail_c = _blocks(C, cfg.get("chunking", "tail"))
    block_m = cfg.get("block_m") or _rows_per_tile(8192 if tail_c else 16384, block_c + tail_c)
    num_warps = cfg.get("num_warps") or _warps((block_c + tail_c) * block_m, 1024, 16)
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "TAIL_C": tail_c, "EVICT": cfg.get("evict", ""),
            "num_warps": num_warps}


# Shared memory of one H100/H200 SM (228 KB; at most 227 KB for one program). The persistent dw loop's
# software pipeline stages each row's x and dy through shared memory: (stages - 1) buffers of
# 2 * BLOCK_M * (BLOCK_C + TAIL_C) elements (compiled for sm_90: 16.4 KB per extra stage at C = 4096 bf16,
# 262 KB at C = 65536 bf16, where 2 stages cannot launch at all)
SMEM_PER_SM = 227 * 1024
MAX_STAGES = 3


def _stages(block_m: int, width: int, elem: int, per_sm: int) -> int:
    """Pipeline stages for the persistent dw loop: up to MAX_STAGES, as many as fit ``per_sm`` programs' stage
    buffers in one SM's shared memory (1: no pipelining, for rows too wide to buffer)."""
    stage = 2 * block_m * width * elem
    return 1 + min(MAX_STAGES - 1, SMEM_PER_SM // max(1, per_sm) // stage)


def _bwd_config(C: int, config: dict | None = None, need_dw: bool = True, elem: int = 2) -> dict:
    cfg = dict(config or {})
    _check_keys(cfg, BWD_KEYS, "backward")
    block_c, tail_c = _blocks(C, cfg.get("chunking", "tail"))
    block_m = cfg.get("block_m") or _rows_per_tile(2048, block_c + tail_c)
    # ~8 elements per thread with dw and no tail (16 warps for 4096, two programs per SM); ~16 per thread
    # without dw, or with a tail (8 warps): H100 sweep (bench/results/2026-11-27-h100-80gb-hbm3-rms_norm-sweep.md)
    # without dw 138.4 us (8 warps) vs 153.1 (16) at 4096 and 142.4 vs 274.6 (32) at 4100; with dw at 4100,
    # 8 warps x 4 programs per SM 179.7 us vs 288.5 (32 warps x 1)
    per_warp = 256 if need_dw and not tail_c else 512
    num_warps = cfg.get("num_warps") or _warps((block_c + tail_c) * block_m, per_warp, 32)
    per_sm = cfg.get("per_sm")
    if per_sm is None:
        per_sm = max(1, 32 // num_warps) if need_dw else 0
    if per_sm <= 0 and need_dw:
        raise ValueError("rms_norm: per_sm=0 (one program per row block) would write one dw partial per block; "
                         "the dw backward needs persistent programs (per_sm >= 1)")
    # H100 sweep (bench/results/2026-11-27-h100-80gb-hbm3-rms_norm-sweep.md), x (16384, 4096) bf16 with dw:
    # 3 stages 150.6 us, 2 stages 161.4, 1 stage 155.9; at C = 4100, 3 stages 189.4 vs 288.5 (32 warps).
    # A fixed 3 failed test_rms_norm_gpu's (64, 16384) fp32 shape (2 x 128 KB of stage buffers), and a fixed 2
    # could not launch C = 65536 bf16 (256 KB): the stages that fit, from the element size (``elem`` bytes).
    stages = cfg.get("stages") or (_stages(block_m, block_c + tail_c, elem, per_sm) if per_sm > 0 else 1)
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "TAIL_C": tail_c, "EVICT": cfg.get("evict", ""),
            "NUM_STAGES": stages, "num_warps": num_warps, "per_sm": per_sm}


def check_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("rms_norm: x and weight must be tensors")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"rms_norm: x and weight must be float32/float16/bfloat16, got {x.dtype} and {weight.dtype}")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be ({x.shape[-1] if x.dim() else '?'},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if x.shape[-1] > MAX_C:
        raise ValueError(f"rms_norm: C={x.shape[-1]} is above the kernel's limit of {MAX_C}")


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """y and rstd (fp32, one per row); ``config`` overrides the launch configuration (see _fwd_config)."""
    check_inputs(x, weight)
    C = x.shape[-1]
    x2 = _rows(x, "x")
    N = x2.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if N == 0 or C == 0:
        return y, rstd.fill_(1.0 / eps**0.5) if C == 0 else rstd
    cfg = _fwd_config(C, config)
    _rms_norm_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_M"]),)](
        x2, weight, y, rstd, N, C, 1.0 / C, x2.stride(0), C, eps, MASK_C=cfg["BLOCK_C"] > C,
        ALIGN=_align(x2.stride(0), C), **cfg)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_dw: bool, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dx and dweight (empty when not ``need_dw``); ``config`` overrides the launch configuration."""
    C = x.shape[-1]
    x2 = _rows(x, "x")
    N = x2.shape[0]
    if dy.shape != x.shape:
        raise ValueError(f"rms_norm backward: dy must be {tuple(x.shape)}, got {tuple(dy.shape)}")
    try:
        dy2 = _rows(dy, "dy")
    except ValueError:  # incoming gradients may be expanded or transposed: one copy is the cheapest fix
        dy2 = _rows(dy.contiguous(), "dy")
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    cfg = _bwd_config(C, config, need_dw, max(x.element_size(), dy2.element_size()))
    per_sm = cfg.pop("per_sm")
    n_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    if _interpreting() or x.device.type != "cuda":
        n_prog = max(1, min(n_blocks, 4))
    elif per_sm <= 0:  # one program per row block (no dw)
        n_prog = max(1, n_blocks)
    else:  # persistent: a fixed number of programs per SM, each holding one dw partial row
        n_prog = max(1, min(n_blocks, _sm_count(x.device.index or 0) * max(1, per_sm)))
    part = torch.empty((n_prog, C) if need_dw else (1, 1), dtype=torch.float32, device=x.device)
    if N > 0 and C > 0:
        align = _align(dy2.stride(0), x2.stride(0), C)
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2, x2, weight, rstd, dx, part, N, C, 1.0 / C, dy2.stride(0), x2.stride(0), C,
            HAS_DW=need_dw, MASK_C=cfg["BLOCK_C"] > C, ALIGN=align, **cfg)
    if not need_dw:
        return dx, weight.new_empty(0)
    if N == 0 or C == 0:
        return dx, torch.zeros_like(weight)
    dw = torch.empty_like(weight)
    # the partials summed in a fixed order and cast in one small kernel: deterministic, no atomics
    _rms_norm_dw_kernel[(triton.cdiv(C, 32),)](part, dw, n_prog, C, BLOCK_P=128, BLOCK_C=32, num_warps=4)
    return dx, dw


# ----------------------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("minitrain::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_forward(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minitrain::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, x, weight, rstd, need_dw)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, need_dw):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if need_dw else (0,))


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, dy, _drstd):
    """dx = r (g - x^ mean(g x^)) with g = dy w, x^ = x r; dw = sum_rows dy * round(x^) (module docstring)."""
    x, weight, rstd = ctx.saved_tensors
    need_dw = bool(ctx.needs_input_grad[1])
    dx, dw = torch.ops.minitrain.rms_norm_backward(dy, x, weight, rstd, need_dw)
    return dx, (dw if need_dw else None), None


torch.library.register_autograd("minitrain::rms_norm", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """Root-mean-square normalization, numerically as transformers' LlamaRMSNorm.

    Args:
        x: (..., C) float32/float16/bfloat16 activations with unit last-dim stride and evenly strided rows.
        weight: (C,) scale; its gradient is computed only when it requires grad.
        eps: added to the mean square before the rsqrt.
        backend: "auto" (Triton on CUDA, the reference on CPU; env MINITRAIN_RMS_NORM_BACKEND overrides),
            "torch" (the reference) or "triton" (on CPU only under TRITON_INTERPRET=1).
    Returns:
        (..., C) tensor of dtype promote(x.dtype, weight.dtype), like ``weight * hidden.to(input_dtype)``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"rms_norm: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r}: expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if x.device.type == "cuda" else "torch"
    check_inputs(x, weight)
    if backend == "torch":
        return rms_norm_ref(x, weight, eps)
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(f"rms_norm: backend 'triton' needs CUDA tensors, got {x.device} "
                         "(CPU tensors run the kernel only under TRITON_INTERPRET=1)")
    return torch.ops.minitrain.rms_norm(x, weight, float(eps))[0]
