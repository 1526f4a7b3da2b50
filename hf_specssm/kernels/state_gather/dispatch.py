"""Public entry point for the batched state gather."""

from __future__ import annotations

import torch

from hf_specssm.kernels._triton import use_triton


def gather_rows(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather rows of a state tensor along the batch axis into a new, contiguous tensor.

    This is the primitive behind forking a recurrent state into `k` draft rows (`indices` repeats a row)
    and selecting the rows that survive verification. Triton on CUDA tensors, `index_select` elsewhere
    (already one memory-bound gather on CPU).

    Args:
        states: `[B, ...]` state tensor.
        indices: `[R]` long tensor of rows of `states`, repeats allowed, on `states.device`.

    Returns:
        `[R, ...]` contiguous copy; writing to it never touches `states`.
    """
    if indices.dtype != torch.long:
        raise ValueError(f"indices must be int64, got {indices.dtype}.")
    if use_triton(states):
        from hf_specssm.kernels.state_gather.triton import gather_rows_triton

        return gather_rows_triton(states, indices)
    return states.index_select(0, indices).contiguous()
