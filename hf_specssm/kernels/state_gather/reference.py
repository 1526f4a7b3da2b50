"""Loop-style reference for `gather_rows`: the definition the fast paths are tested against."""

from __future__ import annotations

import torch


def gather_rows_reference(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return a new tensor whose row `i` is a copy of `states[indices[i]]`.

    Args:
        states: `[B, ...]` any state tensor (conv `[B, C, K]`, SSM `[B, H, P, N]`, keys `[B, H, S, D]`).
        indices: `[R]` long row indices into `states`, repeats allowed.

    Returns:
        `[R, ...]` tensor on `states.device` with `states.dtype`.
    """
    out = states.new_empty((indices.numel(), *states.shape[1:]))
    for row, source in enumerate(indices.tolist()):
        out[row].copy_(states[source])
    return out
