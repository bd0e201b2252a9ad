"""minitrain.generate edge cases: greedy output against transformers' generate (the oracle) on the same tiny
model, max_new_tokens 0/1, eos, argument validation and the position limit, with clear errors."""
import pytest
import torch

from minitrain.generate import generate
from test_model import BASE, hf_model, ours_from

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    hf = hf_model(num_key_value_heads=2, max_position_embeddings=32)
    hf.generation_config.eos_token_id = None  # LlamaConfig's default eos would stop transformers early
    return hf, ours_from(hf)


# (B, T, max_new_tokens), each with its reason: one-token prompt, max_new_tokens 0 and 1 (no decode step),
# a batch with an odd length, the prompt + new tokens exactly filling max_position_embeddings (32).
GREEDY = [(1, 1, 6), (2, 5, 0), (2, 5, 1), (3, 9, 7), (1, 20, 12)]


@pytest.mark.parametrize("B, T, n", GREEDY)
def test_greedy_matches_transformers(pair, B, T, n):
    hf, ours = pair
    ids = torch.randint(0, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(B * 100 + T))
    want = ids if n == 0 else hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                          do_sample=False, pad_token_id=0)
    got = generate(ours, ids, n)
    assert torch.equal(got, want), (got, want)


def test_stops_at_eos_like_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, BASE["vocab_size"], (1, 4), generator=torch.Generator().manual_seed(7))
    free = generate(ours, ids, 8)
    eos = int(free[0, 6])  # the 3rd new token
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                       pad_token_id=0, eos_token_id=eos)
    got = generate(ours, ids, 8, eos_token_id=eos)
    assert torch.equal(got, want) and got.shape[1] <= 7, (got, want)


def test_no_forward_pass_after_the_last_token(pair):
    # n new tokens need the prefill and n - 1 decode steps; the n-th token's logits are never read; 0 needs none
    _, ours = pair
    calls = []
    handle = ours.register_forward_hook(lambda *a: calls.append(1))
    try:
        for n in (0, 1, 4):
            calls.clear()
            out = generate(ours, torch.tensor([[3, 4, 5]]), n)
            assert out.shape == (1, 3 + n) and len(calls) == n, (n, len(calls))
    finally:
        handle.remove()


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), r"temperature must be >= 0 \(0 = greedy\), got -1.0"),
    (dict(temperature=float("nan")), r"temperature must be >= 0 \(0 = greedy\), got nan"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\] \(1 = off\), got 0.0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\] \(1 = off\), got 1.5"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\] \(1 = off\), got nan"),
])
def test_sampling_arguments_validated(pair, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(pair[1], torch.tensor([[1, 2]]), 2, **kwargs)


def test_bad_prompts_and_lengths_get_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0, got -1"):
        generate(ours, torch.tensor([[1, 2]]), -1)
    with pytest.raises(ValueError, match=r"the prompt is empty \(T = 0\)"):
        generate(ours, torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(TypeError, match=r"input_ids must be a \(B, T\) or \(T,\) tensor .* got list"):
        generate(ours, [1, 2, 3], 3)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\) \(the model's vocab_size\), got ids from 1 to 97"):
        generate(ours, torch.tensor([[1, 97]]), 3)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\).*got ids from -1 to 2"):
        generate(ours, torch.tensor([-1, 2]), 3)


def test_past_max_position_embeddings_is_an_error(pair):
    _, ours = pair  # max_position_embeddings = 32
    assert generate(ours, torch.tensor([[1] * 30]), 2).shape == (1, 32)  # exactly full: fine
    with pytest.raises(ValueError, match=r"prompt length 30 \+ max_new_tokens 3 = 33 positions exceed the model's "
                                         r"max_position_embeddings 32 \(config.json\)"):
        generate(ours, torch.tensor([[1] * 30]), 3)
    with pytest.raises(ValueError, match=r"prompt length 40 \+ max_new_tokens 0 = 40 positions exceed"):
        generate(ours, torch.tensor([[1] * 40]), 0)


def test_eos_given_as_int_list_tensor_or_numpy(pair):
    import numpy as np

    _, ours = pair
    ids = torch.tensor([[5, 6, 7]])
    eos = int(generate(ours, ids, 4)[0, 4])  # the 2nd new token
    want = generate(ours, ids, 4, eos_token_id=[eos])
    assert want.shape == (1, 5)
    for given in (eos, torch.tensor(eos), torch.tensor([eos, 96]), np.int64(eos), (eos,)):
        assert torch.equal(generate(ours, ids, 4, eos_token_id=given), want), given
