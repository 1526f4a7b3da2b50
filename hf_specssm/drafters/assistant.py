"""What `assistant_model=` becomes: the drafter kind that fits the model users pass."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Drafter
from hf_specssm.drafters.feature import FeatureDrafter
from hf_specssm.drafters.model import ModelDrafter


def as_drafter(assistant: object, config: DraftConfig | None = None) -> Drafter:
    """Wrap `assistant_model` in a drafter: a `Drafter` is used as is, a ReDrafter head gets
    `ReDrafterDrafter`, a feature-conditioned Mamba drafter gets `FeatureDrafter`, any other causal LM (or
    mamba-ssm's `MambaLMHeadModel`) `ModelDrafter`, each with draft options `config` (default
    `DraftConfig()`; a ReDrafter head keeps its own chain length unless assisted-decoding settings set
    another)."""
    if isinstance(assistant, Drafter):
        return assistant
    if getattr(getattr(assistant, "config", None), "model_type", None) == "redrafter":
        # a ReDrafter head: beam search on the target's hidden state (attached when generate starts); its
        # own draft length unless assisted-decoding settings asked for another
        from hf_specssm.drafters.redrafter import ReDrafterDrafter

        own = config is None or config == DraftConfig()
        return ReDrafterDrafter(assistant, config=None if own else config)
    if isinstance(assistant, PreTrainedModel):
        if getattr(assistant, "reads_target_hidden", False):
            return FeatureDrafter(assistant, config=config)
        return ModelDrafter(assistant, config=config)
    if type(assistant).__name__ == "MambaLMHeadModel":
        # mamba-ssm's own model: drafted through its transformers twin (same weights)
        return drafter_from_mamba_ssm(assistant, config=config)
    raise ValueError(
        f"assistant_model must be a transformers causal LM or a hf_specssm Drafter, got {type(assistant).__name__}."
    )


def drafter_from_mamba_ssm(model: torch.nn.Module, **options) -> ModelDrafter:
    """A `ModelDrafter` over the transformers twin of a mamba-ssm `MambaLMHeadModel`
    (`hf_specssm.drafters.mamba_ssm.to_transformers`).

    Args:
        model: the `MambaLMHeadModel`.
        **options: `ModelDrafter` options (`num_draft_tokens`, `tree_shape`, …).
    """
    from hf_specssm.drafters.mamba_ssm import to_transformers

    return ModelDrafter(to_transformers(model), **options)
