"""Acceptance rules: which draft tokens the target keeps, and the token it adds.

Both rules are lossless: greedy returns exactly the target's argmax continuation; sampling returns tokens
distributed exactly as the target's own sampling (Leviathan et al. 2023, Chen et al. 2023).
"""

from __future__ import annotations

import torch


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
