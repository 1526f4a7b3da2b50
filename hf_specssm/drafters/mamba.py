"""A Mamba2 drafter over a reduced vocabulary that speaks the target's full vocabulary.

The drafter's embedding and LM head cover only the `V_d - 1` target tokens it was trained on (the most
frequent ones) plus one "other" slot at index 0. From the outside it is an ordinary causal LM over the
target's vocabulary:

    target ids [B, T] → draft ids (`target_to_draft`, unknown → 0) → Mamba2 → draft logits [B, T, V_d]
    → full logits [B, T, V] with each draft token's logit at its target id and the dtype's lowest value
      everywhere else (the "other" slot included)

so the draft distribution is defined over the full vocabulary with exact zeros outside the draft
vocabulary, which is what keeps speculative sampling lossless. Everything else (cache, mixers, state
rollback, tree forking) is transformers' `Mamba2ForCausalLM`.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM
from transformers.modeling_outputs import ModelOutput

OTHER_INDEX = 0


class MambaDrafterConfig(Mamba2Config):
    """`Mamba2Config` plus the target vocabulary the draft vocabulary maps into.

    Args:
        target_vocab_size: size of the target's vocabulary (its logits' last dimension).
        tokenizer_reference: the tokenizer the drafter was trained with (a Hub id or a name), for the
            model card and for users; the drafter itself never loads it.
        vocab_size: the draft vocabulary size `V_d`, the "other" slot included.
        **kwargs: `Mamba2Config` fields (`hidden_size`, `num_hidden_layers`, `num_heads`, `head_dim`, …).
    """

    model_type = "hf_specssm_mamba_drafter"

    def __init__(
        self,
        target_vocab_size: int = 151936,
        tokenizer_reference: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if target_vocab_size < self.vocab_size - 1:
            raise ValueError(
                f"target_vocab_size ({target_vocab_size}) must cover the draft vocabulary "
                f"({self.vocab_size} entries, one of them the 'other' slot)."
            )
        self.target_vocab_size = target_vocab_size
        self.tokenizer_reference = tokenizer_reference


class MambaDrafterForCausalLM(Mamba2ForCausalLM):
    """Mamba2 over a draft vocabulary; takes and returns target-vocabulary ids and logits.

    Buffers:
        draft_to_target: `[V_d]` target id of each draft id (`-1` at the "other" slot); saved with the
            weights.
    `target_to_draft` (`[V]`, the inverse map, 0 outside the draft vocabulary) is derived from it.
    """

    config_class = MambaDrafterConfig

    def __init__(self, config: MambaDrafterConfig) -> None:
        super().__init__(config)
        self.register_buffer(
            "draft_to_target", torch.full((config.vocab_size,), -1, dtype=torch.long), persistent=True
        )
        # derived from draft_to_target on first use (and again whenever that buffer changes or moves)
        self._target_to_draft: torch.Tensor | None = None
        self._lookup_key: tuple | None = None

    @property
    def output_vocab_size(self) -> int:
        """The vocabulary of the logits this model returns: the target's."""
        return self.config.target_vocab_size

    def set_draft_vocabulary(self, target_ids: torch.Tensor) -> None:
        """Use the target tokens `target_ids` `[V_d - 1]` (distinct, in draft-id order from 1) as the vocabulary."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long).flatten()
        if target_ids.numel() != self.config.vocab_size - 1:
            raise ValueError(
                f"expected {self.config.vocab_size - 1} target ids (vocab_size minus the 'other' slot), got "
                f"{target_ids.numel()}."
            )
        if target_ids.unique().numel() != target_ids.numel():
            raise ValueError("the draft vocabulary repeats a target id.")
        if int(target_ids.min()) < 0 or int(target_ids.max()) >= self.config.target_vocab_size:
            raise ValueError(f"target ids must lie in [0, {self.config.target_vocab_size}).")
        mapping = torch.cat([target_ids.new_tensor([-1]), target_ids]).to(self.draft_to_target.device)
        self.draft_to_target.copy_(mapping)

    @property
    def target_to_draft(self) -> torch.Tensor:
        """`[V]` draft id of each target id (0, the 'other' slot, outside the draft vocabulary)."""
        source = self.draft_to_target
        key = (source.data_ptr(), source._version, source.device)
        if self._target_to_draft is None or self._lookup_key != key:
            lookup = torch.zeros(self.config.target_vocab_size, dtype=torch.long, device=source.device)
            known = source >= 0
            lookup[source[known]] = torch.arange(source.numel(), device=source.device)[known]
            self._target_to_draft, self._lookup_key = lookup, key
        return self._target_to_draft

    def to_draft_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Target ids `[...]` → draft ids `[...]` (tokens outside the draft vocabulary → the 'other' slot)."""
        return self.target_to_draft[input_ids]

    def draft_logits(self, draft_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits over the draft vocabulary `[B, T, V_d]` for draft ids `[B, T]` (the training path)."""
        return super().forward(input_ids=draft_ids, **kwargs).logits

    def expand_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits `[..., V_d]` → target-vocabulary logits `[..., V]` (lowest value outside)."""
        full = logits.new_full(
            (*logits.shape[:-1], self.config.target_vocab_size), torch.finfo(logits.dtype).min
        )
        known = self.draft_to_target[1:]
        full[..., known] = logits[..., 1:]
        return full

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_params=None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> ModelOutput:
        """`Mamba2ForCausalLM.forward` in target ids: `input_ids` `[B, T]` → `logits` `[B, T', V]`.

        `labels` (target ids, `-100` ignored) give the cross-entropy over the draft vocabulary, with
        tokens outside it counted as the 'other' slot.
        """
        draft_ids = self.to_draft_ids(input_ids) if input_ids is not None else None
        output = super().forward(
            input_ids=draft_ids, inputs_embeds=inputs_embeds, cache_params=cache_params, **kwargs
        )
        if labels is not None:
            draft_labels = torch.where(labels < 0, labels, self.to_draft_ids(labels.clamp(min=0)))
            output.loss = torch.nn.functional.cross_entropy(
                output.logits[:, :-1].flatten(0, 1).float(), draft_labels[:, 1:].flatten(), ignore_index=-100
            )
        output.logits = self.expand_logits(output.logits)
        return output


AutoConfig.register(MambaDrafterConfig.model_type, MambaDrafterConfig)
AutoModelForCausalLM.register(MambaDrafterConfig, MambaDrafterForCausalLM)
