"""The reduced-vocabulary Mamba2 drafter, registered with transformers' Auto classes.

The classes live in two self-contained modules that double as the remote code of every drafter folder
(`configuration_mamba_drafter.py`, `modeling_mamba_drafter.py`; see the latter for the model). Importing
this module (`import hf_specssm` does) registers them with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, so a drafter folder also loads with plain `from_pretrained`, without
`trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_specssm.drafters.configuration_mamba_drafter import MambaDrafterConfig
from hf_specssm.drafters.modeling_mamba_drafter import (
    MAP_NAME,
    OTHER_INDEX,
    MambaDrafterForCausalLM,
    check_vocabulary_map,
)


def register_auto_classes() -> None:
    """Register the drafter with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` (idempotent)."""
    AutoConfig.register(MambaDrafterConfig.model_type, MambaDrafterConfig, exist_ok=True)
    AutoModel.register(MambaDrafterConfig, MambaDrafterForCausalLM, exist_ok=True)
    AutoModelForCausalLM.register(MambaDrafterConfig, MambaDrafterForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "MAP_NAME",
    "OTHER_INDEX",
    "MambaDrafterConfig",
    "MambaDrafterForCausalLM",
    "check_vocabulary_map",
    "register_auto_classes",
]
