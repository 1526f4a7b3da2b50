"""A drafter backed by a transformers causal LM: Mamba, Mamba2, FalconMamba, hybrids or Transformers."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, Drafter, DraftSampler

# Recurrent drafters step pending tokens one at a time up to this many: a Mamba2 multi-token forward is
# padded to `chunk_size` and costs far more than a couple of single steps.
_MAX_STEPWISE_CATCH_UP = 4


class ModelDrafter(Drafter):
    """Drafts with any transformers causal LM, keeping its cache across rounds.

    The drafter never re-reads the prefix: each round it consumes only the committed tokens it has not
    seen (after the first round: the accepted tokens it did not feed itself, plus the target's token),
    then feeds its own drafts one by one. Before each draft step the recurrent state is checkpointed, so
    after verification the state is rolled back to exactly the accepted prefix (conv and SSM state for
    recurrent layers, a crop for attention layers) without recomputation.

    Args:
        model: a causal LM such as `MambaForCausalLM`, `Mamba2ForCausalLM`, `FalconMambaForCausalLM`,
            a hybrid (`BambaForCausalLM`, …) or any Transformer (`LlamaForCausalLM`, …).
        config: draft-length options (default `DraftConfig()`).
        **options: shorthand for `DraftConfig` fields, e.g. `ModelDrafter(m, num_draft_tokens=4,
            schedule="constant")`.
    """

    def __init__(self, model: PreTrainedModel, config: DraftConfig | None = None, **options) -> None:
        if config is not None and options:
            raise ValueError("pass either `config` or DraftConfig fields as keyword arguments, not both.")
        super().__init__(config if config is not None else DraftConfig(**options))
        _check_causal_lm(model, role="drafter")
        self.model = model
        self._cache_name = _compat.cache_kwarg_name(model)
        self._pass_positions = _compat.forward_accepts(model, "position_ids")
        self._pass_logits_to_keep = _compat.forward_accepts(model, "logits_to_keep")
        self._exact_continuation = _compat.multi_token_continuation_is_exact(model.config)
        self.cache: ForkableCache | None = None
        self._round_start = 0
        self._round_drafted = 0

    @property
    def vocab_size(self) -> int:
        return self.model.config.get_text_config(decoder=True).vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def begin(self, input_ids: torch.Tensor) -> None:
        self.cache = ForkableCache(self.model.config)
        self._round_start = 0
        self._round_drafted = 0

    def end(self) -> None:
        self.cache = None

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run `tokens` `[1, T]` through the model from the cache; return the last logits `[1, V]` (fp32)."""
        start = self.cache.seen_tokens
        kwargs = {self._cache_name: self.cache, "use_cache": True}
        if self._pass_positions:
            kwargs["position_ids"] = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = self.model(input_ids=tokens, **kwargs).logits[:, -1].float()
        self.cache.advance(tokens.shape[1])
        return logits

    def _consume(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed committed tokens `[1, T]` the drafter has not seen; return the next-token logits `[1, V]`."""
        stepwise = self.cache.seen_tokens > 0 and self.cache.has_recurrent_state
        # Multi-token forwards from a state are exact only for some mixers; short catch-ups are cheaper
        # stepwise anyway.
        if stepwise and (not self._exact_continuation or tokens.shape[1] <= _MAX_STEPWISE_CATCH_UP):
            logits = None
            for position in range(tokens.shape[1]):
                logits = self._forward(tokens[:, position : position + 1])
            return logits
        return self._forward(tokens)

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        if self.cache is None:
            raise RuntimeError("call begin() before draft().")
        pending = input_ids[:, self.cache.seen_tokens :]
        if pending.shape[1] == 0:
            raise RuntimeError(
                "the drafter has already consumed every committed token; commit() was skipped."
            )
        logits = self._consume(pending)
        self._round_start = self.cache.seen_tokens
        self._round_drafted = num_tokens
        tokens, probs = [], []
        sequence = input_ids
        for step in range(num_tokens):
            token, token_probs = sampler.choose(sequence, logits)
            tokens.append(token)
            probs.append(token_probs)
            if step == num_tokens - 1:
                break
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            self.cache.checkpoint()
            logits = self._forward(token[:, None])
        draft_tokens = torch.stack(tokens, dim=1) if tokens else input_ids.new_empty((input_ids.shape[0], 0))
        draft_probs = torch.stack(probs, dim=1) if probs and probs[0] is not None else None
        return Draft(tokens=draft_tokens, probs=draft_probs)

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        if self.cache is None:
            raise RuntimeError("call begin() before commit().")
        if self._round_drafted > 0:
            # The cache holds the round's first `drafted - 1` drafts; keep the accepted ones among them.
            keep = self._round_start + min(num_accepted, self._round_drafted - 1)
            self.cache.rollback_to(keep)
        self.cache.clear_checkpoints()
        self._round_drafted = 0


def _check_causal_lm(model: object, role: str) -> None:
    """Raise `ValueError` unless `model` is a decoder-only transformers LM with a cache."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"the {role} must be a transformers PreTrainedModel or a hf_specssm Drafter, got {type(model).__name__}."
        )
    if model.config.is_encoder_decoder:
        raise ValueError(
            f"the {role} must be a decoder-only causal LM; {type(model).__name__} is encoder-decoder."
        )
    if model.get_output_embeddings() is None or not model.can_generate():
        raise ValueError(
            f"the {role} must be a causal LM with a language-modelling head; got {type(model).__name__}."
        )
    _compat.cache_kwarg_name(model)


def as_drafter(assistant: object) -> Drafter:
    """Wrap `assistant_model` in a drafter: a `Drafter` is used as is, a causal LM gets `ModelDrafter` defaults."""
    if isinstance(assistant, Drafter):
        return assistant
    if isinstance(assistant, PreTrainedModel):
        return ModelDrafter(assistant)
    raise ValueError(
        f"assistant_model must be a transformers causal LM or a hf_specssm Drafter, got {type(assistant).__name__}."
    )
