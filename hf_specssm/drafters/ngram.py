"""Model-free drafters: prompt lookup and an n-gram table of the sequence so far.

Both propose deterministic drafts (`probs=None`), which the acceptance rules treat as one-hot `q`, so
greedy and sampling stay lossless. A drafter may propose fewer tokens than asked (or none, when nothing
matches); the round then verifies what there is.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, DraftSampler, TreeDrafter
from hf_specssm.tree import TokenTree


def _empty_draft(input_ids: torch.Tensor) -> Draft:
    return Draft(tokens=input_ids.new_empty((input_ids.shape[0], 0)))


class PromptLookupDrafter(TreeDrafter):
    """Copy the continuation of an earlier occurrence of the sequence's last n-gram.

    Same rule as transformers' `prompt_lookup_num_tokens`: try n-grams of `max_ngram_size` tokens down to
    `min_ngram_size`; for the first size with an earlier match, propose the tokens that followed its first
    occurrence (`match="earliest"`, transformers' choice: in an answer that repeats part of the prompt, the
    prompt holds the original) or its most recent one (`match="latest"`).

    With `max_candidates > 1` it drafts a tree instead (on targets that verify trees): the continuations
    of up to that many distinct earlier matches (longer n-grams first, then in `match` order), merged where
    they share a prefix.

    Args:
        max_ngram_size: longest suffix to match (transformers' `max_matching_ngram_size`, default 2).
        min_ngram_size: shortest suffix to match.
        max_candidates: continuations per round; more than one makes a tree.
        match: which occurrence of the n-gram to copy from first, `"earliest"` or `"latest"`.
        config: draft-length options; `num_draft_tokens` plays `prompt_lookup_num_tokens`.
        **options: `DraftConfig` fields.

    Under every schedule a match is only an offer: while copied drafts lose to plain steps (text that never
    repeats), `policies.draft_length.DraftGate` switches drafting off and probes now and then.
    """

    gates_drafting = True

    def __init__(
        self,
        max_ngram_size: int = 2,
        min_ngram_size: int = 1,
        max_candidates: int = 1,
        match: str = "earliest",
        config: DraftConfig | None = None,
        **options,
    ) -> None:
        if match not in ("earliest", "latest"):
            raise ValueError(f"match must be 'earliest' or 'latest', got {match!r}.")
        if config is not None and options:
            raise ValueError("pass either `config` or DraftConfig fields as keyword arguments, not both.")
        if config is None:
            options.setdefault("num_draft_tokens", 10)
            options.setdefault("schedule", "constant")
        super().__init__(config if config is not None else DraftConfig(**options))
        if not 1 <= min_ngram_size <= max_ngram_size:
            raise ValueError(
                f"need 1 <= min_ngram_size <= max_ngram_size, got {min_ngram_size} and {max_ngram_size}."
            )
        if not isinstance(max_candidates, int) or max_candidates < 1:
            raise ValueError(f"max_candidates must be an integer >= 1, got {max_candidates!r}.")
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size
        self.max_candidates = max_candidates
        self.match = match
        self.shapes_own_trees = max_candidates > 1

    @property
    def max_tree_depth(self) -> int:
        """Longest candidate continuation (the loop drafts a tree only with more room than this)."""
        return self.config.num_draft_tokens

    def begin(self, input_ids: torch.Tensor) -> None:
        pass

    def _continuations(self, input_ids: torch.Tensor, num_tokens: int, limit: int) -> list[list[int]]:
        """Up to `limit` distinct continuations of earlier matches of the suffix, best first."""
        sequence = input_ids[0]
        length = sequence.shape[0]
        found: list[list[int]] = []
        for size in range(min(self.max_ngram_size, length - 1), self.min_ngram_size - 1, -1):
            windows = sequence.unfold(0, size, 1)  # [length - size + 1, size]
            # earlier windows only (the last window is the suffix itself)
            matches = (windows[:-1] == sequence[length - size :]).all(dim=1).nonzero()
            starts = matches[:, 0].tolist()
            for start in starts if self.match == "earliest" else reversed(starts):
                follow = sequence[start + size : start + size + num_tokens].tolist()
                if follow and follow not in found:
                    found.append(follow)
                    if len(found) == limit:
                        return found
        return found

    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        found = self._continuations(input_ids, num_tokens, limit=1)
        if not found:
            return _empty_draft(input_ids)
        return Draft(tokens=input_ids.new_tensor([found[0]]))

    def draft_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, shape: tuple[int, ...] | None = None
    ) -> TokenTree:
        """The continuations of up to `max_candidates` matches, merged into one tree (deterministic)."""
        return TokenTree.from_paths(
            self._continuations(input_ids, self.config.num_draft_tokens, self.max_candidates)
        )

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        pass

    def commit_tree(self, input_ids: torch.Tensor, path: list[int]) -> None:
        """Nothing to update: lookups read the committed sequence."""


class NgramTableDrafter(TreeDrafter):
    """Chain the most frequent continuations of an n-gram table built from the sequence so far.

    The table maps every context of `1 … order - 1` tokens seen in the prompt and in the target's own
    output to counts of the token that followed. Drafting looks up the longest known context and takes its
    most frequent next token (backing off to shorter contexts), again and again. The table grows with each
    committed token, so repetitive output is drafted further and further ahead.

    Args:
        order: n of the n-grams (contexts of up to `order - 1` tokens).
        config: draft-length options.
        **options: `DraftConfig` fields.
    """

    def __init__(self, order: int = 3, config: DraftConfig | None = None, **options) -> None:
        if config is not None and options:
            raise ValueError("pass either `config` or DraftConfig fields as keyword arguments, not both.")
        super().__init__(config if config is not None else DraftConfig(**options))
        if order < 2:
            raise ValueError(f"order must be >= 2, got {order}.")
        self.order = order
        self._table: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        self._indexed = 0
        self._tokens: list[int] = []

    def begin(self, input_ids: torch.Tensor) -> None:
        self._table = defaultdict(Counter)
        self._tokens = []
        self._indexed = 0
        self._index(input_ids)

    def _index(self, input_ids: torch.Tensor) -> None:
        """Add every n-gram that ends at a token not indexed yet."""
        self._tokens.extend(input_ids[0, len(self._tokens) :].tolist())
        for end in range(max(self._indexed, 1), len(self._tokens)):
            for context in range(1, self.order):
                if end - context < 0:
                    break
                self._table[tuple(self._tokens[end - context : end])][self._tokens[end]] += 1
        self._indexed = len(self._tokens)

    def _next(self, history: list[int]) -> int | None:
        for context in range(min(self.order - 1, len(history)), 0, -1):
            counts = self._table.get(tuple(history[-context:]))
            if counts:
                return counts.most_common(1)[0][0]
        return None

    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        self._index(input_ids)
        history = list(self._tokens)
        tokens = []
        for _ in range(num_tokens):
            token = self._next(history)
            if token is None:
                break
            tokens.append(token)
            history.append(token)
        if not tokens:
            return _empty_draft(input_ids)
        return Draft(tokens=torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device))

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        self._index(input_ids)

    def _top_next(self, history: list[int], width: int) -> list[int]:
        """The `width` most frequent next tokens after the longest known context (backing off)."""
        for context in range(min(self.order - 1, len(history)), 0, -1):
            counts = self._table.get(tuple(history[-context:]))
            if counts:
                return [token for token, _ in counts.most_common(width)]
        return []

    def draft_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, shape: tuple[int, ...] | None = None
    ) -> TokenTree:
        """Expand each node into its `w` most frequent continuations, per depth of `shape` (default
        `config.tree_shape`); deterministic."""
        shape = shape if shape is not None else self.config.tree_shape
        self._index(input_ids)
        paths: list[list[int]] = [[]]
        finished: list[list[int]] = []
        for width in shape:
            grown = []
            for path in paths:
                children = self._top_next(self._tokens + path, width)
                if not children and path:
                    finished.append(path)
                grown += [[*path, token] for token in children]
            paths = grown
        return TokenTree.from_paths(finished + paths)

    def commit_tree(self, input_ids: torch.Tensor, path: list[int]) -> None:
        """Index the newly committed tokens."""
        self._index(input_ids)
