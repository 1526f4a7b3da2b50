"""The draft gate: drafting switches off while it loses to plain steps, and probes its way back."""

from __future__ import annotations

import itertools

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
