"""A feature-conditioned Mamba drafter: its own recurrent state plus the target's last hidden state.

`FeatureDrafter` is `ModelDrafter` (state kept across rounds, chains, trees by forking the state along the
batch axis, rollback to the accepted prefix) for a `MambaDrafterForCausalLM` whose config has a
`feature_size`. The loop hands it the target's last-layer hidden state at the position whose logits chose
the last committed token (`observe_target_hidden`); every forward of the next round adds that feature and
the draft depth to the drafter's logits (`MambaDrafterForCausalLM.feature_bias`). Before the first
verification no hidden state exists yet, and the drafter drafts from its tokens alone.
"""

from __future__ import annotations

import torch

from hf_specssm.drafters.model import ModelDrafter


class FeatureDrafter(ModelDrafter):
    """Drafts with a feature-conditioned `MambaDrafterForCausalLM` (`model.reads_target_hidden`).

    Args:
        model: the drafter model (its `config.feature_size` must equal the target's hidden size).
        **options: `ModelDrafter` options (`num_draft_tokens`, `tree_shape`, `tree_policy`, …).

    Raises:
        ValueError: the model is not feature-conditioned.
    """

    wants_target_hidden = True
    # without hidden states (batched targets) it drafts from its tokens, as before the first verification
    target_hidden_optional = True

    def __init__(self, model, config=None, tree_policy=None, **options) -> None:
        if not getattr(model, "reads_target_hidden", False):
            raise ValueError(
                f"{type(model).__name__} does not read the target's hidden state (config.feature_size is "
                "unset): draft with ModelDrafter instead."
            )
        super().__init__(model, config=config, tree_policy=tree_policy, **options)
        self._feature: torch.Tensor | None = None

    def validate_for(self, target) -> None:
        """Also refuse a target whose hidden size is not the drafter's `feature_size`."""
        super().validate_for(target)
        hidden = target.config.get_text_config(decoder=True).hidden_size
        if hidden != self.model.config.feature_size:
            raise ValueError(
                f"the drafter reads target hidden states of size {self.model.config.feature_size} but the "
                f"target's hidden size is {hidden}: this drafter was trained for another target."
            )

    def begin(self, input_ids: torch.Tensor) -> None:
        super().begin(input_ids)
        self._feature = None

    def end(self) -> None:
        super().end()
        self._feature = None

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        """Keep the target's hidden state `[1, F]` for the next round's forwards."""
        self._feature = hidden.detach().to(device=self.model.device, dtype=self.model.dtype)

    def _extra_inputs(self, rows: int, depth: int) -> dict:
        if self._feature is None:
            return {}
        return {"target_features": self._feature[:, None].expand(rows, 1, -1), "draft_depth": depth}
