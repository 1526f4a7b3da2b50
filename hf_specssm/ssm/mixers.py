"""Everything our SSM paths need from transformers' mixers, with the patches themselves in `_compat`.

Two things need the mixers themselves:

1. **Exact multi-token continuation.** Some transformers mixers (Mamba v1, FalconMamba, Jamba) restart
   their selective scan from a zero state, so a multi-token forward from a cached state is wrong. Which
   mixers do is found by a probe (`_compat.probes.mixer_support`), and `exact_continuation(model)` applies
   what the probe found exact: nothing (`"native"`), the carried-state scan patch (`"patched"`), or
   one-token steps (`"none"`).

2. **Activation Replay** (Snakes and Ladders). During verification a pre-hook records each SSM mixer's
   input `[B, T, H]`; after acceptance the recurrent states go back to the pre-verification checkpoint and
   each mixer alone is run again on the inputs of the accepted tokens. Every transformers mixer family
   (Mamba, Mamba2, FalconMamba, Jamba, Bamba, Falcon-H1, Zamba2) has the signature
   `forward(hidden_states, cache_params=None, attention_mask=None, **kwargs)`, so one replay serves all.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel

from hf_specssm._compat import admission
from hf_specssm._compat import mixers as _patches
from hf_specssm._compat.mixers import slice_tokens, ssm_mixers

__all__ = [
    "MixerInputRecorder",
    "check_identity_steps",
    "exact_continuation",
    "identity_route",
    "identity_steps",
    "ssm_mixers",
]

# model -> depth of `exact_continuation` contexts open on it (inner ones must not hook a second time)
_continuation_depth: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def exact_continuation(model: PreTrainedModel) -> Iterator[None]:
    """Inside this context, multi-token forwards of `model` from a cached state are exact for every mixer.

    The mixers' continuation probe decides how (`_compat.admission.continuation_mode`, run on first use):
    not at all where transformers already is exact, by the carried-state scan patch, or by running such
    forwards one token at a time. Contexts nest; only the outermost one patches, and everything is undone
    when it exits.
    """
    if _continuation_depth.get(model, 0) > 0:
        _continuation_depth[model] += 1
        try:
            yield
        finally:
            _continuation_depth[model] -= 1
        return
    mode = admission.continuation_mode(model)
    _continuation_depth[model] = 1
    try:
        with _patches.continuation(ssm_mixers(model), mode):
            yield
    finally:
        _continuation_depth[model] = 0


def _scan_family(mixer: torch.nn.Module) -> str | None:
    """`"mamba"` for mixers whose module scans with the Mamba v1 selective scan, `"mamba2"` for mixers with
    a Δ clamp and a `dt_bias` (Mamba2 layout), else `None`. Structure only: the probe admits the family."""
    if _patches.has_patchable_scan(mixer):
        return "mamba"
    if _patches.has_time_step_clamp(mixer):
        return "mamba2"
    return None


def identity_route(mixer: torch.nn.Module) -> str | None:
    """How `identity_steps` reaches this mixer: `"mamba"` (scan patch), `"mamba2"` (Δ clamp) or `None`."""
    return _scan_family(mixer)


def check_identity_steps(model: PreTrainedModel) -> None:
    """Raise `ValueError` unless every SSM mixer of `model` can be told to skip positions (`identity_steps`).

    Refused: mixer layouts without a route, fused CUDA kernels, no exact multi-token continuation, and
    what the identity-steps probe refused (`_compat.probes`, when it has run) or a test forced off.
    """
    unknown = sorted({type(mixer).__name__ for mixer in ssm_mixers(model) if identity_route(mixer) is None})
    if unknown:
        raise ValueError(
            f"Joint Attainment and Advancement needs Mamba or Mamba2 mixers; {', '.join(unknown)} cannot skip "
            "padded positions. Use verification='replay'."
        )
    reason = _identity_steps_refusal(model)
    if reason is not None:
        raise ValueError(
            f"Joint Attainment and Advancement cannot skip padded positions of {type(model).__name__} here "
            f"({reason}). Use verification='replay'."
        )


def _identity_steps_refusal(model: PreTrainedModel) -> str | None:
    if admission.forced_value("identity_steps") is False:
        return "forced off"
    representatives = admission.representatives(model)
    fused = sorted(
        {type(mixer).__name__ for mixer in representatives if _patches.fused_kernels_active(mixer)}
    )
    if fused:
        return f"fused CUDA kernels are active for {', '.join(fused)}"
    if admission.continuation_mode(model) == "none" and admission.forced_value("identity_steps") is None:
        return "no exact multi-token continuation"
    for mixer in representatives:
        found = admission.recorded("identity_steps", mixer)
        if found is not None and not found[0]:
            return f"{type(mixer).__name__}: {found[1]}"
    return None


@contextlib.contextmanager
def identity_steps(model: PreTrainedModel, mask: torch.Tensor) -> Iterator[None]:
    """Inside this context, SSM steps at `mask` positions leave every recurrent state unchanged.

    A step with Δ = 0 is the identity (`exp(0·A) = 1`, `Δ·B·x = 0`), so a row padded on the right ends with
    the state after its last real token. One route per mixer layout (`_compat.mixers.identity_steps_patch`):

    - Mamba v1 mixers: the wrapped selective scan zeroes Δ at masked positions;
    - Mamba2 mixers: their Δ clamp is swapped for per-position bounds that are `[0, 0]` at masked positions
      and the mixer's own limits elsewhere (bit-identical there).

    Conv windows are not handled here: `ForkableCache.ragged_conv_rows` keeps each row's window at its last
    real token. Multi-token forwards only (single-token steps go through the step kernels unmasked).

    Args:
        model: the model whose forwards run inside the context (`check_identity_steps` passes).
        mask: `[B, T]` bool, true where the step must be skipped.
    """
    check_identity_steps(model)
    clamped = [mixer for mixer in ssm_mixers(model) if identity_route(mixer) == "mamba2"]
    with _patches.identity_steps_patch(clamped, mask):
        yield


class MixerInputRecorder:
    """Records each SSM mixer's input during one forward, and replays a prefix of it.

    Memory: one `[B, T, H]` tensor per SSM layer (the activations), instead of `T` copies of every state.

    Args:
        model: the model whose mixers are recorded.
        mixers: record only these of its mixers (default: all of them, `ssm_mixers(model)`).
    """

    def __init__(self, model: PreTrainedModel, mixers: Sequence[torch.nn.Module] | None = None) -> None:
        self.model = model
        self.mixers = list(mixers) if mixers is not None else ssm_mixers(model)
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
                sliced_args = tuple(slice_tokens(value, total, start, length) for value in args)
                sliced_kwargs = {
                    key: slice_tokens(value, total, start, length) for key, value in kwargs.items()
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
                        *(slice_tokens(value, total, step, 1) for value in args),
                        **{key: slice_tokens(value, total, step, 1) for key, value in kwargs.items()},
                    )
                if saved is not None:
                    for state, kept in zip(cache.state_tensors(), saved):
                        state[idle] = kept

    def clear(self) -> None:
        """Drop the recorded activations."""
        self._records.clear()
