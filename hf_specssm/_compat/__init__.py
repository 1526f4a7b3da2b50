"""The one home of everything hf_specssm needs from transformers beyond its public API.

The rest of the package asks this package, never `transformers.__version__` or a private attribute, how to
reach a model's cache, which cache layers are recurrent, how to read and write their state, and which SSM
paths are exact for a model's mixers. Modules:

- `versions`: the supported transformers range and forward-signature facts;
- `recurrent`: recurrent cache layers, every read and write of their conv / SSM state;
- `attention`: attention cache layers (rollback, cropping hybrids, gathering kept positions);
- `mixers`: the patches of transformers' SSM mixers, each a context manager undone on exit;
- `admission`: what the probes found, readable from every layer, and the continuation probe;
- `probes`: first-use probes that admit each mixer family (`probes.mixer_support(model) -> MixerSupport`);
  it runs the package's own SSM paths, so it sits above `ssm/` and `cache` and is not imported here.
"""

from __future__ import annotations

import torch

from hf_specssm._compat import admission, attention, mixers, recurrent, versions
from hf_specssm._compat.attention import (
    attention_holds_tokens,
    cache_rollback_problem,
    crop_attention_part,
    crop_cache,
    enable_attention_rollback,
    grouped_query_attention,
    is_sliding_attention_layer,
    is_static_layer,
    keep_attention_positions,
    set_attention_tensors,
    static_capacity,
)
from hf_specssm._compat.mixers import (
    fixed_mixers,
    fused_kernels_active,
    has_instance_forward,
    install_forward,
    remove_forward,
    replaced_forwards,
    ssm_mixers,
    time_step_bounds,
)
from hf_specssm._compat.recurrent import (
    cache_layers,
    config_has_recurrent_layers,
    conv_inputs_without_update,
    conv_window,
    frozen_states,
    has_linear_layers,
    is_attention_layer,
    is_linear_layer,
    linear_state_slots,
    recurrent_state,
    reset_recurrent_part,
    stack_recurrent_rows,
    stored_conv_state,
    use_full_attention_in_hybrid_layers,
)
from hf_specssm._compat.versions import (
    MAX_TRANSFORMERS_EXCLUSIVE,
    MIN_TRANSFORMERS,
    TRANSFORMERS_VERSION,
    cache_kwarg_name,
    check_transformers_version,
    dropped_mask_length,
    forward_accepts,
    generation_defaults,
    is_stateful_model,
    normalize_attention_mask,
)

# Model types whose transformers forward restarts a multi-token scan from zeros, for callers that hold
# only a config; with the model at hand the probe decides (`multi_token_continuation_is_exact(model)`).
_ZERO_STATE_CONTINUATION_MODEL_TYPES = frozenset({"mamba", "falcon_mamba", "jamba"})

__all__ = [
    "MAX_TRANSFORMERS_EXCLUSIVE",
    "MIN_TRANSFORMERS",
    "TRANSFORMERS_VERSION",
    "admission",
    "attention",
    "attention_holds_tokens",
    "cache_kwarg_name",
    "cache_layers",
    "cache_rollback_problem",
    "check_transformers_version",
    "config_has_recurrent_layers",
    "conv_inputs_without_update",
    "conv_window",
    "crop_attention_part",
    "crop_cache",
    "dropped_mask_length",
    "enable_attention_rollback",
    "fixed_mixers",
    "forward_accepts",
    "frozen_states",
    "fused_kernels_active",
    "generation_defaults",
    "grouped_query_attention",
    "has_instance_forward",
    "has_linear_layers",
    "install_forward",
    "is_attention_layer",
    "is_linear_layer",
    "is_sliding_attention_layer",
    "is_stateful_model",
    "is_static_layer",
    "keep_attention_positions",
    "linear_state_slots",
    "mixers",
    "multi_token_continuation_is_exact",
    "normalize_attention_mask",
    "recurrent",
    "recurrent_state",
    "remove_forward",
    "replaced_forwards",
    "reset_recurrent_part",
    "set_attention_tensors",
    "ssm_mixers",
    "stack_recurrent_rows",
    "static_capacity",
    "stored_conv_state",
    "time_step_bounds",
    "use_full_attention_in_hybrid_layers",
    "versions",
]


def multi_token_continuation_is_exact(model_or_config: object) -> bool:
    """Whether a multi-token forward that starts from a cached recurrent state is exact without patches.

    Given the model, its mixers' continuation probe decides (`admission.continuation_mode(model)`). Given
    only a config, the answer is by model type: transformers' torch paths for Mamba v1, FalconMamba and
    Jamba start the selective scan from zeros (notes: transformers-5-internals.md §3).
    """
    if isinstance(model_or_config, torch.nn.Module):
        return admission.continuation_mode(model_or_config) == "native"
    model_type = getattr(model_or_config.get_text_config(decoder=True), "model_type", "")
    return model_type not in _ZERO_STATE_CONTINUATION_MODEL_TYPES
