"""An oracle drafter with a set acceptance rate, for measuring what verification costs buy end to end.

Random-weight targets have no trained drafter, so acceptance is simulated: `OracleDrafter` proposes the
target's own greedy continuation (computed once by plain decoding) and corrupts each proposed token with
probability `1 − α`, independently per sequence position and seeded, so a greedy round accepts drafts up to
the first corrupted one — per-token acceptance `α`, as in the speed-up curve
`(1 − α^(k+1)) / (1 − α) / cost(k)` of speculative decoding. The corruption of a position does not depend on
how positions were grouped into rounds.
"""

from __future__ import annotations

import torch

from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, Drafter, DraftSampler

_MASK64 = (1 << 64) - 1


def _unit(seed: int, position: int) -> float:
    """A uniform in `[0, 1)` keyed by `(seed, position)` (SplitMix64 finaliser)."""
    value = (seed * 0x9E3779B97F4A7C15 + position + 0x632BE59BD9B4E019) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return ((value ^ (value >> 31)) >> 11) * 2.0**-53


class OracleDrafter(Drafter):
    """Drafts the target's greedy continuation, each token wrong with probability `1 − alpha`.

    Args:
        reference: `[1, N]` the target's plain greedy output for the prompt (prompt included); positions
            past its end are drafted as token 0.
        alpha: per-token probability that a drafted token is the target's (0 … 1).
        vocab_size: the target's vocabulary size (a corrupted token is `right + 1 mod V`).
        seed: seeds which positions are corrupted.
        config: draft-length options (default: a constant 4 tokens per round).
    """

    def __init__(
        self,
        reference: torch.Tensor,
        alpha: float,
        vocab_size: int,
        seed: int = 0,
        config: DraftConfig | None = None,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {alpha}.")
        if reference.ndim != 2 or reference.shape[0] != 1:
            raise ValueError(f"reference must be [1, N] token ids, got shape {tuple(reference.shape)}.")
        super().__init__(
            config if config is not None else DraftConfig(num_draft_tokens=4, schedule="constant")
        )
        self.reference = reference[0].tolist()
        self.alpha = alpha
        self.seed = seed
        self._vocab = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def token_at(self, position: int) -> int:
        """The token this drafter proposes for sequence position `position`."""
        right = self.reference[position] if position < len(self.reference) else 0
        if _unit(self.seed, position) < self.alpha:
            return right
        return (right + 1) % self._vocab

    def begin(self, input_ids: torch.Tensor) -> None:
        """Nothing to prepare: the continuation is fixed."""

    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        start = input_ids.shape[1]
        tokens = [self.token_at(start + offset) for offset in range(num_tokens)]
        return Draft(tokens=torch.tensor([tokens], dtype=torch.long, device=input_ids.device))

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        """Nothing to update: the continuation is fixed."""
