"""Drafters: objects that propose tokens for the target to verify."""

from hf_specssm.drafters.base import Draft, Drafter, DraftSampler
from hf_specssm.drafters.model import ModelDrafter, as_drafter

__all__ = ["Draft", "DraftSampler", "Drafter", "ModelDrafter", "as_drafter"]
