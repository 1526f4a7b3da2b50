"""Public entry point for the batched state gather."""

from __future__ import annotations

import torch


def gather_rows(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather rows of a state tensor along the batch axis into a new, contiguous tensor.

    This is the primitive behind forking a recurrent state into `k` draft rows (`indices` repeats a row)
    and selecting the rows that survive verification.

    Args:
        states: `[B, ...]` state tensor.
        indices: `[R]` long tensor of rows of `states`, repeats allowed, on `states.device`.

    Returns:
        `[R, ...]` contiguous copy; writing to it never touches `states`.
    """
    if indices.dtype != torch.long:
        raise ValueError(f"indices must be int64, got {indices.dtype}.")
    # index_select on a contiguous source is one memory-bound gather on every backend; a fused Triton
    # version that also writes into preallocated pool slots is planned with the tree-scan kernels.
    return states.index_select(0, indices).contiguous()
