"""Model-free drafters: prompt lookup and an n-gram table of the sequence so far.

Both propose deterministic drafts (`probs=None`), which the acceptance rules treat as one-hot `q`, so
greedy and sampling stay lossless. A drafter may propose fewer tokens than asked (or none, when nothing
matches); the round then verifies what there is.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, Drafter, DraftSampler


def _empty_draft(input_ids: torch.Tensor) -> Draft:
    return Draft(tokens=input_ids.new_empty((input_ids.shape[0], 0)))


class PromptLookupDrafter(Drafter):
    """Copy the continuation of the latest earlier occurrence of the sequence's last n-gram.

    Same rule as transformers' `prompt_lookup_num_tokens`: try n-grams of `max_ngram_size` tokens down to
    `min_ngram_size`; for the first size with an earlier match, propose the tokens that followed it.

    Args:
        max_ngram_size: longest suffix to match (transformers' `max_matching_ngram_size`, default 2).
        min_ngram_size: shortest suffix to match.
        config: draft-length options; `num_draft_tokens` plays `prompt_lookup_num_tokens`.
        **options: `DraftConfig` fields.
    """

    def __init__(
        self, max_ngram_size: int = 2, min_ngram_size: int = 1, config: DraftConfig | None = None, **options
    ) -> None:
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
        self.max_ngram_size = max_ngram_size
        self.min_ngram_size = min_ngram_size

    def begin(self, input_ids: torch.Tensor) -> None:
        pass

    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        sequence = input_ids[0]
        length = sequence.shape[0]
        for size in range(min(self.max_ngram_size, length - 1), self.min_ngram_size - 1, -1):
            windows = sequence.unfold(0, size, 1)  # [length - size + 1, size]
            # earlier windows only (the last window is the suffix itself)
            matches = (windows[:-1] == sequence[length - size :]).all(dim=1).nonzero()
            for start in reversed(matches[:, 0].tolist()):
                follow = sequence[start + size : start + size + num_tokens]
                if follow.numel() > 0:
                    return Draft(tokens=follow[None].clone())
        return _empty_draft(input_ids)

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        pass


class NgramTableDrafter(Drafter):
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
