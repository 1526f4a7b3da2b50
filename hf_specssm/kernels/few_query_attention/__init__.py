"""Attention of a few queries over a KV cache on CPU as grouped matrix products (see README.md).

Used inside our forwards by `_compat.grouped_query_attention()`, which routes transformers' SDPA calls of
verifications and one-token steps here; `PATH_CHOICE` keeps which path each shape class measured faster.
"""

import os

from hf_specssm.kernels.few_query_attention.grouped import (
    MAX_QUERIES,
    MODES,
    Measurement,
    PathChoice,
    grouped_attention,
    shape_class,
)

#: environment variable naming the path: "auto" (measured per shape class, the default), "grouped", "sdpa"
ENVIRONMENT_SWITCH = "HF_SPECSSM_FEW_QUERY_ATTENTION"
#: the process-wide choice of path per shape class
PATH_CHOICE = PathChoice()


def attention_mode() -> str:
    """The path `ENVIRONMENT_SWITCH` asks for (`"auto"` when unset).

    Raises:
        ValueError: the variable names no path of `MODES`.
    """
    mode = os.environ.get(ENVIRONMENT_SWITCH, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENVIRONMENT_SWITCH}={mode!r} is not a path; set it to one of {', '.join(MODES)}.")
    return mode


__all__ = [
    "ENVIRONMENT_SWITCH",
    "MAX_QUERIES",
    "MODES",
    "PATH_CHOICE",
    "Measurement",
    "PathChoice",
    "attention_mode",
    "grouped_attention",
    "shape_class",
]
