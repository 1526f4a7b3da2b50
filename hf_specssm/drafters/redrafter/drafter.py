"""ReDrafter as a hf_specssm drafter: beam search on the target's hidden state, beams verified as one tree."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, DraftSampler, TreeDrafter
from hf_specssm.drafters.redrafter.beams import Beams, BeamTree, beam_search, beams_to_tree
from hf_specssm.drafters.redrafter.modeling import ReDrafterHead
from hf_specssm.tree import TokenTree


class ReDrafterDrafter(TreeDrafter):
    """Drafts with a `ReDrafterHead` from the target's last hidden state.

    Each round the loop hands over `h`, the target's LM-head input at the position that chose the last
    committed token `g_0`. The head's beam search (carrying one recurrent state per beam) proposes `M`
    beams of `C` tokens. On Transformer targets the beams are merged into a prefix tree (dynamic tree
    attention) and the target verifies each unique token once, greedily or, when sampling, by multi-draft
    speculative sampling (the beams are deterministic, so each sibling is a one-hot proposal and the
    output keeps the target's distribution); on SSM and hybrid targets the best beam is drafted as a chain
    (also one-hot). With one beam (`beam_width=1`) the head is a chain drafter on every target: its rounds
    are chains of `C` tokens (verified as chains, and wrappable in `ContextCopyDrafter`). The head is
    stateless between rounds: `h` carries the context.

    Under every schedule (its default keeps `C` tokens a round) chain rounds are gated: while they lose to
    plain steps (where verifying `C` tokens costs ~2 steps, fp32 on CPUs, and the first draft passes a third
    of the time), `policies.draft_length.DraftGate` switches drafting off and probes now and then.

    Args:
        head: the trained head.
        target: the target to attach now (its embedding is shared; a head for another vocabulary or hidden
            size raises `ValueError`); otherwise it is attached when `generate` starts.
        beam_width: beams `M` (default `head.config.beam_width`).
        beam_length: tokens `C` per beam, the tree's depth (default `head.config.beam_length`).
        config: chain-round draft lengths (default: `C` tokens every round).
    """

    wants_target_hidden = True
    gates_drafting = True

    def __init__(
        self,
        head: ReDrafterHead,
        target: PreTrainedModel | None = None,
        beam_width: int | None = None,
        beam_length: int | None = None,
        config: DraftConfig | None = None,
    ) -> None:
        self.head = head.eval()
        self.beam_width = beam_width if beam_width is not None else head.config.beam_width
        self.beam_length = beam_length if beam_length is not None else head.config.beam_length
        if not 1 <= self.beam_width <= head.config.draftable_tokens or self.beam_length < 1:
            raise ValueError(
                f"beam_width must lie in [1, {head.config.draftable_tokens}] (the tokens the head can draft) and "
                f"beam_length be >= 1, got {self.beam_width} and "
                f"{self.beam_length}."
            )
        if config is None:
            config = DraftConfig(
                num_draft_tokens=self.beam_length,
                schedule="constant",
                max_draft_tokens=max(16, self.beam_length),
            )
        if config.tree_shape is not None:
            raise ValueError("ReDrafter shapes its trees from its beams; leave tree_shape unset.")
        super().__init__(config)
        #: beams merged into trees where the target takes them; one beam is a chain
        self.shapes_own_trees = self.beam_width > 1
        if target is not None:
            head.attach(target)
        self._hidden: torch.Tensor | None = None
        #: the beams and tree of the last tree round (for inspection)
        self.last_beams: BeamTree | None = None

    @property
    def max_tree_depth(self) -> int:
        """The deepest path a tree can hold (`C`): the loop drafts a tree only with more room than this."""
        return self.beam_length

    @property
    def vocab_size(self) -> int:
        return self.head.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.head.device

    def validate_for(self, target: PreTrainedModel) -> None:
        """Attach `target`'s embedding (raising `ValueError` for a head of another size), check the device."""
        self.head.attach(target)
        super().validate_for(target)

    def begin(self, input_ids: torch.Tensor) -> None:
        self._hidden = None
        self.last_beams = None

    def end(self) -> None:
        self._hidden = None

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        self._hidden = hidden.to(device=self.head.device, dtype=self.head.dtype)

    @torch.no_grad()
    def search(self, input_ids: torch.Tensor, sampler: DraftSampler, length: int) -> Beams:
        """Beam search from the last observed hidden state and `g_0 = input_ids[0, -1]`.

        Args:
            input_ids: `[1, L]` committed tokens.
            sampler: its logits processors score the head's logits (per beam, with the beam's own prefix).
            length: tokens per beam.

        Returns:
            `Beams` (`[M, length]` tokens, `[M]` scores), best first.
        """
        if self._hidden is None:
            raise RuntimeError(
                "no target hidden state observed yet: the loop hands one over after each round."
            )
        head, hidden = self.head, self._hidden
        start = head.next_state(head.initial_state(1), input_ids[0, -1:].to(head.device))
        processors = sampler.logits_processor

        def log_probs(states: torch.Tensor, prefixes: torch.Tensor) -> torch.Tensor:
            logits = head.draft_logits(hidden.expand(states.shape[0], -1), states).float()
            if processors:
                committed = input_ids.expand(states.shape[0], -1)
                logits = processors(torch.cat([committed, prefixes.to(committed.device)], dim=1), logits)
            return torch.log_softmax(logits, dim=-1)

        return beam_search(start, log_probs, head.next_state, self.beam_width, length)

    @torch.no_grad()
    def draft_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, shape: tuple[int, ...] | None = None
    ) -> TokenTree:
        """The round's beams merged into one prefix tree (empty before the first hidden state arrives)."""
        if shape is not None:
            raise ValueError("ReDrafter shapes its trees from its beams; leave tree_shape unset.")
        if self._hidden is None:
            return TokenTree.chain(input_ids.new_empty(0).cpu())
        beams = self.search(input_ids, sampler, self.beam_length)
        # beams without a finite score (fewer allowed tokens than beams) would only add dead nodes
        self.last_beams = beams_to_tree(beams.tokens[beams.scores > float("-inf")].cpu())
        return self.last_beams.tree

    def commit_tree(self, input_ids: torch.Tensor, path: list[int]) -> None:
        """Nothing to roll back: the next round starts from the hidden state the loop hands over."""

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        """The best beam of `num_tokens` tokens as a chain, with a one-hot draft distribution (`probs=None`)."""
        if self._hidden is None or num_tokens < 1:
            return Draft(tokens=input_ids.new_empty((1, 0)))
        beams = self.search(input_ids, sampler, num_tokens)
        return Draft(tokens=beams.tokens[:1].to(input_ids.device))

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        """Nothing to roll back: the next round starts from the hidden state the loop hands over."""
