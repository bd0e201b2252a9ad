"""Turning normalized examples into token ids and a trained-token mask, with the model's chat template.

Assistant spans come from the rendered template, never from string search in the content: for assistant
turn i, the render of ``messages[:i]`` with ``add_generation_prompt=True`` ends where the turn's trained span
starts, and the render of ``messages[:i+1]`` ends where it stops (so the end-of-turn token is trained too).
This holds for any template whose renders of prefixes are prefixes of the whole ("prefix-stable"); it is
checked on every record and a template that is not gets a clear error.

The tokenizer is used through a small interface (``encode``, ``apply_chat_template``, ``eos_token_id``). When it
exposes a ``tokenizers.Tokenizer``, whole batches are tokenized at once and spans are mapped from characters to
tokens with the token start offsets; the first record of each kind is checked against the tokenizer's own
methods and the per-record path is used if they disagree.

Speed (100k chat records of ~94 tokens on a 2-core machine, bench/results/*-cpu2-data.md): jinja2's sandbox
renders ~30k records/s and ``tokenizers`` encodes ~3-6k records/s (its pre-tokenizer alone is most of that). Two
exact fast paths replace them when they apply: ``Tokenizer.fast_chat_renderer`` (plain Python for the ChatML and
Llama-3 families, ~20x jinja2, with a ``spans`` method that gives the assistant spans in the same pass) and
``PieceCache`` (tokenization of a whole batch as one array: pieces cut at spaces and where added tokens start,
hashed and gathered from a table in numpy, every character checked against the entry, ``tokenizers`` only for
pieces not seen before). Both
are compared with the slow path on a sample of records (``Encoder.verify_first``, ``Encoder.verify_every``) and
switched off with a warning on any difference. Batches stay flat arrays (ids, mask, tokens per record) from
here to the token store (``encode_chat_flat``, ``encode_raw_flat``).
"""
from __future__ import annotations

import gc
import os
import re
from bisect import bisect_left
from itertools import chain

import numpy as np

from .sources import DataError

_PID = os.getpid()  # the process that imported this module


def fork_guard() -> None:
    """In a process forked from the one that imported this module (``load_dataset(num_proc=...)`` workers),
    turn off the thread pool of ``tokenizers`` before its first batch call. Its threads do not survive a fork;
    tokenizers turns its pool off in a forked child itself, except when TOKENIZERS_PARALLELISM was set to
    true: then the child's first ``encode_batch`` waits forever for them. (The variable is read on every call.)"""
    global _PID
    if os.getpid() != _PID:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        _PID = os.getpid()


def find_backend(tok):
    """The ``tokenizers.Tokenizer`` behind ``tok`` (or ``tok`` itself), or None."""
    try:
        import tokenizers
    except ImportError:
        return None
    if isinstance(tok, tokenizers.Tokenizer):
        return tok
    for name in ("backend", "backend_tokenizer", "_tokenizer", "tokenizer", "_backend", "tk"):
        b = getattr(tok, name, None)
        if isinstance(b, tokenizers.Tokenizer):
            return b
    for v in getattr(tok, "__dict__", {}).values():
        if isinstance(v, tokenizers.Tokenizer):
            return v
    return None


def _as_ids(out) -> list[int]:
    """apply_chat_template(tokenize=True) may return a list, a tensor or a dict with input_ids."""
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


class Encoder:
    """Encodes batches of normalized examples into ``(ids, trained)`` pairs (int32 ndarray, bool ndarray).

    Fast paths, each checked against the slow one and dropped (with a warning) on the first disagreement:
    a tokenizer that offers ``fast_chat_renderer()`` renders chats without jinja2 (every ``verify_every``-th
    record and the first ``verify_first`` are also rendered by the template and compared, prefixes included);
    a supported ``tokenizers`` backend tokenizes through a ``PieceCache`` (the same records are also encoded
    by ``encode_batch``, and ids and trained masks compared).
    """

    verify_first = 32
    verify_every = 128

    def __init__(self, tokenizer, train_on_responses_only: bool = True, use_batch_api: bool = True):
        self.tok = tokenizer
        self.responses_only = train_on_responses_only
        self.backend = find_backend(tokenizer) if use_batch_api else None
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self._raw_fast = self._chat_fast = self.backend is not None
        self._raw_checked = self._chat_checked = False
        self.pieces = None
        if self.backend is not None and piece_cache_unsupported(self.backend) is None:
            self.pieces = PieceCache(self.backend)
        self.renderer = None
        if use_batch_api and callable(getattr(tokenizer, "fast_chat_renderer", None)):
            self.renderer = tokenizer.fast_chat_renderer()
        self._spans = getattr(self.renderer, "spans", None)  # render + assistant spans in one pass
        self._seen = 0  # records encoded so far: picks the ones that are verified

    def _verify_idx(self, n: int) -> list[int]:
        s, k, first = self._seen, self.verify_every, self.verify_first
        return [i for i in range(n) if s + i < first or (s + i) % k == 0]

    # ---- raw text: the whole document is trained, EOS closes it so packed documents stay apart
    def encode_raw(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, mask, counts = self.encode_raw_flat(texts)
        return list(zip(split_by(ids, counts), split_by(mask, counts)))

    def encode_raw_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of all texts concatenated (int32), their trained mask (all True), tokens per text (int64)."""
        fork_guard()
        if self._raw_fast and not self._raw_checked:
            self._raw_checked = True
            if self.backend.encode(texts[0], add_special_tokens=True).ids != list(self.tok.encode(texts[0])):
                self._raw_fast = False  # the wrapper adds something of its own: follow the wrapper
        if self._raw_fast:
            ids, counts = self._raw_ids(texts)
        else:
            ids, counts = _concat([np.asarray(self.tok.encode(t), dtype=np.int32) for t in texts])
        ids, counts = _wrap(ids, counts, np.zeros(0, np.int32), np.zeros(0, np.int32), self.eos)
        return ids, np.ones(len(ids), dtype=bool), counts

    def _rust_raw(self, texts):
        enc = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [np.asarray(e.ids, dtype=np.int32) for e in enc(texts, add_special_tokens=True)]

    def _raw_ids(self, texts) -> tuple[np.ndarray, np.ndarray]:
        if self.pieces is not None:
            pre, post = _added_specials(self.backend)
            if pre is None:
                self.pieces = None
        if self.pieces is None:
            return _concat(self._rust_raw(texts))
        ids, _, counts = self.pieces.encode(texts)
        ids, counts = _wrap(ids, counts, pre, post, None)
        check = self._verify_idx(len(texts))
        self._seen += len(texts)
        ref = self._rust_raw([texts[i] for i in check])
        ends = np.cumsum(counts)
        if any(not np.array_equal(ids[ends[i] - counts[i]: ends[i]], r) for i, r in zip(check, ref)):
            self._fast_failed("piece-cache tokenization")
            return _concat(self._rust_raw(texts))
        return ids, counts

    def _fast_failed(self, what: str) -> None:
        import warnings

        warnings.warn(f"minitrain.data: the {what} disagreed with the reference on a sampled record; using the "
                      f"slow path from here on", stacklevel=4)
        if what.startswith("piece"):
            self.pieces = None
        else:
            self.renderer = self._spans = None

    # ---- chat: rendered with the template, assistant spans found from prefix renders
    def _render(self, msgs, loc, gen=False, tokenize=False, fast=True):
        if fast and not tokenize and self.renderer is not None:
            return self.renderer(msgs, add_generation_prompt=gen)
        try:
            return self.tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=tokenize)
        except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad roles) become data errors
            for j, m in enumerate(msgs):  # a lone surrogate ("\\ud800" in the JSON) fails the tokenizer obscurely
                try:
                    m["content"].encode("utf-8")
                except UnicodeEncodeError as u:
                    raise DataError(f"{loc}: messages[{j}].content is not valid Unicode: lone surrogate "
                                    f"{m['content'][u.start]!r} at character {u.start}; fix the \\u escape in "
                                    f"the file") from None
            raise DataError(f"{loc}: the chat template failed on this conversation: {e}") from None

    def _char_spans(self, msgs, loc, fast=True) -> tuple[str, list[tuple[int, int]]]:
        if fast and self._spans is not None and self.responses_only:
            out = self._spans(msgs)  # one pass; None where the generic path decides (and words the error)
            if out is not None:
                return out
        full = self._render(msgs, loc, fast=fast)
        if not self.responses_only:
            return full, [(0, len(full))]
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            pre = self._render(msgs[:i], loc, gen=True, fast=fast)
            post = full if i == len(msgs) - 1 else self._render(msgs[: i + 1], loc, fast=fast)
            if not (post.startswith(pre) and full.startswith(post)):
                raise DataError(_not_prefix_stable(loc, i))
            spans.append((len(pre), len(post)))
        return full, spans

    def _rendered(self, convs, locs) -> list[tuple[str, list[tuple[int, int]]]]:
        if self.renderer is None:
            return [self._char_spans(m, loc, fast=False) for m, loc in zip(convs, locs)]
        try:
            out = [self._char_spans(m, loc) for m, loc in zip(convs, locs)]
        except DataError:
            out = None  # the template's own render decides (and words) any error
        if out is None or any(out[i] != self._char_spans(convs[i], locs[i], fast=False)
                              for i in self._verify_idx(len(convs))):
            self._fast_failed("fast chat renderer")
            return [self._char_spans(m, loc, fast=False) for m, loc in zip(convs, locs)]
        return out

    def _token_spans(self, msgs, loc) -> tuple[list[int], np.ndarray]:
        """The per-record path, through the tokenizer's own methods. Spans are the same character spans as
        the batch path, mapped to tokens with decoded-prefix lengths (a token belongs to a span when it starts
        inside it); if decoding does not give the rendered text back, token-level prefixes are used instead."""
        full = _as_ids(self._render(msgs, loc, tokenize=True))
        mask = np.zeros(len(full), dtype=bool)
        if not self.responses_only:
            mask[:] = True
            return full, mask
        text, spans = self._char_spans(msgs, loc, fast=False)
        decode = lambda j: self.tok.decode(full[:j], skip_special_tokens=False)  # noqa: E731
        if decode(len(full)) == text:
            for a, b in spans:
                mask[_first_at(decode, len(full), a): _first_at(decode, len(full), b)] = True
            return full, mask
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            pre = _as_ids(self._render(msgs[:i], loc, gen=True, tokenize=True))
            post = full if i == len(msgs) - 1 else _as_ids(self._render(msgs[: i + 1], loc, tokenize=True))
            if post[: len(pre)] != pre or full[: len(post)] != post:
                raise DataError(_not_prefix_stable(loc, i, tokens=True))
            mask[len(pre): len(post)] = True
        return full, mask

    def encode_chat(self, convs: list[list[dict]], locs: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, mask, counts = self.encode_chat_flat(convs, locs)
        return list(zip(split_by(ids, counts), split_by(mask, counts)))

    def encode_chat_flat(self, convs: list[list[dict]], locs: list[str]) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
        """Ids of all conversations concatenated (int32), their trained mask (bool), tokens per conversation."""
        fork_guard()
        if self._chat_fast and not self._chat_checked:
            self._chat_checked = True
            text, _ = self._char_spans(convs[0], locs[0], fast=False)
            fast = self.backend.encode(text, add_special_tokens=False).ids
            if fast != _as_ids(self._render(convs[0], locs[0], tokenize=True)):
                self._chat_fast = False
        if not self._chat_fast:
            return _concat_pairs([self._token_spans(m, loc) for m, loc in zip(convs, locs)])
        rendered = self._rendered(convs, locs)
        if self.pieces is not None:
            out = self._piece_chat(rendered)
            if out is not None:
                return out
        return _concat_pairs(self._rust_chat(rendered))

    def _rust_chat(self, rendered) -> list[tuple[np.ndarray, np.ndarray]]:
        encs = self.backend.encode_batch([t for t, _ in rendered], add_special_tokens=False)
        out = []
        for (_, spans), e in zip(rendered, encs):
            ids = np.asarray(e.ids, dtype=np.int32)
            starts = [s for s, _ in e.offsets]
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                # a token belongs to the span when it starts inside it (a token merged across the span's
                # start belongs to the prompt; the end-of-turn token is inside the span)
                mask[bisect_left(starts, a): bisect_left(starts, b)] = True
            out.append((ids, mask))
        return out

    def _piece_chat(self, rendered) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        texts = [t for t, _ in rendered]
        ids, gstart, counts = self.pieces.encode(texts)
        # spans in the coordinates of the texts' concatenation; a token is trained when it starts inside one
        nsp = np.fromiter(map(len, (s for _, s in rendered)), np.int64, len(rendered))
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(s for _, s in rendered)), np.int64,
                           2 * int(nsp.sum())).reshape(-1, 2)
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        base = np.repeat(np.cumsum(lens) - lens, nsp)
        n = len(ids) + 1
        edges = (np.bincount(np.searchsorted(gstart, base + flat[:, 0], "left"), minlength=n)
                 - np.bincount(np.searchsorted(gstart, base + flat[:, 1], "left"), minlength=n))
        mask = np.cumsum(edges[:-1]) > 0
        check = self._verify_idx(len(texts))
        self._seen += len(texts)
        ref = self._rust_chat([rendered[i] for i in check])
        ends = np.cumsum(counts)
        for i, (r_ids, r_mask) in zip(check, ref):
            a, b = ends[i] - counts[i], ends[i]
            if not (np.array_equal(ids[a:b], r_ids) and np.array_equal(mask[a:b], r_mask)):
                self._fast_failed("piece-cache tokenization")
                return None
        return ids, mask, counts


def _concat(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    counts = np.fromiter(map(len, arrays), np.int64, len(arrays))
    return (np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)), counts


def _concat_pairs(pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, counts = _concat([np.asarray(i, dtype=np.int32) for i, _ in pairs])
    mask = np.concatenate([m for _, m in pairs]) if pairs else np.zeros(0, bool)
    return ids, mask.astype(bool, copy=False), counts


def _wrap(ids: np.ndarray, counts: np.ndarray, pre: np.ndarray, post: np.ndarray, eos: int | None):
    """Each sequence of the flat ``ids`` as pre + sequence + post, then EOS unless it already ends with it."""
    k, m, n = len(pre), len(post), len(counts)
    if not (k or m or eos is not None):
        return ids, counts
    starts = np.cumsum(counts) - counts
    nonempty = counts > 0
    last = np.full(n, -1, np.int64)
    last[nonempty] = ids[(starts + counts - 1)[nonempty]]
    if m:
        last[:] = post[-1]
    elif k:
        last[~nonempty] = pre[-1]
    add = np.zeros(n, np.int64) if eos is None else (last != eos).astype(np.int64)
    new = counts + k + m + add
    out_start = np.cumsum(new) - new
    out = np.empty(int(new.sum()), np.int32)
    out[np.repeat(out_start + k - starts, counts) + np.arange(len(ids))] = ids
    for j in range(k):
        out[out_start + j] = pre[j]
    for j in range(m):
        out[out_start + k + counts + j] = post[j]
    if eos is not None:
        out[(out_start + new - 1)[add > 0]] = eos
    return out, new


def split_by(a: np.ndarray, counts) -> list[np.ndarray]:
    """Consecutive views of ``a`` of the given lengths (np.split builds each view far more slowly)."""
    ends = np.cumsum(counts).tolist()
    return [a[s:e] for s, e in zip([0] + ends[:-1], ends)]


def _added_specials(backend) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The ids the post-processor puts before and after a text's own ids with add_special_tokens=True, or
    (None, None) when that is not a plain prefix and suffix."""
    for probe in ("a", "hello world"):
        bare = backend.encode(probe, add_special_tokens=False).ids
        full = backend.encode(probe, add_special_tokens=True).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i: i + len(bare)] == bare:
                pre, post = full[:i], full[i + len(bare):]
                break
        else:
            return None, None
        if probe == "a":
            first = (pre, post)
        elif (pre, post) != first:
            return None, None
    return np.asarray(first[0], np.int32), np.asarray(first[1], np.int32)


# Pre-tokenizer regexes under which a space preceded by a non-space character is a pre-token boundary that no
# decision looks across (see PieceCache). GPT-2's is also what ByteLevel(use_regex=True) applies.
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
CUT_SAFE_PATTERNS = (_GPT2, _LLAMA3, _QWEN2)


def piece_cache_unsupported(backend) -> str | None:
    """Why ``PieceCache`` cannot tokenize exactly like ``backend`` (None when it can)."""
    import json

    cfg = json.loads(backend.to_str())
    if cfg.get("normalizer") is not None:
        return f"normalizer {cfg['normalizer'].get('type')} (only none is supported)"
    if cfg.get("truncation") is not None or cfg.get("padding") is not None:
        return "truncation or padding is set on the tokenizer"
    model = cfg.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return f"model {model.get('type')} (only BPE without dropout is supported)"

    def ok(pt) -> str | None:
        t = pt.get("type") if pt else None
        if t == "Sequence":
            return next((r for r in map(ok, pt["pretokenizers"]) if r), None)
        if t == "ByteLevel":
            return "ByteLevel with add_prefix_space" if pt.get("add_prefix_space") else None
        if t == "Digits":
            return None
        if t == "Split":
            pat = (pt.get("pattern") or {}).get("Regex")
            if pat not in CUT_SAFE_PATTERNS or pt.get("behavior") != "Isolated" or pt.get("invert"):
                return f"Split pre-tokenizer with pattern {pt.get('pattern')!r} (not a known GPT-2/Llama-3 pattern)"
            return None
        return f"pre-tokenizer {t}"

    reason = ok(cfg.get("pre_tokenizer"))
    if reason:
        return reason
    for t in cfg.get("added_tokens") or []:
        if " " in t["content"] or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return f"added token {t['content']!r} contains a space or strips/single-word matches"
    return None


class PieceCache:
    """Exact ``tokenizers`` BPE encoding of many texts through a cache of space-delimited pieces.

    On this 2-core machine ``tokenizers`` spends ~3.5 us per token (mostly pre-tokenization: regex, byte mapping,
    offset bookkeeping in Rust), so 100k chat records take ~20 s. Text is made of few distinct words: cut each
    text into pieces at spaces, look every piece up in a table, and run the real tokenizer only on the pieces
    never seen (its ``encode_batch``). Exactness: for the supported pre-tokenizers (no normalizer; BPE;
    ByteLevel without a prefix space; Digits; GPT-2, Llama-3 or Qwen2 split patterns; added tokens without
    spaces or strip flags) a space whose preceding character is not whitespace starts a new pre-token, no
    alternative of those regexes can match a non-space followed by a space, and no lookahead decides anything
    across it (``\\s+(?!\\S)`` only matches whitespace runs); so the tokens of a whole text are the tokens of its
    pieces, each encoded alone, a piece running from one such space (or the text's start) to the next. A space
    that follows whitespace is no cut point (whitespace here is ``str.isspace``, a superset of the regexes'
    ``\\s``: a wider set only means fewer cuts). Digit splitting and added-token matching are local and are
    done by the real tokenizer on each piece. The start of an added token is a cut point too (``_cut_added``):
    tokenizers splits there before anything else, and without it the text joining two chat turns (" word<|im_end|>
    \\n<|im_start|>assistant\\nWord") is a new piece in almost every record.

    The whole batch is one array of code points; cut points, piece hashes (a polynomial hash mod 2^64 through
    prefix sums) and the gather of the cached tokens are numpy operations, with no Python work per piece. A hash
    only proposes a cache entry: every character of the batch is then compared with the proposed entries'
    characters, and a piece that differs (a hash collision) is looked up by its string instead. Entries are
    kept in flat numpy tables (ids, start offset of each token within its piece, characters). The cache is
    dropped when it passes ``max_entries``.
    """

    _B = 0x9E3779B97F4A7C15  # odd: invertible mod 2^64
    _CHUNK = 1 << 22  # characters hashed at once (bounds the power tables)

    def __init__(self, backend, max_entries: int = 1 << 20):
        self.backend, self.max_entries = backend, max_entries
        # added tokens, longest first (leftmost-longest, as tokenizers matches them); None when some are
        # matched on normalized text and others not (two passes in tokenizers): such texts go to tokenizers whole
        added = [t for t in backend.get_added_tokens_decoder().values()]
        self._added = None
        if added and len({t.normalized for t in added}) == 1:
            alts = sorted({t.content for t in added}, key=len, reverse=True)
            self._added = re.compile("(" + "|".join(map(re.escape, alts)) + ")")
        # the separator of texts tokenized in one call: an added token (the shortest)
        self._sep = None if self._added is None else (alts[-1], backend.token_to_id(alts[-1]))
        # added tokens: the first characters, the longest length (for the cuts at added tokens in encode)
        self._alt_w = 0
        if self._added is not None:
            self._first_cp = sorted({ord(t[0]) for t in alts})
            self._first = np.zeros(max(self._first_cp[-1] + 2, 256), bool)  # last slot: every larger code point
            self._first[self._first_cp] = True
            self._alt_w = len(alts[0])
        self._buf = np.zeros(0, np.uint64)  # prefix sums of the batch being hashed
        self._arange = np.zeros(0, np.int64)
        self._ar32 = np.zeros(0, np.int32)
        self._reset()

    def _reset(self) -> None:
        self._parts: dict[str, tuple[list[int], list[int]]] = {}  # text between added tokens: (ids, starts)
        self.by_hash: dict[int, int] = {}  # piece hash -> entry
        self.by_str: dict[str, int] = {}  # piece -> entry, for pieces whose hash belongs to another piece
        self.strings: list[str] = []  # the piece of each entry
        self._tab_key = np.zeros(1 << 12, np.uint64)  # by_hash as an open-addressing table (key 0: empty)
        self._tab_val = np.full(1 << 12, -1, np.int64)
        self.n_entries = self.n_tok = self.n_chars = 0
        self.e_len = np.zeros(1024, np.int64)  # characters of the piece
        self.e_ntok = np.zeros(1024, np.int64)
        self.e_off = np.zeros(1024, np.int64)  # where its tokens start in the token tables
        self.e_coff = np.zeros(1024, np.int64)  # where its characters start in c_chars
        self.t_ids = np.zeros(4096, np.int32)
        self.t_start = np.zeros(4096, np.int64)  # token start, in characters from the piece's start
        self.c_chars = np.zeros(4096, np.uint32)  # code points of every entry's piece
        self.c_ascii = np.zeros(4096, np.uint8)  # the same capped at 255: ASCII batches are compared with these
        # (a quarter of the bytes; a code point above 127 stays above 127, so it equals no ASCII character)

    @staticmethod
    def _grow(a: np.ndarray, n: int) -> np.ndarray:
        if n <= len(a):
            return a
        out = np.zeros(max(n, 2 * len(a)), a.dtype)
        out[: len(a)] = a
        return out

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """B^0 .. B^(n-1) and the inverses mod 2^64, shared by all caches (they only depend on B)."""
        pw, ipw = _POWERS.get(self._B, (None, None))
        if pw is None or len(pw) < n:
            m = max(n, 2 * len(pw) if pw is not None else 1 << 20)
            pw, ipw = _power_table(self._B, m), _power_table(pow(self._B, -1, 1 << 64), m)
            _POWERS[self._B] = pw, ipw
        return pw[:n], ipw[:n]

    def _encode_new(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, token starts) of each text. A text holding added tokens is cut at them (they are hard
        boundaries for tokenizers too) and put together from cached parts: the pieces that join the end of one
        turn to the start of the next ("word<|im_end|>\\n<|im_start|>assistant\\nWord") are new in almost
        every record, and tokenizers would take ~20 us for each."""
        out: list = [None] * len(texts)
        segs = [[p for p in self._added.split(t) if p] if self._added else [t] for t in texts]
        plain = [i for i, ps in enumerate(segs) if len(ps) <= 1]  # no added token, or only one
        composite = [i for i, ps in enumerate(segs) if len(ps) > 1]
        if composite:
            new = list(dict.fromkeys(p for i in composite for p in segs[i] if p not in self._parts))
            if new:  # parts are never composite
                self._parts.update(zip(new, self._tokenize(new)))
            for i in composite:
                ids, starts, at = [], [], 0
                for p in segs[i]:
                    p_ids, p_starts = self._parts[p]
                    ids += p_ids
                    starts += [s + at for s in p_starts]
                    at += len(p)
                out[i] = (ids, starts)
        if plain:
            for i, e in zip(plain, self._tokenize([texts[i] for i in plain])):
                out[i] = e
        return out

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """(ids, token starts) of each text from ``tokenizers``. Texts without added tokens are joined with an
        added token between them and encoded in one call (added tokens are hard boundaries, so each part is
        tokenized as if alone; every separator is checked to be one token at its place): a call costs tens of
        microseconds whatever its length, and a cold cache asks for thousands of short pieces."""
        out: list = [None] * len(texts)
        rest = list(range(len(texts)))
        if self._sep is not None and len(texts) > 1:
            sep, sep_id = self._sep
            alone = [i for i, t in enumerate(texts) if t and self._added.search(t) is None]
            if len(alone) > 1:
                e = self.backend.encode(sep.join(texts[i] for i in alone), add_special_tokens=False)
                ids, offs = e.ids, e.offsets
                cuts = [j for j, t in enumerate(ids) if t == sep_id]
                at, want = 0, []
                for i in alone[:-1]:
                    at += len(texts[i])
                    want.append((at, at + len(sep)))
                    at += len(sep)
                if len(cuts) == len(want) and all(offs[j] == w for j, w in zip(cuts, want)):
                    lo, base = 0, 0
                    for i, hi in zip(alone, cuts + [len(ids)]):
                        out[i] = (ids[lo:hi], [s - base for s, _ in offs[lo:hi]])
                        lo, base = hi + 1, base + len(texts[i]) + len(sep)
                    rest = [i for i in rest if out[i] is None]
        enc = self.backend.encode
        for i in rest:
            e = enc(texts[i], add_special_tokens=False)
            out[i] = (e.ids, [s for s, _ in e.offsets])
        return out

    def _add(self, keys: list[str]) -> int:
        """Encode ``keys`` (distinct pieces) into new entries; returns the first new entry's number. The
        collector is paused meanwhile (as load_dataset does): the lists and tuples made here hold no cycles, and
        a full collection they trigger walks every object of the caller's process (~0.2 s with 100k records
        held as dicts, more than encoding a few thousand new pieces)."""
        was_on = gc.isenabled()
        gc.disable()
        try:
            encs = self._encode_new(keys)
        finally:
            if was_on:
                gc.enable()
        n0, n = self.n_entries, self.n_entries + len(keys)
        ntok = np.fromiter(map(len, (e[0] for e in encs)), np.int64, len(keys))
        lens = np.fromiter(map(len, keys), np.int64, len(keys))
        total, nch = int(ntok.sum()), int(lens.sum())
        for name in ("e_len", "e_ntok", "e_off", "e_coff"):
            setattr(self, name, self._grow(getattr(self, name), n))
        self.t_ids = self._grow(self.t_ids, self.n_tok + total)
        self.t_start = self._grow(self.t_start, self.n_tok + total)
        self.c_chars = self._grow(self.c_chars, self.n_chars + nch)
        self.c_ascii = self._grow(self.c_ascii, self.n_chars + nch)
        self.e_len[n0:n] = lens
        self.e_ntok[n0:n] = ntok
        self.e_off[n0:n] = self.n_tok + np.cumsum(ntok) - ntok
        self.e_coff[n0:n] = self.n_chars + np.cumsum(lens) - lens
        self.t_ids[self.n_tok: self.n_tok + total] = list(chain.from_iterable(e[0] for e in encs))
        self.t_start[self.n_tok: self.n_tok + total] = list(chain.from_iterable(e[1] for e in encs))
        cp = _code_points("".join(keys))
        self.c_chars[self.n_chars: self.n_chars + nch] = cp
        self.c_ascii[self.n_chars: self.n_chars + nch] = cp if cp.dtype == np.uint8 else np.minimum(cp, 255)
        self.n_tok += total
        self.n_chars += nch
        self.n_entries = n
        self.strings += keys
        return n0

    def _arange32(self, n: int) -> np.ndarray:
        if len(self._ar32) < n:
            self._ar32 = np.arange(max(n, 2 * len(self._ar32)), dtype=np.int32)
        return self._ar32[:n]

    def _lookup(self, h: np.ndarray) -> np.ndarray:
        """The entry of each hash in the table (linear probing), -1 where absent."""
        mask = len(self._tab_key) - 1
        shift = np.uint64(64 - mask.bit_length())
        slot = (h >> shift).astype(np.int64)
        out = self._tab_val[slot]
        k = self._tab_key[slot]
        todo = np.flatnonzero((k != h) & (k != 0))
        out[k != h] = -1
        while len(todo):
            slot[todo] = (slot[todo] + 1) & mask
            k = self._tab_key[slot[todo]]
            hit = k == h[todo]
            out[todo[hit]] = self._tab_val[slot[todo[hit]]]
            todo = todo[~hit & (k != 0)]
        return out

    def _insert(self, keys: np.ndarray, entries: np.ndarray) -> None:
        """Add distinct hashes not in the table yet; the table is rebuilt 4x as large past a quarter full."""
        for key, e in zip(keys.tolist(), entries.tolist()):
            self.by_hash[key] = e
        if 4 * len(self.by_hash) > len(self._tab_key):
            size = len(self._tab_key)
            while 4 * len(self.by_hash) > size:
                size *= 4
            self._tab_key = np.zeros(size, np.uint64)
            self._tab_val = np.full(size, -1, np.int64)
            keys = np.fromiter(self.by_hash.keys(), np.uint64, len(self.by_hash))
            entries = np.fromiter(self.by_hash.values(), np.int64, len(self.by_hash))
        mask = len(self._tab_key) - 1
        shift = 64 - mask.bit_length()
        tk, tv = self._tab_key, self._tab_val
        for key, e in zip(keys.tolist(), entries.tolist()):
            slot = key >> shift
            while tk[slot] != 0:
                slot = (slot + 1) & mask
            tk[slot], tv[slot] = key, e

    def _cut_added(self, a: np.ndarray, cut: np.ndarray, pre: np.ndarray, ipw: np.ndarray) -> None:
        """Marks the start of every added token in ``a`` as a cut point. ``tokenizers`` splits a text at its
        added tokens (leftmost-longest matches) before anything else and encodes each part alone, so both ends
        of one are hard boundaries. Without this cut the piece that joins one chat turn to the next
        (" word<|im_end|>\\n<|im_start|>assistant\\nWord") is new in almost every record; with it, " word" and
        "<|im_end|>\\n<|im_start|>assistant\\nWord" are both common pieces (a cut at the end of the token too
        would only add pieces). Candidates are the positions of a first character of some added token; the
        window of the longest token's length there is hashed, and as a chat template writes the same few windows
        over and over, each distinct window is matched once (in Python, with the longest-first alternation of
        the added tokens), after every window is compared character by character with its group's first (a
        hash collision makes no cut in this batch). When two occurrences overlap, which one tokenizers takes
        depends on its scan: no cut is made in this batch either (cutting less is always exact)."""
        n = len(a)
        if len(self._first_cp) <= 3:  # a comparison per character beats a table lookup
            hit = a == self._first_cp[0]
            for c in self._first_cp[1:]:
                hit |= a == c
        elif a.dtype == np.uint8:
            hit = self._first[a]  # the table has at least 256 slots
        else:
            hit = self._first[np.minimum(a, len(self._first) - 1)]
        cand = np.flatnonzero(hit)
        if not len(cand):
            return
        w = self._alt_w
        length = np.zeros(len(cand), np.int64)  # of the longest added token at each candidate, 0: none
        tail = int(np.searchsorted(cand, n - w, "right"))  # windows from here on run past the end of the batch
        c = cand[:tail]
        if len(c):
            with np.errstate(over="ignore"):
                key = (pre[c + w] - pre[c]) * ipw[c]  # the window's hash
            _, first, inv = np.unique(key, return_index=True, return_inverse=True)
            win = np.lib.stride_tricks.sliding_window_view(a, w)[c]  # row copies: faster than a 2-D gather
            if not np.array_equal(win, win[first[inv.reshape(-1)]]):
                return  # a hash collision between different windows
            length[:tail] = np.fromiter(map(self._match, _text_of(win[first])), np.int64, len(first))[inv.reshape(-1)]
        for i in range(tail, len(cand)):
            length[i] = self._match(_text_of(a[cand[i]:][None])[0])
        found = np.flatnonzero(length)
        s = cand[found]
        if np.any(s[1:] < (s + length[found])[:-1]):
            return
        cut[s] = True

    def _match(self, t: str) -> int:
        """The length of the longest added token that ``t`` starts with, 0 if none."""
        m = self._added.match(t)
        return 0 if m is None else m.end()

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids of every text, concatenated (int32); each token's start in characters within the
        concatenation of the texts (int64); tokens per text (int64)."""
        fork_guard()
        if self.n_entries > self.max_entries:
            self._reset()
        lens = np.fromiter(map(len, texts), np.int64, len(texts))
        if len(texts) > 1 and lens.sum() > self._CHUNK:  # in parts: the hash tables grow with the batch
            ends = np.cumsum(lens)
            cut = max(1, min(len(texts) - 1, int(np.searchsorted(ends, ends[-1] // 2))))
            a, b = self.encode(texts[:cut]), self.encode(texts[cut:])
            return (np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1] + int(ends[cut - 1])]),
                    np.concatenate([a[2], b[2]]))
        s = "".join(texts)
        a = _code_points(s)
        n = len(a)
        tstart = np.cumsum(lens) - lens
        if n == 0:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(len(texts), np.int64)
        pw, ipw = self._powers(n + 1)
        if len(self._buf) < n + 1:  # reused: a fresh array of this size costs its page faults every batch
            self._buf = np.zeros(max(n + 1, 2 * len(self._buf)), np.uint64)
            self._arange = np.arange(len(self._buf), dtype=np.int64)
        pre = self._buf[: n + 1]  # pre[i]: sum of a[j] * B^j for j < i (mod 2^64)
        with np.errstate(over="ignore"):
            np.multiply(a, pw[:n], out=pre[1:], dtype=np.uint64)
            np.cumsum(pre[1:], out=pre[1:])
        # cut points: text starts, spaces that follow a non-whitespace character, starts of added tokens
        sp = np.flatnonzero(a[1:] == 32)  # spaces after the first character, less one
        cut = np.zeros(n, bool)
        cut[sp[~_is_space(a[sp])] + 1] = True
        cut[tstart[lens > 0]] = True
        if self._alt_w:
            self._cut_added(a, cut, pre, ipw)
        pstart = np.flatnonzero(cut)
        pend = np.empty_like(pstart)
        pend[:-1] = pstart[1:]
        pend[-1] = n
        plen = pend - pstart
        at_cuts = pre[np.append(pstart, n)]  # one gather serves both ends: a piece ends where the next starts
        with np.errstate(over="ignore"):
            h = ((at_cuts[1:] - at_cuts[:-1]) * ipw[pstart] + plen.astype(np.uint64)) | np.uint64(1)  # 0: empty slot
        # proposed entries: by hash, new pieces added
        idx = self._lookup(h)
        miss = np.flatnonzero(idx < 0)
        if len(miss):
            uh, first = np.unique(h[miss], return_index=True)
            first = miss[first]
            n0 = self._add([s[i:j] for i, j in zip(pstart[first].tolist(), pend[first].tolist())])
            self._insert(uh, np.arange(n0, self.n_entries))
            idx[miss] = self._lookup(h[miss])
        # exact: every character equals the proposed entry's (a hash collision is looked up by its string)
        bad = self.e_len[idx] != plen
        ok = np.flatnonzero(~bad)
        if len(ok) == len(idx):
            small = np.int32 if self.n_chars + n < 2**31 else np.int64  # half the index traffic when it fits
            at = np.repeat((self.e_coff[idx] - pstart).astype(small), plen)
            at += self._arange[:n].astype(small, copy=False) if small is np.int64 else self._arange32(n)
            expect = (self.c_ascii if a.dtype == np.uint8 else self.c_chars).take(at)
            if not np.array_equal(expect, a):
                bad[np.searchsorted(pstart, np.flatnonzero(expect != a), "right") - 1] = True
        else:  # lengths differ somewhere: compare the pieces of the right length only
            for i in ok.tolist():
                if self.strings[idx[i]] != s[pstart[i]: pend[i]]:
                    bad[i] = True
        for i in np.flatnonzero(bad).tolist():
            piece = s[pstart[i]: pend[i]]
            e = self.by_str.get(piece)
            if e is None:
                e = self.by_str[piece] = self._add([piece])
            idx[i] = e
        ntok = self.e_ntok[idx]
        ct = np.cumsum(ntok)
        total = int(ct[-1])
        # tokens per text: the tokens of the pieces that start inside it
        counts = np.diff(np.concatenate([[0], ct])[np.searchsorted(pstart, np.append(tstart, n))])
        pos = np.repeat(self.e_off[idx] - (ct - ntok), ntok) + np.arange(total)
        return self.t_ids[pos], self.t_start[pos] + np.repeat(pstart, ntok), counts


_POWERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # hash base -> its powers and their inverses


def _power_table(b: int, m: int) -> np.ndarray:
    """b^0 .. b^(m-1) mod 2^64, by doubling (each step one vector multiply; cumprod is a serial chain)."""
    out = np.empty(m, np.uint64)
    out[0] = 1
    k = 1
    with np.errstate(over="ignore"):
        while k < m:
            t = min(k, m - k)
            np.multiply(out[:t], np.uint64(pow(b, k, 1 << 64)), out=out[k: k + t])
            k += t
    return out


_SPACE = np.zeros(0x3002, bool)
_SPACE[[c for c in range(0x3001) if chr(c).isspace()]] = True  # no code point above U+3000 is whitespace


def _is_space(a: np.ndarray) -> np.ndarray:
    return _SPACE[a] if a.dtype == np.uint8 else _SPACE[np.minimum(a, 0x3001)]


def _text_of(rows: np.ndarray) -> list[str]:
    """The strings whose code points are the rows of ``rows`` (what _code_points gives, row by row)."""
    w = rows.shape[1]
    if rows.dtype == np.uint8:
        b = rows.tobytes().decode("ascii")
    else:
        b = rows.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
    return [b[i: i + w] for i in range(0, len(b), w)] if w else [""] * len(rows)


def _code_points(s: str) -> np.ndarray:
    """The code points of ``s``: uint8 for ASCII text, else uint32 (lone surrogates pass through)."""
    if s.isascii():
        return np.frombuffer(s.encode("ascii"), np.uint8)
    return np.frombuffer(s.encode("utf-32-le", "surrogatepass"), np.uint32)


def _first_at(decode, n: int, c: int) -> int:
    """The first token index j whose decoded prefix ``decode(j)`` is at least ``c`` characters long."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(mid)) >= c:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _not_prefix_stable(loc: str, turn: int, tokens: bool = False) -> str:
    what = "token ids" if tokens else "text"
    return (f"{loc}: the chat template is not prefix-stable: the {what} of messages[:{turn}] rendered with "
            f"add_generation_prompt=True is not a prefix of messages[:{turn + 1}] (or that of the whole "
            f"conversation), so the assistant turn {turn} cannot be located. train_on_responses_only needs a "
            f"template that renders earlier turns the same way whatever follows (templates that drop earlier "
            f"reasoning do not); pass train_on_responses_only=False or use such a template.")
