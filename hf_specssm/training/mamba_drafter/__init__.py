"""A Mamba2 drafter for a target's tokenizer, trained offline: model, data, distillation, training, CLI.

`MambaDrafterForCausalLM` (registered with `AutoModelForCausalLM`) drafts over a reduced vocabulary and
returns logits over the target's full vocabulary; `hf-specssm train-mamba-drafter` builds one.
"""

from hf_specssm.drafters.mamba import MambaDrafterConfig, MambaDrafterForCausalLM

__all__ = ["MambaDrafterConfig", "MambaDrafterForCausalLM"]
