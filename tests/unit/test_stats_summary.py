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


def test_acceptance_by_position_counts_chain_rounds_only():
    stats = SpeculationStats()
    # chains: 3 drafted / 1 accepted, 3 / 3, 2 / 0, nothing drafted; one tree round of 7 nodes
    for drafted, accepted, tree in [(3, 1, False), (3, 3, False), (2, 0, False), (0, 0, False), (7, 2, True)]:
        stats.record_round(drafted, accepted, accepted + 1, tree=tree)
    reached, accepted = stats.acceptance_by_position()
    # position 0: reached by the three chains that drafted, accepted by two; position 1: reached by the
    # two that accepted position 0, accepted by one; position 2: reached and accepted by the full chain
    assert (reached, accepted) == ([3, 2, 1], [2, 1, 1])
    assert sum(accepted) == stats.accepted_tokens - 2  # the tree round's path is left out
    assert SpeculationStats().acceptance_by_position() == ([], [])
