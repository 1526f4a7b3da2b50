"""Attention cache layers: rollback, cropping the attention part of hybrids, filling and gathering keys.

Hybrid layers (`LinearAttentionAndFullAttentionLayer`) are both a linear layer and a `DynamicLayer`; their
`crop` also trims the conv window, so the attention part alone is reached through `DynamicLayer`'s
methods here.

Grouped-query attention without copies (`grouped_query_attention`): transformers' SDPA path repeats every
key and value head (`repeat_kv`, a copy of the whole cache per layer and call) for a multi-token query with
a mask, which is every verification; inside the context it passes `enable_gqa=True` instead, which on CPU
tensors gives bit-identical outputs without the copy.

Few queries over a cache (`grouped_query_attention` too): inside the same context, transformers' "sdpa"
attention function runs calls of up to `MAX_QUERIES` queries on CPU tensors as two grouped matrix
products where a measurement per shape class found them faster than torch's SDPA
(`hf_specssm.kernels.few_query_attention`); the entry is swapped in transformers' `AttentionInterface`
registry, which every model's attention layer reads per call.

Static layers (`StaticCache`, `cache_implementation="static"`) preallocate `[B, H, max_cache_len, D]` and
write at their private token counter `cumulative_length` (a tensor); they have no `crop`, so they are
rolled back here by zeroing the rejected slots and moving that counter back.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
import transformers.cache_utils
import transformers.integrations.sdpa_attention as sdpa_attention
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    QuantizedCache,
    QuantizedLayer,
    StaticLayer,
)
from transformers.modeling_utils import AttentionInterface

from hf_specssm._compat.overrides import entry_override, function_override
from hf_specssm._compat.recurrent import is_linear_layer
from hf_specssm.kernels.few_query_attention import MAX_QUERIES, PATH_CHOICE, attention_mode

# 5.23 puts every quantized layer (quanto, HQQ, fp8) under `BaseQuantizedLayer`; 5.17 has `QuantizedLayer` only
_QUANTIZED_LAYER = getattr(transformers.cache_utils, "BaseQuantizedLayer", QuantizedLayer)


# set while this thread runs a forward of ours that may skip `repeat_kv` (see `grouped_query_attention`)
_GROUPED_QUERY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "hf_specssm_grouped_query", default=False
)
_GQA_DECISION = "use_gqa_in_sdpa"
# 5.23 attends one query token per key/value head without copies (`pack_gqa`); 5.17 repeats there too
_PACKS_ONE_QUERY = callable(getattr(sdpa_attention, "pack_gqa", None))


def _skips_repeat(attention_mask: torch.Tensor | None, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether a call of transformers' SDPA attention that would repeat the key/value heads may pass
    `enable_gqa=True` instead: CPU tensors (on CUDA a mask with `enable_gqa` leaves the fused kernels),
    a 4D mask (without one transformers already uses `enable_gqa`), matching head dims, not under
    `torch.compile`, and more than one query row where transformers packs one query itself."""
    return (
        attention_mask is not None
        and attention_mask.dim() == 4
        and key.device.type == "cpu"
        and key.shape[-1] == value.shape[-1]
        and (attention_mask.shape[-2] > 1 or not _PACKS_ONE_QUERY)
        and not torch.compiler.is_compiling()
    )


def _gqa_decision(original: Callable) -> Callable:
    # 5.17-5.23 pass (attention_mask, key, value); older releases passed no value: take what comes
    def use_gqa_in_sdpa(attention_mask, key, *args, **kwargs):
        value = args[0] if args else kwargs.get("value", key)
        if _GROUPED_QUERY.get() and _skips_repeat(attention_mask, key, value):
            return True
        return original(attention_mask, key, *args, **kwargs)

    return use_gqa_in_sdpa


# keyword arguments of transformers' attention calls that the grouped products do not implement: a call
# carrying any of them (not None) keeps SDPA
_SDPA_ONLY_ARGUMENTS = ("position_bias", "softcap", "cache", "s_aux", "sinks")


def _few_query_problem(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    """Why a call of transformers' SDPA attention keeps its path rather than the grouped products, or
    `None` where they may serve it."""
    batch, heads, queries, dim = query.shape
    if query.device.type != "cpu" or torch.compiler.is_compiling():
        return "not a CPU tensor, or under torch.compile"
    if not 1 <= queries <= MAX_QUERIES:
        return f"{queries} queries"
    if key.dim() != 4 or key.shape[1] == 0 or heads % key.shape[1] or key.shape[-1] != dim:
        return "key heads or sizes the grouping does not cover"
    if value.shape[:3] != key.shape[:3] or not query.dtype == key.dtype == value.dtype:
        return "value shape or dtype"
    if key.shape[0] != batch:
        return "broadcast batch"
    if dropout or any(kwargs.get(name) is not None for name in _SDPA_ONLY_ARGUMENTS):
        return "dropout, a position bias, soft-capping, sinks or a paged cache"
    if attention_mask is None:
        # one query sees every key; several without a mask mean transformers' causal shortcut
        return None if queries == 1 else "several queries without a mask"
    if (
        attention_mask.dim() != 4
        or attention_mask.shape[-2:] != (queries, key.shape[2])
        or attention_mask.shape[0] not in (1, batch)
        or attention_mask.shape[1] not in (1, heads)
        or (attention_mask.dtype != torch.bool and not attention_mask.is_floating_point())
    ):
        return "a mask of another shape or kind"
    return None


def _few_query_sdpa(original: Callable) -> Callable:
    def sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, *args, **kwargs
    ):
        def transformers_path() -> tuple[torch.Tensor, None]:
            return original(module, query, key, value, attention_mask, dropout, scaling, *args, **kwargs)

        if (
            args
            or not _GROUPED_QUERY.get()
            or _few_query_problem(query, key, value, attention_mask, dropout, kwargs) is not None
        ):
            return transformers_path()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        output = PATH_CHOICE.attend(
            query, key, value, attention_mask, scale, lambda: transformers_path()[0], attention_mode()
        )
        return output, None

    return sdpa_attention_forward


@contextlib.contextmanager
def grouped_query_attention() -> Iterator[None]:
    """Inside this context, this thread's calls of transformers' SDPA attention over CPU tensors with a 4D
    mask pass `enable_gqa=True` to `scaled_dot_product_attention` rather than repeating each key/value
    head `num_key_value_groups` times (`repeat_kv`).

    Why: transformers repeats the heads whenever a mask is given and the query has more than one token
    (every verification; 5.17 also one-token steps that carry a mask, such as padded rows), copying the
    layer's whole KV cache per call. torch's CPU kernels attend a query head to its key/value head
    directly, and their outputs equal the repeated path's bit for bit (measured on torch 2.13;
    `tests/unit/test_grouped_query_attention.py` checks dtypes, masks, head counts and lengths on the torch
    it runs with). A k = 8 verification of Falcon-H1-0.5B (8 query heads over 2) at 512 tokens of context
    ran 4–6% faster, one of 6 drafts on Qwen2.5-Coder-1.5B 4% at 600 tokens and 7% at 1,500
    (docs/benchmarks.md).

    Calls of up to `kernels.few_query_attention.MAX_QUERIES` queries (verifications, one-token steps) run
    as two grouped matrix products per layer where a measurement on the first call of each shape class
    found that faster than torch's SDPA (bf16 on a CPU with bf16 matrix instructions, long caches):
    equal to SDPA to the dtype's rounding, not bit for bit. `HF_SPECSSM_FEW_QUERY_ATTENTION=sdpa` keeps
    SDPA, `=grouped` forces the products.

    Other threads, other attention implementations and GPU tensors keep transformers' path.
    """
    token = _GROUPED_QUERY.set(True)
    try:
        with (
            function_override([sdpa_attention], _GQA_DECISION, _gqa_decision),
            entry_override(AttentionInterface._global_mapping, "sdpa", _few_query_sdpa),
        ):
            yield
    finally:
        _GROUPED_QUERY.reset(token)


def is_sliding_attention_layer(layer: object) -> bool:
    """Whether a cache layer keeps only a sliding window of keys and values."""
    return isinstance(layer, DynamicSlidingWindowLayer)


def is_static_layer(layer: object) -> bool:
    """Whether a cache layer preallocates its keys (`StaticLayer` and its sliding-window / hybrid kinds)."""
    return isinstance(layer, StaticLayer)


def cache_rollback_problem(cache: Cache) -> str | None:
    """Why an attention cache cannot be rolled back after a verification, or `None` when it can.

    Dynamic layers and full-attention `StaticLayer`s can (static ones by zeroing the rejected slots and
    moving the token counter back). A static sliding window writes into a ring buffer, so rejected tokens
    overwrite keys a rollback would need again; other static kinds (indexed, hybrid with linear attention)
    are not handled; a quantized cache keeps most tokens quantized, out of reach of `crop`.
    """
    if isinstance(cache, QuantizedCache) or any(
        isinstance(layer, _QUANTIZED_LAYER) for layer in cache.layers
    ):
        return (
            "a quantized KV cache cannot be rolled back after a rejected draft (its quantized part is out of "
            "reach of crop); drop cache_implementation='quantized' (and any QuantizedCache in "
            "past_key_values)."
        )
    for layer in cache.layers:
        if is_static_layer(layer) and type(layer) is not StaticLayer:
            return (
                f"a static cache with {type(layer).__name__} layers cannot be rolled back after a rejected "
                "draft; drop cache_implementation='static' (and any StaticCache in past_key_values) to use a "
                "DynamicCache."
            )
    return None


def static_capacity(cache: Cache) -> int | None:
    """Tokens the static layers of `cache` can hold (the smallest `max_cache_len`), or `None` without any."""
    sizes = [layer.max_cache_len for layer in cache.layers if is_static_layer(layer)]
    return min(sizes) if sizes else None


def crop_cache(cache: Cache, tokens_to_remove: int) -> None:
    """Drop the last `tokens_to_remove` (>= 0) tokens of every layer: transformers' `crop` for dynamic
    layers, slot zeroing and a counter rollback for static full-attention layers."""
    if tokens_to_remove < 0:
        raise ValueError(f"tokens_to_remove must be >= 0, got {tokens_to_remove}.")
    for layer in cache.layers:
        if is_static_layer(layer):
            _crop_static_layer(layer, tokens_to_remove)
        else:
            layer.crop(-tokens_to_remove)


def _crop_static_layer(layer: StaticLayer, tokens_to_remove: int) -> None:
    if tokens_to_remove == 0 or not layer.is_initialized:
        return
    length = int(layer.cumulative_length)
    if tokens_to_remove > length:
        raise ValueError(f"cannot remove {tokens_to_remove} tokens, the static layer holds {length}.")
    # the rejected slots are masked by causality anyway; zeroing keeps the buffer equal to a fresh decode's
    layer.keys[:, :, length - tokens_to_remove : length].zero_()
    layer.values[:, :, length - tokens_to_remove : length].zero_()
    # in place: compiled graphs hold the counter's address
    layer.cumulative_length.sub_(tokens_to_remove)


def enable_attention_rollback(cache: Cache) -> None:
    """Make sliding-window attention layers keep enough history to be cropped after a verification.

    Full-attention layers can always be cropped. Sliding-window layers drop old keys as they go unless they
    record the past (then `crop` trims them back to the window). Linear layers are left alone: past
    recording there changes the decode path of the mixers.
    """
    for layer in cache.layers:
        if is_sliding_attention_layer(layer) and not is_linear_layer(layer):
            layer.activate_past_recording()


def attention_holds_tokens(layer: object) -> bool:
    """Whether an attention cache layer has keys for at least one token."""
    if not isinstance(layer, CacheLayerMixin) or not getattr(layer, "is_initialized", False):
        return False
    keys = getattr(layer, "keys", None)
    return keys is not None and keys.numel() > 0


def crop_attention_part(layer: object, tokens_to_remove: int) -> None:
    """transformers' `crop` on the attention part of a layer only (hybrids keep their conv window)."""
    if is_linear_layer(layer):
        DynamicLayer.crop(layer, tokens_to_remove)
    else:
        layer.crop(tokens_to_remove)


def set_attention_tensors(layer: object, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Initialise an empty attention layer and make `keys` / `values` `[B, H_kv, S, D]` its contents."""
    DynamicLayer.lazy_initialization(layer, keys, values)
    layer.keys, layer.values = keys, values


def keep_attention_positions(cache: Cache, positions: torch.Tensor) -> None:
    """Keep only sequence positions `positions` `[S']` of every initialised attention layer of `cache`.

    `Cache.crop` can only drop a suffix; a tree round keeps the prefix, the fed chain and one root-to-node
    path, so the keys and values are gathered along the sequence axis (dim 2) instead. Recurrent layers
    are left alone.

    Positions count from the first token the layer has seen. A sliding-window layer that has already
    dropped its oldest keys holds positions `[L − S, L)` only: kept positions before that are counted but
    have no keys to gather (they were outside the window anyway), and its token count becomes `S'`.

    Args:
        cache: any transformers `Cache`.
        positions: `[S']` ascending long positions to keep.
    """
    if positions.numel() > 1 and bool((positions[1:] <= positions[:-1]).any()):
        raise ValueError(f"positions must be strictly ascending, got {positions.tolist()}.")
    count = positions.numel()
    # strictly ascending and ending at count - 1: the leading run 0 … count - 1 (a tree's first path, or
    # nothing kept), which every layer keeps by a crop instead of a gather
    leading = count == 0 or int(positions[-1]) == count - 1
    for layer in cache.layers:
        if not attention_holds_tokens(layer):
            continue
        stored = layer.keys.shape[2]
        total = layer.get_seq_length() if isinstance(layer, DynamicSlidingWindowLayer) else stored
        if leading:
            kept = max(0, count - (total - stored))
            layer.keys = layer.keys[:, :, :kept]
            layer.values = layer.values[:, :, :kept]
        else:
            index = positions.to(layer.keys.device) - (total - stored)
            index = index[index >= 0]
            layer.keys = layer.keys.index_select(2, index)
            layer.values = layer.values.index_select(2, index)
        if isinstance(layer, DynamicSlidingWindowLayer):
            # the layer counts every token it has seen (it sizes the mask from that count)
            layer.cumulative_length = int(positions.numel())


def is_plain_attention_cache(cache: Cache) -> bool:
    """Whether every layer of `cache` is a plain `DynamicLayer` (full attention, no window, no recurrent
    part): the caches whose rows and columns `map_attention_tensors` and `concat_attention_rows` may edit."""
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def map_attention_tensors(cache: Cache, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace the keys and values `[B, H_kv, S, D]` of every initialised layer of a plain attention cache
    by `function(tensor)` (select rows, drop leading columns, pad columns on the left)."""
    for layer in cache.layers:
        if attention_holds_tokens(layer):
            layer.keys = function(layer.keys)
            layer.values = function(layer.values)


def concat_attention_rows(cache: Cache, other: Cache) -> None:
    """Append the rows of `other` to `cache`, both plain attention caches of the same model, aligned on
    their last column: the shorter one is padded with zero columns on the left (the caller masks them).

    `cache` holds `[B, H_kv, S, D]` per layer, `other` `[B', H_kv, S', D]`; afterwards `cache` holds
    `[B + B', H_kv, max(S, S'), D]`.
    """
    for layer, extra in zip(cache.layers, other.layers, strict=True):
        if not attention_holds_tokens(extra):
            continue
        if not attention_holds_tokens(layer):
            set_attention_tensors(layer, extra.keys, extra.values)
            continue
        width = max(layer.keys.shape[2], extra.keys.shape[2])
        layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(extra.keys, width)])
        layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(extra.values, width)])


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    if missing <= 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))
