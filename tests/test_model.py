"""minitrain.model against transformers' LlamaForCausalLM (the oracle), in fp32 on the CPU.

Weights are copied in memory here (the loader's tests go through files). Random weights are drawn larger than
transformers' init so logits are O(1-10) and a 1e-4 max-abs bound means something.
"""
import copy

import pytest
import torch

from minitrain.generate import generate, sample_next
from minitrain.model import LlamaForCausalLM, ModelArgs, cu_seqlens_to_position_ids, document_ids

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
# Each case with the reason it is here.
CASES = {
    "mha_untied": {},  # plain multi-head attention, separate lm_head
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),  # GQA + tied embeddings
    "mqa": dict(num_key_value_heads=1),  # one KV head shared by all
    "head_dim_ne_C_over_H": dict(head_dim=16, num_key_value_heads=2),  # q/o projections not square
    "attention_bias": dict(attention_bias=True, mlp_bias=True),  # bias flags (Qwen-like q/k/v bias)
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),  # linear position scaling
    "rope_llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_model(**overrides):
    cfg = transformers.LlamaConfig(**{**BASE, **overrides})
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    return m


def ours_from(hf) -> LlamaForCausalLM:
    m = LlamaForCausalLM(ModelArgs.from_config(hf.config.to_dict())).eval()
    missing, unexpected = m.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return m


def report(a, b, what):
    err = (a - b).abs()
    idx = torch.unravel_index(err.argmax(), err.shape)
    return f"{what}: max abs err {err.max().item():.3g} at {tuple(i.item() for i in idx)}, {(err > 1e-4).sum().item()} > 1e-4"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    hf = hf_model(**CASES[case])
    ours = ours_from(hf)
    ids = torch.randint(0, BASE["vocab_size"], (2, 37))  # odd length
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 37, BASE["vocab_size"])
    assert (got - want).abs().max() <= 1e-4, report(got, want, case)
    assert want.abs().max() > 1.0  # the bound is meaningful


def test_parameter_names_are_hf():
    hf = hf_model(num_key_value_heads=2, attention_bias=True)
    ours = ours_from(hf)
    assert set(dict(ours.named_parameters()).keys()) == set(dict(hf.named_parameters()).keys())
    tied = ours_from(hf_model(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_hidden_states_then_lm_head_equals_logits():
    ours = ours_from(hf_model(num_key_value_heads=2))
    ids = torch.randint(0, BASE["vocab_size"], (2, 11))
    with torch.no_grad():
        h = ours.hidden_states(ids)
        assert h.shape == (2, 11, BASE["hidden_size"])
        torch.testing.assert_close(ours.lm_head(h), ours(ids), rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [[5, 9, 3], [1, 16], [17]])  # several docs; a 1-token doc; one doc
def test_packed_batch_equals_documents_one_by_one(lengths):
    ours = ours_from(hf_model(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    docs = [torch.randint(0, BASE["vocab_size"], (n,)) for n in lengths]
    packed = torch.cat(docs)[None]  # (1, T)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)))
    with torch.no_grad():
        want = torch.cat([ours(d[None])[0] for d in docs])
        got_pos = ours(packed, position_ids=pos)[0]
        got_cu = ours(packed, cu_seqlens=cu)[0]
        if len(lengths) > 1:  # without the document mask the answer differs (the test can fail)
            assert (ours(packed)[0] - want).abs().max() > 1e-3
    assert (got_pos - want).abs().max() <= 1e-4, report(got_pos, want, "position_ids packing")
    assert (got_cu - want).abs().max() <= 1e-4, report(got_cu, want, "cu_seqlens packing")


def test_packed_rows_in_a_batch():
    ours = ours_from(hf_model(num_key_value_heads=2))
    a, b, c = (torch.randint(0, BASE["vocab_size"], (n,)) for n in (6, 4, 10))
    ids = torch.stack([torch.cat([a, b]), c])  # row 0 packs two docs, row 1 is one doc
    pos = torch.stack([torch.cat([torch.arange(6), torch.arange(4)]), torch.arange(10)])
    with torch.no_grad():
        got = ours(ids, position_ids=pos)
        for want, sl, row in ((ours(a[None])[0], slice(0, 6), 0), (ours(b[None])[0], slice(6, 10), 0),
                              (ours(c[None])[0], slice(0, 10), 1)):
            assert (got[row, sl] - want).abs().max() <= 1e-4, report(got[row, sl], want, "batched packing")


def test_document_ids_and_cu_seqlens():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3, 4, 4]]
    assert document_ids(torch.tensor([[7, 8, 9]])).tolist() == [[1, 1, 1]]  # a continuation is one doc
    assert cu_seqlens_to_position_ids(torch.tensor([0, 3, 5, 8]), 8).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        cu_seqlens_to_position_ids(torch.tensor([0, 3, 7]), 8)


def test_sliding_window_matches_transformers_mistral():
    cfg = transformers.MistralConfig(**{**BASE, "num_key_value_heads": 2}, sliding_window=5)
    hf = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in n else 0.15 * torch.randn_like(p))
    ours = ours_from(hf)
    assert ours.args.sliding_window == 5
    ids = torch.randint(0, BASE["vocab_size"], (1, 19))
    with torch.no_grad():
        got, want = ours(ids), hf(ids).logits
    assert (got - want).abs().max() <= 1e-4, report(got, want, "mistral sliding window")


def test_kv_cache_decoding_equals_full_forward():
    ours = ours_from(hf_model(num_key_value_heads=2))
    ids = torch.randint(0, BASE["vocab_size"], (2, 7))
    out = generate(ours, ids, max_new_tokens=9)  # greedy with the cache
    assert out.shape == (2, 16) and torch.equal(out[:, :7], ids)
    seq = ids
    with torch.no_grad():
        for _ in range(9):  # greedy without a cache, recomputing everything
            seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    # and the cached logits are the full-forward logits
    cache = ours.new_cache(2, 16)
    with torch.no_grad():
        pre = ours(seq[:, :10], cache=cache)
        step = torch.cat([ours(seq[:, i:i + 1], cache=cache) for i in range(10, 16)], dim=1)
        full = ours(seq)
    assert (torch.cat([pre, step], 1) - full).abs().max() <= 1e-4


def test_generate_matches_transformers_greedy():
    hf = hf_model(num_key_value_heads=2, tie_word_embeddings=True)
    ours = ours_from(hf)
    ids = torch.randint(0, BASE["vocab_size"], (1, 5))
    hf.generation_config.eos_token_id = None  # LlamaConfig's default eos (2) would stop transformers early
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, 8)
    assert torch.equal(got, want), (got, want)


def test_generate_stops_at_eos_and_pads():
    ours = ours_from(hf_model())
    ids = torch.randint(0, BASE["vocab_size"], (2, 4))
    free = generate(ours, ids, 6)
    eos = int(free[0, 5])  # row 0 emits this as its 2nd new token
    out = generate(ours, ids, 6, eos_token_id=[eos, 10_000])
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert first <= 1 and (out[0, 4 + first:] == eos).all()
    one_d = generate(ours, ids[0], 3)
    assert one_d.dim() == 1 and torch.equal(one_d, free[0, :7])


def test_sampling_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.5, -3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 0.5, g).item() for _ in range(50)}
    assert draws == {1}  # token 1 alone holds more than half the mass
    draws = {sample_next(logits, 1.0, 0.95, g).item() for _ in range(200)}
    assert draws == {1, 2}
    assert sample_next(logits, 0.0, 1.0).item() == 1
    with pytest.raises(ValueError):
        generate(ours_from(hf_model()), torch.zeros(1, 2, dtype=torch.long), 2, temperature=-1.0)


def test_compile_fullgraph_packed():
    ours = ours_from(hf_model(num_key_value_heads=2))
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        want = ours(ids, position_ids=pos)
        got = torch.compile(ours, fullgraph=True, backend="eager")(ids, position_ids=pos)
    assert (got - want).abs().max() <= 1e-5


# ---- ModelArgs.from_config --------------------------------------------------------------------------
def cfg_dict(**kw):
    d = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **BASE, "rope_theta": 10000.0}
    d.update(kw)
    return {k: v for k, v in d.items() if v is not None}


def test_config_forms_4x_and_5x_agree():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    v4 = ModelArgs.from_config(cfg_dict(rope_theta=500000.0, rope_scaling={**rs, "type": "llama3"}))
    v5 = ModelArgs.from_config(cfg_dict(rope_theta=None, rope_parameters={**rs, "rope_theta": 500000.0}))
    assert (v4.rope_theta, v4.rope_scaling) == (v5.rope_theta, v5.rope_scaling) == (500000.0, rs)
    plain = ModelArgs.from_config(cfg_dict(rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 3.0}))
    assert plain.rope_theta == 3.0 and plain.rope_scaling is None


@pytest.mark.parametrize("cfg, match", [
    (cfg_dict(hidden_size=None), r"missing required key\(s\) \['hidden_size'\]"),
    (cfg_dict(model_type="gpt2"), "unsupported architecture: model_type 'gpt2'"),
    (cfg_dict(architectures=["Qwen2ForCausalLM"]), "unsupported architecture"),
    (cfg_dict(hidden_act="gelu"), "hidden_act"),
    (cfg_dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (cfg_dict(num_hidden_layers=0), "'num_hidden_layers' must be a positive integer"),
    (cfg_dict(hidden_size=50), "not divisible by num_attention_heads"),
    (cfg_dict(rope_parameters={"rope_type": "default", "rope_theta": 5.0}), "contradictory rope_theta"),
    (cfg_dict(rope_scaling={"type": "linear", "rope_type": "llama3", "factor": 2.0}), "contradictory rope scaling"),
    (cfg_dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
              rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0}), "contradictory 'rope_scaling'"),
    (cfg_dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "missing key"),
    (cfg_dict(rope_scaling={"rope_type": "yarn", "factor": 8.0}), "unsupported rope type 'yarn'"),
])
def test_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs.from_config(cfg)


def test_config_defaults_and_extra():
    a = ModelArgs.from_config(cfg_dict(num_key_value_heads=None, torch_dtype="bfloat16"))
    assert a.num_key_value_heads == a.num_attention_heads and a.head_dim == 12
    assert a.extra["torch_dtype"] == "bfloat16" and "hidden_size" not in a.extra
    assert copy.deepcopy(a) == a


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_forward_packed_and_generate(dtype):
    """bf16/fp16 on CUDA (SDPA's fused kernels) against the fp32 CPU model: plain, packed, and decoding."""
    hf = hf_model(num_key_value_heads=2, head_dim=64, hidden_size=256, num_attention_heads=4, intermediate_size=512)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(0.3)  # keep activations in fp16 range
    ref = ours_from(hf)
    gpu = copy.deepcopy(ref).to("cuda", dtype)
    ids = torch.randint(0, BASE["vocab_size"], (2, 300))
    pos = torch.cat([torch.arange(120), torch.arange(180)])[None].expand(2, -1)
    for kw in ({}, {"position_ids": pos}):
        with torch.no_grad():
            want = ref(ids, **kw)
            got = gpu(ids.cuda(), **{k: v.cuda() for k, v in kw.items()}).float().cpu()
            same = ref.to(dtype)(ids, **kw).float() if dtype == torch.bfloat16 else None
            ref.float()
        rel = ((got - want).norm() / want.norm()).item()
        limit = 2 * ((same - want).norm() / want.norm()).item() + 1e-3 if same is not None else 1e-2
        assert rel <= limit, f"{dtype} {list(kw)}: relative error {rel:.3g} > {limit:.3g}"
    out = gpu.generate(ids[:1, :10].cuda(), 16)
    assert out.shape == (1, 26) and out.device.type == "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("shape", [(2, 256, 8, 2, 64), (1, 1000, 32, 8, 128), (3, 77, 6, 3, 80)])  # tiny / Llama-8B heads / odd T, D
def test_gqa_attention_equals_repeated_kv_gpu(shape, packed):
    """minitrain.model.attention on CUDA hands GQA to SDPA (enable_gqa; with a packed-documents mask on cuDNN, or
    the repeat where cuDNN cannot) instead of repeating k and v: output and q/k/v gradients are held to the tolerance
    rule against fp32 SDPA on repeated k/v, like the repeated-k/v bf16 path (on the 8B shape the bits were equal)."""
    import torch.nn.functional as F
    from minitrain.model import attention, build_mask, document_ids

    B, T, H, KV, D = shape
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, KV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, KV, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    go = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    mask = None
    if packed:  # documents of random lengths, positions restarting in each
        pos = torch.cat([torch.arange(T)[torch.randperm(T)[: T // 40 + 1]].sort().values, torch.tensor([T])])
        starts = torch.zeros(T, dtype=torch.bool)
        starts[pos[:-1]] = True
        starts[0] = True
        doc_start = torch.cummax(torch.where(starts, torch.arange(T), 0), 0).values
        position_ids = (torch.arange(T) - doc_start).expand(B, T).cuda()
        docs = document_ids(position_ids)
        mask = build_mask(position_ids, position_ids, docs, docs, None)
    y = attention(q, k, v, mask)
    gq, gk, gv = torch.autograd.grad(y, (q, k, v), go)
    n = H // KV
    causal = mask is None

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b.repeat_interleave(n, 1), c.repeat_interleave(n, 1), attn_mask=mask,
                                              is_causal=causal, scale=D ** -0.5)
    y_ref = sdpa(q, k, v)
    rq, rk, rv = torch.autograd.grad(y_ref, (q, k, v), go)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    y32 = sdpa(qf, kf, vf)
    fq, fk, fv = torch.autograd.grad(y32, (qf, kf, vf), go.float())
    for name, got, ref, exact in (("y", y, y_ref, y32), ("dq", gq, rq, fq), ("dk", gk, rk, fk), ("dv", gv, rv, fv)):
        err = (got.float() - exact).abs().max().item()
        ref_err = (ref.float() - exact).abs().max().item()
        assert err <= 2 * ref_err + 1e-2, f"{name} {shape}: |GQA - fp32| {err:.3g} vs repeated k/v's {ref_err:.3g}"
