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
