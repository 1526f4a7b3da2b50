"""Runtime options of a drafter, validated once at construction, and transformers' assisted-decoding
settings mapped onto them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

DraftSchedule = Literal["constant", "heuristic", "adaptive"]
_SCHEDULES = ("constant", "heuristic", "adaptive")

#: transformers' `num_assistant_tokens_schedule` values (and hf_specssm's own "adaptive") -> `DraftConfig.schedule`.
#: "heuristic_transient" is "heuristic" restarted each call, which is what every call here does.
ASSISTED_SCHEDULES: dict[str, DraftSchedule] = {
    "constant": "constant",
    "heuristic": "heuristic",
    "heuristic_transient": "heuristic",
    "adaptive": "adaptive",
}


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


def draft_config_from_assisted_settings(
    base: DraftConfig,
    num_assistant_tokens: int | None = None,
    num_assistant_tokens_schedule: str | None = None,
    assistant_confidence_threshold: float | None = None,
) -> DraftConfig:
    """`base` with transformers' assisted-decoding settings applied (`None`: not set, keep `base`'s).

    - `num_assistant_tokens` -> `num_draft_tokens`; set alone, it also makes the schedule `"constant"`
      (transformers' default schedule), so that many tokens are drafted every round. The heuristic and
      adaptive schedules start there and widen `min_draft_tokens` / `max_draft_tokens` to include it.
    - `num_assistant_tokens_schedule` -> `schedule` through `ASSISTED_SCHEDULES`.
    - `assistant_confidence_threshold` -> `confidence_stop`; 0 turns early stopping off, as in transformers.

    Raises:
        ValueError: naming the transformers setting, for a value it cannot take.
    """
    changes: dict[str, object] = {}
    if num_assistant_tokens is not None:
        if (
            not isinstance(num_assistant_tokens, int)
            or isinstance(num_assistant_tokens, bool)
            or num_assistant_tokens < 1
        ):
            raise ValueError(
                f"num_assistant_tokens must be an integer >= 1 (tokens drafted per round), got "
                f"{num_assistant_tokens!r}."
            )
        changes["num_draft_tokens"] = num_assistant_tokens
        changes["schedule"] = "constant"
    if num_assistant_tokens_schedule is not None:
        if num_assistant_tokens_schedule not in ASSISTED_SCHEDULES:
            raise ValueError(
                f"num_assistant_tokens_schedule must be one of {tuple(ASSISTED_SCHEDULES)}, got "
                f"{num_assistant_tokens_schedule!r}."
            )
        changes["schedule"] = ASSISTED_SCHEDULES[num_assistant_tokens_schedule]
    if assistant_confidence_threshold is not None:
        threshold = assistant_confidence_threshold
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0.0 <= threshold < 1.0
        ):
            raise ValueError(
                "assistant_confidence_threshold must lie in [0, 1) (0 never ends a draft early), got "
                f"{threshold!r}."
            )
        changes["confidence_stop"] = float(threshold) if threshold > 0 else None
    if changes.get("schedule", base.schedule) != "constant":
        length = changes.get("num_draft_tokens", base.num_draft_tokens)
        changes["min_draft_tokens"] = min(base.min_draft_tokens, length)
        changes["max_draft_tokens"] = max(base.max_draft_tokens, length)
    return dataclasses.replace(base, **changes)
