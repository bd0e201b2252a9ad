"""minitrain.generate with prompts of different lengths in one batch (left padding + attention_mask): each row's
continuation against the same prompt alone (B=1, unpadded; greedy, fp32 on the CPU: the same tokens), against
transformers' generate on the same padded batch, with a sliding window, with eos, with sampling, and the
refusal of masks it cannot take (right padding, wrong shape, a row of only padding, values other than 0/1)."""
import copy

import pytest
import torch

import minitrain.model as mm
from minitrain.generate import generate
from test_model import BASE, hf_model, ours_from

transformers = pytest.importorskip("transformers")

PAD = 96  # a valid id on the padding (transformers embeds it); ours never reads the ids there


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = hf_model(num_key_value_heads=2, max_position_embeddings=32)  # GQA, as test_generate_edge
    hf.generation_config.eos_token_id = None  # LlamaConfig's default eos would stop transformers early
    return hf, ours_from(hf)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, BASE["vocab_size"], (n,), generator=g) for n in lengths]


def left_pad(rows, extra=0, pad=PAD):
    """(B, T) ids and 0/1 mask, T = longest + extra, each row's padding on the left."""
    T = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


def alone(model, row, n, **kw):
    return generate(model, row[None], n, **kw)[0, len(row):]


# (lengths, extra padding columns, new tokens), each with its reason: one row unpadded among padded ones and a
# one-token prompt; every row padded (a column of padding only); two rows, the longest prompt + new tokens
# filling max_position_embeddings (32) exactly while the padded T would not fit.
BATCHES = [([3, 7, 1, 5], 0, 10), ([2, 6, 4], 2, 8), ([24, 5], 3, 8)]


@pytest.mark.parametrize("lengths, extra, n", BATCHES)
def test_padded_batch_equals_each_prompt_alone(pair, lengths, extra, n):
    _, ours = pair
    rows = prompts(lengths)
    ids, mask = left_pad(rows, extra)
    out = generate(ours, ids, n, attention_mask=mask)
    T = ids.shape[1]
    assert out.shape == (len(rows), T + n) and torch.equal(out[:, :T], ids)  # prompts returned as given
    for i, r in enumerate(rows):
        want = alone(ours, r, n)
        assert torch.equal(out[i, T:], want), (i, out[i, T:].tolist(), want.tolist())


def test_padded_batch_matches_transformers(pair):
    hf, ours = pair
    ids, mask = left_pad(prompts([3, 7, 1, 5], seed=3))
    want = hf.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=PAD)
    got = generate(ours, ids, 9, attention_mask=mask)
    assert torch.equal(got, want), (got, want)
    assert torch.equal(ours.generate(ids, 9, attention_mask=mask), want)  # the model's method passes it on


def test_prefill_logits_of_real_tokens_match_unpadded(pair):
    # positions restart at 0 at each row's first real token and padding keys are hidden: the real tokens'
    # logits are those of the prompt alone up to rounding (the masked softmax sums over more zeros)
    _, ours = pair
    rows = prompts([2, 6, 4], seed=5)
    ids, mask = left_pad(rows, extra=1)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            want = ours(r[None])[0]
            err = (got[i, -len(r):] - want).abs().max().item()
            assert err < 1e-5, (i, err)
            assert torch.isfinite(got[i]).all()  # the padding's own rows too: no NaN to leak anywhere


def test_sliding_window_with_padding(pair):
    # window 3 < prompt lengths: the window counts real tokens, in the prefill and in the cached steps
    _, base = pair
    ours = copy.deepcopy(base)
    ours.args.sliding_window = 3
    rows = prompts([6, 2, 4], seed=11)
    ids, mask = left_pad(rows, extra=1)
    out = generate(ours, ids, 7, attention_mask=mask)
    assert not torch.equal(out, generate(base, ids, 7, attention_mask=mask))  # the window changes something
    for i, r in enumerate(rows):
        assert torch.equal(out[i, ids.shape[1]:], alone(ours, r, 7)), i


def test_eos_with_padding(pair):
    _, ours = pair
    rows = prompts([2, 5, 3], seed=7)
    ids, mask = left_pad(rows)
    T, n = ids.shape[1], 8
    eos = int(alone(ours, rows[0], n)[2])  # row 0's 3rd new token
    out = generate(ours, ids, n, eos_token_id=eos, attention_mask=mask)
    for i, r in enumerate(rows):
        want = alone(ours, r, n, eos_token_id=eos)  # stops after its eos (or runs to n)
        got = out[i, T:]
        assert torch.equal(got[:len(want)], want), (i, got.tolist(), want.tolist())
        assert (got[len(want):] == eos).all(), (i, got.tolist())  # a finished row is filled with eos
    assert out.shape[1] <= T + n


def test_sampling_with_padding(pair):
    # B=1: a padded prompt samples exactly what it samples unpadded with the same seed. For B > 1 a row's
    # samples depend on the others' draws from the one generator (one multinomial over (B, V) per step), so a
    # padded row is not compared with the prompt alone here (greedy is, above); instead a batch with extra
    # padding columns samples what the same batch with the least padding samples.
    _, ours = pair
    kw = dict(temperature=0.9, top_p=0.8)
    r = prompts([4], seed=9)[0]
    ids, mask = left_pad([r], extra=3)
    want = generate(ours, r[None], 10, generator=torch.Generator().manual_seed(1), **kw)[0, 4:]
    got = generate(ours, ids, 10, generator=torch.Generator().manual_seed(1), attention_mask=mask, **kw)[0, 7:]
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    rows = prompts([3, 6, 2], seed=9)
    ids, mask = left_pad(rows)
    ids2, mask2 = left_pad(rows, extra=2)
    a = generate(ours, ids, 10, generator=torch.Generator().manual_seed(2), attention_mask=mask, **kw)
    b = generate(ours, ids2, 10, generator=torch.Generator().manual_seed(2), attention_mask=mask2, **kw)
    assert torch.equal(a[:, ids.shape[1]:], b[:, ids2.shape[1]:]), (a, b)


def test_no_mask_built_without_padding(pair, monkeypatch):
    # no attention_mask, or one of all 1s, runs the unmasked path as before: no mask built, the same output
    _, ours = pair
    calls = []
    real = mm.build_mask
    monkeypatch.setattr(mm, "build_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.stack(prompts([5, 5], seed=4))
    plain = generate(ours, ids, 6)
    assert not calls
    assert torch.equal(generate(ours, ids, 6, attention_mask=torch.ones_like(ids)), plain)
    assert torch.equal(generate(ours, ids, 6, attention_mask=torch.ones_like(ids, dtype=torch.bool)), plain)
    assert not calls
    padded, mask = left_pad(prompts([5, 3], seed=4))
    generate(ours, padded, 6, attention_mask=mask)
    assert len(calls) == 6  # one mask per forward pass: the prefill and 5 cached steps


def test_one_d_prompt_with_mask_and_pad_ids_outside_vocab(pair):
    _, ours = pair
    r = prompts([4], seed=6)[0]
    ids, mask = left_pad([r], extra=2, pad=-1)  # -1 on the padding: never looked up
    got = generate(ours, ids[0], 5, attention_mask=mask[0])
    assert got.shape == (6 + 5,) and torch.equal(got[6:], alone(ours, r, 5))


@pytest.mark.parametrize("mask, match", [
    ([[1, 1, 0], [1, 1, 1]], r"attention_mask must be LEFT-padded \(each row 0\.\.\.0 1\.\.\.1.*as transformers' "
                             r"generate expects for decoder-only models\), but row 0 has a 0 at column 2 after a 1"),
    ([[0, 1, 1], [1, 0, 1]], r"LEFT-padded.*row 1 has a 0 at column 1 after a 1 \(right or inner padding\)"),
    ([[0, 1, 1], [0, 0, 0]], r"attention_mask row 1 is all 0: that prompt has no real token"),
    ([[0, 1, 1]], r"attention_mask must have input_ids' shape \(2, 3\) \(B, T\), got \(1, 3\)"),
    ([[0, 1], [1, 1]], r"attention_mask must have input_ids' shape \(2, 3\) \(B, T\), got \(2, 2\)"),
    ([[0, 2, 1], [1, 1, 1]], r"attention_mask must hold only 0 \(padding\) and 1 \(real tokens\), got 2 at row 0, "
                             r"column 1"),
])
def test_bad_masks_refused(pair, mask, match):
    with pytest.raises(ValueError, match=match):
        generate(pair[1], torch.tensor([[1, 2, 3], [4, 5, 6]]), 2, attention_mask=torch.tensor(mask))


def test_mask_type_and_length_limit(pair):
    _, ours = pair  # max_position_embeddings = 32
    with pytest.raises(TypeError, match=r"attention_mask must be a tensor of 0/1 shaped like input_ids \(1, 2\), "
                                        r"got list"):
        generate(ours, torch.tensor([[1, 2]]), 2, attention_mask=[[1, 1]])
    ids, mask = left_pad(prompts([24, 5]), extra=4)  # T = 28 but the longest prompt is 24 tokens
    with pytest.raises(ValueError, match=r"prompt length 24 \+ max_new_tokens 9 = 33 positions exceed"):
        generate(ours, ids, 9, attention_mask=mask)
    assert generate(ours, ids, 8, attention_mask=mask).shape == (2, 36)


def test_model_forward_mask_errors(pair):
    _, ours = pair
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, cached \+ new tokens\) = \(1, 3\) of 0/1, "
                                         r"got \(1, 2\)"):
        ours(ids, attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match=r"position_ids and cu_seqlens cannot be given with it"):
        ours(ids, position_ids=torch.arange(3)[None], attention_mask=torch.ones(1, 3))


def test_positions_restart_at_each_rows_first_real_token(pair, monkeypatch):
    # RoPE scores depend on position differences only, so shifted positions would give the same tokens up to
    # rounding: the positions handed to RoPE are checked directly, for the prefill and every cached step
    _, ours = pair
    seen = []
    real = mm.rope_cos_sin
    monkeypatch.setattr(mm, "rope_cos_sin", lambda inv, pos, dtype: seen.append(pos.clone()) or real(inv, pos, dtype))
    ids, mask = left_pad(prompts([2, 5, 3], seed=8), extra=1)
    generate(ours, ids, 4, attention_mask=mask)
    assert len(seen) == 4
    real_pos = seen[0][mask.bool()]
    assert real_pos.tolist() == [0, 1] + [0, 1, 2, 3, 4] + [0, 1, 2], seen[0]
    for step, pos in enumerate(seen[1:]):
        assert pos[:, 0].tolist() == [2 + step, 5 + step, 3 + step], (step, pos)


def test_build_mask_hides_padding_keys_and_leaves_no_row_empty():
    keep = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], dtype=torch.bool)
    pos = mm.padding_positions(keep)
    for past in (0, 3):  # the prefill, and a step with 3 cached tokens (queries are keep's last columns)
        m = mm.build_mask(pos[:, past:], pos, None, None, None, keep)[:, 0]  # (B, T, S)
        assert m.any(dim=-1).all()  # every query sees a key: no all-masked row (NaN in some SDPA kernels)
        assert not (m & ~keep[:, None, :]).any()  # padding keys are never seen
        q_real = keep[:, past:]
        causal = torch.ones(5, 5, dtype=torch.bool).tril()[past:]  # (T, S)
        assert torch.equal(m[q_real], (causal[None] & keep[:, None, :])[q_real])  # the real ones: causal


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_on_cuda(pair, dtype):
    """The masked path through CUDA attention (SDPA with an explicit mask, then the KV cache): fp32 gives each
    prompt's own greedy tokens; bf16 the same tokens where the unpadded run's top-2 logits are not near a tie."""
    _, ours = pair
    model = copy.deepcopy(ours).to("cuda", dtype)
    rows = [r.cuda() for r in prompts([3, 7, 1, 5], seed=1)]
    ids, mask = left_pad([r.cpu() for r in rows], 2)
    out = generate(model, ids.cuda(), 8, attention_mask=mask.cuda())
    T = ids.shape[1]
    for i, r in enumerate(rows):
        want = alone(model, r, 8)
        if dtype == torch.float32:
            assert torch.equal(out[i, T:], want), (i, out[i, T:].tolist(), want.tolist())
        else:  # bf16: compare up to the first step whose unpadded top-2 margin is within bf16 noise
            seq = torch.cat([r, want])
            with torch.no_grad():
                logits = model(seq[None]).float()[0, len(r) - 1:-1]
            top2 = logits.topk(2, dim=-1).values
            close = ((top2[:, 0] - top2[:, 1]) < 0.05 * top2[:, 0].abs().clamp(min=1)).nonzero()
            k = int(close[0]) if len(close) else 8
            assert torch.equal(out[i, T:T + k], want[:k]), (i, k, out[i, T:].tolist(), want.tolist())
