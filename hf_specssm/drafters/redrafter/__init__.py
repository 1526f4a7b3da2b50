"""ReDrafter (arXiv 2403.09919): recurrent draft heads on the target's own hidden state.

- `ReDrafterConfig` / `ReDrafterHead`: the head, a transformers model (`save_pretrained`,
  `from_pretrained`, `push_to_hub`, `AutoModel.from_pretrained`), sharing the target's embedding. A saved
  folder carries the head's code (`configuration.py`, `modeling.py`, `card.py`, which import nothing from
  hf_specssm) and `auto_map`, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it
  where hf_specssm is not installed.
- `beam_search`, `beams_to_tree`: beam search with carried recurrent states; beams merged into one prefix
  tree so the target verifies each unique token once (dynamic tree attention).
- `ReDrafterDrafter`: the head as a drafter for `generate(..., assistant_model=...)`.
- `hf_specssm.training.redrafter.training`: train a head for a target (also `hf-specssm train-redrafter`).

Importing this package registers `ReDrafterConfig` and `ReDrafterHead` with transformers' `AutoConfig`,
`AutoModel` and `AutoModelForCausalLM` (model type `"redrafter"`), as transformers' own model packages do on
import.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_specssm.drafters.redrafter.beams import Beams, BeamTree, beam_search, beams_to_tree
from hf_specssm.drafters.redrafter.card import model_card, write_model_card
from hf_specssm.drafters.redrafter.configuration import ReDrafterConfig
from hf_specssm.drafters.redrafter.drafter import ReDrafterDrafter
from hf_specssm.drafters.redrafter.modeling import ReDrafterHead, ReDrafterOutput, ResidualBlock


def register_auto_classes() -> None:
    """Register the head with `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` (idempotent): a head
    folder loads as users load drafters, and `assistant_model=` drafts with it."""
    AutoConfig.register(ReDrafterConfig.model_type, ReDrafterConfig, exist_ok=True)
    AutoModel.register(ReDrafterConfig, ReDrafterHead, exist_ok=True)
    AutoModelForCausalLM.register(ReDrafterConfig, ReDrafterHead, exist_ok=True)


register_auto_classes()

__all__ = [
    "BeamTree",
    "Beams",
    "ReDrafterConfig",
    "ReDrafterDrafter",
    "ReDrafterHead",
    "ReDrafterOutput",
    "ResidualBlock",
    "beam_search",
    "beams_to_tree",
    "model_card",
    "register_auto_classes",
    "write_model_card",
]
