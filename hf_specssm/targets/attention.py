"""A Transformer target: verify chains and trees against its KV cache, roll back by cropping.

The cache is the one `generate` prepared: a `DynamicCache`, or a `StaticCache` (`cache_implementation=
"static"`), whose full-attention layers are rolled back in place; static sliding windows are refused.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from hf_specssm import _compat
from hf_specssm._compat.attention import keep_attention_positions
from hf_specssm.targets.base import SingleRowTarget
from hf_specssm.tree import TokenTree, kept_positions


class AttentionTarget(SingleRowTarget):
    """A target whose cache holds only attention layers.

    The cache always holds the committed tokens except the last one (whose logits the next round needs), so
    a round feeds `[last committed token(s), d_1 … d_k]` (or the tree's nodes under a tree mask) and reads
    `k + 1` positions of logits; rejected positions are cropped (chains) or gathered away (trees).

    Args:
        model: the target causal LM.
        cache: its cache from `generate` (a new `DynamicCache` when `None`); sliding-window layers are
            switched to past recording so they can be cropped. A `StaticCache` must hold full-attention
            layers only.

    Raises:
        ValueError: for a static cache that cannot be rolled back (sliding-window or other static kinds).
    """

    def __init__(self, model: PreTrainedModel, cache: Cache | None = None) -> None:
        cache = cache if cache is not None else DynamicCache(config=model.config)
        problem = _compat.cache_rollback_problem(cache)
        if problem is not None:
            raise ValueError(problem)
        super().__init__(model, cache)
        # a static layer counts its tokens in a tensor
        self.consumed = int(self.consumed)
        _compat.enable_attention_rollback(self.cache)
        self._tree_round = (0, 0)

    def tree_problem(self) -> str | None:
        if any(_compat.is_sliding_attention_layer(layer) for layer in self.cache.layers):
            return "tree verification does not support sliding-window attention targets yet."
        if any(_compat.is_static_layer(layer) for layer in self.cache.layers):
            # a tree round writes every node into the cache (more slots than the call may commit) and its
            # 4D mask covers the used slots only, not the whole static buffer
            return (
                "tree verification needs a DynamicCache; drop cache_implementation='static' (or the "
                "StaticCache) to verify trees, or drop tree_shape / tree_policy."
            )
        return None

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        new_tokens = torch.cat([input_ids[:, self.consumed :], draft_tokens], dim=1)
        with self._hidden_capture(draft_tokens.shape[1] + 1):
            return self._forward(new_tokens, draft_tokens.shape[1] + 1)

    def keep(self, length: int) -> None:
        if length > self.consumed:
            raise ValueError(f"cannot keep {length} tokens, the cache holds {self.consumed}.")
        _compat.crop_cache(self.cache, self.consumed - length)
        self.consumed = length

    def score_tree(self, input_ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """Logits after the root and after every node of `tree`, in one forward with a tree mask.

        Returns:
            `[1, 1 + N, V]` float32 logits: row 0 after the root (last committed token), row `1 + i` after
            node `i`.
        """
        problem = self.tree_problem()
        if problem is not None:
            raise ValueError(problem)
        chain = input_ids[:, self.consumed :]
        inputs = self._tree_inputs(tree, chain.shape[1], chain.device)
        tokens = torch.cat([chain, tree.tokens[None].to(chain.device)], dim=1)
        self._tree_round = (self.consumed, chain.shape[1])
        with self._hidden_capture(tree.size + 1):
            return self._forward(tokens, tree.size + 1, **inputs)

    def keep_tree(self, path: list[int]) -> None:
        """Keep the cached prefix, the fed chain and the nodes of `path`; drop every other node's keys."""
        past, chain = self._tree_round
        keep_attention_positions(self.cache, kept_positions(past, chain, path))
        self.consumed = past + chain + len(path)
