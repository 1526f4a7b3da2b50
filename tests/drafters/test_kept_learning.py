"""`assistant_model=` with a model: each call wraps it in a new drafter, which takes over what the target's
earlier calls with the same assistant and settings learned (draft lengths, the draft gate)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import hf_specssm
from hf_specssm.drafters.base import Drafter

from tests.helpers.models import align, build
from tests.helpers.sampling import no_eos


@pytest.fixture
def policy_updates(monkeypatch):
    """The ids of the drafters' length policies, one entry per round, in order. The policies themselves are
    kept alive too: a policy freed after its call could leave its id to the next call's new one."""
    updated: list[int] = []
    kept: dict[int, object] = {}
    observe = Drafter.observe_round

    def counted(self, plan, outcome):
        kept[id(self.length_policy)] = self.length_policy
        updated.append(id(self.length_policy))
        observe(self, plan, outcome)

    monkeypatch.setattr(Drafter, "observe_round", counted)
    return updated


def _pair():
    target = no_eos(build("llama", seed=0))
    small = no_eos(build("mamba", seed=1))
    align(target, small, head_noise=0.3)
    hf_specssm.enable(target)
    return target, small


def _call(target, prompt, **kwargs):
    out = target.generate(prompt, max_new_tokens=12, do_sample=False, **kwargs)
    assert torch.equal(out, target.generate(prompt, max_new_tokens=12, do_sample=False))
    return out


def test_calls_with_one_assistant_share_what_they_learned(policy_updates):
    """Three calls with the same assistant model train one length policy (its round count goes on from
    call to call); another assistant, or other settings, start their own — the control that the sharing is
    keyed, not global. Outputs stay the target's greedy ones."""
    target, small = _pair()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (1, 9), generator=generator) for _ in range(3)]
    per_call = []
    for prompt in prompts:
        start = len(policy_updates)
        _call(target, prompt, assistant_model=small)
        per_call.append(set(policy_updates[start:]))
    assert all(len(ids) == 1 for ids in per_call), "one policy per call"
    assert per_call[0] == per_call[1] == per_call[2], "the calls share it"
    shared = next(iter(per_call[0]))

    other = no_eos(build("mamba", seed=2))
    start = len(policy_updates)
    _call(target, prompts[0], assistant_model=other)
    assert shared not in policy_updates[start:]

    start = len(policy_updates)
    _call(target, prompts[0], assistant_model=small, num_assistant_tokens=3)
    assert policy_updates[start:] and shared not in policy_updates[start:]


def test_kept_estimates_do_not_keep_the_assistant_alive():
    """What is kept holds neither the assistant nor its drafter: dropping the assistant frees it."""
    target, small = _pair()
    _call(
        target,
        torch.randint(3, 60, (1, 9), generator=torch.Generator().manual_seed(1)),
        assistant_model=small,
    )
    alive = weakref.ref(small)
    del small
    gc.collect()
    assert alive() is None


def test_a_transient_schedule_restarts_every_call(policy_updates):
    """`num_assistant_tokens_schedule="heuristic_transient"` restarts its length every call, as in transformers
    (`"heuristic"`, the control, carries over)."""
    target, small = _pair()
    prompt = torch.randint(3, 60, (1, 9), generator=torch.Generator().manual_seed(2))
    for schedule, shared in (("heuristic_transient", False), ("heuristic", True)):
        per_call = []
        for _ in range(2):
            start = len(policy_updates)
            _call(target, prompt, assistant_model=small, num_assistant_tokens_schedule=schedule)
            per_call.append(set(policy_updates[start:]))
        assert (per_call[0] == per_call[1]) is shared
