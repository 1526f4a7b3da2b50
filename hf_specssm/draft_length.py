"""Draft-length schedules: how many tokens to draft in the next round."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from hf_specssm.config import DraftConfig


class DraftLengthPolicy(ABC):
    """Chooses the number of draft tokens per round and learns from each round's outcome."""

    @abstractmethod
    def next_length(self) -> int:
        """Draft length for the next round (>= 1)."""

    def update(self, drafted: int, accepted: int, draft_time_s: float, verify_time_s: float) -> None:
        """Learn from a finished round: `accepted` of `drafted` tokens passed verification."""


class ConstantLength(DraftLengthPolicy):
    """Always the same length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def next_length(self) -> int:
        return self.length


class HeuristicLength(DraftLengthPolicy):
    """transformers' `num_assistant_tokens_schedule="heuristic"`: +2 when all drafts pass, else -1."""

    def __init__(self, config: DraftConfig) -> None:
        self.length = config.num_draft_tokens
        self.low, self.high = config.min_draft_tokens, config.max_draft_tokens

    def next_length(self) -> int:
        return self.length

    def update(self, drafted: int, accepted: int, draft_time_s: float, verify_time_s: float) -> None:
        if drafted == 0:
            return
        step = 2 if accepted == drafted else -1
        self.length = min(self.high, max(self.low, self.length + step))


def expected_committed(acceptance: float, length: int) -> float:
    """Expected tokens committed by a round of `length` drafts, if each is accepted with prob. `acceptance`.

    `1 + a + a² + … + a^length`: the accepted prefix plus the target's own token.
    """
    if acceptance >= 1.0:
        return float(length + 1)
    return (1.0 - acceptance ** (length + 1)) / (1.0 - acceptance)


class AdaptiveLength(DraftLengthPolicy):
    """Pick the length that maximises expected committed tokens per unit of time.

    Acceptance is modelled per token (a round that accepted `n` of `k` drafts is `n` successes and, if
    `n < k`, one failure) with exponentially decayed counts and a prior. Time per round is modelled as
    `k · t_draft + t_verify(k)` with `t_verify(k) = v0 + v1 · k`, fitted by decayed least squares on the
    measured verification times; until two lengths have been seen, `v1 = 0.15 · v0` (a Transformer verifying
    8 tokens in fp32 on CPU costs about 2× one token). With `draft_cost_ratio` set, times are not measured:
    `t_draft = ratio` and `t_verify(k) = 1 + 0.15 · k` in units of one target forward.
    """

    _PRIOR_WEIGHT = 4.0
    _DEFAULT_SLOPE = 0.15

    def __init__(self, config: DraftConfig) -> None:
        self.config = config
        self.length = config.num_draft_tokens
        self.successes = config.acceptance_prior * self._PRIOR_WEIGHT
        self.failures = (1.0 - config.acceptance_prior) * self._PRIOR_WEIGHT
        # decayed sufficient statistics for t_draft per token and the t_verify(k) line
        self._draft_time = 0.0
        self._draft_tokens = 0.0
        self._sw = self._sk = self._skk = self._st = self._skt = 0.0

    @property
    def acceptance(self) -> float:
        """Current estimate of the per-token acceptance probability."""
        return self.successes / (self.successes + self.failures)

    def update(self, drafted: int, accepted: int, draft_time_s: float, verify_time_s: float) -> None:
        decay = self.config.acceptance_memory
        self.successes = self.successes * decay + accepted
        self.failures = self.failures * decay + (1.0 if accepted < drafted else 0.0)
        if drafted > 0:
            self._draft_time = self._draft_time * decay + draft_time_s
            self._draft_tokens = self._draft_tokens * decay + drafted
        self._sw = self._sw * decay + 1.0
        self._sk = self._sk * decay + drafted
        self._skk = self._skk * decay + drafted * drafted
        self._st = self._st * decay + verify_time_s
        self._skt = self._skt * decay + drafted * verify_time_s
        self.length = self._best_length()

    def _verify_line(self) -> tuple[float, float]:
        if self.config.draft_cost_ratio is not None or self._sw == 0.0:
            return 1.0, self._DEFAULT_SLOPE
        mean_k, mean_t = self._sk / self._sw, self._st / self._sw
        var_k = self._skk / self._sw - mean_k * mean_k
        if var_k > 1e-6:
            slope = max(0.0, (self._skt / self._sw - mean_k * mean_t) / var_k)
            intercept = max(mean_t - slope * mean_k, 1e-9)
            return intercept, slope
        intercept = mean_t / (1.0 + self._DEFAULT_SLOPE * mean_k)
        return intercept, self._DEFAULT_SLOPE * intercept

    def _draft_step_time(self, verify_intercept: float) -> float:
        if self.config.draft_cost_ratio is not None:
            return self.config.draft_cost_ratio * verify_intercept
        if self._draft_tokens > 0:
            return self._draft_time / self._draft_tokens
        return 0.1 * verify_intercept

    def _best_length(self) -> int:
        v0, v1 = self._verify_line()
        t_draft = self._draft_step_time(v0)
        alpha = self.acceptance
        best, best_rate = self.config.min_draft_tokens, -math.inf
        for k in range(self.config.min_draft_tokens, self.config.max_draft_tokens + 1):
            rate = expected_committed(alpha, k) / (k * t_draft + v0 + v1 * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def next_length(self) -> int:
        return self.length


def make_policy(config: DraftConfig) -> DraftLengthPolicy:
    """The policy named by `config.schedule`."""
    if config.schedule == "constant":
        return ConstantLength(config.num_draft_tokens)
    if config.schedule == "heuristic":
        return HeuristicLength(config)
    return AdaptiveLength(config)
