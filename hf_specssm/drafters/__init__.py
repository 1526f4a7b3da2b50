"""Drafters: objects that propose tokens for the target to verify."""

from hf_specssm.drafters.assistant import as_drafter, drafter_from_mamba_ssm
from hf_specssm.drafters.base import Draft, Drafter, DraftSampler, RoundOutcome, RoundPlan, TreeDrafter
from hf_specssm.drafters.copy import ContextCopyDrafter
from hf_specssm.drafters.feature import FeatureDrafter
from hf_specssm.drafters.model import ModelDrafter
from hf_specssm.drafters.ngram import NgramTableDrafter, PromptLookupDrafter

__all__ = [
    "ContextCopyDrafter",
    "Draft",
    "DraftSampler",
    "Drafter",
    "FeatureDrafter",
    "ModelDrafter",
    "NgramTableDrafter",
    "PromptLookupDrafter",
    "RoundOutcome",
    "RoundPlan",
    "TreeDrafter",
    "as_drafter",
    "drafter_from_mamba_ssm",
]
