"""hf_specssm: lossless speculative decoding with and for state-space models in Hugging Face transformers.

Quick start:
    >>> import hf_specssm
    >>> hf_specssm.enable(target)
    >>> out = target.generate(input_ids, assistant_model=mamba_drafter, max_new_tokens=64)
"""

from hf_specssm._compat import check_transformers_version

check_transformers_version()

from hf_specssm.cache import CacheSnapshot, ForkableCache  # noqa: E402
from hf_specssm.config import DraftConfig  # noqa: E402
from hf_specssm.drafters import (  # noqa: E402
    ContextCopyDrafter,
    Draft,
    Drafter,
    FeatureDrafter,
    ModelDrafter,
    NgramTableDrafter,
    PromptLookupDrafter,
    RoundPlan,
    TreeDrafter,
)
from hf_specssm.drafters.mamba import MambaDrafterConfig, MambaDrafterForCausalLM  # noqa: E402
from hf_specssm.drafters.redrafter import ReDrafterConfig, ReDrafterDrafter, ReDrafterHead  # noqa: E402
from hf_specssm.generation import (  # noqa: E402
    SpeculativeDecoderOnlyOutput,
    enable,
    generate,
    is_enabled,
    speculative_generate,
)
from hf_specssm.kernels.packed_linear import PackedLinears, pack_linears  # noqa: E402
from hf_specssm.policies.tree_shape import DynamicTreePolicy, UCBTreePolicy  # noqa: E402
from hf_specssm.shipped import shipped_drafter_path  # noqa: E402
from hf_specssm.ssm.lean_step import lean_steps  # noqa: E402
from hf_specssm.stats import SpeculationStats  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CacheSnapshot",
    "ContextCopyDrafter",
    "Draft",
    "DraftConfig",
    "Drafter",
    "DynamicTreePolicy",
    "FeatureDrafter",
    "ForkableCache",
    "MambaDrafterConfig",
    "MambaDrafterForCausalLM",
    "ModelDrafter",
    "NgramTableDrafter",
    "PackedLinears",
    "PromptLookupDrafter",
    "ReDrafterConfig",
    "ReDrafterDrafter",
    "ReDrafterHead",
    "RoundPlan",
    "SpeculationStats",
    "SpeculativeDecoderOnlyOutput",
    "TreeDrafter",
    "UCBTreePolicy",
    "__version__",
    "enable",
    "generate",
    "is_enabled",
    "lean_steps",
    "pack_linears",
    "shipped_drafter_path",
    "speculative_generate",
]
