"""Multi-draft speculative sampling over token trees preserves the target's distribution.

Chi-square tests at p < ALPHA = 1e-3 with fixed seeds, as in test_sampling.py; each rule test also shows
its power with a sabotaged rule that the same test rejects.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import hf_specssm
from hf_specssm.decoding import acceptance
from hf_specssm.decoding.acceptance import accept_tree_sampling
from hf_specssm.tree import TokenTree

from tests.helpers.models import HIDDEN, align, build
from tests.helpers.sampling import (
    ALPHA,
    TEMPERATURE,
    TOP_K,
    chi_square_p_value,
    exact_distribution,
    no_eos,
    sample_continuations,
)

# Every test here draws thousands of samples (each over 5 s on 2 cores).
pytestmark = pytest.mark.slow

V = 5
SAMPLING = {"temperature": TEMPERATURE, "top_k": TOP_K, "top_p": 1.0}


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target `p_root [V]`, `p(·|x) [V, V]` and drafter `q_root [V]`, `q(·|x) [V, V]`."""
    generator = torch.Generator().manual_seed(seed)

    def soft(*shape):
        return torch.softmax(torch.randn(*shape, generator=generator, dtype=torch.float64) * 1.5, dim=-1)

    return soft(V), soft(V, V), soft(V), soft(V, V)


def _draw_tree(mode: str, q_root, q_next, generator) -> TokenTree:
    """Root with 3 children, each with 2 children: top-w ("top"), i.i.d. ("iid") or without replacement."""
    if mode == "top":
        first = q_root.topk(3).indices.tolist()
        paths = [[a, b] for a in first for b in q_next[a].topk(2).indices.tolist()]
        return TokenTree.from_paths(paths)
    replacement = mode == "iid"
    tokens, parents, probs = [], [], []
    for a in torch.multinomial(q_root, 3, replacement=replacement, generator=generator).tolist():
        tokens.append(a), parents.append(-1), probs.append(q_root)
    for parent in range(3):
        a = tokens[parent]
        for b in torch.multinomial(q_next[a], 2, replacement=replacement, generator=generator).tolist():
            tokens.append(b), parents.append(parent), probs.append(q_next[a])
    return TokenTree(
        tokens=torch.tensor(tokens),
        parents=torch.tensor(parents),
        draft_probs=torch.stack(probs),
        sampled_without_replacement=not replacement,
    )


def _two_tokens(mode: str, seed: int, samples: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Counts of the first two output tokens over `samples` tree rounds, their exact probabilities, and
    the accepted path lengths. Tokens the walk does not reach are drawn as the next round would: from
    the target after them."""
    p_root, p_next, q_root, q_next = _tables(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    counts = np.zeros(V * V)
    lengths = []
    for _ in range(samples):
        tree = _draw_tree(mode, q_root, q_next, generator)
        # after a first-level node `a`: p(·|a); after a second-level node the third token is not counted
        uniform = torch.full((V,), 1 / V, dtype=torch.float64)
        rows = [p_root] + [
            p_next[int(tree.tokens[node])] if int(tree.parents[node]) < 0 else uniform
            for node in range(tree.size)
        ]
        path, next_token = accept_tree_sampling(tree, torch.stack(rows), generator=generator)
        output = [int(tree.tokens[node]) for node in path] + [next_token]
        if len(output) < 2:
            output.append(int(torch.multinomial(p_next[output[0]], 1, generator=generator)))
        counts[output[0] * V + output[1]] += 1
        lengths.append(len(path))
    exact = (p_root[:, None] * p_next).reshape(-1).numpy()
    return counts, exact, lengths


@pytest.mark.parametrize("mode", ["top", "iid", "without-replacement"])
def test_tree_rule_outputs_the_target_distribution(mode):
    counts, exact, lengths = _two_tokens(mode, seed=3, samples=12000)
    assert chi_square_p_value(counts, exact) > ALPHA
    assert {0, 1, 2} <= set(lengths), "every path length must occur"


def test_tree_rule_test_has_power(monkeypatch):
    """Sabotage: keep `p` unchanged after a rejected sibling (no residual). The same test rejects it."""
    monkeypatch.setattr(acceptance, "_residual", lambda p, q: p)
    counts, exact, _ = _two_tokens("iid", seed=3, samples=12000)
    assert chi_square_p_value(counts, exact) < ALPHA


# An aligned drafter's sampled children are drawn with the target's own keyed noise (coupled acceptance,
# docs/sampling.md), so they hold the target's sample in nearly every round: no rejection to require there.
@pytest.mark.parametrize(
    ("drafter_seed", "options", "rejects"),
    [
        pytest.param(1, {"tree_shape": (2, 2)}, True, id="aligned-top"),
        pytest.param(1, {"tree_shape": (3, 2), "tree_children": "sample"}, False, id="aligned-sampled"),
        pytest.param(7, {"tree_shape": (2, 2), "tree_children": "sample"}, True, id="unrelated-sampled"),
    ],
)
def test_tree_speculative_sampling_matches_the_target(drafter_seed, options, rejects):
    """End to end through `generate`: every 3-token continuation of a Llama target, tree drafts."""
    target = hf_specssm.enable(no_eos(build("llama", seed=0, vocab=V)))
    drafter_model = no_eos(build("mamba", seed=drafter_seed, vocab=V))
    if drafter_seed == 1:
        align(target, drafter_model)
    prompt = torch.tensor([[3, 4, 3]])
    probs = exact_distribution(target, prompt)
    counts, accepted = sample_continuations(
        target, drafter_model, prompt, samples=1500, seed=11, vocab=V, drafter_options=options
    )
    assert chi_square_p_value(counts, probs) > ALPHA
    assert 2 in accepted, "tree paths were accepted in full"
    assert not rejects or 0 in accepted, "tree paths were rejected at the root"


def test_dynamic_tree_sampling_matches_the_target():
    target = hf_specssm.enable(no_eos(build("llama", seed=0, vocab=V)))
    drafter_model = no_eos(build("mamba2", seed=1, vocab=V))
    align(target, drafter_model)
    prompt = torch.tensor([[3, 4, 3]])
    probs = exact_distribution(target, prompt)
    policy = hf_specssm.DynamicTreePolicy(depth=2, top_k=2, max_nodes=4)
    counts, accepted = sample_continuations(
        target, drafter_model, prompt, samples=1500, seed=12, vocab=V, drafter_options={"tree_policy": policy}
    )
    assert chi_square_p_value(counts, probs) > ALPHA
    assert 0 in accepted and 2 in accepted


def test_redrafter_beam_trees_keep_the_distribution_when_sampling():
    """ReDrafter's beams (C = 1, M = 3: three deterministic siblings) verified by multi-draft sampling."""
    from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead

    target = hf_specssm.enable(no_eos(build("llama", seed=0, vocab=V)))
    torch.manual_seed(5)
    head = ReDrafterHead(ReDrafterConfig(hidden_size=HIDDEN, vocab_size=V, beam_width=3, beam_length=1))
    drafter = ReDrafterDrafter(head, target)
    prompt = torch.tensor([[3, 4, 3]])
    probs = exact_distribution(target, prompt)
    index = {outcome: i for i, outcome in enumerate(itertools.product(range(V), repeat=3))}
    counts = np.zeros(len(index))
    siblings_rejected = 0
    torch.manual_seed(21)
    for _ in range(1500):
        output = target.generate(
            prompt, assistant_model=drafter, max_new_tokens=3, do_sample=True, **SAMPLING
        )
        counts[index[tuple(output[0, 3:].tolist())]] += 1
        stats = target.last_speculation_stats
        siblings_rejected += sum(
            1
            for drafted, accepted in zip(stats.draft_lengths, stats.accepted_lengths)
            if drafted > 1 and not accepted
        )
    assert chi_square_p_value(counts, probs) > ALPHA
    assert siblings_rejected > 0 and drafter.last_beams is not None
