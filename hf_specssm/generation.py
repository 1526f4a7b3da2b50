"""The speculative decoding loop and the ways users reach it from `model.generate`.

One round reads like the papers: draft → verify → accept → commit. The loop is exposed three ways:

- `enable(model)`: after it, `model.generate(ids, assistant_model=drafter, ...)` runs this loop;
- `speculative_generate`: a `custom_generate` callable (`model.generate(ids, custom_generate=
  speculative_generate, drafter=drafter)`);
- the Hub-style `custom_generate/` folder (itself a Hub repository: pass the folder or its Hub id).

transformers' assisted-decoding settings reach the loop on every path: `num_assistant_tokens`,
`num_assistant_tokens_schedule` and `assistant_confidence_threshold` become the drafter's `DraftConfig`
(`resolve_drafter`), `prompt_lookup_num_tokens` / `max_matching_ngram_size` a `PromptLookupDrafter`,
`stop_strings` (with the tokenizer) a stopping criterion; settings the loop cannot honour raise
`ValueError` (`inputs.check_generation_settings`). docs/compatibility.md lists every generation setting.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_specssm import _compat
from hf_specssm.config import DraftConfig, draft_config_from_assisted_settings
from hf_specssm.decoding.round import Row, SpeculativeLoop
from hf_specssm.drafters import Drafter, as_drafter
from hf_specssm.drafters.model import _check_causal_lm
from hf_specssm.drafters.ngram import PromptLookupDrafter
from hf_specssm.inputs import (
    REFUSED_SETTINGS,
    assisted_settings,
    check_generation_settings,
    check_prompt_lookup_settings,
    check_tokenizer_pair,
    setting,
    validate_generate_inputs,
)
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
    tokenizer: Any = None,
) -> None:
    """Raise `ValueError` for every input the loop does not handle, before anything is touched."""
    _check_causal_lm(model, role="target")
    validate_generate_inputs(
        model,
        input_ids,
        model_kwargs,
        generation_config,
        tokenizer=tokenizer,
        drafter_model=getattr(drafter, "model", None),
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


def resolve_drafter(
    drafter: Drafter | PreTrainedModel | None,
    generation_config: GenerationConfig,
    prompt_lookup_num_tokens: int | None = None,
) -> Drafter:
    """The call's drafter, with transformers' assisted-decoding settings applied.

    Precedence, highest first: a `Drafter` object's own `DraftConfig` (settings that would change it are
    ignored with a `UserWarning`); the call's arguments and the target's generation config (merged by
    transformers, arguments first); the assistant model's `generation_config`; hf_specssm's `DraftConfig`
    defaults. A setting equal to transformers' global default (`num_assistant_tokens=20`, schedule
    `"constant"`, threshold 0.4) counts as unset (`inputs.user_set`).

    Args:
        drafter: a `Drafter`, a causal LM (wrapped in a `ModelDrafter`), or `None` for prompt lookup.
        generation_config: the merged generation config of the call.
        prompt_lookup_num_tokens: prompt lookup's draft length when passed outside the generation config.

    Raises:
        ValueError: for a missing drafter, a drafter together with prompt lookup, or an invalid setting.
    """
    lookup = prompt_lookup_num_tokens
    if lookup is None:
        lookup = generation_config.prompt_lookup_num_tokens
    check_prompt_lookup_settings(lookup, generation_config.max_matching_ngram_size)
    if lookup is not None:
        if drafter is not None:
            raise ValueError(
                "pass either a drafter (assistant_model= / drafter=) or prompt_lookup_num_tokens=, not both "
                "(prompt_lookup_num_tokens may come from the generation config: set it to None there)."
            )
        return _prompt_lookup_drafter(lookup, generation_config)
    if drafter is None:
        raise ValueError(
            "speculative decoding needs a drafter: pass assistant_model= (or drafter=), or "
            "prompt_lookup_num_tokens=."
        )
    if isinstance(drafter, Drafter):
        _warn_if_overridden(drafter, assisted_settings(generation_config, None))
        return drafter
    settings = assisted_settings(generation_config, getattr(drafter, "generation_config", None))
    config = draft_config_from_assisted_settings(DraftConfig(), **settings)
    # a Mamba drafter that reads the target's hidden state gets FeatureDrafter; anything else not a causal
    # LM raises the ValueError
    return as_drafter(drafter, config=config)


def _prompt_lookup_drafter(num_tokens: int, generation_config: GenerationConfig) -> PromptLookupDrafter:
    """transformers' prompt lookup as a drafter: `num_tokens` a round (constant, or the schedule asked for)."""
    settings = assisted_settings(generation_config, None)
    for name in ("num_assistant_tokens", "assistant_confidence_threshold"):
        if name in settings:
            raise ValueError(
                f"{name}={settings[name]!r} applies to a drafter model; prompt lookup drafts "
                f"prompt_lookup_num_tokens ({num_tokens}) tokens a round, without probabilities: drop {name}."
            )
    config = draft_config_from_assisted_settings(
        DraftConfig(num_draft_tokens=num_tokens, schedule="constant"),
        num_assistant_tokens_schedule=settings.get("num_assistant_tokens_schedule"),
    )
    return PromptLookupDrafter(max_ngram_size=generation_config.max_matching_ngram_size or 2, config=config)


# target -> {prompt-lookup settings: the drafter made for them}: what its draft gate learned carries over
_LOOKUP_DRAFTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kept_lookup_drafter(model: PreTrainedModel, drafter: Drafter) -> Drafter:
    """The prompt-lookup drafter this target used before with the same settings, else `drafter` (kept).

    `prompt_lookup_num_tokens=` makes a new drafter per call; keeping one per target and settings lets its
    draft gate (`policies.draft_length.DraftGate`) carry over what it measured — on text that never repeats,
    drafting stays off from the next call on instead of paying a few losing rounds per call again.
    """
    if not isinstance(drafter, PromptLookupDrafter):
        return drafter
    key = (
        drafter.max_ngram_size,
        drafter.min_ngram_size,
        drafter.max_candidates,
        drafter.match,
        drafter.config,
    )
    kept = _LOOKUP_DRAFTERS.setdefault(model, {})
    return kept.setdefault(key, drafter)


# assistant model -> {target: {(drafter kind, draft config): (length policy, draft gate)}}: what a drafter made
# for `assistant_model=` learned carries over to the next call with the same pair and settings
_LEARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _with_kept_learning(
    model: PreTrainedModel, assistant: object, drafter: Drafter, transient: bool = False
) -> Drafter:
    """`drafter`, made for `assistant_model=assistant` in this call, with the draft-length policy and draft
    gate that this target's earlier calls with the same assistant and settings trained (`transient`: the
    call asked for `num_assistant_tokens_schedule="heuristic_transient"`, which restarts every call, so
    nothing is kept).

    Each call wraps the assistant model in a new drafter; without this, every call would start its acceptance
    estimates from the prior and measure again whether drafting pays (transformers likewise carries its
    heuristic draft length over calls, on the assistant's generation config). Only the learned estimates are
    kept, not the drafter (its model and per-sequence state), so nothing keeps the assistant alive and
    concurrent calls do not share a cache.
    """
    if isinstance(assistant, Drafter) or transient:
        return drafter
    try:
        per_target = _LEARNED.setdefault(assistant, weakref.WeakKeyDictionary())
    except TypeError:  # not weak-referenceable: nothing to key the estimates by
        return drafter
    learned = per_target.setdefault(model, {})
    policy, gate = learned.setdefault(
        (type(drafter), drafter.config), (drafter.length_policy, drafter.draft_gate)
    )
    drafter.length_policy, drafter.draft_gate = policy, gate
    return drafter


def _warn_if_overridden(drafter: Drafter, settings: dict[str, Any]) -> None:
    """Warn when assisted-decoding settings would change a `Drafter` object's own `DraftConfig`."""
    if not settings:
        return
    # (also raises ValueError for invalid values, which are refused whoever wins)
    if draft_config_from_assisted_settings(drafter.config, **settings) == drafter.config:
        return
    given = ", ".join(f"{name}={value!r}" for name, value in settings.items())
    warnings.warn(
        f"{given} ignored: the {type(drafter).__name__} passed as the drafter carries its own DraftConfig, "
        "which wins. Set the draft length and schedule on it instead (e.g. ModelDrafter(model, "
        "num_draft_tokens=3, schedule='constant')).",
        UserWarning,
        stacklevel=4,
    )


def _with_stop_strings(
    stopping_criteria: StoppingCriteriaList, stop_strings: str | list[str] | None, tokenizer: Any
) -> StoppingCriteriaList:
    """`stopping_criteria` plus transformers' `StopStringCriteria` for `stop_strings` (none: unchanged)."""
    if stop_strings is None:
        return stopping_criteria
    if tokenizer is None:
        raise ValueError(
            "stop_strings need the target's tokenizer: pass tokenizer= to hf_specssm.generate or to "
            "model.generate after hf_specssm.enable (with custom_generate=speculative_generate transformers "
            "drops tokenizer=: pass spec_tokenizer= there)."
        )
    return StoppingCriteriaList(
        [*stopping_criteria, StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)]
    )


def _check_target_cache(cache: object, generation_config: GenerationConfig) -> None:
    """Raise `ValueError` for a cache that cannot be rolled back, or a static cache that cannot hold what
    this call may write (`max_length - 1` tokens)."""
    if cache is None:
        return
    problem = _compat.cache_rollback_problem(cache)
    if problem is not None:
        raise ValueError(problem)
    capacity = _compat.static_capacity(cache)
    needed = generation_config.max_length - 1
    if capacity is not None and capacity < needed:
        raise ValueError(
            f"the StaticCache holds {capacity} tokens but this call may cache max_length - 1 = {needed}; build "
            f"it with max_cache_len >= {needed} (or lower max_new_tokens)."
        )


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
    prompt_lookup_num_tokens: int | None = None,
    stop_strings: str | list[str] | None = None,
    spec_tokenizer: Any = None,
    **model_kwargs,
) -> torch.Tensor | SpeculativeDecoderOnlyOutput:
    """Speculative decoding loop, usable as `model.generate(..., custom_generate=speculative_generate)`.

    Args:
        model: the target causal LM.
        input_ids: `[B, L]` prompts (left-padded for `B > 1`).
        logits_processor: prepared by `generate` (processors, and warpers when sampling).
        stopping_criteria: prepared by `generate` (max length, EOS, user criteria); checked after every
            committed token, so a stop inside an accepted block is exact.
        generation_config: the merged generation config; its assisted-decoding settings configure the
            drafter (`resolve_drafter`), and settings the loop cannot honour raise `ValueError`.
        drafter: a `Drafter`, or a causal LM (a `ModelDrafter` configured from the assisted-decoding
            settings); `None` with `prompt_lookup_num_tokens`.
        spec_streamer: a streamer that receives each committed token (`generate`'s own `streamer` is not
            forwarded to `custom_generate` callables; `enable`/`hf_specssm.generate` pass it here). If it
            has `on_round(num_from_draft, num_committed)`, that is called after each round's tokens were
            put: the first `num_from_draft` of them were accepted drafts, the rest came from the target.
        verification: for SSM and hybrid targets, how the state is brought to the accepted prefix:
            `"replay"` (Activation Replay, default), `"joint"` (Joint Attainment and Advancement: an extra
            batch row that skips the drafts) or `"refeed"` (snapshot and re-feed, for comparison).
        prompt_lookup_num_tokens: draft by prompt lookup, this many tokens a round. Taken here (not from
            the generation config) so that transformers does not switch to its own assisted mode, which
            refuses SSM targets; `max_matching_ngram_size` is read from the generation config.
        stop_strings: stop after any of these strings; taken here, since transformers drops `tokenizer=`
            for `custom_generate` callables and would refuse them.
        spec_tokenizer: the target's tokenizer, for `stop_strings` and the drafter vocabulary check
            (`generate`'s `tokenizer=` under a name transformers forwards).
        **model_kwargs: `generate`'s model kwargs (the target cache, attention mask, …).

    Returns:
        `[B, L + n]` sequences, or `SpeculativeDecoderOnlyOutput` with `return_dict_in_generate=True`.
    """
    check_generation_settings(generation_config)
    assistant = drafter
    drafter = resolve_drafter(drafter, generation_config, prompt_lookup_num_tokens)
    if assistant is None:
        drafter = _kept_lookup_drafter(model, drafter)
    else:
        schedule = assisted_settings(generation_config, getattr(assistant, "generation_config", None)).get(
            "num_assistant_tokens_schedule"
        )
        drafter = _with_kept_learning(model, assistant, drafter, transient=schedule == "heuristic_transient")
    if stop_strings is None:
        stop_strings = generation_config.stop_strings
    stopping_criteria = _with_stop_strings(stopping_criteria, stop_strings, spec_tokenizer)
    _validate_call(model, input_ids, generation_config, model_kwargs, drafter, spec_tokenizer)
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
    cache = model_kwargs.get(_compat.cache_kwarg_name(model))
    if len(rows) == 1 and not _compat.config_has_recurrent_layers(model.config):
        # (SSM and hybrid targets and batches keep their state in hf_specssm's own ForkableCache)
        _check_target_cache(cache, generation_config)
    target = make_target(
        model,
        cache,
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


#: `speculative_generate` parameters that configure hf_specssm's loop rather than transformers' `generate`
_LOOP_OPTIONS = frozenset(inspect.signature(speculative_generate).parameters) - {
    "model",
    "input_ids",
    "logits_processor",
    "stopping_criteria",
    "generation_config",
    "model_kwargs",
}
# Settings the wrappers take out of transformers' hands: prompt lookup would select transformers' assisted
# mode (which refuses SSM targets), stop strings its search for a tokenizer it does not forward.
_ROUTED_SETTINGS = ("prompt_lookup_num_tokens", "stop_strings")


def _call_setting(model: PreTrainedModel, kwargs: dict[str, Any], name: str) -> Any:
    """What transformers' merge makes of generation setting `name` for a call: the argument (even `None`),
    else the call's `generation_config`, else the model's."""
    if name in kwargs:
        return kwargs[name]
    for config in (kwargs.get("generation_config"), model.generation_config):
        value = setting(config, name)
        if value is not None:
            return value
    return None


def _bound_loop(options: dict[str, Any]) -> Callable[..., torch.Tensor | SpeculativeDecoderOnlyOutput]:
    """`speculative_generate` with `options` bound, as a `custom_generate` callable whose signature declares
    none of them, so transformers neither forwards nor consumes generation settings of the same names."""

    def decoding_loop(
        target_model: PreTrainedModel,
        input_ids: torch.Tensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        **model_kwargs,
    ) -> torch.Tensor | SpeculativeDecoderOnlyOutput:
        return speculative_generate(
            target_model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            **options,
            **model_kwargs,
        )

    return decoding_loop


def generate(
    model: PreTrainedModel,
    *args,
    drafter: Drafter | PreTrainedModel | None = None,
    assistant_model: Drafter | PreTrainedModel | None = None,
    streamer=None,
    tokenizer: Any = None,
    assistant_tokenizer: Any = None,
    **kwargs,
) -> torch.Tensor | SpeculativeDecoderOnlyOutput:
    """`model.generate(*args, **kwargs)` with speculative decoding by `drafter`, without patching `model`.

    Input preparation, generation config, logits processors and stopping criteria are transformers' own;
    only the decoding loop is ours. Takes `generate`'s arguments, plus:

    Args:
        drafter: a `Drafter` or a causal LM (`assistant_model=` is the same argument); `None` with
            `prompt_lookup_num_tokens=` (an argument or in a generation config).
        streamer: receives the prompt, then exactly the committed tokens.
        tokenizer: the target's tokenizer, for `stop_strings` and the drafter vocabulary check.
        assistant_tokenizer: accepted only when it numbers tokens as `tokenizer` does (hf_specssm does not
            run universal assisted decoding).
        **kwargs: `generate`'s arguments, and `speculative_generate`'s options (`verification=`, …).

    Raises:
        ValueError: for a generation setting the loop cannot honour, before transformers runs.
    """
    if drafter is not None and assistant_model is not None:
        raise ValueError("pass the drafter once, as assistant_model= or as drafter=.")
    drafter = drafter if drafter is not None else assistant_model
    if "custom_generate" in kwargs:
        raise ValueError("hf_specssm runs its own decoding loop; do not pass custom_generate as well.")
    if (_call_setting(model, kwargs, "num_return_sequences") or 1) > 1:
        raise ValueError("speculative decoding returns one sequence per prompt: set num_return_sequences=1.")
    check_generation_settings({name: _call_setting(model, kwargs, name) for name in REFUSED_SETTINGS})
    drafter_model = drafter if isinstance(drafter, PreTrainedModel) else getattr(drafter, "model", None)
    check_tokenizer_pair(model, drafter_model, tokenizer, assistant_tokenizer)
    routed = {name: _call_setting(model, kwargs, name) for name in _ROUTED_SETTINGS}
    # transformers would apply the routed settings kept in a generation config: clear them for this call
    cleared = {
        name: None
        for name in _ROUTED_SETTINGS
        if any(
            setting(config, name) is not None
            for config in (kwargs.get("generation_config"), model.generation_config)
        )
    }
    options = {name: kwargs.pop(name) for name in _LOOP_OPTIONS & kwargs.keys()}
    options.update(routed, drafter=drafter)
    options.setdefault("spec_streamer", streamer)
    options.setdefault("spec_tokenizer", tokenizer)
    return type(model).generate(
        model, *args, custom_generate=_bound_loop(options), streamer=streamer, **kwargs, **cleared
    )


def enable(model: PreTrainedModel) -> PreTrainedModel:
    """Route speculative `model.generate` calls through hf_specssm's loop; returns `model`.

    A call with `assistant_model=` (or `drafter=`: a causal LM or a `Drafter`), or with prompt lookup
    (`prompt_lookup_num_tokens=` as an argument or in the call's or the model's generation config), runs
    our loop for Transformer, SSM and hybrid targets alike, with the arguments of `hf_specssm.generate`
    (`tokenizer=` for `stop_strings`, `verification=`, …). Every other call runs transformers' own
    `generate` unchanged. Calling `enable` twice is harmless.
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
        drafter = kwargs.pop("drafter", None)
        if drafter is not None and assistant_model is not None:
            raise ValueError("pass the drafter once, as assistant_model= or as drafter=.")
        drafter = drafter if drafter is not None else assistant_model
        if drafter is None and _call_setting(model, kwargs, "prompt_lookup_num_tokens") is None:
            return original_generate(*args, **kwargs)
        return generate(model, *args, drafter=drafter, **kwargs)

    model.generate = speculative_aware_generate
    setattr(model, _ENABLED_FLAG, True)
    return model


def is_enabled(model: PreTrainedModel) -> bool:
    """Whether `enable(model)` has been called."""
    return bool(getattr(model, _ENABLED_FLAG, False))
