"""Public entry points for the tree scans."""

from __future__ import annotations

import torch

from hf_specssm.kernels._triton import use_triton
from hf_specssm.kernels.cpu import cpu_kernels, kernel_inputs, use_cpu_kernels
from hf_specssm.kernels.tree_scan.reference import tree_scan_diagonal_torch, tree_scan_torch


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
    Triton on CUDA tensors (trees of up to 128 positions), the compiled CPU kernel on CPU tensors
    (`hf_specssm.kernels.cpu`, where it could be built), plain torch elsewhere.

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
    if use_cpu_kernels(x, dt, B, C, initial_state):
        x, dt, A, B, C, initial_state, D = kernel_inputs(x, dt, A, B, C, initial_state, D)
        return cpu_kernels().masked_chunk_scan(x, dt, A, B, C, initial_state, ancestor_mask, D)
    return tree_scan_torch(x, dt, A, B, C, initial_state, ancestor_mask, D)


def tree_scan_diagonal(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    parents: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba v1 (diagonal decay per channel and state) outputs at every node of a tree (or a chain).

    The compiled CPU kernel on CPU tensors (one pass over the nodes per channel, every node's state in a
    per-channel buffer), the level-parallel torch scan elsewhere (`reference.tree_scan_diagonal_torch`).

    Args:
        x: `[Bt, T, D]` inputs; dt: `[Bt, T, D]` step sizes Δ (after bias and softplus).
        A: `[D, N]` negative decay rates; B, C: `[Bt, T, N]`.
        initial_state: `[Bt, D, N]` the committed state above the root.
        parents: `[T]` parent position of each position (`-1`: the committed state), `parents[i] < i`.
        D: `[D]` skip weights or `None`.

    Returns:
        `[Bt, T, D]` float32.
    """
    if use_cpu_kernels(x, dt, B, C, initial_state):
        x, dt, A, B, C, initial_state, D = kernel_inputs(x, dt, A, B, C, initial_state, D)
        return cpu_kernels().tree_scan_diagonal(x, dt, A, B, C, initial_state, parents.cpu(), D)
    return tree_scan_diagonal_torch(x, dt, A, B, C, initial_state, parents, D)


__all__ = ["tree_scan", "tree_scan_diagonal"]
