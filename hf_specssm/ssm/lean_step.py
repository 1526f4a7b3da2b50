"""Lean one-token steps for Mamba2-layout mixers: the same step without transformers' broadcast copies.

On a one-token step with a cache, every Mamba2-layout mixer (Mamba2, Bamba, Falcon-H1, Zamba2, Nemotron-H,
GraniteMoeHybrid; transformers 5.17 and 5.23 alike) calls two module-level functions when mamba-ssm and
causal-conv1d are absent (always on CPU):

- `causal_conv1d_update(x [B, C, 1], conv_state [B, C, K], weight [C, K], bias, activation)`: a
  concatenation and a grouped `F.conv1d` (oneDNN's convolution: ~0.2 ms per layer on CPU for one column);
- `mamba2_selective_state_update(state [B, H, P, N], x [B, H, P], dt, A, B, C, D, …)`, called with `dt`,
  `A`, `D` and `dt_bias` broadcast to `[H, P]` / `[H, P, N]`; it computes `exp(Δ · A)` over all
  `B · H · P · N` entries (one value per head repeated `P · N` times) and materialises `B` and `C` per head.

Inside `lean_steps(model)` (and always inside the forwards of `ModelDrafter`) the model's mixer modules
call leaner versions of both: the conv is `K` products and a sum over the window (in float32), the state
update computes `exp(Δ · A)` once per head and updates the state in place. The state update does the same
elementwise operations on the same values as transformers' (its state, output and the model's logits agree
to float32 rounding; tested per family in `tests/targets/test_lean_step.py`); the conv sums in another order
(float32: ~1e-7 relative; bf16 models: the conv now accumulates in float32, closer to the float64 value
than transformers' bf16 conv).

Calls the lean versions do not cover fall back to transformers' functions: multi-token conv updates,
state updates whose `dt` / `A` / `D` are not broadcast along `P` (some other mixer's layout), mixers whose
fused CUDA kernels are active (`_compat.fused_kernels_active`), and every call from another thread or
context that did not open `lean_steps` (the routing is a `ContextVar`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from hf_specssm import _compat
from hf_specssm._compat.mixers import mamba2_layout, module_function_override

__all__ = ["lean_conv1d_update", "lean_selective_state_update", "lean_step_mixers", "lean_steps"]

_STATE_UPDATE = "mamba2_selective_state_update"
_CONV_UPDATE = "causal_conv1d_update"

# set inside `lean_steps`: this context's one-token mixer steps take the lean functions
_LEAN: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_specssm_lean_steps", default=False)


def lean_selective_state_update(
    state: torch.Tensor,
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    z: torch.Tensor | None = None,
) -> torch.Tensor:
    """One SSM step, in place on `state`: transformers' `mamba2_selective_state_update` computed per head.

    Args:
        state: `[B, H, P, N]` the SSM state; overwritten with the next one.
        hidden_states: `[B, H, P]` the SSM input `x`.
        dt: `[B, H, P]` raw time steps, equal along `P` (transformers broadcasts `[B, H]`).
        A: `[H, P, N]`, equal along `P` and `N`.
        B, C: `[B, G, N]` for `G` groups (`H` divisible by `G`).
        D: `[H, P]` skip weights equal along `P`, or `None`.
        dt_bias: `[H, P]` equal along `P`, or `None`.
        dt_softplus: apply softplus to `dt + dt_bias`.
        z: `[B, H, P]` gate (`y · silu(z)`), or `None`.

    Returns:
        `[B, H, P]` in `hidden_states.dtype`: `C · h + D · x` (gated by `z`).
    """
    batch, heads, head_dim = hidden_states.shape
    groups, state_size = B.shape[1], B.shape[-1]
    dt = dt[..., 0]  # [B, H]
    if dt_bias is not None:
        dt = dt + dt_bias[:, 0].to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt.float() * A[:, 0, 0].float())[..., None, None]  # [B, H, 1, 1]
    per_head = heads // groups
    B = B.reshape(batch, groups, 1, state_size).expand(-1, -1, per_head, -1).reshape(batch, heads, state_size)
    update = (dt[..., None] * B)[:, :, None, :] * hidden_states[..., None]  # [B, H, P, N]: Δ · B ⊗ x
    if state.dtype == torch.float32 and update.dtype == torch.float32:
        new_state = state.mul_(decay).add_(update)
    else:
        new_state = state * decay + update  # float32, as transformers' (its output reads it before rounding)
        state.copy_(new_state.to(state.dtype))
    C = (
        C.reshape(batch, groups, 1, state_size)
        .expand(-1, -1, per_head, -1)
        .reshape(batch * heads, state_size, 1)
    )
    out = torch.bmm(new_state.to(C.dtype).view(batch * heads, head_dim, state_size), C)
    out = out.view(batch, heads, head_dim)
    if D is not None:
        out = (out + hidden_states * D).to(out.dtype)
    if z is not None:
        out = out * F.silu(z)
    return out.to(hidden_states.dtype)


def lean_conv1d_update(
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """One step of the depthwise causal conv, in place on `conv_state`: transformers' `causal_conv1d_update`
    for one new column.

    Args:
        hidden_states: `[B, C, 1]` the new conv input.
        conv_state: `[B, C, S]` the last `S ≥ K` inputs; shifted left by one, the new input written last.
        weight: `[C, K]`.
        bias: `[C]` or `None`.
        activation: transformers' `ACT2FN` name, or `None`.

    Returns:
        `[B, C, 1]` in `hidden_states.dtype`.
    """
    kernel = weight.shape[-1]
    window = torch.cat([conv_state[..., 1:], hidden_states.to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    out = (window[..., -kernel:].float() * weight.float()).sum(dim=-1, keepdim=True)
    if bias is not None:
        out = out + bias.float()[:, None]
    out = out.to(weight.dtype)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def _broadcast_along(tensor: torch.Tensor | None, dims: tuple[int, ...]) -> bool:
    """Whether `tensor` is `None` or repeats its values along `dims` (stride 0, or size 1)."""
    return tensor is None or all(tensor.stride(d) == 0 or tensor.shape[d] == 1 for d in dims)


def _route_state_update(original: Callable) -> Callable:
    def state_update(
        state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, z=None, **kwargs
    ):
        if (
            _LEAN.get()  # transformers' torch version ignores `kwargs` (position ids and the like) too
            and hidden_states.dim() == 3
            and _broadcast_along(dt, (-1,))
            and _broadcast_along(A, (-1, -2))
            and _broadcast_along(D, (-1,))
            and _broadcast_along(dt_bias, (-1,))
            and A.dim() == 3
            and B.dim() == 3
            and state.dim() == 4
        ):
            return lean_selective_state_update(state, hidden_states, dt, A, B, C, D, dt_bias, dt_softplus, z)
        return original(
            state, hidden_states, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=dt_softplus, z=z, **kwargs
        )

    return state_update


def _route_conv_update(original: Callable) -> Callable:
    def conv_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
        if (
            _LEAN.get()
            and not kwargs
            and hidden_states.dim() == 3
            and hidden_states.shape[-1] == 1
            and weight.dim() == 2
            and conv_state.shape[-1] >= weight.shape[-1]
        ):
            return lean_conv1d_update(hidden_states, conv_state, weight, bias, activation)
        return original(hidden_states, conv_state, weight, bias, activation, **kwargs)

    return conv_update


def lean_step_mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The SSM mixers of `model` whose one-token steps `lean_steps` serves: Mamba2-layout mixers without
    active fused CUDA kernels."""
    return [
        mixer
        for mixer in _compat.ssm_mixers(model)
        if mamba2_layout(mixer) is not None and not _compat.fused_kernels_active(mixer)
    ]


@contextlib.contextmanager
def lean_steps(model: torch.nn.Module, mixers: Sequence[torch.nn.Module] | None = None) -> Iterator[None]:
    """Inside this context (this thread or task only), one-token steps of `model`'s Mamba2-layout mixers
    run the lean conv and state update (module docstring). Multi-token forwards are unchanged; models
    without such mixers run as before. Usable around plain `generate` as well.

    Args:
        model: any transformers model.
        mixers: `lean_step_mixers(model)`, when the caller keeps them (finding them walks the modules).

    Example:
        >>> with hf_specssm.lean_steps(model):
        ...     out = model.generate(input_ids, max_new_tokens=64)
    """
    mixers = lean_step_mixers(model) if mixers is None else list(mixers)
    if not mixers:
        yield
        return
    token = _LEAN.set(True)
    try:
        with (
            module_function_override(mixers, _STATE_UPDATE, _route_state_update),
            module_function_override(mixers, _CONV_UPDATE, _route_conv_update),
        ):
            yield
    finally:
        _LEAN.reset(token)
