"""Every difference between the supported transformers versions (5.17 through 5.23) lives here.

The rest of the package asks this module, never `transformers.__version__`, how to reach a model's cache,
which cache layers are recurrent, and which mixers continue a multi-token forward correctly from a state.
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("5.24.0")

# Mixers whose torch path restarts a multi-token forward from a zero recurrent state (the conv window is
# carried, the SSM state is not): Mamba v1 and its relatives, and Jamba. Single-token steps are correct.
_ZERO_STATE_CONTINUATION_MODEL_TYPES = frozenset({"mamba", "falcon_mamba", "jamba"})


def check_transformers_version() -> None:
    """Raise `ImportError` when the installed transformers is outside the supported range."""
    if not MIN_TRANSFORMERS <= TRANSFORMERS_VERSION < MAX_TRANSFORMERS_EXCLUSIVE:
        raise ImportError(
            f"hf_specssm supports transformers >= {MIN_TRANSFORMERS} and < {MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"found {TRANSFORMERS_VERSION}."
        )


@cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """Name of the cache argument of `model.forward`: `cache_params` (Mamba-named classes) or `past_key_values`."""
    params = _forward_parameters(type(model))
    if "past_key_values" in params:
        return "past_key_values"
    if "cache_params" in params:
        return "cache_params"
    raise ValueError(
        f"{type(model).__name__}.forward takes no cache argument; it cannot decode incrementally."
    )


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether `model.forward` has a parameter called `name`."""
    return name in _forward_parameters(type(model))


def is_linear_layer(layer: object) -> bool:
    """Whether a cache layer holds recurrent (conv + SSM) state."""
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def is_attention_layer(layer: object) -> bool:
    """Whether a cache layer holds key/value tensors along a sequence axis."""
    return isinstance(layer, CacheLayerMixin)


def cache_layers(cache: Cache) -> list:
    """The per-layer objects of a transformers `Cache`."""
    return list(cache.layers)


def has_linear_layers(cache: Cache) -> bool:
    """Whether any layer of `cache` carries recurrent state."""
    return any(is_linear_layer(layer) for layer in cache.layers)


def config_has_recurrent_layers(config: transformers.PretrainedConfig) -> bool:
    """Whether a model built from `config` keeps recurrent (SSM / linear-attention) state in its cache."""
    return has_linear_layers(DynamicCache(config=config.get_text_config(decoder=True)))


def linear_state_slots(layer: object) -> list[tuple[dict, int]]:
    """The `(dict, key)` pairs under which a linear cache layer keeps its initialised state tensors.

    Both 5.17 and 5.23 keep conv and recurrent states in the dicts `conv_states` / `recurrent_states`
    keyed by `state_idx`; reading them this way works on both.
    """
    slots = []
    for idx in range(layer.number_of_states):
        if layer.is_conv_states_initialized[idx]:
            slots.append((layer.conv_states, idx))
        if layer.is_recurrent_states_initialized[idx]:
            slots.append((layer.recurrent_states, idx))
    return slots


def is_sliding_attention_layer(layer: object) -> bool:
    """Whether a cache layer keeps only a sliding window of keys and values."""
    return isinstance(layer, DynamicSlidingWindowLayer)


def enable_attention_rollback(cache: Cache) -> None:
    """Make sliding-window attention layers keep enough history to be cropped after a verification.

    Full-attention layers can always be cropped. Sliding-window layers drop old keys as they go unless they
    record the past (then `crop` trims them back to the window). Linear layers are left alone: past
    recording there changes the decode path of the mixers.
    """
    for layer in cache.layers:
        if is_sliding_attention_layer(layer) and not is_linear_layer(layer):
            layer.activate_past_recording()


def multi_token_continuation_is_exact(config: transformers.PretrainedConfig) -> bool:
    """Whether a multi-token forward that starts from a cached recurrent state is correct for this model.

    transformers' torch paths for Mamba v1, FalconMamba and Jamba start the selective scan from zeros
    (notes: transformers-5-internals.md §3); one-token steps are correct for them.
    """
    model_type = getattr(config.get_text_config(decoder=True), "model_type", "")
    return model_type not in _ZERO_STATE_CONTINUATION_MODEL_TYPES


def is_stateful_model(model: torch.nn.Module) -> bool:
    """Whether transformers marks the model as stateful (Mamba, Mamba2 and the hybrids)."""
    return bool(getattr(model, "_is_stateful", False))


def normalize_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Return `None` for a mask that masks nothing.

    5.23 drops an all-ones mask from `model_kwargs` before the decoding loop; 5.17 passes it on. Both are
    the same input for a batch without padding.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask
