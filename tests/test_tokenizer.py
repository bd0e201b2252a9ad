"""minitrain.Tokenizer against transformers' tokenizer (the oracle) on a tiny byte-level BPE built here:
encode, decode, special tokens and chat-template output (text and ids), plus the error paths."""
import json

import pytest

from minitrain.tokenizer import BUILTIN_TEMPLATES, TemplateError, Tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris!",
    "Tokenizers split text into pieces; numbers like 12345 and 3.14 too. Don't, can't, it's.",
    "Ünïcödé text: café, naïve, 日本語, emoji 🎉 and tabs\tand\nnew lines.",
    "def f(x):\n    return x * 2  # code with indentation",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_WITH_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Exercises what transformers gives templates: trim_blocks/lstrip_blocks, tojson (non-ASCII kept, indent),
# namespace, loop controls, raise_exception, special-token variables, extra kwargs.
FEATURES = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
[{{ message['role'] | upper }}] {{ message['content'] | trim }}{{ eos_token if message['role'] == 'assistant' }}
{% endfor %}
{% if tools is defined %}tools={{ tools | tojson(indent=2) }}{% endif %}
{{ {'n': ns.n, 'word': 'café'} | tojson }}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?  "},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 日本"},
]


def build_tokenizer(tmp_path, template=CHATML_WITH_SYSTEM, template_file=False, post_bos=False, extra_config=None):
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers, processors, trainers

    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                           special_tokens=[("<|im_start|>", 1)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    n = tok.get_vocab_size()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
           "pad_token": "<|endoftext|>", "unk_token": None, "clean_up_tokenization_spaces": False,
           "added_tokens_decoder": {
               **{str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                           "single_word": False} for i, s in enumerate(SPECIALS)},
               str(n): {"content": "<tool_call>", "special": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False}}}  # declared only here, not in tokenizer.json
    cfg = {k: v for k, v in cfg.items() if v is not None}
    cfg.update(extra_config or {})
    if template is not None and template_file:
        (tmp_path / "chat_template.jinja").write_text(template)
    elif template is not None:
        cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


TEXTS = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\n\nnew lines  ",
    "Ünïcödé café 日本語 🎉 Don't stop 12345",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",  # special tokens in the text
    "a <tool_call> token added from tokenizer_config.json",
    "",
]


@pytest.mark.parametrize("post_bos", [False, True])  # with a post-processor that adds a BOS token
def test_encode_decode_match_transformers(tmp_path, post_bos):
    d = build_tokenizer(tmp_path, post_bos=post_bos)
    ours = Tokenizer.from_pretrained(d)
    ref = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    assert ours.encode(TEXTS[4], add_special_tokens=False).count(ref.convert_tokens_to_ids("<tool_call>")) == 1
    batch = ours(TEXTS[:3])
    assert batch["input_ids"] == ref(TEXTS[:3])["input_ids"]
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 0)
    assert len(ours) == len(ref)


def test_clean_up_tokenization_spaces_matches_transformers(tmp_path):
    # transformers 5 ignores the flag for BPE (the clean-up would corrupt the text); so do we
    d = build_tokenizer(tmp_path, extra_config={"clean_up_tokenization_spaces": True})
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    text = "Hello , world ! Is it ? I 'm sure it 's fine , isn 't it ."
    ids = ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids) == text


@pytest.mark.parametrize("template, template_file", [
    (CHATML_WITH_SYSTEM, False),  # from tokenizer_config.json
    (FEATURES, True),  # from chat_template.jinja
])
def test_chat_template_matches_transformers(tmp_path, template, template_file):
    d = build_tokenizer(tmp_path, template=template, template_file=template_file)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    tools = [{"name": "lookup", "description": "Süche", "parameters": {"q": "string"}}]
    for msgs in (MESSAGES, MESSAGES[1:]):
        for gen in (False, True):
            for kw in ({}, {"tools": tools}):
                text = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, **kw)
                assert text == ref.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False, **kw)
                ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, **kw)
                assert ids == ref.apply_chat_template(msgs, add_generation_prompt=gen, return_dict=False, **kw)
    batched = ours.apply_chat_template([MESSAGES, MESSAGES[1:]], tokenize=False)
    assert batched == [ours.apply_chat_template(MESSAGES, tokenize=False),
                       ours.apply_chat_template(MESSAGES[1:], tokenize=False)]


def test_builtin_templates_render_like_transformers(tmp_path):
    d = build_tokenizer(tmp_path, template=None)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert ours.chat_template is None and ours.default_template_name() == "chatml"  # vocab has <|im_start|>
    for name, src in BUILTIN_TEMPLATES.items():
        for gen in (False, True):
            got = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False, chat_template=name)
            assert got == ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False,
                                                  chat_template=src), name
    assert ours.apply_chat_template(MESSAGES[1:2], tokenize=False) == \
        "<|im_start|>user\nWhat is the capital of France?  <|im_end|>\n"
    assert ours.apply_chat_template(MESSAGES[1:3], tokenize=False, chat_template="llama-3") == (
        "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>")
    assert ours.apply_chat_template(MESSAGES[1:3], tokenize=False, chat_template="alpaca", add_generation_prompt=True) \
        == "### Instruction:\nWhat is the capital of France?  \n\n### Response:\nParis.<|im_end|>\n\n### Response:\n"
    ours.set_chat_template("alpaca")
    assert ours.chat_template == BUILTIN_TEMPLATES["alpaca"]


def test_generation_config_eos_list(tmp_path):
    d = build_tokenizer(tmp_path)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = Tokenizer.from_pretrained(d)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [0, 2]
    out = tmp_path / "saved"
    tok.save_pretrained(out)
    again = Tokenizer.from_pretrained(out)
    assert again.eos_token_ids == [0, 2] and again.chat_template == tok.chat_template
    assert again.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_template_that_raises_names_the_template(tmp_path):
    d = build_tokenizer(tmp_path, template=FEATURES)
    tok = Tokenizer.from_pretrained(d)
    with pytest.raises(TemplateError, match=r"test_template_that_raises_name.*: the checkpoint's chat template "
                       r"\(tokenizer_config.json key 'chat_template'\) raised while rendering at template line 5: "
                       r"Unknown role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(TemplateError, match="built-in template 'alpaca' raised while rendering at template line 9: alpaca template: unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], chat_template="alpaca")
    with pytest.raises(TemplateError, match=r"the given chat template does not compile \(template line 1\)"):
        tok.apply_chat_template(MESSAGES, chat_template="{% for m in messages %}{{ m }")
    with pytest.raises(TemplateError, match="failed while rendering at template line 1: TypeError: can only concatenate str"):
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages[0]['content'] + 1 }}")


def test_template_is_sandboxed(tmp_path):
    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    with pytest.raises(TemplateError, match="unsafe|not safely callable|SecurityError|raised"):
        tok.apply_chat_template(MESSAGES, chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        tok.apply_chat_template(MESSAGES, chat_template="{% set _ = messages.append(1) %}")  # immutable


def test_strftime_now_available(tmp_path):
    import datetime

    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    year = tok.apply_chat_template(MESSAGES, tokenize=False, chat_template="{{ strftime_now('%Y') }}")
    assert year == str(datetime.datetime.now().year)


def test_missing_and_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    d = build_tokenizer(tmp_path)
    (d / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: invalid JSON at line 1"):
        Tokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' from tokenizer_config.json is not in the vocabulary"):
        Tokenizer.from_pretrained(d)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: could not be read"):
        Tokenizer.from_pretrained(d)


@pytest.mark.parametrize("template", ["chatml", "llama-3", "system", "alpaca", "features"])
def test_fast_chat_renderer_equals_jinja_or_is_refused(tmp_path, template):
    """The fast renderer exists for the ChatML (with or without a default system prompt) and Llama-3 families and
    then renders every conversation byte for byte like the jinja2 sandbox; other templates get none."""
    source = {"system": CHATML_WITH_SYSTEM, "features": FEATURES}.get(template, template)
    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    tok.set_chat_template(source)
    fast = tok.fast_chat_renderer()
    if template in ("alpaca", "features"):
        assert fast is None
        return
    assert fast is not None
    convs = [MESSAGES, MESSAGES[1:], MESSAGES[:1], [], [{"role": "assistant", "content": " x "}],
             [{"role": "user", "content": "\n\n  tabs\tand ✓ 🎉 {{ not jinja }}  "}, {"role": "assistant", "content": ""}]]
    for conv in convs:
        for gen in (False, True):
            assert fast(conv, add_generation_prompt=gen) == tok.render_chat(conv, gen), (conv, gen)
    if template == "system":  # the default system prompt was read from the template, not assumed
        assert fast(MESSAGES[1:2]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
