"""minitrain.data with bad or unusual input: odd but valid JSONL, null and wrong-typed fields, preference
strings that start with "[", batch sizes larger than the data, mixing weights that round to nothing, and the
resume state at an epoch boundary. Uses the tiny tokenizer of tests/test_data.py."""
import json
import warnings

import pytest

from minitrain.data import DataError, load_dataset
from test_data import TinyTok, backend, write_jsonl  # noqa: F401 (backend: the shared tokenizer fixture)


@pytest.fixture(scope="module")
def tok(backend):
    return TinyTok(backend)


def test_odd_but_valid_jsonl_loads(tmp_path, tok):
    line = json.dumps({"text": "héllo wörld 日本語 ✓"}, ensure_ascii=False)
    f = tmp_path / "odd.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + f"{line}\r\n\r\n   \n{line}\r\n{line}".encode())  # BOM, CRLF, blanks, no final \n
    ds = load_dataset(f, tok)
    assert len(ds) == 3
    assert [ds.locations[i].rsplit(":", 1)[1] for i in range(3)] == ["1", "4", "5"]
    assert all(tok.decode(ds[i]["input_ids"].tolist()[:-1]) == "héllo wörld 日本語 ✓" for i in range(3))


def test_malformed_jsonl_lines_name_file_line_and_expectation(tmp_path, tok):
    good = json.dumps({"text": "fine"})
    for body, want in [(f"{good}\nnot json at all\n", r"b.jsonl:2: malformed JSON"),
                       (f"{good}\n\n[1, 2]\n", r"b.jsonl:3: expected one JSON object per line, got list"),
                       (f"{good}\n{good} {good}\n", r"b.jsonl:2: malformed JSON \(Extra data")]:
        (tmp_path / "b.jsonl").write_text(body)
        with pytest.raises(DataError, match=want):
            load_dataset(tmp_path / "b.jsonl", tok)


@pytest.mark.parametrize("rec, field", [({"text": None}, "text"), ({"instruction": None, "output": "x"}, "instruction"),
                                        ({"instruction": "q", "output": None}, "output")])
def test_null_in_a_required_field_is_an_error_not_the_text_none(tmp_path, tok, rec, field):
    # before: {"text": null} died in tokenizers with a TypeError; a null output trained on the text "None"
    f = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "a", "output": "b"}, rec])
    with pytest.raises(DataError, match=rf"n.jsonl:2: field '{field}' should be a string, got null"):
        load_dataset(f, tok)
    with pytest.warns(UserWarning, match="1 bad lines/records skipped"):
        assert len(load_dataset(f, tok, skip_bad_lines=True)) == 1


def test_chat_records_with_bad_messages(tmp_path, tok):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    cases = [([{"role": "tool", "content": "x"}], r"c.jsonl:2: messages\[0\]: unknown role 'tool'"),
             ([{"role": "user"}], r"c.jsonl:2: messages\[0\] should be an object with 'role' and 'content'"),
             ([{"role": "user", "content": None}], r"c.jsonl:2: messages\[0\].content should be a string, got null"),
             ([{"role": "user", "content": ["x"]}], r"c.jsonl:2: messages\[0\].content should be a string, got list")]
    for msgs, want in cases:
        with pytest.raises(DataError, match=want):
            load_dataset(write_jsonl(tmp_path / "c.jsonl", [ok, {"messages": msgs}]), tok)
    # ShareGPT 'from' that is not a string: a DataError naming it, not "unhashable type"
    f = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": ["human"], "value": "x"}]}])
    with pytest.raises(DataError, match=r"s.jsonl:1: conversations\[0\]: unknown ShareGPT 'from' \['human'\]"):
        load_dataset(f, tok)
    # empty contents are valid; an empty assistant turn still trains its end-of-turn token
    f = write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": ""},
                                                         {"role": "assistant", "content": ""}]}])
    assert load_dataset(f, tok).sources[0].trained > 0


def test_conversations_without_assistant_turn_are_counted_then_refused(tmp_path, tok):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lone = {"messages": [{"role": "user", "content": "anyone?"}]}
    with pytest.warns(UserWarning, match="c.jsonl: 1 examples have no trained token"):
        assert len(load_dataset(write_jsonl(tmp_path / "c.jsonl", [ok, lone]), tok)) == 1
    with pytest.raises(DataError, match=r"empty dataset.*2 without any trained token"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dataset(write_jsonl(tmp_path / "d.jsonl", [lone, lone]), tok)


def test_preference_strings_starting_with_a_bracket_are_text(tmp_path, tok):
    # before: "[INST] ..." raised "looks like a JSON list but does not parse"; "[1, 2, 3]" became messages
    recs = [{"prompt": "[INST] sort 3 1 2", "chosen": "[1, 2, 3]", "rejected": "[3, 2, 1]"}]
    ds = load_dataset(write_jsonl(tmp_path / "p.jsonl", recs), tok)
    assert "[INST] sort 3 1 2" in ds.render(0) and "[[[1, 2, 3]" in ds.render(0)
    assert "[3, 2, 1]" in ds.render(0, rejected=True)
    msgs = json.dumps([{"role": "user", "content": "q"}])  # a CSV cell holding a list of messages still parses
    (tmp_path / "p.csv").write_text('prompt,chosen,rejected\n"' + msgs.replace('"', '""') + '",good,bad\n')
    assert load_dataset(tmp_path / "p.csv", tok).render(0).count("user") == 1
    for rec, want in [({"prompt": 5, "chosen": "a", "rejected": "b"}, "field 'prompt' should be a string or a "
                       "non-empty list of messages, got int"),
                      ({"prompt": "q", "chosen": None, "rejected": "b"}, "field 'chosen' .* got null"),
                      ({"prompt": '[{"role": "user"', "chosen": "a", "rejected": "b"}, "field 'prompt' looks like a "
                       "JSON list of messages but does not parse")]:
        with pytest.raises(DataError, match="q.jsonl:1: " + want):
            load_dataset(write_jsonl(tmp_path / "q.jsonl", [rec]), tok)


def test_overflow_and_zero_trained(tmp_path, tok):
    fox = "The quick brown fox jumps over the lazy dog. " * 6
    f = write_jsonl(tmp_path / "o.jsonl", [{"instruction": "a", "output": fox},       # truncated, keeps a response
                                           {"instruction": fox, "output": "b"},       # response cut off entirely
                                           {"instruction": "c", "output": "d"}])
    with pytest.warns(UserWarning) as w:
        ds = load_dataset(f, tok, max_seq_length=24)
    msgs = " | ".join(str(x.message) for x in w)
    assert "2 examples longer than max_seq_length=24 were truncated" in msgs and "1 examples have no trained" in msgs
    assert len(ds) == 2 and ds.sources[0].truncated == 2 and ds.sources[0].refused == 1
    (tmp_path / "r.txt").write_text(fox)  # raw text splits into rows by default; packing never overfills a row
    ds = load_dataset(tmp_path / "r.txt", tok, max_seq_length=16)
    assert ds.sources[0].split == 1 and ds.store.lengths.max() == 16
    assert all(b["input_ids"].shape[1] <= 16 for b in ds.train_batches(batch_size=3, packing=True))


def test_batch_size_larger_than_the_dataset(tmp_path, tok):
    ds = load_dataset(write_jsonl(tmp_path / "s.jsonl", [{"instruction": "a", "output": "b"},
                                                         {"instruction": "c", "output": "d"}]), tok, max_seq_length=32)
    for packing in (True, False):
        assert sum(int(b["n_items"]) for b in ds.train_batches(batch_size=8, packing=packing)) == \
            sum(s.trained for s in ds.sources)
        # before: drop_last gave empty epochs forever (a loop that waits for a batch never ends)
        with pytest.raises(ValueError, match="drop_last=True leaves no batch.*fewer than batch_size=8"):
            list(ds.train_batches(batch_size=8, packing=packing, drop_last=True))


def test_mixing_weights_that_round_to_no_example(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "c", "output": "d"}])
    ds = load_dataset([(a, 1), (b, 1)], tok, eval_split=1)  # one training example, each share rounds to 0
    with pytest.raises(DataError, match=r"mixing weights \[1.0, 1.0\] give no training example"):
        len(ds.train_batches(batch_size=1))


@pytest.mark.parametrize("packing", [True, False])
def test_resume_state_at_an_epoch_boundary(tmp_path, tok, packing):
    recs = [{"instruction": f"q {i}" + " more" * (i % 5), "output": f"a {i}"} for i in range(7)]
    ds = load_dataset(write_jsonl(tmp_path / "r.jsonl", recs), tok, max_seq_length=48)
    loader = ds.train_batches(batch_size=2, packing=packing)
    n = len(loader)
    epochs = [[str(b) for b in loader.raw()] for _ in range(3)]
    for cut in range(1, 3 * n):
        loader, got, it = ds.train_batches(batch_size=2, packing=packing), 0, None
        while got < cut:  # as the trainer walks the stream: a new pass when one ends
            it = loader.raw() if it is None else it
            if next(it, None) is None:
                it = None
                continue
            got += 1  # stops right after a batch: an epoch's last one leaves its pass not resumed
        state = json.loads(json.dumps(loader.state_dict()))
        if cut % n == 0:  # after an epoch's last batch the state names the next epoch's first batch
            assert (state["epoch"], state["index"]) == (cut // n, 0)
        fresh = ds.train_batches(batch_size=2, packing=packing)
        fresh.load_state_dict(state)
        first = [str(b) for b in fresh.raw()]  # before: the first pass after such a resume was empty
        assert first == epochs[cut // n][cut % n:] and first


@pytest.mark.parametrize("kw", [{}, {"use_batch_api": False}, {"num_proc": 2}])
def test_lone_surrogate_names_the_record(tmp_path, tok, kw):
    # json accepts "\ud800"; before, tokenizers failed with "TextInputSequence must be str" and no location
    f = tmp_path / "s.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: text is not valid Unicode: lone surrogate '\\ud800' at "
                                        r"character 1"):
        load_dataset(f, tok, **kw)
    f.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x\\udfffy"}]}\n')
    with pytest.raises(DataError, match=r"s.jsonl:1: messages\[1\].content is not valid Unicode"):
        load_dataset(f, tok, **kw)
