"""The target's logits through the logits processors, each verified position with its own prefix."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from hf_specssm.drafters.base import Draft
from hf_specssm.tree import TokenTree


def process_proposal_scores(
    logits_processor: LogitsProcessorList | None,
    input_ids: torch.Tensor,
    proposal: Draft | TokenTree,
    logits: torch.Tensor,
) -> torch.Tensor:
    """`process_tree_scores` for trees, `process_scores` for chains: `[1 + n, V]`."""
    if isinstance(proposal, TokenTree):
        return process_tree_scores(logits_processor, input_ids, proposal, logits)
    return process_scores(logits_processor, input_ids, proposal.tokens, logits)


def process_tree_scores(
    logits_processor: LogitsProcessorList | None,
    input_ids: torch.Tensor,
    tree: TokenTree,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Processed scores after the root and each node, each with its own root-to-node prefix.

    Args:
        input_ids: `[1, L]` committed tokens.
        logits: `[1, 1 + N, V]` raw target logits from `score_tree`.

    Returns:
        `[1 + N, V]`; without processors, `logits[0]` itself (no copy: a round's logits are megabytes).
    """
    if not logits_processor:
        return logits[0]
    rows = [logits_processor(input_ids, logits[:, 0].clone())]
    for node in range(tree.size):
        path_tokens = tree.tokens[tree.path(node)].to(input_ids.device)[None]
        rows.append(logits_processor(torch.cat([input_ids, path_tokens], dim=1), logits[:, node + 1].clone()))
    return torch.cat(rows, dim=0)


def process_scores(
    logits_processor: LogitsProcessorList | None,
    input_ids: torch.Tensor,
    draft_tokens: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Apply the processors at every verified position, each with its own prefix (as plain decoding would).

    Args:
        input_ids: `[1, L]` committed tokens.
        draft_tokens: `[1, k]`.
        logits: `[1, k + 1, V]` raw target logits.

    Returns:
        `[k + 1, V]` processed scores; without processors, `logits[0]` itself (no copy).
    """
    if not logits_processor:
        return logits[0]
    sequence = torch.cat([input_ids, draft_tokens], dim=1)
    length = input_ids.shape[1]
    rows = [logits_processor(sequence[:, : length + i], logits[:, i].clone()) for i in range(logits.shape[1])]
    return torch.cat(rows, dim=0)
