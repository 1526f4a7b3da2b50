"""Plain-torch definitions of the tree scans: a loop-style one (the definition) and the vectorised masked
SSD form that the dispatcher uses where Triton does not run."""

from __future__ import annotations

import torch


def _expand_groups(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[Bt, T, G, N]` → `[Bt, T, H, N]` (each group serves `H / G` consecutive heads)."""
    return tensor.repeat_interleave(num_heads // tensor.shape[2], dim=2)


def tree_scan_naive(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    parents: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba2 outputs at every node of a tree, by running the recurrence down each node's own path.

    `S_i = exp(Δ_i A) S_parent(i) + Δ_i x_i B_iᵀ`, `S_-1 = initial_state`, `y_i = S_i C_i + D x_i`.

    Args:
        x: `[Bt, T, H, P]` inputs.
        dt: `[Bt, T, H]` step sizes Δ (after bias, softplus and clamp).
        A: `[H]` negative decay rates.
        B, C: `[Bt, T, G, N]`.
        initial_state: `[Bt, H, P, N]` the committed state above the root.
        parents: `[T]` parent position of each position (`-1`: the committed state), `parents[i] < i`.
        D: `[H]` skip weights or `None`.

    Returns:
        `[Bt, T, H, P]` float32.
    """
    num_heads = x.shape[2]
    B, C = _expand_groups(B.float(), num_heads), _expand_groups(C.float(), num_heads)
    x, dt, A = x.float(), dt.float(), A.float()
    out = torch.empty_like(x)
    for node in range(x.shape[1]):
        path = []
        walker = node
        while walker >= 0:
            path.append(walker)
            walker = int(parents[walker])
        state = initial_state.float().clone()
        for step in reversed(path):
            decay = torch.exp(dt[:, step] * A)[:, :, None, None]  # [Bt, H, 1, 1]
            state = decay * state + (dt[:, step, :, None] * x[:, step])[..., None] * B[:, step, :, None, :]
        out[:, node] = torch.einsum("bhpn,bhn->bhp", state, C[:, node])
        if D is not None:
            out[:, node] += D.float()[:, None] * x[:, node]
    return out


def tree_scan_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    ancestor_mask: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same outputs as `tree_scan_naive`, as one masked single-chunk SSD computation (STree).

    With `Λ_i = Σ_{j ⪯ i} Δ_j A` (sum over the ancestors-or-self `j` of `i`):
    `y_i = exp(Λ_i) C_i·S_0 + Σ_{j ⪯ i} exp(Λ_i − Λ_j) (C_i·B_j) Δ_j x_j + D x_i`.

    Args:
        ancestor_mask: `[T, T]` or `[Bt, T, T]` bool, `mask[i, j]` when `j` is `i` or an ancestor of `i`.
        (the rest as in `tree_scan_naive`)

    Returns:
        `[Bt, T, H, P]` float32.
    """
    num_heads = x.shape[2]
    B, C = _expand_groups(B.float(), num_heads), _expand_groups(C.float(), num_heads)
    x, dt = x.float(), dt.float()
    mask = ancestor_mask if ancestor_mask.ndim == 3 else ancestor_mask[None]
    decay_log = dt * A.float()  # [Bt, T, H]
    cumulative = torch.einsum("bij,bjh->bih", mask.float(), decay_log)  # Λ [Bt, T, H]
    # exp(Λ_i − Λ_j) only where j ⪯ i (elsewhere the difference can be positive and overflow)
    segment = cumulative[:, :, None, :] - cumulative[:, None, :, :]  # [Bt, T(i), T(j), H]
    segment = segment.masked_fill(~mask[..., None], float("-inf"))
    scores = torch.einsum("bihn,bjhn->bijh", C, B) * torch.exp(segment) * dt[:, None, :, :]
    out = torch.einsum("bijh,bjhp->bihp", scores, x)
    out = out + torch.einsum("bihn,bhpn->bihp", C, initial_state.float()) * torch.exp(cumulative)[..., None]
    if D is not None:
        out = out + D.float()[:, None] * x
    return out


def tree_scan_diagonal_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    parents: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba v1 outputs at every node of a tree (diagonal `A` per channel and state dimension).

    `h_i = exp(Δ_i ⊙ A) ⊙ h_parent(i) + (Δ_i x_i) B_iᵀ`, `y_i = h_i C_i + D x_i`. The decay differs per
    `(channel, state)` pair, so the SSD factorisation `exp(Λ_i − Λ_j) (C_i·B_j)` does not apply (the decay
    cannot leave the sum over the state); instead the states of one depth level are computed together from
    their parents' states, keeping only two levels alive: `depth` batched steps, `O(T·D·N)` work.

    Args:
        x: `[Bt, T, D]` inputs; dt: `[Bt, T, D]` step sizes Δ (after bias and softplus).
        A: `[D, N]` negative decay rates; B, C: `[Bt, T, N]`.
        initial_state: `[Bt, D, N]` the committed state above the root.
        parents: `[T]` parent position of each position (`-1`: the committed state), `parents[i] < i`.
        D: `[D]` skip weights or `None`.

    Returns:
        `[Bt, T, D]` float32.
    """
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    parent_list = parents.tolist()
    depth: list[int] = []
    for parent in parent_list:
        depth.append(0 if parent < 0 else depth[parent] + 1)
    out = torch.empty_like(x)
    # states of the previous level, by position; level 0's parents are the committed state
    previous: dict[int, torch.Tensor] = {}
    level_positions: list[list[int]] = [[] for _ in range(max(depth, default=-1) + 1)]
    for position, level in enumerate(depth):
        level_positions[level].append(position)
    for positions in level_positions:
        index = torch.tensor(positions, device=x.device)
        parent_states = torch.stack(
            [initial_state.float() if parent_list[p] < 0 else previous[parent_list[p]] for p in positions],
            dim=1,
        )  # [Bt, W, D, N]
        step = dt[:, index]  # [Bt, W, D]
        states = (
            torch.exp(step[..., None] * A) * parent_states
            + (step * x[:, index])[..., None] * B[:, index, None, :]
        )
        out[:, index] = torch.einsum("bwdn,bwn->bwd", states, C[:, index])
        previous = {p: states[:, w] for w, p in enumerate(positions)}
    if D is not None:
        out = out + D.float() * x
    return out
