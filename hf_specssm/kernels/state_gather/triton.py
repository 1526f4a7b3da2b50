"""Triton kernel for the batched state gather: one program per (output row, block of the row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, row_numel, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < row_numel
    source = tl.load(idx_ptr + row).to(tl.int64)
    values = tl.load(src_ptr + source * row_numel + offs, mask=inside)
    tl.store(out_ptr + row.to(tl.int64) * row_numel + offs, values, mask=inside)


def gather_rows_triton(
    states: torch.Tensor, indices: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`out[i] = states[indices[i]]` for a contiguous `states` `[B, ...]` and int64 `indices` `[R]`.

    Args:
        out: optional preallocated contiguous `[R, ...]` destination (a pool slot), written in place.

    Returns:
        `out`, or a new `[R, ...]` tensor.
    """
    states = states.contiguous()
    if out is None:
        out = states.new_empty((indices.numel(), *states.shape[1:]))
    row_numel = states[0].numel() if states.shape[0] else 0
    if indices.numel() == 0 or row_numel == 0:
        return out
    block = min(4096, triton.next_power_of_2(row_numel))
    _gather_rows_kernel[(indices.numel(), triton.cdiv(row_numel, block))](
        states, indices, out, row_numel, BLOCK=block
    )
    return out
