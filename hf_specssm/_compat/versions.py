"""The tested transformers range, and the forward-signature facts that differ between model classes."""

from __future__ import annotations

import inspect
import warnings
from functools import cache
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig

TRANSFORMERS_VERSION = Version(transformers.__version__)
# The one place the tested range is written: the import-time warning, the docs and the tests read it here.
MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("5.24.0")


def check_transformers_version(installed: Version | str | None = None) -> None:
    """Warn (`UserWarning`) when transformers is outside the tested range; never refuse to import.

    Outside the range the package may still work (it reaches transformers' internals only through
    `_compat`, whose probes fall back to exact slower paths), so the user gets a warning naming the tested
    range and the installed version instead of an `ImportError`.

    Args:
        installed: the version to check (default: the installed transformers).
    """
    version = TRANSFORMERS_VERSION if installed is None else Version(str(installed))
    if not MIN_TRANSFORMERS <= version < MAX_TRANSFORMERS_EXCLUSIVE:
        warnings.warn(
            f"hf_specssm is tested with transformers >= {MIN_TRANSFORMERS} and < {MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"the installed version is {version}. It may work, but is untested: if something fails, install a "
            f"tested version (pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}').",
            UserWarning,
            stacklevel=3,
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


@cache
def _generation_defaults() -> dict[str, Any]:
    return dict(GenerationConfig._get_default_generation_params())


def generation_defaults() -> dict[str, Any]:
    """The values `generate` gives the generation settings nobody set (`num_assistant_tokens=20`,
    `num_assistant_tokens_schedule="constant"`, `assistant_confidence_threshold=0.4`, …).

    5.17 and 5.23 leave every `GenerationConfig()` field `None` and fill these in when a call is prepared,
    from the private `GenerationConfig._get_default_generation_params()`.
    """
    return dict(_generation_defaults())
