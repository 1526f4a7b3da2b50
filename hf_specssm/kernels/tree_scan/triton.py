"""Triton kernel for the Mamba2 tree scan: one masked single-chunk SSD per (sequence, head, block of P).

Imported only when Triton is installed (the dispatcher imports it lazily). Runs compiled on CUDA and under
`TRITON_INTERPRET=1` on CPU (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tree_scan_kernel(
    x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, s0_ptr, mask_ptr, d_ptr, out_ptr,
    T, H, P, N, heads_per_group,
    sx_b, sx_t, sx_h, sx_p,
    sdt_b, sdt_t, sdt_h,
    sb_b, sb_t, sb_g, sb_n,
    sc_b, sc_t, sc_g, sc_n,
    ss_b, ss_h, ss_p, ss_n,
    sm_b, sm_i, sm_j,
    so_b, so_t, so_h, so_p,
    HAS_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    g = h // heads_per_group
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    t_in = offs_t < T
    p_in = offs_p < P

    dt = tl.load(dt_ptr + b * sdt_b + offs_t * sdt_t + h * sdt_h, mask=t_in, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h).to(tl.float32)
    pair_in = t_in[:, None] & t_in[None, :]
    ancestor = tl.load(
        mask_ptr + b * sm_b + offs_t[:, None] * sm_i + offs_t[None, :] * sm_j, mask=pair_in, other=0
    )
    ancestor = ancestor != 0
    # Λ_i = Σ_{j ⪯ i} Δ_j A: the tree's cumulative log-decay
    decay_log = dt * a
    cumulative = tl.sum(tl.where(ancestor, decay_log[None, :], 0.0), axis=1)

    scores = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    from_state = tl.zeros((BLOCK_T, BLOCK_P), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_in = (n0 + offs_n) < N
        c = tl.load(
            c_ptr + b * sc_b + offs_t[:, None] * sc_t + g * sc_g + (n0 + offs_n)[None, :] * sc_n,
            mask=t_in[:, None] & n_in[None, :],
            other=0.0,
        ).to(tl.float32)
        bm = tl.load(
            b_ptr + b * sb_b + offs_t[:, None] * sb_t + g * sb_g + (n0 + offs_n)[None, :] * sb_n,
            mask=t_in[:, None] & n_in[None, :],
            other=0.0,
        ).to(tl.float32)
        s0 = tl.load(
            s0_ptr + b * ss_b + h * ss_h + offs_p[:, None] * ss_p + (n0 + offs_n)[None, :] * ss_n,
            mask=p_in[:, None] & n_in[None, :],
            other=0.0,
        ).to(tl.float32)
        scores += tl.dot(c, tl.trans(bm), input_precision="ieee")
        from_state += tl.dot(c, tl.trans(s0), input_precision="ieee")

    # exp(Λ_i − Λ_j) only on the ancestor mask (elsewhere the difference may be positive)
    segment = tl.where(ancestor, cumulative[:, None] - cumulative[None, :], 0.0)
    weights = tl.where(ancestor, scores * tl.exp(segment) * dt[None, :], 0.0)
    x = tl.load(
        x_ptr + b * sx_b + offs_t[:, None] * sx_t + h * sx_h + offs_p[None, :] * sx_p,
        mask=t_in[:, None] & p_in[None, :],
        other=0.0,
    ).to(tl.float32)
    out = tl.dot(weights, x, input_precision="ieee") + from_state * tl.exp(cumulative)[:, None]
    if HAS_D:
        out += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(
        out_ptr + b * so_b + offs_t[:, None] * so_t + h * so_h + offs_p[None, :] * so_p,
        out,
        mask=t_in[:, None] & p_in[None, :],
    )


def tree_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor,
    ancestor_mask: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of `tree_scan_torch` (same arguments, shapes and float32 result `[Bt, T, H, P]`).

    The whole tree must fit one block: `T <= 128`.
    """
    batch, length, num_heads, head_dim = x.shape
    state_size = B.shape[-1]
    if length > 128:
        raise ValueError(f"the tree scan kernel takes trees of up to 128 positions, got {length}.")
    mask = (ancestor_mask if ancestor_mask.ndim == 3 else ancestor_mask[None]).to(torch.int8)
    mask_batch_stride = mask.stride(0) if mask.shape[0] > 1 else 0
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    block_t = max(16, triton.next_power_of_2(length))
    block_p = max(16, min(64, triton.next_power_of_2(head_dim)))
    block_n = max(16, min(64, triton.next_power_of_2(state_size)))
    grid = (batch * num_heads, triton.cdiv(head_dim, block_p))
    _tree_scan_kernel[grid](
        x, dt, A, B, C, initial_state, mask, D if D is not None else A, out,
        length, num_heads, head_dim, state_size, num_heads // B.shape[2],
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *initial_state.stride(),
        mask_batch_stride, mask.stride(1), mask.stride(2), *out.stride(),
        HAS_D=D is not None, BLOCK_T=block_t, BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return out
