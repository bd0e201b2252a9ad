"""A training micro-step (forward + backward of the token-summed loss) replayed from one CUDA graph.

Why: a LoRA step launches thousands of small kernels and runs Python for each (autograd Functions, dispatch,
checkpoint bookkeeping). Measured on an H100 for a Llama-3.1-8B-shaped QLoRA step (4 layers, 2 x 2048 tokens,
checkpointing on): 93.5 ms per step eager while the GPU's own kernel time was about 56 ms; the host, not the
GPU, set the pace. Captured once and replayed, the whole forward and backward costs one launch.

How: ``GraphedLoss(model, batch_size, seq_len)`` owns static input buffers (input ids, labels, optional
position ids, the step's trained-token count). The first calls run eagerly on a side stream (Triton compiles,
cuBLAS picks algorithms, ``quant``'s backend choice is measured), then one call is captured:

    loss = sum over trained positions of -log p(label) / n_total      (the trainer's normalization)
    loss.backward()                                                    (adds into the existing .grad tensors)

Each later call copies the batch into the buffers and replays. Gradients accumulate into the same ``.grad``
tensors the eager loop uses, so gradient accumulation, clipping and the (eager) optimizer step are unchanged;
zero the gradients in place (``zero_grads``), never set them to None, between optimizer steps.

The loss covers every position whose label is not -100 through the fused linear cross-entropy with
``ignore_index`` (no boolean indexing: shapes must not depend on the data inside a graph).

Resuming from a checkpoint replays the same batches, but the first two calls per shape after the resume run
eagerly (warm-up), so a resumed run equals an uninterrupted one within bf16 rounding, not bit for bit.

Limits, checked: CUDA only; a fixed (batch, seq) shape per graph (packed batches have one); no LoRA dropout
(checkpoint recomputation would draw new masks); no host synchronization inside the model's forward (the
model decides document masking from whether ``position_ids`` is given, not from their values, while capturing).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

try:
    from triton_ops.fused_linear_cross_entropy import fused_linear_cross_entropy
except ImportError:  # the plain path below computes the same loss
    fused_linear_cross_entropy = None


# torch.utils.checkpoint reads the CUDA RNG state, which a capture refused before torch 2.10 (pytorch #162505)
CHECKPOINT_IN_GRAPHS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 10)
CHECKPOINT_TOO_OLD = f"gradient checkpointing inside a CUDA graph needs torch >= 2.10 (this is {torch.__version__})"


class GraphError(RuntimeError):
    """The model or the batch cannot be run from a CUDA graph (the message says why)."""


class GraphOutOfMemory(GraphError):
    """A capture ran out of GPU memory. Nothing was trained by it (a capture records, it computes nothing), so the
    caller may run the same batch eagerly."""


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def zero_grads(params) -> None:
    """Zero existing gradients in place (a captured graph keeps writing into these very tensors)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_zero_(grads)


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every GraphedLoss warms up on (one per card). The caching allocator keeps freed blocks
    per stream: a new stream per warm-up left each eager step's memory cached under a stream never used again,
    and a Trainer warming up 12 batch shapes reached 63.6 GiB reserved against 20.8 GiB eagerly (8B QLoRA, H100)."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    if index not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[index] = torch.cuda.Stream(index)
    return _WARMUP_STREAMS[index]


def graph_blockers(model: nn.Module) -> list[str]:
    """Why ``model`` cannot train from a CUDA graph ([] when it can)."""
    why = []
    w = getattr(getattr(model, "lm_head", None), "weight", None)
    if w is None or w.device.type != "cuda":
        why.append("the model is not on a CUDA device")
    drop = [n for n, m in model.named_modules() if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0]
    if drop:
        why.append(f"LoRA dropout is on ({drop[0]} and {len(drop) - 1} more); graphs need dropout 0")
    if not CHECKPOINT_IN_GRAPHS and any(type(m.__dict__.get("forward")).__name__ == "CheckpointedLayer"
                                        for m in model.modules()):
        why.append(CHECKPOINT_TOO_OLD)
    if not hasattr(model, "hidden_states"):
        why.append(f"{type(model).__name__} has no hidden_states() (minitrain's LlamaForCausalLM has)")
    return why


def summed_token_loss(model: nn.Module, input_ids, labels, position_ids, n_total) -> torch.Tensor:
    """sum over positions t with labels[:, t+1] != -100 of -log p(labels[:, t+1]) / n_total, without any
    data-dependent shape (all positions go through the fused CE; ignored ones add nothing)."""
    hidden = model.hidden_states(input_ids, position_ids=position_ids)  # (B, T, C)
    w = model.lm_head.weight
    h = hidden[:, :-1].to(w.dtype)
    y = labels[:, 1:]
    if fused_linear_cross_entropy is not None:
        return fused_linear_cross_entropy(h, w, y, ignore_index=-100, reduction="sum", n_items=n_total)
    logits = torch.nn.functional.linear(h, w).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.reshape(-1), ignore_index=-100,
                                             reduction="sum") / n_total


class GraphedLoss:
    """Forward + backward of one micro-batch of a fixed shape, from a CUDA graph after ``warmup`` eager calls.

    Args:
        model: minitrain LlamaForCausalLM on CUDA with its adapters (and gradient checkpointing, if wanted)
            already set up; the trainable parameters must not change afterwards.
        batch_size, seq_len: the shape every batch must have.
        packed: batches carry ``position_ids`` (documents packed into rows); otherwise positions are 0..T-1.
        amp_dtype: autocast dtype (bf16/fp16) or None; autocast's weight cache is off, as graphs require.
        warmup: eager calls before the capture (at least 1; they train normally).
        pool: a ``torch.cuda.graph_pool_handle()`` shared with other GraphedLoss objects of the same model (their
            replays run one after another, so they can share memory), or None for a private pool.
        loss_scale: fp16 loss scaling: a 0-dim CUDA tensor (a ``torch.amp.GradScaler``'s scale) that the loss is
            multiplied by before the backward, read at every replay, so the scaler may change it in place between
            steps; None for no scaling. The returned loss is unscaled.
    Call ``gl(batch, n_total)`` with a dict of (B, T) ``input_ids``, ``labels`` (-100 = not trained) and, when
    packed, ``position_ids``; returns the loss (0-dim fp32 CUDA tensor, already divided by n_total) after its
    gradients were added into ``.grad``.
    """

    def __init__(self, model: nn.Module, batch_size: int, seq_len: int, packed: bool = False,
                 amp_dtype: torch.dtype | None = torch.bfloat16, warmup: int = 2, pool=None,
                 loss_scale: torch.Tensor | None = None):
        why = graph_blockers(model)
        if why:
            raise GraphError("CUDA graph training is not possible: " + "; ".join(why))
        if warmup < 1:
            raise ValueError(f"GraphedLoss: warmup must be >= 1, got {warmup}")
        self.model, self.shape, self.packed, self.amp_dtype = model, (batch_size, seq_len), packed, amp_dtype
        self.device = model.lm_head.weight.device
        self.params = trainable_parameters(model)
        self.warmup_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = pool
        if loss_scale is not None and (loss_scale.dim() != 0 or loss_scale.device != self.device):
            raise GraphError(f"loss_scale must be a 0-dim tensor on {self.device}, got {tuple(loss_scale.shape)} on "
                             f"{loss_scale.device}")
        self.loss_scale = loss_scale
        dev = self.device
        self.ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=dev)
        self.labels = torch.full((batch_size, seq_len), -100, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch_size, seq_len, dtype=torch.long, device=dev) if packed else None
        self.n = torch.ones((), dtype=torch.float32, device=dev)
        self.loss: torch.Tensor | None = None

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype, cache_enabled=False)

    def _run(self) -> torch.Tensor:
        with self._autocast():
            loss = summed_token_loss(self.model, self.ids, self.labels, self.pos, self.n)
        (loss if self.loss_scale is None else loss * self.loss_scale).backward()
        return loss.detach()

    def _load(self, batch: dict, n_total) -> None:
        ids, labels = batch["input_ids"], batch.get("labels", batch["input_ids"])
        if tuple(ids.shape) != self.shape or tuple(labels.shape) != self.shape:
            raise GraphError(f"CUDA graph captured for batches of shape {self.shape}, got input_ids "
                             f"{tuple(ids.shape)} and labels {tuple(labels.shape)}")
        self.ids.copy_(ids, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        if self.packed:
            pos = batch.get("position_ids")
            if pos is None:
                raise GraphError("packed=True: batches must carry position_ids")
            self.pos.copy_(pos, non_blocking=True)
        if isinstance(n_total, torch.Tensor):
            self.n.copy_(n_total, non_blocking=True)
        else:
            self.n.fill_(float(n_total))

    def __call__(self, batch: dict, n_total) -> torch.Tensor:
        with torch.cuda.device(self.device):  # capture and replay on the model's card, whatever the current one
            return self._call(batch, n_total)

    def _call(self, batch: dict, n_total) -> torch.Tensor:
        self._load(batch, n_total)
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        if self.warmup_left > 0:  # eager, on a side stream as capture wants its warm-up
            self.warmup_left -= 1
            side = warmup_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        for p in self.params:  # backward must add into tensors that outlive the capture
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # blocks the eager warm-up cached would otherwise stay reserved beside the graph's own pool
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=self.pool):  # records, computes nothing
                self.loss = self._run()
        except RuntimeError as e:  # torch.OutOfMemoryError is one; the driver's own OOM may come as a plain one
            self.graph = self.loss = None
            if not _is_oom(e):
                raise
            raise GraphOutOfMemory(f"capturing the CUDA graph for batches of shape {self.shape} ran out of GPU "
                                   f"memory ({str(e).splitlines()[0][:200]})") from e
        self.graph.replay()  # this batch's forward and backward
        return self.loss
