"""Greedy and sampled decoding with a KV cache, for a quick look at a (fine-tuned) model."""
from __future__ import annotations

import numbers
from typing import Iterable

import torch


def _eos_set(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    # an int, a list, a tensor or a numpy integer (0-d or not) alike
    return [int(e) for e in torch.as_tensor(eos_token_id).flatten().tolist()]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax when temperature == 0, else sampling
    from softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # keep a token if the mass before it is < top_p (the most likely token is always kept)
        keep = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | Iterable[int] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend prompts by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`minitrain.model.LlamaForCausalLM`.
        input_ids: (B, T) or (T,) prompt token ids (all prompts the same length; no padding).
        max_new_tokens: tokens to add at most.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass (1.0 = off); used when temperature > 0.
        eos_token_id: an id or a list of ids; a row stops after emitting one (then it is padded with the first).
        generator: optional torch.Generator for reproducible sampling.
    Returns:
        (B, T + n) token ids (or (T + n,) for a 1-D prompt), n <= max_new_tokens.
    Raises:
        ValueError for temperature < 0 or NaN, top_p outside (0, 1], max_new_tokens < 0, an empty prompt, ids
        outside the vocabulary, or T + max_new_tokens beyond the model's max_position_embeddings.
    """
    # `not (x >= 0)` rather than `x < 0`: NaN fails every comparison and must be refused too
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] (1 = off), got {top_p}")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise TypeError("generate: input_ids must be a (B, T) or (T,) tensor of token ids (prompts of one length, "
                        f"no padding), got {type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    device = next(model.parameters()).device
    ids = ids.to(device)
    B, T = ids.shape
    if T == 0:
        raise ValueError("generate: the prompt is empty (T = 0); it needs at least one token, e.g. the BOS token")
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None)
    if vocab is not None and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
        raise ValueError(f"generate: token ids must be in [0, {vocab}) (the model's vocab_size), got ids from "
                         f"{int(ids.min())} to {int(ids.max())}")
    max_pos = getattr(args, "max_position_embeddings", None)
    if max_pos is not None and T + max_new_tokens > max_pos:
        raise ValueError(f"generate: prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} "
                         f"positions exceed the model's max_position_embeddings {max_pos} (config.json); shorten "
                         f"the prompt or lower max_new_tokens")
    if max_new_tokens == 0:  # nothing to add: no prefill
        return ids[0] if squeeze else ids
    eos = _eos_set(eos_token_id)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, T + max_new_tokens)
        logits = model(ids, cache=cache)[:, -1]  # prefill: (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = [ids]
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
            if eos:
                nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)
                done = done | torch.isin(nxt, torch.tensor(eos, device=device))
            out.append(nxt[:, None])
            if step == max_new_tokens - 1 or (eos and bool(done.all())):
                break  # no forward pass for logits that nothing reads
            logits = model(nxt[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)
    res = torch.cat(out, dim=1)
    return res[0] if squeeze else res
