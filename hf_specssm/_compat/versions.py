"""The supported transformers range, and the forward-signature facts that differ between model classes."""

from __future__ import annotations

import inspect
from functools import cache

import torch
import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("5.24.0")


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


def dropped_mask_length(generation_config: object | None) -> int | None:
    """The length of an all-ones `attention_mask` that `generate` dropped before the decoding loop.

    5.23 removes such a mask from the model kwargs and keeps its length in the private
    `generation_config._mask_length`; 5.17 passes the mask on (then this is `None`).
    """
    recorded = getattr(generation_config, "_mask_length", None)
    return recorded if isinstance(recorded, int) else None
