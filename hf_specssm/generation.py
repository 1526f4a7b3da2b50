"""The speculative decoding loop and the ways users reach it from `model.generate`.

One round reads like the papers: draft → verify → accept → commit. The loop is exposed three ways:

- `enable(model)`: after it, `model.generate(ids, assistant_model=drafter, ...)` runs this loop;
- `speculative_generate`: a `custom_generate` callable (`model.generate(ids, custom_generate=
  speculative_generate, drafter=drafter)`);
- the Hub-style `custom_generate/` folder at the repository root.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_specssm import _compat
from hf_specssm.decoding.round import Row, SpeculativeLoop
from hf_specssm.drafters import Drafter, as_drafter
from hf_specssm.drafters.model import _check_causal_lm
from hf_specssm.drafters.ngram import PromptLookupDrafter
from hf_specssm.inputs import validate_generate_inputs
from hf_specssm.stats import SpeculationStats
from hf_specssm.targets import make_target

_ENABLED_FLAG = "_hf_specssm_enabled"


@dataclass
class SpeculativeDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """transformers' `GenerateDecoderOnlyOutput` plus what speculative decoding did.

    Attributes:
        speculation_stats: rounds, accepted lengths, drafted tokens and timings of this call.
    """

    speculation_stats: SpeculationStats | None = None


def _validate_call(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    generation_config: GenerationConfig,
    model_kwargs: dict,
    drafter: Drafter,
) -> None:
    """Raise `ValueError` for every input the loop does not handle, before anything is touched."""
    _check_causal_lm(model, role="target")
    validate_generate_inputs(
        model, input_ids, model_kwargs, generation_config, drafter_model=getattr(drafter, "model", None)
    )
    if generation_config.num_return_sequences > 1:
        raise ValueError("speculative decoding returns one sequence per prompt: set num_return_sequences=1.")
    if generation_config.num_beams > 1:
        raise ValueError("speculative decoding does not combine with beam search: set num_beams=1.")
    if (
        input_ids.shape[0] == 1
        and _compat.normalize_attention_mask(model_kwargs.get("attention_mask")) is not None
    ):
        raise ValueError("the prompt's attention_mask masks tokens; pass the prompt without padding.")
    if input_ids.shape[0] > 1 and (generation_config.output_scores or generation_config.output_logits):
        raise ValueError("output_scores / output_logits are available for one prompt per call only.")
    if model_kwargs.get("use_cache") is False or generation_config.use_cache is False:
        raise ValueError("speculative decoding needs the target's cache: do not set use_cache=False.")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "output_attentions / output_hidden_states are not available with speculative decoding."
        )
    drafter.validate_for(model)


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    drafter: Drafter | PreTrainedModel | None = None,
    spec_streamer=None,
    verification: str = "replay",
    **model_kwargs,
) -> torch.Tensor | SpeculativeDecoderOnlyOutput:
    """Speculative decoding loop, usable as `model.generate(..., custom_generate=speculative_generate)`.

    Args:
        model: the target causal LM.
        input_ids: `[1, L]` prompt.
        logits_processor: prepared by `generate` (processors, and warpers when sampling).
        stopping_criteria: prepared by `generate` (max length, EOS, user criteria); checked after every
            committed token, so a stop inside an accepted block is exact.
        generation_config: the merged generation config.
        drafter: a `Drafter`, or a causal LM that gets `ModelDrafter` defaults.
        spec_streamer: a streamer that receives each committed token (`generate`'s own `streamer` is not
            forwarded to `custom_generate` callables; `enable`/`hf_specssm.generate` pass it here). If it
            has `on_round(num_from_draft, num_committed)`, that is called after each round's tokens were
            put: the first `num_from_draft` of them were accepted drafts, the rest came from the target.
        verification: for SSM and hybrid targets, how the state is brought to the accepted prefix:
            `"replay"` (Activation Replay, default), `"joint"` (Joint Attainment and Advancement: an extra
            batch row that skips the drafts) or `"refeed"` (snapshot and re-feed, for comparison).
        **model_kwargs: `generate`'s model kwargs (the target cache, attention mask, …).

    Returns:
        `[1, L + n]` sequences, or `SpeculativeDecoderOnlyOutput` with `return_dict_in_generate=True`.
    """
    if drafter is None:
        raise ValueError("speculative decoding needs a drafter: pass assistant_model= (or drafter=).")
    drafter = as_drafter(drafter)
    _validate_call(model, input_ids, generation_config, model_kwargs, drafter)
    rows = [
        Row(
            index=b,
            left_pad=pad,
            sequence=prompt[None],
            drafter=drafter if input_ids.shape[0] == 1 else drafter.spawn(),
        )
        for b, (pad, prompt) in enumerate(split_rows(input_ids, model_kwargs.get("attention_mask")))
    ]
    want_dict = generation_config.return_dict_in_generate
    for row in rows:
        row.scores = () if want_dict and generation_config.output_scores else None
        row.logits = () if want_dict and generation_config.output_logits else None
    pad_token_id = _pad_token_id(generation_config)
    target = make_target(
        model,
        model_kwargs.get(_compat.cache_kwarg_name(model)),
        verification,
        num_rows=len(rows),
        pad_token_id=pad_token_id,
    )
    loop = SpeculativeLoop(
        target, logits_processor, stopping_criteria, generation_config, streamer=spec_streamer
    )
    stats = loop.run(rows)
    model.last_speculation_stats = stats
    sequences = _collect(rows, input_ids, pad_token_id)
    if want_dict:
        return SpeculativeDecoderOnlyOutput(
            sequences=sequences,
            scores=rows[0].scores if len(rows) == 1 else None,
            logits=rows[0].logits if len(rows) == 1 else None,
            past_key_values=target.cache,
            speculation_stats=stats,
        )
    return sequences


def split_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(left padding [P], prompt [L])` per row; raises `ValueError` for right or inner padding."""
    rows = []
    for b in range(input_ids.shape[0]):
        if attention_mask is None:
            rows.append((input_ids[b, :0], input_ids[b]))
            continue
        mask = attention_mask[b].bool()
        start = int(mask.float().argmax()) if mask.any() else input_ids.shape[1]
        if not mask[start:].all() or start == input_ids.shape[1]:
            raise ValueError(
                "batched prompts must be left-padded (attention_mask zeros only before each prompt, and every "
                "prompt non-empty)."
            )
        rows.append((input_ids[b, :start], input_ids[b, start:]))
    return rows


def _pad_token_id(generation_config: GenerationConfig) -> int:
    """The padding token of batched outputs: `pad_token_id`, else the (first) EOS token, else 0."""
    if generation_config.pad_token_id is not None:
        return generation_config.pad_token_id
    eos = generation_config.eos_token_id
    if eos is None:
        return 0
    return eos[0] if isinstance(eos, list) else eos


def _collect(rows: list[Row], input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """`[B, L]` sequences: each row's padding and tokens, right-padded to the longest (transformers' layout)."""
    if len(rows) == 1 and rows[0].left_pad.numel() == 0:
        return rows[0].sequence
    total = max(row.length for row in rows)
    output = input_ids.new_full((len(rows), total), pad_token_id)
    for row in rows:
        output[row.index, : row.length] = row.padded()[0]
    return output


def generate(
    model: PreTrainedModel,
    *args,
    drafter: Drafter | PreTrainedModel | None = None,
    streamer=None,
    **kwargs,
) -> torch.Tensor | SpeculativeDecoderOnlyOutput:
    """`model.generate(*args, **kwargs)` with speculative decoding by `drafter`, without patching `model`.

    Input preparation, generation config, logits processors and stopping criteria are transformers' own;
    only the decoding loop is ours.
    """
    if "custom_generate" in kwargs:
        raise ValueError("hf_specssm runs its own decoding loop; do not pass custom_generate as well.")
    if kwargs.get("num_return_sequences", 1) > 1:
        raise ValueError("speculative decoding returns one sequence per prompt: set num_return_sequences=1.")
    return type(model).generate(
        model,
        *args,
        custom_generate=speculative_generate,
        drafter=drafter,
        spec_streamer=streamer,
        streamer=streamer,
        **kwargs,
    )


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Route speculative `model.generate` calls through hf_specssm's loop; returns `model`.

    `assistant_model=` (a causal LM or a `Drafter`) and `prompt_lookup_num_tokens=` (with
    `max_matching_ngram_size=`) run our loop, for Transformer, SSM and hybrid targets alike; every other
    call runs transformers' own `generate` unchanged. Calling `enable` twice is harmless.
    """
    if not isinstance(model, PreTrainedModel) or not model.can_generate():
        raise ValueError(
            f"enable() takes a transformers model that can generate, got {type(model).__name__}."
        )
    if is_enabled(model):
        return model
    original_generate = model.generate

    @functools.wraps(original_generate)
    def speculative_aware_generate(*args, assistant_model=None, **kwargs):
        lookup_tokens = kwargs.pop("prompt_lookup_num_tokens", None)
        if assistant_model is None and lookup_tokens is None:
            return original_generate(*args, **kwargs)
        if lookup_tokens is not None:
            if assistant_model is not None:
                raise ValueError("pass either assistant_model or prompt_lookup_num_tokens, not both.")
            ngram_size = kwargs.pop("max_matching_ngram_size", None) or 2
            assistant_model = PromptLookupDrafter(max_ngram_size=ngram_size, num_draft_tokens=lookup_tokens)
        return generate(model, *args, drafter=assistant_model, **kwargs)

    model.generate = speculative_aware_generate
    setattr(model, _ENABLED_FLAG, True)
    return model


def is_enabled(model: PreTrainedModel) -> bool:
    """Whether `enable(model)` has been called."""
    return bool(getattr(model, _ENABLED_FLAG, False))
