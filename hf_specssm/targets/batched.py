"""A ragged batch of prompts verified in one forward: every row accepts its own number of tokens per round.

Layout of the target cache: recurrent states are per row (fixed size); attention keys are left-padded, each
row's tokens right-aligned, masked by a `[B, S]` attention mask. A round feeds `[B, T]` = each row's
uncached committed tokens + drafts, right-padded (the padding comes after every real token, so causality
keeps it out of the real positions' logits). After acceptance, recurrent states are rewound to the round's
checkpoint and the SSM mixers replay each row's kept positions (`MixerInputRecorder.replay_rows`);
attention keys are re-aligned per row (`ForkableCache.realign_rows`); finished rows leave the batch
(`ForkableCache.select`).

Rows are prefilled one by one, because left padding would run pad tokens through an SSM state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm.mixers import MixerInputRecorder, exact_continuation
from hf_specssm.targets.base import Proposal, Target
from hf_specssm.tree import TokenTree


class BatchTarget(Target):
    """The target side of a ragged batch (any target: attention, SSM or hybrid), chains only.

    Args:
        model: the target causal LM.
        pad_token_id: the token that fills each row's right padding in a verification forward.
    """

    max_rows = None

    def __init__(self, model: PreTrainedModel, pad_token_id: int) -> None:
        cache = ForkableCache(model.config)
        for layer in cache.layers:
            if _compat.is_sliding_attention_layer(layer):
                raise ValueError(
                    "batched speculative decoding does not support sliding-window attention targets yet; "
                    "pass one prompt per call."
                )
        super().__init__(model, cache)
        self.pad_token_id = pad_token_id
        self.recorder = MixerInputRecorder(model)
        self._has_attention = any(_compat.is_attention_layer(layer) for layer in cache.layers)
        self._cached: list[int] = []  # per row: tokens its cache holds
        self._batch_round: tuple[int, torch.Tensor, list[int]] | None = None

    def tree_problem(self) -> str | None:
        return "batched speculative decoding verifies chains; pass one prompt per call to verify trees."

    def hidden_problem(self) -> str | None:
        return "batched speculative decoding does not hand hidden states to draft heads; pass one prompt per call."

    def _forward_rows(
        self, cache: ForkableCache, tokens: torch.Tensor, cached: torch.Tensor, mask_width: int
    ):
        """Forward `tokens` `[B, T]` from `cache`; `cached[b]` real tokens per row, right-aligned in `mask_width`."""
        batch, width = tokens.shape
        kwargs = {self.cache_name: cache, "use_cache": True, "logits_to_keep": width}
        if self._pass_positions:
            kwargs["position_ids"] = cached[:, None] + torch.arange(width, device=tokens.device)[None]
        if self._has_attention:
            slots = torch.arange(mask_width, device=tokens.device)[None]
            history = (slots >= mask_width - cached[:, None]).long()
            kwargs["attention_mask"] = torch.cat([history, tokens.new_ones((batch, width))], dim=1)
        with exact_continuation(self.model), _compat.grouped_query_attention():
            return self.model(input_ids=tokens, **kwargs).logits.float()

    def prefill(self, sequences: Sequence[torch.Tensor]) -> None:
        """Run every row's prompt but its last token, one row at a time, then stack the rows' caches."""
        caches = []
        self._cached = []
        for sequence in sequences:
            cache = ForkableCache(self.model.config)
            prefix = sequence[:, :-1]
            if prefix.shape[1] > 0:
                self._forward_rows(cache, prefix, prefix.new_zeros(1), 0)
                cache.advance(prefix.shape[1])
            self._cached.append(prefix.shape[1])
            caches.append(cache)
        self.cache = ForkableCache.stack(self.model.config, caches)

    def verify(self, sequences: Sequence[torch.Tensor], proposals: Sequence[Proposal]) -> list[torch.Tensor]:
        if any(isinstance(proposal, TokenTree) for proposal in proposals):
            raise ValueError(self.tree_problem())
        pending = [sequence[0, cached:] for sequence, cached in zip(sequences, self._cached)]
        width = max(p.shape[0] + d.length for p, d in zip(pending, proposals))
        tokens = torch.full(
            (len(sequences), width), self.pad_token_id, dtype=torch.long, device=sequences[0].device
        )
        for b, (p, d) in enumerate(zip(pending, proposals)):
            tokens[b, : p.shape[0]] = p
            tokens[b, p.shape[0] : p.shape[0] + d.length] = d.tokens[0]
        cached = torch.tensor(self._cached, device=tokens.device)
        attention = self.cache.attention_tensors()
        mask_width = attention[0][0].shape[2] if attention else 0
        self.cache.clear_checkpoints()
        self.cache.checkpoint()
        with self.recorder.recording():
            logits = self._forward_rows(self.cache, tokens, cached, mask_width)
        extra = self.cache.checkpoint_bytes() + self.recorder.recorded_bytes
        self.peak_verification_bytes = max(self.peak_verification_bytes, extra)
        counts = [p.shape[0] for p in pending]
        self._batch_round = (mask_width, cached, counts)
        # row b's first scored position is its last pending token
        return [
            logits[b : b + 1, count - 1 : count + proposal.length]
            for b, (count, proposal) in enumerate(zip(counts, proposals))
        ]

    def commit(self, kept: Sequence[list[int]]) -> None:
        mask_width, cached, counts = self._batch_round
        fed = [count + len(path) for count, path in zip(counts, kept)]
        lengths = torch.tensor(fed, device=cached.device)
        self.cache.rewind_recurrent(self.cache.checkpoint_lengths[0])
        self.recorder.replay_rows(self.cache, lengths)
        self.recorder.clear()
        self.cache.clear_checkpoints()
        if self.cache.attention_tensors():
            self.cache.realign_rows(mask_width - cached, mask_width + lengths)
        self._cached = [c + f for c, f in zip(self._cached, fed)]

    def release(self, rows: list[int]) -> None:
        self.cache.select(torch.tensor(rows, dtype=torch.long))
        self._cached = [self._cached[b] for b in rows]
