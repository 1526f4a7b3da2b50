"""Speculative sampling preserves the target's distribution (chi-square tests, stated false-alarm rate).

Each test rejects at p < ALPHA = 1e-3, so a correct implementation fails one given test with probability
0.1% (the seeds are fixed, so a pass is reproducible). Each test also shows its power: the same test on
samples from a wrong distribution (the drafter's own) rejects.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_specssm
from hf_specssm.decoding.acceptance import accept_sampling

from tests.helpers.models import align, build
from tests.helpers.sampling import (
    ALPHA,
    VOCAB,
    chi_square_p_value,
    exact_distribution,
    no_eos,
    sample_continuations,
)


@pytest.mark.slow
def test_acceptance_rule_outputs_target_distribution():
    generator = torch.Generator().manual_seed(0)
    vocab, k, samples = 6, 3, 20000
    target = torch.softmax(torch.randn(k + 1, vocab, generator=generator) * 1.5, dim=-1)
    draft = torch.softmax(torch.randn(k, vocab, generator=generator) * 1.5, dim=-1)
    first_tokens = np.zeros(vocab)
    accepted_counts = np.zeros(k + 1)
    for _ in range(samples):
        tokens = torch.stack([torch.multinomial(draft[i], 1, generator=generator)[0] for i in range(k)])
        num_accepted, next_token = accept_sampling(tokens, draft, target, generator=generator)
        first = int(tokens[0]) if num_accepted > 0 else next_token
        first_tokens[first] += 1
        accepted_counts[num_accepted] += 1
    assert chi_square_p_value(first_tokens, target[0].numpy()) > ALPHA
    assert (accepted_counts > 0).all(), "every accept length must occur"
    # power: the draft distribution is rejected by the same test
    assert chi_square_p_value(first_tokens, draft[0].numpy()) < ALPHA


def test_deterministic_drafts_keep_the_distribution():
    """`q` one-hot (greedy or n-gram drafts): accept with probability p(draft)."""
    generator = torch.Generator().manual_seed(1)
    target = torch.softmax(torch.randn(2, 5, generator=generator), dim=-1)
    counts = np.zeros(5)
    for _ in range(20000):
        num_accepted, next_token = accept_sampling(torch.tensor([3]), None, target, generator=generator)
        counts[3 if num_accepted else next_token] += 1
    assert chi_square_p_value(counts, target[0].numpy()) > ALPHA


@pytest.mark.slow
@pytest.mark.parametrize(
    "drafter_quality",
    [pytest.param("good", id="aligned-drafter"), pytest.param("bad", id="unrelated-drafter")],
)
def test_speculative_sampling_matches_target_distribution(drafter_quality):
    target = no_eos(build("llama", seed=0, vocab=VOCAB))
    drafter_model = no_eos(build("mamba", seed=1, vocab=VOCAB))
    if drafter_quality == "good":
        align(target, drafter_model, head_noise=0.2)
    hf_specssm.enable(target)
    prompt = torch.tensor([[1, 3, 4]])
    probs = exact_distribution(target, prompt)
    counts, accepted = sample_continuations(target, drafter_model, prompt, samples=2500, seed=1234)
    assert chi_square_p_value(counts, probs) > ALPHA
    # the runs exercised rejections and acceptances
    assert 0 in accepted and 2 in accepted

    if drafter_quality == "bad":
        # Power: a loop that accepted drafts blindly would emit the drafter's distribution; the same test
        # with as many samples rejects it. (An aligned drafter is, by design, statistically close to the
        # target at this sample size, so only the unrelated drafter can show power.)
        drafter_probs = exact_distribution(drafter_model, prompt)
        wrong = np.random.default_rng(0).multinomial(int(counts.sum()), drafter_probs / drafter_probs.sum())
        assert chi_square_p_value(wrong.astype(float), probs) < ALPHA
