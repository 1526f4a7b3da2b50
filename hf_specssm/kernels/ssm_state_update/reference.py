"""Loop-style reference for the N-step selective state update: the definition the kernel is tested against
and what the dispatcher runs where Triton does not."""

from __future__ import annotations

import torch


def selective_state_update_nstep_reference(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    num_steps: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Advance `state` in place by `L` selective-SSM steps; return each step's output when `C` is given.

    Per step `t` (skipped for rows `b` with `t >= num_steps[b]`):
    `S ← exp(Δ_t ⊙ A) ⊙ S + (Δ_t ⊙ x_t) B_tᵀ`, then `y_t = S C_t + D ⊙ x_t`.

    Args:
        state: `[Bt, H, P, N]` updated in place (float32 math, stored in its own dtype).
        x: `[Bt, L, H, P]`.
        dt: `[Bt, L, H, P]` step sizes Δ (after bias / softplus / clamp; may be a stride-0 expansion).
        A: `[H, P, N]` (may be a stride-0 expansion of per-head or per-channel rates).
        B: `[Bt, L, G, N]`, each group serving `H / G` consecutive heads.
        C: `[Bt, L, G, N]` or `None` (no outputs).
        D: `[H, P]` or `None`.
        num_steps: `[Bt]` int steps to take per row (default all `L`).

    Returns:
        `[Bt, L, H, P]` float32 outputs (zero at skipped steps), or `None` without `C`.
    """
    _, length, num_heads, _ = x.shape
    heads_per_group = num_heads // B.shape[2]
    work = state.float()
    A = A.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if C is not None else None
    for t in range(length):
        step = dt[:, t].float()  # [Bt, H, P]
        b_t = B[:, t].float().repeat_interleave(heads_per_group, dim=1)  # [Bt, H, N]
        updated = (
            torch.exp(step[..., None] * A) * work + (step * x[:, t].float())[..., None] * b_t[:, :, None]
        )
        if num_steps is not None:
            active = (num_steps.to(x.device) > t)[:, None, None, None]
            updated = torch.where(active, updated, work)
        work = updated
        if out is not None:
            c_t = C[:, t].float().repeat_interleave(heads_per_group, dim=1)
            y = torch.einsum("bhpn,bhn->bhp", work, c_t)
            if D is not None:
                y = y + D.float() * x[:, t].float()
            if num_steps is not None:
                y = y * (num_steps.to(x.device) > t)[:, None, None]
            out[:, t] = y
    state.copy_(work.to(state.dtype))
    return out
