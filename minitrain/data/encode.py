"""Turning normalized examples into token ids and a trained-token mask, with the model's chat template.

Assistant spans come from the rendered template, never from string search in the content: for assistant
turn i, the render of ``messages[:i]`` with ``add_generation_prompt=True`` ends where the turn's trained span
starts, and the render of ``messages[:i+1]`` ends where it stops (so the end-of-turn token is trained too).
This holds for any template whose renders of prefixes are prefixes of the whole ("prefix-stable"); it is
checked on every record and a template that is not gets a clear error.

The tokenizer is used through a small interface (``encode``, ``apply_chat_template``, ``eos_token_id``). When it
exposes a ``tokenizers.Tokenizer``, whole batches go through its Rust ``encode_batch`` and spans are mapped from
characters to tokens with the offsets; the first record of each kind is checked against the tokenizer's own
methods and the per-record path is used if they disagree.
"""
from __future__ import annotations

from bisect import bisect_left

import numpy as np

from .sources import DataError


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
    """Encodes batches of normalized examples into ``(ids, trained)`` pairs (int list, bool ndarray)."""

    def __init__(self, tokenizer, train_on_responses_only: bool = True, use_batch_api: bool = True):
        self.tok = tokenizer
        self.responses_only = train_on_responses_only
        self.backend = find_backend(tokenizer) if use_batch_api else None
        self.eos = getattr(tokenizer, "eos_token_id", None)
        self._raw_fast = self._chat_fast = self.backend is not None
        self._raw_checked = self._chat_checked = False

    # ---- raw text: the whole document is trained, EOS closes it so packed documents stay apart
    def encode_raw(self, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
        if self._raw_fast and not self._raw_checked:
            self._raw_checked = True
            if self.backend.encode(texts[0], add_special_tokens=True).ids != list(self.tok.encode(texts[0])):
                self._raw_fast = False  # the wrapper adds something of its own: follow the wrapper
        if self._raw_fast:
            enc = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            all_ids = [e.ids for e in enc(texts, add_special_tokens=True)]
        else:
            all_ids = [list(self.tok.encode(t)) for t in texts]
        out = []
        for ids in all_ids:
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids.append(self.eos)
            out.append((ids, np.ones(len(ids), dtype=bool)))
        return out

    # ---- chat: rendered with the template, assistant spans found from prefix renders
    def _render(self, msgs, loc, gen=False, tokenize=False):
        try:
            return self.tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=tokenize)
        except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad roles) become data errors
            raise DataError(f"{loc}: the chat template failed on this conversation: {e}") from None

    def _char_spans(self, msgs, loc) -> tuple[str, list[tuple[int, int]]]:
        full = self._render(msgs, loc)
        if not self.responses_only:
            return full, [(0, len(full))]
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            pre = self._render(msgs[:i], loc, gen=True)
            post = full if i == len(msgs) - 1 else self._render(msgs[: i + 1], loc)
            if not (post.startswith(pre) and full.startswith(post)):
                raise DataError(_not_prefix_stable(loc, i))
            spans.append((len(pre), len(post)))
        return full, spans

    def _token_spans(self, msgs, loc) -> tuple[list[int], np.ndarray]:
        """The per-record path, through the tokenizer's own methods. Spans are the same character spans as
        the batch path, mapped to tokens with decoded-prefix lengths (a token belongs to a span when it starts
        inside it); if decoding does not give the rendered text back, token-level prefixes are used instead."""
        full = _as_ids(self._render(msgs, loc, tokenize=True))
        mask = np.zeros(len(full), dtype=bool)
        if not self.responses_only:
            mask[:] = True
            return full, mask
        text, spans = self._char_spans(msgs, loc)
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

    def encode_chat(self, convs: list[list[dict]], locs: list[str]) -> list[tuple[list[int], np.ndarray]]:
        if self._chat_fast and not self._chat_checked:
            self._chat_checked = True
            text, _ = self._char_spans(convs[0], locs[0])
            fast = self.backend.encode(text, add_special_tokens=False).ids
            if fast != _as_ids(self._render(convs[0], locs[0], tokenize=True)):
                self._chat_fast = False
        if not self._chat_fast:
            return [self._token_spans(m, loc) for m, loc in zip(convs, locs)]
        rendered = [self._char_spans(m, loc) for m, loc in zip(convs, locs)]
        encs = self.backend.encode_batch([t for t, _ in rendered], add_special_tokens=False)
        out = []
        for (_, spans), e in zip(rendered, encs):
            ids = e.ids
            starts = [s for s, _ in e.offsets]
            mask = np.zeros(len(ids), dtype=bool)
            for a, b in spans:
                # a token belongs to the span when it starts inside it (a token merged across the span's
                # start belongs to the prompt; the end-of-turn token is inside the span)
                mask[bisect_left(starts, a): bisect_left(starts, b)] = True
            out.append((ids, mask))
        return out


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
