"""The Target contract: score a round's proposals in one forward, then keep the cache for what was accepted.

Every verifier (attention, recurrent, joint, batched) implements `Target`; the decoding loop talks to targets
only through it:

- `prefill(sequences)` once, before the first round;
- `verify(sequences, proposals)`: one forward over every row's uncached committed tokens and its proposal
  (a chain `Draft` or a `TokenTree`); returns per row the float32 logits after the root and after each
  proposed token `[1, 1 + n, V]`;
- `commit(kept)`: per row the proposal positions the loop kept (a chain's first `m` positions, a tree's
  accepted path); the cache then holds exactly the committed tokens except each row's last one;
- `release(rows)`: keep only these rows (finished rows leave a batch);
- `close()` once at the end.

`tree_problem()`, `hidden_problem()` and `row_problem()` say up front what a target cannot verify, so the loop refuses or
adapts in one place.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.drafters.base import Draft
from hf_specssm.tree import TokenTree, compile_tree

Proposal = Draft | TokenTree


class Target(ABC):
    """Base class of verifiers: one model, one cache, the hidden-state capture and the shared forward.

    Args:
        model: the target causal LM.
        cache: the cache the target decodes with.

    Attributes:
        consumed: tokens the cache holds (single-row targets).
        capture_hidden: when true, `verify` keeps the LM head's input at the scored positions in
            `last_hidden` (`[1, 1 + n, H]`, the rows of the logits it returns) for draft heads.
        peak_verification_bytes: the most extra memory one round held for its commit (checkpoints,
            recorded activations, extra rows).
    """

    #: rows one call may verify (`None`: any number)
    max_rows: int | None = 1

    def __init__(self, model: PreTrainedModel, cache: Cache) -> None:
        self.model = model
        self.cache = cache
        self.cache_name = _compat.cache_kwarg_name(model)
        self._pass_logits_to_keep = _compat.forward_accepts(model, "logits_to_keep")
        self._pass_positions = _compat.forward_accepts(model, "position_ids")
        self._counts_tokens = isinstance(cache, ForkableCache)
        self.consumed = cache.get_seq_length()
        self.capture_hidden = False
        self.last_hidden: torch.Tensor | None = None
        self.peak_verification_bytes = 0

    # ------------------------------------------------------------------ the contract

    def tree_problem(self) -> str | None:
        """Why this target cannot verify token trees, or `None` when it can."""
        return None

    def hidden_problem(self) -> str | None:
        """Why this target cannot hand its hidden states to a draft head, or `None` when it can."""
        return None

    def row_problem(self, num_rows: int) -> str | None:
        """Why this target cannot verify `num_rows` rows per forward, or `None` when it can."""
        if self.max_rows is not None and num_rows > self.max_rows:
            return f"{type(self).__name__} verifies {self.max_rows} row(s) per forward, not {num_rows}."
        return None

    def prefill(self, sequences: Sequence[torch.Tensor]) -> None:
        """Before the first round: let the cache read each row's prompt (`[1, L]`) but its last token."""

    @abstractmethod
    def verify(self, sequences: Sequence[torch.Tensor], proposals: Sequence[Proposal]) -> list[torch.Tensor]:
        """Score each row's proposal in one forward.

        Args:
            sequences: per row, `[1, L]` committed tokens.
            proposals: per row, a chain `Draft` (`[1, k]` tokens) or a `TokenTree` (`N` nodes).

        Returns:
            per row, `[1, 1 + n, V]` float32 logits: after the last committed token (the root), then after
            each proposed token (chain position or tree node).
        """

    @abstractmethod
    def commit(self, kept: Sequence[list[int]]) -> None:
        """Keep, per row, the proposal positions `kept[b]` (chain: `0 … m - 1`; tree: the accepted path)."""

    @abstractmethod
    def release(self, rows: list[int]) -> None:
        """Keep only the rows `rows` (finished rows leave the batch)."""

    def close(self) -> None:
        """Called once after the last round: leave `cache` as a cache of the committed tokens."""

    # ------------------------------------------------------------------ shared helpers

    def _forward(self, tokens: torch.Tensor, num_logits: int, **inputs) -> torch.Tensor:
        """Run `tokens` `[B, T]` from the cache at position `consumed`; return the last `num_logits` logits
        `[B, num_logits, V]` (float32). `inputs` override the default positions (or add a mask)."""
        start = self.consumed
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self._pass_positions:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            kwargs["position_ids"] = positions.expand(tokens.shape[0], -1)
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = num_logits
        kwargs.update(inputs)
        with _compat.grouped_query_attention():
            logits = self.model(input_ids=tokens, **kwargs).logits[:, -num_logits:].float()
        self.consumed = start + tokens.shape[1]
        if self._counts_tokens:
            self.cache.advance(tokens.shape[1])
        return logits

    def _pending(self, input_ids: torch.Tensor, apart: bool) -> torch.Tensor:
        """The committed tokens the cache has not read, `[1, C]`. With `apart`, a first call runs the prompt
        but its last token as a prefill of its own, so a round's commit never replays the prompt."""
        pending = input_ids[:, self.consumed :]
        if apart and self.consumed == 0 and pending.shape[1] > 1:
            self._forward(pending[:, :-1], 1)
            pending = pending[:, -1:]
        return pending

    def _tree_inputs(self, tree: TokenTree, chain_length: int, device: torch.device) -> dict:
        """The 4D tree mask and positions attention layers need to score `[chain, tree nodes]`, built on
        `device` (the forward's)."""
        compiled = compile_tree(tree, self.consumed, chain_length, self.model.dtype, device=device)
        return {"attention_mask": compiled.attention_mask, "position_ids": compiled.position_ids}

    @contextlib.contextmanager
    def _hidden_capture(self, num_positions: int, row: int = 0) -> Iterator[None]:
        """While active (and `capture_hidden` is set), `last_hidden` becomes row `row`'s last `num_positions`
        LM-head inputs `[1, num_positions, H]` over every forward run inside."""
        if not self.capture_hidden:
            yield
            return
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(
                f"{type(self.model).__name__} has no output embedding to read hidden states from."
            )
        parts: list[torch.Tensor] = []

        def grab(module, args):
            parts.append(args[0][row : row + 1].detach())

        handle = head.register_forward_pre_hook(grab)
        try:
            yield
        finally:
            handle.remove()
        self.last_hidden = torch.cat(parts, dim=1)[:, -num_positions:].clone() if parts else None


class SingleRowTarget(Target):
    """A target that verifies one prompt per forward through four primitives: `score` / `keep` for chains
    and `score_tree` / `keep_tree` for trees."""

    def __init__(self, model: PreTrainedModel, cache: Cache) -> None:
        super().__init__(model, cache)
        self._round: tuple[bool, int] = (False, 0)  # (tree round, committed length before the round)

    def verify(self, sequences: Sequence[torch.Tensor], proposals: Sequence[Proposal]) -> list[torch.Tensor]:
        (sequence,), (proposal,) = sequences, proposals
        # a tree that is one path in node order is verified as the chain it is (no tree mask or tree scan)
        is_tree = isinstance(proposal, TokenTree) and not proposal.is_chain
        self._round = (is_tree, sequence.shape[1])
        if is_tree:
            return [self.score_tree(sequence, proposal)]
        tokens = proposal.tokens[None] if isinstance(proposal, TokenTree) else proposal.tokens
        return [self.score(sequence, tokens.to(sequence.device))]

    def commit(self, kept: Sequence[list[int]]) -> None:
        (path,) = kept
        is_tree, prefix_length = self._round
        if is_tree:
            self.keep_tree(path)
        else:
            self.keep(prefix_length + len(path))

    def release(self, rows: list[int]) -> None:
        if rows != [0]:
            raise ValueError(f"{type(self).__name__} holds one row; cannot keep rows {rows}.")

    @abstractmethod
    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Logits after each prefix of the chain `draft_tokens` `[1, k]` following `input_ids` `[1, L]`:
        `[1, k + 1, V]` float32."""

    @abstractmethod
    def keep(self, length: int) -> None:
        """Bring the cache to the first `length` tokens of the last scored sequence."""

    def score_tree(self, input_ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """Logits after the root and after every node of `tree`: `[1, 1 + N, V]` float32."""
        raise ValueError(self.tree_problem() or f"{type(self).__name__} does not verify trees.")

    def keep_tree(self, path: list[int]) -> None:
        """Keep the fed chain and the nodes of `path` (root first)."""
        raise ValueError(self.tree_problem() or f"{type(self).__name__} does not verify trees.")
