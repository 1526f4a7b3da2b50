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

    def update(
        self, drafted: int, accepted: int, draft_time_s: float, verify_time_s: float, timed: bool = True
    ) -> None:
        """Learn from a finished round: `accepted` of `drafted` tokens passed verification. `timed=False`: its
        times are not a sample of a round's cost (the drafter also read a prompt or a closed stretch)."""


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

    def update(
        self, drafted: int, accepted: int, draft_time_s: float, verify_time_s: float, timed: bool = True
    ) -> None:
        if drafted == 0:
            return
        step = 2 if accepted == drafted else -1
        self.length = min(self.high, max(self.low, self.length + step))


class AdaptiveLength(DraftLengthPolicy):
    """Pick the length that maximises expected committed tokens per second.

    Acceptance is measured per draft position (Sequoia's positional acceptance vector): a round that
    accepted `n` of `k` drafts is a success at positions `1..n` and, if `n < k`, a failure at `n + 1`;
    later positions were not tested. `α_j`, the chance that draft `j` passes given that draft `j - 1`
    did, is the decayed success rate at position `j`, shrunk toward the pooled rate over all positions
    (itself starting from `acceptance_prior`, worth 4 rounds of evidence). Real acceptance is bursty and
    depends on the position, which a single pooled rate gets wrong in both directions.

    Round time (drafting plus verification) is modelled as `a + b · k`: `a` holds the fixed costs (one
    target forward, the drafter's catch-up on the committed tokens), `b` the per-draft-token cost (one
    draft step plus the extra verification width). Both are fitted by decayed least squares on measured
    round times, the slope pulled toward `0.25 · a` while the observed lengths barely vary; every 8th round drafts one token more
    than the optimum, so the slope and the next position's acceptance stay measured. With
    `draft_cost_ratio = r` set, nothing is timed: `a = 1 + r` and `b = r + 0.15` in units of one target
    forward (a Transformer verifying 8 tokens in fp32 on CPU costs about 2× one token), which makes the
    chosen lengths reproducible.

    The next length is `argmax_k (1 + Σ_{j≤k} Π_{i≤j} α_i) / (a + b · k)` over `[min, max]`.
    """

    _PRIOR_WEIGHT = 4.0
    _SHRINK_WEIGHT = 2.0
    _PRIOR_SLOPE = 0.25
    _VERIFY_SLOPE = 0.15
    _EXPLORE_EVERY = 8
    _RIDGE = 2.0

    def __init__(self, config: DraftConfig) -> None:
        self.config = config
        self.length = config.num_draft_tokens
        self._best = config.num_draft_tokens
        self.rounds = 0
        positions = config.max_draft_tokens + 1
        self._pass = [0.0] * positions
        self._fail = [0.0] * positions
        # decayed sufficient statistics of (k, round time)
        self._sw = self._sk = self._skk = self._st = self._skt = 0.0

    @property
    def acceptance(self) -> float:
        """Pooled estimate of the per-token acceptance probability."""
        passes, fails = sum(self._pass), sum(self._fail)
        prior = self.config.acceptance_prior * self._PRIOR_WEIGHT
        return (passes + prior) / (passes + fails + self._PRIOR_WEIGHT)

    def positional_acceptance(self) -> list[float]:
        """`α_1 … α_max`: chance that draft `j` passes given that draft `j - 1` passed."""
        pooled = self.acceptance
        return [
            (self._pass[j] + self._SHRINK_WEIGHT * pooled)
            / (self._pass[j] + self._fail[j] + self._SHRINK_WEIGHT)
            for j in range(1, self.config.max_draft_tokens + 1)
        ]

    def expected_committed(self, length: int) -> float:
        """Expected tokens committed by a round of `length` drafts under the positional estimates."""
        total, survive = 1.0, 1.0
        for alpha in self.positional_acceptance()[:length]:
            survive *= alpha
            total += survive
        return total

    def update(
        self, drafted: int, accepted: int, draft_time_s: float, verify_time_s: float, timed: bool = True
    ) -> None:
        decay = self.config.acceptance_memory
        self.rounds += 1
        if drafted > 0:
            self._pass = [value * decay for value in self._pass]
            self._fail = [value * decay for value in self._fail]
            for position in range(1, accepted + 1):
                self._pass[position] += 1.0
            if accepted < drafted:
                self._fail[accepted + 1] += 1.0
        if timed:
            round_time = draft_time_s + verify_time_s
            self._sw = self._sw * decay + 1.0
            self._sk = self._sk * decay + drafted
            self._skk = self._skk * decay + drafted * drafted
            self._st = self._st * decay + round_time
            self._skt = self._skt * decay + drafted * round_time
        self._best = self._best_length()
        explore = self.config.draft_cost_ratio is None and self.rounds % self._EXPLORE_EVERY == 0
        self.length = min(self._best + 1, self.config.max_draft_tokens) if explore else self._best

    def cost_line(self) -> tuple[float, float]:
        """`(a, b)` of the round-time model `a + b · k` (seconds, or target forwards with a fixed ratio).

        The slope is a ridge estimate pulled toward `0.25 · a`: lengths that barely vary (the policy's
        own choices) would otherwise turn timing noise into a steep slope and pin the length at 1.
        """
        ratio = self.config.draft_cost_ratio
        if ratio is not None:
            return 1.0 + ratio, ratio + self._VERIFY_SLOPE
        if self._sw == 0.0:
            return 1.0, self._PRIOR_SLOPE
        mean_k, mean_t = self._sk / self._sw, self._st / self._sw
        var_k = max(self._skk / self._sw - mean_k * mean_k, 0.0)
        cov_kt = self._skt / self._sw - mean_k * mean_t
        prior_slope = self._PRIOR_SLOPE * mean_t / (1.0 + self._PRIOR_SLOPE * mean_k)
        slope = (cov_kt + self._RIDGE * prior_slope) / (var_k + self._RIDGE)
        slope = max(slope, 1e-3 * mean_t)
        intercept = max(mean_t - slope * mean_k, 1e-3 * mean_t)
        return intercept, slope

    def _best_length(self) -> int:
        fixed, per_token = self.cost_line()
        best, best_rate = self.config.min_draft_tokens, -math.inf
        for k in range(self.config.min_draft_tokens, self.config.max_draft_tokens + 1):
            rate = self.expected_committed(k) / (fixed + per_token * k)
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


class DraftGate:
    """Switches drafting off while it does not pay, and probes now and then whether it would again.

    A draft source that accepts nothing (prompt lookup on text that never repeats, a drafter that does not
    know the domain) makes every round pay for drafting and for a wider verification, for one token. The
    gate compares, from measured round times, the tokens per second of rounds that drafted with those of
    rounds that did not (a plain step through the loop): while drafting is slower, the next rounds draft
    nothing. Every `interval` closed rounds a probe drafts a single token (`probing`: the cheapest
    verification that still measures acceptance); for a drafter that `catches_up`, in two rounds: the first
    brings it up to date — a model drafter reads every token committed while the gate was closed, which
    costs what many rounds' reading does — and is not judged; the second is. A probe that loses doubles
    the interval (8 → 64 rounds), one whose draft was accepted and whose rate beats the undrafted rounds
    just before it reopens the gate (closing again within 8 rounds of that also doubles the interval).
    Before it has measured an undrafted round, the gate forces one as soon as drafted rounds have given
    enough evidence, unless they commit `_SURE_WIN` tokens or more on average: a round that verifies drafts
    costs 1–1.3 plain steps where the matrix units are bf16-capable or on GPUs, but 2–2.5 in fp32 on CPUs,
    so a drafter committing 1.5–3 tokens a round may win or lose, and only the measured alternative tells.

    A drafter whose drafts are accepted at all closes the gate only when its rounds run 10% below the
    undrafted ones: on text where it barely pays, noise over a few rounds would otherwise close it (seen in
    bf16 on the real pair, where a head at 1.2× plain was switched off).

    Likewise the first round of each sequence (`begin_sequence`; the target reads the prompt in it) and its
    first drafted round (a model drafter reads the prompt then) are samples of neither rate: a drafter kept
    across `generate` calls, as users keep one, would otherwise pay each new prompt's read into its drafted
    rounds and close the gate, or keep it closed, on a slow machine; and a drafter that cannot draft before
    the first round (a draft head waits for the target's first hidden state) would count the target's
    prefill as a plain step, which made plain steps look several times slower than they are and kept a
    losing head drafting.

    With `draft_cost_ratio = r`, nothing is timed: a round of `k` drafts costs `1 + (r + 0.15) · k`
    target forwards and an undrafted round 1 (see `AdaptiveLength`).

    Args:
        config: the drafter's `DraftConfig` (`draft_cost_ratio`, `acceptance_memory`).
        catches_up: whether the drafter reads, in its next draft, every token committed while it drafted
            nothing (a model drafter's forward over them): then a probe takes two rounds, as above. Drafters
            that look tokens up (prompt lookup) probe in one round.
    """

    _FIRST_INTERVAL = 8
    _MAX_INTERVAL = 64
    _MIN_EVIDENCE = 2.0  # decayed drafted rounds before the gate may close
    # mean committed tokens of drafted rounds above which no undrafted round is forced: a drafted round
    # costs at most ~2.5 plain steps (fp32 on CPUs), so such a drafter wins wherever it was measured
    _SURE_WIN = 3.0
    _MARGIN = 0.1  # how much slower accepted drafting must run before the gate closes

    def __init__(self, config: DraftConfig, catches_up: bool = False) -> None:
        self.config = config
        self.catches_up = catches_up
        self.open = True
        self.rounds = 0
        self.interval = self._FIRST_INTERVAL
        self._closed_for = 0
        self._probing = False
        # the next drafted round also reads tokens the drafter has not seen (a prompt, a closed stretch)
        self._catching_up = True
        # rows whose first round is still to come: that round also runs the target's prefill of the prompt
        self._prefill_rounds = 0
        self._confirming = False  # the closed gate's probe is in its judged (second) round
        #: whether the last round's time was a sample of what its drafting costs (not a catching-up round)
        self.last_round_timed = True
        self._reopened_at: int | None = None  # the round a winning probe reopened the gate
        # decayed (weight, committed tokens, seconds) of drafted and of undrafted rounds
        self._drafted = [0.0, 0.0, 0.0]
        self._plain = [0.0, 0.0, 0.0]

    @property
    def probing(self) -> bool:
        """Whether the round `allows_drafting` just allowed is a probe of a closed gate."""
        return self._probing and not self.open

    def allows_drafting(self) -> bool:
        """Whether the next round drafts (the loop still caps the length by the room left)."""
        if self.open:
            # measure one undrafted round before deciding, unless drafting surely pays
            unmeasured = self._drafted[0] >= self._MIN_EVIDENCE and self._plain[0] == 0.0
            return not (unmeasured and self._may_lose())
        if self._confirming:
            return True
        self._closed_for += 1
        self._probing = self._closed_for >= self.interval
        return self._probing

    def begin_sequence(self) -> None:
        """A new sequence starts (the loop calls this for each `generate` call's rows): its first drafted
        round reads the prompt, so its time is not a sample of what drafting costs; and the target reads the
        prompt in the sequence's first round, drafted or not, so that round is a sample of neither rate."""
        self._catching_up = self.catches_up
        self._prefill_rounds += 1

    def tree_round(self) -> bool:
        """A tree round ran (the gate judges chain rounds only): whether its time was a sample of what its
        drafting costs — not so for a sequence's first round (it also ran the target's prefill) or a catch-up
        drafter's first drafted round (it also read the prompt)."""
        prefill = self._prefill_round()
        self.last_round_timed = not (prefill or self._catching_up)
        self._catching_up = False
        return self.last_round_timed

    def _prefill_round(self) -> bool:
        """Whether the round being recorded is a row's first, which also ran the target's prefill."""
        prefill = self._prefill_rounds > 0
        self._prefill_rounds = max(self._prefill_rounds - 1, 0)
        return prefill

    def _may_lose(self) -> bool:
        """Whether the drafted rounds commit too few tokens to win however much a round costs."""
        weight, committed, _ = self._drafted
        return committed / weight < self._SURE_WIN

    def _round_time(self, drafted: int, seconds: float) -> float:
        ratio = self.config.draft_cost_ratio
        if ratio is None:
            return seconds
        return 1.0 + (ratio + AdaptiveLength._VERIFY_SLOPE) * drafted

    def update(self, drafted: int, committed: int, round_time_s: float) -> None:
        """Learn from a finished chain round: `drafted` tokens proposed, `committed` tokens appended."""
        self.rounds += 1
        seconds = self._round_time(drafted, round_time_s)
        prefill = self._prefill_round()
        self.last_round_timed = not (prefill or (drafted > 0 and self._catching_up))
        if drafted > 0 and (self._catching_up or prefill):
            # this round's drafter also read what it had not seen, or the target its prompt: a probe goes on
            # to its judged round
            self._catching_up = False
            self._confirming = not self.open and self._probing
            return
        if prefill:
            return  # an undrafted round that also ran the prefill (a head waits for the first hidden state)
        if not self.open and self._probing and drafted > 0:
            self._confirming = False
            self._judge_probe(committed, seconds)
            return
        decay = self.config.acceptance_memory
        stats = self._drafted if drafted > 0 else self._plain
        stats[:] = [stats[0] * decay + 1.0, stats[1] * decay + committed, stats[2] * decay + seconds]
        if self._drafted[0] < self._MIN_EVIDENCE or self._plain[0] == 0.0:
            return
        weight, committed_sum, seconds_sum = self._drafted
        # a drafter that gets drafts accepted closes only on a clear loss: a few noisy rounds of one that
        # barely pays would close a gate whose one-token probes seldom reopen it; one that gets nothing
        # accepted (prompt lookup on text that never repeats) closes on any loss
        margin = self._MARGIN if committed_sum / weight > 1.05 else 0.0
        drafting_pays = committed_sum / seconds_sum >= (1.0 - margin) * self._plain[1] / self._plain[2]
        if self.open and not drafting_pays:
            self.open, self._closed_for, self._catching_up = False, 0, self.catches_up
            # closing soon after a probe reopened it: that probe was lucky, so probe less often
            recently_reopened = (
                self._reopened_at is not None and self.rounds - self._reopened_at <= self._FIRST_INTERVAL
            )
            self.interval = (
                min(2 * self.interval, self._MAX_INTERVAL) if recently_reopened else self._FIRST_INTERVAL
            )

    def _judge_probe(self, committed: int, seconds: float) -> None:
        """A probe of the closed gate wins when its draft was accepted and its tokens per second beat the
        undrafted rounds just before it (measured in the same stretch of time, so a machine whose speed
        drifts does not keep a useful drafter switched off); a win restarts the drafted rounds' record from
        the probe, since the rounds that closed the gate may have run at another speed."""
        self._probing, self._closed_for = False, 0
        plain_rate = self._plain[1] / self._plain[2] if self._plain[2] > 0 else 0.0
        if committed > 1 and committed / seconds >= plain_rate:
            self.open, self._reopened_at = True, self.rounds
            self._drafted = [1.0, float(committed), seconds]
        else:
            self.interval = min(2 * self.interval, self._MAX_INTERVAL)
            self._catching_up = self.catches_up  # the next probe reads this closed stretch first
