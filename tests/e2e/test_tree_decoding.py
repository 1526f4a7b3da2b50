"""Tree drafting by state forking and tree verification on Transformer targets (greedy, lossless)."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm.policies.tree_shape import DEFAULT_ARMS
from hf_specssm.tree import TokenTree

from tests.helpers.drafters import RecordingDrafter
from tests.helpers.models import VOCAB, align, build
from tests.helpers.states import fresh, max_state_diff

# every arm of the bandit's default pool, and a one-level tree
SHAPES = [*DEFAULT_ARMS, (4,)]


# The whole grid is 56 cases; `-m "not slow"` keeps the Mamba2 drafter's 14 (every shape, both targets).
@pytest.mark.parametrize(
    ("target_kind", "drafter_kind", "shape"),
    [
        pytest.param(
            target,
            drafter,
            shape,
            id=f"{target}-{drafter}-{'x'.join(map(str, shape))}",
            marks=() if drafter == "mamba2" else pytest.mark.slow,
        )
        for target in ["llama", "gpt_neox"]
        for drafter in ["mamba", "mamba2", "falcon_mamba", "llama"]
        for shape in SHAPES
    ],
)
def test_tree_greedy_parity(target_kind, drafter_kind, shape):
    target = hf_specssm.enable(build(target_kind, seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    paths = []
    for length, seed in [(5, 0), (1, 1), (12, 2)]:
        prompt = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
        reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
        drafter = hf_specssm.ModelDrafter(drafter_model, tree_shape=shape)
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
        assert torch.equal(output, reference), f"prompt {length}"
        paths += target.last_speculation_stats.accepted_lengths
    assert max(paths) >= min(2, len(shape))  # accepted paths go below the first level


@pytest.mark.parametrize("drafter_kind", ["mamba", "mamba2"])
def test_tree_drafter_state_matches_recompute(drafter_kind):
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    drafter = RecordingDrafter(drafter_model, tree_shape=(3, 2, 2, 1))
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
    cache = drafter.final_cache
    assert all(state.shape[0] == 1 for state in cache.state_tensors())
    reference, _ = fresh(drafter_model, drafter.final_sequence[:, : cache.seen_tokens])
    assert max_state_diff(cache, reference) < 5e-5


def test_tree_shape_validation_and_unsupported_modes():
    with pytest.raises(ValueError, match="tree_shape"):
        hf_specssm.DraftConfig(tree_shape=(2, 0))
    with pytest.raises(ValueError, match="tree_shape"):
        hf_specssm.DraftConfig(tree_shape=[2, 2])
    target = hf_specssm.enable(build("llama", seed=0))
    drafter = hf_specssm.ModelDrafter(build("mamba", seed=1), tree_shape=(2, 2))
    prompt = torch.randint(3, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    ssm_target = hf_specssm.enable(build("mamba2", seed=0))
    # SSM targets verify trees with the tree scan (tests/targets/test_tree_scan.py), but not by joint
    # verification
    with pytest.raises(ValueError, match="verifies chains"):
        ssm_target.generate(prompt, assistant_model=drafter, max_new_tokens=5, verification="joint")
    with pytest.raises(ValueError, match="sliding-window"):
        hf_specssm.enable(build("mistral", seed=0)).generate(
            prompt, assistant_model=drafter, max_new_tokens=5
        )
    # nothing was harmed
    assert torch.equal(
        target.generate(prompt, assistant_model=drafter, max_new_tokens=8),
        target.generate(prompt, max_new_tokens=8),
    )


@pytest.mark.parametrize("drafter_kind", ["mamba", "mamba2", "llama"])
@pytest.mark.parametrize(
    "policy",
    [
        pytest.param((4, 3, 10), id="d4-k3-n10"),
        pytest.param((3, 2, 4), id="d3-k2-n4"),
        pytest.param((6, 1, 6), id="chain-like"),
    ],
)
def test_dynamic_tree_greedy_parity(drafter_kind, policy):
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build(drafter_kind, seed=1)
    align(target, drafter_model)
    depth, top_k, max_nodes = policy
    accepted = []
    for length, seed in [(5, 0), (1, 1), (12, 2)]:
        prompt = torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
        reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
        tree_policy = hf_specssm.DynamicTreePolicy(depth=depth, top_k=top_k, max_nodes=max_nodes)
        drafter = hf_specssm.ModelDrafter(drafter_model, tree_policy=tree_policy)
        output = target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
        assert torch.equal(output, reference), f"prompt {length}"
        stats = target.last_speculation_stats
        # nodes verified per round stay within the budget
        assert max(stats.draft_lengths) <= max_nodes
        accepted += stats.accepted_lengths
    assert max(accepted) >= 2


def test_dynamic_tree_is_a_valid_budgeted_tree_and_the_drafter_state_is_exact():
    target = hf_specssm.enable(build("llama", seed=0))
    drafter_model = build("mamba2", seed=1)
    align(target, drafter_model)
    policy = hf_specssm.DynamicTreePolicy(depth=4, top_k=3, max_nodes=9)
    drafter = RecordingDrafter(drafter_model, tree_policy=policy)
    trees = []
    original = drafter.draft_tree

    def record(*args, **kwargs):
        tree = original(*args, **kwargs)
        trees.append(tree)
        return tree

    drafter.draft_tree = record
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    target.generate(prompt, assistant_model=drafter, max_new_tokens=30, do_sample=False)
    assert trees and all(0 < tree.size <= 9 for tree in trees)
    assert any(tree.size == 9 for tree in trees) and max(int(tree.depths().max()) for tree in trees) >= 2
    for tree in trees:  # siblings are distinct tokens
        for node in [-1, *range(tree.size)]:
            children = tree.tokens[tree.children(node)].tolist()
            assert len(children) == len(set(children))
    cache = drafter.final_cache
    reference, _ = fresh(drafter_model, drafter.final_sequence[:, : cache.seen_tokens])
    assert max_state_diff(cache, reference) < 5e-5


@pytest.mark.parametrize(
    "drafter",
    [
        pytest.param(
            lambda: hf_specssm.PromptLookupDrafter(max_candidates=3, num_draft_tokens=4), id="lookup"
        ),
        pytest.param(
            lambda: hf_specssm.NgramTableDrafter(order=3, tree_shape=(3, 2, 1, 1)), id="ngram-table"
        ),
    ],
)
@pytest.mark.parametrize("target_kind", ["llama", "gpt_neox"])
def test_ngram_tree_greedy_parity(target_kind, drafter):
    target = hf_specssm.enable(build(target_kind, seed=0))
    pattern = torch.randint(3, VOCAB, (7,), generator=torch.Generator().manual_seed(3))
    prompt = torch.cat([pattern, pattern[:4], pattern[2:]]).repeat(2)[None]
    reference = target.generate(prompt, max_new_tokens=30, do_sample=False)
    output = target.generate(prompt, assistant_model=drafter(), max_new_tokens=30, do_sample=False)
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    assert stats.drafted_tokens > 0


class ScriptedTreeDrafter(hf_specssm.TreeDrafter):
    """Drafts a full tree of `shape` in which only one branch follows the target's greedy reference.

    Round `r` puts the right token at sibling `branch[r][d]` of the right node at depth `d`, for the first
    `depth[r]` depths, and wrong tokens everywhere else, so the accepted path is forced through every
    sibling position and every depth.
    """

    def __init__(self, reference, shape, script):
        super().__init__(hf_specssm.DraftConfig(tree_shape=shape))
        self.reference, self.shape, self.script = reference[0], shape, script
        self.forced: list[tuple[int, list[int]]] = []

    @property
    def vocab_size(self):
        return VOCAB

    def begin(self, input_ids):
        self._round = 0

    def draft(self, input_ids, num_tokens, sampler):
        return hf_specssm.Draft(tokens=input_ids.new_empty((1, 0)))

    def commit(self, input_ids, num_accepted):
        pass

    def draft_tree(self, input_ids, sampler, shape):
        start = input_ids.shape[1]
        depth, branch = self.script[self._round % len(self.script)]
        self._round += 1
        self.forced.append((depth, branch))
        tokens, parents = [], []
        frontier = [(-1, True)]  # (node, on the right branch so far)
        for level, width in enumerate(shape):
            truth = int(self.reference[start + level]) if start + level < self.reference.shape[0] else 3
            new = []
            for parent, right in frontier:
                for sibling in range(width):
                    good = right and level < depth and sibling == branch[level] % width
                    # wrong tokens: distinct from the truth and from each other
                    token = truth if good else 3 + (truth - 3 + 1 + sibling + level) % (VOCAB - 3)
                    if not good and token == truth:
                        token = 3 + (token - 3 + 1) % (VOCAB - 3)
                    tokens.append(token)
                    parents.append(parent)
                    new.append((len(tokens) - 1, good))
            frontier = new
        return TokenTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents))

    def commit_tree(self, input_ids, path):
        pass


@pytest.mark.parametrize("shape", [(3, 2, 2, 1, 1), (2, 2, 2, 1, 1, 1), (3, 3, 2, 1)])
def test_scripted_trees_force_every_branch_and_depth(shape):
    target = hf_specssm.enable(build("llama", seed=0))
    target.generation_config.eos_token_id = None
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
    reference = target.generate(prompt, max_new_tokens=60, do_sample=False)
    script = [
        (depth, [sibling] * len(shape)) for depth in range(len(shape) + 1) for sibling in range(max(shape))
    ]
    drafter = ScriptedTreeDrafter(reference, shape, script)
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=60, do_sample=False)
    assert torch.equal(output, reference)
    stats = target.last_speculation_stats
    tree_rounds = len(drafter.forced)
    forced_depths = [depth for depth, _ in drafter.forced]
    assert stats.accepted_lengths[:tree_rounds] == forced_depths
    assert set(forced_depths) == set(range(len(shape) + 1))
