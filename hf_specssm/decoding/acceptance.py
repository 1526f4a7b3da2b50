"""Acceptance rules: which draft tokens the target keeps, and the token it adds.

Every rule is lossless: greedy returns exactly the target's argmax continuation; sampling returns tokens
distributed exactly as the target's own sampling (Leviathan et al. 2023, Chen et al. 2023), for chains and,
by recursive rejection over siblings (SpecInfer, Miao et al. 2024; without replacement as in Yang et al.
2024 / Sequoia), for trees.
"""

from __future__ import annotations

import torch

from hf_specssm.drafters.base import Draft
from hf_specssm.tree import TokenTree, accept_tree_greedy


def accept_proposal(
    proposal: Draft | TokenTree, scores: torch.Tensor, do_sample: bool
) -> tuple[list[int], int]:
    """The rule for one round: `(kept proposal positions, next token)`.

    Args:
        proposal: the round's chain `Draft` (`[1, k]`) or `TokenTree`.
        scores: `[1 + n, V]` processed target scores after the root and after each proposed token.
        do_sample: speculative sampling instead of greedy matching.

    Returns:
        the accepted positions (a chain's `0 … m - 1`, a tree's path from the root down) and the token the
        target adds after them.
    """
    if isinstance(proposal, TokenTree):
        if not do_sample:
            return accept_tree_greedy(proposal, scores)
        return accept_tree_sampling(proposal, torch.softmax(scores, dim=-1))
    if not do_sample:
        num_accepted, token = accept_greedy(proposal.tokens[0], scores)
    else:
        draft_probs = proposal.probs[0] if proposal.probs is not None else None
        num_accepted, token = accept_sampling(proposal.tokens[0], draft_probs, torch.softmax(scores, dim=-1))
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
    matches = (draft_tokens == choices[:k]).to(torch.long)
    num_accepted = int(matches.cumprod(dim=0).sum()) if k else 0
    return num_accepted, int(choices[num_accepted])


def accept_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling: accept draft `i` with probability `min(1, p_i / q_i)`.

    On the first rejection the next token is drawn from the residual `max(p - q, 0)` normalised; if all
    drafts pass, the next token is drawn from `p` after the last draft.

    Args:
        draft_tokens: `[k]` drafted ids.
        draft_probs: `[k, V]` the distributions the drafts were sampled from, or `None` for a deterministic
            drafter (then `q` is one-hot on the draft, which covers greedy drafters and n-gram drafts).
        target_probs: `[k + 1, V]` target probabilities after the logits processors.
        generator: optional torch RNG.

    Returns:
        `(num_accepted, next_token)`.
    """
    k = draft_tokens.shape[0]
    uniforms = torch.rand(k, generator=generator, device=target_probs.device, dtype=torch.float64)
    for i in range(k):
        token = int(draft_tokens[i])
        p_token = float(target_probs[i, token])
        q_token = float(draft_probs[i, token]) if draft_probs is not None else 1.0
        if q_token > 0.0 and float(uniforms[i]) * q_token <= p_token:
            continue
        if draft_probs is not None:
            residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
        else:
            residual = target_probs[i].clone()
            residual[token] = 0.0
        total = float(residual.sum())
        # p == q up to rounding: the residual vanishes and any draw from p is exact.
        distribution = residual / total if total > 0.0 else target_probs[i]
        return i, int(torch.multinomial(distribution, 1, generator=generator))
    return k, int(torch.multinomial(target_probs[k], 1, generator=generator))


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`norm(max(p - q, 0))`, or `p` when `p == q` up to rounding (then any draw from `p` is exact)."""
    residual = (p - q).clamp_min(0.0)
    total = float(residual.sum())
    return residual / total if total > 0.0 else p


def accept_tree_sampling(
    tree: TokenTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
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
        generator: optional torch RNG.

    Returns:
        `(path, next_token)`: accepted node indices from the root down, and the token drawn after them.
    """
    path, node = [], -1
    while True:
        p = target_probs[node + 1].to(torch.float64)
        children = tree.children(node)
        q = None
        if children and tree.draft_probs is not None:
            q = tree.draft_probs[children[0]].to(device=p.device, dtype=torch.float64)
            q = q / q.sum()
        accepted = None
        for child in children:
            token = int(tree.tokens[child])
            if q is None:
                proposal = torch.zeros_like(p)
                proposal[token] = 1.0
            else:
                proposal = q
            p_token, q_token = float(p[token]), float(proposal[token])
            uniform = float(torch.rand((), generator=generator, dtype=torch.float64))
            if q_token > 0.0 and uniform * q_token <= p_token:
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
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        node = accepted
