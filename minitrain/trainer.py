"""The training loop: LoRA adapters trained with AdamW on token-normalized loss, with checkpoints and exact resume.

One optimizer step reads ``gradient_accumulation_steps`` micro-batches first, counts their trained tokens N
(labels[:, 1:] != -100), then runs forward/backward on each with loss = sum of its token losses / N, so the
update is the same however the step's sequences are split into micro-batches and however they are padded.
The loss comes from the final hidden states through the fused linear cross-entropy (only the rows that are
trained are projected to the vocabulary; no (tokens x vocab) logits are held).

Checkpoints (every ``save_steps``) hold the adapter (PEFT format), optimizer and loss-scaler state, the RNG
states and the data position; a directory is written under a temporary name and renamed, so a kill at any
moment leaves the previous checkpoint intact, and resuming replays the same batches and dropout masks.

Under ``torchrun`` (a process group of N > 1 ranks) the same loop is data-parallel: each step takes the next
G*N micro-batches of the global stream, rank r trains positions r, r+N, ...; N is all-reduced before backward and
the adapter gradients are summed over ranks, so the step equals one process's step with G*N micro-batches.
Rank 0 alone writes files and prints. With a model sharded by ``minitrain.distributed.shard_model`` (FSDP2)
FSDP2 reduces the gradients itself. See ``minitrain.distributed``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist_
from .config import TrainConfig, is_auto
from .data.batching import bucket_batches
from .lora import LoRALinear, atomic_torch_save, atomic_write_text, load_adapter, lora_parameters, save_adapter
from .model import (MLP_TILE_FROM, LlamaAttention, LlamaDecoderLayer, LlamaMLP, SavedAttention, attention_outputs,
                    env_count, env_switch, has_global_hooks, has_hooks, mlp_tile_default, offload_input_embeddings)

try:
    from triton_ops.fused_linear_cross_entropy import fused_linear_cross_entropy
except ImportError:
    fused_linear_cross_entropy = None
try:  # without triton_ops, LoRALinear takes its plain path and there is nothing to skip
    from triton_ops.lora import output_unused
except ImportError:
    output_unused = None


MAX_GRAPHS = 40  # CUDA graphs (batch shapes) captured per run; further shapes run eagerly
GRAPH_MIN_LEN = 64  # padded batches run from graphs at graph_length(T) tokens per row


def graph_length(T: int, limit: int | None = None) -> int:
    """Tokens per row at which a right-padded batch of longest row ``T`` runs from a CUDA graph: the smallest
    m * 2^k >= T with m in 4..7, at least GRAPH_MIN_LEN. Four lengths per doubling (64, 80, 96, 112, 128, 160,
    ..., 2048: 21 lengths up to 2048), so a few graphs serve batches of every length, for at most 25% more
    tokens (about 11% on average over lengths). ``limit`` (the model's context) caps it (never below T)."""
    if T <= GRAPH_MIN_LEN:
        n = GRAPH_MIN_LEN
    else:
        base = 1 << max(0, T.bit_length() - 3)  # 2^k with 4 * 2^k <= T < 8 * 2^k
        n = -(-T // base) * base
    return n if limit is None or n <= limit else max(T, limit)


def pad_batch(batch: dict, T: int, pad_id: int) -> dict:
    """A right-padded host batch extended to ``T`` tokens per row (pad ids, -100 labels, mask 0; position ids
    counting on). Other entries (n_items) stay as they are."""
    B, T0 = batch["input_ids"].shape
    if T == T0:
        return batch
    fill = {"input_ids": pad_id, "labels": -100, "attention_mask": 0}
    out = dict(batch)
    for k, v in fill.items():
        if k in batch:
            out[k] = torch.cat([batch[k], batch[k].new_full((B, T - T0), v)], dim=1)
    if "position_ids" in batch:
        pos = batch["position_ids"]
        out["position_ids"] = torch.cat([pos, pos[:, -1:] + torch.arange(1, T - T0 + 1, dtype=pos.dtype)], dim=1)
    return out


def local_processes() -> int:
    """Training processes on this host: torchrun's LOCAL_WORLD_SIZE; where a launcher sets only WORLD_SIZE (srun,
    mpirun, a custom one), WORLD_SIZE as the upper bound (every process might share this host); else 1."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                continue
    return 1


def auto_checkpointing(device, cuda_graphs: str) -> str:
    """What gradient_checkpointing "auto" means. On CUDA, "offload" for a process alone on its host: each layer's
    input (and the attention's results) kept in pinned host memory, so the recomputation skips the attention and
    the q/k/v projections; it is both faster and smaller than "on" (8B QLoRA, B=2 T=2048, H200: 12,954 tok/s at
    6.79 GiB against 12,269 at 7.71 GiB; bench/results/2026-11-28-h200-train.md), and where the host budget runs
    out the inputs simply stay on the device. "on" (recompute each layer) where several processes may share the
    host (``local_processes()`` > 1): their copies would share one host's PCIe links and memory. Plain on the CPU (small
    models; the recomputation would only cost time). Off where ``cuda_graphs="on"`` asks for graphs and this torch
    cannot capture checkpointing (< 2.10): "auto" must not turn a run that asked for graphs into an error."""
    from . import cuda_graphs as cg

    if torch.device(device).type != "cuda":
        return "off"
    if cuda_graphs == "on" and not cg.CHECKPOINT_IN_GRAPHS:
        return "off"
    return "offload" if local_processes() == 1 else "on"


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must act on (the message says which)."""


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------
def is_padded(batch: dict) -> bool:
    """A right-padded batch (an ``attention_mask``, no packed documents): every row is one sequence at positions
    0..n-1 followed by padding."""
    return "attention_mask" in batch and "cu_seqlens" not in batch


def final_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, T, C) final normed hidden states: minitrain's ``hidden_states`` or a transformers model's body.

    minitrain's model gets no position ids for a right-padded batch: under causal attention a real token only
    sees the tokens before it, all real, at positions 0..t, which is what no position ids mean; the padding's
    outputs are never trained. Passing the batch's ids (0 on the padding, a restart) would make the model take
    the rows for packed documents: an explicit (B, 1, T, T) mask instead of the flash path, and a host sync."""
    if hasattr(model, "hidden_states"):
        return model.hidden_states(batch["input_ids"],
                                   position_ids=None if is_padded(batch) else batch.get("position_ids"))
    # use_cache=False: a transformers model otherwise fills a KV cache in the forward, and a checkpointed layer's
    # recomputation in the backward appends its keys again (twice the keys: a shape error at the first backward)
    out = model.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      position_ids=batch.get("position_ids"), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def token_loss_sum(model: nn.Module, batch: dict, fused: bool = True) -> torch.Tensor:
    """Sum over trained positions of -log p(label[t+1] | tokens <= t), fp32 scalar.

    Only trained rows of the hidden states reach the vocabulary projection (often a small share of the tokens).
    """
    hidden = final_hidden(model, batch)  # (B, T, C)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != -100
    h = hidden[:, :-1][keep]  # (n, C)
    y = targets[keep]  # (n,)
    head = model.lm_head
    # FSDP2 gives an untied lm_head its own unit and this method (distributed.shard_model), so its weight is
    # all-gathered only around the loss and its backward
    return getattr(head, "minitrain_head_loss", functools.partial(head_loss, head))(h, y, fused)


def head_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """Summed cross-entropy of the rows ``h`` (n, C) through ``head.weight`` (V, C) against ``y`` (n,), fp32."""
    w = head.weight
    if fused and fused_linear_cross_entropy is not None:
        return fused_linear_cross_entropy(h.to(w.dtype).contiguous(), w, y, reduction="sum")
    logits = F.linear(h, w).float()  # (n, V)
    return F.cross_entropy(logits, y, reduction="sum")


def n_items(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------------------------------
# Batches for a plain list of tokenized examples (minitrain's Dataset brings its own)
# ---------------------------------------------------------------------------------------------------------
class ExampleBatches:
    """Shuffled, right-padded batches over a list of ``{"input_ids", "labels"?}`` examples, resumable exactly
    (the same interface as ``minitrain.data.Batches``: iterate one epoch, state_dict/load_state_dict).

    Shuffled batches are length-bucketed as minitrain's datasets' are (``minitrain.data.batching.bucket_batches``:
    windows of 32 batches sorted by length, then the batches shuffled), so a batch pads little: on the
    bench/trainer.py examples (log-normal lengths, median 350) random pairs padded 26.5% of the batch tokens."""

    def __init__(self, examples, batch_size: int, shuffle: bool, seed: int, pad_id: int = 0):
        if len(examples) == 0:
            raise TrainingError("the dataset is empty")
        self.examples, self.batch_size, self.shuffle, self.seed, self.pad_id = examples, batch_size, shuffle, seed, pad_id
        self.epoch, self.index = 0, 0
        self._lengths = None  # example lengths, read at the first shuffled plan
        self.bucketed = True  # False only when resuming a run saved before length bucketing

    def plan(self, epoch: int) -> list[list[int]]:
        n = len(self.examples)
        rng = np.random.default_rng([self.seed, epoch])
        if self.shuffle and self.bucketed:
            if self._lengths is None:
                self._lengths = np.array([len(e["input_ids"]) for e in self.examples])
            return bucket_batches(rng.permutation(n), self._lengths, self.batch_size, rng)
        # in order, or shuffled as runs saved before bucketing were (their checkpoints resume exactly)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        return [order[i:i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def collate(self, idx: list[int]) -> dict:
        seqs = [self.examples[i] for i in idx]
        T = max(len(s["input_ids"]) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            x = torch.as_tensor(s["input_ids"], dtype=torch.long)
            ids[b, :len(x)] = x
            labels[b, :len(x)] = torch.as_tensor(s.get("labels", x), dtype=torch.long)
            mask[b, :len(x)] = 1
        pos = torch.arange(T)[None].expand(len(seqs), T).contiguous()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}

    def raw(self):
        """The plan entries (lists of example indices) of the epoch from the current position, not collated."""
        plan = self.plan(self.epoch)
        while self.index < len(plan):
            self.index += 1
            yield plan[self.index - 1]
        self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self):
        for b in self.raw():
            yield self.collate(b)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "order": "bucketed" if self.bucketed else "random"}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        # a checkpoint without "order" comes from before length bucketing: keep its order, so the resumed run
        # sees exactly the batches the interrupted one would have (no example repeated or skipped)
        self.bucketed = state.get("order", "random") == "bucketed"


def make_batches(dataset, split: str, batch_size: int, packing: bool, seed: int, pad_id: int = 0):
    if dataset is None:
        return None
    if hasattr(dataset, "batches"):  # minitrain.data.Dataset
        if split == "eval" and len(getattr(dataset, "eval_idx", ())) == 0:
            return None
        return dataset.batches(split, batch_size, packing=packing and split == "train", seed=seed)
    return ExampleBatches(dataset, batch_size, shuffle=split == "train", seed=seed, pad_id=pad_id)


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing (optionally with the layer inputs held in pinned host memory)
# ---------------------------------------------------------------------------------------------------------
class _Stash:
    """One checkpointed layer's input, between the layer's forward and its recomputation in the backward."""

    __slots__ = ("index", "x", "host", "d2h", "dev", "h2d", "prev", "requires_grad", "used", "device", "key",
                 "fetched", "reused", "kept", "attn", "attn_host", "attn_dev", "attn_fn", "attn_src", "attn_keys",
                 "__weakref__")

    def __init__(self, index: int, x: torch.Tensor, host: torch.Tensor | None, d2h, prev, key):
        self.index, self.x, self.host, self.d2h, self.prev, self.key = index, x, host, d2h, prev, key
        self.dev = self.h2d = None
        self.device = x.device
        self.requires_grad, self.used, self.fetched, self.reused = x.requires_grad, False, False, False
        self.kept = host is None  # over the host budget: the input stays on its device, no copies
        # the segment's attention output and log-sum-exp (see HostOffload.keep_attention): the forward's
        # SavedAttention while its copies run (and for good where the input stays on the device), their host
        # copies (storage order), and the SavedAttention brought back for the recomputation
        self.attn = self.attn_host = self.attn_dev = None
        self.attn_fn = False  # the forward's attention ran as model._SavedAttentionFn (so must the recomputation)
        self.attn_src = None  # the device tensors the attention copies read (dense copies included) until done
        self.attn_keys = []  # keys of the layer's reused host buffers holding them


def _storage_order(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(t with its dims permuted into memory order, so contiguous, the permutation); a dense non-contiguous
    view (the attention output's (B, H, T, D) view of (B, T, H, D) memory) is copied in its own layout."""
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    p = t.permute(perm)
    return (p, perm) if p.is_contiguous() else (t.contiguous(), tuple(range(t.dim())))


def _saved_attention(tensors: list[torch.Tensor], rng: tuple) -> SavedAttention:
    """A SavedAttention from the list SavedAttention.tensors gave (out, lse[, q, k, v])."""
    return SavedAttention(tensors[0], tensors[1], rng, *tensors[2:])


def _unpermute(t: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    inv = [0] * len(perm)
    for i, d in enumerate(perm):
        inv[d] = i
    return t.permute(inv)


HOST_BUDGET_ENV = "MINITRAIN_OFFLOAD_HOST_GIB"
HOST_BUDGET_FRACTION = 0.75  # of the memory available when the first layer input is offloaded


def available_host_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_host_budget() -> float:
    """Bytes of host memory gradient_checkpointing='offload' may hold: ``MINITRAIN_OFFLOAD_HOST_GIB`` GiB when
    set, else 75% of the memory available now shared by the host's training processes (LOCAL_WORLD_SIZE; they
    measure at about the same time, so each takes its share, not 75% of what is left), no limit where that is
    unknown."""
    env = os.environ.get(HOST_BUDGET_ENV, "").strip()
    if env:
        try:
            gib = float(env)
        except ValueError:
            gib = -1.0
        if not gib >= 0:
            raise ValueError(f"{HOST_BUDGET_ENV}={env!r}: expected a number of GiB >= 0")
        return gib * 2**30
    avail = available_host_bytes()
    return math.inf if avail is None else HOST_BUDGET_FRACTION * avail / local_processes()


def _grown(buf: torch.Tensor | None, n: int) -> int:
    """Elements of a layer's host buffer that must hold n: n for a new one, else at least doubled. The Trainer's
    padded batches arrive at rising graph lengths (64, 80, 96, ... 2048 tokens): growing by a quarter reallocated
    each buffer ~15 times on the way up, about 5x the final bytes pinned in all; doubling does it ~5 times and at
    most 2x. A buffer a CUDA graph captured stays alive beside its successor, so fewer steps also hold less host
    memory. (It did not shorten the offload Trainer's slower start: bench/results/2026-11-28-h200-trainer.md.)"""
    return n if buf is None else max(n, 2 * buf.numel())


class HostOffload:
    """Keeps checkpointed layer inputs in pinned host memory, the copies overlapped with compute.

    Forward of layer i: its input is copied to a pinned host buffer of that layer on a copy stream (which first
    waits for the compute stream), while the layer computes; when layer i+1 stashes its input, the compute
    stream waits for layer i's copy (long done by then) and the device tensor is released, so at most one
    layer input stays on the device beside the one its caller holds. Backward: when layer i is recomputed, the
    copy stream brings layer i-1's input back into a fresh device tensor (overlapping layer i's backward) and
    layer i waits for its own copy; the last layer, still on the device, needs none. Every copy is an
    event-ordered stream operation, so a CUDA graph captures the whole scheme (forked copy stream, joined
    before the layer that needs the data). Unlike torch's ``save_on_cpu``, only the segment inputs move: what
    checkpointing saves, 2 * B * T * C bytes per segment in bf16 (32 MiB at 2 x 2048 x 4096).

    A minitrain decoder layer is two segments on this path (see :class:`CheckpointedLayer`): its input x and
    h1 = x + attention(x) are both stashed (64 MiB of pinned host memory per layer at that shape), at indices
    2i and 2i + 1 (a layer checkpointed whole uses 2i only). Indices follow the forward order, so the stash
    before a segment's (``prev``) is the input of the segment recomputed next, the one ``fetch`` prefetches;
    "layer" above and below means such a segment. h1's stash does not make the compute stream wait for x's
    copy (``release=False``; x's copy runs beside the attention half and the compute stream never waits for
    it there): the layer's caller holds x until the layer returns anyway, and the next layer's stash releases
    both. So the device holds no more layer inputs than with one segment, except after the forward: the last
    layer's x and h1 both stay (one input more, 32 MiB at that shape), and its recomputation uses both without
    a copy back.

    Host buffers: one per stash index (and dtype), so two per split layer, grown to the largest input seen
    (batches of varying length reuse it), so pinned memory stays at one step's segment inputs. A buffer whose
    input has not been recomputed yet is not reused: a second forward before the backward (two losses summed,
    say) gets fresh buffers. A buffer a CUDA graph captured is kept for the graph's lifetime even when a larger
    batch replaces it. On CPU tensors the same buffers are plain host memory and the copies synchronous (the
    logic the tests check)."""

    def __init__(self, host_budget: float | None = None):
        self.stream = None
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.holders: dict[tuple, weakref.ref] = {}  # the stash using each buffer
        self.captured: list[torch.Tensor] = []  # buffers whose addresses a CUDA graph holds
        self.fresh: list[weakref.ref] = []  # one-off buffers (the layer's buffer still pending), alive with their stash
        self.pending: list[_Stash] = []
        self.last: _Stash | None = None
        self.host_budget = host_budget  # bytes; None: default_host_budget() at the first stash
        self.kept_last_step = 0  # stashes kept on the device by the budget (counted per forward, see stash)
        self.segments = None  # stash indices of one forward (set_gradient_checkpointing: 2 per layer), if known
        self.skipped: set[int] = set()  # indices below segments that are never stashed (kept MLP halves' h1)
        self.warned = False

    def host_bytes(self) -> int:
        """Bytes of the host buffers this offload holds (reused ones, those a CUDA graph keeps, and the one-off
        buffers of later forwards while their stashes live)."""
        self.fresh = [r for r in self.fresh if r() is not None]
        seen = {id(b): b for b in list(self.buffers.values()) + self.captured + [r() for r in self.fresh]
                if b is not None}
        return sum(b.numel() * b.element_size() for b in seen.values())

    def _fits(self, key: tuple, x: torch.Tensor, reuse: bool) -> bool:
        """Whether x's host copy stays within the budget: a fresh buffer counts whole, the layer's reused buffer
        only by its growth (as ``_host_buffer`` grows it; a buffer a CUDA graph holds stays alive beside it)."""
        if self.host_budget is None:
            self.host_budget = default_host_budget()
        need = self._extra_bytes(key, x) if reuse else x.numel() * x.element_size()
        return need == 0 or self.host_bytes() + need <= self.host_budget  # 0: the layer's buffer holds it

    def _extra_bytes(self, key: tuple, x: torch.Tensor) -> int:
        """Bytes of host memory ``_host_buffer(key, x)`` would add: a fresh buffer whole, the layer's reused
        buffer by its growth (0 when it holds x)."""
        ref = self.holders.get(key)
        holder = None if ref is None else ref()
        n, size = x.numel(), x.element_size()
        if holder is not None and not holder.fetched:
            return n * size
        buf = self.buffers.get(key)
        if buf is not None and buf.numel() >= n:
            return 0
        need = _grown(buf, n) * size
        if buf is not None and not any(b is buf for b in self.captured):
            need -= buf.numel() * buf.element_size()
        return need

    def _release_pending(self, main, keep: _Stash | None = None) -> None:
        rest = []
        for s in self.pending:
            if s is keep:
                rest.append(s)
            else:
                main.wait_event(s.d2h)  # the host copy is complete before the device tensor's memory is reused
                s.x = s.attn = s.attn_src = None
        self.pending = rest

    def _host_buffer(self, key: tuple, x: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(host tensor of x's shape, whether it is the layer's reused buffer); (None, False) when the copy
        would take the host memory beyond the budget."""
        pin = x.device.type == "cuda"
        ref = self.holders.get(key)
        holder = None if ref is None else ref()
        if holder is not None and not holder.fetched:  # still needed by a pending recomputation
            if not self._fits(key, x, reuse=False):
                return None, False
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=pin)
            self.fresh.append(weakref.ref(host))
            return host, False
        if not self._fits(key, x, reuse=True):
            return None, False
        n = x.numel()
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(_grown(buf, n), dtype=x.dtype, pin_memory=pin)
        if pin and torch.cuda.is_current_stream_capturing() and not any(b is buf for b in self.captured):
            self.captured.append(buf)
        return buf[:n].view(x.shape), True

    def stash(self, index: int, x: torch.Tensor, release: bool = True) -> _Stash:
        """Start x's copy to host. ``release=False`` (h1 of a split layer): the compute stream does not wait
        for the earlier copies yet (x's copy may still run beside the attention half), since releasing the
        layer input now frees nothing (its caller holds it until the layer returns); the next stash does."""
        prev = self.last if self.last is not None and self.last.index < index else None
        if prev is None:
            self.kept_last_step = 0  # a new forward (the first stash, or indices starting over)
        key = (index, x.dtype)
        host, reused = self._host_buffer(key, x)
        if x.device.type == "cuda" and release:
            self._release_pending(torch.cuda.current_stream(x.device))
        if host is None:  # over the host budget: x stays where it is (device memory instead of host memory)
            self.kept_last_step += 1
            self._warn_budget(x)
            s = _Stash(index, x, None, None, prev, key)
            self.last = s
            return s
        if x.device.type != "cuda":
            host.copy_(x.detach())
            s = _Stash(index, x, host, None, prev, key)  # x is dropped once the forward used it
        else:
            main = torch.cuda.current_stream(x.device)
            if self.stream is None:
                self.stream = torch.cuda.Stream(x.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                host.copy_(x.detach(), non_blocking=True)
                d2h = torch.cuda.Event()
                d2h.record(self.stream)
            s = _Stash(index, x, host, d2h, prev, key)
            self.pending.append(s)
        if reused:
            s.reused = True
            self.holders[key] = weakref.ref(s)
        self.last = s
        return s

    def _warn_budget(self, x: torch.Tensor) -> None:
        if self.warned:
            return
        self.warned = True
        import warnings

        warnings.warn(f"gradient_checkpointing='offload': the host copies of the checkpointed layer inputs would "
                      f"exceed the budget of {self.host_budget / 2**30:.1f} GiB of host memory "
                      f"({self.host_bytes() / 2**30:.1f} GiB held); further inputs of "
                      f"{x.numel() * x.element_size() / 2**30:.2f} GiB each stay on {x.device} (more device memory, "
                      f"no copies). Set {HOST_BUDGET_ENV} to change the budget (default: "
                      f"{HOST_BUDGET_FRACTION:.0%} of the memory available at the first offload).", stacklevel=4)

    def _bring_back(self, s: _Stash, main) -> None:
        s.dev = torch.empty(s.host.shape, dtype=s.host.dtype, device=main.device)  # allocated on the main stream
        attn = None
        if s.attn_host is not None:
            attn = [(torch.empty(h.shape, dtype=h.dtype, device=main.device), h, perm) for h, perm in s.attn_host[0]]
            attn = attn, [_unpermute(d, perm) for d, _, perm in attn]
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            s.dev.copy_(s.host, non_blocking=True)
            for d, h, _ in attn[0] if attn else ():
                d.copy_(h, non_blocking=True)
            s.h2d = torch.cuda.Event()
            s.h2d.record(self.stream)
        if attn is not None:
            s.attn_dev = _saved_attention(attn[1], s.attn_host[1])

    def keep_attention(self, s: _Stash, saved: SavedAttention) -> None:
        """Called by the attention of the segment whose input ``s`` holds, in its forward: the attention output
        and log-sum-exp go to host with the input (the copy stream, after the kernel) and come back with it
        for the recomputation, which then skips the attention kernel (``minitrain.model.attention_outputs``).
        They are not kept where the input stays on the device by the host budget (they would take several
        times its device memory) nor when their own host copies, with the inputs this forward stashes after them,
        would exceed the budget (inputs first: one over the budget costs device memory); the last segment's,
        like its input, are used from the device."""
        s.attn_fn = True
        if s.kept or s.host is None:  # the input itself stays on the device (host budget): recompute the attention
            return                     # there rather than keep 3.5x its bytes of device memory beside it
        if not REUSE_ATTENTION_INPUTS:
            saved.q = saved.k = saved.v = None
        parts = [_storage_order(t) for t in saved.tensors()]
        # all slots or none (no buffer allocated for nothing), and only where the budget still has room for the
        # inputs this forward stashes after this one: an input over the budget costs device memory, a recomputed
        # attention only time
        need = sum(self._extra_bytes((s.index, "attn", slot, t.dtype), t) for slot, (t, _) in enumerate(parts))
        need += sum(self._extra_bytes((k, s.host.dtype), s.host) for k in range(s.index + 1, self.segments or 0)
                    if k not in self.skipped)
        if self.host_bytes() + need > self.host_budget:
            return
        s.attn = saved
        hosts = []
        for slot, (t, perm) in enumerate(parts):
            host, reused = self._host_buffer((s.index, "attn", slot, t.dtype), t)
            if host is None:  # over the host budget: recompute the attention instead (no device memory spent)
                s.attn = None
                return
            if reused:
                self.holders[(s.index, "attn", slot, t.dtype)] = weakref.ref(s)
                s.attn_keys.append((s.index, "attn", slot, t.dtype))
            hosts.append((host, perm))
        s.attn_host = (hosts, saved.rng)
        if s.device.type != "cuda":
            for (host, _), (t, _) in zip(hosts, parts):
                host.copy_(t.detach())
            s.attn = None
            return
        main = torch.cuda.current_stream(s.device)
        s.attn_src = [t for t, _ in parts]  # a dense copy made above must outlive its read on the copy stream
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for (host, _), (t, _) in zip(hosts, parts):
                host.copy_(t.detach(), non_blocking=True)
            s.d2h = torch.cuda.Event()  # after x's copy on the same stream: one event for both
            s.d2h.record(self.stream)

    def saved_attention(self, s: _Stash) -> SavedAttention | None:
        """What ``keep_attention`` kept for this stash, on its device, for the recomputation, or None: set by
        ``fetch`` (which waited for the copies back, or took what stayed on the device) and handed out once."""
        saved, s.attn_dev = s.attn_dev, None
        return saved

    def fetch(self, s: _Stash) -> torch.Tensor:
        """The layer input again, on its device, for the recomputation."""
        if s.fetched and (s.reused or s.attn_keys):  # a second backward through the same graph (retain_graph)
            refs = ([self.holders.get(s.key)] if s.reused else []) + [self.holders.get(k) for k in s.attn_keys]
            if any(ref is None or ref() is not s for ref in refs):
                raise RuntimeError("gradient_checkpointing='offload': this layer's host buffer was reused by a "
                                   "later forward before this second backward; recompute the loss instead")
        s.fetched = True
        if s.device.type != "cuda":  # CPU: a copy of the host buffer, or the input itself (over the budget)
            if s.attn_host is not None:  # (on CPU the copies are done at once: nothing stays on the "device")
                s.attn_dev = _saved_attention([_unpermute(h.clone(), p) for h, p in s.attn_host[0]], s.attn_host[1])
            return (s.x if s.kept else s.host.clone()).detach().requires_grad_(s.requires_grad)
        main = torch.cuda.current_stream(s.device)
        p = s.prev
        # the segment recomputed next may still be on the device too (x of a split last layer): kept, no copy back
        keep = p if p is not None and p.x is not None else None
        if s.x is not None:  # still on the device (the last layer, or kept by the budget): use it, no copy back
            out, s.attn_dev = s.x.detach(), s.attn
            self._release_pending(main, keep)
        else:
            self._release_pending(main, keep)
            if s.dev is None:
                self._bring_back(s, main)
            main.wait_event(s.h2d)
            out, s.dev = s.dev, None
        if p is not None and p.x is None and p.dev is None and p.d2h is not None:
            self._bring_back(p, main)  # prefetch the input of the layer recomputed next
        return out.requires_grad_(s.requires_grad)


# The recomputation of a minitrain LlamaDecoderLayer skips its LoRA down projection's forward output, and with
# the split below also o_proj's (see CheckpointedLayer). Off with MINITRAIN_RECOMPUTE_SKIP=0 (read at import) or
# by setting this to False; read at each recomputation (a CUDA graph keeps what its capture did).
RECOMPUTE_SKIPS_UNUSED_OUTPUT = env_switch("MINITRAIN_RECOMPUTE_SKIP")

# gradient_checkpointing="offload" checkpoints a minitrain LlamaDecoderLayer as two segments (attention half,
# MLP half; see CheckpointedLayer). Off with MINITRAIN_SPLIT_CHECKPOINT=0 (read at import) or by setting this
# to False; read at each checkpointed forward (a CUDA graph keeps what its capture did).
SPLIT_OFFLOAD_SEGMENTS = env_switch("MINITRAIN_SPLIT_CHECKPOINT")

# gradient_checkpointing="offload" keeps the attention output and its log-sum-exp of a split layer's attention
# half with the segment input in pinned host memory, so the recomputation skips the attention kernel (see
# CheckpointedLayer). Off with MINITRAIN_ATTN_REUSE=0 (read at import) or by setting this to False; read at each
# checkpointed forward (a CUDA graph keeps what its capture did).
REUSE_ATTENTION_OUTPUT = env_switch("MINITRAIN_ATTN_REUSE")
# With it, the attention's inputs q, k, v (rotated) go to host as well, and the recomputation skips the q/k/v
# projections' base GEMMs too (their outputs unused; see unused_qkv_bases). Off with MINITRAIN_QKV_REUSE=0.
REUSE_ATTENTION_INPUTS = env_switch("MINITRAIN_QKV_REUSE")

def keep_mlp_layers_default(unset: int | str = 0) -> int | str:
    """MINITRAIN_KEEP_MLP_LAYERS as a whole number >= 0 or "auto" (``unset`` when not set), read when checkpointing
    is set up."""
    env = os.environ.get("MINITRAIN_KEEP_MLP_LAYERS", "").strip()
    if not env:
        return unset
    if is_auto(env):
        return "auto"
    return env_count("MINITRAIN_KEEP_MLP_LAYERS", 0, "layers (or 'auto')")


# gradient_checkpointing="offload" with the split: the MLP halves of the last n decoder layers are not
# checkpointed (see CheckpointedLayer). None (the default): MINITRAIN_KEEP_MLP_LAYERS, else 0; an int or "auto"
# (KeepMLPPolicy) overrides both. Read by set_gradient_checkpointing (TrainConfig.keep_mlp_layers overrides it for
# the Trainer, whose default is "auto").
KEEP_MLP_LAYERS: int | str | None = None

# keep_mlp_layers="auto" plans a step's peak allocated device memory to stay within this share of what torch may
# use (free on the device plus its own cached blocks, within its per-process memory fraction) less room for one
# eager step, when TrainConfig.max_memory_gib is not set. The rest is for the allocator: peak reserved ran 0.5-3.4
# GiB above peak allocated in bench/train.py's rows.
AUTO_KEEP_SHARE = 0.85


class StepMemory:
    """Device memory around one training step, for :meth:`KeepMLPPolicy.calibrate`: allocated bytes before
    (``before``) and after (``after``) and the peak in between (``peak``). Torch's peak statistics are reset on
    entry; the peaks they held then are ``prior_peak`` and ``prior_reserved`` (a caller reporting peaks keeps the
    larger)."""

    def __init__(self, device: torch.device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # some queries want an index
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.before = self.after = self.peak = self.prior_peak = self.prior_reserved = None

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self.prior_peak = torch.cuda.max_memory_allocated(self.device)
        self.prior_reserved = torch.cuda.max_memory_reserved(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.after = torch.cuda.memory_allocated(self.device)
        return False


class KeepMLPPolicy:
    """``keep_mlp_layers="auto"``: how many of the last decoder layers keep their MLP half's activations on the
    device (instead of recomputing them in the backward), decided per input size from measured memory.

    Training steps run with none kept calibrate it (:meth:`calibrate`; the Trainer's first two steps, run eagerly
    for this). The first is only counted: it also holds one-time allocations (kernel autotuning, the NF4 matmul's
    path timing, lazily built state) that would overstate the peak. From the second: the allocated bytes before it
    ``A`` and after it ``A'`` and its peak ``P``, at ``t1`` tokens. For a forward of ``t`` tokens the peak with
    ``n`` layers kept is predicted as

        A + (P - A) * max(1, t / t1) + max(0, A' - A) + G + n * t * k

    ``G``: the trainable parameters' gradients where the step freed them (CUDA graphs keep them allocated; those
    still allocated are in ``A'``), counted in full although the measured peak may hold some of them already (an
    overstatement on the safe side). ``k``: the bytes per token one kept MLP half holds, counted from the model
    (:meth:`for_model`): its norm's input and output (C each, the residual stream's dtype), gate(x) and up(x) (F
    each, the compute dtype) where the MLP runs as one lora_mlp call, four F-sized tensors where it runs module by
    module (the torch reference, hooks, grouping off), each adapter's x·Aᵀ (R), the norm's fp32 1/rms and LoRA
    dropout's masks (bytes). On the 8B shape in bf16, grouped, about 2 * (2C + 2F): 0.28 GiB per layer at 4096
    tokens, where bench/train measured 0.23-0.28. ``n`` is the largest count within the budget:
    ``max_memory_gib`` when given (allocated bytes, as torch.cuda.max_memory_allocated counts them, not the
    process's footprint), else ``AUTO_KEEP_SHARE`` of what torch may use at calibration, less the transient of
    an eager step at the longest input expected
    (``max_tokens``; a new batch shape's warm-up runs eagerly beside the CUDA graphs' memory pool). The step's
    transient part is scaled up for longer inputs, never down (its fixed parts, such as the fused cross-entropy's
    chunk buffer, do not shrink). None is kept before calibration, on inputs the MLP splits into token tiles (which
    recompute themselves anyway: ``MLP_TILE_FROM`` tiles' worth of tokens) or at any size after a calibrating step
    that tiled (its transient understates an untiled step's), where the budget is already exceeded,
    and, once ``graphs_only`` is set (the Trainer sets it when it captures graphs), outside a graph capture."""

    def __init__(self, layers: int, bytes_per_token: int, tiled_above: int | None = None,
                 max_memory_gib: float | None = None, grad_bytes: int = 0, calibration_steps: int = 2):
        self.layers, self.bytes_per_token, self.tiled_above = layers, bytes_per_token, tiled_above
        self.max_memory_gib, self.grad_bytes = max_memory_gib, grad_bytes
        self.calibration_steps, self.steps_seen = calibration_steps, 0
        self.max_tokens: int | None = None  # the longest input expected (tokens per forward), for the eager reserve
        # True once training runs from CUDA graphs: only a capture keeps layers (the graphs hold their pool's memory,
        # so an eager step beside them, such as a new batch shape's warm-up, keeps none)
        self.graphs_only = False
        self.calibrated = self.tiled_calibration = False
        self.params: list[torch.Tensor] = []  # the trainable parameters (whose gradients may outlive the step)
        self.budget = self.base = self.transient = self.tokens = None
        self.counts: dict[int, int] = {}  # tokens -> layers kept, as decided so far

    @classmethod
    def for_model(cls, model: nn.Module, max_memory_gib: float | None = None,
                  compute_dtype: torch.dtype | None = None) -> "KeepMLPPolicy | None":
        """The policy for ``model``'s decoder layers, or None where they are not all minitrain's
        ``LlamaDecoderLayer`` with a ``LlamaMLP`` (another model keeps no MLP half: see CheckpointedLayer).
        ``compute_dtype``: autocast's dtype (None: the model's own)."""
        layers = decoder_layers(model)
        if not layers or not all(type(layer) is LlamaDecoderLayer and isinstance(getattr(layer, "mlp", None),
                                                                                  LlamaMLP) for layer in layers):
            return None
        mlp, norm = layers[0].mlp, layers[0].post_attention_layernorm
        C = norm.weight.numel()
        F_ = mlp.down_proj.in_features
        res = norm.weight.element_size()  # the residual stream's dtype: the model's
        comp = torch.empty((), dtype=compute_dtype).element_size() if compute_dtype is not None else res
        # the MLP's own choice for an input like the training step's (device, dtype, autocast): one lora_mlp call
        # keeps x, gate(x), up(x); module by module (the torch reference, hooks, grouping off) autograd keeps up to
        # four (tokens x F) tensors (gate, up, silu(gate) and their product, measured with saved_tensors_hooks)
        probe = torch.zeros(1, C, device=norm.weight.device, dtype=norm.weight.dtype)
        with torch.autocast(probe.device.type, dtype=compute_dtype, enabled=compute_dtype is not None):
            grouped = mlp.grouped(probe) is not None
        per_token = res * 2 * C + comp * (2 if grouped else 4) * F_
        loras = [m for m in mlp.modules() if isinstance(m, LoRALinear)]
        per_token += comp * sum(m.r for m in loras) + 4  # each adapter's x·Aᵀ (R) and the norm's fp32 1/rms
        per_token += sum(m.in_features for m in loras if m.dropout > 0)  # dropout's masks, a byte per element
        tile = mlp.tile_tokens
        params = [p for p in model.parameters() if p.requires_grad]
        policy = cls(len(layers), per_token, MLP_TILE_FROM * tile if tile else None, max_memory_gib,
                     sum(p.numel() * p.element_size() for p in params))
        policy.params = params
        return policy

    def calibrate(self, mem: StepMemory, tokens: int) -> None:
        """Count one CUDA step run with none kept (``mem``, at ``tokens`` tokens per forward); the
        ``calibration_steps``-th one's measurements calibrate the policy."""
        if mem.peak is None:
            raise ValueError("KeepMLPPolicy.calibrate: the step was not measured (it raised)")
        self.steps_seen += 1
        if self.steps_seen < self.calibration_steps:
            return
        dev = mem.device
        free, total = torch.cuda.mem_get_info(dev)
        usable = free + torch.cuda.memory_reserved(dev)  # torch's cached blocks are free for it too
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        if get_fraction is not None:  # set_per_process_memory_fraction caps what the allocator may reserve
            usable = min(usable, int(get_fraction(dev) * total))
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.set_measurements(mem.before, mem.peak, mem.after, tokens, usable, live)

    def set_measurements(self, before: int, peak: int, after: int, tokens: int, usable: int,
                         live_grad_bytes: int = 0) -> None:
        """Calibrate from numbers (bytes): allocated before and after the step, its peak, its tokens per forward, the
        device memory torch may use (the budget's basis when ``max_memory_gib`` is not set) and the bytes of the
        gradients still allocated after the step (counted in ``after`` already)."""
        if tokens < 1:
            raise ValueError(f"KeepMLPPolicy: the calibrating step must run tokens, got {tokens}")
        self.base = before + max(0, after - before) + max(0, self.grad_bytes - live_grad_bytes)
        self.transient = max(0, peak - before)
        self.tokens, self.calibrated = tokens, True
        # measured with the MLP in token tiles (a small working set): an untiled shorter input could need more than
        # this transient, so such a calibration keeps none at any size
        self.tiled_calibration = self.tiled_above is not None and tokens > self.tiled_above
        if self.max_memory_gib is not None:
            self.budget = int(self.max_memory_gib * 2**30)
        else:  # room for one eager step at the longest input beside the graphs' pool
            longest = max(tokens, self.max_tokens or 0)
            self.budget = int(AUTO_KEEP_SHARE * usable) - int(self.transient * longest / tokens)
        self.counts.clear()

    def predicted_peak(self, tokens: int, n: int) -> int:
        """Bytes the step's peak is predicted at with ``n`` layers kept at ``tokens`` tokens (after calibration)."""
        return (self.base + int(self.transient * max(1.0, tokens / self.tokens))
                + n * tokens * self.bytes_per_token)

    def decide(self, tokens: int) -> int:
        """Layers (the last ones) whose MLP half a captured or graph-free step at ``tokens`` tokens keeps."""
        if not self.calibrated or tokens < 1 or self.tiled_calibration or \
                self.tiled_above is not None and tokens > self.tiled_above:
            return 0
        n = self.counts.get(tokens)
        if n is None:
            room = self.budget - self.predicted_peak(tokens, 0)
            n = self.counts[tokens] = max(0, min(self.layers, room // (tokens * self.bytes_per_token)))
        return n

    def count(self, tokens: int) -> int:
        """Layers whose MLP half this forward keeps: :meth:`decide`, or 0 for an eager forward once ``graphs_only``."""
        if self.graphs_only and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return 0  # an eager step beside the graphs' pool (a new shape's warm-up): that memory is taken
        return self.decide(tokens)

    def describe(self, tokens: int) -> str:
        n = self.decide(tokens)
        return (f"keep_mlp_layers='auto': the MLP activations of the last {n} of {self.layers} layers stay on the "
                f"device at {tokens:,} tokens per forward (predicted peak allocation "
                f"{self.predicted_peak(tokens, n) / 2**30:.1f} GiB of a {self.budget / 2**30:.1f} GiB budget)")


# gradient_checkpointing="offload" on CUDA may also keep a frozen, untied input embedding in pinned host memory
# (minitrain.model.offload_input_embeddings: 0.98 GiB less device memory at Llama-3's vocabulary, the same step time
# within noise on an H200: bench/results/2026-11-28-h200-train.md). Opt-in: None (the default) reads
# MINITRAIN_OFFLOAD_EMBEDDINGS (1: on, with a warning where it cannot apply); True / False override it. Read by
# set_gradient_checkpointing (TrainConfig.offload_embeddings overrides it for the Trainer).
OFFLOAD_EMBEDDINGS: bool | None = None


def _offload_embeddings_default() -> bool:
    if OFFLOAD_EMBEDDINGS is not None:
        return OFFLOAD_EMBEDDINGS
    return env_switch("MINITRAIN_OFFLOAD_EMBEDDINGS", default=False)


# The forwards whose code the checks below rely on, as minitrain.model defines them (a later class-level patch
# replaces the class attribute, not these)
_DECODER_FORWARD, _ATTENTION_FORWARD = LlamaDecoderLayer.forward, LlamaAttention.forward
_ATTENTION_QKV = LlamaAttention.qkv
_MLP_FORWARD, _LORA_FORWARD = LlamaMLP.forward, LoRALinear.forward


def _runs_own(m: nn.Module, cls: type, original) -> bool:
    """``m`` is a ``cls`` whose forward is ``original`` (not replaced on its class or on the instance)."""
    return isinstance(m, cls) and type(m).forward is original and "forward" not in vars(m)


def _output_hooks(*mods: nn.Module) -> bool:
    """A forward hook (one that could read an output) on any of ``mods``, or a global one."""
    return any(m._forward_hooks for m in mods) or bool(getattr(nn.modules.module, "_global_forward_hooks", None))


def _sole_holder(layer: nn.Module, w) -> bool:
    """Exactly one module of ``layer`` holds ``w`` as its weight (a parameter, or NF4Linear's attribute); a
    module reached twice counts twice."""
    holders, todo = 0, [layer]
    while todo:
        m = todo.pop()
        holders += m._parameters.get("weight") is w or m.__dict__.get("weight") is w
        todo.extend(c for c in m._modules.values() if c is not None)
    return holders == 1


def _decoder_layer(forward):
    """The layer when ``forward`` is minitrain's ``LlamaDecoderLayer.forward`` bound to it, else None."""
    if getattr(forward, "__func__", None) is not _DECODER_FORWARD or LlamaDecoderLayer.forward is not _DECODER_FORWARD:
        return None  # another forward, or minitrain's class patched since
    return forward.__self__


def unused_output_base(forward):
    """The base weight whose LoRA projection output the recomputation of ``forward`` provably discards, or None.

    That is ``layer.mlp.down_proj.base_layer.weight`` when ``forward`` is minitrain's
    ``LlamaDecoderLayer.forward`` bound to ``layer``: its MLP output only feeds the final residual add, whose
    result torch's checkpoint drops in the recomputation (with the default early stop the recomputation even
    ends at the down projection's save). It also requires that ``layer.mlp`` runs ``LlamaMLP.forward`` (which
    returns the down projection's output as it is), that ``down_proj`` is a ``LoRALinear`` running its own
    forward, that no forward hook (on either, or global) could read an output, and that no other module of the
    layer holds that weight object. Anything else (another layer class, a patched or hooked module): None.
    The same holds for the MLP half alone (``h1 + mlp(post_attention_layernorm(h1))``, the second checkpoint
    segment of the offload split), which is why :class:`CheckpointedLayer` uses it there too.

    Both ways ``LlamaMLP.forward`` computes honour the flag exactly: module by module, ``down_proj`` (a
    LoRALinear, so ``lora_linear``) returns an uninitialized output; grouped (``minitrain.model.GROUPED_LORA``,
    one ``lora_mlp`` call given this same weight object as down's base), ``lora_mlp`` stops after gate(x) and
    up(x), skipping SwiGLU too. Either way the tensors saved for backward are computed as without the flag. The
    MLP groups only with unhooked, unpatched projections, so a hook or patch on gate/up/down that these checks
    allow (on gate/up; a forward pre-hook) sees the modules run one by one, and gate(x), up(x) computed."""
    layer = _decoder_layer(forward)
    if output_unused is None or layer is None:
        return None
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    if not _runs_own(mlp, LlamaMLP, _MLP_FORWARD) or not _runs_own(down, LoRALinear, _LORA_FORWARD):
        return None
    if _output_hooks(mlp, down):
        return None
    w = down.base_layer.weight
    return w if _sole_holder(layer, w) else None


def unused_attention_output_base(layer: nn.Module):
    """The base weight of ``layer.self_attn.o_proj`` when the recomputation of the attention segment
    ``x + self_attn(input_layernorm(x), ...)`` (see :class:`CheckpointedLayer`) provably discards its output,
    else None: ``self_attn`` runs ``LlamaAttention.forward`` (which returns o_proj's output as it is, o_proj
    called as its own module, never grouped), ``o_proj`` is a ``LoRALinear`` running its own forward (so
    ``lora_linear``, which honours ``output_unused`` exactly: no dequantize, base GEMM or adapter term, the
    saved tensors as always), no forward hook (on either, or global) could read an output, and no other module
    of the layer holds that weight object."""
    attn = getattr(layer, "self_attn", None)
    o = getattr(attn, "o_proj", None)
    if output_unused is None or not _runs_own(attn, LlamaAttention, _ATTENTION_FORWARD):
        return None
    if not _runs_own(o, LoRALinear, _LORA_FORWARD) or _output_hooks(attn, o):
        return None
    w = o.base_layer.weight
    return w if _sole_holder(layer, w) else None


def unused_qkv_bases(layer: nn.Module) -> list:
    """The base weights of ``layer.self_attn``'s q_proj, k_proj and v_proj whose outputs the recomputation of
    the attention segment provably discards when the attention gets the forward's own q, k, v back
    (``model.SavedAttention`` with inputs): ``self_attn`` runs ``LlamaAttention.forward`` and ``qkv`` (whose
    q, k, v go only through the rotary embedding, which saves cos and sin, never its inputs, into the
    attention), each projection a ``LoRALinear`` running its own forward (``lora_linear`` / ``lora_qkv``
    honour ``output_unused``: no dequantize, base GEMM or adapter term, the saved x and x·Aᵀ as always),
    no forward hook that could read an output, no other module of the layer holding the weight. The others
    (say, a frozen projection without adapter): computed as usual; nothing reads them either."""
    attn = getattr(layer, "self_attn", None)
    if output_unused is None or not _runs_own(attn, LlamaAttention, _ATTENTION_FORWARD):
        return []
    if type(attn).qkv is not _ATTENTION_QKV or "qkv" in vars(attn) or _output_hooks(attn):
        return []
    bases = []
    for name in ("q_proj", "k_proj", "v_proj"):
        m = getattr(attn, name, None)
        if _runs_own(m, LoRALinear, _LORA_FORWARD) and not _output_hooks(m):
            w = m.base_layer.weight
            if _sole_holder(layer, w):
                bases.append(w)
    return bases


def split_layer(forward, args: tuple, kwargs: dict):
    """The layer when its checkpoint with offload may be two segments (see :class:`CheckpointedLayer`), else None.

    Requires ``SPLIT_OFFLOAD_SEGMENTS``, ``forward`` minitrain's ``LlamaDecoderLayer.forward`` bound to an
    instance of exactly that class (not a subclass, the class attribute not patched), no hook of any kind on the
    layer, its ``self_attn`` and its ``mlp`` and neither's forward replaced on the instance (so the two
    segments call the same modules with the same arguments as the layer's forward, nothing between them that
    could see h1 differently), no global module hook of any kind, and the call ``(x, cos, sin, mask)`` with no KV
    cache."""
    if not SPLIT_OFFLOAD_SEGMENTS:
        return None
    layer = _decoder_layer(forward)
    if layer is None or type(layer) is not LlamaDecoderLayer:
        return None
    if len(args) == 4 and args[3] is None and not kwargs:
        pass
    elif len(args) != 3 or kwargs not in ({}, {"cache": None}):
        return None
    mods = (layer, getattr(layer, "self_attn", None), getattr(layer, "mlp", None))
    if any(not isinstance(m, nn.Module) or has_hooks(m) for m in mods) or has_global_hooks():
        return None
    if "forward" in vars(mods[1]) or "forward" in vars(mods[2]):  # (the layer's own is the checkpoint wrapper)
        return None
    return layer


class _Call:
    """One checkpointed call (the "on" path): tells the layer's forward from its recomputation, as a stash
    does on the offload path. The checkpoint keeps it with its arguments."""

    __slots__ = ("used",)

    def __init__(self):
        self.used = False


def _unused(*bases):
    """``output_unused(*bases)``, or nothing when there is no base or the skip is switched off."""
    bases = [b for b in bases if b is not None]
    if not bases or not RECOMPUTE_SKIPS_UNUSED_OUTPUT:
        return nullcontext()
    return output_unused(*bases)


class CheckpointedLayer:
    """Replaces one decoder layer's ``forward``: recompute the layer in backward instead of keeping its
    activations; with ``offload`` (a :class:`HostOffload`) only host copies of the segment inputs are kept.

    The recomputation only has to reproduce what the layer's autograd nodes save; its output is discarded.
    For minitrain's ``LlamaDecoderLayer`` with a LoRA ``down_proj`` (see :func:`unused_output_base`) it runs
    under ``triton_ops.lora.output_unused(down's base weight)``: the down projection returns an uninitialized
    tensor instead of dequantizing its weight and running its GEMM and adapter (on the 8B shape one
    M x 14336 x 4096 GEMM per layer and step). Exact: the saved tensors are computed by the same ops, so the
    gradients are bit-identical (``RECOMPUTE_SKIPS_UNUSED_OUTPUT = False`` turns it off). The first call of
    the checkpointed function is the forward, every later one a recomputation (a stash's or ``_Call``'s
    ``used``); the flag is per thread and reset on every exit, including checkpoint's early-stop exception.

    ``keep_mlp`` (the last ``KEEP_MLP_LAYERS`` layers, offload with the split only; or, with a ``policy``, the
    last ``policy.count(tokens)`` layers at each forward's token count): the MLP half runs without a
    checkpoint, so its tensors (the norm's input, gate(x), up(x) and the normalized x: about 2 * B * T * (2 * C
    + 2 * F) bytes in bf16, 300 MB at 2 x 2048 tokens of the 8B shape) stay on the device from the forward to
    the backward, and its backward recomputes nothing (on that shape, two of the MLP's three GEMMs and their
    dequantizes per layer); h1 is not stashed. Bit-identical either way (the same ops on the same values). On
    inputs long enough for the MLP's token tiles (``_TiledMLP``, above 16,384 tokens by default) the tiles still
    recompute themselves in the backward: keeping buys nothing there.

    Split into two segments (``offload`` only, minitrain's ``LlamaDecoderLayer`` as :func:`split_layer` allows,
    ``SPLIT_OFFLOAD_SEGMENTS``): the layer's forward ``h1 = x + self_attn(input_layernorm(x), cos, sin, mask)``;
    ``out = h1 + mlp(post_attention_layernorm(h1))`` runs as two checkpoints, each with its own stash (x at
    index 2i, h1 at 2i + 1). The MLP half recomputes from the stashed h1 under ``output_unused(down's base)``
    as above, and the attention half, whose output h1 its recomputation now discards, under
    ``output_unused(o_proj's base)`` when :func:`unused_attention_output_base` allows: o_proj's dequantize,
    C x C GEMM and adapter are skipped too. Exact as well: each segment recomputes the same ops on the same
    input values (h1 is the forward's own tensor, copied to host and back), and torch's checkpoint restores
    each segment's RNG state, so dropout masks repeat. Cost: one more 2 * B * T * C-byte stash per layer, in
    pinned host memory, so device memory does not grow. The "on" path keeps one segment (its h1 would stay on
    the device), as do other layer classes, patched or hooked layers and calls with a KV cache.

    With the split, the attention half's forward also hands its causal attention's output, log-sum-exp and
    rotated q, k, v to the offload (``REUSE_ATTENTION_OUTPUT``, ``REUSE_ATTENTION_INPUTS``;
    :meth:`HostOffload.keep_attention`): they travel with x, and the recomputation gets them back through
    ``model.attention_outputs``, so it runs no attention kernel and, under ``output_unused`` of the bases
    :func:`unused_qkv_bases` allows, no q/k/v GEMMs. Exact: the attention node saves the forward's own tensors
    (the same values a recomputation would make), and its backward is the same cuDNN op either way."""

    def __init__(self, layer: nn.Module, offload: HostOffload | None = None, index: int = 0, keep_mlp: bool = False,
                 policy: KeepMLPPolicy | None = None):
        self.layer, self.forward, self.offload, self.index = layer, layer.forward, offload, index
        self.keep_mlp, self.policy = keep_mlp, policy

    def _keeps_mlp(self, x: torch.Tensor) -> bool:
        if self.keep_mlp or self.policy is None:
            return self.keep_mlp
        return self.index >= self.policy.layers - self.policy.count(x.numel() // max(1, x.shape[-1]))

    def _recompute(self, x, *args, **kwargs):
        with _unused(unused_output_base(self.forward)):
            return self.forward(x, *args, **kwargs)

    def _run_on(self, call: _Call, x, *args, **kwargs):
        if call.used:  # recomputation in the backward
            return self._recompute(x, *args, **kwargs)
        call.used = True
        return self.forward(x, *args, **kwargs)

    @staticmethod
    def _take(stash: _Stash) -> torch.Tensor:
        # the forward: the input itself, so autograd links this segment to the one before
        stash.used, x = True, stash.x
        if stash.d2h is None and not stash.kept:  # CPU: only the clone stays
            stash.x = None
        return x

    def _run(self, stash: _Stash, *args, **kwargs):
        if stash.used:  # recomputation in the backward
            return self._recompute(self.offload.fetch(stash), *args, **kwargs)
        return self.forward(self._take(stash), *args, **kwargs)

    def _run_attention(self, stash: _Stash, cos, sin, mask):
        """Segment 1 of a split layer: x -> h1 (the first line of ``LlamaDecoderLayer.forward``)."""
        layer = self.layer
        if stash.used:  # recomputation: h1 is discarded, so o_proj's output is never read
            x = self.offload.fetch(stash)
            saved = self.offload.saved_attention(stash)
            skip = [unused_attention_output_base(layer)]
            if saved is not None and saved.q is not None:  # the attention gets its q, k, v back as well
                skip += unused_qkv_bases(layer)
            with _unused(*skip), attention_outputs(saved=saved, active=stash.attn_fn):
                return x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, None)
        x = self._take(stash)  # (a masked attention keeps nothing: model.attention runs SDPA for it)
        keep = attention_outputs(keep=lambda saved: self.offload.keep_attention(stash, saved),
                                 active=REUSE_ATTENTION_OUTPUT)
        with keep:
            return x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, None)

    def _run_mlp(self, stash: _Stash):
        """Segment 2 of a split layer: h1 -> the layer output (the second line of ``LlamaDecoderLayer.forward``)."""
        layer = self.layer
        if stash.used:  # recomputation: the output is discarded, so down's output is never read
            h = self.offload.fetch(stash)
            with _unused(unused_output_base(self.forward)):
                return h + layer.mlp(layer.post_attention_layernorm(h))
        h = self._take(stash)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def __call__(self, x, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        if not torch.is_grad_enabled():
            return self.forward(x, *args, **kwargs)
        if self.offload is None:
            return checkpoint(self._run_on, _Call(), x, *args, use_reentrant=False, **kwargs)
        # the checkpoint keeps its arguments for the recomputation: pass the stash, not the device tensor
        i = 2 * self.index
        if split_layer(self.forward, args, kwargs) is not None:
            cos, sin, mask = args[:3]
            h1 = checkpoint(self._run_attention, self.offload.stash(i, x), cos, sin, mask, use_reentrant=False)
            if self._keeps_mlp(h1):  # autograd keeps the MLP half's tensors on the device: nothing to recompute
                layer = self.layer
                return h1 + layer.mlp(layer.post_attention_layernorm(h1))
            return checkpoint(self._run_mlp, self.offload.stash(i + 1, h1, release=False), use_reentrant=False)
        return checkpoint(self._run, self.offload.stash(i, x), *args, use_reentrant=False, **kwargs)


def decoder_layers(model: nn.Module):
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise TrainingError(f"gradient checkpointing: {type(model).__name__} has no model.layers")
    return list(layers)


def set_gradient_checkpointing(model: nn.Module, mode: str, keep_mlp_layers: int | str | None = None,
                               offload_embeddings: bool | None = None, max_memory_gib: float | None = None,
                               compute_dtype: torch.dtype | None = None) -> KeepMLPPolicy | None:
    """mode "off" | "on" | "offload" (see :class:`CheckpointedLayer`). Checkpointed minitrain MLPs also run in
    token tiles on long inputs (``MINITRAIN_MLP_TILE`` tokens per tile, default 4096, above four tiles' worth;
    see ``minitrain.model._TiledMLP``): the same GEMMs as the checkpointed MLP, its working set for one tile.
    ``keep_mlp_layers`` (default ``KEEP_MLP_LAYERS``): with "offload", the last that many layers keep their MLP
    half's activations on the device instead of recomputing them (device memory for time). "auto": as many as
    fit within ``max_memory_gib`` (allocated GiB; default: most of the card), decided per input size by the
    returned :class:`KeepMLPPolicy` once steps run with none kept have calibrated it (the Trainer measures its
    first two; ``compute_dtype``: autocast's dtype, for the activations' size). "auto" keeps none and returns None
    with another mode or another model than minitrain's Llama; uncalibrated (e.g. on the CPU) it keeps none.
    ``offload_embeddings`` (default ``OFFLOAD_EMBEDDINGS``, else MINITRAIN_OFFLOAD_EMBEDDINGS): with "offload",
    a frozen, untied input embedding moves to pinned host memory (a warning where it cannot)."""
    import warnings

    keep = keep_mlp_layers if keep_mlp_layers is not None else (
        KEEP_MLP_LAYERS if KEEP_MLP_LAYERS is not None else keep_mlp_layers_default())
    auto = is_auto(keep)
    if auto:
        keep = 0
    elif not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ValueError(f"keep_mlp_layers must be a whole number >= 0 or 'auto', got {keep!r}")
    if max_memory_gib is not None and not (isinstance(max_memory_gib, (int, float)) and
                                           math.isfinite(max_memory_gib) and max_memory_gib > 0):
        raise ValueError(f"max_memory_gib must be a finite number > 0 (GiB), got {max_memory_gib!r}")
    if keep and mode not in ("offload", "off"):
        warnings.warn(f"keep_mlp_layers={keep} applies to gradient_checkpointing='offload' only; with {mode!r} "
                      "every layer is recomputed", stacklevel=2)
    offload = HostOffload() if mode == "offload" else None
    emb = offload_embeddings if offload_embeddings is not None else _offload_embeddings_default()
    if offload is not None and emb:
        try:
            offload_input_embeddings(model)
        except (TypeError, ValueError) as e:  # a tied, trainable, hooked or CPU embedding stays where it is
            warnings.warn(f"offload_embeddings: the input embedding stays on the device ({e})", stacklevel=2)
    tile = mlp_tile_default() if mode != "off" else 0
    layers = decoder_layers(model)
    if offload is not None:
        offload.segments = 2 * len(layers)
        # the h1 stashes of kept MLP halves never happen: not charged to the host budget ahead of time
        offload.skipped = {2 * i + 1 for i in range(max(0, len(layers) - keep), len(layers))}
    for layer in layers:
        if isinstance(getattr(layer, "mlp", None), LlamaMLP):
            layer.mlp.tile_tokens = tile
            # FSDP2 (distributed.shard_model): DTensors here, but plain unsharded tensors inside the forward
            layer.mlp.tile_sharded = any(type(p).__name__ == "DTensor" for p in layer.parameters())
    policy = KeepMLPPolicy.for_model(model, max_memory_gib, compute_dtype) if auto and offload is not None else None
    for i, layer in enumerate(layers):
        if isinstance(layer.__dict__.get("forward"), CheckpointedLayer):
            del layer.forward  # back to the class's forward
        if mode != "off":
            kept = offload is not None and i >= len(layers) - keep
            layer.forward = CheckpointedLayer(layer, offload, i, keep_mlp=kept, policy=policy)
    return policy


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule, diagnostics, progress
# ---------------------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total`` (transformers' schedules)."""
    warm = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.learning_rate * step / max(1, warm)
    progress = (step - warm) / max(1, total - warm)
    if cfg.lr_scheduler_type == "linear":
        return cfg.learning_rate * max(0.0, 1.0 - progress)
    if cfg.lr_scheduler_type == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate


def diagnose(losses: list[float], evals: list[tuple[int, float]], steps: list[int], done: bool,
             expect_eval: bool = False) -> list[tuple[str, str]]:
    """(kind, one plain sentence) for what the curves show: overfitting, memorization, underfitting.

    A training loss near 0 counts as memorization unless held-out loss says otherwise: with an eval set
    (``expect_eval``), only when the latest eval loss is far above it (a short answer, e.g. a label, can be
    learned to near-0 loss honestly)."""
    out = []
    w = max(1, min(10, len(losses) // 4))
    if len(evals) >= 2 and len(losses) >= 2 * w:
        (s0, e0), (s1, e1) = evals[-2], evals[-1]
        before = [l for s, l in zip(steps, losses) if s <= s0][-w:]
        after = [l for s, l in zip(steps, losses) if s0 < s <= s1][-w:]
        if before and after and e1 > e0 * 1.01 and np.mean(after) < np.mean(before):
            out.append(("overfitting", f"Eval loss rose from {e0:.3f} to {e1:.3f} while training loss fell: the model "
                        "is overfitting; lower the learning rate, train fewer epochs or raise lora_dropout."))
    recent = float(np.mean(losses[-5:])) if losses else float("inf")
    gap = (evals[-1][1] > max(0.3, 5 * recent)) if evals else not expect_eval
    if len(losses) >= 5 and recent < 0.05 and gap:
        out.append(("memorization", f"Training loss is near 0 ({np.mean(losses[-5:]):.4f}): the model is memorizing "
                    "the training data; lower the learning rate, train fewer epochs or add more data."))
    if done and len(losses) >= 20:
        first, last = float(np.mean(losses[:w])), float(np.mean(losses[-w:]))
        if first > 0 and abs(first - last) / first < 0.02:
            out.append(("underfitting", f"Training loss stayed flat ({first:.3f} -> {last:.3f}): the model is not "
                        "learning; raise the learning rate, train more epochs or use more relevant data."))
    return out


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """One status line on stderr: redrawn in place on a terminal, a line per log otherwise."""

    def __init__(self, total: int, enabled: bool, main: bool = True):
        # main: this process prints at all (False on data-parallel ranks other than 0)
        self.total, self.enabled, self.main, self.tty = total, enabled and main, main, sys.stderr.isatty()
        self.t0, self.start_step = time.perf_counter(), None

    def update(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step, self.t0 = step - 1, time.perf_counter() - m.get("step_time", 0.0)
        rate = (step - self.start_step) / max(1e-9, time.perf_counter() - self.t0)
        line = (f"step {step}/{self.total} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                f"{m['tokens_per_s']:.0f} tok/s | peak {m['peak_mem_mib']:.0f} MiB | "
                f"ETA {_fmt_time((self.total - step) / max(rate, 1e-9))}")
        sys.stderr.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        if not self.main:
            return
        if self.tty and self.enabled:
            sys.stderr.write("\n")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------
class Trainer:
    """Train the LoRA adapters of ``model`` (see :func:`minitrain.add_lora`) on ``dataset``.

    Args:
        model: a minitrain (or transformers) Llama with LoRA layers.
        tokenizer: its tokenizer (for the pad id of example lists; may be None).
        dataset: a ``minitrain.data.Dataset`` (its eval split is used for eval loss), or a list of
            ``{"input_ids", "labels"?}`` examples.
        config: a :class:`TrainConfig`.
        eval_dataset: held-out examples (a list) when ``dataset`` has no eval split.
        callbacks: callables ``cb(trainer, step, metrics)`` run after every optimizer step.
    """

    def __init__(self, model, tokenizer, dataset, config: TrainConfig | None = None, eval_dataset=None,
                 callbacks=()):
        self.model, self.tokenizer, self.cfg = model, tokenizer, config or TrainConfig()
        self.params = [p for _, p in lora_parameters(model)]
        if not self.params:
            raise TrainingError("the model has no LoRA adapters to train: call minitrain.add_lora(model) first")
        self.device = self.params[0].device
        self.dist = dist_.current()  # None in a single process
        self.fsdp = dist_.is_sharded(model)
        self.rank, self.world = (self.dist.rank, self.dist.world_size) if self.dist else (0, 1)
        self.main = self.rank == 0
        if self.dist is not None and not self.fsdp:
            dist_.broadcast_(self.params)  # the same starting adapter on every rank
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", 0) if pad is None else pad
        cfg = self.cfg
        self.pad_id = pad or 0
        self.batches = make_batches(dataset, "train", cfg.per_device_train_batch_size, cfg.packing, cfg.seed,
                                    self.pad_id)
        self.eval_batches = make_batches(eval_dataset if eval_dataset is not None else dataset, "eval",
                                         cfg.per_device_eval_batch_size, False, cfg.seed, self.pad_id)
        if eval_dataset is None and not hasattr(dataset, "batches"):
            self.eval_batches = None
        self.out = Path(cfg.output_dir)
        self.callbacks = list(callbacks)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        if cfg.optim == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                         eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                         fused=self.device.type == "cuda" and not self.fsdp)
        per_epoch = math.ceil(len(self.batches) / (cfg.gradient_accumulation_steps * self.world))
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * per_epoch))
        self.step, self.history = 0, {"step": [], "loss": [], "eval": []}
        self.warned: set[str] = set()
        self.notes: list[tuple[str, str]] = []  # (kind, sentence) said on the progress line at the next log
        self._iter = None
        gc = cfg.gradient_checkpointing
        self.gc_mode = gc if gc != "auto" else auto_checkpointing(self.device, cfg.cuda_graphs)
        self.graphs_off_because = self._graph_blockers()
        self._graphs: dict[tuple, object] = {}  # (B, T, packed) -> cuda_graphs.GraphedLoss
        self._graph_pool = None
        self.graphs_captured = 0  # after train(): how many batch shapes ran from a CUDA graph
        self.keep_policy = None  # keep_mlp_layers="auto" (set_gradient_checkpointing's KeepMLPPolicy)
        self._keep_auto_off = False  # after a capture ran out of memory: "auto" keeps none
        # the peak-memory statistics before the calibrating steps reset them (bytes; kept across train() calls):
        # the peaks reported are the larger of these and torch's (see peak_memory())
        self._prior_peak = self._prior_reserved = 0

    # -- CUDA graphs -----------------------------------------------------------------------------------------
    def _graph_blockers(self) -> list[str]:
        """Why forward+backward run eagerly instead of from CUDA graphs ([] when graphs are used)."""
        cfg = self.cfg
        if cfg.cuda_graphs == "off":
            return ["cuda_graphs='off'"]
        from .cuda_graphs import CHECKPOINT_IN_GRAPHS, CHECKPOINT_TOO_OLD, graph_blockers

        why = graph_blockers(self.model)
        if self.gc_mode != "off" and not CHECKPOINT_IN_GRAPHS:
            why.append(CHECKPOINT_TOO_OLD)
        if self.amp_dtype == torch.float16 and not isinstance(self._loss_scale(), torch.Tensor):
            why.append("fp16 loss scaling: this torch's GradScaler keeps no scale tensor to replay")
        if self.fsdp:
            why.append("FSDP2 runs eagerly")
        if not cfg.fused_cross_entropy:
            why.append("fused_cross_entropy is off")
        if why and cfg.cuda_graphs == "on":
            raise TrainingError("cuda_graphs='on' is not possible: " + "; ".join(why))
        return why

    def _graph_for(self, batch: dict):
        """The GraphedLoss for this batch's shape (created on first sight), or None to run eagerly (also while
        keep_mlp_layers="auto" waits for its calibrating step: a graph would keep what its capture decided)."""
        if self.graphs_off_because or self._keep_pending():
            return None
        packed = not is_padded(batch) and batch.get("position_ids") is not None
        key = (*batch["input_ids"].shape, packed)
        g = self._graphs.get(key)
        if g is None and len(self._graphs) < MAX_GRAPHS:
            from .cuda_graphs import GraphedLoss

            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # the graphs share one memory pool
            # the first graph warms up twice (compilation, lazily built state, autotuning); later shapes once:
            # only shape-specific work (kernel specializations, cuBLAS heuristics) is left for them
            warmup = 1 if any(x.graph is not None for x in self._graphs.values()) else 2
            if self.keep_policy is not None:
                self.keep_policy.graphs_only = True  # eager forwards from now on run beside the graphs' pool
                warmup = 1  # the two measured steps did the first-use work already
            g = self._graphs[key] = GraphedLoss(self.model, key[0], key[1], packed=packed, amp_dtype=self.amp_dtype,
                                                pool=self._graph_pool, warmup=warmup, loss_scale=self._loss_scale())
        return g

    def _loss_scale(self):
        """The GradScaler's scale tensor (created now if needed) when fp16 scaling is on, else None. Graphs multiply
        the loss by it on the device at every replay; the scaler updates it in place, so replays follow it."""
        if not self.scaler.is_enabled():
            return None
        if getattr(self.scaler, "_scale", None) is None:
            self.scaler.scale(torch.zeros((), device=self.device))  # the scaler creates its scale lazily
        return getattr(self.scaler, "_scale", None)

    def _replay(self, graph, batch: dict, total_items):
        """The graph's loss for this batch, or None when capturing it ran out of GPU memory: then graphs are off for
        the rest of the run (all of them dropped: their shared pool is freed) and the caller runs the batch eagerly
        (the failed capture trained nothing). Said once on the progress line and in metrics.jsonl."""
        from .cuda_graphs import GraphOutOfMemory

        try:
            return graph(batch, total_items)
        except GraphOutOfMemory as e:
            keeping = self.keep_policy is not None and self.keep_policy.decide(batch["input_ids"].numel()) > 0
            self._graphs.clear()
            self._graph_pool = None
            if keeping:  # the kept MLP activations are the likeliest reason: keep none, capture again later
                self._keep_auto_off = True
                self.notes.append(("keep_mlp_layers_off", f"{e}; keep_mlp_layers='auto' keeps none from now on "
                                   "(CUDA graphs are captured again without kept layers)"))
            else:
                self.graphs_off_because = [str(e)]
                self.notes.append(("cuda_graphs_off", f"{e}; continuing without CUDA graphs (eagerly, slower)"))
            # fresh checkpointing wrappers: "offload" keeps stashes and events of the aborted capture otherwise
            self._set_checkpointing()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            return None

    def _graph_shape(self, batch: dict) -> dict:
        """A right-padded batch padded further to ``graph_length`` when graphs are on (a few shapes, a few graphs);
        anything else unchanged."""
        if self.graphs_off_because or not is_padded(batch):
            return batch
        limit = getattr(getattr(self.model, "args", None), "max_position_embeddings", None)
        return pad_batch(batch, graph_length(batch["input_ids"].shape[1], limit), self.pad_id)

    def _amp_dtype(self):
        cfg = self.cfg
        if cfg.fp16:
            return torch.float16
        if cfg.bf16 or (cfg.bf16 is None and self.device.type == "cuda"):
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return torch.float16  # GPUs without bf16: fp16 with loss scaling
            return torch.bfloat16
        return None

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- the loop ------------------------------------------------------------------------------------------
    def _set_checkpointing(self) -> None:
        cfg = self.cfg
        keep = cfg.keep_mlp_layers if cfg.keep_mlp_layers is not None else keep_mlp_layers_default(unset="auto")
        if is_auto(keep) and (self.dist is not None or self._keep_auto_off or self.device.type != "cuda"):
            keep = 0  # ranks would decide apart (their collectives must match); or a capture ran out of memory
        self.keep_policy = set_gradient_checkpointing(self.model, self.gc_mode, keep, cfg.offload_embeddings,
                                                      cfg.max_memory_gib, self.amp_dtype)
        if self.keep_policy is not None:
            self.keep_policy.max_tokens = self._longest_micro_tokens()

    def _longest_micro_tokens(self) -> int | None:
        """Tokens of the longest batch the run can make, training (padded to its graph length) or eval (both run
        beside the CUDA graphs' pool): the batch size x the dataset's max_seq_length or the longest example; None
        where not known."""
        cfg = self.cfg
        limit = getattr(getattr(self.model, "args", None), "max_position_embeddings", None)
        out = []
        for b, size in ((self.batches, cfg.per_device_train_batch_size),
                        (self.eval_batches, cfg.per_device_eval_batch_size)):
            longest = getattr(getattr(b, "ds", None), "max_seq_length", None)
            examples = getattr(b, "examples", None)
            if longest is None and examples is not None:
                lengths = getattr(b, "_lengths", None)  # ExampleBatches reads them for its first shuffled plan
                longest = int(max(lengths)) if lengths is not None and len(lengths) else \
                    max((len(e["input_ids"]) for e in examples), default=None)
            if longest:
                out.append(size * max(longest, graph_length(longest, limit)))
        return max(out) if out else None

    def _calibrate_keep(self, mem: StepMemory, host: list[dict], trained: int, grad_norm: float,
                        progress: "Progress") -> None:
        """After a measured step (keep_mlp_layers="auto"): keep the peaks it reset, and count the step towards the
        calibration when it trained and updated (an fp16 step the GradScaler skipped has no optimizer state yet)."""
        self._prior_peak = max(self._prior_peak, mem.prior_peak or 0)
        self._prior_reserved = max(self._prior_reserved, mem.prior_reserved or 0)
        if not trained or not math.isfinite(grad_norm):
            return
        tokens = max(b["input_ids"].numel() for b in host)
        self.keep_policy.calibrate(mem, tokens)
        if self.keep_policy.calibrated:
            progress.say(self.keep_policy.describe(tokens))

    def peak_memory(self) -> tuple[int, int]:
        """(allocated, reserved) peak device bytes of this process, including what the calibrating steps of
        keep_mlp_layers="auto" reset (torch.cuda.max_memory_allocated alone starts at the last of them)."""
        if self.device.type != "cuda":
            return 0, 0
        return (max(torch.cuda.max_memory_allocated(self.device), self._prior_peak),
                max(torch.cuda.max_memory_reserved(self.device), self._prior_reserved))

    def _keep_pending(self) -> bool:
        """keep_mlp_layers="auto" still to be calibrated: the next step runs eagerly and is measured (two steps)."""
        return self.keep_policy is not None and not self.keep_policy.calibrated

    def train(self) -> dict:
        """Run to ``total_steps`` (resuming when configured); returns the last logged metrics."""
        cfg = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + self.rank)  # ranks draw different dropout masks
        self._maybe_resume()
        self._set_checkpointing()
        self.model.train()
        progress, metrics = Progress(self.total_steps, cfg.progress, self.main), {}
        if self.device.type == "cuda":
            why = self.graphs_off_because
            on = "on (forward + backward replayed per batch shape" + (
                ")" if cfg.packing else "; padded batches run at one of a few lengths: 64, 80, 96, 112, 128, "
                "160, ... tokens, up to 25% padding added)")
            progress.say("CUDA graphs: " + (on if not why else "off: " + "; ".join(why)))
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                data_state, good_rng = self.batches.state_dict(), rng_state()
                host = [self._graph_shape(b) for b in self._next_micro_batches()]
                counts = [n_items(b) for b in host]  # on the host before the copy: no device sync per batch
                micro = [self._to_device(b) for b in host]
                lr = lr_at(self.step, self.total_steps, cfg)
                mem = StepMemory(self.device) if self._keep_pending() else nullcontext()
                with mem:
                    loss, trained = self._forward_backward(micro, counts, data_state, good_rng)
                    grad_norm = self._optimizer_step(lr, trained, data_state, good_rng)
                if isinstance(mem, StepMemory):
                    self._calibrate_keep(mem, host, trained, grad_norm, progress)
                self.step += 1
                metrics = self._metrics(loss, lr, grad_norm, host, counts, time.perf_counter() - t0)
                self._log(metrics, progress)
                if self.eval_batches is not None and cfg.eval_steps > 0 and self.step % cfg.eval_steps == 0:
                    self._evaluate(progress)
                if cfg.save_steps > 0 and self.step % cfg.save_steps == 0:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb(self, self.step, metrics)
            if self.eval_batches is not None and (cfg.eval_steps <= 0 or self.step % cfg.eval_steps):
                self._evaluate(progress)
            self._advise(progress, done=True)
        finally:
            self.graphs_captured = sum(g.graph is not None for g in self._graphs.values())
            self._graphs.clear()  # captured for this run's model setup; a later train() captures anew
            set_gradient_checkpointing(self.model, "off")
            self.model.eval()
        self._save_adapter(self.out / "adapter")
        if self.main:
            write_loss_curve(self.out / "loss_curve.png", self.history)
        dist_.barrier(self.dist)  # the files exist when any rank returns
        return metrics

    def _save_adapter(self, directory: Path) -> None:
        """Rank 0 writes the whole adapter (gathered first when FSDP shards it; every rank must call this)."""
        with dist_.full_adapter(self.model) if self.fsdp else nullcontext():
            if self.main:
                save_adapter(self.model, directory)

    def _next_micro_batches(self) -> list[dict]:
        """This rank's G micro-batches of the step: positions rank, rank+N, ... of the next G*N of the global
        stream (all of them in a single process); the other ranks' entries are skipped without collating."""
        out, j = [], 0
        while j < self.cfg.gradient_accumulation_steps * self.world:
            if self._iter is None:
                self._iter = self.batches.raw()
            b = next(self._iter, None)
            if b is None:
                self._iter = None  # the next epoch
                continue
            if j % self.world == self.rank:
                out.append(self.batches.collate(b))
            j += 1
        return out

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _forward_backward(self, micro: list[dict], counts: list[int], data_state: dict,
                          good_rng: dict) -> tuple[float, int]:
        """Backward of sum(token losses) / N over all micro-batches of the step (of all ranks), N the trained
        tokens (``counts`` per micro-batch on this rank); returns (that loss, N)."""
        if self.dist is not None:
            return self._forward_backward_distributed(micro, counts, data_state, good_rng)
        total_items = sum(counts)
        step_loss = 0.0
        for i, batch in enumerate(micro):
            if counts[i] == 0:
                continue
            graph = self._graph_for(batch)
            if graph is not None:  # forward and backward replayed; the update has not happened yet
                loss = self._replay(graph, batch, total_items)
                graph = None if loss is None else graph
            if graph is None:
                with self.autocast():
                    loss = token_loss_sum(self.model, batch, self.cfg.fused_cross_entropy) / total_items
            value = loss.item()
            if not math.isfinite(value):  # eager: before the backward reaches the gradients
                self._stop_non_finite(value, i, data_state, good_rng)
            if graph is None:
                self.scaler.scale(loss).backward()
            step_loss += value
        return step_loss, total_items

    def _forward_backward_distributed(self, micro: list[dict], counts: list[int], data_state: dict,
                                      good_rng: dict) -> tuple[float, int]:
        """The same over ranks: N counted over all ranks first, gradients summed over ranks after. Every rank runs
        every micro-batch (FSDP2's collectives need the same number of forwards everywhere), and a non-finite loss
        is acted on after the loop, by all ranks together."""
        total_items = int(dist_.reduce_values([sum(counts)], self.device)[0])
        step_loss, bad = 0.0, None
        for i, batch in enumerate(micro):
            if self.fsdp:
                dist_.set_gradient_sync(self.model, i == len(micro) - 1)
            elif counts[i] == 0:
                continue
            graph = self._graph_for(batch) if counts[i] else None
            if graph is not None:  # forward and backward replayed (DDP: gradients are summed after the loop)
                loss = self._replay(graph, batch, total_items)
                graph = None if loss is None else graph
                value = None if loss is None else loss.item()
            if graph is None:
                with self.autocast():
                    # FSDP2: a rank without trained tokens runs the loss too (0 over no rows): every rank must
                    # make the same all-gathers, the lm_head's included
                    loss = token_loss_sum(self.model, batch, self.cfg.fused_cross_entropy) / max(1, total_items)
                value = loss.item()
            if bad is None and not math.isfinite(value):
                bad = (i, value)
            if graph is None:
                self.scaler.scale(loss).backward()
            step_loss += value
        step_loss, n_bad = dist_.reduce_values([step_loss, float(bad is not None)], self.device)
        if n_bad:
            r, (i, value) = next((r, b) for r, b in enumerate(dist_.gather_to_main(bad)) if b is not None)
            self._stop_non_finite(value, i, data_state, good_rng, rank=r)
        if not self.fsdp:
            dist_.all_reduce_grads_(self.params)
        return step_loss, total_items

    def _optimizer_step(self, lr: float, trained: int, data_state: dict, good_rng: dict) -> float:
        if trained == 0:  # nothing trained on any rank: no update (AdamW would still apply momentum and decay to
            self.opt.zero_grad(set_to_none=not self._graphs)  # the zero gradients of graphs, DDP or FSDP2)
            return 0.0
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.opt)
        clip = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # DTensor under FSDP2
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16 skips such steps by itself
            self._stop_non_finite(grad_norm, None, data_state, good_rng)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=not self._graphs)  # graphs write into fixed .grad tensors
        return grad_norm

    # -- metrics, eval, advice -------------------------------------------------------------------------
    def _metrics(self, loss, lr, grad_norm, host_micro, counts, dt) -> dict:
        """Step metrics over all ranks: tokens and trained items summed, time and peak memory the slowest/largest
        (counted from the host copies of the micro-batches)."""
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                     for b in host_micro)
        items, peak = sum(counts), max(peak_memory_mib(self.device), self._prior_peak / 2**20)

        if self.dist is not None:
            tokens, items = dist_.reduce_values([tokens, items], self.device)
            dt, peak = dist_.reduce_values([dt, peak], self.device, op="max")
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt,
                "n_items": int(items), "peak_mem_mib": peak, "step_time": dt}

    def _log(self, m: dict, progress: Progress) -> None:
        while self.notes:
            kind, sentence = self.notes.pop(0)
            if not self.main:  # rank 0 prints the progress line; other ranks' warnings go to their stderr
                print(f"rank {self.rank}: warning: {sentence}", file=sys.stderr, flush=True)
            self._warn(progress, kind, sentence, m["step"])
        self.history["step"].append(m["step"])
        self.history["loss"].append(m["loss"])
        if m["step"] % self.cfg.logging_steps == 0 or m["step"] == self.total_steps:
            self._append_metrics(m)
            progress.update(m["step"], m)
        self._advise(progress, done=False)

    def _append_metrics(self, m: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the eval split (dropout off); ranks share the batches (r, r+N, ...)."""
        was = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        ev = self.eval_batches
        ev.load_state_dict({**ev.state_dict(), "epoch": 0, "index": 0})
        entries = list(ev.raw())
        mine = entries[self.rank::self.world]
        rounds = -(-len(entries) // self.world) if self.fsdp else len(mine)
        for k in range(rounds):  # under FSDP2 every rank runs the same number of forwards (extra ones discarded)
            batch = ev.collate(mine[min(k, len(mine) - 1)] if mine else entries[0])
            n = n_items(batch)  # on the host
            batch = self._to_device(batch)
            with self.autocast():
                # nothing to score: under FSDP2 the forward and the loss still run (0 over no rows; the other
                # ranks' all-gathers wait for this rank's)
                loss = token_loss_sum(self.model, batch, self.cfg.fused_cross_entropy).item() \
                    if n or self.fsdp else 0.0
            if k < len(mine):
                total += loss
                count += n
        if self.dist is not None:
            total, count = dist_.reduce_values([total, count], self.device)
        self.model.train(was)
        return total / max(1, count)

    def _evaluate(self, progress: Progress) -> None:
        loss = self.evaluate()
        self.history["eval"].append((self.step, loss))
        self._append_metrics({"step": self.step, "eval_loss": loss})
        progress.say(f"step {self.step}: eval loss {loss:.4f}")
        self._advise(progress, done=False)

    def _advise(self, progress: Progress, done: bool) -> None:
        for kind, sentence in diagnose(self.history["loss"], self.history["eval"], self.history["step"], done,
                                       expect_eval=self.eval_batches is not None):
            if kind not in self.warned:
                self.warned.add(kind)
                self._warn(progress, kind, sentence, self.step)

    def _warn(self, progress: Progress, kind: str, sentence: str, step: int) -> None:
        """One warning: on the progress line and as a metrics.jsonl entry."""
        progress.say(f"warning: {sentence}")
        self._append_metrics({"step": step, "warning": kind, "message": sentence})

    def _stop_non_finite(self, value: float, i: int | None, data_state, good_rng, rank: int | None = None) -> None:
        """Save the state before this step (the adapter is not yet updated) and stop, naming step and batch."""
        self.opt.zero_grad(set_to_none=not self._graphs)  # graphs write into fixed .grad tensors
        path = self.save_checkpoint(data_state=data_state, rng=good_rng)
        G = self.cfg.gradient_accumulation_steps
        where = f" on rank {rank} of {self.world}" if rank is not None else ""
        what = f"loss is {value} at step {self.step + 1}, micro-batch {i + 1} of {G}{where}" if i is not None else \
            f"gradient norm is {value} at step {self.step + 1} (micro-batches 1-{G})"
        raise TrainingError(f"{what} "
                            f"(data position {data_state}); the last good state (after step {self.step}) is saved "
                            f"in {path}. Lower the learning rate or check that batch's data.")

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self, data_state: dict | None = None, rng: dict | None = None) -> Path:
        """Write ``output_dir/checkpoint-<step>`` atomically (temporary directory, then rename).

        With several ranks every rank calls this (the RNG states, and under FSDP2 the adapter and optimizer
        state, are gathered); rank 0 writes. ``rank_rng`` holds every rank's RNG state for an exact resume."""
        final = self.out / f"checkpoint-{self.step}"
        tmp = self.out / f".checkpoint-{self.step}.tmp"
        rng = rng or rng_state()
        ranks_rng = dist_.gather_to_main(rng) if self.dist is not None else [rng]
        opt_state = dist_.full_optimizer_state(self.model, self.opt) if self.fsdp else self.opt.state_dict()
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._save_adapter(tmp / "adapter")
        if self.main:
            atomic_torch_save({"optimizer": opt_state, "scaler": self.scaler.state_dict(), "fsdp": self.fsdp,
                               "torch_rng": rng["torch"], "cuda_rng": rng["cuda"],
                               "rank_rng": ranks_rng if self.world > 1 else []}, tmp / "optimizer.pt")
            state = {"step": self.step, "total_steps": self.total_steps,
                     "data": data_state or self.batches.state_dict(), "world_size": self.world,
                     "python_rng": rng["python"], "numpy_rng": rng["numpy"], "history": self.history,
                     "warned": sorted(self.warned), "config": asdict(self.cfg)}
            atomic_write_text(tmp / "trainer_state.json", json.dumps(state, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        dist_.barrier(self.dist)
        return final

    def _rotate_checkpoints(self) -> None:
        keep = self.cfg.save_total_limit
        if keep <= 0:
            return
        for old in list_checkpoints(self.out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self) -> None:
        where = self.cfg.resume_from_checkpoint
        if not where:
            return
        if where == "latest":
            found = list_checkpoints(self.out) if self.main else []
            path = found[-1] if found else None
            if self.dist is not None:  # rank 0's view of the directory decides
                path = dist_.broadcast_object(path)
            if path is None:  # nothing saved yet: a fresh start, whose metrics replace the killed run's
                self._truncate_metrics(0)
                return
        else:
            path = Path(where)
            if not (path / "trainer_state.json").is_file():
                raise TrainingError(f"resume: {path} is not a checkpoint directory (no trainer_state.json)")
        self.load_checkpoint(path)

    def load_checkpoint(self, path) -> None:
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        if bool(blob.get("fsdp", False)) != self.fsdp:
            raise TrainingError(f"resume: {path} was saved {'with' if blob.get('fsdp') else 'without'} FSDP2 "
                                f"sharding; resume it the same way ({'with' if blob.get('fsdp') else 'without'} --fsdp)")
        with dist_.full_adapter(self.model, writeback=True) if self.fsdp else nullcontext():
            load_adapter(self.model, path / "adapter")
        if self.fsdp:
            dist_.load_full_optimizer_state(self.model, self.opt, blob["optimizer"])
        else:
            self.opt.load_state_dict(blob["optimizer"])
        self.scaler.load_state_dict(blob["scaler"])
        self.batches.load_state_dict(state["data"])
        self._iter = None
        self.step = int(state["step"])
        self.history = {"step": state["history"]["step"], "loss": state["history"]["loss"],
                        "eval": [tuple(e) for e in state["history"]["eval"]]}
        self.warned = set(state.get("warned", ()))
        ranks = blob.get("rank_rng") or []
        if len(ranks) == self.world and self.world > 1:  # the same world size: each rank continues its own RNG
            set_rng_state(ranks[self.rank])
        else:
            set_rng_state({"torch": blob["torch_rng"], "cuda": blob["cuda_rng"], "python": state["python_rng"],
                           "numpy": state["numpy_rng"]})
        self._truncate_metrics(self.step)
        dist_.barrier(self.dist)  # no rank writes before every rank has read the checkpoint

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint by the interrupted run (they are replayed)."""
        f = self.out / "metrics.jsonl"
        if not self.main or not f.exists():
            return
        lines = []
        for line in f.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line torn by the kill (or anything not JSON): dropped, never fatal to a resume
                continue
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                lines.append(line)
        atomic_write_text(f, "".join(l + "\n" for l in lines))


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()
             and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def rng_state() -> dict:
    st = random.getstate()
    np_st = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": [st[0], list(st[1]), st[2]],
            "numpy": [np_st[0], np_st[1].tolist(), int(np_st[2]), int(np_st[3]), float(np_st[4])]}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if torch.cuda.is_available() and st["cuda"]:
        torch.cuda.set_rng_state_all(st["cuda"])
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# ---------------------------------------------------------------------------------------------------------
# The loss-curve image: matplotlib when installed, else a small PNG drawn here (no extra dependency)
# ---------------------------------------------------------------------------------------------------------
_DIGITS = {  # 3x5 bitmaps, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111101110111",
}
TRAIN_COLOR, EVAL_COLOR = (31, 119, 180), (255, 127, 14)


def _text(img: np.ndarray, x: int, y: int, s: str, px: int = 2) -> None:
    for ch in s:
        bits = _DIGITS.get(ch)
        if bits:
            for k, b in enumerate(bits):
                if b == "1":
                    r, c = y + (k // 3) * px, x + (k % 3) * px
                    img[r:r + px, c:c + px] = 0
        x += 4 * px


def _polyline(img: np.ndarray, pts: list[tuple[float, float]], color, width: int = 2) -> None:
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] or pts):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for t in np.linspace(0.0, 1.0, n + 1):
            x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
            img[max(0, y - width // 2):y + width - width // 2, max(0, x - width // 2):x + width - width // 2] = color


def png_bytes(img: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG (8-bit RGB, no filtering)."""
    import struct
    import zlib

    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def write_loss_curve(path, history: dict) -> Path | None:
    """Training loss (blue) and eval loss (orange) against the step, as a PNG at ``path``."""
    steps, losses, evals = history["step"], history["loss"], history["eval"]
    if not steps:
        return None
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, label="train loss")
        if evals:
            ax.plot([s for s, _ in evals], [l for _, l in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        return path
    except ImportError:
        pass
    W, H, L, R, T, B = 640, 400, 60, 20, 20, 40
    img = np.full((H, W, 3), 255, np.uint8)
    ys = list(losses) + [l for _, l in evals]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    x_max = max(max(steps), 1)

    def xy(s, l):
        return L + (s / x_max) * (W - L - R), T + (hi - l) / (hi - lo) * (H - T - B)

    img[T:H - B, L - 1:L + 1] = 0  # y axis
    img[H - B:H - B + 2, L:W - R] = 0  # x axis
    _text(img, 4, T, f"{hi:.2g}")
    _text(img, 4, H - B - 10, f"{lo:.2g}")
    _text(img, L, H - B + 8, "0")
    _text(img, W - R - 4 * 2 * len(str(x_max)), H - B + 8, str(x_max))
    _polyline(img, [xy(s, l) for s, l in zip(steps, losses)], TRAIN_COLOR)
    if evals:
        pts = [xy(s, l) for s, l in evals]
        _polyline(img, pts, EVAL_COLOR)
        for x, y in pts:  # a square marker per evaluation
            img[max(0, int(y) - 3):int(y) + 4, max(0, int(x) - 3):int(x) + 4] = EVAL_COLOR
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png_bytes(img))
    os.replace(tmp, path)
    return path
