"""Speculative sampling preserves the target's distribution (chi-square tests, stated false-alarm rate).

Each test rejects at p < ALPHA = 1e-3, so a correct implementation fails one given test with probability
0.1% (the seeds are fixed, so a pass is reproducible). Each test also shows its power: the same test on
samples from a wrong distribution (the drafter's own) rejects.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

import hf_specssm
from hf_specssm.decoding.acceptance import accept_sampling

from models import align, build

ALPHA = 1e-3
VOCAB = 5
NEW_TOKENS = 3
TEMPERATURE = 0.8
TOP_K = 4


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Goodness of fit, merging outcomes whose expected count is below 5 into one bin."""
    total = counts.sum()
    expected = probs * total
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    expected *= observed.sum() / expected.sum()
    return float(chisquare(observed, expected).pvalue)


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


def _processors() -> LogitsProcessorList:
    return LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K)])


@torch.no_grad()
def exact_distribution(model, prompt: torch.Tensor) -> np.ndarray:
    """Probability of every continuation of NEW_TOKENS tokens under `model` with the test's warpers."""
    processors = _processors()
    outcomes = list(itertools.product(range(VOCAB), repeat=NEW_TOKENS))
    probs = np.ones(len(outcomes))
    for depth in range(NEW_TOKENS):
        prefixes = sorted({outcome[:depth] for outcome in outcomes})
        table = {}
        for prefix in prefixes:
            sequence = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long).reshape(1, -1)], dim=1)
            logits = model(sequence).logits[:, -1].float()
            table[prefix] = torch.softmax(processors(sequence, logits), dim=-1)[0].numpy()
        for index, outcome in enumerate(outcomes):
            probs[index] *= table[outcome[:depth]][outcome[depth]]
    return probs


def sample_continuations(
    target,
    drafter_model,
    prompt,
    samples: int,
    seed: int,
    vocab: int = VOCAB,
    drafter_options: dict | None = None,
    wrap=None,
    **generate_kwargs,
):
    """Counts of each NEW_TOKENS continuation over `samples` speculative sampling calls, and every
    round's accepted length."""
    index = {outcome: i for i, outcome in enumerate(itertools.product(range(vocab), repeat=NEW_TOKENS))}
    torch.manual_seed(seed)
    options = {"num_draft_tokens": 2, "schedule": "constant", **(drafter_options or {})}
    drafter = hf_specssm.ModelDrafter(drafter_model, **options)
    if wrap is not None:
        drafter = wrap(drafter)
    counts = np.zeros(len(index))
    accepted = []
    for _ in range(samples):
        output = target.generate(
            prompt,
            assistant_model=drafter,
            max_new_tokens=NEW_TOKENS,
            do_sample=True,
            temperature=TEMPERATURE,
            top_k=TOP_K,
            top_p=1.0,
            **generate_kwargs,
        )
        counts[index[tuple(output[0, prompt.shape[1] :].tolist())]] += 1
        accepted += target.last_speculation_stats.accepted_lengths
    return counts, accepted


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.config.eos_token_id = None
    return model


@pytest.mark.parametrize(
    "drafter_quality",
    [pytest.param("good", id="aligned-drafter"), pytest.param("bad", id="unrelated-drafter")],
)
def test_speculative_sampling_matches_target_distribution(drafter_quality):
    target = _no_eos(build("llama", seed=0, vocab=VOCAB))
    drafter_model = _no_eos(build("mamba", seed=1, vocab=VOCAB))
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
