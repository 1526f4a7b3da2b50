"""Recurrent (conv + SSM) cache layers: which layers they are, and every read or write of their state.

transformers 5.17 and 5.23 keep a linear layer's state in dicts keyed by `state_idx` (`conv_states`,
`recurrent_states`) next to flags saying which entries exist (`is_conv_states_initialized`,
`is_recurrent_states_initialized`) and whether a token was consumed (`has_previous_state`); the layer
classes are byte-identical between the two (notes: transformers-5-internals.md §3, §6). These attributes
are not public API, so the rest of the package reaches them only through the functions here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import transformers
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionCacheLayerMixin,
)


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
    keyed by `state_idx`; reading them this way works on both. Conv states come before the recurrent
    state of the same `state_idx`.
    """
    slots = []
    for idx in range(layer.number_of_states):
        if layer.is_conv_states_initialized[idx]:
            slots.append((layer.conv_states, idx))
        if layer.is_recurrent_states_initialized[idx]:
            slots.append((layer.recurrent_states, idx))
    return slots


def recurrent_state(layer: object, state_idx: int = 0) -> torch.Tensor | None:
    """The live SSM state of a linear layer once it has consumed a token, else `None`.

    Returns:
        `[B, D, N]` (Mamba v1) or `[B, H, P, N]` (Mamba2 family), the tensor the mixers update in place.
    """
    if not is_linear_layer(layer) or not layer.has_previous_state[state_idx]:
        return None
    if not layer.is_recurrent_states_initialized[state_idx]:
        return None
    return layer.recurrent_states[state_idx]


def stored_conv_state(layer: object, state_idx: int = 0) -> torch.Tensor | None:
    """The stored conv window of a linear layer (`[B, C, K]`, longer while it records the past), or `None`
    before its first forward. Writing into it changes what the next forward convolves."""
    if not is_linear_layer(layer) or not layer.is_conv_states_initialized[state_idx]:
        return None
    return layer.conv_states[state_idx]


def conv_inputs_without_update(
    layer: object, new_inputs: torch.Tensor, state_idx: int = 0
) -> torch.Tensor | None:
    """What a linear layer's `update_conv_state` returns for `new_inputs` — its stored window followed by
    them — without writing anything; `None` where that call would do more than concatenate (before the
    layer's first token, or while it records the past).

    Args:
        layer: a cache layer.
        new_inputs: `[B, C, T]` conv inputs of a forward.

    Returns:
        `[B, C, K + T]`.
    """
    if not is_linear_layer(layer) or layer.record_past:
        return None
    if not layer.is_conv_states_initialized[state_idx] or not layer.has_previous_state[state_idx]:
        return None
    return torch.cat([layer.conv_states[state_idx], new_inputs], dim=-1)


def frozen_states(layer: object, state_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(conv window [B, C, K], SSM state)` of a linear layer whose `update_conv_state` would only
    concatenate (`conv_inputs_without_update`): what a frozen verification forward reads in place of
    that call. `None` before the layer's first token, while it records the past, or without an SSM state.
    Neither tensor may be written (the frozen cache keeps its state)."""
    if not is_linear_layer(layer) or layer.record_past:
        return None
    if not layer.is_conv_states_initialized[state_idx] or not layer.has_previous_state[state_idx]:
        return None
    state = recurrent_state(layer, state_idx)
    return None if state is None else (layer.conv_states[state_idx], state)


def conv_window(layer: object, kernel_size: int, like: torch.Tensor, state_idx: int = 0) -> torch.Tensor:
    """The last `K − 1` conv inputs a linear layer has consumed, zeros before its first token.

    Args:
        layer: a cache layer.
        kernel_size: the mixer's conv kernel size `K`.
        like: `[B, C, T]` tensor whose batch size, channel count and dtype the zeros take.

    Returns:
        `[B, C, K − 1]` in `like.dtype`.
    """
    stored = stored_conv_state(layer, state_idx)
    if stored is not None and layer.has_previous_state[state_idx]:
        return stored[..., -(kernel_size - 1) :].to(like.dtype)
    return like.new_zeros((like.shape[0], like.shape[1], kernel_size - 1))


def reset_recurrent_part(layer: object) -> None:
    """Zero a linear layer's conv and SSM state and mark it as having consumed nothing.

    Only the recurrent part: a hybrid layer keeps its keys and values (they are cropped separately).
    """
    LinearAttentionCacheLayerMixin.reset(layer)


def use_full_attention_in_hybrid_layers(cache: Cache) -> None:
    """Replace hybrid linear + sliding-window layers of `cache` by linear + full-attention layers.

    A hybrid layer with a sliding window would need past recording to be cropped, which also changes how
    its mixer updates the conv window. Keeping all keys instead is exact (the mask applies the window).
    """
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, LinearAttentionAndSlidingWindowAttentionLayer):
            cache.layers[idx] = LinearAttentionAndFullAttentionLayer()


def stack_recurrent_rows(layer: object, rows: Sequence[object], template: object) -> None:
    """Fill an empty linear layer with the batch-1 states of `rows`, concatenated along the batch axis.

    A row that has consumed no token gets a zero state, which is what the mixers start from anyway.

    Args:
        layer: the empty linear layer of the stacked cache.
        rows: the same layer of each batch-1 cache, in batch order.
        template: one of `rows` whose states are initialised (their shapes, dtype and device are used).
    """
    layer.device, layer.dtype = template.device, template.dtype
    for key in range(layer.number_of_states):
        layer.conv_kernel_size[key] = template.conv_kernel_size[key]
        stores = (
            (layer.conv_states, template.conv_states, "is_conv_states_initialized", "conv_states"),
            (layer.recurrent_states, template.recurrent_states, "is_recurrent_states_initialized", "recurrent_states"),
        )  # fmt: skip
        for target, source, flag, store in stores:
            if not getattr(template, flag)[key]:
                continue
            zeros = torch.zeros_like(source[key])
            parts = [
                getattr(row, store)[key] if getattr(row, flag)[key] and row.has_previous_state[key] else zeros
                for row in rows
            ]
            target[key] = torch.cat(parts, dim=0)
            getattr(layer, flag)[key] = True
        layer.has_previous_state[key] = True
