"""Tokenizer: the `tokenizers` library over tokenizer.json, special tokens from tokenizer_config.json and
generation_config.json, and chat templates rendered in jinja2's sandbox the way transformers renders them.

Method names are the ones transformers users know: ``encode``, ``decode``, ``apply_chat_template``,
``eos_token_id``, ``pad_token_id``, ``bos_token_id``, ``__call__``.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

# Built-in templates for checkpoints that ship none (written here from each format's public description).
BUILTIN_TEMPLATES = {
    "llama-3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% else %}{{ raise_exception('alpaca template: unknown role ' + message['role']) }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# transformers' apply_chat_template options not implemented here, with the value that means "off" (accepted).
_UNSUPPORTED_CHAT_OPTIONS = {"continue_final_message": False, "return_dict": False, "return_tensors": None,
                             "padding": False, "truncation": False, "max_length": None,
                             "return_assistant_tokens_mask": False, "sanitize_control_tokens": False,
                             "tokenizer_kwargs": None}


class TemplateError(ValueError):
    """A chat template failed to compile or raised while rendering."""


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class GenerationTag(jinja2.ext.Extension):
        # transformers' {% generation %}...{% endgeneration %} marks assistant text; it renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # like transformers: plain json.dumps (jinja's own tojson escapes HTML characters)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Sandbox(ImmutableSandboxedEnvironment):
        # jinja2's sandbox answers an unsafe attribute (``''.__class__``) with an Undefined that prints as ''
        # (transformers renders that silently); a template reaching for one is refused instead.
        def unsafe_undefined(self, obj, attribute):
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe "
                                "(chat templates run in jinja2's sandbox)")

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception raised from while rendering: jinja2 rewrites the traceback so that
    template code shows as frames of the file "<template>" at template line numbers; the innermost wins."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(messages) -> list[dict]:
    """The messages as transformers 5 gives them to templates: a message's reasoning, under whichever of
    ``_REASONING_FIELDS`` it comes first, also as ``reasoning_content`` and (unless set) ``thinking``, so
    Qwen3-style and gpt-oss-style templates both see it. The caller's dicts are not changed."""
    out = []
    for m in messages:
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # {"__type": "AddedToken", "content": ...}
        return v["content"]
    raise ValueError(f"tokenizer_config.json: special token must be a string or {{'content': ...}}, got {v!r}")


# Conversations on which a fast renderer must equal the template: system prompt or not, multi-turn, an
# assistant first, nothing at all, contents with surrounding whitespace, markers, Jinja syntax and unicode.
_PROBES = [
    [],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": " spaced \n"},
     {"role": "assistant", "content": "\n\tok  "}, {"role": "user", "content": ""},
     {"role": "assistant", "content": "<|im_end|>{{ x }}{% if %}<|eot_id|>"}],
    [{"role": "assistant", "content": "first"}, {"role": "user", "content": "héllo 日本語 ✓ \u00a0"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late system"}],
]


def prefix_spans(render, messages) -> tuple[str, list[tuple[int, int]]] | None:
    """The rendered conversation and the character span of each assistant turn, from prefix renders: turn i
    starts where ``render(messages[:i], add_generation_prompt=True)`` ends and stops where
    ``render(messages[:i+1])`` ends. None when those renders are not prefixes of the whole (the template is
    not prefix-stable for this conversation)."""
    full = render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre = render(messages[:i], add_generation_prompt=True)
        post = full if i == len(messages) - 1 else render(messages[: i + 1], add_generation_prompt=False)
        if not (post.startswith(pre) and full.startswith(post)):
            return None
        spans.append((len(pre), len(post)))
    return full, spans


def _renderer_candidates(tok: "Tokenizer", chat_template: str | None):
    """Plain-Python renderers of known template families, parameterized from the tokenizer (bos token) and
    from one render of the template (a default system prompt)."""

    def family(prefix_of, turn, gen: str):
        """A renderer: prefix_of(messages) (depending on messages[0] only) + turn(m) for every message + gen when
        asked; ``render.spans(messages)`` gives the text and each assistant turn's content span in one pass (the
        prefix render of messages[:i] with the generation prompt ends after gen, that of messages[:i+1] after the
        turn), None where messages[:0] renders another prefix than the whole (not prefix-stable)."""
        empty = prefix_of([])

        def render(messages, add_generation_prompt=False):
            return prefix_of(messages) + "".join(map(turn, messages)) + (gen if add_generation_prompt else "")

        def spans(messages):
            head = prefix_of(messages)
            if messages and messages[0]["role"] == "assistant" and head != empty:
                return None
            out, at, sp = [head], len(head), []
            for m in messages:
                t = turn(m)
                if m["role"] == "assistant":
                    sp.append((at + len(gen), at + len(t)))
                out.append(t)
                at += len(t)
            return "".join(out), sp

        render.spans = spans
        return render

    def chatml(default_system: str | None):
        head = "" if default_system is None else f"<|im_start|>system\n{default_system}<|im_end|>\n"
        return family(lambda ms: head if ms and ms[0]["role"] != "system" else "",
                      lambda m: f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", "<|im_start|>assistant\n")

    def llama3(bos: str):
        return family(lambda ms: bos,
                      lambda m: f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>",
                      "<|start_header_id|>assistant<|end_header_id|>\n\n")

    yield chatml(None)
    try:
        one = tok.render_chat([{"role": "user", "content": "x"}], False, chat_template)
    except Exception:  # noqa: BLE001
        one = ""
    start, end = "<|im_start|>system\n", "<|im_end|>\n"
    if one.startswith(start) and end in one:
        yield chatml(one[len(start): one.index(end)])
    yield llama3(tok.bos_token or "")


class Tokenizer:
    """A tokenizer.json tokenizer with special tokens and a chat template.

    Build with :meth:`from_pretrained` (a checkpoint directory) or directly from a ``tokenizers.Tokenizer``.
    """

    def __init__(self, tok, config: dict | None = None, generation_config: dict | None = None,
                 chat_template: str | None = None, name: str = "tokenizer"):
        from tokenizers import AddedToken

        self._tok = tok
        self.name = name
        config = dict(config or {})
        self.config = config
        # Added tokens that tokenizer_config.json declares but tokenizer.json lacks.
        for sid, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            content = spec.get("content") if isinstance(spec, dict) else None
            if content is None or tok.token_to_id(content) is not None:
                continue
            at = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                            rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                            special=spec.get("special", True))
            (tok.add_special_tokens if spec.get("special", True) else tok.add_tokens)([at])
        self.special_tokens = {k: _token_str(config.get(k)) for k in _SPECIAL_KEYS if config.get(k) is not None}
        for k, v in self.special_tokens.items():
            if tok.token_to_id(v) is None:
                raise ValueError(f"{name}: {k} {v!r} from tokenizer_config.json is not in the vocabulary")
        gen = generation_config or {}
        self.generation_config = dict(gen)
        gen_eos = gen.get("eos_token_id")
        gen_eos = [] if gen_eos is None else ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos))
        if "eos_token" not in self.special_tokens and gen_eos:
            self.special_tokens["eos_token"] = tok.id_to_token(gen_eos[0])
        if "bos_token" not in self.special_tokens and gen.get("bos_token_id") is not None:
            self.special_tokens["bos_token"] = tok.id_to_token(gen["bos_token_id"])
        # Token ids that end a generation: the tokenizer's eos plus generation_config's (possibly a list).
        self.eos_token_ids = sorted(set(gen_eos) | ({self.eos_token_id} if self.eos_token_id is not None else set()))
        # transformers 5 applies this clean-up only to WordPiece models (it corrupts byte-level BPE text)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and \
            type(tok.model).__name__ == "WordPiece"
        self.model_max_length = config.get("model_max_length")
        self.chat_template = chat_template
        # the file in the checkpoint directory (``name``) the template came from, for error messages
        self.chat_template_origin: str | None = None

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.jinja) from a
        directory."""
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            have = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
            raise FileNotFoundError(f"{d}: no tokenizer.json (only the fast-tokenizer format is read; "
                                    f"tokenizer.model / vocab files are not). Directory holds: {have}")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a plain Exception on bad files
            raise ValueError(f"{tj}: could not be read as a tokenizers file: {e}") from None
        config = _read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
        template = None
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8")
            origin = "chat_template.jinja"
        elif (d / "chat_template.json").is_file():
            template = _read_json(d / "chat_template.json").get("chat_template")
            origin = "chat_template.json key 'chat_template'"
        else:
            template = config.get("chat_template")
            origin = "tokenizer_config.json key 'chat_template'"
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        out = cls(tok, config, gen, template, name=str(d))
        out.source_dir = str(d)
        if template is not None:
            out.chat_template_origin = origin
        return out

    # -- special tokens ----------------------------------------------------------------------------
    def _id(self, key: str) -> int | None:
        t = self.special_tokens.get(key)
        return None if t is None else self._tok.token_to_id(t)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # -- encode / decode ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: expected a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: texts[{i}] is a {type(t).__name__}, expected a str")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True):
        """(ids, [(start, end) character offsets]) for each token."""
        e = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return e.ids, e.offsets

    def __call__(self, text, add_special_tokens: bool = True) -> dict:
        """{"input_ids": ..., "attention_mask": ...} for a string or a list of strings (no padding)."""
        ids = self.encode(text, add_special_tokens) if isinstance(text, str) else self.encode_batch(text, add_special_tokens)
        mask = [1] * len(ids) if isinstance(text, str) else [[1] * len(x) for x in ids]
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        if ids and min(ids) < 0:  # tokenizers: "OverflowError: number too small to fit in target type"
            i = next(i for i, t in enumerate(ids) if t < 0)
            raise ValueError(f"decode: token ids must be >= 0, got {ids[i]} at position {i}"
                             + (" (-100 is the labels' ignore index; decode input_ids instead)" if ids[i] == -100 else ""))
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_decode(self, seqs, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    # -- chat templates ----------------------------------------------------------------------------
    def set_chat_template(self, template: str) -> None:
        """Use a built-in template by name ("llama-3", "chatml", "alpaca") or a Jinja source string."""
        self.chat_template = BUILTIN_TEMPLATES.get(template, template)
        self.chat_template_origin = None

    def default_template_name(self) -> str:
        """The built-in template that fits this vocabulary: llama-3 or chatml if their markers exist."""
        if self._tok.token_to_id("<|start_header_id|>") is not None:
            return "llama-3"
        if self._tok.token_to_id("<|im_start|>") is not None:
            return "chatml"
        return "alpaca"

    def _template(self, chat_template: str | None = None) -> tuple[str, str]:
        """(a label for error messages, the Jinja source) of the template in use."""
        source = chat_template or self.chat_template
        if source in BUILTIN_TEMPLATES:
            return f"built-in template {source!r}", BUILTIN_TEMPLATES[source]
        if source is None:
            name = self.default_template_name()
            return f"built-in template {name!r}", BUILTIN_TEMPLATES[name]
        if chat_template is not None:
            return "the given chat template", source
        origin = getattr(self, "chat_template_origin", None)
        return "the checkpoint's chat template" + (f" ({origin})" if origin else ""), source

    def fast_chat_renderer(self, chat_template: str | None = None):
        """A plain-Python renderer ``f(messages, add_generation_prompt=False) -> str`` for the template, when it
        belongs to a known family (ChatML with or without a default system prompt as in SmolLM2, Llama-3 with
        trimmed contents) and renders every probe conversation of ``_PROBES`` byte for byte like the jinja2
        sandbox; None otherwise. About 20x faster than jinja2's sandbox. Callers that render many records
        should still compare a sample against ``render_chat`` (``minitrain.data`` does).

        The renderer has a ``spans(messages)`` attribute: the render and the assistant turns' character spans
        in one pass, equal to ``prefix_spans`` over the template on every probe (None where that is None)."""
        label, source = self._template(chat_template)
        cache = self.__dict__.setdefault("_fast_renderers", {})
        if source not in cache:
            cache[source] = None
            for cand in _renderer_candidates(self, chat_template):
                try:
                    slow = lambda m, add_generation_prompt: self.render_chat(m, add_generation_prompt, chat_template)  # noqa: E731
                    if all(cand(m, g) == slow(m, g) for m in _PROBES for g in (False, True)) and \
                            all(cand.spans(m) == prefix_spans(slow, m) for m in _PROBES):
                        cache[source] = cand
                        break
                except Exception:  # noqa: BLE001 - a template that fails on a probe has no fast renderer
                    break
        return cache[source]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, chat_template: str | None = None,
                    **kwargs: Any) -> str:
        """The chat rendered to text (what ``apply_chat_template(..., tokenize=False)`` returns)."""
        import jinja2

        label, source = self._template(chat_template)
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("apply_chat_template: messages must be a list of dicts with 'role' and 'content'")
        try:
            tmpl = _compile(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"{self.name}: {label} does not compile (template line {e.lineno}): {e.message}") \
                from None
        context = {"tools": None, "documents": None}  # always defined, as transformers passes them
        context.update(self.special_tokens)
        context.update(kwargs)
        try:
            return tmpl.render(messages=_alias_reasoning(messages), add_generation_prompt=add_generation_prompt,
                               **context)
        except Exception as e:
            line = _template_line(e)
            at = "" if line is None else f" at template line {line}"
            if isinstance(e, jinja2.TemplateError):
                raise TemplateError(f"{self.name}: {label} raised while rendering{at}: {e}") from None
            # a template error surfacing as a Python error (KeyError, TypeError, ...)
            raise TemplateError(f"{self.name}: {label} failed while rendering{at}: {type(e).__name__}: {e}") from None

    def apply_chat_template(self, messages: list[dict] | list[list[dict]], add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None, **kwargs: Any):
        """Render a conversation (or a list of conversations) with the chat template.

        Args:
            messages: [{"role": ..., "content": ...}, ...] or a list of such conversations.
            add_generation_prompt: append the header that starts an assistant turn.
            tokenize: return token ids (encoded without adding special tokens, as transformers does) instead
                of the text.
            chat_template: a Jinja source or a built-in name, overriding the tokenizer's own.
            **kwargs: extra variables for the template (tools, documents, date strings, ...).
        Returns:
            str or list[int]; a list of those for a list of conversations.
        Raises:
            TemplateError naming the template when it does not compile or raises.
        """
        # transformers' options that change what comes back; passed on they would only be template variables
        # and the result would silently differ from transformers'
        unsupported = {k: v for k, v in kwargs.items() if k in _UNSUPPORTED_CHAT_OPTIONS and
                       v != _UNSUPPORTED_CHAT_OPTIONS[k]}
        if unsupported:
            raise TypeError(f"apply_chat_template: {', '.join(f'{k}={v!r}' for k, v in unsupported.items())} is not "
                            "supported here (it returns the text or a list of token ids; pad, truncate or continue the "
                            "final message separately)")
        kwargs = {k: v for k, v in kwargs.items() if k not in _UNSUPPORTED_CHAT_OPTIONS}
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        convs = messages if batched else [messages]
        texts = [self.render_chat(c, add_generation_prompt, chat_template, **kwargs) for c in convs]
        out = [self.encode(t, add_special_tokens=False) for t in texts] if tokenize else texts
        return out if batched else out[0]

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and, unless the directory has
        one, generation_config.json."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.update(self.special_tokens)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        if self.generation_config and not (d / "generation_config.json").exists():
            (d / "generation_config.json").write_text(json.dumps(self.generation_config, indent=2), encoding="utf-8")

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'built-in'})")
