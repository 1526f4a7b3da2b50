"""Acceptance rules: which draft tokens the target keeps, and the token it adds.

Every rule is lossless: greedy returns exactly the target's argmax continuation; sampling returns tokens
distributed exactly as the target's own sampling. Two sampling rules:

- `"coupled"` (default, `accept_coupled`): the target's token at position `p` is the Gumbel-max sample
  `argmax(scores_p + g_p)` with noise `g_p` keyed by the call's seed, the row and `p`
  (`PositionNoise`); drafts are kept while they equal it. The drafter draws its own tokens with the same
  `g_p`, so the two agree whenever their Gumbel-max samples do. Each committed token is a function of the
  target's scores and `g_p` alone, whatever was drafted, so the text for a seed is the same for every
  draft length, tree shape and drafter (drafter-invariant speculative sampling, Daliri, Musco and Suresh
  2024). The price: for sampled drafts, agreement is at least `(1 - TV) / (1 + TV)` instead of rejection
  sampling's `1 - TV`; for deterministic drafts (greedy drafters, top-w children, n-grams, copies, beams)
  it is the same, `p(draft)`.
- `"rejection"` (`accept_sampling`, `accept_tree_sampling`): accept draft `d` with probability
  `min(1, p(d) / q(d))`, resample from the residual (Leviathan et al. 2023, Chen et al. 2023), and by
  recursive rejection over siblings for trees (SpecInfer, Miao et al. 2024; without replacement as in
  Yang et al. 2024 / Sequoia). Its draws are keyed by position too, so a seed reproduces the text as long
  as the draft lengths and tree shapes repeat (a constant schedule, or a fixed `draft_cost_ratio`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_specssm.drafters.base import ACCEPT_STREAM, Draft, PositionNoise
from hf_specssm.tree import TokenTree, accept_tree_greedy, walk_tree

#: what `accept_proposal(rule=...)` and `SpeculativeLoop(sampling=...)` accept
SAMPLING_RULES = ("coupled", "rejection")


def accept_proposal(
    proposal: Draft | TokenTree,
    scores: torch.Tensor,
    do_sample: bool,
    noise: PositionNoise | None = None,
    position: int = 0,
    rule: str = "coupled",
) -> tuple[list[int], int]:
    """The rule for one round: `(kept proposal positions, next token)`.

    Args:
        proposal: the round's chain `Draft` (`[1, k]`) or `TokenTree`.
        scores: `[1 + n, V]` processed target scores after the root and after each proposed token.
        do_sample: speculative sampling instead of greedy matching.
        noise: the row's keyed draws (sampling); required by `"coupled"`, and `"rejection"` without it
            draws from torch's default generator.
        position: sequence position of the token after the root (the committed length).
        rule: one of `SAMPLING_RULES` (sampling only).

    Returns:
        the accepted positions (a chain's `0 … m - 1`, a tree's path from the root down) and the token the
        target adds after them.
    """
    if not do_sample:
        if isinstance(proposal, TokenTree):
            return accept_tree_greedy(proposal, scores)
        num_accepted, token = accept_greedy(proposal.tokens[0], scores)
        return list(range(num_accepted)), token
    if rule not in SAMPLING_RULES:
        raise ValueError(f"rule must be one of {SAMPLING_RULES}, got {rule!r}.")
    if rule == "coupled":
        if noise is None:
            raise ValueError("coupled acceptance needs the row's PositionNoise: pass noise=.")
        return accept_coupled(proposal, scores, noise, position)
    probs = torch.softmax(scores, dim=-1)
    if isinstance(proposal, TokenTree):
        return accept_tree_sampling(proposal, probs, noise=noise, position=position)
    draft_probs = proposal.probs[0] if proposal.probs is not None else None
    num_accepted, token = accept_sampling(
        proposal.tokens[0], draft_probs, probs, noise=noise, position=position
    )
    return list(range(num_accepted)), token


def accept_greedy(draft_tokens: torch.Tensor, target_scores: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of the draft that matches the target's argmax, plus the target's next token.

    Args:
        draft_tokens: `[k]` drafted token ids.
        target_scores: `[k + 1, V]` processed target scores; row `i` scores the token after `i` drafts.

    Returns:
        `(num_accepted, next_token)`: `num_accepted` in `0..k`, and the target's argmax after them.
    """
    k = draft_tokens.shape[0]
    choices = target_scores.argmax(dim=-1)
    matches = (draft_tokens.to(choices.device) == choices[:k]).to(torch.long)
    num_accepted = int(matches.cumprod(dim=0).sum()) if k else 0
    return num_accepted, int(choices[num_accepted])


def accept_coupled(
    proposal: Draft | TokenTree, scores: torch.Tensor, noise: PositionNoise, position: int
) -> tuple[list[int], int]:
    """Coupled speculative sampling: keep the drafts that equal the target's keyed Gumbel-max samples.

    The target's token after `i` tokens of the sequence is `argmax(scores_i + g)` with `g` the Gumbel noise
    of its position (`noise.gumbel`), an exact sample of `softmax(scores_i)` whose noise no earlier token
    depended on; so the output is distributed as the target's own sampling, and it is the same text
    whatever was drafted.

    Args:
        proposal: the round's chain `Draft` (`[1, k]`) or `TokenTree`.
        scores: `[1 + n, V]` processed target scores after the root and after each proposed token.
        noise: the row's keyed draws.
        position: sequence position of the token after the root.

    Returns:
        `(kept positions, next token)` as `accept_proposal`.
    """

    def sample(row: int, at: int) -> int:
        return int(noise.perturb(scores[row], at).argmax())

    if isinstance(proposal, TokenTree):
        depths = proposal.depths().tolist()
        return walk_tree(
            proposal, lambda node: sample(node + 1, position + (depths[node] if node >= 0 else 0))
        )
    drafts = proposal.tokens[0].tolist()
    for i, draft in enumerate(drafts):
        token = sample(i, position + i)
        if token != draft:
            return list(range(i)), token
    return list(range(len(drafts))), sample(len(drafts), position + len(drafts))


def _draws(
    generator: torch.Generator | None, noise: PositionNoise | None
) -> tuple[Callable[[int, int], float], Callable[[torch.Tensor, int], int]]:
    """`(uniform(position, index), categorical(probs, position))`: keyed by position with `noise`,
    otherwise in order from `generator` (torch's default generator when `None`)."""
    if noise is not None:
        return (lambda position, index=0: noise.uniform(position, ACCEPT_STREAM, index)), noise.categorical

    def uniform(position: int, index: int = 0) -> float:
        return float(torch.rand((), generator=generator, dtype=torch.float64))

    def categorical(probs: torch.Tensor, position: int) -> int:
        return int(torch.multinomial(probs, 1, generator=generator))

    return uniform, categorical


def accept_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: PositionNoise | None = None,
    position: int = 0,
) -> tuple[int, int]:
    """Speculative sampling: accept draft `i` with probability `min(1, p_i / q_i)`.

    On the first rejection the next token is drawn from the residual `max(p - q, 0)` normalised; if all
    drafts pass, the next token is drawn from `p` after the last draft.

    Args:
        draft_tokens: `[k]` drafted ids.
        draft_probs: `[k, V]` the distributions the drafts were sampled from, or `None` for a deterministic
            drafter (then `q` is one-hot on the draft, which covers greedy drafters and n-gram drafts).
        target_probs: `[k + 1, V]` target probabilities after the logits processors.
        generator: optional torch RNG on `target_probs`' device, drawn in order (without `noise`).
        noise: keyed draws instead: the test at position `position + i` and the residual or bonus draw
            there do not depend on how many drafts the round had.
        position: sequence position of the first draft.

    Returns:
        `(num_accepted, next_token)`.
    """
    k = draft_tokens.shape[0]
    uniform, categorical = _draws(generator, noise)
    if noise is None:
        # one batch of uniforms, in order, as the rule has always drawn them from a generator
        drawn = torch.rand(k, generator=generator, device=target_probs.device, dtype=torch.float64).tolist()
    else:
        drawn = [uniform(position + i, 0) for i in range(k)]
    for i in range(k):
        token = int(draft_tokens[i])
        p_token = float(target_probs[i, token])
        q_token = float(draft_probs[i, token]) if draft_probs is not None else 1.0
        if q_token > 0.0 and drawn[i] * q_token <= p_token:
            continue
        if draft_probs is not None:
            residual = (target_probs[i] - draft_probs[i].to(target_probs.device)).clamp_min(0.0)
        else:
            residual = target_probs[i].clone()
            residual[token] = 0.0
        total = float(residual.sum())
        # p == q up to rounding: the residual vanishes and any draw from p is exact.
        distribution = residual / total if total > 0.0 else target_probs[i]
        return i, categorical(distribution, position + i)
    return k, categorical(target_probs[k], position + k)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`norm(max(p - q, 0))`, or `p` when `p == q` up to rounding (then any draw from `p` is exact)."""
    residual = (p - q).clamp_min(0.0)
    total = float(residual.sum())
    return residual / total if total > 0.0 else p


def accept_tree_sampling(
    tree: TokenTree,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: PositionNoise | None = None,
    position: int = 0,
) -> tuple[list[int], int]:
    """Multi-draft speculative sampling down a tree: recursive rejection over each node's children.

    At a node with target distribution `p` (after its own prefix), the children are tried in index order.
    Child `x` drawn from `q` is accepted with probability `min(1, p(x) / q(x))`; the walk then continues at
    that child. On rejection `p ← norm(max(p − q, 0))` and, when siblings were drawn without replacement,
    `q ← q` with `x` removed and renormalised; the next sibling is tried. When every child was rejected
    (or there are none) the next token is drawn from `p`. Deterministic children (`tree.draft_probs is
    None`) are one-hot proposals: `x` is accepted with probability `p(x)`, and `p` loses `x` on rejection.

    Each step is a single-draft speculative sampling step against the residual of the previous one, so the
    token leaving each node is distributed exactly as `p`; by induction the whole output is distributed as
    the target's own sampling.

    Args:
        tree: the verified tree (with `draft_probs` when its nodes were sampled).
        target_probs: `[1 + N, V]` target probabilities after the root (row 0) and after each node.
        generator: optional torch RNG, drawn in order (without `noise`).
        noise: keyed draws instead: the `j`-th sibling's test at depth `d` uses `(position + d, j)`.
        position: sequence position of the root's children.

    Returns:
        `(path, next_token)`: accepted node indices from the root down, and the token drawn after them.
    """
    uniform, categorical = _draws(generator, noise)
    path, node, depth = [], -1, 0
    while True:
        p = target_probs[node + 1].to(torch.float64)
        children = tree.children(node)
        q = None
        if children and tree.draft_probs is not None:
            q = tree.draft_probs[children[0]].to(device=p.device, dtype=torch.float64)
            q = q / q.sum()
        accepted = None
        for tried, child in enumerate(children):
            token = int(tree.tokens[child])
            if q is None:
                proposal = torch.zeros_like(p)
                proposal[token] = 1.0
            else:
                proposal = q
            p_token, q_token = float(p[token]), float(proposal[token])
            if q_token > 0.0 and uniform(position + depth, tried) * q_token <= p_token:
                accepted = child
                break
            p = _residual(p, proposal)
            if q is not None and tree.sampled_without_replacement:
                q = q.clone()
                q[token] = 0.0
                total = float(q.sum())
                if total <= 0.0:
                    break
                q = q / total
        if accepted is None:
            return path, categorical(p, position + depth)
        path.append(accepted)
        node, depth = accepted, depth + 1
