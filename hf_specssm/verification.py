"""Target side of a round: score the drafts in one forward, then keep the cache for the accepted prefix."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from hf_specssm import _compat


class AttentionTarget:
    """A Transformer target verifying a chain of drafts against its KV cache.

    The cache always holds the committed tokens except the last one (whose logits the next round needs),
    so a round feeds `[last committed token(s), d_1 … d_k]` and reads `k + 1` positions of logits.

    Args:
        model: the target causal LM.
        cache: its cache from `generate` (a new `DynamicCache` when `None`); sliding-window layers are
            switched to past recording so they can be cropped.
    """

    def __init__(self, model: PreTrainedModel, cache: Cache | None) -> None:
        self.model = model
        self.cache_name = _compat.cache_kwarg_name(model)
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        _compat.enable_attention_rollback(self.cache)
        self.consumed = self.cache.get_seq_length()
        self._pass_logits_to_keep = _compat.forward_accepts(model, "logits_to_keep")

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Logits after each prefix of the draft, in one forward.

        Args:
            input_ids: `[1, L]` committed tokens.
            draft_tokens: `[1, k]` drafts.

        Returns:
            `[1, k + 1, V]` float32 logits; row `i` predicts the token after `i` drafts.
        """
        new_tokens = torch.cat([input_ids[:, self.consumed :], draft_tokens], dim=1)
        start = self.consumed
        kwargs = {
            self.cache_name: self.cache,
            "use_cache": True,
            "position_ids": torch.arange(start, start + new_tokens.shape[1], device=new_tokens.device)[None],
        }
        num_logits = draft_tokens.shape[1] + 1
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = num_logits
        logits = self.model(input_ids=new_tokens, **kwargs).logits[:, -num_logits:].float()
        self.consumed = start + new_tokens.shape[1]
        return logits

    def keep(self, length: int) -> None:
        """Drop every cached token past `length` (the accepted prefix)."""
        if length > self.consumed:
            raise ValueError(f"cannot keep {length} tokens, the cache holds {self.consumed}.")
        self.cache.crop(length - self.consumed)
        self.consumed = length


def process_scores(
    logits_processor: LogitsProcessorList | None,
    input_ids: torch.Tensor,
    draft_tokens: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Apply the processors at every verified position, each with its own prefix (as plain decoding would).

    Args:
        input_ids: `[1, L]` committed tokens.
        draft_tokens: `[1, k]`.
        logits: `[1, k + 1, V]` raw target logits.

    Returns:
        `[k + 1, V]` processed scores.
    """
    if not logits_processor:
        return logits[0].clone()
    sequence = torch.cat([input_ids, draft_tokens], dim=1)
    length = input_ids.shape[1]
    rows = [logits_processor(sequence[:, : length + i], logits[:, i].clone()) for i in range(logits.shape[1])]
    return torch.cat(rows, dim=0)
