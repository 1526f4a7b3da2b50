"""First-use probes: which of our fast SSM paths are exact for a model's mixers, tested rather than assumed.

A mixer family is admitted by running the model's own mixer modules (the first of each mixer class) alone
on a few seeded random hidden states `[1, T, H]`, from a fresh batch-1 cache, and comparing each path with
one-token steps, outputs and the resulting conv and SSM state:

- **continuation**: a two-token forward from a cached state (after a two-token prefill), as transformers
  runs it (`"native"`), else inside the carried-state scan patch (`"patched"`), else `"none"`
  (`admission.probe_continuation`);
- **replay**: Activation Replay (`MixerInputRecorder` records a three-token forward, the state is rewound
  to the checkpoint, two positions are replayed);
- **identity_steps**: a two-row forward where row 0 skips its last position (Joint Attainment and
  Advancement); refused outright under fused CUDA kernels and without an exact continuation;
- **tree_scan**: the tree-aware forward on a two-position chain and on a root with two children, outputs
  and the committed path's state;
- **state_replay**: a frozen single-chunk verification of four tokens (`ssm.state_replay`) must leave the
  state untouched and give the stepped outputs, and its commit of two positions the stepped state;
- **fused_verification**: the same, with the mixer's verification forward run by the compiled kernel
  between its projections (`state_replay.fused_route`; float32 or bf16 on the CPU), and the tree-scan
  check's root with two children through that kernel.

Each runs once per (mixer class, dtype, device); a failure warns once (`MixerProbeWarning`) and callers
take an exact fallback. The results live in `admission`, where the paths below this module read them;
tests impose values with `forced(...)` and start over with `clear_cache()`. This module runs the package's
own paths (`hf_specssm.ssm`, `hf_specssm.cache`), so it sits above them (docs/design.md, "Layers").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_specssm._compat.admission import (
    CAPABILITIES,
    FAILED,
    MixerProbeWarning,
    admit,
    clear_cache,
    forced,
    forced_value,
    layer_states,
    probe_continuation,
    probe_inputs,
    representatives,
    stepped,
    tolerance,
    worst_error,
)
from hf_specssm._compat.mixers import CONTINUATION_MODES, fused_kernels_active
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm import mixers as ssm_mixers
from hf_specssm.ssm import state_replay, tree_scan

__all__ = [
    "CAPABILITIES",
    "MixerProbeWarning",
    "MixerSupport",
    "clear_cache",
    "forced",
    "mixer_support",
    "unsupported_reasons",
]


@dataclass(frozen=True)
class MixerSupport:
    """Which fast SSM paths are exact for a model's mixers.

    Attributes:
        continuation: `"native"` (a multi-token forward from a cached state is exact as transformers runs
            it), `"patched"` (exact inside `ssm.mixers.exact_continuation`, which patches the scan), or
            `"none"` (neither: callers feed one token per forward; `exact_continuation` also steps).
        replay: Activation Replay (`MixerInputRecorder`) reproduces one-token steps.
        identity_steps: `ssm.mixers.identity_steps` makes masked positions leave the state unchanged
            (Joint Attainment and Advancement); False under fused CUDA kernels.
        tree_scan: `ssm.tree_scan.tree_verification` reproduces one-token steps on chains and trees.
        state_replay: every mixer is Mamba2-layout or Gated DeltaNet and `ssm.state_replay.StateRecorder`
            (single-chunk verification of frozen state, commit by state update) reproduces one-token steps.
        fused_verification: every mixer's frozen verification forward can run as one compiled call
            between its projections (`StateRecorder(fused=True)`) and reproduces one-token steps.
    """

    continuation: str = "native"
    replay: bool = True
    identity_steps: bool = True
    tree_scan: bool = True
    state_replay: bool = True
    fused_verification: bool = True


def mixer_support(model: torch.nn.Module) -> MixerSupport:
    """Which fast SSM paths are exact for `model`, probing each mixer class on first use.

    Models without SSM mixers get everything (`MixerSupport()`). With several mixer classes, a path is
    supported when it is for every class (continuation: the weakest mode).
    """
    mixers = representatives(model)
    if not mixers:
        return MixerSupport()
    values = {}
    for capability in CAPABILITIES:
        found = [_capability(capability, mixer, model)[0] for mixer in mixers]
        if capability == "continuation":
            values[capability] = max(found, key=CONTINUATION_MODES.index)
        else:
            values[capability] = all(found)
        imposed = forced_value(capability)
        if imposed is not None:
            values[capability] = imposed
    if values["continuation"] == "none" and forced_value("identity_steps") is None:
        # one-token stepping goes through the step kernels, which the identity-steps route does not reach
        values["identity_steps"] = False
    return MixerSupport(**values)


def unsupported_reasons(model: torch.nn.Module) -> dict[str, str]:
    """Why each refused fast path of `model` is refused: capability -> reason (empty when all are served)."""
    support = mixer_support(model)
    reasons: dict[str, str] = {}
    for capability in CAPABILITIES:
        value = getattr(support, capability)
        if value is True or value in ("native", "patched"):
            continue
        if forced_value(capability) is not None:
            reasons[capability] = "forced by hf_specssm._compat.probes.forced"
            continue
        for mixer in representatives(model):
            _, reason = _capability(capability, mixer, model)
            if reason is not None:
                reasons[capability] = f"{type(mixer).__name__}: {reason}"
                break
        else:
            reasons[capability] = "no exact multi-token continuation"
    return reasons


def _capability(capability: str, mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[object, str | None]:
    """`(value, reason)` of one capability for one mixer. Refusals that follow from the mixer's layout are
    decided on every query and never kept (tests change the family decisions); the rest is probed once."""
    if capability == "identity_steps" and ssm_mixers.identity_route(mixer) is None:
        return FAILED[capability], "no identity-steps route for this mixer layout"
    if capability == "tree_scan" and tree_scan.mixer_family(mixer) is None:
        return FAILED[capability], "no tree-aware forward for this mixer layout"
    if capability == "state_replay" and state_replay.state_replay_route(mixer) is None:
        return FAILED[capability], "neither a Mamba2 layout nor a gated delta rule to commit by state update"
    if capability == "fused_verification":
        problem = state_replay.fused_verification_problem(mixer)
        if problem is not None:
            return FAILED[capability], problem
    return admit(capability, mixer, model, _PROBES[capability])


def _new_cache(model: torch.nn.Module):
    return lambda: ForkableCache(model.config)


def _probe_replay(mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[bool, str | None]:
    hidden = probe_inputs(mixer, model, 5)
    new_cache = _new_cache(model)
    cache = new_cache()
    mixer(hidden[:, :2], cache_params=cache)
    cache.advance(2)
    cache.checkpoint()
    recorder = ssm_mixers.MixerInputRecorder(model, mixers=[mixer])
    with ssm_mixers.exact_continuation(model), recorder.recording():
        mixer(hidden[:, 2:5], cache_params=cache)
    cache.advance(3)
    cache.rewind_recurrent(2)
    recorder.replay(start=0, length=2)
    _, expected = stepped(mixer, hidden, [2, 3], new_cache)
    error = worst_error(list(zip(layer_states(cache, mixer), expected, strict=True)))
    if error <= tolerance(hidden.dtype):
        return True, None
    return False, f"the replayed state is off by {error:.1e} (relative)"


def _probe_identity_steps(mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[bool, str | None]:
    if fused_kernels_active(mixer):
        return False, "fused CUDA kernels are active; they take the Δ bounds as two floats"
    if _capability("continuation", mixer, model)[0] == "none":
        return False, "no exact multi-token continuation"
    hidden = probe_inputs(mixer, model, 4)
    new_cache = _new_cache(model)
    cache = new_cache()
    mixer(hidden[:, :2], cache_params=cache)
    cache.advance(2)
    cache.fork(2)
    skip = torch.tensor([[False, True], [False, False]], device=hidden.device)
    with (
        ssm_mixers.exact_continuation(model),
        ssm_mixers.identity_steps(model, skip),
        cache.ragged_conv_rows([1, 2]),
    ):
        output = mixer(hidden[:, 2:4].expand(2, -1, -1), cache_params=cache)
    one_output, one_states = stepped(mixer, hidden, [2], new_cache)
    two_output, two_states = stepped(mixer, hidden, [2, 3], new_cache)
    states = layer_states(cache, mixer)
    error = worst_error(
        [
            (output[:1, :1], one_output),
            (output[1:], two_output),
            *((state[:1], expected) for state, expected in zip(states, one_states, strict=True)),
            *((state[1:], expected) for state, expected in zip(states, two_states, strict=True)),
        ]
    )
    if error <= tolerance(hidden.dtype):
        return True, None
    return False, f"a skipped position moves the state or the outputs by {error:.1e} (relative)"


def _tree_error(
    mixer: torch.nn.Module,
    model: torch.nn.Module,
    hidden: torch.Tensor,
    parents: list[int],
    kept: list[int],
    expected: tuple[torch.Tensor, list[torch.Tensor]],
    fused_routes: dict | None = None,
) -> float:
    cache = ForkableCache(model.config)
    mixer(hidden[:, :2], cache_params=cache)
    with tree_scan.tree_verification(model, cache, torch.tensor(parents), fused_routes) as record:
        output = mixer(hidden[:, 2 : 2 + len(parents)], cache_params=cache)
    record.commit(cache, torch.tensor(kept))
    expected_outputs, expected_states = expected
    return worst_error(
        [(output, expected_outputs), *zip(layer_states(cache, mixer), expected_states, strict=True)]
    )


def _probe_tree_scan(mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[bool, str | None]:
    hidden = probe_inputs(mixer, model, 5)
    new_cache = _new_cache(model)
    chain_outputs, chain_states = stepped(mixer, hidden, [2, 3], new_cache)
    branch_outputs, branch_states = stepped(mixer, hidden, [2, 4], new_cache)
    chain = _tree_error(mixer, model, hidden, [-1, 0], [0, 1], (chain_outputs, chain_states))
    # a root with two children: position 2 is the sibling of position 1, the kept path runs through it
    tree_outputs = torch.cat([chain_outputs, branch_outputs[:, 1:]], dim=1)
    tree = _tree_error(mixer, model, hidden, [-1, 0, 0], [0, 2], (tree_outputs, branch_states))
    error = max(chain, tree)
    if error <= tolerance(hidden.dtype):
        return True, None
    return False, f"the tree forward is off by {error:.1e} (relative) against one-token steps"


def _probe_state_replay(mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[bool, str | None]:
    return _frozen_verification_verdict(mixer, model, fused=False)


def _probe_fused_verification(mixer: torch.nn.Module, model: torch.nn.Module) -> tuple[bool, str | None]:
    verdict = _frozen_verification_verdict(mixer, model, fused=True)
    if not verdict[0] or not _capability("tree_scan", mixer, model)[0]:
        return verdict  # (trees refused here: chains are all the fused forward serves)
    # the same compiled call verifies token trees (its conv windows and ancestor mask): a root with two
    # children, the kept path through the second
    hidden = probe_inputs(mixer, model, 5)
    new_cache = _new_cache(model)
    chain_outputs, _ = stepped(mixer, hidden, [2, 3], new_cache)
    branch_outputs, branch_states = stepped(mixer, hidden, [2, 4], new_cache)
    expected = (torch.cat([chain_outputs, branch_outputs[:, 1:]], dim=1), branch_states)
    routes = {mixer: state_replay.fused_route(mixer)}
    error = _tree_error(mixer, model, hidden, [-1, 0, 0], [0, 2], expected, routes)
    if error <= tolerance(hidden.dtype):
        return True, None
    return False, f"the fused tree forward is off by {error:.1e} (relative) against one-token steps"


def _frozen_verification_verdict(
    mixer: torch.nn.Module, model: torch.nn.Module, fused: bool
) -> tuple[bool, str | None]:
    # (no continuation prerequisite: the frozen verification replaces transformers' multi-token scan)
    hidden = probe_inputs(mixer, model, 6)
    new_cache = _new_cache(model)
    cache = new_cache()
    mixer(hidden[:, :2], cache_params=cache)
    cache.advance(2)
    before = layer_states(cache, mixer)
    recorder = state_replay.StateRecorder(model, cache, mixers=[mixer], fused=fused)
    if fused and recorder.fused_mixers != [mixer]:
        return False, "the fused verification forward does not serve this mixer"
    with recorder.verifying(4):
        output = mixer(hidden[:, 2:6], cache_params=cache)
    untouched = worst_error(list(zip(layer_states(cache, mixer), before, strict=True)))
    if untouched > 0:
        return False, f"the frozen verification changed the state (by {untouched:.1e}, relative)"
    recorder.commit(2)
    expected_outputs, _ = stepped(mixer, hidden, [2, 3, 4, 5], new_cache)
    _, expected_states = stepped(mixer, hidden, [2, 3], new_cache)
    error = worst_error(
        [(output, expected_outputs), *zip(layer_states(cache, mixer), expected_states, strict=True)]
    )
    if error <= tolerance(hidden.dtype):
        return True, None
    return False, f"the single-chunk verification or its commit is off by {error:.1e} (relative)"


_PROBES = {
    "continuation": probe_continuation,
    "replay": _probe_replay,
    "identity_steps": _probe_identity_steps,
    "tree_scan": _probe_tree_scan,
    "state_replay": _probe_state_replay,
    "fused_verification": _probe_fused_verification,
}
