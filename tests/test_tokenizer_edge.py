"""minitrain.Tokenizer edge cases against transformers (the oracle): a Llama-3 style tokenizer whose
post-processor adds <|begin_of_text|> with the real Llama-3 template and a template using raise_exception,
system messages, tools, unknown variables, loop.last and namespace(); special tokens and text round trips;
the sandbox refusing unsafe attributes; errors naming the template's file and line."""
import json

import pytest

from minitrain.tokenizer import TemplateError, Tokenizer
from test_tokenizer import CORPUS, MESSAGES, build_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
# Meta's Llama-3 template: bos before the first message only, contents trimmed.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
# A Mistral/Gemma-like template: system message split off, tools as JSON, alternation enforced with
# raise_exception, namespace() carried out of the loop, loop.last, an unknown variable (renders as ''), a default.
FEATURES = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}{%- set system_message = 'You are helpful.' %}{%- set loop_messages = messages %}{%- endif %}
{{- bos_token }}SYSTEM: {{ system_message }}
{%- if tools is not none %}TOOLS: {{ tools | tojson }}{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
    [{{ message['role'] }}] {{ message['content'] }}{% if loop.last %}<|end_of_text|>{% endif %}{{ not_given }}
{%- endfor %}
{%- if add_generation_prompt %}[assistant]{% endif %} {{ date_string | default('26 Jul 2024') }} {{ ns.last_user }}"""

CONVS = [
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi 🎉 日本語"},
     {"role": "assistant", "content": "Hello.  "}, {"role": "user", "content": "More?"}],
    [{"role": "user", "content": "Only one"}],
    [{"role": "user", "content": "<|eot_id|> in text"}, {"role": "assistant", "content": ""}],
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Süche",
                                           "parameters": {"type": "object", "properties": {}}}}]


def build_llama3(tmp_path, template=LLAMA3):
    from tokenizers import Tokenizer as T, decoders, models, pre_tokenizers, processors, trainers

    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=LLAMA3_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(  # as Llama-3's tokenizer.json: BOS on every encode
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
           "eos_token": "<|eot_id|>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("template", ["llama3", "features"])
def test_templates_match_transformers_token_for_token(tmp_path, template):
    d = build_llama3(tmp_path, {"llama3": LLAMA3, "features": FEATURES}[template])
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for conv in CONVS:
        for gen in (False, True):
            for kw in ({}, {"tools": TOOLS}, {"date_string": "1 Jan"}):
                text = ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **kw)
                assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **kw)
                ids = ours.apply_chat_template(conv, add_generation_prompt=gen, **kw)
                assert ids == ref.apply_chat_template(conv, add_generation_prompt=gen, return_dict=False, **kw)
                assert ids.count(ours.bos_token_id) == 1 and ids[0] == ours.bos_token_id  # the template's, once
    if template == "features":
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        with pytest.raises(TemplateError, match=r"tokenizer_config.json key 'chat_template'\) raised while rendering "
                                                r"at template line 9: Conversation roles must alternate"):
            ours.apply_chat_template(bad)
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            ref.apply_chat_template(bad)


def test_special_tokens_and_round_trips_match_transformers(tmp_path):
    d = build_llama3(tmp_path)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (0, 4, None)  # no pad token: None, as there
    texts = ["", " ", "héllo wörld 日本語 🎉👍🏽 \u00a0\r\n\t", "<|unknown|> not a token <|eot_id|>",
             "x" * 5000 + " 🎉" * 500, "\x00\x01 control"]
    for text in texts:
        for add in (True, False):
            assert ours.encode(text, add) == ref.encode(text, add_special_tokens=add), (text[:30], add)
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids) == text  # byte-level BPE: lossless
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text.replace("<|eot_id|>", "")
    assert ours.encode("") == [0]  # the post-processor's BOS alone


@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",  # prints '' in plain jinja2's sandbox (and transformers) instead of refusing
    "{{ messages.__class__ }}",
    "{% if messages[0].__class__ %}x{% endif %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append }}",  # a mutating method of the immutable sandbox
])
def test_unsafe_attribute_is_refused(tmp_path, source):
    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    with pytest.raises(TemplateError, match=r"the given chat template raised while rendering at template line 1: "
                                            r"access to attribute '\w+' of '\w+' object is unsafe"):
        tok.apply_chat_template(MESSAGES, chat_template=source)


def test_safe_templates_still_render(tmp_path):
    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    for source, want in [("{{ not_defined }}|{{ not_defined is defined }}|{{ messages[0].content.upper() }}",
                          "|False|BE BRIEF."),
                         ("{{ messages | map(attribute='role') | join(',') }}", "system,user,assistant,user")]:
        assert tok.apply_chat_template(MESSAGES, chat_template=source, tokenize=False) == want


@pytest.mark.parametrize("where", ["jinja", "json", "config"])
def test_syntax_error_names_the_template_file_and_line(tmp_path, where):
    bad = "{% for m in messages %}\n{{ m['content'] }}\n{% if %}\n{% endfor %}"
    d = build_tokenizer(tmp_path, template=bad if where == "config" else None)
    if where == "jinja":
        (d / "chat_template.jinja").write_text(bad)
    elif where == "json":
        (d / "chat_template.json").write_text(json.dumps({"chat_template": bad}))
    tok = Tokenizer.from_pretrained(d)
    file = {"jinja": r"chat_template\.jinja", "json": r"chat_template\.json key 'chat_template'",
            "config": r"tokenizer_config\.json key 'chat_template'"}[where]
    with pytest.raises(TemplateError, match=rf"^{tmp_path}: the checkpoint's chat template \({file}\) does not "
                                            r"compile \(template line 3\): Expected an expression"):
        tok.apply_chat_template(MESSAGES)
    tok.set_chat_template("{{ x")  # replaced: no longer the file's template
    with pytest.raises(TemplateError, match=r"the checkpoint's chat template does not compile \(template line 1\)"):
        tok.apply_chat_template(MESSAGES)


def test_batch_with_a_non_string_names_its_index(tmp_path):
    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    assert tok(["a", ""])["input_ids"] == [tok.encode("a"), tok.encode("")]
    with pytest.raises(TypeError, match=r"encode_batch: texts\[1\] is a NoneType, expected a str"):
        tok(["a", None])
    with pytest.raises(TypeError, match=r"encode_batch: texts\[0\] is a int, expected a str"):
        tok.encode_batch([3])


def test_transformers_only_options_are_refused_not_ignored(tmp_path):
    # each would change transformers' result; before, it became an unused template variable and was ignored
    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    msgs = MESSAGES[1:3]
    for kw in ({"continue_final_message": True}, {"return_dict": True}, {"return_tensors": "pt"},
               {"padding": "max_length", "max_length": 64}, {"truncation": True},
               {"return_assistant_tokens_mask": True}):
        with pytest.raises(TypeError, match=rf"apply_chat_template: {next(iter(kw))}=.* is not supported here"):
            tok.apply_chat_template(msgs, **kw)
    # their "off" values are accepted, so calls written for transformers still work
    assert tok.apply_chat_template(msgs, return_dict=False, continue_final_message=False, padding=False) == \
        tok.apply_chat_template(msgs)


def test_reasoning_fields_aliased_like_transformers(tmp_path):
    # transformers 5 gives templates a message's reasoning as reasoning_content and thinking, whichever the
    # data used (Qwen3 templates read the first, gpt-oss the second)
    d = build_tokenizer(tmp_path)
    ours, ref = Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(str(d))
    source = ("{% for m in messages %}[{{ m.role }}|{{ m.reasoning_content }}|{{ m.thinking }}|{{ m.reasoning }}]"
              "{{ m.content }}{% endfor %}")
    for field in ("reasoning_content", "thinking", "reasoning"):
        msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", field: "add them"}]
        want = ref.apply_chat_template(msgs, chat_template=source, tokenize=False)
        assert ours.apply_chat_template(msgs, chat_template=source, tokenize=False) == want, field
        assert "add them|add them" in want and list(msgs[1]) == ["role", "content", field]  # caller's dict kept


def test_decode_negative_id_is_a_clear_error(tmp_path):
    import torch

    tok = Tokenizer.from_pretrained(build_tokenizer(tmp_path))
    ids = tok.encode("hello there")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "hello there"
    with pytest.raises(ValueError, match=r"decode: token ids must be >= 0, got -100 at position 2 \(-100 is the "
                                         r"labels' ignore index; decode input_ids instead\)"):
        tok.decode(torch.tensor(ids[:2] + [-100]))
    with pytest.raises(ValueError, match=r"got -1 at position 0$"):
        tok.batch_decode([ids, [-1]])
