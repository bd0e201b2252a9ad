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


def _check_left_padding(attention_mask, ids: torch.Tensor, squeeze: bool) -> torch.Tensor:
    """The (B, T) bool mask (True on real tokens) of a left-padded batch, or a clear error."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"generate: attention_mask must be a tensor of 0/1 shaped like input_ids "
                        f"{tuple(ids[0].shape if squeeze else ids.shape)}, got {type(attention_mask).__name__}")
    mask = attention_mask[None] if squeeze and attention_mask.dim() == 1 else attention_mask
    if tuple(mask.shape) != tuple(ids.shape):
        want = tuple(ids[0].shape if squeeze else ids.shape)
        raise ValueError(f"generate: attention_mask must have input_ids' shape {want} (B, T), got "
                         f"{tuple(attention_mask.shape)}")
    mask = mask.to(ids.device)
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"generate: attention_mask must hold only 0 (padding) and 1 (real tokens), got "
                             f"{mask[b, t].item()} at row {b}, column {t}")
        mask = mask.bool()
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"generate: attention_mask row {int(empty.nonzero()[0, 0])} is all 0: that prompt has no "
                         f"real token (each row needs at least one 1, e.g. the BOS token)")
    # left padding: 0s then 1s in each row, i.e. no 1 followed by a 0
    right = mask[:, :-1] & ~mask[:, 1:]
    if bool(right.any()):
        b, t = (int(i) for i in right.nonzero()[0])
        raise ValueError(f"generate: attention_mask must be LEFT-padded (each row 0...0 1...1, the padding before "
                         f"the prompt, as transformers' generate expects for decoder-only models), but row {b} has "
                         f"a 0 at column {t + 1} after a 1 (right or inner padding): pad on the left, e.g. "
                         f"tokenizer.padding_side = 'left'")
    return mask


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: int | Iterable[int] | None = None,
             generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Extend prompts by up to ``max_new_tokens`` tokens.

    Prompts of different lengths go in one batch LEFT-padded (as transformers' generate expects for
    decoder-only models) with an ``attention_mask``: each row's real tokens take positions 0, 1, ... as if
    unpadded and the padding is never attended to, in the prefill and in every step with the KV cache, so a
    row's greedy continuation is the one its prompt alone gives (the logits agree up to rounding, ~1e-6 in fp32
    on the CPU: the masked softmax and the batched matmuls sum in another order, so only a near-tie of two
    logits could pick another token; in bf16 such ties are likelier, as for any batch). Sampling draws one
    token per row per step from the one generator, so a row's samples depend on the rows beside it (as they
    already did without padding). Without a mask (or an all-ones one) no mask is built: as fast as before.

    Args:
        model: a :class:`minitrain.model.LlamaForCausalLM`.
        input_ids: (B, T) or (T,) prompt token ids; without ``attention_mask`` all prompts are taken as real
            tokens (no padding); the ids on padding are never read (any value).
        max_new_tokens: tokens to add at most.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling mass (1.0 = off); used when temperature > 0.
        eos_token_id: an id or a list of ids; a row stops after emitting one (then it is padded with the first).
        generator: optional torch.Generator for reproducible sampling.
        attention_mask: optional (B, T) (or (T,) with a 1-D prompt) of 0/1 (int or bool), 1 on real tokens,
            left padding only: each row 0...0 1...1 with at least one 1.
    Returns:
        (B, T + n) token ids (or (T + n,) for a 1-D prompt), n <= max_new_tokens: the prompts as given (their
        padding included) followed by the new tokens, so ``out[:, T:]`` are the continuations.
    Raises:
        ValueError for temperature < 0 or NaN, top_p outside (0, 1], max_new_tokens < 0, an empty prompt, ids
        outside the vocabulary (padding excluded), the longest prompt + max_new_tokens beyond the model's
        max_position_embeddings, or an attention_mask not shaped like input_ids, with values other than 0/1, a
        row of only 0s, or padding on the right.
    """
    # `not (x >= 0)` rather than `x < 0`: NaN fails every comparison and must be refused too
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1] (1 = off), got {top_p}")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise TypeError("generate: input_ids must be a (B, T) or (T,) tensor of token ids (left-padded with an "
                        f"attention_mask, or no padding), got {type(input_ids).__name__} "
                        f"{tuple(getattr(input_ids, 'shape', ()))}")
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    from .model import model_device

    device = model_device(model)
    ids = ids.to(device)
    B, T = ids.shape
    if T == 0:
        raise ValueError("generate: the prompt is empty (T = 0); it needs at least one token, e.g. the BOS token")
    keep = None if attention_mask is None else _check_left_padding(attention_mask, ids, squeeze)
    if keep is not None and bool(keep.all()):
        keep = None  # no padding: the unmasked path, the same computation as without a mask
    # the model reads pad ids through the embedding: any value is allowed there, a valid id (0) is what it gets
    real = ids if keep is None else ids[keep]
    model_ids = ids if keep is None else ids.masked_fill(~keep, 0)
    args = getattr(model, "args", None)
    vocab = getattr(args, "vocab_size", None)
    if vocab is not None and real.numel() and not (0 <= int(real.min()) and int(real.max()) < vocab):
        raise ValueError(f"generate: token ids must be in [0, {vocab}) (the model's vocab_size), got ids from "
                         f"{int(real.min())} to {int(real.max())}")
    max_pos = getattr(args, "max_position_embeddings", None)
    longest = T if keep is None else int(keep.sum(dim=1).max())  # positions restart at 0 after each row's padding
    if max_pos is not None and longest + max_new_tokens > max_pos:
        raise ValueError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} = "
                         f"{longest + max_new_tokens} positions exceed the model's max_position_embeddings {max_pos} "
                         f"(config.json); shorten the prompt or lower max_new_tokens")
    if max_new_tokens == 0:  # nothing to add: no prefill
        return ids[0] if squeeze else ids
    eos = _eos_set(eos_token_id)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, T + max_new_tokens)
        if keep is None:
            logits = model(ids, cache=cache)[:, -1]  # prefill: (B, V)
        else:  # padded: the mask over the cache grows by one real column per step
            mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=device)
            mask[:, :T] = keep
            logits = model(model_ids, cache=cache, attention_mask=mask[:, :T])[:, -1]
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
            if keep is None:
                logits = model(nxt[:, None], cache=cache)[:, -1]
            else:
                logits = model(nxt[:, None], cache=cache, attention_mask=mask[:, :T + step + 1])[:, -1]
    finally:
        model.train(was_training)
    res = torch.cat(out, dim=1)
    return res[0] if squeeze else res
