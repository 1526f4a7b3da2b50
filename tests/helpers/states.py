"""Recurrent and attention state comparisons: a fresh cache over a prefix, and the largest difference."""

from __future__ import annotations

import torch

from hf_specssm import ForkableCache
from hf_specssm._compat import cache_kwarg_name, forward_accepts


def fresh(model, tokens: torch.Tensor) -> tuple[ForkableCache, torch.Tensor]:
    """A new cache that consumed `tokens` from scratch."""
    cache = ForkableCache(model.config)
    kwargs = {cache_kwarg_name(model): cache, "use_cache": True}
    if forward_accepts(model, "position_ids"):
        kwargs["position_ids"] = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    logits = model(input_ids=tokens, **kwargs).logits[:, -1]
    cache.advance(tokens.shape[1])
    return cache, logits


def max_state_diff(a: ForkableCache, b: ForkableCache) -> float:
    """The largest absolute difference over every state and attention tensor of two caches."""
    diffs = [(x - y).abs().max().item() for x, y in zip(a.state_tensors(), b.state_tensors(), strict=True)]
    for (ka, va), (kb, vb) in zip(a.attention_tensors(), b.attention_tensors(), strict=True):
        assert ka.shape == kb.shape, "attention layers hold a different number of tokens"
        diffs += [(ka - kb).abs().max().item(), (va - vb).abs().max().item()]
    return max(diffs)
