"""The canonical token tree and its compiler (attention mask, positions, paths).

A tree hangs off the last committed token (the *root*, which is not a node). Nodes are stored in
topological order: `parents[i] < i`, and `parents[i] = -1` for children of the root. One pure function,
`compile_tree`, turns a tree into what a Transformer needs to score every node in one forward: a 4D
additive attention mask in which each node sees the cached prefix, the chain of uncached committed tokens,
its ancestors and itself, and `position_ids = prefix length + depth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenTree:
    """A draft tree.

    `tokens` and `parents` are the tree's structure, read element by element while walking it, so drafters
    keep them on the CPU; targets move `tokens` to the model's device for the forward, and `compile_tree`
    builds the mask and positions there.

    Attributes:
        tokens: `[N]` token id of each node.
        parents: `[N]` index of each node's parent, `-1` for children of the root; `parents[i] < i`.
        draft_probs: `[N, V]` the distribution each node's token was sampled from (siblings share their
            parent's distribution), or `None` when the tree was drafted deterministically (top-w children,
            beams, n-gram matches). Only sampling acceptance reads it.
        sampled_without_replacement: with `draft_probs`, whether siblings were drawn without replacement
            (each sibling from the distribution with the earlier siblings removed) rather than i.i.d.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    draft_probs: torch.Tensor | None = None
    sampled_without_replacement: bool = False

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.parents.shape != self.tokens.shape:
            raise ValueError(
                f"tokens and parents must be 1-D of equal length, got {tuple(self.tokens.shape)} and "
                f"{tuple(self.parents.shape)}."
            )
        if self.draft_probs is not None and (
            self.draft_probs.ndim != 2 or self.draft_probs.shape[0] != self.tokens.shape[0]
        ):
            raise ValueError(
                f"draft_probs must be [N, V] with N = {self.tokens.shape[0]} nodes, got "
                f"{tuple(self.draft_probs.shape)}."
            )
        index = torch.arange(self.parents.shape[0])
        if bool(((self.parents < -1) | (self.parents >= index)).any()):
            raise ValueError(
                f"parents must satisfy -1 <= parents[i] < i (topological order), got {self.parents.tolist()}."
            )

    @classmethod
    def chain(cls, tokens: torch.Tensor) -> TokenTree:
        """A chain `d_1 → d_2 → …` as a tree."""
        return cls(tokens=tokens, parents=torch.arange(tokens.shape[0]) - 1)

    @classmethod
    def from_paths(cls, paths: list[list[int]]) -> TokenTree:
        """Merge token paths (each from the root down, any lengths) into one tree: paths that share their
        first `d` tokens share those `d` nodes. Nodes are numbered in order of first appearance."""
        node_of_prefix: dict[tuple[int, ...], int] = {}
        tokens: list[int] = []
        parents: list[int] = []
        for path in paths:
            parent = -1
            for depth in range(len(path)):
                prefix = tuple(path[: depth + 1])
                node = node_of_prefix.get(prefix)
                if node is None:
                    node = node_of_prefix[prefix] = len(tokens)
                    tokens.append(int(path[depth]))
                    parents.append(parent)
                parent = node
        return cls(
            tokens=torch.tensor(tokens, dtype=torch.long), parents=torch.tensor(parents, dtype=torch.long)
        )

    @property
    def size(self) -> int:
        """Number of nodes."""
        return self.tokens.shape[0]

    @property
    def is_chain(self) -> bool:
        """Whether the tree is one path `d_1 → d_2 → …` in node order (node `i` at depth `i + 1`), which
        targets verify as a chain."""
        return bool((self.parents == torch.arange(self.size) - 1).all())

    def depths(self) -> torch.Tensor:
        """`[N]` depth of each node (children of the root have depth 1)."""
        depth = torch.zeros(self.size, dtype=torch.long)
        for node, parent in enumerate(self.parents.tolist()):
            depth[node] = 1 if parent < 0 else depth[parent] + 1
        return depth

    def ancestor_mask(self) -> torch.Tensor:
        """`[N, N]` bool: `mask[i, j]` when node `j` is node `i` or one of its ancestors."""
        mask = torch.eye(self.size, dtype=torch.bool)
        for node, parent in enumerate(self.parents.tolist()):
            if parent >= 0:
                mask[node] |= mask[parent]
        return mask

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to `node` (empty for `node = -1`, the root)."""
        nodes = []
        while node >= 0:
            nodes.append(node)
            node = int(self.parents[node])
        return nodes[::-1]

    def children(self, node: int) -> list[int]:
        """Indices of the children of `node` (`-1` for the root), in index order."""
        return (self.parents == node).nonzero()[:, 0].tolist()


@dataclass(frozen=True)
class CompiledTree:
    """What one verification forward over `[chain tokens, tree nodes]` needs.

    Attributes:
        attention_mask: `[1, 1, C + N, past + C + N]` additive mask (0 = attend, `finfo.min` = not).
        position_ids: `[1, C + N]`.
        node_offset: index of the first tree node in the forward's token axis (`C`).
    """

    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    node_offset: int


def compile_tree(
    tree: TokenTree,
    past_length: int,
    chain_length: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> CompiledTree:
    """Mask and positions to score `chain_length` uncached committed tokens and then `tree`'s nodes.

    The chain tokens attend causally; each node attends the whole prefix and chain, its ancestors and
    itself. The last chain token is the tree's root.

    Args:
        tree: the draft tree (`N` nodes).
        past_length: tokens already in the KV cache.
        chain_length: `C >= 1` committed tokens fed before the nodes.
        dtype: the model's dtype (the mask is additive, so eager attention can use it too).
        device: where to build the mask and positions (the model's device; default the CPU).
    """
    if chain_length < 1:
        raise ValueError("the forward must feed at least the root token (chain_length >= 1).")
    queries = chain_length + tree.size
    allowed = torch.zeros(queries, past_length + queries, dtype=torch.bool, device=device)
    allowed[:, :past_length] = True
    allowed[:, past_length : past_length + chain_length] = torch.ones(
        queries, chain_length, dtype=torch.bool, device=device
    ).tril()
    allowed[chain_length:, past_length : past_length + chain_length] = True
    allowed[chain_length:, past_length + chain_length :] = tree.ancestor_mask().to(device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    depths = tree.depths().to(device)
    positions = (
        torch.cat([torch.arange(chain_length, device=device), chain_length - 1 + depths]) + past_length
    )
    return CompiledTree(
        attention_mask=mask[None, None], position_ids=positions[None], node_offset=chain_length
    )


def walk_tree(tree: TokenTree, next_token: Callable[[int], int]) -> tuple[list[int], int]:
    """Follow, from the root, the child whose token is `next_token(node)`, as deep as it goes.

    Args:
        tree: the verified tree.
        next_token: the target's token after `node` (`-1`: the root), e.g. its argmax there.

    Returns:
        `(path, next_token)`: accepted node indices from the root down, and the target's token after the
        last one.
    """
    path, node = [], -1
    while True:
        wanted = next_token(node)
        child = next((c for c in tree.children(node) if int(tree.tokens[c]) == wanted), None)
        if child is None:
            return path, wanted
        path.append(child)
        node = child


def accept_tree_greedy(tree: TokenTree, root_and_node_scores: torch.Tensor) -> tuple[list[int], int]:
    """Longest root-to-node path whose tokens are the target's argmax, and the target's next token.

    Args:
        tree: the verified tree.
        root_and_node_scores: `[1 + N, V]` processed scores after the root (row 0) and after each node.

    Returns:
        `(path, next_token)`: accepted node indices from the root down, and the argmax after the last one.
    """
    choices = root_and_node_scores.argmax(dim=-1).tolist()
    return walk_tree(tree, lambda node: choices[node + 1])


def kept_positions(past_length: int, chain_length: int, path: list[int]) -> torch.Tensor:
    """Sequence positions to keep after accepting `path`: the prefix, the chain, and the path's nodes."""
    nodes = torch.tensor(path, dtype=torch.long) + past_length + chain_length
    return torch.cat([torch.arange(past_length + chain_length), nodes])
