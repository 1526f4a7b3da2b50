"""The canonical tree and its compiler: golden tensors, and tree verification == per-branch decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_specssm.tree import TokenTree, accept_tree_greedy, compile_tree, kept_positions

from tests.helpers.models import VOCAB, build

# root ─ 0 ─ 1 ─ 3
#      └ 2 ─ 4
#          └ 5
TREE = TokenTree(tokens=torch.tensor([10, 11, 12, 13, 14, 15]), parents=torch.tensor([-1, 0, -1, 1, 2, 2]))


def test_tree_structure_golden():
    assert TREE.depths().tolist() == [1, 2, 1, 3, 2, 2]
    assert TREE.path(3) == [0, 1, 3] and TREE.path(5) == [2, 5] and TREE.path(-1) == []
    assert TREE.children(-1) == [0, 2] and TREE.children(2) == [4, 5] and TREE.children(3) == []
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [0, 0, 1, 0, 1, 0],
            [0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(TREE.ancestor_mask(), expected)


def test_compiler_golden():
    compiled = compile_tree(TREE, past_length=3, chain_length=2, dtype=torch.float32)
    allowed = compiled.attention_mask[0, 0] == 0
    expected = torch.tensor(
        # past 0-2 | chain 3-4 | nodes 5-10
        [
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 1, 0, 1, 0],
            [1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert compiled.attention_mask[0, 0, 0, 4].item() == torch.finfo(torch.float32).min
    assert compiled.position_ids.tolist() == [[3, 4, 5, 6, 5, 7, 6, 6]]
    assert compiled.node_offset == 2
    assert kept_positions(3, 2, [2, 5]).tolist() == [0, 1, 2, 3, 4, 7, 10]


def test_chain_tree_compiles_to_a_causal_mask():
    chain = TokenTree.chain(torch.tensor([5, 6, 7]))
    compiled = compile_tree(chain, past_length=2, chain_length=1, dtype=torch.float32)
    allowed = compiled.attention_mask[0, 0] == 0
    assert torch.equal(allowed, torch.ones(4, 6, dtype=torch.bool).tril(diagonal=2))
    assert compiled.position_ids.tolist() == [[2, 3, 4, 5]]


def test_bad_trees_are_refused():
    with pytest.raises(ValueError, match="topological"):
        TokenTree(tokens=torch.tensor([1, 2]), parents=torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="equal length"):
        TokenTree(tokens=torch.tensor([1, 2]), parents=torch.tensor([-1]))
    with pytest.raises(ValueError, match="root token"):
        compile_tree(TREE, past_length=0, chain_length=0, dtype=torch.float32)


def test_greedy_tree_acceptance_golden():
    scores = torch.full((7, 20), -1.0)
    # root -> 12 (node 2), node 2 -> 15 (node 5), node 5 -> 3 (not in the tree)
    scores[0, 12] = scores[3, 15] = scores[6, 3] = 1.0
    assert accept_tree_greedy(TREE, scores) == ([2, 5], 3)
    scores = torch.full((7, 20), -1.0)
    scores[0, 9] = 1.0  # no child of the root matches
    assert accept_tree_greedy(TREE, scores) == ([], 9)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt_neox", "mistral"])
@torch.no_grad()
def test_tree_verification_equals_per_branch_decoding(kind):
    model = build(kind, seed=0)
    generator = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, VOCAB, (1, 6), generator=generator)  # 5 cached + 1 chain (the root)
    tree = TokenTree(tokens=torch.randint(3, VOCAB, (6,), generator=generator), parents=TREE.parents)
    cache = DynamicCache(config=model.config)
    model(prefix[:, :5], past_key_values=cache, use_cache=True)
    compiled = compile_tree(tree, past_length=5, chain_length=1, dtype=model.dtype)
    tokens = torch.cat([prefix[:, 5:], tree.tokens[None]], dim=1)
    logits = model(
        tokens,
        past_key_values=cache,
        attention_mask=compiled.attention_mask,
        position_ids=compiled.position_ids,
    ).logits[0]
    worst = 0.0
    for node in range(tree.size):
        branch = torch.cat([prefix, tree.tokens[tree.path(node)][None]], dim=1)
        reference = model(branch).logits[0, -1]
        worst = max(worst, (logits[1 + node] - reference).abs().max().item())
    assert worst < 1e-4, f"max abs diff {worst:.2e}"
    # and a plain causal mask over the same tokens is wrong for siblings: the check can fail
    cache = DynamicCache(config=model.config)
    model(prefix[:, :5], past_key_values=cache, use_cache=True)
    causal = model(tokens, past_key_values=cache).logits[0]
    sibling = torch.cat([prefix, tree.tokens[tree.path(2)][None]], dim=1)
    assert (causal[1 + 2] - model(sibling).logits[0, -1]).abs().max() > 1e-3


def test_tree_from_paths_merges_shared_prefixes():
    tree = TokenTree.from_paths([[5, 6, 7], [5, 6, 8], [5, 9], [4], []])
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 1, 0, -1]
    assert TokenTree.from_paths([]).size == 0


def test_one_path_trees_are_chains():
    assert TokenTree.chain(torch.tensor([5, 6, 7])).is_chain
    assert TokenTree.chain(torch.tensor([], dtype=torch.long)).is_chain
    assert not TREE.is_chain
    # one path, but not in node order (node 0 hangs below node 1): verified as a tree
    assert not TokenTree(tokens=torch.tensor([5, 6]), parents=torch.tensor([-1, -1])).is_chain


class _CountingTarget:
    """Wraps an `AttentionTarget`'s `score` / `score_tree` to record which one verified."""

    def __init__(self, target):
        self.calls = []
        for name in ("score", "score_tree"):
            original = getattr(target, name)

            def wrapper(*args, _name=name, _original=original):
                self.calls.append(_name)
                return _original(*args)

            setattr(target, name, wrapper)


@torch.no_grad()
def test_a_one_path_tree_is_verified_and_committed_as_a_chain():
    from hf_specssm.drafters.base import Draft
    from hf_specssm.targets.attention import AttentionTarget

    model = build("llama", seed=0)
    generator = torch.Generator().manual_seed(3)
    sequence = torch.randint(3, VOCAB, (1, 9), generator=generator)
    drafts = torch.randint(3, VOCAB, (4,), generator=generator)
    results = {}
    for proposal in (Draft(tokens=drafts[None]), TokenTree.chain(drafts)):
        target = AttentionTarget(model, DynamicCache(config=model.config))
        counting = _CountingTarget(target)
        target.prefill([sequence])
        (logits,) = target.verify([sequence], [proposal])
        target.commit([[0, 1]])
        keys = target.cache.layers[0].keys.clone()
        results[type(proposal).__name__] = (logits, keys, target.consumed, counting.calls)
    (chain_logits, chain_keys, chain_consumed, chain_calls) = results["Draft"]
    (tree_logits, tree_keys, tree_consumed, tree_calls) = results["TokenTree"]
    assert chain_calls == tree_calls == ["score"]
    assert torch.equal(tree_logits, chain_logits) and torch.equal(tree_keys, chain_keys)
    assert tree_consumed == chain_consumed == sequence.shape[1] + 2
    # a tree that branches still takes the tree forward (the control)
    target = AttentionTarget(model, DynamicCache(config=model.config))
    counting = _CountingTarget(target)
    target.prefill([sequence])
    target.verify([sequence], [TokenTree(tokens=drafts, parents=torch.tensor([-1, 0, -1, 2]))])
    assert counting.calls == ["score_tree"]


@pytest.mark.parametrize("kept", [[0, 1, 2], [3, 4], []], ids=["first-path", "second-branch", "none"])
@torch.no_grad()
def test_keeping_a_tree_path_equals_the_gather(kept):
    """A path that is the tree's first nodes is cropped instead of gathered: same keys and values, and
    the next forward from either cache gives the same logits."""
    from hf_specssm._compat.attention import keep_attention_positions

    model = build("llama", seed=0)
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, VOCAB, (1, 12), generator=generator)
    caches = []
    for gather in (True, False):
        cache = DynamicCache(config=model.config)
        model(tokens, past_key_values=cache, use_cache=True)
        positions = torch.tensor([*range(7), *(7 + node for node in kept)], dtype=torch.long)
        if gather:  # the reference: every layer's keys and values gathered
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(2, positions)
                layer.values = layer.values.index_select(2, positions)
        else:
            keep_attention_positions(cache, positions)
        caches.append(cache)
    for reference, layer in zip(caches[0].layers, caches[1].layers):
        assert torch.equal(reference.keys, layer.keys) and torch.equal(reference.values, layer.values)
    following = torch.randint(3, VOCAB, (1, 2), generator=generator)
    logits = [model(following, past_key_values=cache, use_cache=True).logits for cache in caches]
    assert torch.equal(logits[0], logits[1])
