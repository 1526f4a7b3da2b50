"""Joint Attainment and Advancement (*Snakes and Ladders*): a second batch row that skips the drafts."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_specssm.cache import ForkableCache
from hf_specssm.ssm.mixers import check_identity_steps, exact_continuation, identity_steps
from hf_specssm.targets.base import SingleRowTarget


class JointTarget(SingleRowTarget):
    """An SSM or hybrid target verified by Joint Attainment and Advancement.

    The cache holds two rows. Each round feeds both rows the tokens committed since the last correct state
    (the *pending* tokens: last round's accepted drafts and the target's token) followed by the `k` drafts:

    - row 1 (attainment) runs every step and yields the `k + 1` logits to verify;
    - row 0 (advancement) skips the draft positions (Δ = 0 there, conv window cut at the last pending
      token), so after the forward it holds the exact state after the pending tokens, whatever is accepted.

    Row 0's state is then copied to row 1, and attention layers (hybrids) are cropped to the pending tokens:
    both rows computed identical keys there. Nothing is stored across the forward and nothing is replayed;
    the cost is one extra batch row (a second copy of the state and, for hybrids, of the KV cache) and
    re-feeding the accepted tokens next round (inputs of `m + k` tokens, `1 ≤ m ≤ k + 1`).

    Args:
        model: an SSM or hybrid target whose mixers can skip positions (`ssm.mixers.check_identity_steps`).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        check_identity_steps(model)
        super().__init__(model, ForkableCache(model.config))
        self._kept_range = (0, 0)
        self._forked = False

    def tree_problem(self) -> str | None:
        return "Joint Attainment and Advancement verifies chains; use verification='replay' for trees."

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        pending = self._pending(input_ids, apart=True)
        if not self._forked:
            self.cache.fork(2)
            self._forked = True
        start, num_pending, num_draft = self.consumed, pending.shape[1], draft_tokens.shape[1]
        tokens = torch.cat([pending, draft_tokens], dim=1).expand(2, -1)
        skip = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        skip[0, num_pending:] = True
        with (
            exact_continuation(self.model),
            identity_steps(self.model, skip),
            self.cache.ragged_conv_rows([num_pending, tokens.shape[1]]),
            self._hidden_capture(num_draft + 1, row=1),
        ):
            logits = self._forward(tokens, num_draft + 1)[1:2]
        self.peak_verification_bytes = max(self.peak_verification_bytes, self._row_bytes())
        # advancement: row 0 is the state after the pending tokens, whatever is accepted
        for state in self.cache.state_tensors():
            state[1:].copy_(state[:1].expand_as(state[1:]))
        self.cache.crop_attention(start + num_pending)
        self.cache.set_length(start + num_pending)
        self.consumed = start + num_pending
        self._kept_range = (self.consumed, self.consumed + num_draft)
        return logits

    def _row_bytes(self) -> int:
        """Bytes of one batch row of the cache: what the extra verification row costs."""
        tensors = list(self.cache.state_tensors())
        for keys, values in self.cache.attention_tensors():
            tensors += [keys, values]
        return sum(t.numel() * t.element_size() for t in tensors) // 2

    def keep(self, length: int) -> None:
        low, high = self._kept_range
        if not low <= length <= high:
            raise ValueError(f"can keep between {low} and {high} tokens this round, not {length}.")
        # nothing to undo: the tokens past `consumed` are fed again next round

    def close(self) -> None:
        if self._forked:
            self.cache.select(torch.tensor([0]))
            self._forked = False
