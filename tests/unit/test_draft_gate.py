"""The draft gate: drafting switches off while it loses to plain steps, and probes its way back."""

from __future__ import annotations

import itertools
import random

import pytest

from hf_specssm import DraftConfig
from hf_specssm.policies.draft_length import DraftGate


def _round(gate: DraftGate, accepted_if_drafted: int, k: int = 4, draft_cost: float = 1.3) -> int:
    """One round: the gate decides, the round runs with modelled times; returns the drafted count."""
    drafted = k if gate.allows_drafting() else 0
    committed = 1 + (accepted_if_drafted if drafted else 0)
    gate.update(drafted, committed, draft_cost if drafted else 1.0)
    return drafted


def test_gate_closes_when_nothing_is_accepted_and_probes_less_and_less():
    gate = DraftGate(DraftConfig())
    drafted = [_round(gate, accepted_if_drafted=0) for _ in range(200)]
    assert not gate.open
    # after closing, drafted rounds are probes at growing intervals: 8, 16, 32, 64, 64, ...
    closed_from = next(i for i in range(len(drafted)) if not any(drafted[i : i + 5]))
    probes = [i for i in range(closed_from, len(drafted)) if drafted[i]]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:3] == [16, 32, 64] and all(gap == 64 for gap in gaps[3:])
    # the loop pays for drafting in under 3% of rounds once closed
    assert sum(1 for d in drafted[closed_from:] if d) / len(drafted[closed_from:]) < 0.03


def test_gate_stays_open_while_drafting_pays():
    gate = DraftGate(DraftConfig())
    drafted = [_round(gate, accepted_if_drafted=3) for _ in range(100)]
    assert gate.open
    # one undrafted round at most, to measure the alternative
    assert drafted.count(0) <= 1


def test_gate_reopens_when_a_probe_wins():
    gate = DraftGate(DraftConfig())
    for _ in range(60):
        _round(gate, accepted_if_drafted=0)
    assert not gate.open
    for _ in range(200):
        _round(gate, accepted_if_drafted=4)
    assert gate.open


def test_gate_with_a_fixed_cost_ratio_ignores_measured_times():
    config = DraftConfig(draft_cost_ratio=0.1)
    first, second = DraftGate(config), DraftGate(config)
    for index in range(50):
        for gate, noise in ((first, 1.0), (second, 5.0 + index)):
            drafted = 4 if gate.allows_drafting() else 0
            gate.update(drafted, 1, noise if drafted else 0.1)
    assert first.open == second.open is False
    assert first.interval == second.interval


def _drifting_run(gate: DraftGate, rounds: int, slow: range, seed: int = 0) -> list[tuple[int, int]]:
    """A drafter whose first draft is accepted 40% of the time (chains of 2, a round costs 1.05 steps), on a
    clock that runs drafted rounds 2× slower during `slow`: returns `(drafted, accepted)` per round."""
    generator = random.Random(seed)
    record = []
    for index in range(rounds):
        drafted = 2 if gate.allows_drafting() else 0
        if gate.probing:
            drafted = 1
        accepted = 0
        while accepted < drafted and generator.random() < 0.4:
            accepted += 1
        seconds = (1.0 + 0.025 * drafted) * (2.0 if drafted and index in slow else 1.0)
        gate.update(drafted, 1 + accepted, seconds)
        record.append((drafted, accepted))
    return record


@pytest.mark.parametrize("seed", range(4))
def test_a_drifting_clock_does_not_keep_a_useful_drafter_off(seed):
    """Drafting pays (1.4 tokens for 1.05 steps) but for 15 rounds the machine runs drafted rounds slowly: the
    gate closes; once the clock is steady again, every probe whose draft is accepted reopens it (judged
    against the undrafted rounds just before it), and it ends open."""
    gate = DraftGate(DraftConfig())
    record = _drifting_run(gate, 600, slow=range(20, 35), seed=seed)
    drafted = [count for count, _ in record]
    assert 0 in drafted[20:45], "the slow stretch closed the gate"
    probes = [i for i in range(35, len(record) - 1) if record[i] == (1, 1)]
    assert probes, "an accepted probe after the slow stretch"
    assert all(drafted[i + 1] == 2 for i in probes), "an accepted probe reopens the gate"
    assert gate.open


def test_probes_that_commit_one_token_never_reopen_even_on_a_fast_clock():
    """Prompt lookup on text that never repeats: a probe that commits only the target's token never reopens
    the gate, however fast its round happened to run (a probe timed at 0.3 steps reopened it before)."""
    gate = DraftGate(DraftConfig())
    drafted = []
    for _ in range(300):
        count = 4 if gate.allows_drafting() else 0
        if gate.probing:
            count = 1
        gate.update(count, 1, 0.3 if gate.probing else (1.3 if count else 1.0))
        drafted.append(count)
    assert not gate.open
    assert sum(1 for d in drafted[50:] if d) <= 8


def _model_drafter_call(
    gate: DraftGate,
    rounds: int,
    unknown: range = range(0),
    prompt_read: float = 8.0,
    every: int = 1,
    length: int = 4,
) -> list[int]:
    """One `generate` call of a model drafter whose chains of `length` keep up to 3 drafts in every
    `every`-th round and none in the others or during `unknown` (text it does not know); a caught-up round
    of `k` drafts costs 1 + 0.1·k steps; its first draft of the call reads the prompt (`prompt_read` steps)
    and a draft after undrafted rounds reads their tokens (0.3 steps each), as `ModelDrafter` does.
    Returns the drafted count per round."""
    gate.begin_sequence()
    fresh, unread, record = True, 0, []
    for index in range(rounds):
        drafted = length if gate.allows_drafting() else 0
        if gate.probing:
            drafted = 1
        if drafted:
            seconds = 1.0 + 0.1 * drafted + (prompt_read if fresh else 0.3 * unread)
            known = index not in unknown and index % every == every - 1
            committed, fresh, unread = 1 + (min(3, drafted) if known else 0), False, 0
        else:
            seconds, committed, unread = 1.0, 1, unread + 1
        gate.update(drafted, committed, seconds)
        record.append(drafted)
    return record


@pytest.mark.parametrize("catches_up", [True, False])
def test_a_probe_of_a_drafter_that_catches_up_is_judged_after_it_caught_up(catches_up):
    """A model drafter that pays (4 tokens for 1.4 steps) is closed out by text it does not know; each
    probe's draft first reads the tokens of the closed stretch (2.4 steps after 8 rounds, more later). Judged
    on that round, every probe loses and the gate never reopens (the control: `catches_up=False`, how the
    gate judged every drafter before); judged on the round after it, the first probe reopens it."""
    gate = DraftGate(DraftConfig(), catches_up=catches_up)
    record = _model_drafter_call(gate, 200, unknown=range(3, 20))
    assert 0 in record[3:20], "the unknown stretch closed the gate"
    if catches_up:
        assert gate.open and record[-20:] == [4] * 20
        closed = record.index(0, 12)  # (the first undrafted round only measured the alternative)
        reopened = next(i for i in range(closed, 200) if record[i] == 4)
        assert record[reopened - 2 : reopened] == [1, 1], "a probe of two rounds reopened it"
    else:
        assert not gate.open and sum(record[30:]) <= 8


@pytest.mark.parametrize("marked", [True, False])
def test_a_kept_drafter_does_not_count_each_prompt_read_as_a_drafted_round(marked):
    """A drafter kept across calls (as users keep one) reads each new prompt in its first draft of the call;
    that round is a sample of neither rate, so a drafter that pays (one draft, kept in every third round:
    1.33 tokens for 1.1 steps) stays open over many short calls. The control counts those reads (the loop not
    calling `begin_sequence`): the gate closes and the drafter drafts nothing on later calls."""
    gate = DraftGate(DraftConfig(), catches_up=True)
    if not marked:
        gate.begin_sequence = lambda: None
    records = [_model_drafter_call(gate, 8, prompt_read=20.0, every=3, length=1) for _ in range(12)]
    if marked:
        assert gate.open and all(record.count(1) >= 7 for record in records)
    else:
        assert not gate.open and sum(map(sum, records[-6:])) <= 2


def _fixed_rounds(gate: DraftGate, rounds: int, committed: int, round_cost: float) -> list[int]:
    """Chain rounds of 4 drafts that commit `committed` tokens for `round_cost` plain steps each (an undrafted
    round: 1 token, 1 step); returns the drafted count per round."""
    record = []
    for _ in range(rounds):
        drafted = 4 if gate.allows_drafting() else 0
        if gate.probing:
            drafted = 1
        gate.update(drafted, committed if drafted else 1, round_cost if drafted else 1.0)
        record.append(drafted)
    return record


@pytest.mark.parametrize(
    ("committed", "round_cost", "pays"), [(2, 2.4, False), (2, 1.3, True), (2, 1.8, True)]
)
def test_a_drafter_committing_two_tokens_a_round_is_judged_against_a_measured_plain_step(
    committed, round_cost, pays
):
    """Two tokens a round lose where a round costs 2.4 steps (fp32 verification on a CPU) and win at 1.3 (bf16
    matrix units): the gate measures one undrafted round and decides from it — closed in the first case
    (the gate used to presume that 1.5 tokens or more always pay and kept drafting at 0.83 tokens a step),
    open at 1.3 and 1.8 steps, after exactly one undrafted round."""
    gate = DraftGate(DraftConfig())
    record = _fixed_rounds(gate, 120, committed, round_cost)
    assert gate.open is pays
    if pays:
        assert record.count(0) == 1
    else:
        assert sum(1 for drafted in record[20:] if drafted) <= 4  # probes only


def test_a_drafter_that_surely_pays_is_never_held_back_to_measure():
    """Four tokens a round win on any machine measured (a round costs at most ~2.5 steps): no undrafted
    round is forced."""
    gate = DraftGate(DraftConfig())
    assert _fixed_rounds(gate, 60, committed=4, round_cost=1.2).count(0) == 0
    assert gate.open


def test_a_heads_prefill_round_is_not_taken_for_a_plain_step():
    """A draft head cannot draft in a sequence's first round (no hidden state yet), which also runs the
    target's prefill (6 steps here); its chains then commit 1.4 tokens for 2 steps and lose. The gate must
    not take that round for a plain step (it did: plain steps looked 6× slower, and the head drafted every
    round of every call); it measures a real undrafted round and closes."""
    gate = DraftGate(DraftConfig())
    drafted = []
    for _ in range(3):  # three calls with a kept drafter
        gate.begin_sequence()
        gate.allows_drafting()
        gate.update(0, 1, 6.0)
        for index in range(30):
            count = 6 if gate.allows_drafting() else 0
            if gate.probing:
                count = 1
            gate.update(count, (1 + (index % 5 < 2)) if count else 1, 2.0 if count else 1.0)
            drafted.append(count)
    assert not gate.open
    assert sum(1 for count in drafted[30:] if count) <= 6, "probes only after the first call"


@pytest.mark.parametrize("catches_up", [False, True])
def test_tree_rounds_take_each_calls_prefill_round_too(catches_up):
    """A drafter that drafts trees only: each call's first tree round ran the target's prefill and is not a
    sample for the tree bandit, whatever the drafter; the later ones are. Its calls leave nothing pending, so
    a chain round after many calls is timed (the prefill rounds are counted per row and consumed by tree
    rounds as by chain rounds)."""
    gate = DraftGate(DraftConfig(), catches_up=catches_up)
    for _ in range(5):
        gate.begin_sequence()
        assert [gate.tree_round() for _ in range(4)] == [False, True, True, True]
    gate.allows_drafting()
    gate.update(4, 3, 1.2)
    assert gate.last_round_timed
