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
_WRAPPED_FLAG = "_hf_specssm_initial_state_wrapper"


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
    if _compat.multi_token_continuation_is_exact(model.config):
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
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
