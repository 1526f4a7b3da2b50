"""Drafters that force exact acceptance patterns, so every branch of the loop is exercised."""

from __future__ import annotations

import itertools

import torch

from hf_specssm import Draft, DraftConfig, Drafter


class ScriptedDrafter(Drafter):
    """Drafts the target's own greedy continuation for `accept_script[r]` tokens in round `r`, then wrong ones.

    Args:
        reference: `[1, N]` the target's plain greedy output (prompt included).
        accept_script: accepted lengths to force, cycled over the rounds.
        num_draft_tokens: draft length per round.
        vocab_size: target vocabulary size (wrong tokens are `right + 1 mod V`).
    """

    def __init__(
        self, reference: torch.Tensor, accept_script: list[int], num_draft_tokens: int, vocab_size: int
    ):
        super().__init__(DraftConfig(num_draft_tokens=num_draft_tokens, schedule="constant"))
        self.reference = reference[0]
        self.script = accept_script
        self._vocab = vocab_size
        self.forced: list[int] = []

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def begin(self, input_ids):
        self._rounds = itertools.cycle(self.script)

    def draft(self, input_ids, num_tokens, sampler):
        start = input_ids.shape[1]
        assert torch.equal(input_ids[0], self.reference[:start]), "committed tokens left the greedy reference"
        right = next(self._rounds)
        self.forced.append(min(right, num_tokens))
        tokens = []
        for i in range(num_tokens):
            position = start + i
            truth = int(self.reference[position]) if position < self.reference.shape[0] else 0
            tokens.append(truth if i < right else (truth + 1) % self._vocab)
        return Draft(tokens=torch.tensor([tokens], dtype=torch.long))

    def commit(self, input_ids, num_accepted):
        pass
