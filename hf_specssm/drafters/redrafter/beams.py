"""Beam search with carried recurrent states, and dynamic tree attention (beams → one prefix tree).

Both are pure functions of their inputs, so their behaviour is pinned by hand-computed golden tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_specssm.tree import TokenTree


@dataclass(frozen=True)
class Beams:
    """The result of a beam search.

    Attributes:
        tokens: `[M, C]` each beam's tokens, best beam first.
        scores: `[M]` each beam's summed log-probability (descending; `-inf` for beams that had no finite
            candidate left).
    """

    tokens: torch.Tensor
    scores: torch.Tensor


def beam_search(
    state: torch.Tensor,
    log_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    advance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    width: int,
    length: int,
) -> Beams:
    """Keep the `width` most probable token sequences of `length` tokens, stepping a recurrent state.

    Every beam starts from the same `state`. Beam scores start at `[0, -inf, …]`, so the first step expands
    a single beam into its `width` best tokens (no duplicate beams); each later step scores all `M × V`
    extensions by `log P(beam) + log p(token | beam)`, keeps the top `M`, and gathers the surviving beams'
    tokens and states.

    Args:
        state: `[1, *S]` recurrent state before the first drafted token.
        log_probs: `(states [M, *S], tokens so far [M, t]) → [M, V]` next-token log-probabilities.
        advance: `(states [M, *S], tokens [M]) → [M, *S]` the state after feeding one token per beam.
        width: beams kept, `M >= 1`.
        length: tokens per beam, `C >= 0`.

    Returns:
        `Beams` with `tokens` `[M, C]` and `scores` `[M]`, best first.
    """
    if width < 1 or length < 0:
        raise ValueError(f"beam search needs width >= 1 and length >= 0, got {width} and {length}.")
    states = state.expand(width, *state.shape[1:])
    scores = torch.full((width,), float("-inf"), dtype=torch.float32, device=state.device)
    scores[0] = 0.0
    tokens = torch.empty((width, 0), dtype=torch.long, device=state.device)
    for step in range(length):
        step_log_probs = log_probs(states, tokens).float()
        vocab = step_log_probs.shape[-1]
        candidates = (scores[:, None] + step_log_probs).flatten()
        scores, flat = candidates.topk(width)
        beam, token = flat // vocab, flat % vocab
        tokens = torch.cat([tokens[beam], token[:, None]], dim=1)
        # the last step's tokens are never fed: their states would not be read
        if step < length - 1:
            states = advance(states[beam], token)
    return Beams(tokens=tokens, scores=scores)


@dataclass(frozen=True)
class BeamTree:
    """Beams merged into one prefix tree (dynamic tree attention): each shared prefix is one node.

    Attributes:
        tree: the tree of unique prefixes; nodes appear in the order beams first reach them (beam 0's
            tokens first), so `parents[i] < i`.
        beam_nodes: `[M, C]` node index of each beam's token at each depth: beam `m`'s path is
            `beam_nodes[m]`.
    """

    tree: TokenTree
    beam_nodes: torch.Tensor


def beams_to_tree(beams: torch.Tensor) -> BeamTree:
    """Deduplicate beams `[M, C]` into a prefix tree: two beams share the node of depth `d` exactly when their
    first `d` tokens agree, so the target verifies each unique prefix once.

    Returns:
        `BeamTree` with `N <= M·C` nodes.
    """
    if beams.ndim != 2:
        raise ValueError(f"beams must be [M, C], got shape {tuple(beams.shape)}.")
    node_of_prefix: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    beam_nodes = torch.empty(beams.shape, dtype=torch.long)
    for beam, row in enumerate(beams.tolist()):
        parent = -1
        for depth in range(len(row)):
            prefix = tuple(row[: depth + 1])
            node = node_of_prefix.get(prefix)
            if node is None:
                node = len(tokens)
                node_of_prefix[prefix] = node
                tokens.append(row[depth])
                parents.append(parent)
            beam_nodes[beam, depth] = node
            parent = node
    tree = TokenTree(
        tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long)
    )
    return BeamTree(tree=tree, beam_nodes=beam_nodes)
