"""Runtime options of a drafter, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DraftSchedule = Literal["constant", "heuristic", "adaptive"]
_SCHEDULES = ("constant", "heuristic", "adaptive")


@dataclass(frozen=True)
class DraftConfig:
    """How many tokens a drafter proposes per round.

    Attributes:
        num_draft_tokens: draft length of the first round, and of every round with `schedule="constant"`.
        schedule: `"constant"`; `"heuristic"` (transformers' rule: +2 after a round where every draft
            token was accepted, -1 otherwise); or `"adaptive"` (picks the length that maximises expected
            committed tokens per second, from the measured acceptance rate and measured draft and
            verification times; see `hf_specssm.policies.draft_length.AdaptiveLength`).
        min_draft_tokens: lower bound for the heuristic and adaptive schedules.
        max_draft_tokens: upper bound for the heuristic and adaptive schedules.
        draft_cost_ratio: for `"adaptive"`, the cost of one draft step relative to one target forward;
            `None` measures it. Fixing it makes the chosen lengths independent of timing noise.
        acceptance_prior: for `"adaptive"`, the per-token acceptance rate assumed before any evidence.
        acceptance_memory: for `"adaptive"`, the decay (0..1) of old acceptance evidence per round.
        tree_shape: draft a token tree instead of a chain: the number of children per node at each depth,
            e.g. `(3, 2, 2, 1, 1)` (Transformer targets for now).
        tree_children: when sampling, how a node's children are chosen: `"top"` (its `w` most likely
            tokens, deterministic) or `"sample"` (`w` tokens drawn without replacement from the drafter's
            processed distribution). Either is lossless under multi-draft acceptance; greedy decoding
            always takes the top `w`.
        confidence_stop: end a chain round early once the drafter's probability for the token it just
            drafted falls below this value (that token is still proposed); `None` never stops early.
            transformers' assisted decoding does the same with `assistant_confidence_threshold` (0.4).
    """

    num_draft_tokens: int = 5
    schedule: DraftSchedule = "adaptive"
    min_draft_tokens: int = 1
    max_draft_tokens: int = 16
    draft_cost_ratio: float | None = None
    acceptance_prior: float = 0.6
    acceptance_memory: float = 0.9
    tree_shape: tuple[int, ...] | None = None
    tree_children: Literal["top", "sample"] = "top"
    confidence_stop: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}.")
        for name in ("num_draft_tokens", "min_draft_tokens", "max_draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.min_draft_tokens > self.max_draft_tokens:
            raise ValueError(
                f"min_draft_tokens ({self.min_draft_tokens}) must not exceed max_draft_tokens "
                f"({self.max_draft_tokens})."
            )
        if self.schedule != "constant" and not (
            self.min_draft_tokens <= self.num_draft_tokens <= self.max_draft_tokens
        ):
            raise ValueError(
                f"num_draft_tokens ({self.num_draft_tokens}) must lie in [min_draft_tokens, max_draft_tokens] "
                f"= [{self.min_draft_tokens}, {self.max_draft_tokens}]."
            )
        if self.draft_cost_ratio is not None and not self.draft_cost_ratio > 0:
            raise ValueError(f"draft_cost_ratio must be > 0 or None, got {self.draft_cost_ratio!r}.")
        if not 0.0 < self.acceptance_prior < 1.0:
            raise ValueError(f"acceptance_prior must lie in (0, 1), got {self.acceptance_prior!r}.")
        if self.tree_shape is not None and (
            not isinstance(self.tree_shape, tuple)
            or not self.tree_shape
            or any(
                not isinstance(width, int) or isinstance(width, bool) or width < 1
                for width in self.tree_shape
            )
        ):
            raise ValueError(
                f"tree_shape must be a non-empty tuple of integers >= 1, got {self.tree_shape!r}."
            )
        if self.tree_children not in ("top", "sample"):
            raise ValueError(f"tree_children must be 'top' or 'sample', got {self.tree_children!r}.")
        if self.confidence_stop is not None and not 0.0 < self.confidence_stop < 1.0:
            raise ValueError(f"confidence_stop must lie in (0, 1) or be None, got {self.confidence_stop!r}.")
        if not 0.0 < self.acceptance_memory <= 1.0:
            raise ValueError(f"acceptance_memory must lie in (0, 1], got {self.acceptance_memory!r}.")
