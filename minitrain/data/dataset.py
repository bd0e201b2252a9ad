"""``load_dataset``: files → tokenized examples (streamed, in batches) → a ``Dataset`` with splits, mixing and
batches. See the package docstring for the whole picture."""
from __future__ import annotations

import gc
import warnings
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .batching import Batches
from .encode import Encoder, split_by
from .formats import FORMATS, detect_format, normalize
from .sources import DataError, ReadStats, read_records

OVERFLOW = ("truncate", "drop", "error", "split")


@dataclass
class SourceInfo:
    """One source (a file or a directory) and what became of its records."""

    name: str
    weight: float | None = None
    formats: Counter = field(default_factory=Counter)
    read: int = 0
    skipped: int = 0
    skip_examples: list = field(default_factory=list)
    refused: int = 0
    truncated: int = 0
    dropped: int = 0
    split: int = 0
    examples: int = 0
    tokens: int = 0
    trained: int = 0


class TokenStore:
    """Token ids and trained masks of every example in flat arrays (int32 ids, bool mask, int64 offsets)."""

    def __init__(self):
        self._ids, self._mask, self._lens = [], [], []
        self.ids = self.mask = self.offsets = self.lengths = None

    def add_batch(self, seqs: list[tuple[list[int] | np.ndarray, np.ndarray]]) -> None:
        if not seqs:
            return
        lens = np.fromiter((len(m) for _, m in seqs), np.int64, len(seqs))
        self.add_flat(np.concatenate([np.asarray(i, dtype=np.int32) for i, _ in seqs]),
                      np.concatenate([m for _, m in seqs]) if lens.sum() else np.zeros(0, bool), lens)

    def add_flat(self, ids: np.ndarray, mask: np.ndarray, lens: np.ndarray) -> None:
        """Sequences given concatenated (int32 ids, bool mask) with their lengths."""
        self._ids.append(ids.astype(np.int32, copy=False))
        self._mask.append(mask.astype(bool, copy=False))
        self._lens.append(np.asarray(lens, dtype=np.int64))

    def finalize(self) -> "TokenStore":
        self.ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int32)
        self.mask = np.concatenate(self._mask) if self._mask else np.zeros(0, bool)
        self.lengths = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._ids, self._mask, self._lens = [], [], []
        return self

    def length(self, i: int) -> int:
        return int(self.lengths[i])

    def get(self, i: int, rejected: bool = False) -> tuple[np.ndarray, np.ndarray]:
        store = self.rejected if rejected else self
        a, b = store.offsets[i], store.offsets[i + 1]
        return store.ids[a:b], store.mask[a:b]


def _fit(ids, mask, max_len: int, policy: str, loc: str, info: SourceInfo) -> list:
    """Apply the overflow policy to one sequence; returns the pieces to keep (0, 1 or several)."""
    n = len(mask)
    if n <= max_len:
        return [(ids, mask)]
    if policy == "error":
        raise DataError(f"{loc}: {n} tokens, longer than max_seq_length={max_len}; raise max_seq_length or pass "
                        f"overflow='truncate' or 'drop'")
    if policy == "drop":
        info.dropped += 1
        return []
    if policy == "split":
        info.split += 1
        return [(ids[s: s + max_len], mask[s: s + max_len]) for s in range(0, n, max_len)]
    info.truncated += 1
    return [(ids[:max_len], mask[:max_len])]


def _sources(data) -> list[dict]:
    items = data if isinstance(data, (list, tuple)) and not (
        len(data) == 2 and isinstance(data[1], (int, float)) and not isinstance(data[0], (int, float))) else [data]
    out = []
    for it in items:
        if isinstance(it, dict):
            if "path" not in it:
                raise DataError(f"a dataset source given as a dict needs a 'path' key, got keys {sorted(it)}")
            out.append(dict(it))
        elif isinstance(it, (tuple, list)):
            if len(it) != 2 or not isinstance(it[1], (int, float)):
                raise DataError(f"a weighted source is (path, weight), got {it!r}")
            out.append({"path": it[0], "weight": float(it[1])})
        else:
            out.append({"path": it})
    weighted = [s.get("weight") is not None for s in out]
    if any(weighted) and not all(weighted):
        raise DataError("give a weight to every source or to none (none: each source in its natural share)")
    for s in out:
        if s.get("weight") is not None and not s["weight"] > 0:
            raise DataError(f"{s['path']}: weight must be > 0, got {s['weight']}")
    return out


def load_dataset(data, tokenizer, *, max_seq_length: int = 2048, format: str | None = None,
                 train_on_responses_only: bool = True, overflow: str | None = None,
                 eval_split: float | int = 0.0, seed: int = 3407, skip_bad_lines: bool = False,
                 txt_split: str = "block", system_prompt: str | None = None, field_map: dict | None = None,
                 batch_records: int = 2048, use_batch_api: bool = True, num_proc: int = 1,
                 verbose: bool = False) -> "Dataset":
    """Read, format, tokenize and mask one or several datasets.

    Args:
        data: a path (file or directory), a list of paths, a list of ``(path, weight)`` pairs to mix by weight,
            or dicts ``{"path", "weight", "format", "field_map", "txt_split"}`` for per-source options.
        tokenizer: ``encode``, ``apply_chat_template``, ``eos_token_id``/``pad_token_id`` (minitrain's Tokenizer);
            its ``tokenizers.Tokenizer``, when it has one, encodes whole batches.
        max_seq_length: tokens per example (and per packed row).
        format: "raw", "instruct", "conversation" or "preference"; None detects it from each file's first record.
        train_on_responses_only: train only on the assistant turns of chat data (raw text is always trained).
        overflow: what to do with an example longer than max_seq_length: "truncate" (with a warning and a count),
            "drop", "error", or "split" into several examples; None = "split" for raw text, else "truncate".
        eval_split: a fraction (0 < f < 1) or a count (>= 1) of examples held out for evaluation.
        seed: the split and the shuffles derive from it.
        skip_bad_lines: skip malformed lines and records with missing or wrong-typed fields (counted) instead
            of raising.
        txt_split: .txt files: "block" (documents separated by blank lines) or "file" (one document per file).
        system_prompt: added as the system message of chat examples that have none.
        field_map: renames record fields before detection, e.g. ``{"question": "instruction"}``.
        batch_records: records tokenized per batch (memory holds only one batch of raw text at a time).
        num_proc: worker processes that render and tokenize (each batch is split among them and encoded while
            the parent reads the next; results keep the file order). Records travel to the workers pickled and
            each worker fills its own piece cache, so this pays only with cores to spare: on a 2-core machine
            it is no faster than 1 (bench/results/*-cpu2-data.md).
    Returns:
        a Dataset. Examples with no trained token are left out with a warning that counts them; so are
        truncated or dropped ones.
    Raises:
        DataError: unknown format, malformed input (file:line), non-UTF-8 bytes (offset), empty data.
    """
    if format is not None and format not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)} or None, got {format!r}")
    if overflow is not None and overflow not in OVERFLOW:
        raise DataError(f"overflow must be one of {', '.join(OVERFLOW)} or None, got {overflow!r}")
    if max_seq_length < 2:
        raise DataError(f"max_seq_length must be >= 2, got {max_seq_length}")
    encoder = Encoder(tokenizer, train_on_responses_only, use_batch_api)
    pool = None
    if num_proc > 1:
        import multiprocessing as mp

        # fork: the workers inherit the tokenizer as it is, nothing is pickled but records and token ids
        pool = mp.get_context("fork").Pool(num_proc, initializer=_WorkerEncoder.init, initargs=(encoder,))
        batch_records *= num_proc
    # the cyclic garbage collector would walk every record, message and result object held here again and again
    # as they are allocated (a third of the time of 100k chat records); nothing here makes reference cycles
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        workers = None if pool is None else (pool, num_proc)
        store, rej, infos, src_of, fmt_of, locs = _read_all(data, encoder, workers, max_seq_length, format, overflow,
                                                            skip_bad_lines, txt_split, system_prompt, field_map,
                                                            batch_records)
    finally:
        if gc_was_on:
            gc.enable()
        if pool is not None:
            pool.terminate()
            pool.join()
    store.finalize()
    store.rejected = rej.finalize()
    if len(store.lengths) == 0:
        raise DataError(f"empty dataset: no usable example in {[i.name for i in infos]} "
                        f"({sum(i.refused for i in infos)} without any trained token, "
                        f"{sum(i.dropped for i in infos)} dropped, {sum(i.skipped for i in infos)} skipped)")
    ds = Dataset(tokenizer, store, infos, np.asarray(src_of, np.int32), fmt_of, locs, max_seq_length,
                 train_on_responses_only, eval_split, seed)
    if verbose:
        print(ds.summary())
    return ds


def _read_all(data, encoder, pool, max_seq_length, format, overflow, skip_bad_lines, txt_split, system_prompt,
              field_map, batch_records):
    store, rej = TokenStore(), TokenStore()
    infos, src_of, fmt_of, locs = [], [], [], []
    for k, src in enumerate(_sources(data)):
        info = SourceInfo(name=str(src["path"]), weight=src.get("weight"))
        infos.append(info)
        fmap = src.get("field_map", field_map) or {}
        stats = ReadStats()
        pending: list[tuple[str, dict, str]] = []
        # with worker processes, a batch is encoded while the next one is read; results are stored in file order
        inflight: deque = deque()

        def finish(job):
            batch, result = job
            info.formats.update(f for f, _, _ in batch)
            _store_encoded(batch, result(), store, rej, info, k, src_of, fmt_of, locs, max_seq_length, overflow)

        def flush():
            if pending:
                inflight.append((list(pending), _submit(pending, encoder, pool)))
                pending.clear()
            while len(inflight) > (0 if pool is None else 1):
                finish(inflight.popleft())

        records = read_records(src["path"], skip_bad_lines=skip_bad_lines, txt_split=src.get("txt_split", txt_split),
                               stats=stats)
        try:
            _read_source(records, src, format, fmap, system_prompt, skip_bad_lines, stats, pending, flush,
                         batch_records)
        except BaseException:
            while inflight:  # an error in an earlier batch comes first
                finish(inflight.popleft())
            raise
        flush()
        while inflight:
            finish(inflight.popleft())
        info.read, info.skipped, info.skip_examples = stats.records, stats.skipped, stats.examples
        _warn(info, max_seq_length)
    return store, rej, infos, src_of, fmt_of, locs


def _read_source(records, src, format, fmap, system_prompt, skip_bad_lines, stats, pending, flush, batch_records):
    """Normalize every record of one source into ``pending``, calling ``flush`` every ``batch_records``."""
    cur_file, cur_fmt = None, None
    fixed = src.get("format", format)
    for rec, loc, f in records:
        if fmap:
            rec = {fmap.get(key, key): v for key, v in rec.items()}
        try:
            if f is not cur_file and f != cur_file:
                cur_file, cur_fmt = f, fixed or detect_format(rec, loc)
            try:
                ex = normalize(rec, cur_fmt, loc, system_prompt)
            except DataError:
                # a file may mix formats: a record that fits another format is taken as that one;
                # otherwise the error names what this record lacks for the file's format
                other = None if fixed else _try_detect(rec, loc)
                if other is None or other == cur_fmt:
                    raise
                cur_fmt = other
                ex = normalize(rec, cur_fmt, loc, system_prompt)
        except DataError as e:
            if not skip_bad_lines:
                raise
            stats.skip(str(e))
            continue
        pending.append((cur_fmt, ex, loc))
        if len(pending) >= batch_records:
            flush()


def _try_detect(rec: dict, loc: str) -> str | None:
    try:
        return detect_format(rec, loc)
    except DataError:
        return None


def _encode_flat(encoder, pending) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(ids, trained mask, lengths), concatenated, for a batch that is all raw text or all chat without
    rejected sequences (the common case: no array per example); None for any other batch."""
    if pending[0][0] == "raw":
        if all(f == "raw" for f, _, _ in pending):
            return encoder.encode_raw_flat([ex["text"] for _, ex, _ in pending])
    elif all(f != "raw" and "rejected_messages" not in ex for f, ex, _ in pending):
        return encoder.encode_chat_flat([ex["messages"] for _, ex, _ in pending], [loc for _, _, loc in pending])
    return None


def _encode_examples(encoder, pending) -> list[tuple]:
    """(ids int32 array, trained mask, rejected pair or None) for each pending (format, example, location)."""
    raw = [(i, ex["text"]) for i, (f, ex, _) in enumerate(pending) if f == "raw"]
    chat = [i for i, (f, _, _) in enumerate(pending) if f != "raw"]
    enc: dict[int, tuple] = {}
    if raw:
        enc.update(zip((i for i, _ in raw), encoder.encode_raw([t for _, t in raw])))
    if chat:
        enc.update(zip(chat, encoder.encode_chat([pending[i][1]["messages"] for i in chat],
                                                 [pending[i][2] for i in chat])))
    pref = [i for i in chat if "rejected_messages" in pending[i][1]]
    renc = dict(zip(pref, encoder.encode_chat([pending[i][1]["rejected_messages"] for i in pref],
                                              [pending[i][2] for i in pref]))) if pref else {}
    as_arr = lambda p: (np.asarray(p[0], dtype=np.int32), p[1])  # noqa: E731 - compact to pickle and to store
    return [(*as_arr(enc[i]), as_arr(renc[i]) if i in renc else None) for i in range(len(pending))]


def _split_flat(flat) -> list[tuple]:
    ids, mask, lens = flat
    return list(zip(split_by(ids, lens), split_by(mask, lens), [None] * len(lens)))


class _WorkerEncoder:
    """Runs the encoding in a worker process; the encoder reaches the worker through fork, once."""

    encoder = None  # set in each worker by ``init``; the parent never sets it

    @classmethod
    def init(cls, encoder) -> None:
        cls.encoder = encoder

    @classmethod
    def run(cls, pending) -> tuple:
        """The encoded examples packed into a few flat arrays: thousands of small arrays pickle slowly."""
        flat = _encode_flat(cls.encoder, pending)
        if flat is not None:
            return (*flat, None)
        out = _encode_examples(cls.encoder, pending)
        lens = np.fromiter((len(m) for _, m, _ in out), np.int64, len(out))
        ids = np.concatenate([i for i, _, _ in out]) if out else np.zeros(0, np.int32)
        mask = np.concatenate([m for _, m, _ in out]) if out else np.zeros(0, bool)
        return ids, mask, lens, [r for _, _, r in out]

    @staticmethod
    def unpack(part) -> list[tuple]:
        ids, mask, lens, rej = part
        return list(zip(split_by(ids, lens), split_by(mask, lens), rej if rej is not None else [None] * len(lens)))


def _submit(pending, encoder, pool):
    """Start encoding a batch; returns a function giving ``(flat, encoded)``: the batch's concatenated
    ``(ids, mask, lengths)`` or, for batches with rejected sequences or mixed formats, per-example triples."""
    if pool is None:
        try:
            flat = _encode_flat(encoder, pending)
            out = (flat, None if flat is not None else _encode_examples(encoder, pending))
        except (TypeError, UnicodeError):
            _raise_unencodable(pending)
            raise
        return lambda: out
    # imap, not map: results come back in order, so an error names the first bad record, whichever worker
    pool, n = pool
    pending = list(pending)  # the caller clears its list: an error found later must still see the batch
    step = -(-len(pending) // n)
    it = pool.imap(_WorkerEncoder.run, [pending[s: s + step] for s in range(0, len(pending), step)])

    def result():
        try:
            parts = list(it)
        except (TypeError, UnicodeError):
            _raise_unencodable(pending)
            raise
        if all(p[3] is None for p in parts):
            return tuple(np.concatenate([p[j] for p in parts]) for j in range(3)), None
        return None, [e for part in parts for e in _WorkerEncoder.unpack(part)]

    return result


def _raise_unencodable(pending) -> None:
    """After the tokenizer failed on a batch: a DataError naming the first record holding a string that is not
    valid Unicode (a lone surrogate such as JSON's "\\ud800", which json accepts and UTF-8 cannot encode)."""
    for _, ex, loc in pending:
        texts = [("text", ex["text"])] if "text" in ex else []
        for key in ("messages", "rejected_messages"):
            texts += [(f"{key}[{j}].content", m["content"]) for j, m in enumerate(ex.get(key, ()))]
        for where, t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{loc}: {where} is not valid Unicode: lone surrogate {t[e.start]!r} at character "
                                f"{e.start}; fix the \\u escape in the file") from None


def _store_encoded(pending, result, store, rej, info, k, src_of, fmt_of, locs, max_len, overflow):
    flat, encoded = result
    if flat is not None:
        if _keep_all_fitting(pending, *flat, store, rej, info, k, src_of, fmt_of, locs, max_len):
            return
        encoded = _split_flat(flat)
    kept, kept_rej = [], []
    for (fmt, ex, loc), (ids, mask, r_enc) in zip(pending, encoded):
        policy = overflow or ("split" if fmt == "raw" else "truncate")
        for pid, pmask in _fit(ids, mask, max_len, policy, loc, info):
            if not pmask[1:].any():  # label 0 is never a target: nothing to learn from this example
                info.refused += 1
                continue
            r = (np.zeros(0, np.int32), np.zeros(0, bool))
            if r_enc is not None:
                pieces = _fit(*r_enc, max_len, "truncate" if policy == "split" else policy, loc, SourceInfo("-"))
                r = pieces[0] if pieces else r
            kept.append((pid, pmask))
            kept_rej.append(r)
            src_of.append(k)
            fmt_of.append(fmt)
            locs.append(loc)
            info.examples += 1
            info.tokens += len(pmask)
            info.trained += int(pmask[1:].sum())
    store.add_batch(kept)
    rej.add_batch(kept_rej)


def _keep_all_fitting(pending, ids, flat, lens, store, rej, info, k, src_of, fmt_of, locs, max_len) -> bool:
    """The common batch (no rejected sequences, none longer than max_len, none empty), given concatenated, with
    array operations instead of a loop over examples; False (nothing done) for any other batch."""
    if lens.min() < 1 or lens.max() > max_len:
        return False
    starts = np.cumsum(lens) - lens
    trained = np.add.reduceat(flat, starts, dtype=np.int64) - flat[starts]  # label 0 is never a target
    keep = trained > 0
    n_keep = int(keep.sum())
    info.refused += len(keep) - n_keep
    if n_keep == len(keep):
        store.add_flat(ids, flat, lens)
        fmt_of.extend(f for f, _, _ in pending)
        locs.extend(loc for _, _, loc in pending)
    else:
        tok_keep = np.repeat(keep, lens)
        store.add_flat(ids[tok_keep], flat[tok_keep], lens[keep])
        sel = np.flatnonzero(keep).tolist()
        fmt_of.extend(pending[i][0] for i in sel)
        locs.extend(pending[i][2] for i in sel)
    rej.add_flat(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(n_keep, np.int64))
    src_of.extend([k] * n_keep)
    info.examples += n_keep
    info.tokens += int(lens[keep].sum())
    info.trained += int(trained[keep].sum())
    return True


def _warn(info: SourceInfo, max_len: int) -> None:
    if info.truncated:
        warnings.warn(f"{info.name}: {info.truncated} examples longer than max_seq_length={max_len} were truncated "
                      f"(overflow='drop' leaves them out instead)", stacklevel=3)
    if info.refused:
        warnings.warn(f"{info.name}: {info.refused} examples have no trained token (no assistant turn, or the "
                      f"response lies beyond max_seq_length={max_len}) and were left out", stacklevel=3)
    if info.dropped:
        warnings.warn(f"{info.name}: {info.dropped} examples longer than max_seq_length={max_len} were dropped",
                      stacklevel=3)
    if info.skipped:
        warnings.warn(f"{info.name}: {info.skipped} bad lines/records skipped, e.g. {info.skip_examples[0]}",
                      stacklevel=3)


class Dataset:
    """Tokenized examples with their trained masks, a train/eval split, source mixing and batches."""

    def __init__(self, tokenizer, store, sources, source_of, format_of, locations, max_seq_length,
                 train_on_responses_only, eval_split, seed):
        self.tokenizer, self.store, self.sources = tokenizer, store, sources
        self.source_of, self.format_of, self.locations = source_of, format_of, locations
        self.max_seq_length, self.train_on_responses_only, self.seed = max_seq_length, train_on_responses_only, seed
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
        self.pad_id = 0 if pad is None else int(pad)
        n = len(store.lengths)
        if isinstance(eval_split, float) and not 0 <= eval_split < 1:
            raise DataError(f"eval_split as a fraction must be in [0, 1), got {eval_split}")
        n_eval = int(round(eval_split * n)) if isinstance(eval_split, float) else int(eval_split)
        if isinstance(eval_split, float) and eval_split > 0:
            n_eval = max(1, n_eval)
        if n_eval < 0 or n_eval >= n:
            raise DataError(f"eval_split={eval_split} leaves no training example out of {n}")
        perm = np.random.default_rng([seed, 0]).permutation(n)
        self.eval_idx = np.sort(perm[:n_eval])
        self.train_idx = np.sort(perm[n_eval:])

    def __len__(self) -> int:
        return len(self.store.lengths)

    def __getitem__(self, i: int) -> dict:
        ids, mask = self.store.get(i)
        out = {"input_ids": torch.from_numpy(ids.astype(np.int64)),
               "labels": torch.from_numpy(np.where(mask, ids, -100).astype(np.int64))}
        rids, rmask = self.store.get(i, rejected=True)
        if len(rids):
            out["rejected_input_ids"] = torch.from_numpy(rids.astype(np.int64))
            out["rejected_labels"] = torch.from_numpy(np.where(rmask, rids, -100).astype(np.int64))
        return out

    def epoch_order(self, split: str, epoch: int, shuffle: bool = True, seed: int | None = None) -> np.ndarray:
        """The example indices of one epoch of ``split``. Training mixes the sources by their weights: source s
        gives round(w_s / sum(w) * n_train) examples per epoch (repeated or subsampled, differently each epoch)."""
        seed = self.seed if seed is None else seed
        if split == "eval":
            return self.eval_idx.copy()
        if split != "train":
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        idx = self.train_idx
        rng = np.random.default_rng([seed, epoch, 2])
        weights = [s.weight for s in self.sources]
        if len(self.sources) > 1 and all(w is not None for w in weights):
            total, parts = sum(weights), []
            for k, w in enumerate(weights):
                own = idx[self.source_of[idx] == k]
                want = int(round(w / total * len(idx)))
                if want == 0 or len(own) == 0:
                    continue
                reps = -(-want // len(own))
                pool = np.concatenate([rng.permutation(own) if shuffle else own for _ in range(reps)])
                parts.append(pool[:want])
            if not parts:
                raise DataError(f"the mixing weights {weights} give no training example per epoch: each source's "
                                f"share of the {len(idx)} training examples rounds to 0 or holds none of them; "
                                f"add data, lower eval_split or give no weights")
            idx = np.concatenate(parts)
        return rng.permutation(idx) if shuffle else idx.copy()

    def batches(self, split: str = "train", batch_size: int = 2, packing: bool = True, shuffle: bool | None = None,
                seed: int | None = None, pad_to_multiple_of: int | None = None, drop_last: bool = False,
                rejected: bool = False) -> Batches:
        """A resumable iterable of batches (dicts of tensors, see ``minitrain.data.batching``).

        Args:
            split: "train" (mixed by weight, shuffled) or "eval" (in order).
            batch_size: rows per batch (packed rows hold several examples).
            packing: pack examples into rows of max_seq_length with per-document positions and cu_seqlens;
                False gives length-bucketed padded batches with an attention mask.
            rejected: also give the rejected sequences of preference pairs (``rejected_*`` keys; no packing).
        """
        shuffle = split == "train" if shuffle is None else shuffle
        return Batches(self, split, batch_size, packing, shuffle, self.seed if seed is None else seed,
                       pad_to_multiple_of, drop_last, rejected)

    def train_batches(self, batch_size: int = 2, packing: bool = True, **kw) -> Batches:
        return self.batches("train", batch_size, packing, **kw)

    def eval_batches(self, batch_size: int = 2, packing: bool = False, **kw) -> Batches:
        return self.batches("eval", batch_size, packing, **kw)

    def render(self, i: int, rejected: bool = False) -> str:
        """Example ``i`` decoded, with every trained span wrapped in [[ ]]."""
        ids, mask = self.store.get(i, rejected)
        mask = mask.copy()
        if len(mask):
            mask[0] = False  # never a target
        out, s = [], 0
        for e in range(1, len(ids) + 1):
            if e == len(ids) or mask[e] != mask[s]:
                text = self.tokenizer.decode([int(t) for t in ids[s:e]], skip_special_tokens=False)
                out.append(f"[[{text}]]" if mask[s] else text)
                s = e
        return "".join(out)

    def summary(self, n_examples: int = 1, bar_width: int = 40) -> str:
        """A report to read before training: sources, counts, token lengths, trained share, examples."""
        n, lens = len(self), self.store.lengths
        trained = sum(s.trained for s in self.sources)
        lines = [f"Dataset: {n:,} examples ({len(self.train_idx):,} train / {len(self.eval_idx):,} eval), "
                 f"max_seq_length {self.max_seq_length}, "
                 f"{'responses only' if self.train_on_responses_only else 'all tokens'} trained", ""]
        cols = ["source", "format", "weight", "read", "skipped", "examples", "truncated", "dropped", "refused",
                "split", "tokens", "trained"]
        rows = [[s.name, ", ".join(f"{f} {c}" for f, c in s.formats.items()),
                 "-" if s.weight is None else f"{s.weight:g}", s.read, s.skipped, s.examples, s.truncated, s.dropped,
                 s.refused, s.split, f"{s.tokens:,}", f"{s.trained / max(s.tokens, 1):.1%}"] for s in self.sources]
        widths = [max(len(str(c)), *(len(str(r[j])) for r in rows)) for j, c in enumerate(cols)]
        for r in [cols] + rows:
            lines.append("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
        lines += ["", f"Tokens: {int(lens.sum()):,}; trained: {trained:,} ({trained / max(int(lens.sum()), 1):.1%}); "
                      f"length min {lens.min()}, median {int(np.median(lens))}, max {lens.max()}",
                  "Token length histogram:"]
        edges = [0] + [2 ** k for k in range(5, 64) if 2 ** k < self.max_seq_length] + [self.max_seq_length + 1]
        counts = np.histogram(lens, bins=edges)[0]
        for a, b, c in zip(edges[:-1], edges[1:], counts):
            bar = "#" * int(round(bar_width * c / max(counts.max(), 1)))
            lines.append(f"  {a:>6}-{b - 1:<6} {bar} {c}")
        for i in range(min(n_examples, n)):
            lines += ["", f"Example {i} ({self.format_of[i]}, {self.locations[i]}), trained tokens in [[ ]]:",
                      self.render(i)]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Dataset({len(self):,} examples, {len(self.train_idx):,} train / {len(self.eval_idx):,} eval, "
                f"sources={[s.name for s in self.sources]}, max_seq_length={self.max_seq_length})")
