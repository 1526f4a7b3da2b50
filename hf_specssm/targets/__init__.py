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
from hf_specssm.ssm.state_replay import offloaded_mixers, uncovered_recurrent_layers
from hf_specssm.targets.attention import AttentionTarget
from hf_specssm.targets.base import Proposal, SingleRowTarget, Target
from hf_specssm.targets.batched import BatchTarget
from hf_specssm.targets.chain_paths import CHAIN_PATHS, chain_path_costs
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
    method = verification
    if support.continuation == "none":
        # transformers' multi-token forward is inexact here (Zamba2 clamps Δ in its scan, not in its step);
        # the frozen verification replaces that scan, everything else steps one token at a time
        return "replay" if method != "refeed" and support.state_replay else "stepwise"
    if uncovered_recurrent_layers(model):
        # layers no mixer serves (LFM2's short convolutions): mixer-input replay and identity steps do not
        # reach them; the state-update commit keeps their conv windows, re-feed restores checkpoints
        if method == "refeed":
            return method
        return "replay" if support.state_replay else "stepwise"
    if method == "joint" and not support.identity_steps:
        method = "replay"
    if method == "replay" and not support.replay:
        method = "refeed"
    return method


def tree_problem_for(model: PreTrainedModel) -> str | None:
    """Why trees cannot be verified on this SSM or hybrid target, or `None` when the tree scan serves it."""
    uncovered = uncovered_recurrent_layers(model)
    if uncovered:
        return (
            f"tree verification has no tree scan for {type(model).__name__}'s recurrent layers "
            f"{uncovered} (no SSM mixer serves them); verify chains (drop tree_shape / tree_policy)."
        )
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
        if recurrent and uncovered_recurrent_layers(model):
            raise ValueError(
                f"batched speculative decoding commits SSM state by replaying mixers, and no mixer serves "
                f"{type(model).__name__}'s recurrent layers {uncovered_recurrent_layers(model)}; pass one "
                "prompt per call."
            )
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
    uncovered = uncovered_recurrent_layers(model)
    state_replay = method == "replay" and mixer_support(model).state_replay and not offloaded_mixers(model)
    if uncovered and method == "replay" and not state_replay:
        method = "refeed"  # offloaded mixers: checkpoints restore every layer, the re-feed runs the hooks
    tree_problem = tree_problem_for(model)
    # chains may also take the tree scan where it serves (measured per round); not where the caller
    # asked for re-feed, which names its own path
    chain_paths = None
    if tree_problem is None and verification != "refeed" and not offloaded_mixers(model):
        chain_paths = chain_path_costs(model, CHAIN_PATHS)
    return RecurrentTarget(
        model,
        method=method,
        tree_problem=tree_problem,
        state_replay=state_replay,
        conv_only_layers=uncovered if state_replay else (),
        chain_paths=chain_paths,
        fused_verification=state_replay and mixer_support(model).fused_verification,
    )


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
