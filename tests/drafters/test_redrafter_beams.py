"""ReDrafter's beam search and dynamic tree attention (beams → prefix tree), against hand-computed goldens."""

from __future__ import annotations

import math

import pytest
import torch

from hf_specssm.drafters.redrafter import beam_search, beams_to_tree

# A bigram "head" over 4 tokens: the state is the last token, p(next | last) is a row of this table.
BIGRAM = torch.tensor(
    [
        [0.08, 0.50, 0.30, 0.12],
        [0.10, 0.20, 0.30, 0.40],
        [0.05, 0.05, 0.20, 0.70],
        [0.60, 0.20, 0.10, 0.10],
    ]
).log()


def bigram_search(width: int, length: int, first: int = 0):
    calls = {"advance": 0, "prefixes": []}

    def log_probs(states, prefixes):
        calls["prefixes"].append(prefixes.clone())
        return BIGRAM[states]

    def advance(states, tokens):
        calls["advance"] += 1
        return tokens

    return beam_search(torch.tensor([first]), log_probs, advance, width, length), calls


def test_beam_search_golden():
    # by hand: step 1 keeps 1 (.5), 2 (.3), 3 (.12); step 2 keeps 2→3 (.21), 1→3 (.20), 1→2 (.15);
    # step 3 keeps 2→3→0 (.126), 1→3→0 (.120), 1→2→3 (.105)
    beams, calls = bigram_search(width=3, length=3)
    assert beams.tokens.tolist() == [[2, 3, 0], [1, 3, 0], [1, 2, 3]]
    torch.testing.assert_close(beams.scores, torch.tensor([0.126, 0.120, 0.105]).log())
    # the last step's tokens are never fed; each step sees every beam's tokens so far
    assert calls["advance"] == 2
    assert [p.tolist() for p in calls["prefixes"]] == [
        [[], [], []],
        [[1], [2], [3]],
        [[2, 3], [1, 3], [1, 2]],
    ]


def test_beam_search_beats_greedy_here():
    greedy, _ = bigram_search(width=1, length=3)
    assert greedy.tokens.tolist() == [[1, 3, 0]]
    assert math.isclose(float(greedy.scores.exp()), 0.12, rel_tol=1e-5)
    beams, _ = bigram_search(width=3, length=3)
    assert float(beams.scores[0].exp()) > float(greedy.scores[0].exp())


def test_first_step_expands_a_single_beam():
    # all beams start from one state: without the [0, -inf, ...] start, every beam would pick token 1
    beams, _ = bigram_search(width=3, length=1)
    assert beams.tokens.tolist() == [[1], [2], [3]]


def test_beam_search_rejects_bad_shapes():
    with pytest.raises(ValueError, match="width >= 1"):
        bigram_search(width=0, length=2)


@pytest.mark.parametrize(
    ("beams", "tokens", "parents", "beam_nodes"),
    [
        pytest.param(
            [[2, 3, 0], [1, 3, 0], [1, 2, 3]],
            [2, 3, 0, 1, 3, 0, 2, 3],
            [-1, 0, 1, -1, 3, 4, 3, 6],
            [[0, 1, 2], [3, 4, 5], [3, 6, 7]],
            id="beam-search-golden",
        ),
        pytest.param(
            [[1, 2, 3], [1, 2, 4], [1, 5, 3], [6, 2, 3]],
            [1, 2, 3, 4, 5, 3, 6, 2, 3],
            [-1, 0, 1, 1, 0, 4, -1, 6, 7],
            [[0, 1, 2], [0, 1, 3], [0, 4, 5], [6, 7, 8]],
            id="shared-prefixes-same-token-under-other-parents",
        ),
        pytest.param(
            [[7, 7], [7, 7], [7, 7]],
            [7, 7],
            [-1, 0],
            [[0, 1], [0, 1], [0, 1]],
            id="identical-beams-one-chain",
        ),
        pytest.param(
            [[4, 5], [6, 5]],
            [4, 5, 6, 5],
            [-1, 0, -1, 2],
            [[0, 1], [2, 3]],
            id="disjoint-beams",
        ),
        pytest.param([[3], [1], [3]], [3, 1], [-1, -1], [[0], [1], [0]], id="length-one"),
    ],
)
def test_beams_to_tree_golden(beams, tokens, parents, beam_nodes):
    merged = beams_to_tree(torch.tensor(beams))
    assert merged.tree.tokens.tolist() == tokens
    assert merged.tree.parents.tolist() == parents
    assert merged.beam_nodes.tolist() == beam_nodes


def test_beams_to_tree_paths_spell_the_beams():
    generator = torch.Generator().manual_seed(0)
    beams = torch.randint(0, 3, (12, 4), generator=generator)
    merged = beams_to_tree(beams)
    unique_prefixes = {tuple(row[: depth + 1]) for row in beams.tolist() for depth in range(4)}
    assert merged.tree.size == len(unique_prefixes) < beams.numel()
    for beam, nodes in zip(beams, merged.beam_nodes):
        assert merged.tree.path(int(nodes[-1])) == nodes.tolist()
        assert merged.tree.tokens[nodes].tolist() == beam.tolist()
