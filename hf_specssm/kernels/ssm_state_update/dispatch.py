"""Public entry point for the N-step selective state update."""

from __future__ import annotations

import torch

from hf_specssm.kernels._triton import use_triton
from hf_specssm.kernels.ssm_state_update.reference import selective_state_update_nstep_reference


def selective_state_update_nstep(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    num_steps: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Advance `state` in place by up to `L` selective-SSM steps (Activation Replay of accepted tokens).

    `S ← exp(Δ_t ⊙ A) ⊙ S + (Δ_t ⊙ x_t) B_tᵀ`, `y_t = S C_t + D ⊙ x_t`. Mamba2 passes its per-head `Δ`
    and `A` expanded over `P` (and `A` over `N`); Mamba v1 views its `[Bt, D, N]` state as `[Bt, 1, D, N]`.
    Triton on CUDA tensors (state kept on-chip across the steps), the loop reference elsewhere.

    Args:
        state: `[Bt, H, P, N]`, updated in place.
        x: `[Bt, L, H, P]`; dt: `[Bt, L, H, P]`; A: `[H, P, N]`.
        B: `[Bt, L, G, N]`; C: `[Bt, L, G, N]` or `None` (no outputs); D: `[H, P]` or `None`.
        num_steps: `[Bt]` steps per row (ragged rows), default all `L`.

    Returns:
        `[Bt, L, H, P]` float32 outputs when `C` is given, else `None`.
    """
    if use_triton(state):
        from hf_specssm.kernels.ssm_state_update.triton import selective_state_update_nstep_triton

        return selective_state_update_nstep_triton(state, x, dt, A, B, C, D, num_steps)
    return selective_state_update_nstep_reference(state, x, dt, A, B, C, D, num_steps)
