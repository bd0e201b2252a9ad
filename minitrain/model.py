"""The Llama family (Llama 2/3/3.1/3.2, SmolLM, Mistral-style) in plain torch. The model only: no file I/O.

Module and parameter names are Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.down_proj``, ``model.norm``, ``lm_head``), so
checkpoint keys and PEFT adapter keys map one to one. The numerics follow transformers: RoPE angles in fp32
from the position ids, "rotate-half" layout, RMSNorm statistics in fp32, SDPA with scale 1/sqrt(D).

Packed batches: when ``position_ids`` restart (a position that is not the previous one plus one), each run
of consecutive positions is one document and attention stays inside it (a block-diagonal causal mask).
``cu_seqlens`` (cumulative document lengths of a B=1 packed row) gives the same mask directly.

Padded batches (generate's left-padded prompts): ``attention_mask`` (B, cached + new tokens), 1 on real tokens;
each row's real tokens take positions 0, 1, ... as if unpadded and padding keys are masked out, with the KV cache
too. Without it no mask is built (SDPA's causal path), as before.

The four ops (``rms_norm``, ``apply_rope``, ``attention``, ``swiglu``) are small module-level functions so
fused kernels can be put behind one switch without touching the modules.

Kernels switch: ``model.use_kernels`` (``LlamaForCausalLM`` or ``LlamaModel``; default True) routes RMSNorm,
RoPE and the SwiGLU activation through ``triton_ops.rms_norm`` / ``rope`` / ``swiglu`` (torch.library custom
ops, so ``torch.compile(fullgraph=True)`` traces them) for CUDA tensors; CPU tensors, and every tensor when
the switch is off, take the plain-torch code below, so CPU numerics do not depend on the switch. The
environment variable ``MINITRAIN_KERNELS=0``, read when the model is built, makes False the default.
Setting ``model.use_kernels`` after construction wins over the environment. Attention stays SDPA; the NF4
and LoRA projections have their own modules (quant.NF4Linear, minitrain.lora.LoRALinear).
The switch sets ``kernel_backend`` on every module that has one: "auto" (kernels on CUDA tensors, plain torch
otherwise), "torch" (plain torch everywhere) or "triton" (the Triton kernels even for CPU tensors, which
works only under TRITON_INTERPRET=1: for tests). When triton_ops cannot be imported, "auto" means "torch".

Grouped LoRA projections (``GROUPED_LORA``, env ``MINITRAIN_GROUPED_LORA=0`` to turn off): when the LoRALinear
projections would run triton_ops.lora's hand-written path anyway, attention computes q, k, v with one
``lora_qkv`` call (x read once, the adapters batched, every dx term summed into one buffer) and the MLP is one
``lora_mlp`` call (saves x, gate(x), up(x) but not the SwiGLU output; SwiGLU recomputed in place in backward).
Only where that is the same computation as the modules one by one (see :func:`_grouped_projections`);
else, and always with ``kernel_backend == "torch"``, each module is called as before.

Shape letters: B batch, T sequence, H query heads, KV key/value heads, D head dim, C model dim, F MLP dim,
V vocab.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
KERNEL_BACKENDS = ("auto", "torch", "triton")
KERNELS_ENV_VAR = "MINITRAIN_KERNELS"

try:  # the fused kernels (issues 2-4); without them every op runs its plain-torch code below
    from triton_ops.rms_norm import rms_norm as _k_rms_norm
    from triton_ops.rope import rope as _k_rope
    from triton_ops.swiglu import swiglu as _k_swiglu
except ImportError:  # pragma: no cover - triton or the package missing
    _k_rms_norm = _k_rope = _k_swiglu = None

from . import lora as _mlora

_LORA_FORWARD = _mlora.LoRALinear.forward  # as imported: a class-level patch is not the computation grouped here

try:  # the grouped LoRA Functions (one call for q/k/v, one for gate/up/down); without them, module by module
    import triton_ops.lora as _tlora
except ImportError:  # pragma: no cover - triton or the package missing
    _tlora = None
try:
    from quant.linear import NF4Linear as _NF4Linear
except ImportError:  # pragma: no cover
    _NF4Linear = None



def env_switch(name: str, default: bool = True) -> bool:
    """An on/off switch read from the environment: ``default`` when ``name`` is unset or empty, False when it
    is 0 (or false/off/no), else True."""
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "off", "no")


def grouped_lora_default() -> bool:
    """False when MINITRAIN_GROUPED_LORA is 0 (or false/off/no), else True."""
    return env_switch("MINITRAIN_GROUPED_LORA")


# GQA handed to SDPA (enable_gqa) on CUDA instead of repeating k and v (see attention). Off with
# MINITRAIN_SDPA_GQA=0 (read at import) or by setting this to False (read at every call).
SDPA_GQA = env_switch("MINITRAIN_SDPA_GQA")

# Attention's q/k/v and the MLP's gate/up/down through one grouped LoRA call each (see _grouped_projections).
# Off with MINITRAIN_GROUPED_LORA=0 (read at import) or by setting this to False (read at every forward).
GROUPED_LORA = grouped_lora_default()


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    """Hyper-parameters, named as in a Hugging Face config.json."""

    vocab_size: int
    hidden_size: int  # C
    intermediate_size: int  # F
    num_hidden_layers: int
    num_attention_heads: int  # H
    num_key_value_heads: int | None = None  # KV (None: = H)
    head_dim: int | None = None  # D (None: C // H)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-style local attention (None: full causal)
    extra: dict = field(default_factory=dict, repr=False)  # keys of config.json not used by the model

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}; give head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config: '{name}' must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ValueError(f"config: 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"config: 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        _check_rope_scaling(self.rope_scaling)

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        """Build from a config.json dict, in transformers 4.x form (``rope_theta``, ``rope_scaling``) or 5.x
        form (``rope_parameters``). Raises ValueError naming the key that is missing, wrong or contradictory."""
        if not isinstance(cfg, dict):
            raise TypeError(f"config: expected a dict, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config: unsupported architecture: model_type {model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        archs = cfg.get("architectures") or []
        bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
        if bad:
            raise ValueError(f"config: unsupported architecture {bad} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config: 'hidden_act' must be 'silu' for a Llama MLP, got {act!r}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if cfg.get(k) is None]
        if missing:
            raise ValueError(f"config: missing required key(s) {missing}")
        theta, scaling = _rope_from_config(cfg)
        known = {f.name for f in fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        kw = {k: cfg[k] for k in known if cfg.get(k) is not None}
        if cfg.get("use_sliding_window") is False:  # Qwen-style flag; Mistral gives sliding_window alone
            kw.pop("sliding_window", None)
        extra = {k: v for k, v in cfg.items() if k not in known}
        return cls(**kw, rope_theta=theta, rope_scaling=scaling, extra=extra)


def _check_rope_scaling(rs: dict | None) -> None:
    if rs is None:
        return
    rt = rs.get("rope_type")
    if rt not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config: unsupported rope type {rt!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    need = {"default": (), "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[rt]
    missing = [k for k in need if rs.get(k) is None]
    if missing:
        raise ValueError(f"config: rope scaling of type {rt!r} is missing key(s) {missing}")
    if rt == "llama3" and rs["high_freq_factor"] <= rs["low_freq_factor"]:
        raise ValueError("config: rope scaling llama3 needs high_freq_factor > low_freq_factor")


def _rope_from_config(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope scaling dict with 'rope_type', or None) from either config form."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    theta = cfg.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise ValueError(f"config: 'rope_parameters' must be a dict, got {type(params).__name__}")
        if "full_attention" in params or "sliding_attention" in params:
            raise ValueError("config: per-layer-type 'rope_parameters' are not supported for Llama")
        p_theta = params.get("rope_theta")
        if theta is not None and p_theta is not None and float(theta) != float(p_theta):
            raise ValueError(f"config: contradictory rope_theta: {theta} at top level but {p_theta} in rope_parameters")
        theta = p_theta if p_theta is not None else theta
        if scaling is not None and _norm_scaling(scaling) != _norm_scaling(params):
            raise ValueError(f"config: contradictory 'rope_scaling' {scaling} and 'rope_parameters' {params}")
        scaling = params
    if theta is None:
        theta = 10000.0  # transformers' LlamaConfig default
    scaling = _norm_scaling(scaling)
    return float(theta), scaling


def _norm_scaling(rs: dict | None) -> dict | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"config: rope scaling must be a dict, got {rs!r}")
    rs = {k: v for k, v in rs.items() if k != "rope_theta"}
    t, rt = rs.pop("type", None), rs.get("rope_type")
    if t is not None and rt is not None and t != rt:
        raise ValueError(f"config: contradictory rope scaling 'type' {t!r} and 'rope_type' {rt!r}")
    rs["rope_type"] = rt or t or "default"
    return None if rs["rope_type"] == "default" and len(rs) == 1 else rs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(D/2,) fp32 inverse frequencies, with linear or Llama-3 scaling, computed on the CPU as transformers does."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    rs = args.rope_scaling or {"rope_type": "default"}
    if rs["rope_type"] == "linear":
        inv = inv / rs["factor"]
    elif rs["rope_type"] == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: divide by factor
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled  # in between: interpolate
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


# ---------------------------------------------------------------------------------------------------------
# The ops (plain torch, or the triton_ops kernels behind ``backend``)
# ---------------------------------------------------------------------------------------------------------
def default_kernel_backend() -> str:
    """"torch" when MINITRAIN_KERNELS=0 (or false/off/no), else "auto"."""
    v = os.environ.get(KERNELS_ENV_VAR, "1").strip().lower()
    if v in ("0", "false", "off", "no"):
        return "torch"
    if v in ("", "1", "true", "on", "yes"):
        return "auto"
    raise ValueError(f"{KERNELS_ENV_VAR}={v!r}: expected 0 or 1")


def _kernel_backend(backend: str, x: torch.Tensor, op) -> str | None:
    """The backend to pass to a triton_ops op, or None for the plain-torch code."""
    if backend == "torch" or op is None:
        return None
    if backend == "auto":
        return "auto" if x.is_cuda else None
    if backend == "triton":
        return "triton"
    raise ValueError(f"kernel backend must be one of {KERNEL_BACKENDS}, got {backend!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "torch") -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)); statistics in fp32, cast back before the weight (as HF)."""
    kb = _kernel_backend(backend, x, _k_rms_norm)
    if kb is not None:
        return _k_rms_norm(x, weight, eps, backend=kb)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, T, D) from position ids (B, T): angles in fp32, cast once."""
    freqs = position_ids.float()[:, :, None] * inv_freq.float()[None, None, :]  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str = "torch"):
    """Rotate q (B, H, T, D) and k (B, KV, T, D) by the angles in cos/sin (B, T, D)."""
    kb = _kernel_backend(backend, q, _k_rope)
    if kb is not None and q.dtype == k.dtype:  # (q and k of two dtypes take the plain-torch code)
        # the kernel takes (B, T, heads, D) with any strides: transposed views in and out, no copies
        q_rot, k_rot = _k_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backend=kb)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class SavedAttention:
    """The causal attention's output and softmax log-sum-exp of one forward, kept by a checkpoint's forward so
    that its recomputation can skip the attention kernel (see :func:`attention_outputs`): ``out`` (B, H, T, D)
    and ``lse`` (B, H, T, 1) fp32 as the forward computed them, the kernel's RNG state tensors (unused without
    dropout, passed back unchanged), and optionally its inputs ``q`` (B, H, T, D) and ``k``, ``v`` (B, KV, T, D)
    (rotated, as the kernel saw them): given those too, the recomputation need not compute q, k and v at all."""

    __slots__ = ("out", "lse", "rng", "q", "k", "v")

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, rng: tuple = (), q=None, k=None, v=None):
        self.out, self.lse, self.rng, self.q, self.k, self.v = out, lse, rng, q, k, v

    def tensors(self) -> list[torch.Tensor]:
        return [self.out, self.lse] + ([self.q, self.k, self.v] if self.q is not None else [])


_attn = threading.local()
# The CPU path of _SavedAttentionFn (fp32 math instead of SDPA) is for tests of the checkpoint logic only: off by
# default, so CPU training computes attention as without attention_outputs.
SAVED_ATTENTION_ON_CPU = False


@contextlib.contextmanager
def attention_outputs(keep=None, saved: SavedAttention | None = None, active: bool = True):
    """Within the block (when ``active``), a causal attention without mask (the training forward of a
    checkpointed layer) runs through :class:`_SavedAttentionFn`: with ``keep`` (a callable), it passes a
    :class:`SavedAttention` of its output to ``keep``; with ``saved``, it returns ``saved.out`` instead of
    computing it (a recomputation: the tensors the backward needs are q, k, v, which the recomputation makes
    anyway, and out and lse, given); with neither, it computes as usual. A checkpoint's recomputation must take
    the same path as its forward (the Function's node saves its own tensors): ``active`` when ``keep`` was
    called in the forward. The backward is the same either way (cuDNN's SDPA backward on CUDA, the math one on
    CPU), so gradients are bit-identical with and without ``saved``. One attention call per block; restored on
    every exit."""
    prev = getattr(_attn, "state", None)
    _attn.state = (keep, saved) if active else None
    try:
        yield
    finally:
        _attn.state = prev


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)


def _reduce_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    B, H, S, D = t.shape
    return t if n_rep == 1 else t.view(B, H // n_rep, n_rep, S, D).sum(2)


def _causal_scores(q: torch.Tensor, kf: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 q·kᵀ·scale (kf: k repeated to q's heads, fp32), -inf above the causal diagonal."""
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    T, S = s.shape[-2:]
    return s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1), float("-inf"))


def _attention_math(q, k, v, scale):
    """Causal softmax attention in fp32 (the CPU path of _SavedAttentionFn): out (input dtype) and lse."""
    n_rep = q.shape[1] // k.shape[1]
    s = _causal_scores(q, _repeat_kv(k, n_rep).float(), scale)
    lse = torch.logsumexp(s, -1, keepdim=True)
    out = (torch.exp(s - lse) @ _repeat_kv(v, n_rep).float()).to(q.dtype)
    return out, lse


class _SavedAttentionFn(torch.autograd.Function):
    """Causal GQA attention whose forward can be skipped by giving its output (see :func:`attention_outputs`).
    CUDA: cuDNN's SDPA forward and backward ops (the kernels ``F.scaled_dot_product_attention`` picks for this
    call on an H100/H200, the same output and gradient bits); CPU: fp32 math (tests)."""

    @staticmethod
    def forward(ctx, q, k, v, scale, keep, saved):
        if saved is not None:
            out, lse, rng = saved.out, saved.lse, saved.rng
            if saved.q is not None:  # the forward's own q, k, v: this call's may be uninitialized (not computed)
                q, k, v = saved.q, saved.k, saved.v
        elif q.is_cuda:
            r = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                  scale=scale)
            out, lse, rng = r[0], r[1], (r[6], r[7])
        else:
            out, lse = _attention_math(q, k, v, scale)
            rng = ()
        if keep is not None and saved is None:
            keep(SavedAttention(out, lse, rng, q, k, v))
        ctx.scale, ctx.rng = scale, rng
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        if q.is_cuda:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                dout, q, k, v, out, lse, ctx.rng[0], ctx.rng[1], None, None, None, q.shape[2], k.shape[2], 0.0,
                True, scale=scale)
            return dq, dk, dv, None, None, None
        n_rep = q.shape[1] // k.shape[1]
        kf, vf, do = _repeat_kv(k, n_rep).float(), _repeat_kv(v, n_rep).float(), dout.float()
        p = torch.exp(_causal_scores(q, kf, scale) - lse)
        dv = _reduce_kv(p.transpose(-1, -2) @ do, n_rep)
        dp = do @ vf.transpose(-1, -2)
        ds = p * (dp - (do * out.float()).sum(-1, keepdim=True)) * scale
        dq = ds @ kf
        dk = _reduce_kv(ds.transpose(-1, -2) @ q.float(), n_rep)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _saved_attention_call(q, k, v, mask):
    """The attention through _SavedAttentionFn when an ``attention_outputs`` block asks for it and the call is
    the causal training case it covers; else None (the caller runs SDPA as usual)."""
    state = getattr(_attn, "state", None)
    if state is None or mask is not None or not torch.is_grad_enabled():
        return None
    if q.shape[2] != k.shape[2] or q.shape[2] < 2 or q.shape[1] % k.shape[1] or torch.compiler.is_compiling():
        return None
    if (q.dtype not in (torch.bfloat16, torch.float16) if q.is_cuda else not SAVED_ATTENTION_ON_CPU):
        return None
    keep, saved = state
    if saved is not None and (saved.out.shape != q.shape or saved.out.dtype != q.dtype):
        raise RuntimeError(f"attention_outputs: the saved output is {tuple(saved.out.shape)} {saved.out.dtype}, "
                           f"this call's {tuple(q.shape)} {q.dtype}; the recomputation differs from the forward")
    _attn.state = None  # one call per block
    if saved is None and q.is_cuda:
        try:
            return _SavedAttentionFn.apply(q, k, v, q.shape[-1] ** -0.5, keep, None)
        except RuntimeError:  # no cuDNN kernel for these inputs here: plain SDPA, nothing kept
            return None
    return _SavedAttentionFn.apply(q, k, v, q.shape[-1] ** -0.5, keep, saved)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA over q (B, H, T, D), k/v (B, KV, S, D); mask None = causal (S == T), else bool (B, 1, T, S)."""
    out = _saved_attention_call(q, k, v, mask)
    if out is not None:
        return out
    n_rep = q.shape[1] // k.shape[1]
    causal = mask is None and q.shape[2] > 1
    if n_rep > 1 and SDPA_GQA and q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 0):
        # GQA inside SDPA: no (B, H, S, D) copies of k and v, no reduction of their gradients. Measured on an H100
        # (B=2 T=2048 H=32 KV=8 D=128 bf16, forward + backward, the same output bits as repeating k and v):
        # causal 746 us vs 1,061 us with repeat_interleave; packed documents (a mask, 6-7 per row) 1,905 vs
        # 2,048 us. Without a mask flash or cuDNN take GQA (sm80+); with a mask only cuDNN does (the
        # memory-efficient kernel does not, the math fallback would build the T x S matrix), so a masked call
        # is restricted to cuDNN and falls back to the repeat below where cuDNN cannot run it.
        scale = q.shape[-1] ** -0.5
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        if q.shape[2] == k.shape[2] > 1 and not torch.compiler.is_compiling():  # training / prefill, not decoding
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
            except RuntimeError:  # no cuDNN kernel for these inputs here: the repeat below
                pass
    if n_rep > 1:  # GQA: share each KV head among n_rep query heads
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=q.shape[-1] ** -0.5)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """silu(gate) * up, (..., F)."""
    kb = _kernel_backend(backend, gate, _k_swiglu)
    if kb is not None and gate.dtype == up.dtype:
        return _k_swiglu(gate, up, backend=kb)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------------
# Grouped LoRA projections
# ---------------------------------------------------------------------------------------------------------
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _lora_backend(x: torch.Tensor) -> str | None:
    """The backend that LoRALinear's fused path uses for ``x``, when it is triton_ops.lora's hand-written
    path ("triton"); None otherwise (no fused path, the reference on CPU, or an unknown function patched in).

    LoRALinear calls ``minitrain.lora._fused_lora_linear``: ``triton_ops.lora.lora_linear`` itself ("auto":
    hand-written on CUDA tensors) or, as the tests set it, ``functools.partial(lora_linear, backend=...)``."""
    if _tlora is None:
        return None
    f = _mlora._fused_lora_linear
    if f is _tlora.lora_linear:
        backend = "auto"
    elif (isinstance(f, functools.partial) and f.func is _tlora.lora_linear and not f.args
          and set(f.keywords) == {"backend"}):
        backend = f.keywords["backend"]
    else:
        return None
    return "triton" if backend == "triton" or (backend == "auto" and x.is_cuda) else None


def has_hooks(m: nn.Module) -> bool:
    """A hook of any kind (forward, forward pre, backward, backward pre) on module ``m``."""
    return any(getattr(m, h, None) for h in _HOOK_DICTS)


def has_global_hooks() -> bool:
    """A global module hook of any kind (``torch.nn.modules.module.register_module_*_hook``)."""
    mm = nn.modules.module
    return any(getattr(mm, "_global" + h, None) for h in _HOOK_DICTS)


def _unhooked(m: nn.Module) -> bool:
    """No hook of any kind on ``m`` and its forward not replaced on the instance."""
    return not has_hooks(m) and "forward" not in vars(m)


def _lora_member(m: nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """How projection ``m`` takes part in a grouped call on input ``x`` computed in ``dtype``:
    a ``LoRAWeights`` (it joins the grouped Function), "solo" (a frozen projection without adapter, called as
    its own module: it draws no random numbers, so calling it after the group changes nothing), or None (the
    group is not provably the same computation: the caller falls back to the modules one by one)."""
    if not _unhooked(m):
        return None
    t = type(m)
    if t is _mlora.LoRALinear:
        if t.forward is not _LORA_FORWARD:
            return None  # the class's forward was patched
        base = m.base_layer
        # exactly what LoRALinear.forward passes to lora_linear; dropout only in training (as _spec applies it)
        return _tlora.LoRAWeights(base.weight, m.lora_A, m.lora_B, m.scale, base.bias,
                                  m.dropout if m.training else 0.0)
    if t is nn.Linear:
        w, b = m.weight, m.bias
        frozen = not w.requires_grad and (b is None or not b.requires_grad)
        # F.linear computes in the autocast dtype, else needs x, W and b of one dtype: what _proj_forward does
        same = w.device == x.device and (torch.is_autocast_enabled(x.device.type)
                                         or (w.dtype == dtype and (b is None or b.dtype == dtype)))
        if frozen and same and w.dtype in (torch.float16, torch.bfloat16, torch.float32):
            return _tlora.LoRAWeights(w, bias=b)
        return "solo"
    if _NF4Linear is not None and t is _NF4Linear and (m.bias is None or not m.bias.requires_grad):
        return "solo"  # matmul_nf4 may take another kernel than dequantize + GEMM: stays its own call
    return None


def _grouped_projections(x: torch.Tensor, mods, kernel_backend: str, allow_solo: bool):
    """(backend, members) for computing ``mods`` (projections of one input x) in one grouped LoRA call, or None.

    Grouped only when it is the same computation as calling the modules one by one: ``GROUPED_LORA`` on,
    the module's ``kernel_backend`` not "torch" (the reference path stays module by module), LoRALinear would
    take triton_ops.lora's hand-written path for ``x`` (``_lora_backend``), at least one projection is a
    LoRALinear and each is an unsubclassed, unpatched LoRALinear or a frozen plain projection (see
    ``_lora_member``), with no module hook on any of them and no global one. Dropout masks are drawn in the
    modules' order by the grouped call itself; the compute dtype is x's or autocast's, as LoRALinear's."""
    if not GROUPED_LORA or kernel_backend == "torch" or has_global_hooks():
        return None
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    backend = _lora_backend(x)
    if backend is None:
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    members = [_lora_member(m, x, dtype) for m in mods]
    if any(w is None or (isinstance(w, str) and not allow_solo) for w in members):
        return None
    if not any(isinstance(w, _tlora.LoRAWeights) and w.A is not None for w in members):
        return None  # no adapter here: the modules as they are
    return backend, members


# ---------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------
def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document index per token: a new document starts wherever a position is not previous + 1."""
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return start.long().cumsum(dim=1)


def cu_seqlens_to_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(1, total) positions restarting at each boundary of cu_seqlens ([0, l0, l0+l1, ..., total])."""
    cu = cu_seqlens.long()
    if cu.dim() != 1 or cu[0].item() != 0 or cu[-1].item() != total or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be increasing from 0 to T={total}, got {cu.tolist()}")
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)  # (total,)
    return (torch.arange(total, device=cu.device) - starts)[None]


def build_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, q_doc: torch.Tensor | None, k_doc: torch.Tensor | None,
               sliding_window: int | None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """bool (B, 1, T, S): key j visible to query i if k_pos <= q_pos, same document, inside the window.

    ``keep`` (B, S) bool, True on real tokens: padding keys are visible to no query. With the positions of
    :func:`padding_positions` no query row is empty (a padding query, at position 0, sees its row's first real
    token, at 0): an empty row would give NaN in some SDPA kernels, which would reach the real rows through the
    padding's keys and values in the next layer (0 * NaN). The padding queries' own outputs are never read."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]  # (B, T, S)
    if q_doc is not None:
        m = m & (k_doc[:, None, :] == q_doc[:, :, None])
    if sliding_window is not None:
        m = m & (q_pos[:, :, None] - k_pos[:, None, :] < sliding_window)
    if keep is not None:
        m = m & keep[:, None, :]
    return m[:, None]


def padding_positions(keep: torch.Tensor) -> torch.Tensor:
    """(B, S) position ids from an attention mask (B, S) bool: each row's real tokens at 0, 1, 2, ... in order
    (as if unpadded), the padding at 0 (its positions are never seen by a real token)."""
    return (keep.long().cumsum(dim=1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------
class KernelSwitch:
    """``use_kernels`` / ``kernel_backend`` for a module tree: reading gives the value shared by the submodules
    that have a ``kernel_backend`` ("mixed" when they differ), setting writes all of them."""

    @property
    def kernel_backend(self) -> str:
        values = {m.kernel_backend for m in self.modules() if isinstance(m, (LlamaRMSNorm, LlamaAttention, LlamaMLP))}
        return values.pop() if len(values) == 1 else "mixed"

    @kernel_backend.setter
    def kernel_backend(self, backend: str) -> None:
        if backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
        for m in self.modules():
            if isinstance(m, (LlamaRMSNorm, LlamaAttention, LlamaMLP)):
                m.kernel_backend = backend

    @property
    def use_kernels(self) -> bool:
        return self.kernel_backend != "torch"

    @use_kernels.setter
    def use_kernels(self, on: bool) -> None:
        self.kernel_backend = "auto" if on else "torch"


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel_backend = default_kernel_backend()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernel_backend)


class KVCache:
    """Per-layer key/value buffers (B, KV, S_max, D) filled as decoding goes; ``length`` = tokens cached."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (batch, args.num_key_value_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v (B, KV, T, D) after the cached ones; return all cached (B, KV, length + T, D)."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KVCache: {self.length} + {t} tokens exceed its capacity {self.max_len}")
        self.k[layer][:, :, self.length:self.length + t] = k
        self.v[layer][:, :, self.length:self.length + t] = v
        return self.k[layer][:, :, :self.length + t], self.v[layer][:, :, :self.length + t]


class LlamaAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        c, b = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=b)
        self.kernel_backend = default_kernel_backend()

    def qkv(self, x):
        """q_proj(x), k_proj(x), v_proj(x): the projections that can be grouped in one ``lora_qkv`` call
        (see :func:`_grouped_projections`), any frozen one without adapter by its own module after it."""
        mods = (self.q_proj, self.k_proj, self.v_proj)
        group = _grouped_projections(x, mods, self.kernel_backend, allow_solo=True)
        if group is None:
            return tuple(m(x) for m in mods)
        backend, members = group
        ys = iter(_tlora.lora_qkv(x, *[w for w in members if not isinstance(w, str)], training=True,
                                  backend=backend))
        return tuple(m(x) if isinstance(w, str) else next(ys) for m, w in zip(mods, members))

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        q, k = apply_rope(q, k, cos, sin, self.kernel_backend)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, D)
        y = attention(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


# A checkpointed MLP runs in tiles only above this many tiles' worth of tokens (16,384 at the default tile): on an
# H200, 2 x 8192 tokens of the 8B QLoRA step ran at 10,915 tok/s in tiles of 4096 and 11,143 untiled (two calls),
# while at 65,536 tokens (batch 1) tiles lowered the peak from 17.1 to 13.8 GiB reserved (two calls).
MLP_TILE_FROM = 4


def env_count(name: str, default: int, what: str) -> int:
    """A whole number >= 0 from the environment variable ``name`` (``default`` when unset); a clear error naming
    the variable otherwise (``what``: the unit, for the message)."""
    env = os.environ.get(name, "").strip()
    try:
        n = int(env) if env else default
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{name}={env!r}: expected a whole number of {what} >= 0")
    return n


def mlp_tile_default() -> int:
    """Tokens per tile of a checkpointed MLP (``MINITRAIN_MLP_TILE``, default 4096; 0 turns tiling off)."""
    return env_count("MINITRAIN_MLP_TILE", 4096, "tokens (0: no tiling)")


class _TiledMLP(torch.autograd.Function):
    """``mlp(x)`` over the tokens in tiles: the forward runs tile by tile without a graph and keeps only x; the
    backward recomputes one tile at a time with a graph and takes its gradients (x's and the MLP's trainable
    parameters', summed over tiles), so the (tokens x intermediate) activations and their gradients exist for
    one tile at a time. What a long sequence saves: at F=14336 about 200 KB per token of MLP working set.

    Inside a checkpoint recomputation that discards the MLP's output (``output_unused(down's base)``, which
    the trainer's checkpointing sets) the forward computes nothing, as the untiled MLP would skip its output;
    and the backward's tile recomputation runs under that same flag when the down projection honours it (a
    ``LoRALinear`` running its own forward, no forward hook, its base weight held by no other projection of
    the MLP): down's output is never read by the backward (gate/up and the adapters' saved tensors are), so
    the tiled MLP costs the same GEMMs as the untiled checkpointed one. The forward's tiles share one dequantize
    of each NF4 base, and so do the backward's (``triton_ops.lora.weight_cache``; the dense copies, 3 x F x C
    elements, live for that loop): fewer than the untiled checkpointed MLP's, which dequantizes gate and up
    again for the recomputation.

    Not tiled (the plain MLP runs): no grad mode, at most MLP_TILE_FROM tiles' worth of tokens, LoRA dropout
    active (the tiles' recomputation would draw other masks), FSDP-sharded parameters, or under torch.compile."""

    @staticmethod
    def forward(ctx, x, mlp, tile, skip, *params):
        dev = x.device.type
        skip_base = skip[0]  # in a list: a tensor argument would count as an input of the Function
        ctx.mlp, ctx.tile, ctx.skip_base, ctx.params = mlp, tile, skip_base, params
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x)
        C = x.shape[-1]
        out_shape = x.shape[:-1] + (mlp.down_proj.out_features,)
        if skip_base is not None and _tlora._output_unused(skip_base):  # a recomputation: the output is unused
            return x.new_empty(out_shape, dtype=ctx.autocast[2] if ctx.autocast[1] else x.dtype)
        x2 = x.reshape(-1, C)
        out = None
        with _tlora.weight_cache():  # each NF4 base dequantized once for all tiles
            for s in range(0, x2.shape[0], tile):
                y = mlp.untiled(x2[s:s + tile])
                if out is None:
                    out = y.new_empty((x2.shape[0], y.shape[-1]))
                out[s:s + tile] = y
                del y
        return out.view(out_shape)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        mlp, tile, skip_base = ctx.mlp, ctx.tile, ctx.skip_base
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:]) if need]
        need_x = ctx.needs_input_grad[0]
        C = x.shape[-1]
        x2, dy2 = x.reshape(-1, C), dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        sums = [None] * len(params)
        dev, on, dtype = ctx.autocast
        # (a fresh context per tile: output_unused is a one-shot generator context)
        skip = (lambda: _tlora.output_unused(skip_base)) if skip_base is not None else contextlib.nullcontext
        with _tlora.weight_cache():  # one dequantize per base for the tiles' recomputation and backward
            for s in range(0, x2.shape[0], tile):
                xt = x2[s:s + tile].detach().requires_grad_(need_x)
                with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=on), skip():
                    y = mlp.untiled(xt)
                grads = torch.autograd.grad(y, ([xt] if need_x else []) + params, dy2[s:s + tile], allow_unused=True)
                del y
                if need_x:
                    dx[s:s + tile] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        sums[i] = g if sums[i] is None else sums[i].add_(g)
        it = iter(sums)
        pgrads = [next(it) if need else None for need in ctx.needs_input_grad[4:]]
        return (None if dx is None else dx.view(x.shape), None, None, None, *pgrads)


class LlamaMLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        c, f, b = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=b)
        self.up_proj = nn.Linear(c, f, bias=b)
        self.down_proj = nn.Linear(f, c, bias=b)
        self.kernel_backend = default_kernel_backend()
        # tokens per tile when training (see _TiledMLP); 0: never tiled. The trainer's gradient checkpointing
        # sets it (mlp_tile_default()); tiles are used above MLP_TILE_FROM tiles' worth of tokens.
        self.tile_tokens = 0
        # True: never tiled. The trainer sets it for FSDP2-sharded layers, whose forward sees plain unsharded
        # parameters (FSDP2 swaps them in), so _tiling cannot tell from the parameters.
        self.tile_sharded = False

    def _tiling(self, x):
        """(tile, the down base whose output a recomputation may skip or None, the trainable parameters), or
        None: not tiled."""
        tile = self.tile_tokens
        if not tile or not torch.is_grad_enabled() or _tlora is None or torch.compiler.is_compiling():
            return None
        n = x.numel() // max(x.shape[-1], 1)
        if n <= MLP_TILE_FROM * tile:
            return None
        params = [p for p in self.parameters() if p.requires_grad]
        if not (x.requires_grad or params) or self.tile_sharded:
            return None  # nothing to differentiate, or FSDP-sharded parameters: untiled
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if any(m.training and getattr(m, "dropout", 0.0) > 0 for m in projs):
            return None  # the tiles' recomputation would draw other dropout masks
        tile = -(-n // -(-n // tile))  # equal tiles: ceil(n / ceil(n / tile))
        down = self.down_proj
        skip = None
        if (isinstance(down, _mlora.LoRALinear) and type(down).forward is _LORA_FORWARD and "forward" not in vars(down)
                and not down._forward_hooks and not getattr(nn.modules.module, "_global_forward_hooks", None)
                and _mlora._fused_lora_linear is not None):
            w = down.base_layer.weight
            if not any(getattr(getattr(m, "base_layer", m), "weight", None) is w for m in projs[:2]):
                skip = w
        return tile, skip, params

    def forward(self, x):
        tiling = self._tiling(x)
        if tiling is not None:
            tile, skip, params = tiling
            return _TiledMLP.apply(x, self, tile, [skip], *params)
        return self.untiled(x)

    def grouped(self, x):
        """(backend, (gate, up, down)) when :meth:`untiled` computes ``x`` with one ``lora_mlp`` call, else None:
        the three projections can be grouped and SwiGLU runs the Triton kernel here (what lora_mlp runs). That call
        saves x, gate(x), up(x) but not the SwiGLU output, and under triton_ops.lora.output_unused(down's base)
        skips SwiGLU and the down projection."""
        if _kernel_backend(self.kernel_backend, x, _k_swiglu) is None:
            return None
        return _grouped_projections(x, (self.gate_proj, self.up_proj, self.down_proj), self.kernel_backend,
                                    allow_solo=False)

    def untiled(self, x):
        group = self.grouped(x)
        if group is not None:
            backend, (gate, up, down) = group
            return _tlora.lora_mlp(x, gate, up, down, training=True, backend=backend)
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.kernel_backend))  # (B, T, F) -> (B, T, C)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(args, layer_idx)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = LlamaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(KernelSwitch, nn.Module):
    """Embeddings, decoder layers and the final norm: input ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # _weight skips nn.Embedding's normal_ init, which on the meta device costs seconds of imports
        emb = torch.empty(args.vocab_size, args.hidden_size)
        if not emb.is_meta:
            nn.init.normal_(emb)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size, _weight=emb)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = LlamaRMSNorm(args.hidden_size, args.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, C) of input ids (B, T).

        ``attention_mask`` (B, past + T), 1 on real tokens and 0 on padding, covers the cached tokens and the
        new ones (as in transformers): padding keys are never attended to and each row's real tokens get the
        positions 0, 1, ... as if unpadded (so no ``position_ids`` or ``cu_seqlens`` with it). The padding's own
        outputs are meaningless. Without it (the default) no mask is built for plain causal attention."""
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if attention_mask is not None:
            if position_ids is not None or cu_seqlens is not None:
                raise ValueError("attention_mask: position_ids and cu_seqlens cannot be given with it (the "
                                 "positions are counted from the mask's 1s in each row)")
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask must be (B, cached + new tokens) = {(B, past + T)} of 0/1, got "
                                 f"{tuple(attention_mask.shape)}")
            keep = attention_mask.to(input_ids.device).bool()  # (B, S)
            position_ids = padding_positions(keep)[:, past:]  # (B, T)
            mask = self._mask(position_ids, past, T, keep=keep)
        else:
            if cu_seqlens is not None:
                if B != 1 or position_ids is not None or cache is not None:
                    raise ValueError("cu_seqlens needs B=1 packed input ids, no position_ids and no cache")
                position_ids = cu_seqlens_to_position_ids(cu_seqlens.to(input_ids.device), T)
            plain = position_ids is None  # positions 0..T-1 in every row: one document each, nothing to inspect
            if plain:
                position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)
            elif position_ids.shape != (B, T):
                raise ValueError(f"position_ids must be (B, T) = {(B, T)}, got {tuple(position_ids.shape)}")
            mask = self._mask(position_ids, past, T, plain)
        lookup = getattr(self.embed_tokens, "minitrain_lookup", None)  # FSDP2: vocabulary-parallel (distributed.py)
        x = lookup(input_ids) if lookup is not None else self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm(x)

    def _mask(self, position_ids: torch.Tensor, past: int, T: int, plain: bool = False,
              keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """None where plain causal attention is right (SDPA's fast path), else an explicit bool mask.

        Whether given position ids restart (packed documents) is read from their values, a host sync; while a
        CUDA graph is captured (no sync allowed) or compiled, given position ids are taken as packed.
        ``keep`` (B, past + T) bool, True on real tokens (a padded batch): always an explicit mask, built
        without a host sync, in the prefill and in every decoding step, that hides the padding keys."""
        window = self.args.sliding_window
        if keep is not None:
            return build_mask(position_ids, padding_positions(keep), None, None, window, keep)
        if plain and not past and (window is None or T <= window):
            return None
        if past:  # decoding after a prefill: keys are the cache (one document) plus the new tokens
            if T == 1 and (window is None or past < window):
                return None
            k_pos = torch.arange(past + T, device=position_ids.device)[None].expand(position_ids.shape[0], -1)
            return build_mask(position_ids, k_pos, None, None, window)
        docs = document_ids(position_ids)
        packed = (torch.compiler.is_compiling()  # first: dynamo cannot trace is_current_stream_capturing
                  or (position_ids.is_cuda and torch.cuda.is_current_stream_capturing())
                  or bool((docs[:, -1] > 1).any()))
        if not packed and (window is None or T <= window):
            return None
        docs = docs if packed else None
        return build_mask(position_ids, position_ids, docs, docs, window)


class HostEmbeddingLookup:
    """``embed_tokens.minitrain_lookup`` of :func:`offload_input_embeddings`: the batch's rows gathered from the
    pinned host weight into ``device`` (``triton_ops.host_gather``), or a plain lookup once the weight is on a
    device again (``model.to(...)`` moves it back)."""

    def __init__(self, emb: nn.Embedding, device: torch.device):
        self.emb, self.device = emb, device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.emb.weight
        if w.device.type != "cpu" or ids.device.type == "cpu":
            return self.emb(ids.to(w.device))
        if not w.is_pinned():  # a copy or cast of the model (deepcopy, .half(), a reload) lost the pinning
            return self.emb(ids.cpu()).to(ids.device)
        from triton_ops.host_gather import gather_rows

        return gather_rows(w, ids, ids.device)


def offload_input_embeddings(model: nn.Module) -> int:
    """Keep the input embedding (``model.model.embed_tokens``) in pinned host memory instead of on the device; the
    forward gathers the batch's rows over PCIe in one kernel (``triton_ops.host_gather``: 32 MB for 2 x 2048
    tokens at C = 4096 in bf16), which a CUDA graph captures. Frees V * C * element size bytes of device memory
    (0.98 GiB for Llama-3's 128256 x 4096 in bf16) for some PCIe time per forward; the outputs are the same bits.
    ``model.to(device)`` brings the weight back (the lookup then uses it there); a copy or cast of the model that
    loses the pinning gathers on the host instead.

    For a frozen, untied embedding on a CUDA device: raises for a tied lm_head (it needs the weight on the
    device), a trainable embedding, one on the CPU, one with hooks (the lookup would bypass them), and an
    embedding that already has another lookup (FSDP2's). Returns the device bytes freed (0 when already
    offloaded)."""
    body = getattr(model, "model", model)
    emb = getattr(body, "embed_tokens", None)
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"offload_input_embeddings: {type(model).__name__} has no model.embed_tokens nn.Embedding")
    lookup = getattr(emb, "minitrain_lookup", None)
    if isinstance(lookup, HostEmbeddingLookup) and emb.weight.device.type == "cpu":
        return 0
    w = emb.weight
    if lookup is not None and not isinstance(lookup, HostEmbeddingLookup):
        raise ValueError("offload_input_embeddings: embed_tokens already has a lookup (FSDP2's vocabulary-parallel "
                         "embedding); not combined")
    if has_hooks(emb) or has_global_hooks():
        raise ValueError("offload_input_embeddings: embed_tokens (or every module) has hooks, which the host "
                         "lookup would bypass")
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is w:
        raise ValueError("offload_input_embeddings: the lm_head shares (ties) this weight and needs it on the device")
    if w.requires_grad:
        raise ValueError("offload_input_embeddings: the embedding is trainable (its gradient needs the weight on "
                         "the device); freeze it first")
    if w.device.type != "cuda":
        raise ValueError(f"offload_input_embeddings: the embedding is on {w.device}, not a CUDA device")
    freed = w.numel() * w.element_size()
    host = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)  # one host copy (not a pageable one, then pinned)
    host.copy_(w.detach())
    emb.weight = nn.Parameter(host, requires_grad=False)
    emb.minitrain_lookup = HostEmbeddingLookup(emb, w.device)
    return freed


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first parameter's device, skipping an input embedding kept on the host by
    :func:`offload_input_embeddings`."""
    body = getattr(model, "model", model)
    emb = getattr(body, "embed_tokens", None)
    if (emb is not None and isinstance(getattr(emb, "minitrain_lookup", None), HostEmbeddingLookup)
            and emb.weight.device.type == "cpu"):
        for p in model.parameters():
            if p is not emb.weight:
                return p.device
    return next(model.parameters()).device


class LlamaForCausalLM(KernelSwitch, nn.Module):
    """The causal LM: ``forward(input_ids, position_ids=None, cu_seqlens=None, cache=None, attention_mask=None)``
    -> logits (B, T, V); ``attention_mask`` as in :meth:`LlamaModel.forward` (padded batches, e.g. generate's).

    ``hidden_states(...)`` (same arguments) returns the final normed hidden states (B, T, C) without the
    (B, T, V) logits, for a fused linear cross-entropy against ``lm_head.weight``.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids, position_ids=None, cu_seqlens=None, cache=None,
                      attention_mask=None) -> torch.Tensor:
        return self.model(input_ids, position_ids, cu_seqlens, cache, attention_mask)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, position_ids, cu_seqlens, cache, attention_mask))  # (B, T, V)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        emb = self.model.embed_tokens.weight
        return KVCache(self.args, batch, max_len, model_device(self), emb.dtype)

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id=None, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """See :func:`minitrain.generate.generate`."""
        from .generate import generate

        return generate(self, input_ids, max_new_tokens, temperature, top_p, eos_token_id, generator,
                        attention_mask=attention_mask)
