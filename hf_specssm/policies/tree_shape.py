"""Test-time choice of the tree per round: a UCB1 bandit over a pool of shapes (Mamba Drafters §3.2), and a
confidence-driven dynamic tree (EAGLE-2).

Arms are tree shapes (children per node at each depth); a chain of `k` drafts is the shape `(1,) * k`, so
chains compete with trees in the same pool.

Reward of a round: tokens committed per second of that round (drafting + verification). That is the
quantity speculative decoding maximises, and it charges wide trees for their verification cost, which on
some hardware (this project's AVX2 CPUs) is the deciding factor. Rewards are divided by the best arm's
current mean before the exploration bonus is added, so the exploration constant `c` does not depend on
the speed of the machine:

    a_t = argmax_a  r̄_a / max_b r̄_b  +  c · sqrt(ln t / n_a)      (every arm pulled `initial_pulls` times first)

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
        initial_pulls: rounds each arm is drafted, in turn, before UCB scoring starts. One round's reward is
            noisy (acceptance varies with the position in the text); with a single pull a good arm can be
            dropped on one unlucky round and never revisited.
    """

    def __init__(
        self, arms: Sequence[tuple[int, ...]] = DEFAULT_ARMS, exploration: float = 0.3, initial_pulls: int = 2
    ) -> None:
        arms = tuple(tuple(arm) for arm in arms)
        if not arms:
            raise ValueError("the bandit needs at least one arm.")
        for arm in arms:
            if not arm or any(not isinstance(width, int) or width < 1 for width in arm):
                raise ValueError(f"every arm must be a non-empty tuple of integers >= 1, got {arm!r}.")
        if exploration < 0:
            raise ValueError(f"exploration must be >= 0, got {exploration!r}.")
        if not isinstance(initial_pulls, int) or initial_pulls < 1:
            raise ValueError(f"initial_pulls must be an integer >= 1, got {initial_pulls!r}.")
        self.initial_pulls = initial_pulls
        self.arms = arms
        self.exploration = exploration
        self.counts = [0] * len(arms)
        self.means = [0.0] * len(arms)
        self.history: list[int] = []
        self._pending: int | None = None

    def choose(self) -> tuple[int, ...]:
        """The shape to draft next round."""
        least = min(self.counts)
        if least < self.initial_pulls:
            index = self.counts.index(least)
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


class DynamicTreePolicy:
    """Grow each round's tree from the drafter's own confidence (EAGLE-2, Li et al. 2024).

    The value of a node is its path's cumulative draft log-probability. Each depth expands only the
    `top_k` most valuable frontier nodes, into their `top_k` best children each (one batched drafter
    step over `top_k` rows, so cost grows with depth × `top_k`, not with the tree); after `depth` levels
    every node drafted is reranked by value and the best `max_nodes` are verified (ancestor-closed: a
    node's value never exceeds its parent's).

    Args:
        depth: levels to draft (the longest path the target can accept).
        top_k: frontier width per level and children per expanded node.
        max_nodes: verification budget (nodes in the tree sent to the target).
    """

    def __init__(self, depth: int = 5, top_k: int = 4, max_nodes: int = 16) -> None:
        for name, value in (("depth", depth), ("top_k", top_k), ("max_nodes", max_nodes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        self.depth = depth
        self.top_k = top_k
        self.max_nodes = max_nodes
        self.history: list[int] = []

    def choose(self) -> None:
        """No fixed shape: the drafter grows the tree (`ModelDrafter.draft_tree` with `shape=None`)."""
        return None

    def update(self, committed_tokens: int, seconds: float) -> None:
        """Record the round (the policy itself does not learn across rounds)."""
        self.history.append(committed_tokens)
