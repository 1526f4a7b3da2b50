"""When a mixer probe fails, the call takes a slower path that is still exact (forced failures).

Each capability of `_compat.probes.MixerSupport` is forced off in turn: the target `make_target` picks
must be the documented fallback, and greedy output and the committed state must still equal plain
decoding's.
"""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm._compat import probes
from hf_specssm.drafters import ModelDrafter
from hf_specssm.targets import JointTarget, RecurrentTarget, make_target

from tests.helpers.models import VOCAB, align, build
from tests.helpers.scripted import ScriptedDrafter
from tests.helpers.states import fresh, max_state_diff


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("forced", "verification", "expected"),
    [
        pytest.param({}, "joint", "joint", id="nothing-forced"),
        pytest.param({"identity_steps": False}, "joint", "replay", id="no-identity-steps"),
        pytest.param({"replay": False}, "replay", "refeed", id="no-replay"),
        pytest.param({"identity_steps": False, "replay": False}, "joint", "refeed", id="neither"),
        # the frozen verification replaces transformers' multi-token scan, so the Mamba2 layout keeps it
        pytest.param(
            {"continuation": "none"}, "replay", {"mamba": "stepwise", "bamba": "replay"}, id="no-continuation"
        ),
        pytest.param(
            {"continuation": "none"},
            "joint",
            {"mamba": "stepwise", "bamba": "replay"},
            id="no-continuation-joint",
        ),
        pytest.param(
            {"continuation": "none", "state_replay": False},
            "replay",
            "stepwise",
            id="no-continuation-no-state",
        ),
    ],
)
@pytest.mark.parametrize("target_kind", ["mamba", "bamba"])
def test_a_failed_probe_falls_back_to_an_exact_method(target_kind, forced, verification, expected):
    if isinstance(expected, dict):
        expected = expected[target_kind]
    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = _prompt(6, 0)
    reference = target.generate(prompt, max_new_tokens=24, do_sample=False)
    with probes.forced(**forced):
        chosen = make_target(target, None, verification)
        assert (chosen.method if isinstance(chosen, RecurrentTarget) else "joint") == expected
        assert isinstance(chosen, JointTarget) == (expected == "joint")
        # every accept length, so the fallback's commit is exercised on partial acceptance
        drafter = ScriptedDrafter(reference, [2, 0, 4, 1, 3], 4, VOCAB)
        output = target.generate(
            prompt,
            assistant_model=drafter,
            max_new_tokens=24,
            do_sample=False,
            verification=verification,
            return_dict_in_generate=True,
        )
    assert torch.equal(output.sequences, reference)
    # (joint verification stops its cache before the last round's tokens: it feeds them again next round)
    cache = output.past_key_values
    recomputed, _ = fresh(target, output.sequences[:, : cache.seen_tokens])
    assert max_state_diff(cache, recomputed) < 1e-4
    if expected != "joint":
        assert cache.seen_tokens == output.sequences.shape[1] - 1


def test_without_the_tree_scan_self_shaped_trees_become_chains_and_explicit_trees_are_refused():
    target = hf_specssm.enable(build("mamba2", seed=0))
    drafter_model = build("mamba", seed=1)
    align(target, drafter_model)
    prompt = _prompt(5, 1)
    reference = target.generate(prompt, max_new_tokens=20, do_sample=False)
    lookup = hf_specssm.PromptLookupDrafter(max_candidates=3, num_draft_tokens=4)
    with probes.forced(tree_scan=False):
        output = target.generate(prompt, assistant_model=lookup, max_new_tokens=20, do_sample=False)
        assert torch.equal(output, reference)
        assert not target.last_speculation_stats.tree_shapes
        with pytest.raises(ValueError, match="tree"):
            target.generate(
                prompt, assistant_model=ModelDrafter(drafter_model, tree_shape=(2, 1)), max_new_tokens=8
            )
    # with the scan admitted, the same explicit tree runs and matches
    output = target.generate(
        prompt,
        assistant_model=ModelDrafter(drafter_model, tree_shape=(2, 1)),
        max_new_tokens=20,
        do_sample=False,
    )
    assert torch.equal(output, reference)
    assert target.last_speculation_stats.tree_shapes


def test_batches_refuse_a_target_without_exact_replay():
    target = hf_specssm.enable(build("mamba2", seed=0))
    prompts = _prompt(10, 2).view(2, 5)
    with probes.forced(replay=False), pytest.raises(ValueError, match="one prompt per call"):
        target.generate(prompts, assistant_model=build("mamba2", seed=1), max_new_tokens=6)
