"""Dataset formats: detection from a record's fields and normalization to text or chat messages.

raw           {"text": str}                                          continued pretraining, every token trained
instruct      {"instruction": str, "input": str?, "output": str,     one user/assistant exchange; the input is
               "system": str?}                                       appended to the instruction after a blank line
conversation  {"messages": [{"role", "content"}, ...]} or ShareGPT {"conversations": [{"from", "value"}, ...]}
preference    {"prompt", "chosen", "rejected"}: strings, or lists of messages (the prompt may be a conversation)

A normalized example is ``{"text": str}`` (raw) or ``{"messages": [...]}`` (chat), plus
``"rejected_messages"`` for preference records (SFT trains on the chosen answer; the rejected one is kept for
preference training).
"""
from __future__ import annotations

import json

from .sources import DataError

FORMATS = ("raw", "instruct", "conversation", "preference")
EXPECTED = {
    "raw": "'text' (a string)",
    "instruct": "'instruction' and 'output' (strings; 'input' and 'system' optional)",
    "conversation": "'messages' (a list of {'role', 'content'}) or 'conversations' (ShareGPT: a list of "
                    "{'from', 'value'})",
    "preference": "'prompt', 'chosen' and 'rejected' (strings, or lists of {'role', 'content'})",
}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant"}


def expected_text() -> str:
    return "; ".join(f"{k}: {v}" for k, v in EXPECTED.items())


def detect_format(record: dict, loc: str) -> str:
    """The format of a record, from its field names."""
    keys = set(record)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "preference"
    if "messages" in keys or "conversations" in keys:
        return "conversation"
    if {"instruction", "output"} <= keys:
        return "instruct"
    if "text" in keys:
        return "raw"
    raise DataError(f"{loc}: cannot detect the dataset format: found fields {sorted(keys)}; expected "
                    f"{expected_text()}. Rename fields with field_map={{'found': 'expected'}} or pass format=...")


def _field(record: dict, key: str, loc: str, fmt: str, optional: bool = False):
    if key not in record or (optional and record[key] is None):
        if optional:
            return None
        raise DataError(f"{loc}: missing field '{key}' (format '{fmt}' expects {EXPECTED[fmt]}); "
                        f"found fields {sorted(record)}")
    return record[key]


def _string(record: dict, key: str, loc: str, fmt: str, optional: bool = False) -> str | None:
    v = _field(record, key, loc, fmt, optional)
    if v is None and not optional:  # JSON null in a required field: never the text "None"
        raise DataError(f"{loc}: field '{key}' should be a string, got null (format '{fmt}' expects {EXPECTED[fmt]})")
    if v is not None and not isinstance(v, str):
        raise DataError(f"{loc}: field '{key}' should be a string, got {type(v).__name__}: {str(v)[:60]!r}")
    return v


def _maybe_json(v, key: str, loc: str):
    """CSV cells hold strings: a list of messages arrives as its JSON text."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            return json.loads(v)
        except json.JSONDecodeError as e:
            raise DataError(f"{loc}: field '{key}' looks like a JSON list but does not parse ({e.msg})") from None
    return v


def _messages(v, key: str, loc: str, sharegpt: bool) -> list[dict]:
    v = _maybe_json(v, key, loc)
    if not isinstance(v, list) or not v:
        raise DataError(f"{loc}: field '{key}' should be a non-empty list of messages, got "
                        f"{type(v).__name__}: {str(v)[:60]!r}")
    out = []
    rk, ck = ("from", "value") if sharegpt else ("role", "content")
    for j, m in enumerate(v):
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise DataError(f"{loc}: {key}[{j}] should be an object with '{rk}' and '{ck}', got {str(m)[:80]!r}")
        role, content = m[rk], m[ck]
        if sharegpt:
            if not isinstance(role, str) or role not in SHAREGPT_ROLES:
                raise DataError(f"{loc}: {key}[{j}]: unknown ShareGPT 'from' {role!r}; known: "
                                f"{', '.join(f'{a}->{b}' for a, b in SHAREGPT_ROLES.items())}")
            role = SHAREGPT_ROLES[role]
        elif role not in ROLES:
            raise DataError(f"{loc}: {key}[{j}]: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{loc}: {key}[{j}].{ck} should be a string, got "
                            f"{'null' if content is None else type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _turns(v, key: str, loc: str, default_role: str) -> list[dict]:
    """A preference field: a plain string (one message of ``default_role``) or a list of messages. A string is
    taken as a list of messages only when it is the JSON text of a list of objects (a CSV cell); any other
    string, "[INST] ..." or "[1, 2, 3]" included, is the message's text."""
    if isinstance(v, str):
        t = v.lstrip()
        parsed = None
        if t.startswith("["):
            try:
                parsed = json.loads(t)
            except json.JSONDecodeError as e:
                if t[1:].lstrip().startswith("{"):  # meant as messages: say why it does not parse
                    raise DataError(f"{loc}: field '{key}' looks like a JSON list of messages but does not parse "
                                    f"({e.msg})") from None
        if not (isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed)):
            return [{"role": default_role, "content": v}]
        v = parsed
    if not isinstance(v, list) or not v:
        raise DataError(f"{loc}: field '{key}' should be a string or a non-empty list of messages, got "
                        f"{'null' if v is None else type(v).__name__}: {str(v)[:60]!r}")
    return _messages(v, key, loc, sharegpt=isinstance(v[0], dict) and "from" in v[0])


def normalize(record: dict, fmt: str, loc: str, system_prompt: str | None = None) -> dict:
    """A record of format ``fmt`` as ``{"text"}`` or ``{"messages"[, "rejected_messages"]}``.

    Raises:
        DataError: a missing field or a field of the wrong type, naming the location.
    """
    if fmt == "raw":
        text = record.get("text")
        return {"text": text if type(text) is str else _string(record, "text", loc, fmt)}
    if fmt == "instruct":
        get = record.get  # the common record (all fields strings) without the checks' calls; else checked below
        instruction, inp, output, system = get("instruction"), get("input"), get("output"), get("system")
        if type(instruction) is str and type(output) is str and (inp is None or type(inp) is str) and \
                (system is None or type(system) is str):
            user = instruction if not inp or not inp.strip() else f"{instruction}\n\n{inp}"
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            if system:
                msgs.insert(0, {"role": "system", "content": system})
            return {"messages": _with_system(msgs, system_prompt)}
        instruction = _string(record, "instruction", loc, fmt)
        inp = _string(record, "input", loc, fmt, optional=True)
        output = _string(record, "output", loc, fmt)
        system = _string(record, "system", loc, fmt, optional=True)
        user = instruction if not inp or not inp.strip() else f"{instruction}\n\n{inp}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if system:
            msgs.insert(0, {"role": "system", "content": system})
        return {"messages": _with_system(msgs, system_prompt)}
    if fmt == "conversation":
        key = "messages" if "messages" in record else "conversations"
        msgs = _messages(_field(record, key, loc, fmt), key, loc, sharegpt=key == "conversations")
        return {"messages": _with_system(msgs, system_prompt)}
    if fmt == "preference":
        prompt = _turns(_field(record, "prompt", loc, fmt), "prompt", loc, "user")
        chosen = _turns(_field(record, "chosen", loc, fmt), "chosen", loc, "assistant")
        rejected = _turns(_field(record, "rejected", loc, fmt), "rejected", loc, "assistant")
        return {"messages": _with_system(prompt + chosen, system_prompt),
                "rejected_messages": _with_system(prompt + rejected, system_prompt)}
    raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _with_system(msgs: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and msgs[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + msgs
    return msgs
