"""Sampling statistics: the exact distribution of short continuations, speculative samples of them, and a
chi-square goodness-of-fit test (tests reject at p < ALPHA)."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

import hf_specssm

ALPHA = 1e-3
VOCAB = 5  # the sampling tests' vocabulary: every continuation is enumerated
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


def no_eos(model):
    """`model` with no EOS token, so every sample has exactly NEW_TOKENS tokens."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.config.eos_token_id = None
    return model
