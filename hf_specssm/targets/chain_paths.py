"""Which exact path verifies a chain round on an SSM or hybrid target, chosen from measured round times.

A chain of `k` drafts can be verified two ways on most SSM and hybrid targets, both exact:

- `"forward"`: one multi-token forward (frozen single-chunk scan and state-update commit for Mamba2-layout
  mixers; transformers' forward from a checkpoint and mixer-input replay elsewhere);
- `"tree"`: the chain as a one-branch tree through the STree tree scan, committed by an N-step state
  update from recorded `x, Δ, B` (for Mamba v1 families the only commit without a projection pass).

Which is cheaper depends on the mixer family, `k`, the dtype and the machine (measured on a 2-core EPYC:
Mamba v1-790M in fp32 pays ~2.5× more per round on `"forward"`; Mamba2-370M in bf16 ~10% more at k = 8),
so no rule is written down: `ChainPathCosts` times every round (verify + commit) per path and per bucket
of `k`, tries each path first, then takes the cheaper one and re-measures the other now and then. Costs
are kept per model, dtype and device across calls (`chain_path_costs`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["CHAIN_PATHS", "ChainPathCosts", "chain_path_costs", "draft_bucket"]

#: the ways a chain round can be verified (see the module docstring)
CHAIN_PATHS = ("forward", "tree")


def draft_bucket(num_drafts: int) -> int:
    """The bucket of `num_drafts` whose rounds share a cost estimate: 1, 2–3, 4–7, 8–15, 16+ drafts."""
    return min(max(num_drafts, 1), 16).bit_length()


@dataclass
class ChainPathCosts:
    """Measured seconds of a chain round per path and bucket of `k`; picks the cheaper path.

    Args:
        paths: the candidate paths, a subset of `CHAIN_PATHS` (one path: always that one).
        warmup: first rounds per path and bucket that are not counted (allocations, probes).
        samples: counted rounds per path and bucket before the cheaper one is exploited.
        memory: weight of the past in the running mean of a path's round time.
        retry_every: every this many exploited rounds of a bucket, one round takes the other path, so a
            cost that changed (longer contexts, another machine load) is seen.
    """

    paths: tuple[str, ...]
    warmup: int = 1
    samples: int = 2
    memory: float = 0.7
    retry_every: int = 64
    _seen: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)
    _cost: dict[tuple[str, int], float] = field(default_factory=dict, repr=False)
    _exploited: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = [path for path in self.paths if path not in CHAIN_PATHS]
        if not self.paths or unknown:
            raise ValueError(f"paths must be a non-empty subset of {CHAIN_PATHS}, got {self.paths}.")
        if self.warmup < 0 or self.samples < 1 or not 0 <= self.memory < 1 or self.retry_every < 2:
            raise ValueError(
                "need warmup ≥ 0, samples ≥ 1, 0 ≤ memory < 1 and retry_every ≥ 2; got "
                f"{self.warmup}, {self.samples}, {self.memory}, {self.retry_every}."
            )

    def choose(self, num_drafts: int) -> str:
        """The path for a round of `num_drafts` drafts."""
        if len(self.paths) == 1:
            return self.paths[0]
        bucket = draft_bucket(num_drafts)
        for path in self.paths:
            if self._seen.get((path, bucket), 0) < self.warmup + self.samples:
                return path
        ranked = sorted(self.paths, key=lambda path: self._cost[(path, bucket)])
        self._exploited[bucket] = self._exploited.get(bucket, 0) + 1
        if self._exploited[bucket] % self.retry_every == 0:
            return ranked[1]
        return ranked[0]

    def record(self, path: str, num_drafts: int, seconds: float) -> None:
        """Count one round of `num_drafts` drafts on `path` that took `seconds` (verify + commit)."""
        key = (path, draft_bucket(num_drafts))
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] <= self.warmup:
            return
        previous = self._cost.get(key)
        self._cost[key] = (
            seconds if previous is None else self.memory * previous + (1 - self.memory) * seconds
        )

    def estimates(self) -> dict[tuple[str, int], float]:
        """The running mean seconds per `(path, bucket)` measured so far."""
        return dict(self._cost)


# per model, the costs of each (dtype, device) it was verified in
_COSTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, ChainPathCosts]] = weakref.WeakKeyDictionary()


def chain_path_costs(model: torch.nn.Module, paths: tuple[str, ...]) -> ChainPathCosts:
    """The `ChainPathCosts` of `model` in its current dtype and device for these `paths`, kept across calls
    (what one call measured, the next one uses)."""
    parameter = next(model.parameters())
    key = (parameter.dtype, parameter.device, paths)
    per_model = _COSTS.setdefault(model, {})
    if key not in per_model:
        per_model[key] = ChainPathCosts(paths)
    return per_model[key]
