"""minitrain.data: sources, formats, chat rendering, response-only masking, packing, mixing, resume, errors.

A tiny byte-level BPE is trained here on a few sentences, with ChatML and Llama-3 style special tokens, and
wrapped in a small adapter exposing the tokenizer interface the data module uses (encode, decode,
apply_chat_template, eos/pad/bos ids), so these tests do not depend on minitrain.tokenizer; a last test runs
the same checks through minitrain.tokenizer's Tokenizer and its built-in templates when it is there.
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minitrain.data import DataError, load_dataset, packed_attention_mask

SPECIALS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is the capital.",
          "user assistant system instruction input output", "Translate to German: good morning -> Guten Morgen",
          "Numbers 0123456789 and symbols: ,.;:!?()[]{}<>\n\n", "héllo wörld ünïcode ✓ 日本語"] * 3
# Two template families written here in their public shape: ChatML (SmolLM2, Qwen) and Llama-3.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
END = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>"}
# Not prefix-stable: the header depends on how many messages follow.
UNSTABLE = "{{ messages | length }}|" + CHATML


@pytest.fixture(scope="module")
def backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


class TinyTok:
    """The tokenizer interface of minitrain.data, over a tokenizers.Tokenizer, with a sandboxed jinja2 template."""

    def __init__(self, tk, template=CHATML, bos=None):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.tk, self.bos_token = tk, bos
        self.template = ImmutableSandboxedEnvironment().from_string(template)

    eos_token_id = property(lambda self: self.tk.token_to_id("<eos>"))
    pad_token_id = property(lambda self: self.tk.token_to_id("<pad>"))
    bos_token_id = property(lambda self: None if self.bos_token is None else self.tk.token_to_id(self.bos_token))

    def encode(self, text, add_special_tokens=True):
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_special_tokens and self.bos_token else []) + ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "")
        return self.tk.encode(text, add_special_tokens=False).ids if tokenize else text


@pytest.fixture(params=["chatml", "llama3"])
def family(request, backend):
    if request.param == "chatml":
        return "chatml", TinyTok(backend, CHATML)
    return "llama3", TinyTok(backend, LLAMA3, bos="<|begin_of_text|>")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def runs(ds, i):
    """Example i as [(trained, decoded text)] runs of equal mask (label 0 counted as untrained)."""
    item = ds[i]
    ids, trained = item["input_ids"].tolist(), (item["labels"] != -100).tolist()
    trained[0] = False
    out, s = [], 0
    for e in range(1, len(ids) + 1):
        if e == len(ids) or trained[e] != trained[s]:
            out.append((trained[s], ds.tokenizer.decode(ids[s:e])))
            s = e
    return out


def check_masking(ds, i, convo, end):
    """Token by token: labels equal input_ids exactly on the assistant turns (content + end of turn), -100
    elsewhere; the trained runs decode to the assistant turns, in order, and every turn is trained."""
    item = ds[i]
    lab, ids = item["labels"], item["input_ids"]
    on = lab != -100
    assert torch.equal(lab[on], ids[on])
    trained = [t for tr, t in runs(ds, i) if tr]
    want = [m["content"].strip() + end for m in convo if m["role"] == "assistant"]
    assert trained == want, f"trained runs {trained!r} != assistant turns {want!r}"
    untrained = "".join(t for tr, t in runs(ds, i) if not tr)
    for m in convo:
        if m["role"] != "assistant":
            assert m["content"].strip() in untrained


MULTI = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Germany?"},
         {"role": "assistant", "content": "Berlin, the capital."}]


@pytest.mark.parametrize("batch_api", [True, False])
def test_conversation_masking_every_turn(tmp_path, family, batch_api):
    name, tok = family
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}, {"messages": MULTI[1:3]}])
    ds = load_dataset(f, tok, max_seq_length=512, use_batch_api=batch_api)
    assert ds.sources[0].formats == {"conversation": 2}
    check_masking(ds, 0, MULTI, END[name])
    check_masking(ds, 1, MULTI[1:3], END[name])
    # the input ids are exactly the template's own rendering
    assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(MULTI)


def test_batch_api_and_per_record_paths_agree(tmp_path, family):
    _, tok = family
    recs = [{"messages": MULTI}, {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}]
    f1 = write_jsonl(tmp_path / "a.jsonl", recs[:1])
    f2 = write_jsonl(tmp_path / "b.jsonl", recs[1:])
    a = load_dataset([f1, f2], tok, use_batch_api=True)
    b = load_dataset([f1, f2], tok, use_batch_api=False)
    for i in range(2):
        assert torch.equal(a[i]["input_ids"], b[i]["input_ids"]) and torch.equal(a[i]["labels"], b[i]["labels"])


def test_instruct_becomes_user_assistant_exchange(tmp_path, family):
    name, tok = family
    recs = [{"instruction": "Translate to German", "input": "good morning", "output": "Guten Morgen"},
            {"instruction": "Say hi", "input": "", "output": "hi", "system": "Be nice."}]
    ds = load_dataset(write_jsonl(tmp_path / "i.jsonl", recs), tok)
    assert ds.format_of == ["instruct", "instruct"]
    convo0 = [{"role": "user", "content": "Translate to German\n\ngood morning"},
              {"role": "assistant", "content": "Guten Morgen"}]
    assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(convo0)
    check_masking(ds, 0, convo0, END[name])
    convo1 = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Say hi"},
              {"role": "assistant", "content": "hi"}]
    assert ds[1]["input_ids"].tolist() == tok.apply_chat_template(convo1)


def test_sharegpt_roles_mapped(tmp_path, backend):
    tok = TinyTok(backend)
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q?"},
                             {"from": "gpt", "value": "A."}]}
    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", [rec]), tok)
    want = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."}]
    assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(want)
    check_masking(ds, 0, want, END["chatml"])
    bad = {"conversations": [{"from": "alien", "value": "x"}]}
    with pytest.raises(DataError, match=r"s2.jsonl:1.*unknown ShareGPT 'from' 'alien'"):
        load_dataset(write_jsonl(tmp_path / "s2.jsonl", [bad]), tok)


def test_preference_keeps_chosen_and_rejected(tmp_path, backend):
    tok = TinyTok(backend)
    recs = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Berlin."},
            {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", recs), tok)
    assert ds.format_of == ["preference"] * 2
    assert [t for tr, t in runs(ds, 0) if tr] == ["Paris.<|im_end|>\n"]  # SFT trains on the chosen answer
    item = ds[0]
    rid, rlab = item["rejected_input_ids"], item["rejected_labels"]
    want = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Berlin."}]
    assert rid.tolist() == tok.apply_chat_template(want)
    assert tok.decode(rid[rlab != -100].tolist()) == "Berlin.<|im_end|>\n"
    batch = next(iter(ds.train_batches(batch_size=2, packing=False, rejected=True)))
    assert {"input_ids", "labels", "rejected_input_ids", "rejected_labels", "rejected_attention_mask"} <= set(batch)
    assert batch["rejected_input_ids"].shape[0] == 2


def test_raw_text_all_trained_with_eos_and_split(tmp_path, backend):
    tok = TinyTok(backend)
    (tmp_path / "t.txt").write_text("The quick brown fox.\nSecond line.\n\n\nWhat is the capital?\n")
    ds = load_dataset(tmp_path / "t.txt", tok)
    assert len(ds) == 2 and ds.format_of == ["raw", "raw"]
    ids = ds[0]["input_ids"].tolist()
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "The quick brown fox.\nSecond line."
    assert torch.equal(ds[0]["labels"], ds[0]["input_ids"])
    long_text = "The quick brown fox jumps over the lazy dog. " * 20
    n = len(tok.encode(long_text)) + 1
    ds = load_dataset(write_jsonl(tmp_path / "r.jsonl", [{"text": long_text}]), tok, max_seq_length=16)
    assert len(ds) == math.ceil(n / 16) and ds.sources[0].split == 1  # raw documents are split, not truncated
    pieces = torch.cat([ds[i]["input_ids"] for i in range(len(ds))]).tolist()
    assert pieces == tok.encode(long_text) + [tok.eos_token_id]
    ds = load_dataset(tmp_path / "t.txt", tok, txt_split="file")
    assert len(ds) == 1
    # a wrapper whose encode adds BOS itself (not through tokenizer.json): its own encode is followed
    btok = TinyTok(backend, LLAMA3, bos="<|begin_of_text|>")
    ds = load_dataset(tmp_path / "t.txt", btok)
    assert ds[1]["input_ids"].tolist() == btok.encode("What is the capital?") + [btok.eos_token_id]
    assert ds[1]["input_ids"][0].item() == btok.bos_token_id


def test_every_source_type_gives_the_same_examples(tmp_path, backend):
    tok = TinyTok(backend)
    recs = [{"instruction": f"Say {w}", "input": "", "output": w} for w in ("hi", "yo", "hey")]
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "a.jsonl", recs[:1])
    (d / "b.json").write_text(json.dumps(recs[1:2]))
    (d / "c.csv").write_text("instruction,input,output\n" + f"Say {recs[2]['output']},,{recs[2]['output']}\n")
    (tmp_path / "all.json").write_text(json.dumps({"data": recs}))
    write_jsonl(tmp_path / "all.jsonl", recs)
    ref = load_dataset(tmp_path / "all.jsonl", tok)
    for src in (d, tmp_path / "all.json"):
        ds = load_dataset(src, tok)
        assert len(ds) == 3
        for i in range(3):
            assert torch.equal(ds[i]["input_ids"], ref[i]["input_ids"]), (src, i)
            assert torch.equal(ds[i]["labels"], ref[i]["labels"]), (src, i)
    # a CSV column holding a JSON list of messages
    (tmp_path / "m.csv").write_text('messages\n"' + json.dumps(MULTI[1:3]).replace('"', '""') + '"\n')
    ds = load_dataset(tmp_path / "m.csv", tok)
    assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(MULTI[1:3])


def test_format_override_and_field_map(tmp_path, backend):
    tok = TinyTok(backend)
    f = write_jsonl(tmp_path / "q.jsonl", [{"question": "Q?", "answer": "A.", "text": "ignored"}])
    ds = load_dataset(f, tok, field_map={"question": "instruction", "answer": "output"}, format="instruct")
    assert [t for tr, t in runs(ds, 0) if tr] == ["A.<|im_end|>\n"]
    ds = load_dataset(f, tok)  # detection picks raw from 'text'
    assert ds.format_of == ["raw"]


def test_detection_failure_lists_fields_and_formats(tmp_path, backend):
    f = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q", "reply": "A"}])
    with pytest.raises(DataError) as e:
        load_dataset(f, TinyTok(backend))
    msg = str(e.value)
    assert "x.jsonl:1" in msg and "['question', 'reply']" in msg
    for want in ("raw: 'text'", "instruct: 'instruction' and 'output'", "'messages'", "'conversations'",
                 "preference: 'prompt', 'chosen' and 'rejected'"):
        assert want in msg


def test_records_without_trained_tokens_are_refused_with_a_count(tmp_path, backend):
    tok = TinyTok(backend)
    recs = [{"messages": MULTI}, {"messages": [{"role": "user", "content": "hello?"}]},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}]}]
    with pytest.warns(UserWarning, match="2 examples have no trained token"):
        ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", recs), tok)
    assert len(ds) == 1 and ds.sources[0].refused == 2
    with pytest.raises(DataError, match="empty dataset.*2 without any trained token"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dataset(write_jsonl(tmp_path / "d.jsonl", recs[1:]), tok)


def test_overflow_truncate_drop_error(tmp_path, backend):
    tok = TinyTok(backend)
    long = {"instruction": "Say the fox sentence", "output": "The quick brown fox jumps over the lazy dog. " * 8}
    short = {"instruction": "Say hi", "output": "hi"}
    f = write_jsonl(tmp_path / "o.jsonl", [long, short, long])
    with pytest.warns(UserWarning, match="2 examples longer than max_seq_length=40 were truncated"):
        ds = load_dataset(f, tok, max_seq_length=40)
    assert len(ds) == 3 and ds.store.lengths.max() == 40 and ds.sources[0].truncated == 2
    assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(
        [{"role": "user", "content": long["instruction"]}, {"role": "assistant", "content": long["output"]}])[:40]
    with pytest.warns(UserWarning, match="2 examples .* were dropped"):
        ds = load_dataset(f, tok, max_seq_length=40, overflow="drop")
    assert len(ds) == 1
    with pytest.raises(DataError, match=r"o.jsonl:1: \d+ tokens, longer than max_seq_length=40"):
        load_dataset(f, tok, max_seq_length=40, overflow="error")


def test_bad_input_errors(tmp_path, backend):
    tok = TinyTok(backend)
    good = json.dumps({"text": "fine"})
    f = tmp_path / "m.jsonl"
    f.write_text(f"{good}\n{{\"text\": \"broken\"\n{good}\n[1, 2]\n")
    with pytest.raises(DataError, match=r"m.jsonl:2: malformed JSON.*skip_bad_lines=True"):
        load_dataset(f, tok)
    with pytest.warns(UserWarning, match="2 bad lines/records skipped"):
        ds = load_dataset(f, tok, skip_bad_lines=True)
    assert len(ds) == 2 and ds.sources[0].skipped == 2
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(DataError, match=r"e.jsonl: empty file"):
        load_dataset(tmp_path / "e.jsonl", tok)
    (tmp_path / "e.json").write_text("  \n")
    with pytest.raises(DataError, match=r"e.json: empty file"):
        load_dataset(tmp_path / "e.json", tok)
    write_jsonl(tmp_path / "mf.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(DataError, match=r"mf.jsonl:2: missing field 'output'"):
        load_dataset(tmp_path / "mf.jsonl", tok)
    write_jsonl(tmp_path / "wt.jsonl", [{"instruction": "a", "output": 3}])
    with pytest.raises(DataError, match=r"wt.jsonl:1: field 'output' should be a string, got int"):
        load_dataset(tmp_path / "wt.jsonl", tok)
    write_jsonl(tmp_path / "wm.jsonl", [{"messages": "hello"}])
    with pytest.raises(DataError, match=r"wm.jsonl:1: field 'messages' should be a non-empty list"):
        load_dataset(tmp_path / "wm.jsonl", tok)
    write_jsonl(tmp_path / "wr.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"unknown role 'robot'"):
        load_dataset(tmp_path / "wr.jsonl", tok)
    raw = (good + "\n").encode() + b'{"text": "caf\xe9"}\n'
    (tmp_path / "u.jsonl").write_bytes(raw)
    with pytest.raises(DataError, match=rf"u.jsonl:2: not UTF-8: byte 0xe9 at byte offset {raw.index(0xe9)}"):
        load_dataset(tmp_path / "u.jsonl", tok)
    (tmp_path / "u.txt").write_bytes(b"ok\n\nbad \xff here\n")
    with pytest.raises(DataError, match=r"u.txt:3: not UTF-8: byte 0xff at byte offset 8"):
        load_dataset(tmp_path / "u.txt", tok)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unknown file type"):
        load_dataset(tmp_path / "x.parquet", tok)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.jsonl", tok)


def test_template_not_prefix_stable_is_refused_clearly(tmp_path, backend):
    tok = TinyTok(backend, UNSTABLE)
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}])
    for api in (True, False):
        with pytest.raises(DataError, match=r"c.jsonl:1: the chat template is not prefix-stable"):
            load_dataset(f, tok, use_batch_api=api)
    ds = load_dataset(f, tok, train_on_responses_only=False)  # training on everything needs no spans
    assert (ds[0]["labels"] != -100).all()


def make_instruct(tmp_path, name, n, tag):
    recs = [{"instruction": f"{tag} question {i}" + " more" * (i % 7), "output": f"answer {i}" + " x" * (i % 5)}
            for i in range(n)]
    return write_jsonl(tmp_path / name, recs)


def test_packing_streams_positions_and_boundaries(tmp_path, backend):
    tok = TinyTok(backend)
    ds = load_dataset(make_instruct(tmp_path, "a.jsonl", 40, "a"), tok, max_seq_length=64)
    loader = ds.train_batches(batch_size=3, packing=True)
    plan = loader.plan(0)
    seen = []
    for batch, rows in zip(loader, plan):
        B, T = batch["input_ids"].shape
        assert len(rows) == B and T <= 64
        cu = batch["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == B * T and all(a < b for a, b in zip(cu, cu[1:]))
        assert batch["max_seqlen"].item() == max(b - a for a, b in zip(cu, cu[1:]))
        flat_ids, flat_pos, flat_lab = (batch[k].reshape(-1).tolist() for k in ("input_ids", "position_ids", "labels"))
        starts = set(cu[:-1])
        for b, row in enumerate(rows):
            t = b * T
            for i in row:
                ids, lab = ds[i]["input_ids"].tolist(), ds[i]["labels"].tolist()
                n = len(ids)
                assert t in starts and flat_ids[t: t + n] == ids  # the document's tokens, unchanged
                assert flat_pos[t: t + n] == list(range(n))  # positions restart at 0
                assert flat_lab[t] == -100 and flat_lab[t + 1: t + n] == lab[1:]  # no cross-document target
                t += n
                seen.append(i)
            end = (b + 1) * T
            assert all(x == ds.pad_id for x in flat_ids[t:end]) and all(x == -100 for x in flat_lab[t:end])
        assert batch["n_items"].item() == (batch["labels"][:, 1:] != -100).sum().item() > 0
    assert sorted(seen) == list(range(40))  # every example once per epoch


def test_padded_batches_are_length_bucketed(tmp_path, backend):
    tok = TinyTok(backend)
    ds = load_dataset(make_instruct(tmp_path, "a.jsonl", 64, "a"), tok, max_seq_length=256)
    loader = ds.train_batches(batch_size=4, packing=False)
    seen, padded, n_tok = [], 0, 0
    for batch, idx in zip(loader, loader.plan(0)):
        lens = [len(ds[i]["input_ids"]) for i in idx]
        assert batch["input_ids"].shape == (len(idx), max(lens))
        assert batch["attention_mask"].sum(1).tolist() == lens
        for b, i in enumerate(idx):
            assert batch["input_ids"][b, : lens[b]].tolist() == ds[i]["input_ids"].tolist()
            assert batch["position_ids"][b, : lens[b]].tolist() == list(range(lens[b]))
        padded += batch["input_ids"].numel()
        n_tok += sum(lens)
        seen += idx
    assert sorted(seen) == list(range(64))
    order = ds.epoch_order("train", 0)
    unsorted = sum(max(ds.store.lengths[order[j: j + 4]]) * len(order[j: j + 4]) for j in range(0, 64, 4))
    assert padded <= unsorted and padded - n_tok < 0.5 * (unsorted - n_tok) + 4  # bucketing removes padding
    b = next(iter(ds.train_batches(batch_size=4, packing=False, pad_to_multiple_of=16)))
    assert b["input_ids"].shape[1] % 16 == 0


def test_mixing_proportions_and_determinism(tmp_path, backend):
    tok = TinyTok(backend)
    a, b = make_instruct(tmp_path, "a.jsonl", 10, "a"), make_instruct(tmp_path, "b.jsonl", 40, "b")
    ds = load_dataset([(a, 0.7), (b, 0.3)], tok)
    for epoch in range(3):
        order = ds.epoch_order("train", epoch)
        counts = np.bincount(ds.source_of[order], minlength=2)
        assert counts.tolist() == [35, 15]  # round(0.7 * 50), round(0.3 * 50): small a is repeated
        assert set(np.unique(order[ds.source_of[order] == 0])) == set(range(10))
    assert not np.array_equal(ds.epoch_order("train", 0), ds.epoch_order("train", 1))
    ds2 = load_dataset([(a, 0.7), (b, 0.3)], tok)
    assert np.array_equal(ds.epoch_order("train", 2), ds2.epoch_order("train", 2))
    ds3 = load_dataset([(a, 0.7), (b, 0.3)], tok, seed=1)
    assert not np.array_equal(ds.epoch_order("train", 0), ds3.epoch_order("train", 0))
    with pytest.raises(DataError, match="weight to every source or to none"):
        load_dataset([(a, 0.7), b], tok)


def test_eval_split_fraction_and_count(tmp_path, backend):
    tok = TinyTok(backend)
    f = make_instruct(tmp_path, "a.jsonl", 50, "a")
    ds = load_dataset(f, tok, eval_split=0.1)
    assert len(ds.eval_idx) == 5 and len(ds.train_idx) == 45
    assert not set(ds.eval_idx) & set(ds.train_idx)
    assert not set(ds.eval_idx) & set(ds.epoch_order("train", 0))
    ds2 = load_dataset(f, tok, eval_split=7)
    assert len(ds2.eval_idx) == 7
    assert np.array_equal(load_dataset(f, tok, eval_split=0.1).eval_idx, ds.eval_idx)
    ev = [b for b in ds.eval_batches(batch_size=2)]
    assert sum(b["input_ids"].shape[0] for b in ev) == 5
    with pytest.raises(DataError, match="leaves no training example"):
        load_dataset(f, tok, eval_split=50)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_is_exact(tmp_path, backend, packing):
    tok = TinyTok(backend)
    a, b = make_instruct(tmp_path, "a.jsonl", 12, "a"), make_instruct(tmp_path, "b.jsonl", 30, "b")
    ds = load_dataset([(a, 0.5), (b, 0.5)], tok, max_seq_length=64)

    def stream(loader, n):
        out = []
        while len(out) < n:
            for batch in loader:
                out.append(batch)
                if len(out) == n:
                    break
        return out

    full = stream(ds.train_batches(batch_size=2, packing=packing), 3 * len(ds.train_batches(2, packing)))
    cut = len(ds.train_batches(2, packing)) + 2  # in the middle of the second epoch
    loader = ds.train_batches(batch_size=2, packing=packing)
    stream(loader, cut)
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    fresh = load_dataset([(a, 0.5), (b, 0.5)], tok, max_seq_length=64).train_batches(batch_size=2, packing=packing)
    fresh.load_state_dict(state)
    rest = stream(fresh, len(full) - cut)
    for x, y in zip(full[cut:], rest):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="does not match"):
        ds.train_batches(batch_size=3, packing=packing).load_state_dict(state)


class TinyCausalLM(torch.nn.Module):
    """Embedding → one attention block with rotary positions from position_ids (SDPA) → MLP → lm head."""

    def __init__(self, V, C=32, H=2):
        super().__init__()
        self.H, self.D = H, C // H
        self.emb = torch.nn.Embedding(V, C)
        self.qkv = torch.nn.Linear(C, 3 * C)
        self.o = torch.nn.Linear(C, C)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(C, 4 * C), torch.nn.GELU(), torch.nn.Linear(4 * C, C))
        self.head = torch.nn.Linear(C, V)

    def rope(self, x, pos):  # x (B, H, T, D), pos (B, T)
        inv = 1.0 / 10000 ** (torch.arange(0, self.D, 2, dtype=torch.float32) / self.D)
        ang = pos[:, None, :, None].float() * inv  # (B, 1, T, D/2)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, ids, pos, mask):  # mask (B, 1, T, T) bool, True = attend
        B, T = ids.shape
        x = self.emb(ids)
        q, k, v = self.qkv(x).view(B, T, 3, self.H, self.D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = F.scaled_dot_product_attention(self.rope(q, pos), self.rope(k, pos), v, attn_mask=mask)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, -1))
        return self.head(x + self.mlp(x))


def test_packed_loss_equals_documents_one_by_one(tmp_path, backend):
    tok = TinyTok(backend)
    recs = [{"messages": MULTI}] + [{"instruction": f"Say {w}", "output": f"{w} there"}
                                    for w in ("hi", "yo", "hey", "ok")]
    ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", recs), tok, max_seq_length=128)
    model = TinyCausalLM(backend.get_vocab_size()).double()
    loader = ds.train_batches(batch_size=2, packing=True)
    total, n_items, docs = 0.0, 0, []
    for batch, rows in zip(loader, loader.plan(0)):
        B, T = batch["input_ids"].shape
        assert any(len(r) > 1 for r in rows)
        mask = packed_attention_mask(batch["cu_seqlens"], B, T)
        logits = model(batch["input_ids"], batch["position_ids"], mask)
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum")
        n_items += batch["n_items"].item()
        docs += [i for r in rows for i in r]
    packed = total / n_items
    one_sum, one_n = 0.0, 0
    for i in docs:
        ids, lab = ds[i]["input_ids"][None], ds[i]["labels"][None]
        T = ids.shape[1]
        logits = model(ids, torch.arange(T)[None], torch.ones(T, T, dtype=torch.bool).tril()[None, None])
        one_sum += F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")
        one_n += (lab[0, 1:] != -100).sum().item()
    assert n_items == one_n
    assert torch.allclose(packed, one_sum / one_n, rtol=1e-10, atol=1e-12), (packed.item(), (one_sum / one_n).item())
    # without the block-diagonal mask, documents would see each other: the loss must differ
    batch = next(iter(ds.train_batches(batch_size=2, packing=True)))
    B, T = batch["input_ids"].shape
    crossed = model(batch["input_ids"], batch["position_ids"], torch.ones(T, T, dtype=torch.bool).tril()[None, None])
    inside = model(batch["input_ids"], batch["position_ids"], packed_attention_mask(batch["cu_seqlens"], B, T))
    assert not torch.allclose(crossed, inside)


def test_summary_is_readable(tmp_path, backend):
    tok = TinyTok(backend)
    ds = load_dataset([make_instruct(tmp_path, "a.jsonl", 20, "a"),
                       write_jsonl(tmp_path / "c.jsonl", [{"messages": MULTI}])],
                      tok, eval_split=2)
    s = ds.summary(n_examples=1)
    assert "21 examples (19 train / 2 eval)" in s and "a.jsonl" in s and "instruct 20" in s and "conversation 1" in s
    assert "Token length histogram" in s and "trained:" in s
    assert "<|im_start|>assistant\n[[answer 0<|im_end|>\n]]" in s


def test_with_minitrain_tokenizer_builtin_templates(tmp_path, backend):
    tokenizer = pytest.importorskip("minitrain.tokenizer")
    for template, end, bos in (("chatml", END["chatml"], None), ("llama-3", END["llama3"], "<|begin_of_text|>")):
        config = {"eos_token": "<eos>", "pad_token": "<pad>"} | ({"bos_token": bos} if bos else {})
        tok = tokenizer.Tokenizer(backend, config=config, chat_template=template)
        recs = [{"messages": MULTI}, {"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}]
        ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", recs), tok)
        assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(MULTI)
        check_masking(ds, 0, MULTI, end)
        ref = load_dataset(write_jsonl(tmp_path / "c.jsonl", recs), tok, use_batch_api=False)
        assert all(torch.equal(ds[i]["labels"], ref[i]["labels"]) for i in range(2))


@pytest.mark.filterwarnings("ignore:.*were truncated")
def test_streaming_batches_do_not_change_the_result(tmp_path, backend):
    tok = TinyTok(backend)
    a = make_instruct(tmp_path, "a.jsonl", 23, "a")
    t = tmp_path / "t.txt"
    t.write_text("\n\n".join(f"doc {i} " + "the fox " * i for i in range(9)))
    ref = load_dataset([a, t], tok, max_seq_length=32)
    small = load_dataset([a, t], tok, max_seq_length=32, batch_records=4)
    assert len(ref) == len(small) and np.array_equal(ref.store.ids, small.store.ids)
    assert np.array_equal(ref.store.mask, small.store.mask) and ref.locations == small.locations


def test_public_api_and_system_prompt(tmp_path, backend):
    import minitrain

    assert minitrain.load_dataset is load_dataset
    tok = TinyTok(backend)
    ds = load_dataset(write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Q?", "output": "A."}]), tok,
                      system_prompt="Be brief.")
    want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."}]
    assert ds[0]["input_ids"].tolist() == tok.apply_chat_template(want)


def test_packed_loss_equals_documents_one_by_one_on_minitrain_model(tmp_path, backend):
    model_mod = pytest.importorskip("minitrain.model")
    tok = TinyTok(backend, LLAMA3, bos="<|begin_of_text|>")
    recs = [{"messages": MULTI}] + [{"instruction": f"Say {w}", "input": "now", "output": f"{w} there"}
                                    for w in ("hi", "yo", "hey")]
    ds = load_dataset(write_jsonl(tmp_path / "c.jsonl", recs), tok, max_seq_length=96)
    args = model_mod.ModelArgs(vocab_size=backend.get_vocab_size(), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = model_mod.LlamaForCausalLM(args).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    total, n_items, docs = 0.0, 0, []
    loader = ds.train_batches(batch_size=4, packing=True)
    for batch, rows in zip(loader, loader.plan(0)):
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])  # documents found from positions
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                 ignore_index=-100, reduction="sum")
        n_items += batch["n_items"].item()
        docs += [i for r in rows for i in r]
    assert sorted(docs) == list(range(len(ds)))
    assert any(len(row) > 1 for rows in loader.plan(0) for row in rows)  # several documents per row
    one_sum, one_n = 0.0, 0
    for i in docs:
        ids, lab = ds[i]["input_ids"][None], ds[i]["labels"][None]
        logits = model(ids)
        one_sum += F.cross_entropy(logits[0, :-1], lab[0, 1:], ignore_index=-100, reduction="sum")
        one_n += (lab[0, 1:] != -100).sum().item()
    assert n_items == one_n
    packed, single = total / n_items, one_sum / one_n
    assert torch.allclose(packed, single, rtol=1e-9, atol=1e-12), (packed.item(), single.item())


def test_pack_rows_first_fit():
    from minitrain.data.batching import pack_rows

    lengths = np.array([60, 10, 60, 10, 60, 10, 64, 1])
    rows = pack_rows(np.arange(8), lengths, 64)
    assert rows == [[0, 7], [1, 3, 5], [2], [4], [6]]  # 5 rows where closing a row at the first misfit needs 7
    assert rows == pack_rows(np.arange(8), lengths, 64)  # deterministic
    rows = pack_rows(np.arange(8), lengths, 64, open_rows=1)  # one open row: the sequential greedy
    assert rows == [[0], [1], [2], [3], [4], [5], [6], [7]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, 500)
    rows = pack_rows(rng.permutation(500), lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(lengths[r].sum() <= 256 for r in rows)
    assert lengths.sum() / (256 * len(rows)) > 0.9  # rows are filled


def test_worker_processes_give_the_same_dataset(tmp_path, backend):
    tok = TinyTok(backend, LLAMA3, bos="<|begin_of_text|>")
    a = make_instruct(tmp_path, "a.jsonl", 30, "a")
    c = write_jsonl(tmp_path / "c.jsonl",
                    [{"messages": MULTI}] * 5 + [{"prompt": "Q?", "chosen": "A", "rejected": "B"}])
    ref = load_dataset([a, c], tok, batch_records=8)
    par = load_dataset([a, c], tok, batch_records=8, num_proc=2)
    for x, y in ((ref.store, par.store), (ref.store.rejected, par.store.rejected)):
        assert np.array_equal(x.ids, y.ids) and np.array_equal(x.mask, y.mask) and np.array_equal(x.offsets, y.offsets)
    assert ref.locations == par.locations
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template is not prefix-stable"):
        load_dataset(c, TinyTok(backend, UNSTABLE), num_proc=2)  # an error in a worker reaches the caller


# ---- fast paths: the piece cache (tokenization) and the fast chat renderer, each equal to the slow path
FUZZ_ALPHABET = (["a", "b", "Z", "é", "日", "🎉", "1", "7", "'", "'s", ".", ",", "?", "-", "<", ">", " ", " ", " ", "  ",
                  "\n", "\n\n", "\t", "\r\n", "\xa0", "\u3000", "\x1c", "\x85", "\u2028", "the", " the", "Paris"]
                 + ["<|im_start|>", "<|im_end|>", "<eos>"])


def random_texts(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET, size=rng.integers(0, 40))) for _ in range(n)]


def backend_with(pre_tokenizer, kind):
    from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, trainers

    from minitrain.data.encode import CUT_SAFE_PATTERNS

    tk = Tokenizer(models.BPE())
    if kind == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "digits":  # SmolLM2's: single digits, then GPT-2's regex
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:  # Llama-3's split pattern, then bytes without a regex
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CUT_SAFE_PATTERNS[1]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS + random_texts(50, 0), trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


@pytest.mark.parametrize("kind", ["gpt2", "digits", "llama3"])
def test_piece_cache_tokenizes_exactly_like_tokenizers(kind):
    """Random strings full of whitespace runs, unicode spaces, digits, apostrophes and special tokens: the same
    ids and token start offsets as encode_batch, with a cold and with a warm cache."""
    from minitrain.data.encode import PieceCache, piece_cache_unsupported

    tk = backend_with(None, kind)
    assert piece_cache_unsupported(tk) is None
    texts = random_texts(400, np.random.SeedSequence().entropy % 2**32)
    cache = PieceCache(tk)
    for _ in range(2):
        ids, starts, counts = cache.encode(texts)
        ref = tk.encode_batch(texts, add_special_tokens=False)
        base = np.cumsum([0] + [len(t) for t in texts[:-1]])
        cuts = np.cumsum(counts)[:-1]
        bad = [i for i, (x, s, e) in enumerate(zip(np.split(ids, cuts), np.split(starts, cuts), ref))
               if x.tolist() != e.ids or (s - base[i]).tolist() != [a for a, _ in e.offsets]]
        assert not bad, f"{len(bad)} of {len(texts)} texts differ, first {texts[bad[0]]!r}"


def test_piece_cache_hash_collisions_and_chunks_stay_exact(monkeypatch):
    """The piece hash only proposes a cache entry: with a base of 1 the hash is the sum of the code points plus
    the length (anagrams such as ' the' and ' teh' collide), and the ids must still be encode_batch's; a tiny
    chunk size exercises the batch cut into parts."""
    from minitrain.data.encode import PieceCache

    tk = backend_with(None, "digits")
    words = ["the", "teh", "eth", "het", "ab", "ba", "12", "21", "a\xa0b", "b\xa0a", "<|im_end|>x", "x<|im_end|>"]
    rng = np.random.default_rng(np.random.SeedSequence().entropy % 2**32)
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 12))) for _ in range(300)] + random_texts(100, 3)
    ref = tk.encode_batch(texts, add_special_tokens=False)
    for b, chunk in ((1, PieceCache._CHUNK), (PieceCache._B, 200)):
        monkeypatch.setattr(PieceCache, "_B", b)
        monkeypatch.setattr(PieceCache, "_CHUNK", chunk)
        cache = PieceCache(tk)
        for _ in range(2):
            ids, starts, counts = cache.encode(texts)
            ends = np.cumsum(counts)
            base = np.cumsum([0] + [len(t) for t in texts[:-1]])
            bad = [i for i, e in enumerate(ref) if ids[ends[i] - counts[i]: ends[i]].tolist() != e.ids
                   or (starts[ends[i] - counts[i]: ends[i]] - base[i]).tolist() != [a for a, _ in e.offsets]]
            assert not bad, f"B={b}: {len(bad)} of {len(texts)} texts differ, first {texts[bad[0]]!r}"
        if b == 1:
            assert cache.by_str, "no collision was exercised"


def test_piece_cache_refuses_what_it_cannot_prove():
    from tokenizers import Regex, normalizers, pre_tokenizers

    from minitrain.data.encode import piece_cache_unsupported

    tk = backend_with(None, "gpt2")
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    assert "Metaspace" in piece_cache_unsupported(tk)
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+| "), "isolated")
    assert "not a known" in piece_cache_unsupported(tk)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert "add_prefix_space" in piece_cache_unsupported(tk)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.normalizer = normalizers.NFC()
    assert "normalizer" in piece_cache_unsupported(tk)


VARIED = [{"messages": MULTI},
          {"messages": [{"role": "user", "content": "  two  spaces,\n  indented\n\tand tabbed  "},
                        {"role": "assistant", "content": "\n leading newline then space; 12 345 ✓ 日本語 🎉 "}]},
          {"messages": [{"role": "user", "content": "héllo\u00a0 wörld \u3000 full-width space"},
                        {"role": "assistant", "content": "Don't stop: it's 3.14 — ok?"},
                        {"role": "user", "content": "more"}, {"role": "assistant", "content": "   "}]},
          {"instruction": "Say hi", "input": "to  Bob", "output": "hi Bob", "system": "Be nice. "},
          {"prompt": "Q?", "chosen": "A  yes", "rejected": " B no"}]
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def minitrain_tok(tk, template):
    from minitrain.tokenizer import Tokenizer

    bos = "<|begin_of_text|>" if template == "llama-3" else None
    return Tokenizer(tk, config={"eos_token": "<eos>", "pad_token": "<pad>"} | ({"bos_token": bos} if bos else {}),
                     chat_template=template)


def same_store(a, b):
    for x, y in ((a.store, b.store), (a.store.rejected, b.store.rejected)):
        assert np.array_equal(x.ids, y.ids) and np.array_equal(x.offsets, y.offsets)
        assert np.array_equal(x.mask, y.mask), f"{int((x.mask != y.mask).sum())} mask entries differ"


@pytest.mark.parametrize("kind", ["digits", "llama3"])
@pytest.mark.parametrize("template", ["chatml", "llama-3", SMOL_TEMPLATE], ids=["chatml", "llama-3", "smollm2"])
@pytest.mark.parametrize("responses_only", [True, False])
def test_fast_paths_equal_slow_paths(tmp_path, kind, template, responses_only):
    """Piece cache + fast renderer (the default) == tokenizers encode_batch + jinja2 == the per-record path."""
    from minitrain.data.encode import Encoder

    tok = minitrain_tok(backend_with(None, kind), template)
    enc = Encoder(tok)
    assert enc.renderer is not None and enc.pieces is not None  # the fast paths are the ones under test
    f = write_jsonl(tmp_path / "v.jsonl", VARIED * 3)
    raw = write_jsonl(tmp_path / "r.jsonl", [{"text": t} for t in random_texts(20, 1)])
    kw = dict(train_on_responses_only=responses_only, batch_records=4)
    fast = load_dataset([f, raw], tok, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("minitrain.data.encode.piece_cache_unsupported", lambda b: "off")
        mp.setattr(type(tok), "fast_chat_renderer", lambda self, chat_template=None: None)
        rust = load_dataset([f, raw], tok, **kw)
    slow = load_dataset([f, raw], tok, use_batch_api=False, **kw)
    same_store(fast, rust)
    same_store(fast, slow)
    if responses_only:
        check_masking(fast, 0, MULTI, END["llama3" if template == "llama-3" else "chatml"])


def test_fast_path_checks_can_fail(tmp_path, monkeypatch):
    """A fast renderer that is wrong on some records, and a piece cache that returns a wrong id, are caught by
    the sampled comparison: a warning, and the dataset is the slow path's."""
    from minitrain.data.encode import Encoder, PieceCache

    tok = minitrain_tok(backend_with(None, "digits"), "chatml")
    good = tok.fast_chat_renderer()
    recs = [{"instruction": f"Say {w}", "output": f"{w} there"} for w in ("hi", "yo", "hey", "X", "ho")]
    f = write_jsonl(tmp_path / "i.jsonl", recs)
    ref = load_dataset(f, tok, use_batch_api=False)
    monkeypatch.setattr(Encoder, "verify_first", 0)
    monkeypatch.setattr(Encoder, "verify_every", 1)
    monkeypatch.setattr(type(tok), "fast_chat_renderer", lambda self, chat_template=None:
                        lambda m, add_generation_prompt=False: good(m, add_generation_prompt).replace("X", "Y"))
    with pytest.warns(UserWarning, match="fast chat renderer disagreed"):
        ds = load_dataset(f, tok)
    same_store(ds, ref)
    monkeypatch.undo()
    monkeypatch.setattr(Encoder, "verify_first", 0)
    monkeypatch.setattr(Encoder, "verify_every", 1)
    real = PieceCache.encode

    def off_by_one(self, texts):
        ids, starts, counts = real(self, texts)
        ids = ids.copy()
        ids[-1] += 1
        return ids, starts, counts

    monkeypatch.setattr(PieceCache, "encode", off_by_one)
    with pytest.warns(UserWarning, match="piece-cache tokenization disagreed"):
        ds = load_dataset(f, tok)
    same_store(ds, ref)


# Added tokens that overlap one another ("<x><y>" holds "<x>", "x><y" and "><"), with non-ASCII characters (one
# first character above U+00FF), and more than three distinct first characters.
OVERLAPPING = ["<x>", "x><y", "<x><y>", "><", "<é>", "<|im_end|>", "é]", "日>", "#"]
OVERLAP_FRAGMENTS = ["<", ">", "x", "y", "é", "日", "a", " ", "  ", "\n", "b "] + OVERLAPPING


@pytest.mark.parametrize("base", ["default", "one"])
def test_piece_cache_cuts_at_added_tokens_exactly(monkeypatch, base):
    """Pieces are also cut where an added token starts (tokenizers splits there first). With overlapping added
    tokens, tokens cut short by the end of a batch, non-ASCII batches, and (hash base 1) colliding window hashes,
    the ids and token starts must still be encode_batch's, cold and warm, for whole batches and for texts one
    by one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minitrain.data.encode import PieceCache, piece_cache_unsupported

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=OVERLAPPING, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert piece_cache_unsupported(tk) is None
    if base == "one":
        monkeypatch.setattr(PieceCache, "_B", 1)
    rng = np.random.default_rng(np.random.SeedSequence().entropy % 2**32)
    texts = ["".join(rng.choice(OVERLAP_FRAGMENTS, size=rng.integers(0, 30))) for _ in range(300)]
    texts += ["a <x", "b <x><", "<x><y", "x>< y", "<é", "é <é>", "a<|im_end|>", "<|im_end|"]  # ends of batches
    ascii_only = [t for t in texts if t.isascii()]
    cache = PieceCache(tk)
    for batch in [texts, texts, ascii_only] + [[t] for t in texts[:60] + texts[-8:]]:
        ids, starts, counts = cache.encode(batch)
        ref = tk.encode_batch(batch, add_special_tokens=False)
        ends = np.cumsum(counts)
        base_at = np.cumsum([0] + [len(t) for t in batch[:-1]])
        bad = [i for i, e in enumerate(ref) if ids[ends[i] - counts[i]: ends[i]].tolist() != e.ids
               or (starts[ends[i] - counts[i]: ends[i]] - base_at[i]).tolist() != [a for a, _ in e.offsets]]
        assert not bad, f"{len(bad)} of {len(batch)} texts differ, first {batch[bad[0]]!r}"


def test_piece_cache_turn_joins_are_not_pieces():
    """The text that joins one chat turn to the next (" word<|im_end|>\\n<|im_start|>assistant\\nWord") is cut
    where the added token starts: every cache entry that holds an added token starts with one, so the cache
    stays small on chat data (one entry per word, not per pair of words around a turn)."""
    from minitrain.data.encode import PieceCache

    tk = backend_with(None, "digits")
    words = ["alpha", "beta", "gamma", "delta", "pi", "rho", "tau", "phi"]
    texts = [f"<|im_start|>user\n{a.capitalize()} and {b}?<|im_end|>\n<|im_start|>assistant\n{c.capitalize()} "
             f"{d}.<|im_end|>\n" for a in words for b in words for c in words for d in words[:2]]
    cache = PieceCache(tk)
    ids, _, counts = cache.encode(texts)
    ref = tk.encode_batch(texts, add_special_tokens=False)
    assert ids.tolist() == [t for e in ref for t in e.ids] and counts.tolist() == [len(e.ids) for e in ref]
    specials = ("<|im_start|>", "<|im_end|>")
    joined = [s for s in cache.strings if any(t in s for t in specials) and not s.startswith(specials)]
    assert not joined, f"{len(joined)} entries join text to an added token, e.g. {joined[:3]}"
    assert cache.n_entries < 3 * len(words) + 10, f"{cache.n_entries} entries for {len(texts)} chats"


FORK_SCRIPT = """
import json, sys
from tokenizers import Tokenizer
sys.path.insert(0, sys.argv[1])
from minitrain.data import load_dataset
from tests.test_data import TinyTok
tk = Tokenizer.from_file(sys.argv[2] + "/tok.json")
tk.encode_batch(["warm the thread pool up"] * 256)  # tokenizers' threads exist in this process before the fork
tok = TinyTok(tk)
one = load_dataset(sys.argv[2] + "/d.jsonl", tok, batch_records=16)
two = load_dataset(sys.argv[2] + "/d.jsonl", tok, batch_records=16, num_proc=2)
print(json.dumps([len(one), len(two), one.store.ids.tolist() == two.store.ids.tolist()]))
"""


def test_worker_processes_do_not_hang_with_tokenizers_parallelism_on(tmp_path, backend):
    """TOKENIZERS_PARALLELISM=true and tokenizers' thread pool started before load_dataset forks its workers:
    tokenizers then keeps its pool on in the children, whose first encode_batch waited forever for threads that
    a fork does not copy. Run in a subprocess with a time limit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    backend.save(str(tmp_path / "tok.json"))
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {i} words", "output": f"{i} words here"} for i in range(64)])
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, root, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=root, env={**os.environ, "TOKENIZERS_PARALLELISM": "true"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [64, 64, True]
