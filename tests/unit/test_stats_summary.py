"""`SpeculationStats.summary()` names what τ and the acceptance share count, so neither can be misread."""

from __future__ import annotations

from hf_specssm.stats import SpeculationStats


def test_summary_names_tau_and_acceptance_with_their_units():
    stats = SpeculationStats(draft_time_s=0.12, verify_time_s=0.9, commit_time_s=0.015, total_time_s=2.0)
    # a tree-like call: many nodes drafted per round, one path accepted
    for drafted, accepted in [(27, 2), (27, 1), (27, 3)]:
        stats.record_round(drafted, accepted, accepted + 1)
    assert stats.summary() == (
        "9 tokens in 3 rounds; τ 3.00 tokens per target forward; 6 of 81 drafted tokens accepted (7%); "
        "draft 120 ms, verify 900 ms, commit 15 ms; 4.5 tokens/s"
    )


def test_summary_of_a_call_without_rounds():
    assert (
        SpeculationStats()
        .summary()
        .startswith(
            "0 tokens in 0 rounds; τ 0.00 tokens per target forward; 0 of 0 drafted tokens accepted (0%)"
        )
    )
