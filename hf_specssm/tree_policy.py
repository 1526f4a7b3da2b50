"""Test-time choice of the tree shape per round: a UCB1 bandit over a pool of shapes (Mamba Drafters §3.2).

Arms are tree shapes (children per node at each depth); a chain of `k` drafts is the shape `(1,) * k`, so
chains compete with trees in the same pool.

Reward of a round: tokens committed per second of that round (drafting + verification). That is the
quantity speculative decoding maximises, and it charges wide trees for their verification cost, which on
some hardware (this project's AVX2 CPUs) is the deciding factor. Rewards are divided by the best arm's
current mean before the exploration bonus is added, so the exploration constant `c` does not depend on
the speed of the machine:

    a_t = argmax_a  r̄_a / max_b r̄_b  +  c · sqrt(ln t / n_a)      (every arm pulled once first)

`c = 0.3` by default: with normalised rewards in (0, 1], arms within a few percent of the best keep being
sampled occasionally, and clearly worse arms are dropped after a handful of pulls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_ARMS: tuple[tuple[int, ...], ...] = (
    (1, 1, 1, 1),
    (1, 1, 1, 1, 1, 1),
    (2, 2, 1, 1),
    (3, 2, 2, 1, 1),
    (2, 2, 2, 1, 1, 1),
    (3, 3, 2, 1),
)


class UCBTreePolicy:
    """UCB1 bandit whose arms are tree shapes.

    Args:
        arms: the pool of shapes (default: chains of 4 and 6, and four trees from the paper's pool).
        exploration: `c` of the bonus term.
    """

    def __init__(self, arms: Sequence[tuple[int, ...]] = DEFAULT_ARMS, exploration: float = 0.3) -> None:
        arms = tuple(tuple(arm) for arm in arms)
        if not arms:
            raise ValueError("the bandit needs at least one arm.")
        for arm in arms:
            if not arm or any(not isinstance(width, int) or width < 1 for width in arm):
                raise ValueError(f"every arm must be a non-empty tuple of integers >= 1, got {arm!r}.")
        if exploration < 0:
            raise ValueError(f"exploration must be >= 0, got {exploration!r}.")
        self.arms = arms
        self.exploration = exploration
        self.counts = [0] * len(arms)
        self.means = [0.0] * len(arms)
        self.history: list[int] = []
        self._pending: int | None = None

    def choose(self) -> tuple[int, ...]:
        """The shape to draft next round."""
        untried = [index for index, count in enumerate(self.counts) if count == 0]
        if untried:
            index = untried[0]
        else:
            total = sum(self.counts)
            best = max(self.means) or 1.0
            scores = [
                mean / best + self.exploration * math.sqrt(math.log(total) / count)
                for mean, count in zip(self.means, self.counts)
            ]
            index = max(range(len(self.arms)), key=scores.__getitem__)
        self._pending = index
        return self.arms[index]

    def update(self, committed_tokens: int, seconds: float) -> None:
        """Reward the arm returned by the last `choose()`."""
        if self._pending is None:
            raise RuntimeError("update() without a preceding choose().")
        index, self._pending = self._pending, None
        reward = committed_tokens / max(seconds, 1e-9)
        self.counts[index] += 1
        self.means[index] += (reward - self.means[index]) / self.counts[index]
        self.history.append(index)

    @property
    def best_arm(self) -> tuple[int, ...]:
        """The arm with the highest mean reward so far."""
        return self.arms[max(range(len(self.arms)), key=self.means.__getitem__)]
