"""The speculative decoding loop and the ways users reach it from `model.generate`.

One round reads like the papers: draft → verify → accept → commit. The loop is exposed three ways:

- `enable(model)`: after it, `model.generate(ids, assistant_model=drafter, ...)` runs this loop;
- `speculative_generate`: a `custom_generate` callable (`model.generate(ids, custom_generate=
  speculative_generate, drafter=drafter)`);
- the Hub-style `custom_generate/` folder at the repository root.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_specssm import _compat
from hf_specssm.decoding.acceptance import accept_greedy, accept_sampling, accept_tree_sampling
from hf_specssm.drafters import Draft, Drafter, DraftSampler, as_drafter
from hf_specssm.drafters.model import _check_causal_lm
from hf_specssm.drafters.ngram import PromptLookupDrafter
from hf_specssm.stats import SpeculationStats
from hf_specssm.targets.batched import batched_speculative_generate
from hf_specssm.targets.verification import (
    VERIFICATION_METHODS,
    AttentionTarget,
    JointTarget,
    RecurrentTarget,
    process_scores,
    process_tree_scores,
)
from hf_specssm.tree import TokenTree, accept_tree_greedy

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


def _make_target(model: PreTrainedModel, model_kwargs: dict, verification: str) -> AttentionTarget:
    """The verifier for `model`, chosen by its cache layer types (recurrent layers or attention only)."""
    if verification not in VERIFICATION_METHODS:
        raise ValueError(f"verification must be one of {VERIFICATION_METHODS}, got {verification!r}.")
    if _compat.config_has_recurrent_layers(model.config):
        # generate() prepared a DynamicCache; ours replaces it (same layers, plus rollback).
        if verification == "joint":
            return JointTarget(model)
        return RecurrentTarget(model, method=verification)
    return AttentionTarget(model, model_kwargs.get(_compat.cache_kwarg_name(model)))


def _tree_verification_problem(model: PreTrainedModel, verification: str) -> str | None:
    """Why this target cannot verify trees in this call, or `None` when it can."""
    if not _compat.config_has_recurrent_layers(model.config):
        return None
    if verification == "joint":
        return "Joint Attainment and Advancement verifies chains; use verification='replay' for trees."
    # SSM and hybrid targets verify trees with the tree scan (hf_specssm.ssm.tree_scan)
    from hf_specssm.ssm.tree_scan import check_tree_scan

    try:
        check_tree_scan(model)
    except ValueError as error:
        return str(error)
    return None


def _check_tree_round(model: PreTrainedModel, drafter: Drafter, verification: str) -> None:
    """Raise `ValueError` for what tree rounds do not cover yet."""
    if not hasattr(drafter, "draft_tree"):
        raise ValueError(f"{type(drafter).__name__} cannot draft trees; drop tree_shape or use ModelDrafter.")
    problem = _tree_verification_problem(model, verification)
    if problem is not None:
        raise ValueError(problem)


def _select_next(
    draft: Draft,
    scores: torch.Tensor,
    do_sample: bool,
) -> tuple[int, int]:
    """Acceptance for one round: `(num_accepted, next_token)`."""
    if not do_sample:
        return accept_greedy(draft.tokens[0], scores)
    target_probs = torch.softmax(scores, dim=-1)
    draft_probs = draft.probs[0] if draft.probs is not None else None
    return accept_sampling(draft.tokens[0], draft_probs, target_probs)


def _select_tree_path(tree: TokenTree, scores: torch.Tensor, do_sample: bool) -> tuple[list[int], int]:
    """Acceptance for one tree round: `(accepted path, next_token)`."""
    if not do_sample:
        return accept_tree_greedy(tree, scores)
    return accept_tree_sampling(tree, torch.softmax(scores, dim=-1))


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
    if input_ids.shape[0] > 1:
        if spec_streamer is not None:
            raise ValueError("streamers take one sequence: pass one prompt per call to stream.")
        if verification != "replay":
            raise ValueError("batched speculative decoding commits SSM state by Activation Replay only.")
        if drafter.wants_target_hidden:
            raise ValueError(
                f"{type(drafter).__name__} drafts one prompt per call: pass prompts one at a time."
            )
        sequences, stats, cache = batched_speculative_generate(
            model,
            input_ids,
            model_kwargs.get("attention_mask"),
            logits_processor,
            stopping_criteria,
            generation_config,
            drafter,
            _select_next,
            process_scores,
        )
        model.last_speculation_stats = stats
        if generation_config.return_dict_in_generate:
            return SpeculativeDecoderOnlyOutput(
                sequences=sequences, past_key_values=cache, speculation_stats=stats
            )
        return sequences

    target = _make_target(model, model_kwargs, verification)
    sampler = DraftSampler(logits_processor, generation_config.do_sample)
    policy = drafter.length_policy
    stats = SpeculationStats()
    want_dict = generation_config.return_dict_in_generate
    scores_out = () if want_dict and generation_config.output_scores else None
    logits_out = () if want_dict and generation_config.output_logits else None
    max_length = generation_config.max_length

    tree_policy = getattr(drafter, "tree_policy", None)
    tree_shape = drafter.config.tree_shape
    # drafters that shape their own trees (ReDrafter's deduplicated beams) draft chains where trees cannot
    # be verified (Joint Attainment and Advancement, mixers without a tree scan)
    dynamic_trees = (
        getattr(drafter, "drafts_trees", False) and _tree_verification_problem(model, verification) is None
    )
    tree_mode = tree_shape is not None or tree_policy is not None or dynamic_trees
    if tree_mode:
        _check_tree_round(model, drafter, verification)
    target.capture_hidden = drafter.wants_target_hidden

    def commit_tokens(tokens: list[int], scores: torch.Tensor, logits_rows: torch.Tensor) -> tuple[int, bool]:
        """Append `tokens` one by one, honouring the stopping criteria; returns `(committed, finished)`."""
        nonlocal input_ids, scores_out, logits_out
        for position, token in enumerate(tokens):
            input_ids = torch.cat([input_ids, input_ids.new_tensor([[token]])], dim=1)
            if scores_out is not None:
                scores_out += (scores[position : position + 1],)
            if logits_out is not None:
                logits_out += (logits_rows[position : position + 1],)
            if spec_streamer is not None:
                spec_streamer.put(input_ids[:, -1].cpu())
            if bool(stopping_criteria(input_ids, scores_out).all()):
                return position + 1, True
        return len(tokens), False

    loop_start = time.perf_counter()
    drafter.begin(input_ids)
    try:
        finished = input_ids.shape[1] >= max_length
        while not finished:
            prefix_length = input_ids.shape[1]
            room = max_length - prefix_length
            t0 = time.perf_counter()
            shape = tree_policy.choose() if tree_policy is not None else tree_shape
            depth = len(shape) if shape is not None else getattr(drafter, "max_tree_depth", 0)
            if tree_mode and room > depth:
                # draft → verify (tree mask) → accept the longest matching path → commit
                tree = drafter.draft_tree(input_ids, sampler, shape)
                t1 = time.perf_counter()
                logits = target.score_tree(input_ids, tree)
                scores = process_tree_scores(logits_processor, input_ids, tree, logits)
                path, next_token = _select_tree_path(tree, scores, generation_config.do_sample)
                t2 = time.perf_counter()
                rows = [0, *(node + 1 for node in path)]
                committed, finished = commit_tokens(
                    [*tree.tokens[path].tolist(), next_token], scores[rows], logits[0, rows]
                )
                kept = path[: min(len(path), committed)]
                target.keep_tree(kept)
                if drafter.wants_target_hidden:
                    drafter.observe_target_hidden(target.last_hidden[:, rows[committed - 1]])
                drafter.commit_tree(input_ids, kept)
                drafted, num_accepted = tree.size, len(path)
                if shape is not None:
                    stats.tree_shapes.append(shape)
                if tree_policy is not None:
                    tree_policy.update(committed, time.perf_counter() - t0)
            else:
                # draft → verify → accept → commit (in tree mode: when too little room is left for a tree)
                num_draft = max(0, min(policy.next_length(), room - 1))
                if num_draft > 0:
                    draft = drafter.draft(input_ids, num_draft, sampler)
                else:
                    draft = Draft(tokens=input_ids.new_empty((1, 0)))
                t1 = time.perf_counter()
                logits = target.score(input_ids, draft.tokens)
                scores = process_scores(logits_processor, input_ids, draft.tokens, logits)
                num_accepted, next_token = _select_next(draft, scores, generation_config.do_sample)
                t2 = time.perf_counter()
                committed, finished = commit_tokens(
                    [*draft.tokens[0, :num_accepted].tolist(), next_token], scores, logits[0]
                )
                kept_drafts = min(num_accepted, committed)
                target.keep(prefix_length + kept_drafts)
                if drafter.wants_target_hidden:
                    drafter.observe_target_hidden(target.last_hidden[:, committed - 1])
                drafter.commit(input_ids, kept_drafts)
                policy.update(draft.length, num_accepted, t1 - t0, t2 - t1)
                drafted = draft.length
            stats.record_round(drafted, num_accepted, committed)
            if spec_streamer is not None and hasattr(spec_streamer, "on_round"):
                spec_streamer.on_round(min(num_accepted, committed), committed)
            stats.draft_time_s += t1 - t0
            stats.verify_time_s += t2 - t1
            stats.forward_passes += 1
    finally:
        drafter.end()
        target.close()
    stats.total_time_s = time.perf_counter() - loop_start
    stats.peak_verification_bytes = target.peak_verification_bytes

    if spec_streamer is not None:
        spec_streamer.end()
    model.last_speculation_stats = stats
    if want_dict:
        return SpeculativeDecoderOnlyOutput(
            sequences=input_ids,
            scores=scores_out,
            logits=logits_out,
            past_key_values=target.cache,
            speculation_stats=stats,
        )
    return input_ids


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
