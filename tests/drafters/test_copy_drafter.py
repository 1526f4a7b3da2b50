"""ContextCopyDrafter: a model drafter plus prompt lookup, as chains and as trees; lossless and stateful."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_specssm
from hf_specssm.drafters import DraftSampler
from hf_specssm.drafters.base import RoundOutcome
from hf_specssm.tree import TokenTree

from tests.helpers.models import VOCAB, align, build
from tests.helpers.sampling import ALPHA, chi_square_p_value, exact_distribution, sample_continuations
from tests.helpers.states import fresh, max_state_diff

ATOL = 5e-5


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _pair(target_kind="llama", drafter_kind="mamba", vocab=VOCAB):
    target = _no_eos(build(target_kind, seed=0, vocab=vocab))
    drafter = _no_eos(build(drafter_kind, seed=1, vocab=vocab))
    align(target, drafter, head_noise=0.3)
    hf_specssm.enable(target)
    return target, drafter


class FixedTree(hf_specssm.ModelDrafter):
    """A model drafter whose tree is given (to test the graft)."""

    def __init__(self, model, tree):
        super().__init__(model, tree_shape=(1,))
        self.fixed = tree

    def draft_tree(self, input_ids, sampler, shape=None):
        super().draft_tree(input_ids, sampler, (1,))
        return self.fixed


def test_the_copy_is_grafted_onto_the_tree_sharing_agreeing_nodes():
    model = build("mamba", seed=1)
    # model tree: root → 5 (→ 7, → 8), root → 6
    tree = TokenTree(tokens=torch.tensor([5, 6, 7, 8]), parents=torch.tensor([-1, -1, 0, 0]))
    drafter = hf_specssm.ContextCopyDrafter(
        FixedTree(model, tree), hf_specssm.PromptLookupDrafter(num_draft_tokens=3)
    )
    # the context ends with "1 2" and earlier had "1 2 5 7 9": the copy is 5 7 9
    ids = torch.tensor([[1, 2, 5, 7, 9, 3, 1, 2]])
    drafter.begin(ids)
    grafted = drafter.draft_tree(ids, DraftSampler(None, False))
    assert grafted.tokens.tolist() == [5, 6, 7, 8, 9]
    assert grafted.parents.tolist() == [-1, -1, 0, 0, 2]
    assert drafter.copied_rounds == 1
    # no match: the model's tree as it is
    other = torch.tensor([[1, 2, 3, 4]])
    drafter.begin(other)
    assert drafter.draft_tree(other, DraftSampler(None, False)) is tree


def test_chain_rounds_copy_only_long_enough_matches():
    model = build("mamba", seed=1)
    drafter = hf_specssm.ContextCopyDrafter(hf_specssm.ModelDrafter(model, num_draft_tokens=2), min_copy=3)
    sampler = DraftSampler(None, False)
    ids = torch.tensor([[4, 9, 1, 2, 3, 8, 8, 6, 9, 1]])
    drafter.begin(ids)
    draft = drafter.draft(ids, 2, sampler)
    assert drafter.last_round_copied and draft.tokens.tolist() == [[2, 3, 8, 8, 6, 9, 1]]
    drafter.commit(torch.cat([ids, torch.tensor([[2, 3, 5]])], dim=1), 2)
    # "3 5" never occurred before: the model drafts
    ids = torch.tensor([[4, 9, 1, 2, 3, 8, 8, 6, 9, 1, 2, 3, 5]])
    draft = drafter.draft(ids, 2, sampler)
    assert not drafter.last_round_copied and draft.tokens.shape == (1, 2)


def test_errors():
    with pytest.raises(ValueError, match="must be a model drafter"):
        hf_specssm.ContextCopyDrafter(hf_specssm.PromptLookupDrafter())
    with pytest.raises(ValueError, match="must be a model drafter"):
        hf_specssm.ContextCopyDrafter(hf_specssm.ContextCopyDrafter(hf_specssm.ModelDrafter(build("mamba"))))
    with pytest.raises(ValueError, match="min_copy"):
        hf_specssm.ContextCopyDrafter(hf_specssm.ModelDrafter(build("mamba")), min_copy=0)


def _run_policy_rounds(drafter, copies_pass, rounds: int = 48) -> list[str]:
    """Drive `drafter` through `rounds` chain rounds with made-up outcomes; the kind of each round.

    Every context has an earlier match (it alternates two tokens), so a round copies whenever the copy
    gate lets it. Copied drafts all pass (`copies_pass`, a bool or a function of the round index) or all
    fail; the model's drafts always fail. The lookup prices rounds by `draft_cost_ratio`, so no time is
    measured.
    """
    sampler = DraftSampler(None, False)
    ids = torch.tensor([[3, 4, 3, 4, 3]])
    drafter.begin(ids)
    kinds = []
    for index in range(rounds):
        plan = drafter.plan_round(room=1000, tree_problem=None)
        draft = drafter.draft(ids, plan.num_tokens, sampler) if plan.num_tokens else None
        drafted = draft.tokens.shape[1] if draft is not None else 0
        copied = drafter.last_round_copied
        kinds.append("copy" if copied else "model" if drafted else "plain")
        passing = copies_pass(index) if callable(copies_pass) else copies_pass
        accepted = drafted if copied and passing else 0
        new_tokens = [*draft.tokens[0, :accepted].tolist(), 3 + ids.shape[1] % 2] if drafted else [3]
        ids = torch.cat([ids, torch.tensor([new_tokens])], dim=1)
        drafter.commit(ids, accepted)
        outcome = RoundOutcome(drafted, accepted, accepted + 1, 0.01, 0.1, 0.1 + 0.02 * drafted)
        drafter.observe_round(plan, outcome)
    drafter.end()
    return kinds


@pytest.mark.parametrize("copies_pass", [False, True], ids=["copies-fail", "copies-pass"])
def test_copy_rounds_are_judged_by_their_own_gate(copies_pass):
    lookup = hf_specssm.PromptLookupDrafter(
        max_ngram_size=1, min_ngram_size=1, num_draft_tokens=6, draft_cost_ratio=0.01
    )
    inner = hf_specssm.ModelDrafter(build("mamba", seed=1), num_draft_tokens=2, schedule="constant")
    kinds = _run_policy_rounds(hf_specssm.ContextCopyDrafter(inner, lookup, min_copy=1), copies_pass)
    late = kinds[16:]
    if copies_pass:
        # copying pays: every late round copies (the control: the gate is not simply closed)
        assert late.count("copy") == len(late), kinds
    else:
        # copies that never pass cost a wide verification for one token: the gate stops them, and the
        # model drafts instead; only probes (a one-token copy every 8, 16, 32 … rounds) still copy
        assert kinds[:2] == ["copy", "copy"], kinds
        assert late.count("copy") <= 3 and late.count("model") >= len(late) - 3, kinds


def test_a_probe_that_finds_copies_passing_again_reopens_copying():
    """The gate probes with one token; a copy needs `min_copy` (here 2), so the probe copies that many."""
    lookup = hf_specssm.PromptLookupDrafter(
        max_ngram_size=1, min_ngram_size=1, num_draft_tokens=6, draft_cost_ratio=0.01
    )
    inner = hf_specssm.ModelDrafter(build("mamba", seed=1), num_draft_tokens=2, schedule="constant")
    drafter = hf_specssm.ContextCopyDrafter(inner, lookup, min_copy=2)
    kinds = _run_policy_rounds(drafter, lambda index: index >= 20, rounds=96)
    assert kinds[10:20].count("copy") <= 2, kinds
    assert kinds[-20:].count("copy") >= 15, kinds


def test_a_closed_copy_gate_and_a_closed_model_gate_make_plain_rounds():
    lookup = hf_specssm.PromptLookupDrafter(
        max_ngram_size=1, min_ngram_size=1, num_draft_tokens=6, draft_cost_ratio=0.01
    )
    # the model's own adaptive schedule gates its drafts too (priced the same way)
    inner = hf_specssm.ModelDrafter(build("mamba", seed=1), num_draft_tokens=2, draft_cost_ratio=0.01)
    kinds = _run_policy_rounds(hf_specssm.ContextCopyDrafter(inner, lookup, min_copy=1), False, rounds=64)
    assert kinds[-24:].count("plain") >= 20, kinds


REPEATING = torch.tensor([[3, 9, 4, 11, 7, 2, 8, 5, 3, 9, 4, 11, 7, 2, 8, 5, 3, 9]])


@pytest.mark.parametrize(
    "target_kind, options",
    [
        pytest.param("llama", {}, id="llama-chain"),
        pytest.param("llama", {"tree_shape": (2, 2, 1)}, id="llama-tree"),
        pytest.param("llama", {"tree_policy": hf_specssm.UCBTreePolicy()}, id="llama-bandit"),
        pytest.param("llama", {"tree_policy": hf_specssm.DynamicTreePolicy(depth=3, top_k=2, max_nodes=6)}, id="llama-dynamic"),
        pytest.param("mamba2", {"tree_shape": (2, 1)}, id="mamba2-tree"),
        pytest.param("jamba", {}, id="jamba-chain"),
    ],
)  # fmt: skip
def test_greedy_output_equals_the_target_alone(target_kind, options):
    target, drafter_model = _pair(target_kind)
    plain = target.generate(REPEATING, max_new_tokens=30, do_sample=False)
    drafter = hf_specssm.ContextCopyDrafter(
        hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant", **options)
    )
    spec = target.generate(REPEATING, assistant_model=drafter, max_new_tokens=30, do_sample=False)
    assert torch.equal(plain, spec)
    assert drafter.copied_rounds > 0


@torch.no_grad()
@pytest.mark.parametrize("rounds", ["chain", "tree", "both"])
def test_drafter_state_after_copy_rounds_matches_recompute(rounds):
    target, drafter_model = _pair("llama", "mamba2")

    class Recording(hf_specssm.ModelDrafter):
        def end(self):
            self.final_cache = self.cache
            super().end()

    options = {"tree_shape": (2, 1)} if rounds == "tree" else {}
    inner = Recording(drafter_model, num_draft_tokens=3, schedule="constant", **options)
    drafter = hf_specssm.ContextCopyDrafter(inner, chain_rounds="both" if rounds == "both" else "either")
    output = target.generate(REPEATING, assistant_model=drafter, max_new_tokens=40, do_sample=False)
    assert drafter.copied_rounds > 0
    assert any(target.last_speculation_stats.tree_rounds) is (rounds != "chain")
    consumed = inner.final_cache.seen_tokens
    reference, _ = fresh(drafter_model, output[:, :consumed])
    assert max_state_diff(inner.final_cache, reference) < ATOL


def test_copying_raises_acceptance_where_the_target_repeats_itself():
    """Greedy random models fall into loops; copying from the context then drafts what an unrelated
    model cannot."""
    target, _ = _pair()
    unrelated = _no_eos(build("mamba", seed=5))
    prompt = REPEATING
    plain = target.generate(prompt, max_new_tokens=60, do_sample=False)
    tail = plain[0, -20:].tolist()
    assert len(set(tail)) < 12, "the test needs a target that repeats itself"
    alone = hf_specssm.ModelDrafter(unrelated, num_draft_tokens=3, schedule="constant")
    target.generate(prompt, assistant_model=alone, max_new_tokens=60, do_sample=False)
    accepted_alone = target.last_speculation_stats.accepted_tokens
    copy = hf_specssm.ContextCopyDrafter(
        hf_specssm.ModelDrafter(unrelated, num_draft_tokens=3, schedule="constant")
    )
    spec = target.generate(prompt, assistant_model=copy, max_new_tokens=60, do_sample=False)
    assert torch.equal(plain, spec)
    assert target.last_speculation_stats.accepted_tokens > accepted_alone + 10


@pytest.mark.slow
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_sampling_keeps_the_target_distribution(tree):
    vocab = 5
    target = _no_eos(build("llama", seed=0, vocab=vocab))
    # unrelated to the target, so that the power check below can reject its distribution
    drafter_model = _no_eos(build("mamba", seed=1, vocab=vocab))
    hf_specssm.enable(target)
    prompt = torch.tensor([[1, 3, 4, 1, 3]])
    probs = exact_distribution(target, prompt)
    options = {"tree_shape": (2, 1)} if tree else {}
    counts, accepted = sample_continuations(
        target,
        drafter_model,
        prompt,
        samples=2500,
        seed=11,
        vocab=vocab,
        drafter_options=options,
        wrap=lambda d: hf_specssm.ContextCopyDrafter(
            d, hf_specssm.PromptLookupDrafter(num_draft_tokens=2), min_copy=1
        ),
    )
    assert chi_square_p_value(counts, probs) > ALPHA
    assert 0 in accepted and max(accepted) >= 1
    # power: the drafter's own distribution is rejected by the same test
    drafter_probs = exact_distribution(drafter_model, prompt)
    wrong = np.random.default_rng(0).multinomial(int(counts.sum()), drafter_probs / drafter_probs.sum())
    assert chi_square_p_value(wrong.astype(float), probs) < ALPHA


# ---------------------------------------------------------------- two-branch rounds (chain_rounds="both")


class RecordingCommits(hf_specssm.ModelDrafter):
    """A model drafter that records what `commit` was told."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.commits: list[int] = []

    def commit(self, input_ids, num_accepted):
        self.commits.append(num_accepted)
        super().commit(input_ids, num_accepted)


def test_both_rounds_verify_the_model_chain_and_the_copy_as_one_tree():
    inner = RecordingCommits(build("mamba", seed=1), num_draft_tokens=3, schedule="constant")
    drafter = hf_specssm.ContextCopyDrafter(
        inner, hf_specssm.PromptLookupDrafter(num_draft_tokens=4), chain_rounds="both"
    )
    sampler = DraftSampler(None, False)
    # the context ends with "1 2" and earlier had "1 2 5 7 9 4": the copy is 5 7 9 4
    ids = torch.tensor([[1, 2, 5, 7, 9, 4, 3, 1, 2]])
    drafter.begin(ids)
    plan = drafter.plan_round(room=100, tree_problem=None)
    assert plan.tree and plan.shape is None
    tree = drafter.draft_tree(ids, sampler, plan.shape)
    chain = tree.tokens[:3].tolist()
    # the model's chain holds the first three nodes; the copy follows it while they agree, then branches
    assert tree.parents[:3].tolist() == [-1, 0, 1]
    shared = next((i for i, (a, b) in enumerate(zip(chain, [5, 7, 9])) if a != b), 3)
    assert tree.size == 3 + 4 - shared and drafter.last_round_copied
    paths = {tuple(tree.tokens[tree.path(node)].tolist()) for node in range(tree.size)}
    assert (5, 7, 9, 4) in paths and tuple(chain) in paths
    # the target keeps the copy's first two tokens: the model keeps the part of its chain they agree with
    copy_nodes = [
        node for node in range(tree.size) if tuple(tree.tokens[tree.path(node)].tolist()) in {(5,), (5, 7)}
    ]
    after = torch.cat([ids, torch.tensor([[5, 7, 8]])], dim=1)
    drafter.commit_tree(after, sorted(copy_nodes))
    assert inner.commits == [min(shared, 2)]
    drafter.observe_round(plan, RoundOutcome(tree.size, 2, 3, 0.01, 0.1, 0.12))
    # no match: a chain round
    drafter.begin(torch.tensor([[1, 2, 3, 4]]))
    assert not drafter.plan_round(room=100, tree_problem=None).tree


def test_both_rounds_need_a_target_that_verifies_trees_and_either_keeps_chains():
    ids = torch.tensor([[1, 2, 5, 7, 9, 4, 3, 1, 2]])
    for chain_rounds, problem, tree in [
        ("both", None, True),
        ("both", "no trees here", False),
        ("either", None, False),
    ]:
        inner = hf_specssm.ModelDrafter(build("mamba", seed=1), num_draft_tokens=3, schedule="constant")
        drafter = hf_specssm.ContextCopyDrafter(inner, chain_rounds=chain_rounds)
        drafter.begin(ids)
        plan = drafter.plan_round(room=100, tree_problem=problem)
        assert plan.tree is tree, (chain_rounds, problem)
    with pytest.raises(ValueError, match="chain_rounds"):
        hf_specssm.ContextCopyDrafter(inner, chain_rounds="tree")


def test_a_sampled_chain_makes_the_round_a_copy_and_the_call_go_back_to_either():
    inner = RecordingCommits(build("mamba", seed=1), num_draft_tokens=3, schedule="constant")
    drafter = hf_specssm.ContextCopyDrafter(
        inner, hf_specssm.PromptLookupDrafter(num_draft_tokens=4), chain_rounds="both"
    )
    torch.manual_seed(0)
    sampler = DraftSampler(None, True)
    ids = torch.tensor([[1, 2, 5, 7, 9, 4, 3, 1, 2]])
    drafter.begin(ids)
    plan = drafter.plan_round(room=100, tree_problem=None)
    tree = drafter.draft_tree(ids, sampler, plan.shape)
    # the copy alone, deterministic; the model's chain is rolled back to the round's start
    assert tree.tokens.tolist() == [5, 7, 9, 4] and tree.draft_probs is None
    after = torch.cat([ids, torch.tensor([[5, 6]])], dim=1)
    drafter.commit_tree(after, [0])
    assert inner.commits == [0]
    drafter.observe_round(plan, RoundOutcome(4, 1, 2, 0.01, 0.1, 0.12))
    assert not drafter.plan_round(room=100, tree_problem=None).tree
    # a new call tries both branches again
    drafter.begin(ids)
    assert drafter.plan_round(room=100, tree_problem=None).tree


@pytest.mark.parametrize("target_kind", ["llama", "mamba2", "jamba"])
def test_both_rounds_keep_greedy_output_the_targets(target_kind):
    target, drafter_model = _pair(target_kind)
    plain = target.generate(REPEATING, max_new_tokens=30, do_sample=False)
    counts = {}
    for chain_rounds in ("both", "either"):
        drafter = hf_specssm.ContextCopyDrafter(
            hf_specssm.ModelDrafter(drafter_model, num_draft_tokens=3, schedule="constant"),
            chain_rounds=chain_rounds,
        )
        spec = target.generate(REPEATING, assistant_model=drafter, max_new_tokens=30, do_sample=False)
        assert torch.equal(plain, spec), chain_rounds
        counts[chain_rounds] = sum(target.last_speculation_stats.tree_rounds)
    # two-branch rounds are tree rounds; either-or rounds are chains (the control)
    assert counts["both"] > 0 and counts["either"] == 0, counts
