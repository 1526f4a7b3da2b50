"""The oracle drafter of the SSM benchmark: acceptance α by construction, and lossless through the loop."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm import DraftConfig
from hf_specssm.testing.oracle import OracleDrafter

from tests.helpers.models import VOCAB, build


def test_oracle_corrupts_a_fraction_one_minus_alpha_of_positions():
    reference = torch.arange(2000)[None] % 50
    drafter = OracleDrafter(reference, alpha=0.7, vocab_size=50, seed=3)
    right = sum(drafter.token_at(p) == int(reference[0, p]) for p in range(2000))
    assert abs(right / 2000 - 0.7) < 0.04
    # keyed by position: asking again, or in another order, gives the same tokens
    again = OracleDrafter(reference, alpha=0.7, vocab_size=50, seed=3)
    assert [again.token_at(p) for p in (5, 1, 5)] == [
        drafter.token_at(5),
        drafter.token_at(1),
        drafter.token_at(5),
    ]


def test_oracle_rejects_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        OracleDrafter(torch.zeros(1, 3, dtype=torch.long), alpha=1.5, vocab_size=10)
    with pytest.raises(ValueError, match="reference"):
        OracleDrafter(torch.zeros(3, dtype=torch.long), alpha=0.5, vocab_size=10)


@pytest.mark.parametrize("target_kind", ["mamba2", "bamba"])
def test_oracle_rounds_accept_about_alpha_and_match_plain_greedy(target_kind):
    target = hf_specssm.enable(build(target_kind, seed=0))
    target.generation_config.eos_token_id = None  # the full 40 tokens, whatever the random model says
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    reference = target.generate(prompt, max_new_tokens=40, do_sample=False)
    for alpha, low, high in ((1.0, 4.9, 5.0), (0.0, 1.0, 1.0)):
        config = DraftConfig(num_draft_tokens=4, schedule="constant")
        drafter = OracleDrafter(reference, alpha, VOCAB, config=config)
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=40, do_sample=False)
        assert torch.equal(output, reference)
        stats = target.last_speculation_stats
        tau = stats.new_tokens / stats.rounds
        assert low <= tau <= high + 1e-9, (alpha, tau)
