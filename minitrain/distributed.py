"""Several GPUs (or CPU processes) through ``torchrun``: data parallelism over the adapters, and FSDP2 for QLoRA.

Launch: ``torchrun --nproc-per-node N -m minitrain train ...``. :func:`init_distributed` reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), starts the process group (NCCL on CUDA, gloo on CPU)
and puts rank r on ``cuda:LOCAL_RANK``. The :class:`~minitrain.trainer.Trainer` sees the group and then:

* Data: the global stream of micro-batches is the single-process one. An optimizer step takes the next G*N
  micro-batches of it (G = gradient_accumulation_steps, N = world size); rank r collates positions r, r+N, ...
  of those (the others are skipped without collating). So N ranks with G micro-batches each train on exactly the
  batches that one process with G*N micro-batches per step trains on, and the data position saved in a
  checkpoint is global: resume is exact, and the same on every rank.
* Loss: the trained-token count of the step is all-reduced before backward, every rank's micro-batch loss is
  sum(token losses) / (tokens over all ranks), and the gradients are all-reduced with SUM. The update is then the
  single-process one (the loss of the step = token losses over all ranks / all trained tokens), whatever N is
  and however unevenly the tokens fall on the ranks. DDP's mean over ranks would weight a rank with few trained
  tokens as much as one with many, so it is not used.
* Why no ``DistributedDataParallel`` wrapper: only the adapters have gradients (tens of MiB even for 8B at r=16).
  One bucketed all-reduce after the accumulation loop (:func:`all_reduce_sum_`) moves them in a few ms over
  NVLink, against hundreds of ms of compute per step, needs no ``no_sync`` for accumulation, no hooks on the
  frozen base, and leaves the model object and its parameter names untouched (saving, loading, torch.compile
  and gradient checkpointing work as on one GPU).
* The adapter starts identical everywhere: :func:`broadcast_` copies rank 0's initial adapter to all ranks.
* Only rank 0 writes files (metrics.jsonl, checkpoints, the adapter, the loss curve) and prints progress;
  checkpoints also hold every rank's RNG state (gathered to rank 0) so dropout masks resume exactly.

FSDP2 (``--fsdp``, :func:`shard_model`): ``torch.distributed.fsdp.fully_shard`` on every decoder layer, on the
(untied) input embedding, on the (untied, frozen) lm_head, and on the root (final norm; a tied embedding). Frozen
embedding and lm_head are never gathered: the lookup and the loss are vocabulary-parallel (:func:`vocab_parallel_embedding`,
:func:`vocab_parallel_loss`): the ranks exchange token ids, embedded rows and hidden rows (N x C, 32 MiB for 4096
tokens at C=4096) instead of (V x C) weights (1 GiB each for Llama-3's 128256 x 4096 in bf16, which FSDP2 holds twice
plus a shard while gathering, and which its backward prefetch gathers again for the embedding, measured on H100:
+2 GiB at the start of the step and +0.9 GiB at the end of the backward). NF4 projections are first replaced by :class:`ShardableNF4Linear`, which holds the packed 4-bit bytes, the
uint8 absmax codes (both as float16 bit views) and the fp32 nested absmax as frozen ``nn.Parameter``s, so FSDP2 shards them (1/N per rank,
dim 0) and all-gathers them per layer just before the layer runs; the tiny code tables stay replicated buffers.
The adapters are sharded too; FSDP2 reduce-scatters their gradients with SUM (divide factor 1, sum-only
collectives; gloo has no PREMUL_SUM), which keeps the token-normalized loss exact as above. Mixed precision is
the trainer's autocast, as on one GPU (no FSDP param_dtype: it would cast the bit views of the NF4 bytes). The adapter is
saved as one PEFT adapter whatever N is (:func:`full_adapter` gathers it); optimizer state goes through
``torch.distributed.checkpoint.state_dict`` as full (unsharded) tensors. The byte tensors travel as float16 bit
views (see :class:`ShardableNF4Linear`): torch 2.11's fully_shard refuses uint8 parameters on CUDA.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> DistEnv | None:
    """Start the process group from torchrun's environment (a no-op returning None when not launched by it).

    Args:
        device: "cuda" or "cpu"; None picks CUDA when available. Rank r uses ``cuda:LOCAL_RANK``.
    Returns:
        the :class:`DistEnv`, or None in a plain single process.
    """
    if not launched_by_torchrun():
        return None
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                               "use --nproc-per-node <= the GPU count")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


def current() -> DistEnv | None:
    """The running group when it has more than one process, else None (the trainer's single-process path)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    backend = dist.get_backend()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Collectives on plain tensors
# ---------------------------------------------------------------------------------------------------------
BUCKET_ELEMENTS = 1 << 24  # 64 MiB of fp32 per all-reduce: few launches, bounded extra memory


def _buckets(tensors: list[torch.Tensor]):
    """Consecutive groups of same-dtype/device tensors of at most BUCKET_ELEMENTS elements (one may exceed it)."""
    group, size = [], 0
    for t in tensors:
        if group and (t.dtype != group[0].dtype or t.device != group[0].device or size + t.numel() > BUCKET_ELEMENTS):
            yield group
            group, size = [], 0
        group.append(t)
        size += t.numel()
    if group:
        yield group


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """In place: every tensor becomes its sum over ranks (flattened into buckets: few collectives)."""
    for group in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """In place: every tensor becomes rank ``src``'s (bucketed like :func:`all_reduce_sum_`)."""
    with torch.no_grad():
        for group in _buckets(tensors):
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def all_reduce_grads_(params: list[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks (a parameter without a gradient counts as zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum_([p.grad for p in params])


def reduce_values(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Python numbers summed (or max-ed) over ranks, in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def gather_to_main(obj):
    """Every rank's ``obj`` as a list on every rank (small objects only: RNG states, flags)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(env: DistEnv | None) -> None:
    if env is None:
        return
    if env.backend == "nccl":
        dist.barrier(device_ids=[env.local_rank])
    else:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# FSDP2 for QLoRA
# ---------------------------------------------------------------------------------------------------------
class ShardableNF4Linear(nn.Module):
    """An NF4Linear whose quantized tensors are frozen parameters, so ``fully_shard`` shards them.

    Parameters (requires_grad=False): ``nf4_data`` the packed codes ((N*K+1)//2 bytes), ``nf4_absmax`` the uint8
    block scales (fp32 without double quantization), ``nf4_nested_absmax`` fp32 (ceil(blocks/256),). The byte
    tensors are stored as float16 *bit views* (two bytes per element, padded to an even count): FSDP2 of
    torch 2.11 cannot make a uint8 parameter (it calls nn.Parameter with requires_grad=True), and all-gathering
    16-bit elements moves the same bits. Nothing may cast these parameters (no ``model.to(dtype)`` after
    sharding); ``weight`` views them back as bytes.
    Buffers (replicated, tiny): ``nf4_code`` (16,), ``nf4_nested_code`` (256,), ``nf4_offset`` (1,).
    ``weight`` rebuilds the NF4Weight from the current (all-gathered) tensors, so LoRALinear and the fused
    kernels see exactly what they see with quant.NF4Linear.
    """

    def __init__(self, base):
        super().__init__()
        q = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.shape, self.dtype_, self.blocksize, self.nested_blocksize = q.shape, q.dtype, q.blocksize, q.nested_blocksize
        frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.data_shape = tuple(q.data.shape)
        self.nf4_data = frozen(_bytes_as_half(q.data))
        self.absmax_bytes = q.absmax.dtype == torch.uint8
        self.absmax_shape = tuple(q.absmax.shape)
        self.nf4_absmax = frozen(_bytes_as_half(q.absmax) if self.absmax_bytes else q.absmax)
        self.nf4_nested_absmax = frozen(q.nested_absmax) if q.double_quant else None
        self.register_buffer("nf4_code", q.code)
        self.register_buffer("nf4_nested_code", q.nested_code if q.double_quant else None)
        self.register_buffer("nf4_offset", q.offset.reshape(1) if q.double_quant else None)
        self.bias = base.bias

    @property
    def weight(self):
        from quant.nf4 import NF4Weight

        nested = self.nf4_nested_absmax
        data = _half_as_bytes(self.nf4_data.detach(), self.data_shape)
        absmax = self.nf4_absmax.detach()
        absmax = _half_as_bytes(absmax, self.absmax_shape) if self.absmax_bytes else absmax
        return NF4Weight(data, absmax, self.shape, self.dtype_, self.blocksize,
                         self.nf4_code, None if nested is None else nested.detach(), self.nf4_nested_code,
                         None if self.nf4_offset is None else self.nf4_offset.reshape(()), self.nested_blocksize)

    def dequantize(self, dtype=None):
        return self.weight.dequantize(dtype)

    def forward(self, x):
        from quant.matmul import matmul_nf4

        return matmul_nf4(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, shardable"


def _bytes_as_half(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor's bytes as a 1-D float16 tensor (one zero byte appended when the count is odd)."""
    flat = t.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat.view(torch.float16)


def _half_as_bytes(h: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Inverse of :func:`_bytes_as_half` for the original ``shape``."""
    n = math.prod(shape)
    return h.reshape(-1).view(torch.uint8)[:n].reshape(shape)


def _replace_nf4(model: nn.Module) -> int:
    """Swap every quant.NF4Linear (inside LoRA layers too) for a ShardableNF4Linear; returns how many."""
    from quant.linear import NF4Linear

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name, m in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, ShardableNF4Linear(m))
    return len(found)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` went through :func:`shard_model` (its parameters are DTensors)."""
    return getattr(model, "_minitrain_fsdp", False)


def shard_model(model: nn.Module, env: DistEnv | None = None) -> nn.Module:
    """FSDP2 in place: NF4 tensors and adapters of each decoder layer sharded over the ranks, all-gathered per
    layer; embeddings, final norm and lm_head sharded as the root's group. Call after add_lora/load_adapter
    (rank 0's adapter is broadcast first, so every rank shards the same values).

    Returns:
        the same model (its class is FSDP2's subclass; parameters are DTensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .lora import lora_parameters
    from .trainer import decoder_layers

    env = env or current()
    if env is None:
        raise RuntimeError("shard_model (FSDP2) needs a process group of 2 or more ranks: launch with torchrun "
                           "--nproc-per-node N and call init_distributed() first")
    broadcast_([p for _, p in lora_parameters(model)])
    _replace_nf4(model)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # A model loaded on the host (one that does not fit a GPU) moves one unit at a time: a whole layer is on the
    # device only until its shard is cut; for a model already on the device these moves do nothing.
    for layer in decoder_layers(model):
        fully_shard(layer.to(env.device), mesh=mesh)
    body = getattr(model, "model", model)
    emb, head = getattr(body, "embed_tokens", None), getattr(model, "lm_head", None)
    tied = emb is not None and head is not None and head.weight is emb.weight
    if emb is not None and not tied:
        fully_shard(emb.to(env.device), mesh=mesh)  # its own unit, sharded by vocabulary rows
        if not emb.weight.requires_grad:  # and never gathered: the lookup is vocabulary-parallel
            emb.minitrain_lookup = functools.partial(vocab_parallel_embedding, emb)
    if head is not None and not tied and not head.weight.requires_grad and head.bias is None:
        # Its own unit, sharded by vocabulary rows and never gathered for training: the trainer's loss goes through
        # minitrain_head_loss (vocab_parallel_loss), which gathers the hidden rows instead (see there).
        fully_shard(head.to(env.device), mesh=mesh)
        head.minitrain_head_loss = functools.partial(vocab_parallel_loss, head)
    _move_unsharded_(model, env.device)  # what the root unit holds: final norm, rotary tables, a tied embedding
    # The root (final norm; a tied embedding/lm_head) stays gathered from its forward to the end of backward: a tied
    # weight is read by the loss after ``hidden_states`` returns, and backward needs it again at once.
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    if hasattr(model, "hidden_states"):  # the trainer's forward: FSDP2's gather/reshard hooks must wrap it too
        try:
            from torch.distributed.fsdp import register_fsdp_forward_method
        except ImportError:  # older spelling
            from torch.distributed._composable.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, "hidden_states")
    for m in model.modules():
        if not hasattr(m, "set_requires_gradient_sync"):
            continue  # not an FSDP module
        # reduce gradients with SUM (see the module docstring)
        (m.set_gradient_divide_factor if hasattr(m, "set_gradient_divide_factor")
         else m.set_reduce_scatter_divide_factor)(1.0)
        if hasattr(m, "set_force_sum_reduction_for_comms"):
            m.set_force_sum_reduction_for_comms(True)
    model._minitrain_fsdp = True
    return model


def load_device_for_fsdp(path, load_in_4bit: bool, env: DistEnv) -> torch.device:
    """Where a rank loads a checkpoint it will shard: its GPU when the loaded model fits in 70% of the GPU's free
    memory (fastest), else the host (each unit then moves to the GPU only while its shard is cut, so a model larger
    than one GPU trains as long as 1/N of it fits). The size is estimated from the safetensors files: 16-bit
    weights, about 0.3x of that for the NF4 projections."""
    from pathlib import Path

    if env.device.type != "cuda":
        return env.device
    files = list(Path(path).glob("*.safetensors"))
    need = sum(f.stat().st_size for f in files) * (0.3 if load_in_4bit else 1.0)
    free = torch.cuda.mem_get_info(env.device)[0]
    return env.device if need < 0.7 * free else torch.device("cpu")


def _move_unsharded_(model: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that are not FSDP2 shards yet (DTensors) to ``device``, in place."""
    from torch.distributed.tensor import DTensor

    moved: dict[int, torch.Tensor] = {}  # one moved copy per tensor: a tied weight stays tied
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and b.device != device:
                if id(b) not in moved:
                    moved[id(b)] = b.to(device)
                m._buffers[k] = moved[id(b)]
        for k, p in m._parameters.items():
            if p is not None and not isinstance(p, DTensor) and p.device != device:
                if id(p) not in moved:
                    moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
                m._parameters[k] = moved[id(p)]


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: reduce-scatter gradients after this backward (the last micro-batch) or keep accumulating."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


@contextlib.contextmanager
def full_adapter(model: nn.Module, writeback: bool = False):
    """Inside, every LoRA layer holds its full (unsharded) lora_A/lora_B as plain parameters on every rank, so
    ``save_adapter``/``load_adapter`` work on a sharded model; with ``writeback`` the (possibly loaded) full values
    are sharded back on exit. A collective: every rank must enter. A no-op on an unsharded model."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from .lora import lora_layers

    swapped = []
    for layer in lora_layers(model).values():
        for name in ("lora_A", "lora_B"):
            p = layer._parameters[name]
            if isinstance(p, DTensor):
                full = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                layer._parameters[name] = full
                swapped.append((layer, name, p, full))
    try:
        yield model
    finally:
        for layer, name, p, full in swapped:
            if writeback:
                with torch.no_grad():
                    p.to_local().copy_(distribute_tensor(full.detach(), p.device_mesh, p.placements).to_local())
            layer._parameters[name] = p


def full_optimizer_state(model: nn.Module, opt) -> dict:
    """The optimizer state with full tensors on CPU (a collective), keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy for an lm_head sharded by rows
# ---------------------------------------------------------------------------------------------------------
def _shard_rows(head: nn.Module) -> tuple[torch.Tensor, int, int]:
    """(local weight rows, first vocabulary id they hold, full vocabulary size) of a (possibly FSDP2-sharded)
    lm_head. FSDP2 shards dim 0 like torch.chunk: rank r holds rows [r * ceil(V/N), ...)."""
    w = head.weight
    if not hasattr(w, "to_local"):
        return w.detach(), 0, w.shape[0]
    V = w.shape[0]
    rank = w.device_mesh.get_local_rank()
    per = -(-V // w.device_mesh.size())
    return w.to_local().detach(), min(rank * per, V), V


def _gather_rows(t: torch.Tensor, n_max: int, fill) -> torch.Tensor:
    """Every rank's ``t`` (n_r, ...) padded to n_max rows with ``fill``, stacked: (world * n_max, ...)."""
    pad = t.new_full((n_max - t.shape[0], *t.shape[1:]), fill)
    mine = torch.cat([t, pad]).contiguous()
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return torch.cat(out)


def _shard_pass(h, w, labels, lse=None, scale=None):
    """Over this rank's vocabulary rows ``w``: (losses, lse) when lse is None; else the hidden-state gradient
    sum_v G[:, v] w[v] with G = scale * (softmax(logits - lse) - onehot) (labels outside [0, V_shard) subtract
    nothing, ignore_index rows get 0). The fused chunked kernels on CUDA, fp32 torch on CPU."""
    if h.is_cuda:
        from triton_ops.fused_linear_cross_entropy import _run_chunks, default_chunk_size

        chunk = default_chunk_size(h.shape[0], w.shape[0], h.element_size())
        if lse is None:
            loss, lse_part, *_ = _run_chunks(h, w, None, labels, -100, 0.0, chunk, None, None, False, False, False)
            return loss, lse_part
        return _run_chunks(h, w, None, labels, -100, 0.0, chunk, scale, lse, True, False, False)[2]
    logits = h.float() @ w.float().t()
    if lse is None:
        lse_part = torch.logsumexp(logits, dim=1)
        inside = (labels >= 0) & (labels < w.shape[0])
        z_y = logits.gather(1, labels.clamp(0, w.shape[0] - 1)[:, None])[:, 0]
        return torch.where(inside, lse_part - z_y, 0.0), lse_part  # the loss where the target is in the shard
    g = torch.exp(logits - lse[:, None])
    g[torch.arange(len(labels)), labels.clamp(0, w.shape[0] - 1)] -= ((labels >= 0) & (labels < w.shape[0])).float()
    g *= (scale * (labels != -100))[:, None]
    return (g @ w.float()).to(h.dtype)


class _VocabParallelLoss(torch.autograd.Function):
    """Summed cross-entropy of this rank's rows against a row-sharded lm_head. Forward: all-gather the hidden rows
    and labels of every rank (padded to the largest count); per token, the logsumexp over this rank's vocabulary
    rows and the target logit when the target is one of them; an all-gather of those partial logsumexps and an
    all-reduce of the target logits give every token's exact loss on every rank. Backward: each rank forms the
    softmax gradient of every token over its vocabulary rows (with the global logsumexp) times its rows of W, and
    a reduce-scatter (fp32) sums the N partial hidden-state gradients back to the rank that owns each token. The
    FLOPs are those of one rank's loss (all tokens x V/N instead of own tokens x V); nothing of size V x C moves."""

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    def forward(ctx, h, labels, w, v0, V):
        world, rank = dist.get_world_size(), dist.get_rank()
        counts = [int(c) for c in _gather_rows(torch.tensor([h.shape[0]], device=h.device), 1, 0)]
        n_max = max(max(counts), 1)
        h_all = _gather_rows(h.detach(), n_max, 0)
        y_all = _gather_rows(labels, n_max, -100)
        inside = (y_all >= v0) & (y_all < v0 + w.shape[0])
        local = torch.where(y_all == -100, -100, torch.where(inside, y_all - v0, w.shape[0]))
        loss_part, lse_part = _shard_pass(h_all, w, local)
        target = torch.where(inside, lse_part - loss_part, 0.0)  # the target logit where this rank holds it
        lse_all = torch.empty(world, *lse_part.shape, dtype=lse_part.dtype, device=lse_part.device)
        dist.all_gather(list(lse_all.unbind(0)), lse_part.contiguous())
        dist.all_reduce(target)
        lse = torch.logsumexp(lse_all, dim=0)
        rows = slice(rank * n_max, rank * n_max + h.shape[0])
        loss = torch.where(y_all[rows] != -100, lse[rows] - target[rows], 0.0).sum()
        ctx.save_for_backward(h_all, local, lse, w)
        ctx.n, ctx.n_max = h.shape[0], n_max
        return loss

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, grad):
        h_all, local, lse, w = ctx.saved_tensors
        world, rank = dist.get_world_size(), dist.get_rank()
        scales = torch.empty(world, 1, dtype=torch.float32, device=h_all.device)  # each token's owner's upstream grad
        dist.all_gather(list(scales.unbind(0)), grad.detach().float().reshape(1).contiguous())
        scale = scales.reshape(world).repeat_interleave(ctx.n_max)
        partial = _shard_pass(h_all, w, local, lse, scale).float()
        if dist.get_backend() == "nccl":
            mine = torch.empty(ctx.n_max, h_all.shape[1], dtype=torch.float32, device=h_all.device)
            dist.reduce_scatter_tensor(mine, partial)
        else:  # gloo has no reduce-scatter
            dist.all_reduce(partial)
            mine = partial[rank * ctx.n_max:(rank + 1) * ctx.n_max]
        return mine[:ctx.n].to(h_all.dtype), None, None, None, None


def vocab_parallel_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Summed fp32 cross-entropy of this rank's rows ``h`` (n, C) with targets ``y`` (n,) through an lm_head whose
    weight rows are sharded over the ranks (a collective: every rank calls it, with any n, 0 included)."""
    w, v0, V = _shard_rows(head)
    return _VocabParallelLoss.apply(h.to(w.dtype).contiguous(), y.contiguous(), w, v0, V)


@torch.no_grad()
def vocab_parallel_embedding(emb: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``emb(ids)`` for a frozen embedding whose rows are sharded over the ranks (a collective: every rank calls it,
    with ids of any shape): all-gather the ids, look up the ones this rank holds (zeros for the rest) and
    reduce-scatter the sums back, exact (one nonzero term per row)."""
    w, v0, _ = _shard_rows(emb)
    flat = ids.reshape(-1)
    n_max = max(1, max(int(c) for c in _gather_rows(torch.tensor([flat.numel()], device=ids.device), 1, 0)))
    ids_all = _gather_rows(flat, n_max, -1)
    inside = (ids_all >= v0) & (ids_all < v0 + w.shape[0])
    rows = torch.nn.functional.embedding((ids_all - v0).clamp(0, w.shape[0] - 1), w) * inside[:, None].to(w.dtype)
    if dist.get_backend() == "nccl":
        mine = torch.empty(n_max, w.shape[1], dtype=w.dtype, device=w.device)
        dist.reduce_scatter_tensor(mine, rows)
    else:  # gloo has no reduce-scatter
        dist.all_reduce(rows)
        mine = rows[dist.get_rank() * n_max:(dist.get_rank() + 1) * n_max]
    return mine[:flat.numel()].reshape(*ids.shape, w.shape[1])
