"""Public entry points for the tree scans."""

from __future__ import annotations

import torch

from hf_specssm.kernels._triton import use_triton

# Mamba v1's level-parallel tree scan has no Triton kernel: every device runs the torch version.
from hf_specssm.kernels.tree_scan.reference import tree_scan_diagonal, tree_scan_torch


def tree_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    ancestor_mask: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba2 (scalar decay per head) outputs at every node of a token tree, from the committed state.

    One masked single-chunk SSD computation: the ancestor mask replaces the causal mask (README.md).
    Triton on CUDA tensors (trees of up to 128 positions), plain torch elsewhere.

    Args:
        x: `[Bt, T, H, P]` inputs after the conv.
        dt: `[Bt, T, H]` step sizes Δ (after bias, softplus and clamp).
        A: `[H]` negative decay rates.
        B, C: `[Bt, T, G, N]`.
        initial_state: `[Bt, H, P, N]` committed SSM state above the root.
        ancestor_mask: `[T, T]` or `[Bt, T, T]` bool, `mask[i, j]` when `j` is `i` or one of its ancestors.
        D: `[H]` skip weights or `None`.

    Returns:
        `[Bt, T, H, P]` float32 outputs `y_i = C_i·S_i + D x_i`, `S_i` being the state after node `i`.
    """
    if use_triton(x) and x.shape[1] <= 128:
        from hf_specssm.kernels.tree_scan.triton import tree_scan_triton

        return tree_scan_triton(x, dt, A, B, C, initial_state, ancestor_mask, D)
    return tree_scan_torch(x, dt, A, B, C, initial_state, ancestor_mask, D)


__all__ = ["tree_scan", "tree_scan_diagonal"]
