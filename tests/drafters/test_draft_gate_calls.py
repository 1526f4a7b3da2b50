"""The loop tells draft gates where each sequence starts, so a drafter kept across calls is judged fairly."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm.policies.draft_length import DraftGate

from tests.helpers.models import align, build


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture
def gate_rounds(monkeypatch):
    """`{id(gate): [(drafted, timed, new sequence?) per update]}` of every gate in the test (each gate kept
    alive, so no freed gate's id passes to a later one)."""
    rounds: dict[int, list[tuple[int, bool, bool]]] = {}
    started: set[int] = set()
    kept: dict[int, DraftGate] = {}
    begin, update = DraftGate.begin_sequence, DraftGate.update

    def begin_sequence(self):
        kept[id(self)] = self
        started.add(id(self))
        begin(self)

    def counted_update(self, drafted, committed, round_time_s):
        update(self, drafted, committed, round_time_s)
        kept[id(self)] = self
        rounds.setdefault(id(self), []).append((drafted, self.last_round_timed, id(self) in started))
        started.discard(id(self))

    monkeypatch.setattr(DraftGate, "begin_sequence", begin_sequence)
    monkeypatch.setattr(DraftGate, "update", counted_update)
    return rounds


def _calls(target, drafter, prompts):
    for prompt in prompts:
        out = hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=12, do_sample=False)
        plain = target.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(out, plain)


@pytest.mark.parametrize("copy", [False, True])
def test_a_kept_drafters_first_draft_of_each_call_is_not_timed(gate_rounds, copy):
    """A model drafter kept over three calls (alone, and inside `ContextCopyDrafter` with prompt lookup):
    each call starts a sequence at every gate, and the first drafted round after that start — the one in
    which the drafter reads the new prompt — is the gate's untimed round, the others are timed."""
    target = _no_eos(build("llama", seed=0))
    small = _no_eos(build("mamba", seed=1))
    align(target, small, head_noise=0.3)
    hf_specssm.enable(target)
    # a fixed cost ratio: the gate's decisions do not depend on this machine's timings
    model_drafter = hf_specssm.ModelDrafter(small, num_draft_tokens=3, draft_cost_ratio=0.05)
    assert model_drafter.catches_up and model_drafter.draft_gate.catches_up
    drafter = model_drafter
    if copy:
        lookup = hf_specssm.PromptLookupDrafter(num_draft_tokens=4)
        assert not lookup.draft_gate.catches_up  # lookups read nothing: its probes take one round
        drafter = hf_specssm.ContextCopyDrafter(model_drafter, lookup)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (1, 9), generator=generator) for _ in range(3)]
    _calls(target, drafter, prompts)
    rounds = gate_rounds[id(model_drafter.draft_gate)]
    starts = [i for i, (_, _, new) in enumerate(rounds) if new]
    assert len(starts) == 3
    for first, end in zip(starts, [*starts[1:], len(rounds)]):
        drafted = [i for i in range(first, end) if rounds[i][0] > 0]
        assert drafted, "the drafter drafted in every call"
        assert not rounds[drafted[0]][1], "the round that read the prompt is not timed"
        assert all(rounds[i][1] for i in drafted[1:]), "every later drafted round of the call is timed"


def test_the_bandit_is_not_rewarded_for_a_round_that_read_the_prompt():
    """Tree rounds: the UCB bandit learns each shape's tokens per second from every tree round but the first
    drafted round of each call, which also read the call's prompt (before, that round's read was charged
    to whichever shape it drew)."""
    target = _no_eos(build("llama", seed=0))
    small = _no_eos(build("mamba", seed=1))
    align(target, small, head_noise=0.3)
    hf_specssm.enable(target)
    policy = hf_specssm.UCBTreePolicy(arms=[(2, 1), (1, 1, 1)])
    drafter = hf_specssm.ModelDrafter(small, tree_policy=policy)
    generator = torch.Generator().manual_seed(1)
    tree_rounds = 0
    for _ in range(3):
        prompt = torch.randint(3, 60, (1, 9), generator=generator)
        hf_specssm.generate(target, prompt, drafter=drafter, max_new_tokens=12, do_sample=False)
        stats = target.last_speculation_stats
        assert stats.tree_rounds[0], "each call's first round drafts a tree"
        tree_rounds += sum(stats.tree_rounds)
    assert len(policy.history) == tree_rounds - 3


def test_a_heads_first_round_of_each_call_is_neither_rate(gate_rounds):
    """A one-beam ReDrafter head kept over three calls: it cannot draft in a call's first round (the target
    has handed over no hidden state yet), and that round also runs the target's prefill, so the gate takes
    it for neither rate (it was timed as a plain step); every later round of the call is timed, probes
    included (a head reads nothing but the hidden state it is handed)."""
    from hf_specssm.drafters.redrafter import ReDrafterDrafter

    from tests.drafters.test_redrafter_decoding import target_and_head

    target, head = target_and_head("llama", 0)
    config = hf_specssm.DraftConfig(num_draft_tokens=3, schedule="constant", draft_cost_ratio=0.05)
    drafter = ReDrafterDrafter(head, target, beam_width=1, config=config)
    generator = torch.Generator().manual_seed(0)
    _calls(target, drafter, [torch.randint(3, 60, (1, 9), generator=generator) for _ in range(3)])
    rounds = gate_rounds[id(drafter.draft_gate)]
    starts = [i for i, (_, _, new) in enumerate(rounds) if new]
    assert len(starts) == 3
    for first, end in zip(starts, [*starts[1:], len(rounds)]):
        assert rounds[first][:2] == (0, False), "the prefill round: undrafted, not timed"
        assert all(timed for _, timed, _ in rounds[first + 1 : end]), "a head reads nothing more later"
