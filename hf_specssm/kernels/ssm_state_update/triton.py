"""Triton kernel for the N-step selective state update: the state tile stays in registers across the steps.

Imported only when Triton is installed. The state is updated in place, so the kernel never autotunes (an
autotuning rerun would apply the steps twice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _nstep_kernel(
    state_ptr, x_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, steps_ptr, out_ptr,
    L, H, P, N, heads_per_group,
    ss_b, ss_h, ss_p, ss_n,
    sx_b, sx_t, sx_h, sx_p,
    sdt_b, sdt_t, sdt_h, sdt_p,
    sa_h, sa_p, sa_n,
    sb_b, sb_t, sb_g, sb_n,
    sc_b, sc_t, sc_g, sc_n,
    sd_h, sd_p,
    so_b, so_t, so_h, so_p,
    HAS_C: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_STEPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    pid_p = tl.program_id(2)
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    p_in = offs_p < P
    n_in = offs_n < N
    tile = p_in[:, None] & n_in[None, :]
    state_ptrs = state_ptr + b * ss_b + h * ss_h + offs_p[:, None] * ss_p + offs_n[None, :] * ss_n
    state = tl.load(state_ptrs, mask=tile, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + h * sa_h + offs_p[:, None] * sa_p + offs_n[None, :] * sa_n, mask=tile, other=0.0).to(
        tl.float32
    )
    if HAS_D:
        d = tl.load(d_ptr + h * sd_h + offs_p * sd_p, mask=p_in, other=0.0).to(tl.float32)
    steps = L
    if HAS_STEPS:
        steps = tl.minimum(tl.load(steps_ptr + b).to(tl.int32), L)
    for t in range(0, steps):
        x = tl.load(x_ptr + b * sx_b + t * sx_t + h * sx_h + offs_p * sx_p, mask=p_in, other=0.0).to(
            tl.float32
        )
        dt = tl.load(dt_ptr + b * sdt_b + t * sdt_t + h * sdt_h + offs_p * sdt_p, mask=p_in, other=0.0).to(
            tl.float32
        )
        bv = tl.load(b_ptr + b * sb_b + t * sb_t + g * sb_g + offs_n * sb_n, mask=n_in, other=0.0).to(
            tl.float32
        )
        state = state * tl.exp(dt[:, None] * a) + (dt * x)[:, None] * bv[None, :]
        if HAS_C:
            cv = tl.load(c_ptr + b * sc_b + t * sc_t + g * sc_g + offs_n * sc_n, mask=n_in, other=0.0).to(
                tl.float32
            )
            y = tl.sum(state * cv[None, :], axis=1)
            if HAS_D:
                y += d * x
            tl.store(out_ptr + b * so_b + t * so_t + h * so_h + offs_p * so_p, y, mask=p_in)
    tl.store(state_ptrs, state.to(state_ptr.dtype.element_ty), mask=tile)


def selective_state_update_nstep_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    num_steps: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Triton version of `selective_state_update_nstep_reference` (same arguments, shapes and results).

    `state` `[Bt, H, P, N]` is updated in place; returns `[Bt, L, H, P]` float32 outputs when `C` is given.
    """
    batch, length, num_heads, head_dim = x.shape
    state_size = state.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if C is not None else None
    block_n = triton.next_power_of_2(state_size)
    block_p = max(1, min(triton.next_power_of_2(head_dim), 4096 // block_n))
    grid = (batch, num_heads, triton.cdiv(head_dim, block_p))
    dummy = x
    _nstep_kernel[grid](
        state, x, dt, A, B, C if C is not None else dummy, D if D is not None else dummy,
        num_steps if num_steps is not None else dummy, out if out is not None else dummy,
        length, num_heads, head_dim, state_size, num_heads // B.shape[2],
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(),
        *(C.stride() if C is not None else (0, 0, 0, 0)),
        *(D.stride() if D is not None else (0, 0)),
        *(out.stride() if out is not None else (0, 0, 0, 0)),
        HAS_C=C is not None, HAS_D=D is not None, HAS_STEPS=num_steps is not None,
        BLOCK_P=block_p, BLOCK_N=block_n,
    )  # fmt: skip
    return out
