"""Sampling and generation with a static KV cache.

Prefill the prompt once, then decode one token at a time, each step reading the cached keys
and values of every earlier position instead of recomputing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from .config import DEFAULT_STOP_IDS
from .model import Gemma2, KVCache


def next_token_probs(logits: Tensor, temperature: float, top_k: int | None = None) -> Tensor:
    """softmax(logits / temperature) per row, over the top_k largest logits only if given."""
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    return torch.softmax(scores, dim=-1)


def pick(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Tensor:
    """Next token per row of logits [B, V]: argmax at temperature 0, else a (top-k) sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def generate(
    model: Gemma2,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Iterable[int] = DEFAULT_STOP_IDS,
) -> Tensor:
    """Continue `input_ids` ([T] or [B, T]) by up to `max_new_tokens` tokens.

    Greedy when temperature == 0. A row stops after emitting a stop id (`stop_ids` plus the
    config's eos ids; the stop token is included) and is padded with pad_token_id until every
    row has stopped. Returns only the new tokens, [B, n] (or [n] for a 1-D prompt).
    """
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    B, T = ids.shape
    if max_new_tokens <= 0:
        out = ids.new_zeros((B, 0))
        return out[0] if squeeze else out
    config = model.config
    stop_set = sorted(set(stop_ids) | set(config.eos_token_ids))
    stops = torch.tensor(stop_set, dtype=ids.dtype, device=ids.device)
    cache = KVCache(config, B, T + max_new_tokens, model.dtype, ids.device)
    logits = model(ids, cache=cache, last_only=True)[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    new: list[Tensor] = []
    for step in range(max_new_tokens):
        token = pick(logits, temperature, top_k, generator).masked_fill(done, config.pad_token_id)
        new.append(token)
        done |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = model(token[:, None], cache=cache, last_only=True)[:, -1]
    out = torch.stack(new, dim=1)
    return out[0] if squeeze else out
