"""Verification of Mamba2-layout and Gated DeltaNet targets without the chunk-scan padding, committed by
state updates.

*Snakes and Ladders*' Activation Replay stores what the state update needs (`x`, `Δ`, `B` and the conv
inputs) during verification, so that after acceptance the commit is a few small state updates, not another
projection pass. For the Mamba2 layout (Mamba2, Bamba, Falcon-H1, Zamba2, Nemotron-H, GraniteMoeHybrid):

- **verification** (`StateRecorder.verifying`): the `T = pending + k` tokens run through transformers' own
  multi-token forward with three changes, all undone on exit:
  1. each mixer scans one chunk of exactly `T` tokens (`_compat.mixers.chunk_size_override`) instead of
     padding to its `chunk_size` (256 in published configs): the same algorithm on no padding, computed
     in one pass over the state (`verification_scan`); its depthwise causal conv is `K` shifted products
     summed in float32 (`verification_conv`) rather than oneDNN's grouped convolution (~2× cheaper for a
     few columns on CPU);
  2. the SSM layers' cache entries are frozen (`ForkableCache.frozen`): the forward reads the conv and SSM
     state but writes neither, so nothing is copied before the round and nothing is rewound after it;
  3. a forward hook on each mixer's `in_proj` keeps the last `conv_dim + H` columns of its output — the
     conv inputs `xBC` `[1, T, conv_dim]` and raw time steps `[1, T, H]` (after Falcon-H1's `mup_vector`).
- **commit** (`StateRecorder.commit(m)`): per SSM layer, from the unchanged state `(conv₀, h₀)` and the
  first `m` recorded positions: the conv window becomes the last `K` inputs of `[conv₀, xBC₁…ₘ]`; the conv
  of those `m` positions gives `x` and `B`; `Δ = softplus(dt + dt_bias)`, `a_s = Δ_s · A`; and

      h_m = exp(Σ_s a_s) · h₀ + Σ_s exp(Σ_{r>s} a_r) · Δ_s · x_s ⊗ B_s

  — the closed form of `m` recurrent steps, which is what transformers' chunk scan computes as its final
  state. No projection runs; attention layers of hybrids are cropped by the caller.

On CPU, with `fused=True` (the `fused_verification` probe's verdict), Mamba2-layout mixers with a gated
norm the kernel knows (`fused_route`: Mamba2, Bamba, Zamba2, Nemotron-H, GraniteMoeHybrid, Falcon-H1) run the
verification between `in_proj` and `out_proj` as one compiled call instead of transformers' forward with
the overrides above (`fused_mixer`: conv, SiLU, softplus, the single-chunk scan, the gated norm; bf16
models rounded where their forward rounds) and record the same columns from their own forward (a view of
the projection, no hook), so the commit is unchanged; the model's LlamaRMSNorm-form norms run one compiled
call each meanwhile (`ssm.lean_norm`). Token trees take the same call with their conv windows and ancestor
mask (`ssm.tree_scan`).

Gated DeltaNet mixers (Qwen3-Next, Qwen3.5, OLMo-hybrid in transformers 5.23) take the same route through
their module's chunked gated delta rule (`GATED_DELTA_RULE`), which pads every multi-token forward to its
`chunk_size` (64): while verifying, the rule runs one chunk of exactly `T` tokens from the frozen state and
records what it received — keys, values, log decays `g` and step sizes `β` (`DeltaRecord`); the commit
slides the conv window over the first `m` conv inputs the frozen cache saw and runs the same rule over the
first `m` recorded positions from the held state for its final state. No projection, no mixer forward.

Whether this is exact for a mixer class is probed against one-token steps (`_compat.probes`, capability
`state_replay`); other mixers keep `ssm.mixers.MixerInputRecorder`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from hf_specssm import _compat
from hf_specssm._compat.mixers import (
    GATED_DELTA_RULE,
    Mamba2Layout,
    chunk_scan_override,
    chunk_size_override,
    gated_delta_rule,
    mamba2_layout,
    module_function_override,
    replaced_forwards,
)
from hf_specssm.cache import ForkableCache
from hf_specssm.kernels.cpu import cpu_kernels, depthwise_conv, kernel_inputs, use_cpu_kernels
from hf_specssm.ssm.lean_norm import lean_norm_modules, lean_norms

__all__ = [
    "DeltaRecord",
    "FusedRoute",
    "GatedDeltaRoute",
    "LayoutGroup",
    "StateRecorder",
    "commit_state",
    "fused_mixer",
    "fused_route",
    "fused_verification_problem",
    "group_layouts",
    "kernel_weights",
    "offloaded_mixers",
    "project",
    "state_replay_route",
    "uncovered_recurrent_layers",
]


@dataclass(frozen=True)
class GatedDeltaRoute:
    """A Gated DeltaNet mixer's route to a commit by state update: the chunked gated delta rule its
    multi-token forward calls (`_compat.mixers.gated_delta_rule`), which the commit runs on the recorded
    keys, values, gates and step sizes of the accepted positions."""

    rule: Callable


def state_replay_route(mixer: torch.nn.Module) -> Mamba2Layout | GatedDeltaRoute | None:
    """What a state-update commit reads for this mixer: its `Mamba2Layout`, its `GatedDeltaRoute`, or
    `None` when it has neither."""
    layout = mamba2_layout(mixer)
    if layout is not None:
        return layout
    rule = gated_delta_rule(mixer)
    return GatedDeltaRoute(rule) if rule is not None else None


def uncovered_recurrent_layers(model: torch.nn.Module) -> list[int]:
    """Indices of the recurrent cache layers of `model` that no SSM mixer module serves (`ssm_mixers`
    finds mixers by their `conv1d`): LFM2's short convolutions, for one. Their state cannot be replayed by
    mixer, only committed by `StateRecorder` (conv windows) or restored by checkpoints."""
    cache = ForkableCache(model.config)
    served = {mixer.layer_idx for mixer in _compat.ssm_mixers(model)}
    return [
        index
        for index, layer in enumerate(_compat.cache_layers(cache))
        if _compat.is_linear_layer(layer) and index not in served
    ]


def offloaded_mixers(model: torch.nn.Module) -> bool:
    """Whether any SSM mixer's weights are offloaded (accelerate's `device_map` with disk or CPU offload
    keeps them on the meta device between forwards): the commit reads them outside the mixer's forward,
    so such targets commit by mixer-input replay, which runs the forward."""
    return any(parameter.is_meta for mixer in _compat.ssm_mixers(model) for parameter in mixer.parameters())


# set inside `StateRecorder.verifying`: this thread's Mamba2 chunk scans are frozen verifications
#: transformers' module-level multi-token conv of Mamba2-layout mixers (5.23; absent in older modules, which
#: then keep their own conv)
_CONV_FUNCTION = "causal_conv1d_fn"
_VERIFYING: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_specssm_frozen_scan", default=False)


@functools.lru_cache(maxsize=64)
def _causal_windows(length: int, kernel: int) -> torch.Tensor:
    """`[T, K]` columns each output of a causal conv reads, oldest first, `-1` before the first (zeros)."""
    columns = torch.arange(length)[:, None] + torch.arange(kernel)[None, :] - (kernel - 1)
    return columns.clamp_min(-1)


@functools.lru_cache(maxsize=64)
def _causal_mask(length: int) -> torch.Tensor:
    """`[T, T]` lower-triangular bool mask (CPU), shared by every layer of a verification."""
    return torch.ones(length, length, dtype=torch.bool).tril()


def verification_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple = (0.0, float("inf")),
    return_final_states: bool = False,
    **kwargs,
):
    """transformers' `mamba2_chunk_scan` for a short frozen verification: the outputs of `T` tokens from
    `initial_states`, in one pass over the state, without the final state (the frozen cache discards it).

    With `cum_t = Σ_{s≤t} Δ_s A` and `x_s` the SSM input:

        y_t = exp(cum_t) · C_t · h0 + Σ_{s≤t} (C_t · B_s) · exp(cum_t − cum_s) · Δ_s · x_s + D · x_t

    Args:
        hidden_states: `[b, T, H, P]` the SSM input `x`.
        dt: `[b, T, H]` raw time steps (before `dt_bias` and softplus).
        A: `[H]`.
        B, C: `[b, T, G, N]`.
        chunk_size: ignored (one block of `T`).
        D: `[H]` skip weights, or `None`.
        dt_bias: `[H]`, or `None`.
        initial_states: `[b, H, P, N]` the state before the tokens (`None`: zeros).
        dt_softplus: apply softplus to `dt + dt_bias`.
        dt_limit: transformers' clamp of Δ; ignored (see above).
        return_final_states: also return the final state slot; it holds `initial_states` unchanged, which
            the frozen cache does not write.

    Returns:
        `[b, T, H, P]` float32 outputs (and the unchanged state with `return_final_states`).
    """
    length, heads = hidden_states.shape[1:3]
    groups = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    # `dt_limit` is not applied: these outputs must equal transformers' one-token steps, which do not clamp
    # Δ (its multi-token scan does; with Zamba2's `time_step_min` the two differ)
    dt = dt.float()  # [b, T, H]
    x = hidden_states.float()
    if use_cpu_kernels(x, dt, B, C):
        # the same sum in one compiled pass (`hf_specssm.kernels.cpu`): no [b, H, T, T] temporaries
        inputs = kernel_inputs(A, B, C, initial_states)
        y = cpu_kernels().masked_chunk_scan(x, dt, *inputs, _causal_mask(length), *kernel_inputs(D))
        return (y, initial_states) if return_final_states else y
    a = torch.cumsum(A.float() * dt, dim=1).transpose(1, 2)  # [b, H, T]: cum_t
    repeat = heads // groups
    C_h = C.float().repeat_interleave(repeat, dim=2).transpose(1, 2)  # [b, H, T, N]
    B_h = B.float().repeat_interleave(repeat, dim=2).transpose(1, 2)  # [b, H, T, N]
    x_h = x.transpose(1, 2)  # [b, H, T, P]
    # intra-block: (C_t · B_s) exp(cum_t − cum_s) Δ_s for s ≤ t
    segment = a[..., :, None] - a[..., None, :]  # [b, H, T, T]
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(segment.masked_fill(~causal, float("-inf")))
    mixing = torch.matmul(C_h, B_h.transpose(-1, -2)) * decay * dt.transpose(1, 2)[..., None, :]
    y = torch.matmul(mixing, x_h)  # [b, H, T, P]
    if initial_states is not None:
        carried = torch.matmul(C_h, initial_states.float().transpose(-1, -2))  # [b, H, T, P]
        y = y + carried * torch.exp(a)[..., None]
    y = y.transpose(1, 2)  # [b, T, H, P]
    if D is not None:
        y = y + D.float()[:, None] * x
    y = y.contiguous()  # callers (Falcon-H1) `.view()` the result
    if return_final_states:
        return y, initial_states
    return y


def verification_conv(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """transformers' `causal_conv1d_fn` (depthwise causal conv, zero history) as `K` shifted products.

    Args:
        hidden_states: `[B, C, L]` conv inputs (a verification passes the cached `K − 1` inputs first).
        weight: `[C, K]`.
        bias: `[C]` or `None`.
        activation: transformers' `ACT2FN` name, or `None`.

    Returns:
        `[B, C, L]` in `hidden_states.dtype`; sums in float32, rounded to `weight.dtype` once (float32: the
        same values as oneDNN's convolution to rounding; bf16: one rounding instead of a bf16 convolution's).
        On CPU with the compiled kernels (`hf_specssm.kernels.cpu`) the result is channels last (a
        transposed `[B, L, C]` buffer, the layout the mixer transposes it back to).
    """
    kernel, length = weight.shape[-1], hidden_states.shape[-1]
    if use_cpu_kernels(hidden_states, weight):
        # one compiled pass over channels (`hf_specssm.kernels.cpu`)
        windows = _causal_windows(length, kernel)
        return depthwise_conv(hidden_states, windows, weight, bias, activation).to(hidden_states.dtype)
    padded = F.pad(hidden_states.float(), (kernel - 1, 0))
    taps = weight.float()
    out = padded[..., :length] * taps[:, :1]
    for tap in range(1, kernel):
        out.addcmul_(padded[..., tap : tap + length], taps[:, tap : tap + 1])
    if bias is not None:
        out += bias.float()[:, None]
    out = out.to(weight.dtype)
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


def _frozen_conv(original):
    """The `causal_conv1d_fn` installed while a frozen verification runs: `verification_conv` on this
    thread's frozen verifications on CPU (transformers' torch version ignores the extra keywords too),
    transformers' everywhere else (GPUs keep cuDNN or the causal-conv1d kernel)."""

    def conv(hidden_states, weight, bias=None, activation=None, **kwargs):
        if (
            _VERIFYING.get()
            and hidden_states.device.type == "cpu"
            and hidden_states.dim() == 3
            and weight.dim() == 2
        ):
            return verification_conv(hidden_states, weight, bias, activation)
        return original(hidden_states, weight, bias, activation=activation, **kwargs)

    return conv


def _frozen_scan(original):
    """The `mamba2_chunk_scan` installed while a frozen verification runs: ours on this thread's frozen
    verifications, transformers' everywhere else."""

    def scan(*args, **kwargs):
        if _VERIFYING.get():
            return verification_scan(*args, **kwargs)
        return original(*args, **kwargs)

    return scan


@dataclass(frozen=True)
class FusedRoute:
    """What the fused verification forward of a Mamba2-layout mixer reads besides its `Mamba2Layout`:
    the multipliers around `in_proj` and the gated RMS norm between the scan and `out_proj`.

    Attributes:
        layout: the mixer's `Mamba2Layout`.
        norm_weight: `[intermediate_size]`, or `None` without a norm.
        norm_group_size: channels per normalised group.
        norm_eps: the norm's `variance_epsilon`.
        D: `[H]` skip weights.
        norm_mode: `GATE_THEN_NORM` (`MambaRMSNormGated` and its copies in Bamba, Zamba2, Nemotron-H and
            GraniteMoeHybrid; Falcon-H1 with `mamba_norm_before_gate=False`), `NORM_THEN_GATE` (Falcon-H1's
            default gated norm) or `GATE_ONLY` (Falcon-H1 without `mamba_rms_norm`: `y · silu(gate)`).
        input_scale: a multiplier of the mixer input before `in_proj` (Falcon-H1's `ssm_in_multiplier`).
        projection_scale: the tensor `in_proj`'s output is multiplied by (Falcon-H1's `mup_vector`).
    """

    layout: Mamba2Layout
    norm_weight: torch.Tensor | None
    norm_group_size: int
    norm_eps: float
    D: torch.Tensor
    norm_mode: int = 0
    input_scale: float | None = None
    projection_scale: torch.Tensor | None = None


#: `FusedRoute.norm_mode` values (the kernel's `norm_mode`)
GATE_THEN_NORM, NORM_THEN_GATE, GATE_ONLY = 0, 1, 2


def _norm_route(mixer: torch.nn.Module, width: int) -> tuple[int, torch.Tensor | None, int, float] | None:
    """`(norm_mode, weight, group size, eps)` of the mixer's gated norm, or `None` for another kind."""
    norm = getattr(mixer, "norm", None)
    if getattr(mixer, "mamba_rms_norm", True) is False:  # Falcon-H1 without a norm: the gate alone
        return GATE_ONLY, None, width, 0.0
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or weight.numel() != width or eps is None:
        return None
    if hasattr(norm, "norm_before_gate"):  # Falcon-H1's norm: `n_groups` groups, gate before or after
        groups = getattr(norm, "n_groups", None)
        if not isinstance(groups, int) or groups < 1 or width % groups:
            return None
        mode = NORM_THEN_GATE if norm.norm_before_gate else GATE_THEN_NORM
        return mode, weight, width // groups, float(eps)
    group = getattr(norm, "group_size", width)  # transformers 5.17's MambaRMSNormGated: one group
    if not isinstance(group, int) or group < 1 or width % group:
        return None
    return GATE_THEN_NORM, weight, group, float(eps)


def fused_route(mixer: torch.nn.Module) -> FusedRoute | None:
    """The `FusedRoute` of a mixer whose verification forward the compiled kernel can run in one call
    (`kernels.cpu` `mamba2_verification_mixer`), else `None`. Structure only: a Mamba2 layout, a SiLU
    conv, one of the gated norms `FusedRoute.norm_mode` names (or Falcon-H1's none), `D` per head, and
    linear `out_proj`. The `fused_verification` probe decides whether the forward is exact for the mixer's
    class."""
    layout = mamba2_layout(mixer)
    if layout is None or layout.activation not in ("silu", "swish"):
        return None
    norm = _norm_route(mixer, layout.intermediate_size)
    D = getattr(mixer, "D", None)
    if norm is None or not isinstance(D, torch.Tensor) or D.numel() != layout.num_heads:
        return None
    if not isinstance(getattr(mixer, "out_proj", None), torch.nn.Linear):
        return None
    if mixer.in_proj.out_features < layout.intermediate_size + layout.recorded_width:
        return None  # no gate columns before `xBC` and `dt`
    input_scale = getattr(mixer, "ssm_in_multiplier", None)
    projection_scale = getattr(mixer, "mup_vector", None)
    if input_scale is not None and not isinstance(input_scale, (int, float)):
        return None
    if projection_scale is not None and (
        not isinstance(projection_scale, torch.Tensor)
        or projection_scale.shape[-1] != mixer.in_proj.out_features
    ):
        return None
    mode, weight, group, eps = norm
    return FusedRoute(layout, weight, group, eps, D, mode, input_scale, projection_scale)


#: weight dtypes the fused verification forward serves (bf16 models: the kernel rounds where their forward does)
FUSED_DTYPES = (torch.float32, torch.bfloat16)


def fused_verification_problem(mixer: torch.nn.Module) -> str | None:
    """Why the fused verification forward cannot serve `mixer` here, or `None`: it needs a `FusedRoute`,
    float32 or bfloat16 weights on the CPU and the compiled CPU kernels."""
    if fused_route(mixer) is None:
        return "no fused verification forward for this mixer layout"
    weight = mixer.in_proj.weight
    if weight.device.type != "cpu" or weight.dtype not in FUSED_DTYPES:
        return (
            f"the fused verification forward runs float32 or bfloat16 weights on the CPU, not {weight.dtype} "
            f"on {weight.device.type}"
        )
    if cpu_kernels() is None:
        return "the compiled CPU kernels are unavailable"
    return None


# mixer -> (the weights' versions and storage, their float32 kernel inputs): rebuilt when the weights change
_KERNEL_WEIGHTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()


def kernel_weights(mixer: torch.nn.Module, route: FusedRoute) -> tuple[torch.Tensor, ...]:
    """`(A = -exp(A_log), conv taps [K, C], conv bias or empty, D, dt_bias, norm weight)` in float32 for
    `mamba2_verification_mixer`, kept per mixer across rounds and rebuilt when any weight changes (in-place
    updates bump their version; `.to()` replaces their storage)."""
    layout = route.layout
    weights = (layout.A_log, layout.conv_weight, layout.conv_bias, route.D, layout.dt_bias, route.norm_weight)
    key = tuple((w._version, w.data_ptr(), w.dtype) if w is not None else None for w in weights)
    kept = _KERNEL_WEIGHTS.get(mixer)
    if kept is None or kept[0] != key:
        A_log, conv_weight, conv_bias, D, dt_bias, norm_weight = (
            None if w is None else w.detach().float() for w in weights
        )
        inputs = (
            -torch.exp(A_log),
            conv_weight.t().contiguous(),
            *kernel_inputs(conv_bias, D),
            dt_bias,
            *kernel_inputs(norm_weight),
        )
        kept = _KERNEL_WEIGHTS[mixer] = (key, inputs)
    return kept[1]


def project(mixer: torch.nn.Module, route: FusedRoute, hidden_states: torch.Tensor) -> torch.Tensor:
    """`in_proj` as the mixer's forward runs it: times `route.input_scale` before, times
    `route.projection_scale` after (Falcon-H1's multipliers). The commit records these scaled columns,
    as the recording hook does when it multiplies `in_proj`'s unscaled output by the same scale."""
    if route.input_scale is not None:
        hidden_states = hidden_states * route.input_scale
    projected = mixer.in_proj(hidden_states)
    return projected if route.projection_scale is None else projected * route.projection_scale


def fused_mixer(
    mixer: torch.nn.Module,
    route: FusedRoute,
    projected: torch.Tensor,
    window: torch.Tensor,
    state: torch.Tensor,
    windows: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Mamba2-layout mixer between its projections in one compiled call (`kernels.cpu`
    `mamba2_verification_mixer`), from its frozen state; callers check `fused_verification_problem` and
    `use_cpu_kernels` first.

    Args:
        mixer, route: the mixer and its `fused_route`.
        projected: `[B, T, W]` the `in_proj` output times `route.projection_scale` (float32 or bf16, the
            model's dtype; `project` computes it).
        window: `[B, C, S ≥ K − 1]` the conv inputs before the first position (its last `K − 1` columns).
        state: `[B, H, P, N]` the SSM state before the first position.
        windows: `[T, K]` a token tree's conv columns (indices into `[K − 1 cached, T new]`), or `None`
            for a chain.
        mask: `[T, T]` bool, the tree's ancestor mask, or `None` for a chain.

    Returns:
        `(out [B, T, I] in projected's dtype — the `out_proj` input, x|B|C after the conv [B, T, C] and
        Δ [B, T, H], float32)`.
    """
    layout = route.layout
    A, taps, conv_bias, D, dt_bias, norm_weight = kernel_weights(mixer, route)
    out, convolved, dt = cpu_kernels().mamba2_verification_mixer(
        *kernel_inputs(projected, window, state),
        taps,
        conv_bias,
        dt_bias,
        A,
        D,
        norm_weight,
        layout.n_groups,
        layout.state_size,
        route.norm_group_size,
        route.norm_eps,
        route.norm_mode,
        projected.dtype == torch.bfloat16,
        *kernel_inputs(windows, mask),
    )
    return (out if out.dtype == projected.dtype else out.to(projected.dtype)), convolved, dt


def _fused_forward(
    mixer: torch.nn.Module,
    route: FusedRoute,
    original: Callable,
    cache,
    record: Callable[[torch.Tensor], None],
    recording_hook: Callable,
    unpadded: Callable[[torch.Tensor | None], bool],
) -> Callable:
    """The forward a fused mixer runs while `cache` verifies frozen: `in_proj`, `record` of the columns the
    commit needs (a view of the projection, which nothing writes), `fused_mixer` (float32; for bf16 models
    rounded where their forward rounds), then `out_proj`. Calls of this verification that it does not serve
    (padding, autograd, another dtype, a layer without a consumed token) run `original` with
    `recording_hook` on `in_proj`; calls from another context, thread or cache run `original` alone.
    `unpadded(attention_mask)` says whether a mask hides nothing (one check per mask and forward)."""
    weight = mixer.in_proj.weight

    def forward(hidden_states, cache_params=None, attention_mask=None, **kwargs):
        if not (_VERIFYING.get() and cache_params is cache):
            return original(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        states = None
        if (
            hidden_states.dim() == 3
            and hidden_states.shape[1] > 1
            and hidden_states.dtype == weight.dtype
            and hidden_states.dtype in FUSED_DTYPES
            and hidden_states.device.type == "cpu"
            and not (torch.is_grad_enabled() and (hidden_states.requires_grad or weight.requires_grad))
            and unpadded(attention_mask)
        ):
            states = _compat.frozen_states(cache.layers[mixer.layer_idx])
        if states is None:
            handle = mixer.in_proj.register_forward_hook(recording_hook)
            try:
                return original(
                    hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs
                )
            finally:
                handle.remove()
        projected = project(mixer, route, hidden_states)
        record(projected[..., -route.layout.recorded_width :])
        out, _, _ = fused_mixer(mixer, route, projected, *states)
        return mixer.out_proj(out)

    return forward


class _UnpaddedCheck:
    """`attention_mask is None or attention_mask.all()`, computed once per mask object: every layer of a
    forward receives the same mask."""

    def __init__(self) -> None:
        self._mask: torch.Tensor | None = None
        self._verdict = True

    def __call__(self, attention_mask: torch.Tensor | None) -> bool:
        if attention_mask is None:
            return True
        if attention_mask is not self._mask:
            self._mask, self._verdict = attention_mask, bool(attention_mask.all())
        return self._verdict


# set by a pre-hook while a Gated DeltaNet mixer's frozen verification runs: (the recorder's delta records,
# this mixer's slot in them)
_DELTA_SLOT: contextvars.ContextVar[tuple[list, int] | None] = contextvars.ContextVar(
    "hf_specssm_delta_slot", default=None
)


@dataclass(frozen=True)
class DeltaRecord:
    """What a Gated DeltaNet layer's commit needs from its frozen verification of `T` tokens: the inputs
    its chunked gated delta rule received (after the conv), `[b, T, …]`.

    Attributes:
        rule: transformers' chunked gated delta rule (the commit runs it from the unchanged state).
        key: `[b, T, H_k, d_k]`.
        value: `[b, T, H_v, d_v]`.
        g: `[b, T, H_v]` log decays.
        beta: `[b, T, H_v]` step sizes.
        l2norm: whether the rule L2-normalises keys (`use_qk_l2norm_in_kernel`).
    """

    rule: Callable
    key: torch.Tensor
    value: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    l2norm: bool

    @property
    def nbytes(self) -> int:
        """Bytes held by the recorded tensors."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.value, self.g, self.beta))

    def final_state(self, initial_state: torch.Tensor, length: int) -> torch.Tensor:
        """The state after the first `length ≥ 1` recorded positions from `initial_state` `[b, H_v, d_k,
        d_v]`: transformers' own chunked rule over one chunk of exactly `length` (its output is discarded;
        the keys stand in for the queries, which the state does not read)."""
        key = self.key[:, :length]
        _, state = self.rule(
            key,
            key,
            self.value[:, :length],
            g=self.g[:, :length],
            beta=self.beta[:, :length],
            chunk_size=length,
            initial_state=initial_state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=self.l2norm,
        )
        return state

    @torch.no_grad()
    def advance(self, state: torch.Tensor, length: int) -> None:
        """Bring `state` `[b, H_v, d_k, d_v]` to after the first `length ≥ 1` recorded positions, in place.

        The final state of transformers' chunked rule over one chunk of `length`, without the outputs it
        also computes (which read the state once more) and with the decay and the rank-`length` update
        written into the state instead of into new tensors; a state stored in another dtype than float32
        goes through `final_state`.
        """
        if state.dtype != torch.float32 or not state.is_contiguous():
            state.copy_(self.final_state(state, length).to(state.dtype))
            return
        key, value = self.key[:, :length], self.value[:, :length]
        value_heads = value.shape[2]
        if key.shape[2] != value_heads:  # grouped value heads: each key head serves consecutive value heads
            key = key.repeat_interleave(value_heads // key.shape[2], dim=2)
        key, value, beta, decay = (
            x.transpose(1, 2).float().contiguous()
            for x in (key, value, self.beta[:, :length], self.g[:, :length])
        )  # [b, H_v, m, …]
        if self.l2norm:
            key = key * torch.rsqrt((key * key).sum(dim=-1, keepdim=True) + 1e-6)  # as transformers' l2norm
        k_beta = key * beta[..., None]
        cumulative = decay.cumsum(dim=-1)  # [b, H_v, m]
        pairwise = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(
            torch.ones(length, length, dtype=torch.bool, device=key.device).triu(1), float("-inf")
        )
        system = (k_beta @ key.transpose(-1, -2)) * pairwise.exp()
        decayed = k_beta * cumulative.exp()[..., None]
        new_values = torch.linalg.solve_triangular(
            system, value * beta[..., None], upper=False, unitriangular=True
        )
        k_cumdecay = torch.linalg.solve_triangular(system, decayed, upper=False, unitriangular=True)
        corrections = new_values - k_cumdecay @ state  # [b, H_v, m, d_v]
        weighted = key * (cumulative[..., -1:] - cumulative).exp()[..., None]  # [b, H_v, m, d_k]
        flat = state.view(-1, *state.shape[-2:])
        flat.mul_(cumulative[..., -1].exp().reshape(-1, 1, 1))
        flat.baddbmm_(
            weighted.reshape(-1, length, key.shape[-1]).transpose(-1, -2),
            corrections.reshape(-1, length, value.shape[-1]),
        )


def _leave_delta_slot(module, args, output) -> None:
    """Forward hook of a recording Gated DeltaNet mixer: later rule calls are not its own."""
    _DELTA_SLOT.set(None)


def _frozen_delta_rule(original):
    """The chunked gated delta rule installed while a frozen verification runs: on this thread's frozen
    verifications of a recording mixer, one chunk of exactly `T` tokens from the unchanged state (no padding
    to `chunk_size`, no final state: the frozen cache discards it), its inputs recorded for the commit;
    transformers' everywhere else."""

    def rule(
        query,
        key,
        value,
        g,
        beta,
        chunk_size=64,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        **kwargs,
    ):
        slot = _DELTA_SLOT.get()
        if not _VERIFYING.get() or slot is None:
            return original(
                query,
                key,
                value,
                g=g,
                beta=beta,
                chunk_size=chunk_size,
                initial_state=initial_state,
                output_final_state=output_final_state,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                **kwargs,
            )
        records, index = slot
        records[index] = DeltaRecord(
            original, key.detach(), value.detach(), g.detach(), beta.detach(), bool(use_qk_l2norm_in_kernel)
        )
        output, _ = original(
            query,
            key,
            value,
            g=g,
            beta=beta,
            chunk_size=key.shape[1],
            initial_state=initial_state,
            output_final_state=False,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            **kwargs,
        )
        return output, initial_state

    return rule


@dataclass(frozen=True)
class LayoutGroup:
    """Mixers of one shape (every Mamba2 layer of a model, usually), whose commit runs batched over layers.

    Attributes:
        layout: the first mixer's `Mamba2Layout` (shapes, activation and Δ clamp are shared).
        indices: positions of the group's mixers in `StateRecorder.mixers`.
        conv_weight: `[G, 1, K, C]` float32, the mixers' depthwise conv weights, taps first.
        conv_bias: `[G, 1, 1, C]` float32, or `None`.
        dt_bias: `[G, 1, 1, H]`.
        A: `[G, 1, 1, H]` float32, `-exp(A_log)`.
    """

    layout: Mamba2Layout
    indices: tuple[int, ...]
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor
    A: torch.Tensor

    @classmethod
    def of(cls, layouts: Sequence[Mamba2Layout], indices: Sequence[int]) -> LayoutGroup:
        """Stack the parameters of `layouts[i]` for `i` in `indices` (all of one shape)."""
        members = [layouts[i] for i in indices]
        biases = [member.conv_bias for member in members]
        return cls(
            layout=members[0],
            indices=tuple(indices),
            conv_weight=torch.stack([m.conv_weight.detach().float().t() for m in members])[
                :, None
            ].contiguous(),
            conv_bias=None
            if biases[0] is None
            else torch.stack([b.detach().float() for b in biases])[:, None, None],
            dt_bias=torch.stack([m.dt_bias.detach() for m in members])[:, None, None],
            A=-torch.exp(torch.stack([m.A_log.detach().float() for m in members]))[:, None, None],
        )

    def sliced(self, part: slice) -> LayoutGroup:
        """The group of the layers `part` selects (views of the stacked parameters)."""
        return LayoutGroup(
            layout=self.layout,
            indices=self.indices[part],
            conv_weight=self.conv_weight[part],
            conv_bias=None if self.conv_bias is None else self.conv_bias[part],
            dt_bias=self.dt_bias[part],
            A=self.A[part],
        )


def _shape_key(layout: Mamba2Layout) -> tuple:
    return (
        layout.conv_dim,
        layout.intermediate_size,
        layout.num_heads,
        layout.head_dim,
        layout.n_groups,
        layout.state_size,
        tuple(layout.conv_weight.shape),
        layout.activation,
        layout.conv_bias is None,
        layout.conv_weight.dtype,
        layout.dt_bias.dtype,
    )


def group_layouts(layouts: Sequence[Mamba2Layout]) -> list[LayoutGroup]:
    """Partition `layouts` into groups of one shape (first appearance order)."""
    groups: dict[tuple, list[int]] = {}
    for index, layout in enumerate(layouts):
        groups.setdefault(_shape_key(layout), []).append(index)
    return [LayoutGroup.of(layouts, indices) for indices in groups.values()]


#: the most bytes a commit's largest buffer holds: layers are committed in slices of a group whose conv taps
#: (`[layers, B, K + m, C]` float32) stay under it, which bounds the workspace (Mamba2-1.3B, bf16, 8 drafts
#: keeping 4: 6.9 MiB and a commit of 6.3% of a step; all 48 layers in one slice: 27 MiB and 6.0%)
COMMIT_SLICE_BYTES = 1 << 20
#: the commit drops decays and weighted inputs smaller than this (≈ 7.9e-31) rather than let products fall
#: to denormal floats, which x86 computes in microcode, tens of times slower; a dropped term moves a state
#: entry only where the entry itself is below ~1e-23
NEGLIGIBLE_TERM = 2.0**-100


class CommitWorkspace:
    """Buffers a commit reuses from round to round, grown on demand: a round's commit needs the same few
    buffers as the last one, so they are allocated once instead of every round. Measured (Mamba2-370M and
    -1.3B, bf16, 2-core AMX VM): no faster than fresh buffers within noise, 0 page faults a commit against
    80–480 (glibc serves blocks above its mmap threshold with fresh pages)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous `shape` tensor of `dtype` on `device` (uninitialised), the same storage each time
        it fits."""
        count = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(count, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:count].view(*shape)

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold."""
        return sum(buffer.nbytes for buffer in self._buffers.values())


@torch.no_grad()
def commit_state(
    group: LayoutGroup,
    conv_states: Sequence[torch.Tensor],
    ssm_states: Sequence[torch.Tensor],
    recorded: Sequence[torch.Tensor],
    length: int,
    workspace: CommitWorkspace | None = None,
) -> None:
    """Advance the states of a group's layers over the first `length` recorded positions, in place.

    Everything but the final per-layer writes runs batched over slices of the group's `G` layers (a
    handful of tensor operations per slice instead of per layer), each slice's buffers within
    `COMMIT_SLICE_BYTES` and taken from `workspace`. Decays and weighted inputs below `NEGLIGIBLE_TERM`
    are dropped: a head whose memory fades within the accepted positions (random-weight configs with
    `dt_bias = 1`) otherwise feeds the products denormal floats (a Bamba-style hybrid's bf16 commit on a
    2-core AMX VM: 15.2 ms with them, 2.8 ms without).

    Args:
        group: the layers' `LayoutGroup`.
        conv_states: per layer, `[B, conv_dim, K]` the stored conv window (before the recorded positions);
            overwritten.
        ssm_states: per layer, `[B, H, P, N]` the SSM state (before the recorded positions); overwritten.
        recorded: per layer, `[B, T, conv_dim + H]` the recorded `in_proj` columns (`xBC`, raw `dt`),
            `T ≥ length`.
        length: positions to commit, `0 … T`.
        workspace: buffers to reuse (a `StateRecorder` keeps one across rounds); default a fresh one.
    """
    if length <= 0:
        return
    workspace = workspace if workspace is not None else CommitWorkspace()
    batch, conv_dim, window = conv_states[0].shape
    per_layer = batch * conv_dim * (window + length) * 4
    step = max(1, COMMIT_SLICE_BYTES // per_layer)
    for start in range(0, len(conv_states), step):
        part = slice(start, start + step)
        _commit_layers(
            group.sliced(part), conv_states[part], ssm_states[part], recorded[part], length, workspace
        )


def _commit_layers(
    group: LayoutGroup,
    conv_states: Sequence[torch.Tensor],
    ssm_states: Sequence[torch.Tensor],
    recorded: Sequence[torch.Tensor],
    length: int,
    workspace: CommitWorkspace,
) -> None:
    """`commit_state` of all of `group`'s layers in one batch (`length ≥ 1`), every buffer bigger than a
    few kilobytes taken from `workspace`."""
    layout = group.layout
    heads, head_dim, groups, state_size = (
        layout.num_heads,
        layout.head_dim,
        layout.n_groups,
        layout.state_size,
    )
    layers = len(conv_states)
    batch, conv_dim, window = conv_states[0].shape
    device, store = conv_states[0].device, conv_states[0].dtype

    def take(name: str, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return workspace.take(name, shape, dtype, device)

    # [G, B, K + m, C] float32, channels last: the stored windows, then the new conv inputs rounded to the
    # windows' dtype (what a step stores); the depthwise causal conv of the m new positions as K shifted
    # products along contiguous channels (faster than conv1d here), in float32 (CPU elementwise kernels on
    # bf16 are several times slower)
    inputs = take("inputs", layers, batch, window + length, conv_dim)
    windows = torch.stack(
        list(conv_states), out=take("windows", layers, batch, conv_dim, window, dtype=store)
    )
    inputs[:, :, :window].copy_(windows.transpose(-1, -2))
    first = recorded[0]
    stacked = torch.stack(  # [G, B, m, C + H]
        [values[:, :length] for values in recorded],
        out=take("recorded", layers, batch, length, first.shape[-1], dtype=first.dtype),
    )
    columns = stacked[..., :conv_dim]
    inputs[:, :, window:].copy_(columns if columns.dtype == store else columns.to(store))
    weight = group.conv_weight  # [G, 1, K, C] float32
    kernel = weight.shape[2]
    taps = inputs[:, :, -(length + kernel - 1) :]
    convolved = torch.mul(
        taps[:, :, :length], weight[:, :, :1], out=take("convolved", layers, batch, length, conv_dim)
    )
    for tap in range(1, kernel):
        convolved.addcmul_(taps[:, :, tap : tap + length], weight[:, :, tap : tap + 1])
    if group.conv_bias is not None:
        convolved.add_(group.conv_bias)
    if layout.activation in ("silu", "swish"):
        F.silu(convolved, inplace=True)
    else:
        convolved = ACT2FN[layout.activation](convolved)  # [G, B, m, C]
    x, B, _ = convolved.split([layout.intermediate_size, groups * state_size, groups * state_size], dim=-1)

    # no Δ clamp: transformers' one-token step (what plain decoding runs after the prompt) has none either
    dt = stacked[..., conv_dim:]  # [G, B, m, H]
    dt = F.softplus(dt + group.dt_bias.to(dt.dtype)).float()
    a = dt * group.A  # Δ_s · A
    total = a.sum(dim=2)  # [G, B, H]
    weights = torch.exp(total[:, :, None] - torch.cumsum(a, dim=2)) * dt  # exp(Σ_{r>s} a_r) · Δ_s
    # Σ_s weights_s · x_s ⊗ B_s as one product per (row, B/C group), the group's heads stacked:
    # [G, B·groups, (H/groups)·P, m] @ [G, B·groups, m, N] (per-head products were many tiny GEMMs)
    scaled = take("x", layers, batch, heads, head_dim, length)
    torch.mul(
        x.reshape(layers, batch, length, heads, head_dim),
        weights[..., None],
        out=scaled.permute(0, 1, 4, 2, 3),
    )
    rows = heads // groups * head_dim
    magnitude = torch.abs(scaled, out=take("magnitude", *scaled.shape))
    scaled.masked_fill_(
        torch.lt(magnitude, NEGLIGIBLE_TERM, out=take("negligible", *scaled.shape, dtype=torch.bool)), 0.0
    )
    scaled = scaled.view(layers, batch * groups, rows, length)
    grouped = take("B", layers, batch, groups, length, state_size)
    grouped.copy_(B.reshape(layers, batch, length, groups, state_size).transpose(2, 3))
    grouped = grouped.view(layers, batch * groups, length, state_size)
    decay = torch.exp(total).reshape(layers, batch, heads, 1, 1)
    decay.masked_fill_(decay < NEGLIGIBLE_TERM, 0.0)
    new_windows = windows.copy_(inputs[:, :, -window:].transpose(-1, -2))  # exact: values from `store`
    for layer in range(layers):
        conv_states[layer].copy_(new_windows[layer])
        state = ssm_states[layer]
        if state.dtype == torch.float32 and state.is_contiguous():
            state.mul_(decay[layer]).view(batch * groups, rows, state_size).baddbmm_(
                scaled[layer], grouped[layer]
            )
        else:
            work = take("state", batch, heads, head_dim, state_size)
            work.copy_(state).mul_(decay[layer])
            work.view(batch * groups, rows, state_size).baddbmm_(scaled[layer], grouped[layer])
            state.copy_(work)


class StateRecorder:
    """Records, during verification, what a commit by state update needs; commits an accepted prefix.

    Memory per round: `T × (conv_dim + H)` values per Mamba2-layout layer (the recorded `in_proj`
    columns), `T × (2·H_k·d_k + H_v·d_v + 2·H_v)` per Gated DeltaNet layer (the delta rule's keys, values,
    gates and step sizes) plus its `T` conv inputs, and no state copy.

    Args:
        model: the target, whose SSM mixers all have a `state_replay_route` (Mamba2 layout or Gated
            DeltaNet).
        cache: the `ForkableCache` the target decodes with.
        mixers: record only these of its mixers (default: all of them).
        fused: verify the mixers that `fused_verification_problem` passes through the fused forward
            (one compiled call between the projections; callers pass the `fused_verification` probe's
            verdict).
        conv_only_layers: indices of recurrent cache layers no SSM mixer serves that keep only a conv
            window (LFM2's short convolutions, `uncovered_recurrent_layers`): their commit keeps the last
            `K` conv inputs, read from the cache's `frozen_conv_inputs`.

    Attributes:
        mixers: the Mamba2-layout mixers (committed from their recorded `in_proj` columns).
        fused_mixers: those of them verified by the fused forward.
        delta_mixers: the Gated DeltaNet mixers (committed through their chunked gated delta rule).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache,
        mixers: Sequence[torch.nn.Module] | None = None,
        conv_only_layers: Sequence[int] = (),
        fused: bool = False,
    ) -> None:
        self.model = model
        self.cache = cache
        self.conv_only_layers = list(conv_only_layers)
        self.mixers: list[torch.nn.Module] = []
        self.delta_mixers: list[torch.nn.Module] = []
        self.layouts: list[Mamba2Layout] = []
        for mixer in list(mixers) if mixers is not None else _compat.ssm_mixers(model):
            route = state_replay_route(mixer)
            if route is None:
                raise ValueError(
                    f"{type(mixer).__name__} has neither a Mamba2 layout nor a gated delta rule to commit by "
                    "state update; use Activation Replay of the mixer inputs (ssm.mixers.MixerInputRecorder)."
                )
            if isinstance(route, GatedDeltaRoute):
                self.delta_mixers.append(mixer)
            else:
                self.mixers.append(mixer)
                self.layouts.append(route)
        self.groups = group_layouts(self.layouts)
        # (mixer, route) of the mixers verified by the fused forward
        self._fused = [
            (mixer, fused_route(mixer))
            for mixer in self.mixers
            if fused and fused_verification_problem(mixer) is None
        ]
        # the model's RMSNorms that run the compiled kernel while fused mixers verify (`ssm.lean_norm`)
        self.norms: list[torch.nn.Module] = lean_norm_modules(model) if self._fused else []
        self._records: list[torch.Tensor | None] = [None] * len(self.mixers)
        self._workspace = CommitWorkspace()
        self._delta_records: list[DeltaRecord | None] = [None] * len(self.delta_mixers)

    @property
    def fused_mixers(self) -> list[torch.nn.Module]:
        """The mixers verified by the fused forward (`fused=True` and `fused_verification_problem` clear)."""
        return [mixer for mixer, _ in self._fused]

    @property
    def fused_routes(self) -> dict[torch.nn.Module, FusedRoute]:
        """`fused_mixers` with their routes, for tree verifications (`ssm.tree_scan.tree_verification`)."""
        return dict(self._fused)

    @property
    def recorded_bytes(self) -> int:
        """Bytes held by the recorded columns, the delta-rule inputs and the commit's reused buffers."""
        # fused mixers record views of their projection: count what each record holds
        columns = sum(r.untyped_storage().nbytes() for r in self._records if r is not None)
        delta = sum(r.nbytes for r in self._delta_records if r is not None)
        return columns + delta + self._workspace.nbytes

    @contextlib.contextmanager
    def verifying(self, num_tokens: int) -> Iterator[None]:
        """Forwards of `num_tokens ≥ 2` tokens inside this context scan one chunk of exactly that many
        tokens, leave every SSM layer's state as it was, and record what `commit` needs."""
        if num_tokens < 2:
            raise ValueError(
                f"a frozen verification needs a multi-token forward, got {num_tokens} token(s): "
                "one-token steps update the state in place."
            )
        self._records = [None] * len(self.mixers)
        self._delta_records = [None] * len(self.delta_mixers)
        # fused mixers record from their own forward (below); the others through a hook on `in_proj`
        fused = {mixer: route for mixer, route in self._fused} if cpu_kernels() is not None else {}
        handles = [
            mixer.in_proj.register_forward_hook(self._recorder(index, layout))
            for index, (mixer, layout) in enumerate(zip(self.mixers, self.layouts, strict=True))
            if mixer not in fused
        ]
        unpadded = _UnpaddedCheck()
        fused_forwards = {
            mixer: _fused_forward(
                mixer,
                route,
                mixer.forward,
                self.cache,
                functools.partial(self._store, index),
                self._recorder(index, self.layouts[index]),
                unpadded,
            )
            for index, mixer in enumerate(self.mixers)
            if (route := fused.get(mixer)) is not None
        }
        for index, mixer in enumerate(self.delta_mixers):
            handles.append(mixer.register_forward_pre_hook(self._delta_slot(index)))
            handles.append(mixer.register_forward_hook(_leave_delta_slot))
        chunked = [mixer for mixer in self.mixers if mixer.chunk_size > num_tokens]
        slot = _DELTA_SLOT.set(None)
        try:
            frozen = [mixer.layer_idx for mixer in self.mixers + self.delta_mixers] + self.conv_only_layers
            token = _VERIFYING.set(True)
            try:
                with (
                    chunk_size_override(chunked, num_tokens),
                    chunk_scan_override(self.mixers, _frozen_scan),
                    module_function_override(self.delta_mixers, GATED_DELTA_RULE, _frozen_delta_rule),
                    module_function_override(self.mixers + self.delta_mixers, _CONV_FUNCTION, _frozen_conv),
                    self.cache.frozen(frozen),
                    lean_norms(self.norms),
                    replaced_forwards(fused_forwards),
                ):
                    yield
            finally:
                _VERIFYING.reset(token)
        finally:
            _DELTA_SLOT.reset(slot)
            for handle in handles:
                handle.remove()

    def _store(self, index: int, columns: torch.Tensor) -> None:
        self._records[index] = columns

    def _delta_slot(self, index: int):
        def enter(module, args):
            _DELTA_SLOT.set((self._delta_records, index))

        return enter

    def _recorder(self, index: int, layout: Mamba2Layout):
        def record(module, args, output):
            columns = output[..., -layout.recorded_width :]
            if layout.projection_scale is not None:
                columns = columns * layout.projection_scale
            self._records[index] = columns.detach().clone()

        return record

    def commit(self, length: int) -> None:
        """Advance every SSM layer over the first `length` recorded positions (the accepted prefix)."""
        for index, recorded in enumerate(self._records):
            if recorded is None:
                raise RuntimeError(f"no verification was recorded for layer {self.mixers[index].layer_idx}.")
        for index, record in enumerate(self._delta_records):
            if record is None:
                raise RuntimeError(
                    f"no verification was recorded for layer {self.delta_mixers[index].layer_idx}."
                )
        for mixer, record in zip(self.delta_mixers, self._delta_records, strict=True):
            self._commit_conv_window(mixer.layer_idx, length)
            state = _compat.recurrent_state(self.cache.layers[mixer.layer_idx])
            if length > 0:
                record.advance(state, length)
        for group in self.groups:
            layers = [self.cache.layers[self.mixers[index].layer_idx] for index in group.indices]
            commit_state(
                group,
                [_compat.stored_conv_state(layer) for layer in layers],
                [_compat.recurrent_state(layer) for layer in layers],
                [self._records[index] for index in group.indices],
                length,
                self._workspace,
            )
        for index in self.conv_only_layers:
            if _compat.recurrent_state(self.cache.layers[index]) is not None:
                raise ValueError(
                    f"cache layer {index} keeps a recurrent state no SSM mixer of "
                    f"{type(self.model).__name__} serves; hf_specssm cannot bring it to the accepted prefix."
                )
            self._commit_conv_window(index, length)

    def _commit_conv_window(self, index: int, length: int) -> None:
        """Slide cache layer `index`'s conv window over the first `length` conv inputs its frozen
        verification passed through the cache (`frozen_conv_inputs`)."""
        stored = _compat.stored_conv_state(self.cache.layers[index])
        inputs = self.cache.frozen_conv_inputs.get(index)
        if stored is None and inputs is None:
            return  # a layer the cache types as recurrent that keeps nothing (5.17's Nemotron-H MLPs)
        if stored is None or inputs is None:
            raise RuntimeError(f"no verification was recorded for conv layer {index}.")
        window = torch.cat([stored, inputs[..., :length].to(stored.dtype)], dim=-1)
        stored.copy_(window[..., -stored.shape[-1] :])

    def clear(self) -> None:
        """Drop the recorded columns and delta-rule inputs."""
        self._records = [None] * len(self.mixers)
        self._delta_records = [None] * len(self.delta_mixers)
