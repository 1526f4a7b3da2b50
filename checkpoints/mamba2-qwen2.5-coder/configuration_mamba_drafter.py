"""Configuration of the reduced-vocabulary Mamba2 drafter: `Mamba2Config` plus the target's vocabulary.

This module and `modeling_mamba_drafter.py` import nothing from hf_specssm: `save_pretrained` copies them
next to the weights as the folder's remote code (with `auto_map` in `config.json`), so the folder loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where hf_specssm is not installed.
`tests/drafters/test_hub_remote_code.py` keeps the shipped folders' copies equal to these files.
"""

from __future__ import annotations

from transformers import Mamba2Config


class MambaDrafterConfig(Mamba2Config):
    """`Mamba2Config` plus the target vocabulary the draft vocabulary maps into.

    Args:
        target_vocab_size: size of the target's vocabulary (its logits' last dimension).
        tokenizer_reference: the tokenizer the drafter was trained with (a Hub id or a name), for the
            model card and for users; the drafter itself never loads it.
        feature_size: the target's hidden size `F` for a *feature-conditioned* drafter, which also reads
            the target's last hidden state at the last accepted position; `None` (default) for a drafter
            that reads tokens only.
        max_draft_depth: feature-conditioned drafters learn one offset per draft depth (how many of its
            own tokens the drafter has fed since the target's hidden state); deeper drafts use the last.
        feature_mlp_size: the width of a residual MLP a feature-conditioned drafter applies to its LM
            head's input after adding the feature terms (`x + W_down · silu(W_up · x)`), so the target's
            hidden state and the drafter's own state combine non-linearly; `None` (default): no MLP.
        **kwargs: `Mamba2Config` fields: `vocab_size` is the draft vocabulary size `V_d`, the "other" slot
            included; `hidden_size`, `num_hidden_layers`, `num_heads`, `head_dim`, ….
    """

    model_type = "hf_specssm_mamba_drafter"

    def __init__(
        self,
        target_vocab_size: int = 151936,
        tokenizer_reference: str | None = None,
        feature_size: int | None = None,
        max_draft_depth: int = 8,
        feature_mlp_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if feature_size is not None and feature_size < 1:
            raise ValueError(f"feature_size must be a positive hidden size or None, got {feature_size}.")
        if max_draft_depth < 1:
            raise ValueError(f"max_draft_depth must be >= 1, got {max_draft_depth}.")
        if feature_mlp_size is not None and (feature_mlp_size < 1 or feature_size is None):
            raise ValueError(
                f"feature_mlp_size must be a positive width on a feature-conditioned drafter (feature_size set), "
                f"got feature_mlp_size={feature_mlp_size}, feature_size={feature_size}."
            )
        self.feature_size = feature_size
        self.feature_mlp_size = feature_mlp_size
        self.max_draft_depth = max_draft_depth
        if target_vocab_size < self.vocab_size - 1:
            raise ValueError(
                f"target_vocab_size ({target_vocab_size}) must cover the draft vocabulary "
                f"({self.vocab_size} entries, one of them the 'other' slot)."
            )
        self.target_vocab_size = target_vocab_size
        self.tokenizer_reference = tokenizer_reference


# `save_pretrained` writes this module next to the config, and `auto_map["AutoConfig"]` naming it
MambaDrafterConfig.register_for_auto_class()
