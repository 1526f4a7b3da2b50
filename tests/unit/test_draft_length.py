"""Draft-length schedules on simulated acceptance (no models, no timing)."""

from __future__ import annotations

import random

import pytest

from hf_specssm import DraftConfig
from hf_specssm.policies.draft_length import (
    AdaptiveLength,
    ConstantLength,
    HeuristicLength,
    make_policy,
)


def simulate(policy, accept_position, rounds=200, seed=0):
    """Run `rounds` rounds; `accept_position(j, rng)` says whether draft j (1-based) passes."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(rounds):
        k = policy.next_length()
        accepted = 0
        while accepted < k and accept_position(accepted + 1, rng):
            accepted += 1
        policy.update(k, accepted, 0.0, 0.0)
        lengths.append(k)
    return lengths


def test_make_policy_dispatch():
    assert isinstance(make_policy(DraftConfig(schedule="constant")), ConstantLength)
    assert isinstance(make_policy(DraftConfig(schedule="heuristic")), HeuristicLength)
    assert isinstance(make_policy(DraftConfig(schedule="adaptive")), AdaptiveLength)


def test_heuristic_follows_transformers_rule_within_bounds():
    policy = HeuristicLength(
        DraftConfig(num_draft_tokens=4, schedule="heuristic", min_draft_tokens=2, max_draft_tokens=7)
    )
    policy.update(4, 4, 0, 0)
    assert policy.next_length() == 6
    policy.update(6, 6, 0, 0)
    assert policy.next_length() == 7  # capped
    for _ in range(9):
        policy.update(7, 0, 0, 0)
    assert policy.next_length() == 2  # floored


def test_expected_committed_follows_the_positional_estimates():
    policy = AdaptiveLength(DraftConfig(schedule="adaptive", draft_cost_ratio=0.05, acceptance_prior=0.5))
    assert policy.expected_committed(0) == 1.0
    # no evidence yet: every position at the prior 0.5 -> 1 + 0.5 + 0.25
    assert policy.expected_committed(2) == pytest.approx(1.75)
    for _ in range(30):
        policy.update(3, 1, 0.0, 0.0)  # position 1 always passes, position 2 always fails
    alphas = policy.positional_acceptance()
    assert alphas[0] > 0.9 and alphas[1] < 0.1


@pytest.mark.parametrize(
    "alpha, low, high",
    [
        pytest.param(0.95, 6, 16, id="high-acceptance-drafts-long"),
        pytest.param(0.6, 1, 6, id="medium"),
        pytest.param(0.1, 1, 1, id="low-acceptance-drafts-one"),
    ],
)
def test_adaptive_tracks_iid_acceptance(alpha, low, high):
    config = DraftConfig(schedule="adaptive", draft_cost_ratio=0.05, max_draft_tokens=16)
    lengths = simulate(AdaptiveLength(config), lambda j, rng: rng.random() < alpha)
    settled = sorted(lengths[-50:])
    # 90% of the settled lengths lie in the band (the estimates keep ~10 rounds of evidence, so they move)
    assert low <= settled[5] and settled[-6] <= high


def test_adaptive_learns_positional_acceptance():
    """Drafts 1-3 always pass, draft 4 never does: the best length is 3 (a 4th draft only costs)."""
    config = DraftConfig(schedule="adaptive", draft_cost_ratio=0.05, num_draft_tokens=8)
    lengths = simulate(AdaptiveLength(config), lambda j, rng: j <= 3)
    # it re-tests position 4 now and then as old evidence decays, but settles on 3
    assert lengths[-40:].count(3) >= 32 and min(lengths[-40:]) >= 3


def test_adaptive_adapts_when_acceptance_drops():
    config = DraftConfig(schedule="adaptive", draft_cost_ratio=0.05)
    policy = AdaptiveLength(config)
    simulate(policy, lambda j, rng: rng.random() < 0.95, rounds=100)
    long_length = policy.next_length()
    simulate(policy, lambda j, rng: rng.random() < 0.15, rounds=60)
    assert long_length >= 8 and policy.next_length() == 1


def timed_rounds(policy, rounds: int, draft_time) -> None:
    """`rounds` rounds at acceptance 0.85 per draft; `draft_time(index, k)` gives a round's draft seconds
    (verification takes 1) and whether the round is timed."""
    rng = random.Random(0)
    for index in range(rounds):
        k = policy.next_length()
        accepted = 0
        while accepted < k and rng.random() < 0.85:
            accepted += 1
        seconds, timed = draft_time(index, k)
        policy.update(k, accepted, seconds, 1.0, timed=timed)


def test_adaptive_fits_measured_round_times():
    """Expensive per-token cost (slow drafter) shortens drafts at the same acceptance."""
    config = DraftConfig(schedule="adaptive", max_draft_tokens=16)
    lengths, slopes = {}, {}
    for per_token in (0.02, 1.0):
        policy = AdaptiveLength(config)
        timed_rounds(policy, 300, lambda index, k, cost=per_token: (cost * k, True))
        lengths[per_token] = policy.next_length()
        slopes[per_token] = policy.cost_line()[1]
    assert slopes[1.0] > 5 * slopes[0.02]
    assert lengths[1.0] < lengths[0.02]


@pytest.mark.parametrize("counted", [False, True])
def test_untimed_rounds_teach_acceptance_but_not_cost(counted):
    """A round whose drafter also read a prompt (the gate's `last_round_timed` is false) counts its accepted
    drafts but not its time: with a 30-step read every 10th round, the fitted round time stays the drafting
    cost (1 + 0.05·k steps, at the lengths drafted); the control counts the reads and fits a fixed cost
    several times too high."""
    config = DraftConfig(schedule="adaptive", max_draft_tokens=8)
    policy = AdaptiveLength(config)

    def round_time(index: int, k: int) -> tuple[float, bool]:
        reads = index % 10 == 0
        return 0.05 * k + (30.0 if reads else 0.0), counted or not reads

    timed_rounds(policy, 200, round_time)
    assert policy.acceptance > 0.75
    intercept, slope = policy.cost_line()
    if counted:
        assert intercept > 2.0
    else:
        # the chains stay at 8 drafts, where the fitted line must give their time, 1.4 steps
        assert policy.next_length() == 8 and abs(intercept + 8 * slope - 1.4) < 0.05 and intercept < 1.4
