"""Every patch of transformers' SSM mixers, each scoped to a context manager and undone on exit.

Three patches, for three reasons:

1. **Carried initial state** (`continuation(mixers, "patched")`). transformers' Mamba v1 scan
   (`mamba_selective_scan` in the Mamba, FalconMamba and Jamba modules) always starts from a zero state,
   so a multi-token forward from a cached state is wrong (notes: transformers-5-internals.md §3). The scan
   is linear in its initial state `h0`:

       h_t = (Π_{s≤t} exp(Δ_s A)) h0 + h_t^{zero},   y_t = y_t^{zero} + C_t · (Π_{s≤t} exp(Δ_s A)) h0 · silu(z_t)

   so a wrapper around the module's scan adds the carried term. The wrapper replaces the module global
   only while at least one context needs it (a counter makes nested and concurrent contexts safe) and
   acts only while a mixer's forward pre-hook has published that layer's state. Whether it is needed at
   all is decided by the continuation probe (`admission`), not here: if transformers starts carrying the
   state itself, the probe finds the native forward exact and the wrapper is never installed (it would
   add the state twice).
2. **Identity steps** (`identity_steps_patch`): positions whose SSM step must leave the state unchanged
   (Δ = 0), for Joint Attainment and Advancement. Mamba v1 mixers through the same scan wrapper; Mamba2
   mixers by swapping their Δ clamp (`time_step_limit`) for per-position bounds.
3. **Replaced forwards** (`replaced_forwards`): a mixer's `forward` swapped on the instance (tree scan,
   one-token stepping when no multi-token continuation is exact), the previous one put back on exit.
4. **Frozen verification of the Mamba2 layout** (`ssm.state_replay`): `chunk_scan_override` replaces the
   module-level `mamba2_chunk_scan` while a verification runs (the installed wrapper defers to the original
   for every call that is not a frozen verification of this thread), `chunk_size_override` sets a mixer's
   `chunk_size` to the verified length, and `mamba2_layout` reads what a commit by state update needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import importlib.util
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from hf_specssm._compat.overrides import function_override, original_function
from hf_specssm._compat.recurrent import recurrent_state

# transformers modules whose mixers use the zero-initialised Mamba v1 scan
ZERO_STATE_SCAN_MODULES = (
    "transformers.models.mamba.modeling_mamba",
    "transformers.models.falcon_mamba.modeling_falcon_mamba",
    "transformers.models.jamba.modeling_jamba",
)
_SCAN_NAME = "mamba_selective_scan"
# modes of `continuation`, from best to worst
CONTINUATION_MODES = ("native", "patched", "none")

_INITIAL_STATE: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "hf_specssm_h0", default=None
)
# `[B, T]` bool: positions whose SSM step must leave the state unchanged (Δ = 0), see `identity_steps_patch`
_IDENTITY_STEPS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "hf_specssm_identity_steps", default=None
)

_scan_lock = threading.Lock()
_scan_depth = 0
# module -> (original scan, installed wrapper), while `_scan_depth > 0`
_scan_installed: dict[object, tuple[Callable, Callable]] = {}
_MISSING = object()


# model -> [contexts open, the mixers found when the outermost opened], see `fixed_mixers`
_fixed: weakref.WeakKeyDictionary[torch.nn.Module, list] = weakref.WeakKeyDictionary()


def ssm_mixers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The SSM mixer modules of `model`, in layer order: modules with a `layer_idx` and a `conv1d`.

    These are candidates; whether a family is served exactly is decided by `probes.mixer_support`. Inside
    `fixed_mixers(model)` the list found when that context opened is returned without walking the modules.
    """
    entry = _fixed.get(model)
    if entry is not None:
        return list(entry[1])
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
        and isinstance(getattr(module, "conv1d", None), torch.nn.Conv1d)
    ]


@contextlib.contextmanager
def fixed_mixers(model: torch.nn.Module) -> Iterator[None]:
    """While open, `ssm_mixers(model)` answers from one walk over the modules made when the outermost such
    context opened: for spans in which `model`'s module tree does not change (one `generate` call), where
    every round would otherwise walk a thousand modules several times (~1.5% of a Mamba2-370M step)."""
    entry = _fixed.get(model)
    if entry is None:
        entry = _fixed[model] = [0, ssm_mixers(model)]
    entry[0] += 1
    try:
        yield
    finally:
        entry[0] -= 1
        if entry[0] == 0:
            del _fixed[model]


def slice_tokens(value, total: int, start: int, length: int):
    """Slice the token axis (dim 1) of per-token tensors (`[B, total, …]`); leave everything else alone."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[1] == total:
        return value[:, start : start + length]
    return value


def _mixer_module(mixer: torch.nn.Module):
    return sys.modules.get(type(mixer).__module__)


def has_patchable_scan(mixer: torch.nn.Module) -> bool:
    """Whether the mixer's module scans with the Mamba v1 `mamba_selective_scan` that `scan_patch` wraps."""
    module = _mixer_module(mixer)
    return type(mixer).__module__ in ZERO_STATE_SCAN_MODULES and callable(getattr(module, _SCAN_NAME, None))


def has_time_step_clamp(mixer: torch.nn.Module) -> bool:
    """Whether the mixer clamps Δ with a `time_step_limit` and adds a `dt_bias` (the Mamba2 layout)."""
    return hasattr(mixer, "time_step_limit") and hasattr(mixer, "dt_bias")


def time_step_bounds(mixer: torch.nn.Module) -> tuple:
    """The mixer's `(low, high)` clamp of Δ after softplus; `(0, inf)` when it has none."""
    return getattr(mixer, "time_step_limit", None) or (0.0, float("inf"))


def _resolved_to_outside_kernel(function: object) -> bool | None:
    """For a function decorated with transformers' `use_kernel_func_from_hub_with_fallback` (5.23), whether
    the decoration found an outside implementation (mamba-ssm, causal-conv1d); `None` for other objects."""
    for _ in range(4):
        code = getattr(function, "__code__", None)
        closure = getattr(function, "__closure__", None)
        if code is not None and closure and "is_new_implementation" in code.co_freevars:
            return bool(closure[code.co_freevars.index("is_new_implementation")].cell_contents)
        function = getattr(function, "__wrapped__", None)
        if function is None:
            return None
    return None


def fused_kernels_active(mixer: torch.nn.Module) -> bool:
    """Whether the mixer's forwards go through fused CUDA kernels (mamba-ssm / causal-conv1d).

    Those take `time_step_limit` as a pair of floats (`dt_limit`) and do not see the patches here, so the
    identity-steps route is refused under them. Off CUDA they never run. 5.17 modules keep a module flag
    `is_fast_path_available`; 5.23 modules resolve each kernel function once, at import, to the outside
    package when it imports. When neither can be read, an installed mamba-ssm or causal-conv1d counts.
    """
    parameter = next(mixer.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return False
    module = _mixer_module(mixer)
    if module is None:
        return False
    flag = getattr(module, "is_fast_path_available", None)
    if flag is not None:
        return bool(flag)
    resolved = [
        found for value in vars(module).values() if (found := _resolved_to_outside_kernel(value)) is not None
    ]
    if resolved:
        return any(resolved)
    return any(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


def _scan_with_initial_state(original: Callable) -> Callable:
    """Wrap a Mamba v1 selective scan so that it starts from the published state and honours identity steps.

    Layout (the kernel's): `hidden_states`, `dt`, `z` `[B, D, T]`; `A` `[D, N]`; `B`, `C` `[B, N, T]`.
    """

    def scan(
        hidden_states: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        delta_bias: torch.Tensor | None = None,
        delta_softplus: bool = False,
        return_last_state: bool = False,
        **kwargs,
    ):
        initial = _INITIAL_STATE.get()
        identity = _IDENTITY_STEPS.get()
        if identity is not None and identity.shape == (dt.shape[0], dt.shape[2]):
            # Δ = 0 at these positions: exp(0·A) = 1 and Δ·B·x = 0, so the state passes through unchanged.
            # The step is computed exactly as the scan would, then handed over without bias or softplus.
            if delta_bias is not None:
                dt = dt + delta_bias.to(dt.dtype)[..., None]
            if delta_softplus:
                dt = F.softplus(dt)
            dt = dt.masked_fill(identity[:, None, :].to(dt.device), 0.0)
            delta_bias, delta_softplus = None, False
        if initial is None:
            return original(
                hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs,
            )  # fmt: skip
        output, last_state = original(
            hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
            delta_softplus=delta_softplus, return_last_state=True, **kwargs,
        )  # fmt: skip
        step = dt.float()
        if delta_bias is not None:
            step = step + delta_bias.float()[..., None]
        if delta_softplus:
            step = F.softplus(step)
        decay = torch.exp(torch.cumsum(A.float()[None, :, None, :] * step[..., None], dim=2))  # [B, D, T, N]
        carried = decay * initial.float()[:, :, None, :]
        correction = torch.einsum("bdtn,bnt->bdt", carried, C.float())
        if z is not None:
            correction = correction * F.silu(z.float())
        output = output + correction.to(output.dtype)
        last_state = last_state + carried[:, :, -1].to(last_state.dtype)
        return (output, last_state) if return_last_state else output

    return scan


@contextlib.contextmanager
def scan_patch() -> Iterator[None]:
    """Inside this context the Mamba v1 modules scan with `_scan_with_initial_state`; the originals are back
    once the last of any nested or concurrent contexts exits (also after an exception).

    The wrapper behaves exactly as the original until `continuation` publishes a state or
    `identity_steps_patch` a mask, so other forwards running meanwhile are unaffected.
    """
    global _scan_depth
    with _scan_lock:
        if _scan_depth == 0:
            for name in ZERO_STATE_SCAN_MODULES:
                module = sys.modules.get(name)
                if module is None:
                    try:
                        module = importlib.import_module(name)
                    except ImportError:
                        continue
                original = getattr(module, _SCAN_NAME, None)
                if original is None:
                    continue
                wrapper = _scan_with_initial_state(original)
                setattr(module, _SCAN_NAME, wrapper)
                _scan_installed[module] = (original, wrapper)
        _scan_depth += 1
    try:
        yield
    finally:
        with _scan_lock:
            _scan_depth -= 1
            if _scan_depth == 0:
                for module, (original, wrapper) in _scan_installed.items():
                    # (someone else replaced it meanwhile: theirs stays)
                    if getattr(module, _SCAN_NAME, None) is wrapper:
                        setattr(module, _SCAN_NAME, original)
                _scan_installed.clear()


def _cache_argument(args: tuple, kwargs: dict):
    cache = kwargs.get("cache_params")
    if cache is None and len(args) > 1:
        cache = args[1]
    return cache


@contextlib.contextmanager
def _carried_state(mixers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The scan wrapper, fed each mixer's cached state by a forward pre-hook for multi-token forwards."""
    tokens: list[contextvars.Token] = []

    def publish(module, args, kwargs):
        cache = _cache_argument(args, kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        state = None
        if cache is not None and hidden_states.shape[1] > 1:
            state = recurrent_state(cache.layers[module.layer_idx])
        tokens.append(_INITIAL_STATE.set(state))

    def retract(module, args, kwargs, output):
        _INITIAL_STATE.reset(tokens.pop())

    with scan_patch():
        handles = []
        try:
            for mixer in mixers:
                handles.append(mixer.register_forward_pre_hook(publish, with_kwargs=True))
                handles.append(mixer.register_forward_hook(retract, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            # a forward that raised inside a mixer never ran its retract hook
            while tokens:
                _INITIAL_STATE.reset(tokens.pop())


def _stepwise_forward(mixer: torch.nn.Module, original: Callable) -> Callable:
    """A forward that runs a multi-token input from a cached state as one-token steps of `original`."""

    def forward(hidden_states, cache_params=None, attention_mask=None, **kwargs):
        length = hidden_states.shape[1]
        if (
            length == 1
            or cache_params is None
            or recurrent_state(cache_params.layers[mixer.layer_idx]) is None
        ):
            # from an empty state a multi-token forward is exact (the scan starts from zeros, as it should)
            return original(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        outputs = []
        for position in range(length):
            outputs.append(
                original(
                    hidden_states[:, position : position + 1],
                    cache_params=cache_params,
                    attention_mask=slice_tokens(attention_mask, length, position, 1),
                    **{key: slice_tokens(value, length, position, 1) for key, value in kwargs.items()},
                )
            )
        return torch.cat(outputs, dim=1)

    return forward


@contextlib.contextmanager
def continuation(mixers: Sequence[torch.nn.Module], mode: str) -> Iterator[None]:
    """Inside this context a multi-token forward of `mixers` from a cached state is exact, by `mode`:

    - `"native"`: nothing to do;
    - `"patched"`: the carried-state scan wrapper (`scan_patch`) and a pre-hook per mixer;
    - `"none"`: each mixer's forward runs such inputs one token at a time.
    """
    if mode == "native":
        yield
    elif mode == "patched":
        with _carried_state(mixers):
            yield
    elif mode == "none":
        with replaced_forwards({mixer: _stepwise_forward(mixer, mixer.forward) for mixer in mixers}):
            yield
    else:
        raise ValueError(f"continuation mode must be one of {CONTINUATION_MODES}, got {mode!r}.")


@contextlib.contextmanager
def identity_steps_patch(clamp_mixers: Sequence[torch.nn.Module], mask: torch.Tensor) -> Iterator[None]:
    """Inside this context SSM steps at `mask` positions leave the state unchanged (Δ = 0).

    Mamba v1 mixers through the scan wrapper; `clamp_mixers` (Mamba2 layout) by per-position Δ bounds that
    are `[0, 0]` at masked positions and the mixer's own limits elsewhere (bit-identical there).

    Args:
        clamp_mixers: the Mamba2-layout mixers whose `time_step_limit` is swapped.
        mask: `[B, T]` bool, true where the step must be skipped.
    """
    saved: list[tuple[torch.nn.Module, object]] = []
    with scan_patch():
        token = _IDENTITY_STEPS.set(mask)
        try:
            for mixer in clamp_mixers:
                low, high = time_step_bounds(mixer)
                dtype, device = mixer.dt_bias.dtype, mixer.dt_bias.device
                skip = mask.to(device)[..., None]
                bounds = (
                    torch.where(skip, 0.0, torch.full(skip.shape, float(low), dtype=dtype, device=device)),
                    torch.where(skip, 0.0, torch.full(skip.shape, float(high), dtype=dtype, device=device)),
                )
                saved.append((mixer, mixer.time_step_limit))
                mixer.time_step_limit = tuple(bound.to(dtype) for bound in bounds)
            yield
        finally:
            _IDENTITY_STEPS.reset(token)
            for mixer, limit in reversed(saved):
                mixer.time_step_limit = limit


def install_forward(module: torch.nn.Module, forward: Callable) -> bool:
    """Give `module` an instance `forward` that stays until `remove_forward` (hooks still run). Used for
    persistent, opt-in patches of plain torch layers (`kernels.packed_linear`), where `replaced_forwards`
    serves one call.

    Returns:
        False, changing nothing, when the instance already has its own `forward` (ours, or accelerate's).
    """
    if "forward" in module.__dict__:
        return False
    module.forward = forward
    return True


def remove_forward(module: torch.nn.Module) -> None:
    """Drop the instance `forward` `install_forward` set: the class's own runs again."""
    module.__dict__.pop("forward", None)


def has_instance_forward(module: torch.nn.Module) -> bool:
    """Whether `module` runs an instance `forward` (a patch of ours or accelerate's hooks)."""
    return "forward" in module.__dict__


@contextlib.contextmanager
def replaced_forwards(forwards: Mapping[torch.nn.Module, Callable]) -> Iterator[None]:
    """Inside this context each module's `forward` is the given callable (set on the instance, so hooks
    still run); on exit the instance gets back exactly what it had (its class forward, or an instance
    forward someone else installed, such as accelerate's).

    Args:
        forwards: module -> callable taking the module's forward arguments (without `self`).
    """
    saved: list[tuple[torch.nn.Module, object]] = []
    try:
        for module, forward in forwards.items():
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous


def installed_scan(module_name: str) -> Callable | None:
    """The scan function a Mamba v1 module calls right now (for tests that check patches are undone)."""
    module = sys.modules.get(module_name)
    return getattr(module, _SCAN_NAME, None) if module is not None else None


@dataclasses.dataclass(frozen=True)
class Mamba2Layout:
    """What a commit by state update needs from a Mamba2-layout mixer (Mamba2, Bamba, Falcon-H1, Zamba2,
    Nemotron-H, GraniteMoeHybrid), read from the module's attributes.

    The mixer's `in_proj` output ends with `[…, xBC (conv_dim), dt (num_heads)]`: the conv input (SSM input
    `x`, then `B` and `C` for `n_groups` groups) and the raw time step, before `dt_bias` and softplus.

    Attributes:
        conv_dim: channels of the depthwise conv (`intermediate_size + 2 · n_groups · state_size`).
        intermediate_size: channels of `x` (`num_heads · head_dim`).
        num_heads: SSM heads `H`.
        head_dim: channels per head `P`.
        n_groups: groups sharing `B` and `C`.
        state_size: SSM state size `N`.
        conv_kernel_size: conv window `K`.
        activation: the conv activation (transformers' `ACT2FN` name).
        dt_limit: `(low, high)` clamp of Δ after softplus (the mixer's `time_step_limit`).
        conv_weight: `[conv_dim, K]` depthwise conv weights.
        conv_bias: `[conv_dim]` or `None`.
        dt_bias: `[H]`.
        A_log: `[H]`.
        projection_scale: `[conv_dim + H]` per-channel multiplier applied after `in_proj` (Falcon-H1's
            `mup_vector`), or `None`.
    """

    conv_dim: int
    intermediate_size: int
    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel_size: int
    activation: str
    dt_limit: tuple
    conv_weight: torch.Tensor
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    projection_scale: torch.Tensor | None

    @property
    def recorded_width(self) -> int:
        """Columns of the `in_proj` output a commit needs: `conv_dim + num_heads`."""
        return self.conv_dim + self.num_heads


_LAYOUT_ATTRIBUTES = (
    "conv_dim",
    "intermediate_size",
    "num_heads",
    "head_dim",
    "n_groups",
    "ssm_state_size",
    "conv_kernel_size",
    "activation",
    "dt_bias",
    "A_log",
    "in_proj",
    "chunk_size",
)


def mamba2_layout(mixer: torch.nn.Module) -> Mamba2Layout | None:
    """The `Mamba2Layout` of a mixer that has one (every attribute present, `in_proj` a `Linear`, a
    consistent width), else `None`. Structure only: the `state_replay` probe decides whether it is exact."""
    if not has_time_step_clamp(mixer) or not all(hasattr(mixer, name) for name in _LAYOUT_ATTRIBUTES):
        return None
    if not isinstance(mixer.in_proj, torch.nn.Linear) or not isinstance(mixer.activation, str):
        return None
    width = mixer.conv_dim + mixer.num_heads
    scale = getattr(mixer, "mup_vector", None)
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(-1)[-width:]
    elif scale is not None:
        return None
    if mixer.in_proj.out_features < width or mixer.intermediate_size != mixer.num_heads * mixer.head_dim:
        return None
    return Mamba2Layout(
        conv_dim=mixer.conv_dim,
        intermediate_size=mixer.intermediate_size,
        num_heads=mixer.num_heads,
        head_dim=mixer.head_dim,
        n_groups=mixer.n_groups,
        state_size=mixer.ssm_state_size,
        conv_kernel_size=mixer.conv_kernel_size,
        activation=mixer.activation,
        dt_limit=time_step_bounds(mixer),
        conv_weight=mixer.conv1d.weight.squeeze(1),
        conv_bias=mixer.conv1d.bias,
        dt_bias=mixer.dt_bias,
        A_log=mixer.A_log,
        projection_scale=scale,
    )


#: transformers' module-level chunked gated delta rule (Gated DeltaNet: Qwen3-Next, Qwen3.5, OLMo-hybrid in
#: 5.23), which every multi-token forward of those mixers calls, padded to its `chunk_size` (64)
GATED_DELTA_RULE = "torch_chunk_gated_delta_rule"


def gated_delta_rule(mixer: torch.nn.Module) -> Callable | None:
    """The chunked gated delta rule a Gated DeltaNet mixer's multi-token forward calls (its module's
    `GATED_DELTA_RULE`, transformers' torch version), else `None` (other mixers, or an outside kernel such as
    flash-linear-attention resolved in its place). Structure only: the `state_replay` probe decides whether
    a frozen verification and a commit through it are exact."""
    module = _mixer_module(mixer)
    # inside a verification the global is our wrapper: report transformers'
    rule = original_function(module, GATED_DELTA_RULE) if module is not None else None
    if not callable(rule) or not hasattr(mixer, "conv1d") or _resolved_to_outside_kernel(rule):
        return None
    return rule


@contextlib.contextmanager
def chunk_size_override(mixers: Sequence[torch.nn.Module], size: int) -> Iterator[None]:
    """Inside this context Mamba2-layout `mixers` scan in chunks of `size` tokens (their `chunk_size`).

    transformers pads every multi-token scan to a multiple of `chunk_size` (256 in published configs): a
    forward over `T ≤ chunk_size` tokens with `size = T` computes exactly one chunk of `T`, the same
    algorithm on fewer (padding) positions, so the result is the same up to rounding.
    """
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}.")
    saved = [(mixer, mixer.chunk_size) for mixer in mixers]
    try:
        for mixer, _ in saved:
            mixer.chunk_size = size
        yield
    finally:
        for mixer, previous in reversed(saved):
            mixer.chunk_size = previous


_SCAN_FUNCTION = "mamba2_chunk_scan"


@contextlib.contextmanager
def module_function_override(
    mixers: Sequence[torch.nn.Module], name: str, wrapper: Callable[[Callable], Callable]
) -> Iterator[None]:
    """Inside this context the `mixers`' modules call `wrapper(original)` instead of their module-level
    function `name` (`mamba2_chunk_scan`, `mamba2_selective_state_update`, `causal_conv1d_update`: the
    same names in 5.17 and 5.23), through `overrides.function_override`: the wrapper must fall back to
    `original` for calls that are not its own (other threads decode other models of the family
    meanwhile). Modules without the function are left alone.

    Raises:
        RuntimeError: another wrapper already replaces `name` in one of the modules.
    """
    modules = {module for mixer in mixers if (module := _mixer_module(mixer)) is not None}
    with function_override(modules, name, wrapper):
        yield


def chunk_scan_override(
    mixers: Sequence[torch.nn.Module], wrapper: Callable[[Callable], Callable]
) -> contextlib.AbstractContextManager[None]:
    """Inside this context the Mamba2-layout `mixers`' modules call `wrapper(original)` instead of their
    module-level `mamba2_chunk_scan` (`module_function_override`)."""
    return module_function_override(mixers, _SCAN_FUNCTION, wrapper)


def installed_module_function(module_name: str, name: str) -> Callable | None:
    """The function `name` a transformers module calls right now (for tests that check it is restored)."""
    module = sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None else None


def installed_chunk_scan(module_name: str) -> Callable | None:
    """The `mamba2_chunk_scan` a Mamba2-family module calls right now (for tests that check it is restored)."""
    return installed_module_function(module_name, _SCAN_FUNCTION)
