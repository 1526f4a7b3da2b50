"""Everything that touches transformers' SSM mixers, one place per mixer family.

Two things need the mixers themselves:

1. **Exact multi-token continuation for Mamba v1 mixers** (Mamba, FalconMamba, Jamba). Their torch
   selective scan always starts from a zero state ("Initial hidden state is not supported"), so a
   multi-token forward from a cached state is wrong. The scan is linear in its initial state `h0`:

       h_t = (Π_{s≤t} exp(Δ_s A)) h0 + h_t^{zero},   y_t = y_t^{zero} + C_t · (Π_{s≤t} exp(Δ_s A)) h0 · silu(z_t)

   so wrapping the module's `mamba_selective_scan` and adding the carried term makes it exact. The wrapper
   is installed once over the module global; it only acts while a forward pre-hook of a mixer inside
   `exact_continuation(model)` has published that layer's state, and otherwise calls the original.

2. **Activation Replay** (Snakes and Ladders). During verification a pre-hook records each SSM mixer's
   input `[B, T, H]`; after acceptance the recurrent states go back to the pre-verification checkpoint and
   each mixer alone is run again on the inputs of the accepted tokens. Every transformers mixer family
   (Mamba, Mamba2, FalconMamba, Jamba, Bamba, Falcon-H1, Zamba2) has the signature
   `forward(hidden_states, cache_params=None, attention_mask=None, **kwargs)`, so one replay serves all.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from hf_specssm import _compat

# transformers modules whose mixers use the zero-initialised Mamba v1 scan
_ZERO_STATE_SCAN_MODULES = (
    "transformers.models.mamba.modeling_mamba",
    "transformers.models.falcon_mamba.modeling_falcon_mamba",
    "transformers.models.jamba.modeling_jamba",
)
_INITIAL_STATE: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "hf_specssm_h0", default=None
)
# `[B, T]` bool: positions whose SSM step must leave the state unchanged (Δ = 0), see `identity_steps`
_IDENTITY_STEPS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "hf_specssm_identity_steps", default=None
)
_WRAPPED_FLAG = "_hf_specssm_initial_state_wrapper"
_EXACT_ACTIVE_FLAG = "_hf_specssm_exact_continuation_active"


def _scan_with_initial_state(original: Callable) -> Callable:
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
        # hidden_states/dt/z: [B, D, T]; A: [D, N]; B, C: [B, N, T] (the kernel layout)
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

    setattr(scan, _WRAPPED_FLAG, True)
    return scan


def _install_scan_wrappers() -> None:
    for name in _ZERO_STATE_SCAN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        scan = getattr(module, "mamba_selective_scan", None)
        if scan is not None and not getattr(scan, _WRAPPED_FLAG, False):
            module.mamba_selective_scan = _scan_with_initial_state(scan)


def ssm_mixers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The SSM mixer modules of `model`, in layer order: modules with a `layer_idx` and a `conv1d`."""
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
        and isinstance(getattr(module, "conv1d", None), torch.nn.Conv1d)
    ]


def _cache_argument(args: tuple, kwargs: dict):
    cache = kwargs.get("cache_params")
    if cache is None and len(args) > 1:
        cache = args[1]
    return cache


def _previous_recurrent_state(cache, layer_idx: int) -> torch.Tensor | None:
    layer = cache.layers[layer_idx]
    if not _compat.is_linear_layer(layer) or not layer.has_previous_state[0]:
        return None
    if not layer.is_recurrent_states_initialized[0]:
        return None
    return layer.recurrent_states[0]


@contextlib.contextmanager
def exact_continuation(model: PreTrainedModel) -> Iterator[None]:
    """Inside this context, multi-token forwards of `model` from a cached state are exact for every mixer."""
    if _compat.multi_token_continuation_is_exact(model.config) or getattr(model, _EXACT_ACTIVE_FLAG, False):
        # (nested contexts would publish twice and reset their tokens out of order)
        yield
        return
    _install_scan_wrappers()
    tokens: list[contextvars.Token] = []

    def publish(module, args, kwargs):
        cache = _cache_argument(args, kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        state = None
        if cache is not None and hidden_states.shape[1] > 1:
            state = _previous_recurrent_state(cache, module.layer_idx)
        tokens.append(_INITIAL_STATE.set(state))

    def retract(module, args, kwargs, output):
        _INITIAL_STATE.reset(tokens.pop())

    handles = []
    for mixer in ssm_mixers(model):
        handles.append(mixer.register_forward_pre_hook(publish, with_kwargs=True))
        handles.append(mixer.register_forward_hook(retract, with_kwargs=True))
    setattr(model, _EXACT_ACTIVE_FLAG, True)
    try:
        yield
    finally:
        setattr(model, _EXACT_ACTIVE_FLAG, False)
        for handle in handles:
            handle.remove()
        # a forward that raised inside a mixer never ran its retract hook
        while tokens:
            _INITIAL_STATE.reset(tokens.pop())


def _scan_family(mixer: torch.nn.Module) -> str | None:
    """`"mamba"` for mixers whose module scans with `mamba_selective_scan` (Mamba v1 layout), `"mamba2"` for
    mixers with a `time_step_limit` clamp and a `dt_bias` (Mamba2 layout), else `None`."""
    module = importlib.import_module(type(mixer).__module__)
    if type(mixer).__module__ in _ZERO_STATE_SCAN_MODULES and hasattr(module, "mamba_selective_scan"):
        return "mamba"
    if hasattr(mixer, "time_step_limit") and hasattr(mixer, "dt_bias"):
        return "mamba2"
    return None


def check_identity_steps(model: PreTrainedModel) -> None:
    """Raise `ValueError` unless every SSM mixer of `model` can be told to skip positions (`identity_steps`)."""
    unknown = sorted({type(mixer).__name__ for mixer in ssm_mixers(model) if _scan_family(mixer) is None})
    if unknown:
        raise ValueError(
            f"Joint Attainment and Advancement needs Mamba or Mamba2 mixers; {', '.join(unknown)} cannot skip "
            "padded positions. Use verification='replay'."
        )


@contextlib.contextmanager
def identity_steps(model: PreTrainedModel, mask: torch.Tensor) -> Iterator[None]:
    """Inside this context, SSM steps at `mask` positions leave every recurrent state unchanged.

    A step with Δ = 0 is the identity (`exp(0·A) = 1`, `Δ·B·x = 0`), so a row padded on the right ends with
    the state after its last real token. One place per mixer family:

    - Mamba v1 mixers: the wrapped `mamba_selective_scan` zeroes Δ at masked positions;
    - Mamba2 mixers: their Δ clamp (`time_step_limit`) is swapped for per-position bounds that are `[0, 0]`
      at masked positions and the mixer's own limits elsewhere (bit-identical there).

    Conv windows are not handled here: `ForkableCache.ragged_conv_rows` keeps each row's window at its last
    real token. Multi-token forwards only (single-token steps go through the step kernels unmasked).

    Args:
        model: the model whose forwards run inside the context.
        mask: `[B, T]` bool, true where the step must be skipped.
    """
    check_identity_steps(model)
    _install_scan_wrappers()
    saved: list[tuple[torch.nn.Module, object]] = []
    for mixer in ssm_mixers(model):
        if _scan_family(mixer) != "mamba2":
            continue
        low, high = mixer.time_step_limit or (0.0, float("inf"))
        dtype, device = mixer.dt_bias.dtype, mixer.dt_bias.device
        skip = mask.to(device)[..., None]
        bounds = (
            torch.where(skip, 0.0, torch.full(skip.shape, float(low), dtype=dtype, device=device)).to(dtype),
            torch.where(skip, 0.0, torch.full(skip.shape, float(high), dtype=dtype, device=device)).to(dtype),
        )
        saved.append((mixer, mixer.time_step_limit))
        mixer.time_step_limit = bounds
    token = _IDENTITY_STEPS.set(mask)
    try:
        yield
    finally:
        _IDENTITY_STEPS.reset(token)
        for mixer, limit in saved:
            mixer.time_step_limit = limit


class MixerInputRecorder:
    """Records each SSM mixer's input during one forward, and replays a prefix of it.

    Memory: one `[B, T, H]` tensor per SSM layer (the activations), instead of `T` copies of every state.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.mixers = ssm_mixers(model)
        self._records: dict[int, tuple[tuple, dict]] = {}
        self._handles: list = []

    @property
    def recorded_bytes(self) -> int:
        """Bytes held by the recorded activations."""
        return sum(args[0].numel() * args[0].element_size() for args, _ in self._records.values())

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record mixer inputs of the forwards run inside this context (the last forward wins)."""
        self._records.clear()

        def record(module, args, kwargs):
            if not args:
                args, kwargs = (
                    (kwargs["hidden_states"],),
                    {k: v for k, v in kwargs.items() if k != "hidden_states"},
                )
            self._records[id(module)] = (args, dict(kwargs))

        handles = [mixer.register_forward_pre_hook(record, with_kwargs=True) for mixer in self.mixers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def replay(self, start: int, length: int) -> None:
        """Run every mixer again on recorded positions `start … start + length - 1`, updating its state.

        The cache must hold each SSM layer's state from just before position `start`.
        """
        if length <= 0:
            return
        with exact_continuation(self.model):
            for mixer in self.mixers:
                args, kwargs = self._records[id(mixer)]
                total = args[0].shape[1]
                sliced_args = tuple(_slice_tokens(value, total, start, length) for value in args)
                sliced_kwargs = {
                    key: _slice_tokens(value, total, start, length) for key, value in kwargs.items()
                }
                mixer(*sliced_args, **sliced_kwargs)

    def replay_rows(self, cache, lengths: torch.Tensor) -> None:
        """Replay recorded positions `0 … lengths[b] - 1` for each row `b` of a batch, one step at a time.

        Rows whose replay is over keep their state: after each step their rows of every recurrent state are
        copied back from before the step. Exact for right-padded verification batches.

        Args:
            cache: the `ForkableCache`, holding every row's state from just before position 0.
            lengths: `[B]` number of positions to replay per row.
        """
        steps = int(lengths.max()) if lengths.numel() else 0
        with exact_continuation(self.model):
            for step in range(steps):
                idle = (lengths <= step).nonzero()[:, 0]
                saved = [state[idle].clone() for state in cache.state_tensors()] if idle.numel() else None
                for mixer in self.mixers:
                    args, kwargs = self._records[id(mixer)]
                    total = args[0].shape[1]
                    mixer(
                        *(_slice_tokens(value, total, step, 1) for value in args),
                        **{key: _slice_tokens(value, total, step, 1) for key, value in kwargs.items()},
                    )
                if saved is not None:
                    for state, kept in zip(cache.state_tensors(), saved):
                        state[idle] = kept

    def clear(self) -> None:
        """Drop the recorded activations."""
        self._records.clear()


def _slice_tokens(value, total: int, start: int, length: int):
    """Slice the token axis (dim 1) of per-token tensors; leave everything else alone."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[1] == total:
        return value[:, start : start + length]
    return value
