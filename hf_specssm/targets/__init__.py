"""Targets: the verifiers behind the `Target` contract, and the one place that picks one for a call.

- `AttentionTarget`: Transformer targets (KV cache, crop / gather);
- `RecurrentTarget`: SSM and hybrid targets (Activation Replay, re-feed, or one token per forward);
- `JointTarget`: SSM and hybrid targets by Joint Attainment and Advancement;
- `BatchTarget`: ragged batches of any target (chains, Activation Replay).

`make_target` admits recurrent targets through the mixer probes of `hf_specssm._compat.probes`: where a
probe fails, it picks the closest method that is still exact (the probe says so once).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from hf_specssm import _compat
from hf_specssm._compat.probes import mixer_support
from hf_specssm.targets.attention import AttentionTarget
from hf_specssm.targets.base import Proposal, SingleRowTarget, Target
from hf_specssm.targets.batched import BatchTarget
from hf_specssm.targets.joint import JointTarget
from hf_specssm.targets.recurrent import RECURRENT_METHODS, RecurrentTarget

#: what `verification=` accepts: how SSM and hybrid targets bring the state to the accepted prefix
VERIFICATION_METHODS = ("replay", "joint", "refeed")


def recurrent_method(model: PreTrainedModel, verification: str) -> str:
    """The method that serves `verification` on this SSM or hybrid target, after the mixer probes.

    `"joint"` needs identity steps and exact multi-token forwards, `"replay"` needs replayable mixers and
    exact multi-token forwards, `"refeed"` exact multi-token forwards; `"stepwise"` always works.
    """
    support = mixer_support(model)  # (a failed probe warns once, naming the fallback)
    if support.continuation == "none":
        return "stepwise"
    method = verification
    if method == "joint" and not support.identity_steps:
        method = "replay"
    if method == "replay" and not support.replay:
        method = "refeed"
    return method


def tree_problem_for(model: PreTrainedModel) -> str | None:
    """Why trees cannot be verified on this SSM or hybrid target, or `None` when the tree scan serves it."""
    if not mixer_support(model).tree_scan:
        return (
            f"tree verification has no exact tree scan for {type(model).__name__}'s mixers here (probe); "
            "verify chains (drop tree_shape / tree_policy)."
        )
    return None


def make_target(
    model: PreTrainedModel,
    cache: object | None,
    verification: str = "replay",
    num_rows: int = 1,
    pad_token_id: int = 0,
) -> Target:
    """The verifier for one call.

    Args:
        model: the target causal LM.
        cache: the cache `generate` prepared (used by attention-only targets; recurrent targets build a
            `ForkableCache`).
        verification: one of `VERIFICATION_METHODS`.
        num_rows: prompts in the call; more than one gets a `BatchTarget`.
        pad_token_id: the padding token of batched verification forwards.
    """
    if verification not in VERIFICATION_METHODS:
        raise ValueError(f"verification must be one of {VERIFICATION_METHODS}, got {verification!r}.")
    recurrent = _compat.config_has_recurrent_layers(model.config)
    if num_rows > 1:
        if verification != "replay":
            raise ValueError("batched speculative decoding commits SSM state by Activation Replay only.")
        if recurrent and recurrent_method(model, "replay") != "replay":
            raise ValueError(
                f"batched speculative decoding needs Activation Replay, which is not exact for "
                f"{type(model).__name__} here; pass one prompt per call."
            )
        return BatchTarget(model, pad_token_id)
    if not recurrent:
        return AttentionTarget(model, cache)
    method = recurrent_method(model, verification)
    if method == "joint":
        return JointTarget(model)
    return RecurrentTarget(model, method=method, tree_problem=tree_problem_for(model))


__all__ = [
    "RECURRENT_METHODS",
    "VERIFICATION_METHODS",
    "AttentionTarget",
    "BatchTarget",
    "JointTarget",
    "Proposal",
    "RecurrentTarget",
    "SingleRowTarget",
    "Target",
    "make_target",
    "recurrent_method",
    "tree_problem_for",
]
