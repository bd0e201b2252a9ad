"""Batches: packed rows with per-document positions, or length-bucketed padded batches; exact resume.

Every batch is a dict of tensors:
  input_ids    (B, T) int64
  labels       (B, T) int64, aligned with input_ids (Hugging Face convention): the loss compares
               logits[:, :-1] with labels[:, 1:]; -100 where nothing is trained (prompts, padding, and the first
               token of every packed document, which must not be predicted from the previous document)
  position_ids (B, T) int64, restarting at 0 at every document of a packed row
  n_items      () int64, the number of trained targets (labels[:, 1:] != -100), to normalize the loss across
               micro-batches of a gradient-accumulation step
packed:     cu_seqlens (S+1,) int32 boundaries of the documents (and of each row's padding tail) in the
            flattened B*T tokens, flash-attention varlen style, and max_seqlen () int32; attention must stay
            inside [cu_seqlens[k], cu_seqlens[k+1]) (see ``packed_attention_mask`` for SDPA)
not packed: attention_mask (B, T) int64, 1 on real tokens (padding on the right)
"""
from __future__ import annotations

import numpy as np
import torch


def pack_rows(order: np.ndarray, lengths: np.ndarray, max_seq_length: int, open_rows: int = 32) -> list[list[int]]:
    """First-fit packing that keeps the given order roughly: each document goes into the oldest of the last
    ``open_rows`` rows that still has room for it, else starts a new row; rows come out in the order they were
    started. Deterministic; fills rows far better than closing a row at the first document that does not fit."""
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens of rows[first_open:]
    first_open = 0
    for i in order.tolist():
        n = int(lengths[i])
        for k, free in enumerate(room):
            if n <= free:
                rows[first_open + k].append(i)
                room[k] = free - n
                break
        else:
            rows.append([i])
            room.append(max_seq_length - n)
            if len(room) > open_rows:
                room.pop(0)
                first_open += 1
    return rows


def bucket_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                   bucket_batches: int = 32) -> list[list[int]]:
    """Padding-light batches: sort windows of ``batch_size * bucket_batches`` examples by length, cut them into
    batches, and shuffle the batch order so long batches are spread over the epoch."""
    batches = []
    window = batch_size * bucket_batches
    for s in range(0, len(order), window):
        chunk = order[s: s + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[j: j + batch_size].tolist() for j in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm]


def _round_up(n: int, m: int | None) -> int:
    return n if not m else -(-n // m) * m


def collate_packed(store, rows: list[list[int]], pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Rows of whole documents → a packed batch (see the module docstring)."""
    lens = [sum(store.length(i) for i in row) for row in rows]
    B, T = len(rows), _round_up(max(lens), pad_to_multiple_of)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    cu, max_len = [0], 0
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            ids, trained = store.get(i)
            n = len(ids)
            input_ids[b, t: t + n] = torch.from_numpy(ids.astype(np.int64))
            lab = np.where(trained, ids, -100).astype(np.int64)
            lab[0] = -100  # the first token of a document is never predicted from the one before it
            labels[b, t: t + n] = torch.from_numpy(lab)
            position_ids[b, t: t + n] = torch.arange(n)
            t += n
            cu.append(b * T + t)
            max_len = max(max_len, n)
        if t < T:  # the padding tail is a segment of its own
            position_ids[b, t:] = torch.arange(T - t)
            cu.append((b + 1) * T)
            max_len = max(max_len, T - t)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "cu_seqlens": torch.tensor(cu, dtype=torch.int32), "max_seqlen": torch.tensor(max_len, dtype=torch.int32),
            "n_items": (labels[:, 1:] != -100).sum()}


def collate_padded(store, batch: list[int], pad_id: int, pad_to_multiple_of: int | None = None,
                   rejected: bool = False) -> dict:
    """Examples → a right-padded batch with an attention mask (see the module docstring). With ``rejected``,
    the preference pairs' rejected sequences come too, under ``rejected_*`` keys."""
    seqs = [store.get(i, rejected=rejected) for i in batch]
    B, T = len(seqs), _round_up(max(len(ids) for ids, _ in seqs), pad_to_multiple_of)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, trained) in enumerate(seqs):
        n = len(ids)
        input_ids[b, :n] = torch.from_numpy(ids.astype(np.int64))
        lab = np.where(trained, ids, -100).astype(np.int64)
        lab[0] = -100
        labels[b, :n] = torch.from_numpy(lab)
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.arange(n)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask,
           "n_items": (labels[:, 1:] != -100).sum()}
    if rejected:
        return {f"rejected_{k}": v for k, v in out.items()}
    return out


def packed_attention_mask(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, 1, T, T) bool mask for SDPA: causal and inside one document of a packed batch (True = attend)."""
    seg = torch.zeros(B * T, dtype=torch.long, device=cu_seqlens.device)
    seg[cu_seqlens[1:-1].long()] = 1
    seg = seg.cumsum(0).view(B, T)  # (B, T) document number of every token
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=cu_seqlens.device).tril()
    return (same & causal)[:, None]


class Batches:
    """An epoch of batches over one split, resumable exactly.

    Iterating yields the batches of the current epoch from the current position, then moves to the next epoch.
    ``state_dict()`` after a batch names the next batch; ``load_state_dict`` on a fresh ``Batches`` over the same
    dataset and settings continues with exactly the batches that would have come.
    """

    def __init__(self, ds, split: str, batch_size: int, packing: bool, shuffle: bool, seed: int,
                 pad_to_multiple_of: int | None, drop_last: bool, rejected: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rejected and packing:
            raise ValueError("preference pairs (rejected=True) are batched without packing; pass packing=False")
        self.ds, self.split, self.batch_size, self.packing = ds, split, batch_size, packing
        self.shuffle, self.seed, self.pad_to_multiple_of, self.drop_last = shuffle, seed, pad_to_multiple_of, drop_last
        self.rejected = rejected
        self.epoch, self.index = 0, 0
        self._plan_epoch, self._plan = None, None

    def _fingerprint(self) -> list:
        return [self.split, self.batch_size, self.packing, self.shuffle, self.seed, self.ds.max_seq_length,
                len(self.ds), int(self.ds.store.offsets[-1])]

    def plan(self, epoch: int) -> list[list]:
        """The batches of ``epoch``: lists of packed rows (lists of example indices) or of example indices."""
        if self._plan_epoch == epoch:
            return self._plan
        order = self.ds.epoch_order(self.split, epoch, shuffle=self.shuffle, seed=self.seed)
        lengths = self.ds.store.lengths
        if self.packing:
            rows = pack_rows(order, lengths, self.ds.max_seq_length)
            batches = [rows[j: j + self.batch_size] for j in range(0, len(rows), self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, epoch, 1])
            batches = bucket_batches(order, lengths, self.batch_size, rng) if self.shuffle else \
                [order[j: j + self.batch_size].tolist() for j in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
            if not batches:  # every epoch would be empty: a training loop would wait forever for a batch
                what = "packed rows" if self.packing else "examples"
                raise ValueError(f"drop_last=True leaves no batch: the {self.split} split gives only "
                                 f"{len(order) if not self.packing else len(rows)} {what} per epoch, fewer than "
                                 f"batch_size={self.batch_size}; lower batch_size or pass drop_last=False")
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def collate(self, batch: list) -> dict:
        pad = self.ds.pad_id
        if self.packing:
            return collate_packed(self.ds.store, batch, pad, self.pad_to_multiple_of)
        out = collate_padded(self.ds.store, batch, pad, self.pad_to_multiple_of)
        if self.rejected:
            out.update(collate_padded(self.ds.store, batch, pad, self.pad_to_multiple_of, rejected=True))
        return out

    def raw(self):
        """Like iterating, but yields the plan entries (packed rows or example indices) without collating them:
        a data-parallel rank walks the global stream this way and collates only its own share."""
        batches = self.plan(self.epoch)
        while self.index < len(batches):
            b = batches[self.index]
            self.index += 1
            yield b
        self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self):
        for b in self.raw():
            yield self.collate(b)

    def state_dict(self) -> dict:
        epoch, index = self.epoch, self.index
        if index >= len(self.plan(epoch)):  # after the epoch's last batch: the next one is the next epoch's first
            epoch, index = epoch + 1, 0
        return {"epoch": epoch, "index": index, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self._fingerprint():
            raise ValueError(f"data state does not match this dataset/loader: saved {state.get('fingerprint')}, "
                             f"here {self._fingerprint()} (split, batch_size, packing, shuffle, seed, max_seq_length, "
                             f"examples, tokens)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
