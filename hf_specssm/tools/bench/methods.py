"""The decoding methods the benchmark compares, each a function `(input_ids, settings) → output ids`.

Baselines are what users would otherwise run: the target alone, transformers' assisted decoding with a
small Transformer drafter (its defaults: up to 20 draft tokens, the heuristic schedule, confidence
threshold 0.4), and transformers' prompt lookup. Ours run through `hf_specssm.generate`: the same small
drafter, the Mamba drafter (chain, fixed tree, UCB bandit over trees) and prompt lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

import hf_specssm
from hf_specssm.drafters.base import Drafter

#: the target alone in this machine's fastest dtype (`hf_specssm.hardware.fastest_dtype`), run beside the
#: others whenever the benchmark's dtype is another one, so that no speed-up rests on a slowed baseline
FASTEST_TARGET = "target-fastest"
# methods that draft with the small Transformer drafter, and with the Mamba drafter
SMALL_DRAFTER_METHODS = ("hf-assisted-0.5b", "ours-0.5b")
MAMBA_DRAFTER_METHODS = (
    "ours-mamba", "ours-mamba-tree", "ours-mamba-copy", "ours-mamba-copy-tree", "ours-mamba-copy-bandit",
)  # fmt: skip
# methods that draft with a ReDrafter head (`--redrafter-head`)
REDRAFTER_METHODS = (
    "ours-redrafter",
    "ours-redrafter-chain",
    "ours-redrafter-copy",
    "ours-redrafter-copy-both",
)
#: beams of `ours-redrafter` for a head whose default is one beam
REDRAFTER_TREE_BEAMS = 4
# methods whose drafter builds trees (`--tree-shape` applies to them)
TREE_METHODS = ("ours-mamba-tree", "ours-mamba-copy-tree")

# Our tree for a target whose verification cost is flat in the number of tokens (bf16 on AMX, GPUs):
# 3 + 6 + 6 + 6 + 6 = 27 nodes, five levels deep.
DEFAULT_TREE_SHAPE = (3, 2, 1, 1, 1)


@dataclass(frozen=True)
class GenerationSettings:
    """What every method generates with.

    Attributes:
        max_new_tokens: tokens per prompt.
        do_sample: sample (else greedy).
        temperature: sampling temperature.
        top_p: nucleus sampling threshold (1.0: off).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}.")

    @property
    def mode(self) -> str:
        """`"greedy"` or `"sample"`."""
        return "sample" if self.do_sample else "greedy"

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `generate`."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Method:
    """One benchmarked decoding method.

    Attributes:
        name: short id used in the tables (`target`, `hf-assisted-0.5b`, `ours-mamba-tree`, …).
        description: one line for the report.
        family: `"baseline"` (target alone), `"transformers"` or `"hf_specssm"`.
        run: `(input_ids [1, P], settings, streamer) → output ids [1, P + N]`; `streamer` (or `None`) is
            passed to `generate` (the harness counts tokens with it for its progress bar).
        drafter_model: the draft model whose forwards are timed as drafting (`None` for model-free drafts).
        stats: called after `run` for hf_specssm's `SpeculationStats` of that call (`None` for others).
        target_model: the model whose forwards are timed as the target's, when it is not the benchmark's
            target (the target alone in another dtype).
        dtype: the dtype label of this method's rows, when it is not the benchmark's.
    """

    name: str
    description: str
    family: str
    run: Callable[[torch.Tensor, GenerationSettings, Any], torch.Tensor]
    drafter_model: PreTrainedModel | None = None
    stats: Callable[[], object] | None = field(default=None, repr=False)
    target_model: PreTrainedModel | None = None
    dtype: str | None = None


def _transformers_generate(
    target, input_ids, settings: GenerationSettings, streamer=None, **extra
) -> torch.Tensor:
    """transformers' own `generate` (also on a model that `hf_specssm.enable` patched)."""
    return type(target).generate(
        target,
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        **extra,
        **settings.generate_kwargs(),
    )


def target_alone(target: PreTrainedModel) -> Method:
    """Plain decoding with transformers' `generate`."""

    def run(input_ids, settings, streamer=None):
        return _transformers_generate(target, input_ids, settings, streamer)

    return Method("target", "the target alone (transformers' generate)", "baseline", run)


def fastest_target_alone(reference: PreTrainedModel, dtype: str) -> Method:
    """Plain decoding with `reference`, a copy of the target in this machine's fastest dtype `dtype`."""

    def run(input_ids, settings, streamer=None):
        return _transformers_generate(reference, input_ids, settings, streamer)

    return Method(
        FASTEST_TARGET,
        f"the target alone in {dtype}, this machine's fastest dtype for it (transformers' generate)",
        "baseline",
        run,
        target_model=reference,
        dtype=dtype,
    )


def transformers_assisted(target: PreTrainedModel, assistant: PreTrainedModel, label: str) -> Method:
    """transformers' assisted decoding with `assistant` and its default draft settings."""
    defaults = (
        assistant.generation_config.num_assistant_tokens,
        assistant.generation_config.num_assistant_tokens_schedule,
        assistant.generation_config.assistant_confidence_threshold,
    )

    def run(input_ids, settings, streamer=None):
        # transformers writes its heuristic draft length back into the assistant's config; reset it so that
        # every prompt starts from the same defaults
        config = assistant.generation_config
        (config.num_assistant_tokens, config.num_assistant_tokens_schedule) = defaults[:2]
        config.assistant_confidence_threshold = defaults[2]
        return _transformers_generate(target, input_ids, settings, streamer, assistant_model=assistant)

    return Method(
        f"hf-assisted-{label}",
        f"transformers' assisted decoding, {label} drafter (its defaults)",
        "transformers",
        run,
        drafter_model=assistant,
    )


def transformers_prompt_lookup(target: PreTrainedModel, num_tokens: int = 10) -> Method:
    """transformers' prompt lookup decoding (`prompt_lookup_num_tokens`)."""

    def run(input_ids, settings, streamer=None):
        return _transformers_generate(
            target, input_ids, settings, streamer, prompt_lookup_num_tokens=num_tokens
        )

    return Method(
        "hf-prompt-lookup",
        f"transformers' prompt lookup ({num_tokens} tokens)",
        "transformers",
        run,
    )


def ours(target: PreTrainedModel, name: str, description: str, drafter: Drafter, draft_model=None) -> Method:
    """hf_specssm's loop with `drafter` (one drafter object for all prompts, as a user would keep it)."""

    def run(input_ids, settings, streamer=None):
        return hf_specssm.generate(
            target,
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            drafter=drafter,
            streamer=streamer,
            **settings.generate_kwargs(),
        )

    return Method(
        name,
        description,
        "hf_specssm",
        run,
        drafter_model=draft_model,
        stats=lambda: target.last_speculation_stats,
    )


def _mamba(model: PreTrainedModel, **options) -> hf_specssm.ModelDrafter:
    """The drafter users get for a Mamba drafter model: `FeatureDrafter` when it reads the target's hidden
    state, else `ModelDrafter`."""
    from hf_specssm.drafters.feature import FeatureDrafter

    kind = FeatureDrafter if getattr(model, "reads_target_hidden", False) else hf_specssm.ModelDrafter
    return kind(model, **options)


def standard_methods(
    target: PreTrainedModel,
    small_drafter: PreTrainedModel | None = None,
    mamba_drafter: PreTrainedModel | None = None,
    small_label: str = "0.5b",
    tree_shape: tuple[int, ...] = DEFAULT_TREE_SHAPE,
    redrafter_head=None,
) -> list[Method]:
    """The benchmark's methods for the models at hand (methods needing a missing model are left out);
    `redrafter_head` is a `ReDrafterHead` for the target, or `None`."""
    methods = [target_alone(target)]
    if small_drafter is not None:
        methods.append(transformers_assisted(target, small_drafter, small_label))
    methods.append(transformers_prompt_lookup(target))
    if small_drafter is not None:
        methods.append(
            ours(
                target,
                f"ours-{small_label}",
                f"hf_specssm, {small_label} drafter (adaptive chain of up to 20, confidence stop 0.4)",
                hf_specssm.ModelDrafter(small_drafter, max_draft_tokens=20, confidence_stop=0.4),
                small_drafter,
            )
        )
    if mamba_drafter is not None:
        methods += [
            ours(
                target,
                "ours-mamba",
                "hf_specssm, Mamba drafter (adaptive chain)",
                _mamba(mamba_drafter),
                mamba_drafter,
            ),
            ours(
                target,
                "ours-mamba-tree",
                f"hf_specssm, Mamba drafter, tree {tree_shape}",
                _mamba(mamba_drafter, tree_shape=tree_shape),
                mamba_drafter,
            ),
            ours(
                target,
                "ours-mamba-copy",
                "hf_specssm, Mamba drafter chain; copies a prompt-lookup match of 2+ tokens instead (ContextCopyDrafter)",
                hf_specssm.ContextCopyDrafter(_mamba(mamba_drafter)),
                mamba_drafter,
            ),
            ours(
                target,
                "ours-mamba-copy-tree",
                f"hf_specssm, Mamba drafter, tree {tree_shape} plus a prompt-lookup branch (ContextCopyDrafter)",
                hf_specssm.ContextCopyDrafter(_mamba(mamba_drafter, tree_shape=tree_shape)),
                mamba_drafter,
            ),
            ours(
                target,
                "ours-mamba-copy-bandit",
                "hf_specssm, Mamba drafter, UCB bandit over tree shapes plus a prompt-lookup branch",
                hf_specssm.ContextCopyDrafter(_mamba(mamba_drafter, tree_policy=hf_specssm.UCBTreePolicy())),
                mamba_drafter,
            ),
        ]
    if redrafter_head is not None:
        from hf_specssm.drafters.redrafter import ReDrafterDrafter

        config = redrafter_head.config
        # beam trees: the head's own beams, or ReDrafter's 4 where its default is one beam (a chain)
        beams = config.beam_width if config.beam_width > 1 else REDRAFTER_TREE_BEAMS
        methods += [
            ours(
                target,
                "ours-redrafter",
                f"hf_specssm, ReDrafter head, {beams} beams × {config.beam_length} tokens "
                "(a beam tree on Transformer targets)",
                ReDrafterDrafter(redrafter_head, target, beam_width=beams),
                redrafter_head,
            ),
            ours(
                target,
                "ours-redrafter-chain",
                f"hf_specssm, ReDrafter head, one beam: a chain of {config.beam_length} tokens",
                ReDrafterDrafter(redrafter_head, target, beam_width=1),
                redrafter_head,
            ),
            ours(
                target,
                "ours-redrafter-copy",
                f"hf_specssm, ReDrafter head chain of {config.beam_length}; copies a prompt-lookup match of 2+ "
                "tokens instead (ContextCopyDrafter)",
                hf_specssm.ContextCopyDrafter(ReDrafterDrafter(redrafter_head, target, beam_width=1)),
                redrafter_head,
            ),
            ours(
                target,
                "ours-redrafter-copy-both",
                f"hf_specssm, ReDrafter head chain of {config.beam_length}; with a prompt-lookup match of 2+ "
                "tokens, the chain and the copy verified as one two-branch tree (chain_rounds='both')",
                hf_specssm.ContextCopyDrafter(
                    ReDrafterDrafter(redrafter_head, target, beam_width=1), chain_rounds="both"
                ),
                redrafter_head,
            ),
        ]
    methods.append(
        ours(
            target,
            "ours-prompt-lookup",
            "hf_specssm prompt lookup",
            hf_specssm.PromptLookupDrafter(num_draft_tokens=10, schedule="constant"),
        )
    )
    return methods
